//! The trainer end to end on a micro model and the generated shapes data: exact resume, crash safety
//! of checkpoint writes, non-finite handling.

use alignfuse::config::{Config, OnNonFinite};
use alignfuse::train::log::{read_records, Record, StepRecord};
use alignfuse::train::{checkpoint, train, TrainOptions};
use std::path::{Path, PathBuf};

fn micro_config(extra: &[&str]) -> Config {
    let mut sets: Vec<String> = [
        "model.vision.image_res=16", "model.vision.patch_size=8", "model.vision.vision_width=32",
        "model.vision.vision_depth=1", "model.vision.vision_heads=2", "model.text.hidden_size=32",
        "model.text.num_hidden_layers=2", "model.text.fusion_layer=1", "model.text.num_attention_heads=2",
        "model.text.intermediate_size=64", "model.text.hidden_dropout_prob=0.1",
        "model.text.attention_probs_dropout_prob=0.1", "model.embed_dim=16", "model.queue_size=20",
        "data.synth_n=64", "data.num_workers=2", "data.randaugment_n=2", "train.batch_size=8", "train.epochs=2",
        "train.warmup_steps=2", "train.log_every=1", "eval.k_test=4", "eval.batch_size=32", "device=cpu",
    ].iter().map(|s| s.to_string()).collect();
    sets.extend(extra.iter().map(|s| s.to_string()));
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml");
    Config::load(&path, &sets).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn steps(out: &Path) -> Vec<StepRecord> {
    read_records(&out.join("log.jsonl")).unwrap().into_iter().filter_map(|r| match r {
        Record::Step(s) => Some(s),
        _ => None,
    }).collect()
}

/// Compares what must be identical in a resumed run (not the wall-clock throughput).
fn same(a: &StepRecord, b: &StepRecord) -> bool {
    (a.step, a.epoch, a.loss, a.itc, a.itm, a.mlm, a.lr, a.alpha, a.temp, a.itm_acc, a.grad_norm)
        == (b.step, b.epoch, b.loss, b.itc, b.itm, b.mlm, b.lr, b.alpha, b.temp, b.itm_acc, b.grad_norm)
}

/// N steps, resume, N more steps == 2N steps straight, bit for bit; N = 5 crosses the epoch boundary
/// (4 steps per epoch) mid-way, and accumulation of 2 micro-batches is on.
#[test]
fn resume_is_exact() {
    let cfg = micro_config(&["train.grad_accum=2", "train.epochs=3"]);
    let straight = scratch("resume-straight");
    train(cfg.clone(), &TrainOptions { out: straight.clone(), resume: None, max_steps: Some(10) }).unwrap();
    let split = scratch("resume-split");
    train(cfg.clone(), &TrainOptions { out: split.clone(), resume: None, max_steps: Some(5) }).unwrap();
    assert_eq!(steps(&split).len(), 5);
    train(cfg, &TrainOptions { out: split.clone(), resume: Some("latest".into()), max_steps: Some(10) }).unwrap();
    let (a, b) = (steps(&straight), steps(&split));
    assert_eq!(a.len(), 10);
    assert_eq!(b.len(), 10);
    for (x, y) in a.iter().zip(&b) {
        assert!(same(x, y), "step {} differs:\n straight {x:?}\n resumed  {y:?}", x.step);
    }
}

/// A process killed while writing a checkpoint leaves the previous `latest` intact and resumable.
#[test]
fn killed_during_checkpoint_write_keeps_previous() {
    let out = scratch("crash");
    std::fs::create_dir_all(&out).unwrap();
    let cfg = micro_config(&["train.checkpoint_every=2"]);
    let cfg_file = out.join("micro.toml");
    std::fs::write(&cfg_file, toml::to_string(&cfg).unwrap()).unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_alignfuse"))
        .args(["train", "--config"]).arg(&cfg_file).arg("--out").arg(&out)
        .args(["--max-steps", "6"])
        .env("ALIGNFUSE_ABORT_IN_CHECKPOINT", "4")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .unwrap();
    assert!(!status.success(), "the run should have been killed");
    let ckpts = out.join("checkpoints");
    assert!(ckpts.join(".tmp-step-0000004").exists(), "the interrupted write should have left its temporary");
    let latest = std::fs::read_link(ckpts.join("latest")).unwrap();
    assert_eq!(latest, Path::new("step-0000002"));
    let loaded = checkpoint::load(&ckpts.join("latest"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(loaded.state.step, 2);
    let s = train(cfg, &TrainOptions { out: out.clone(), resume: Some("latest".into()), max_steps: Some(6) }).unwrap();
    assert_eq!(s.steps, 6);
    assert!(!ckpts.join(".tmp-step-0000004").exists(), "stale temporaries are cleaned up");
}

#[test]
fn non_finite_loss_stops_or_skips() {
    let cfg = micro_config(&["train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0"]);
    let out = scratch("nan-stop");
    let err = train(cfg.clone(), &TrainOptions { out, resume: None, max_steps: Some(6) }).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("is NaN") || msg.contains("is inf") || msg.contains("is -inf"), "{msg}");
    assert!(msg.contains("loss `") && msg.contains("step "), "{msg}");
    let mut skip = cfg;
    skip.train.on_nonfinite = OnNonFinite::Skip;
    let s = train(skip, &TrainOptions { out: scratch("nan-skip"), resume: None, max_steps: Some(6) }).unwrap();
    assert!(s.skipped_steps > 0);
    assert_eq!(s.steps, 6);
}
