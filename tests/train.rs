//! The trainer end to end on a micro model and the generated shapes data: exact resume, crash safety
//! of checkpoint writes, non-finite handling.

mod common;
use alignfuse::config::OnNonFinite;
use alignfuse::eval::EvalInputs;
use alignfuse::train::log::{read_records, Record};
use alignfuse::train::{checkpoint, train, TrainOptions};
use common::{micro_config, same, scratch, steps};
use std::path::Path;

/// N steps, resume, N more steps == 2N steps straight, bit for bit; N = 5 crosses the epoch boundary
/// (4 steps per epoch) mid-way, and accumulation of 2 micro-batches is on.
#[test]
fn resume_is_exact() {
    let cfg = micro_config(&["train.grad_accum=2", "train.epochs=3"]);
    let straight = scratch("resume-straight");
    train(
        cfg.clone(),
        &TrainOptions { out: straight.clone(), resume: None, max_steps: Some(10), label: None, overwrite: false },
    )
    .unwrap();
    let split = scratch("resume-split");
    train(
        cfg.clone(),
        &TrainOptions { out: split.clone(), resume: None, max_steps: Some(5), label: None, overwrite: false },
    )
    .unwrap();
    assert_eq!(steps(&split).len(), 5);
    train(
        cfg,
        &TrainOptions {
            out: split.clone(),
            resume: Some("latest".into()),
            max_steps: Some(10),
            label: None,
            overwrite: false,
        },
    )
    .unwrap();
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
        .args(["train", "--config"])
        .arg(&cfg_file)
        .arg("--out")
        .arg(&out)
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
    let s = train(
        cfg,
        &TrainOptions {
            out: out.clone(),
            resume: Some("latest".into()),
            max_steps: Some(6),
            label: None,
            overwrite: false,
        },
    )
    .unwrap();
    assert_eq!(s.steps, 6);
    assert!(!ckpts.join(".tmp-step-0000004").exists(), "stale temporaries are cleaned up");
}

#[test]
fn non_finite_loss_stops_or_skips() {
    let cfg = micro_config(&["train.lr=1e30", "train.warmup_steps=0", "train.grad_clip=0"]);
    let out = scratch("nan-stop");
    let err =
        train(cfg.clone(), &TrainOptions { out, resume: None, max_steps: Some(6), label: None, overwrite: false })
            .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("is NaN") || msg.contains("is inf") || msg.contains("is -inf"), "{msg}");
    assert!(msg.contains("loss `") && msg.contains("step "), "{msg}");
    let mut skip = cfg;
    skip.train.on_nonfinite = OnNonFinite::Skip;
    let s = train(
        skip,
        &TrainOptions { out: scratch("nan-skip"), resume: None, max_steps: Some(6), label: None, overwrite: false },
    )
    .unwrap();
    assert!(s.skipped_steps > 0);
    assert_eq!(s.steps, 6);
}

/// `train.init` starts from a checkpoint's weights (an `alignfuse import` output, or another run's model)
/// instead of the seeded initialisation; a missing file is an error naming the key.
#[test]
fn train_init_starts_from_a_checkpoint() {
    let cfg = micro_config(&[]);
    let first = scratch("init-first");
    train(
        cfg.clone(),
        &TrainOptions { out: first.clone(), resume: None, max_steps: Some(2), label: None, overwrite: false },
    )
    .unwrap();
    let file = first.join("checkpoints/latest/model.safetensors");
    let saved = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let mut with_init = cfg.clone();
    with_init.train.init = Some(file);
    let setup = alignfuse::train::Setup::new(with_init, &scratch("init-second")).unwrap();
    let fresh = alignfuse::train::Setup::new(cfg.clone(), &scratch("init-fresh")).unwrap();
    let name = "text_encoder.bert.encoder.layer.0.attention.self.query.weight";
    let get = |s: &alignfuse::train::Setup| {
        s.model.params().var(name).unwrap().as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    assert_eq!(get(&setup), saved[name].flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_ne!(get(&fresh), get(&setup), "two trained steps changed the weights");
    let mut missing = cfg;
    missing.train.init = Some(first.join("nope.safetensors"));
    let err =
        alignfuse::train::Setup::new(missing, &scratch("init-missing")).err().expect("a missing init file is an error");
    assert!(format!("{err:#}").contains("train.init"), "{err:#}");
}

/// ITM alone can learn: one small batch trained over and over (hard negatives from the batch, no
/// dropout) ends with the head classifying > 95% of its 3B pairs.
#[test]
fn itm_alone_overfits_one_batch() {
    let cfg = micro_config(&[
        "objectives.itc=false",
        "objectives.mlm=false",
        "objectives.itm=true",
        "objectives.itm_hard_fraction=1",
        "model.text.hidden_dropout_prob=0",
        "model.text.attention_probs_dropout_prob=0",
        "train.lr=1e-3",
        "train.warmup_steps=0",
        "train.weight_decay=0",
    ]);
    let mut setup = alignfuse::train::Setup::new(cfg, &scratch("itm-overfit")).unwrap();
    let batch = setup.loader.epoch(0, 0, None).unwrap().next().unwrap().unwrap();
    let mut accuracy = 0.0;
    for step in 0..200 {
        setup.model.update_momentum().unwrap();
        let mut out = setup.forward(&batch, step, 0.0).unwrap();
        accuracy = out.metrics.get("itm_acc").unwrap().to_scalar::<f32>().unwrap();
        setup.opt.accumulate(&alignfuse::train::backward(&mut out, &setup.device).unwrap().1).unwrap();
        setup.opt.step(1e-3, 0.0).unwrap();
    }
    assert!(accuracy > 0.95, "ITM accuracy {accuracy} after 200 steps on one batch");
}

/// `train.select` names the validation r_mean that marks `best`: the link follows the epoch with the
/// highest value of that number (the first of equal ones), and the run reports the test split at that
/// checkpoint (what ALBEF reports) besides the last epoch's: the same numbers `eval` gives on it. With
/// one epoch the last is the best, measured once and logged as the final `test` all the same. Without
/// ITM, re-ranking is by an untrained head, so `best` follows ITC whatever `train.select` says.
#[test]
fn best_follows_the_selected_validation_r_mean() {
    let cases = [
        ("itc", true, "itc", 3),
        ("rerank", true, "rerank", 3),
        ("rerank", true, "rerank", 1),
        ("rerank", false, "itc", 3),
    ];
    for (select, itm, key, epochs) in cases {
        let out = scratch(&format!("select-{select}-{itm}-{epochs}"));
        let sets =
            [format!("train.select={select}"), format!("objectives.itm={itm}"), format!("train.epochs={epochs}")];
        let cfg = micro_config(&sets.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(cfg.select().describe(), if key == "itc" { "ITC-only" } else { "re-ranked" });
        let opts = TrainOptions { out: out.clone(), resume: None, max_steps: None, label: None, overwrite: false };
        let summary = train(cfg.clone(), &opts).unwrap();
        let (mut best, mut final_tests): (Option<(f64, usize)>, Vec<usize>) = (None, vec![]);
        for r in read_records(&out.join("log.jsonl")).unwrap() {
            if let Record::Eval { split, step, metrics, .. } = r {
                let r_mean = metrics[key]["r_mean"].as_f64().unwrap();
                if split == "val" && best.is_none_or(|(b, _)| r_mean > b) {
                    best = Some((r_mean, step));
                }
                if split == "test" {
                    final_tests.push(step);
                }
            }
        }
        assert_eq!(final_tests, [summary.steps], "{select}");
        let (_, step) = best.unwrap();
        let link = std::fs::read_link(out.join("checkpoints/best")).unwrap();
        assert_eq!(link, Path::new(&format!("step-{step:07}")), "{select}");

        let at_best = summary.test_at_best.expect("a test split at the best checkpoint");
        assert_eq!(at_best.step, step, "{select}");
        let test_ann = out.join("data/synth-n64-seed42/test.json");
        let eval = |ckpt: &str| {
            let r = EvalInputs::load(cfg.clone(), &out.join(ckpt), &test_ann).unwrap().evaluate().unwrap();
            (r.itc, r.rerank)
        };
        assert_eq!((at_best.report.itc, at_best.report.rerank), eval("checkpoints/best"), "{select}");
        let last = summary.test.expect("a test split at the last epoch");
        assert_eq!((last.itc, last.rerank), eval("checkpoints/latest"), "{select}");
    }
}

/// An optimiser step reads the device once, with or without accumulation (the gradient norm, every
/// micro-batch's losses and metrics together): MLM masks, ITM negatives and the temp clamp read nothing.
/// The limit is 3 reads per step; every read of the step goes through `alignfuse::readback::read`.
#[test]
fn an_optimizer_step_reads_the_device_once() {
    for accum in [1, 3] {
        let cfg = micro_config(&[&format!("train.grad_accum={accum}")]);
        let out = scratch(&format!("reads-{accum}"));
        let before = alignfuse::readback::count();
        let opts = TrainOptions { out: out.clone(), resume: None, max_steps: Some(2), label: None, overwrite: false };
        train(cfg, &opts).unwrap();
        let reads = alignfuse::readback::count() - before;
        assert_eq!(steps(&out).len(), 2);
        assert!(reads <= 2 * 3, "{reads} reads in 2 steps of {accum} micro-batches");
        assert_eq!(reads, 2, "accumulating {accum}");
    }
}

/// `train.precision = "bf16"` (matmuls in bf16, LayerNorm, softmax, losses, weights and AdamW in fp32)
/// tracks the fp32 run: 20 steps, every step's loss within 2%; and every parameter gets a finite, non-zero
/// gradient through the casts.
#[test]
fn bf16_tracks_fp32_and_reaches_every_parameter() {
    let run = |precision: &str| {
        let out = scratch(&format!("precision-{precision}"));
        let cfg = micro_config(&["train.epochs=3", &format!("train.precision={precision}")]);
        let opts = TrainOptions { out: out.clone(), resume: None, max_steps: Some(20), label: None, overwrite: false };
        train(cfg, &opts).unwrap();
        steps(&out)
    };
    let (fp32, bf16) = (run("fp32"), run("bf16"));
    assert_eq!((fp32.len(), bf16.len()), (20, 20));
    for (a, b) in fp32.iter().zip(&bf16) {
        let rel = (a.loss - b.loss).abs() / a.loss.abs();
        assert!(rel <= 0.02, "step {}: fp32 loss {} bf16 {} ({:.1}%)", a.step, a.loss, b.loss, 100.0 * rel);
    }
    assert_ne!(fp32[19].loss, bf16[19].loss, "bf16 must actually change the arithmetic");

    let cfg = micro_config(&["train.precision=bf16"]);
    let mut setup = alignfuse::train::Setup::new(cfg, &scratch("precision-grads")).unwrap();
    let batch = setup.loader.epoch(0, 0, None).unwrap().next().unwrap().unwrap();
    let mut out = setup.forward(&batch, 0, 0.4).unwrap();
    let (_, grads) = alignfuse::train::backward(&mut out, &setup.device).unwrap();
    for (name, var) in setup.model.params().vars() {
        let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} gets no gradient"));
        assert_eq!(g.dtype(), candle_core::DType::F32, "{name}");
        let g: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(g.iter().all(|v| v.is_finite()) && g.iter().any(|&v| v != 0.0), "{name}: {g:?}");
    }
}

/// `train.segmented_backward` (the graph cut after every ViT block and after the text layers, each segment
/// run and dropped in turn, the losses' graphs and the two encoders' segments side by side) gives the
/// one-graph gradients to rounding, `train.grad_checkpoint` (each block run again in the backward) the
/// segmented ones bit for bit, and both leave nothing of the forward's graph behind.
#[test]
fn segmented_and_recomputed_backward_give_the_same_gradients() {
    let grads = |kernels: &str, segmented: bool, recompute: bool| {
        let sets = [
            "model.vision.vision_depth=2".to_string(),
            format!("kernels={kernels}"),
            format!("train.segmented_backward={segmented}"),
            format!("train.grad_checkpoint={recompute}"),
        ];
        let cfg = micro_config(&sets.iter().map(String::as_str).collect::<Vec<_>>());
        let dir = scratch(&format!("segmented-{kernels}-{segmented}-{recompute}"));
        let mut setup = alignfuse::train::Setup::new(cfg, &dir).unwrap();
        let batch = setup.loader.epoch(0, 0, None).unwrap().next().unwrap().unwrap();
        let mut out = setup.forward(&batch, 0, 0.4).unwrap();
        // After each of the 2 ViT blocks and after the text layers.
        assert_eq!(out.cuts.len(), if segmented || recompute { 3 } else { 0 });
        let (loss, grads) = alignfuse::train::backward(&mut out, &setup.device).unwrap();
        assert!(out.cuts.is_empty() && out.losses.iter().all(|(_, t)| !t.track_op()) && !loss.track_op());
        let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let grads: Vec<(String, Vec<f32>)> = setup
            .model
            .params()
            .vars()
            .iter()
            .map(|(name, var)| (name.clone(), grads.get(var.as_tensor()).map(flat).unwrap_or_default()))
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    };
    // Both kernel sets: the reference ones compose each block from candle's ops, a different graph to cut.
    for kernels in ["fused", "reference"] {
        let one = grads(kernels, false, false);
        let segmented = grads(kernels, true, false);
        assert_eq!(one.0.to_bits(), segmented.0.to_bits());
        // Cut, a weight that several graphs reach sums their gradients in another order than one graph's
        // backward (the text layers: in the text pass and in MLM's): the same to rounding.
        for ((name, a), (_, b)) in one.1.iter().zip(&segmented.1) {
            assert!(!a.is_empty() && a.len() == b.len(), "{name} gets no gradient or another shape");
            let scale = a.iter().fold(f32::MIN_POSITIVE, |m, x| m.max(x.abs()));
            let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5 * scale, "{name} differs by {worst} of {scale} ({kernels}, segmented)");
        }
        // Recomputed segments give the kept ones' gradients bit for bit.
        for (segmented_too, recompute) in [(false, true), (true, true)] {
            let again = grads(kernels, segmented_too, recompute);
            assert_eq!(segmented.0.to_bits(), again.0.to_bits());
            for ((name, a), (_, b)) in segmented.1.iter().zip(&again.1) {
                let same = a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{name} differs ({kernels}, segmented {segmented_too}, recomputed {recompute})");
            }
        }
    }
}

/// The allocator keeps freed memory for the next step (main.rs sets mimalloc's purge delay): a step of the
/// tiny model used to fault ~600 pages (2 MiB each) back in, zeroed by the kernel; now about none.
#[test]
fn steps_reuse_memory_instead_of_faulting_it_in() {
    let dir = scratch("page-faults");
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_alignfuse"))
        .args(["bench", "train", "--config", "configs/tiny.toml", "--steps", "3", "--json"])
        .arg(&json)
        .args(["--set", "data.synth_n=200", "--set", "device=cpu", "--set", "data.num_workers=1"])
        .env("TMPDIR", &dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bench: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let faults = bench["page_faults_per_step"].as_f64().expect("Linux reports page faults");
    assert!(faults < 100.0, "{faults} page faults per step");
}

/// Two compute threads train exactly as one: the momentum encoders beside the online ones, the losses'
/// backwards and the encoders' segments side by side (`threads::overlap`) change which thread computes
/// what, never a value. The real binary (the pool exists only there), with dropout on.
#[test]
fn two_threads_train_bit_for_bit_as_one() {
    let dir = scratch("threads-bits");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("micro.toml");
    std::fs::write(&config, toml::to_string(&micro_config(&["train.epochs=1"])).unwrap()).unwrap();
    let steps = |threads: &str| -> Vec<serde_json::Value> {
        let out = dir.join(format!("out-{threads}"));
        let run = std::process::Command::new(env!("CARGO_BIN_EXE_alignfuse"))
            .args(["train", "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&out)
            .env("RAYON_NUM_THREADS", threads)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let log = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
        let mut steps: Vec<serde_json::Value> = log
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .filter(|record: &serde_json::Value| record["kind"] == "step")
            .collect();
        for step in &mut steps {
            step.as_object_mut().unwrap().remove("pairs_per_s");
        }
        steps
    };
    let one = steps("1");
    assert!(one.len() >= 4, "{} steps logged", one.len());
    assert_eq!(one, steps("2"));
}
