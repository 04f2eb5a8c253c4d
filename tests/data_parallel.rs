//! Data parallelism over MPI: 2 CPU ranks under `mpirun` (OpenMPI), the real binary end to end.
//! Run with `cargo test --release --features mpi --test data_parallel` (CI does).
#![cfg(feature = "mpi")]

mod common;

use candle_core::{Device, Tensor};
use common::{same, scratch, steps, tiny_toml, MICRO};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_alignfuse");

/// Settings under which 2 ranks of B pairs must equal 1 rank of 2B: ITC over every rank's keys, no
/// dropout (its masks are per rank), and no ITM or MLM (ITM draws negatives from the local batch, as
/// ALBEF; MLM averages over the masked tokens of each rank).
const PER_SAMPLE: &[&str] = &[
    "objectives.itm=false",
    "objectives.mlm=false",
    "objectives.itc_keys=global",
    "model.text.hidden_dropout_prob=0",
    "model.text.attention_probs_dropout_prob=0",
];

/// `alignfuse <args>` with the micro config and `sets`, under `mpirun -np ranks` (0: no mpirun).
fn command(ranks: usize, args: &[&str], sets: &[&str]) -> Command {
    let mut cmd = match ranks {
        0 => Command::new(BIN),
        n => {
            let mut c = Command::new("mpirun");
            c.args(["--allow-run-as-root", "--oversubscribe", "-np", &n.to_string(), BIN]);
            c
        }
    };
    cmd.args(args).arg("--config").arg(tiny_toml());
    for s in MICRO.iter().chain(sets) {
        cmd.args(["--set", s]);
    }
    cmd
}

/// Runs `cmd` to its end, failing the test if it takes more than two minutes (a hang).
fn finish(mut cmd: Command) -> Output {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("mpirun runs (openmpi-bin)");
    wait(child, Duration::from_secs(120))
}

fn wait(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {limit:?} (hung?): {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[track_caller]
fn ok(out: &Output) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "failed ({}):\n{text}", out.status);
    text
}

fn train(ranks: usize, out: &Path, sets: &[&str], extra: &[&str], dump: Option<&Path>) -> Output {
    let mut args = vec!["train", "--out", out.to_str().unwrap()];
    args.extend(extra);
    let mut cmd = command(ranks, &args, sets);
    if let Some(d) = dump {
        cmd.env("ALIGNFUSE_DUMP_STATE", d);
    }
    finish(cmd)
}

fn state(dump: &Path, rank: usize, step: usize) -> HashMap<String, Tensor> {
    let path = dump.join(format!("rank-{rank}/step-{step}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn bits(t: &Tensor) -> Vec<u8> {
    let t = t.flatten_all().unwrap();
    match t.dtype() {
        candle_core::DType::F32 => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
        _ => t
            .to_dtype(candle_core::DType::I64)
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(candle_core::DType::F64).unwrap() - b.to_dtype(candle_core::DType::F64).unwrap()).unwrap();
    d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap()
}

/// Parameters, momentum twin and queues bitwise identical on both ranks after every step; 2 ranks of 4
/// pairs equal 1 rank of 8 (losses and every tensor, queues included, within 1e-5 after 3 steps), which
/// also shows the queue holds every rank's momentum features in rank order.
#[test]
fn two_ranks_stay_identical_and_match_one_rank_at_the_global_batch() {
    let (two, one) = (scratch("dp-two"), scratch("dp-one"));
    let (dump_two, dump_one) = (two.join("dump"), one.join("dump"));
    let per_rank: Vec<&str> = PER_SAMPLE.iter().copied().chain(["train.batch_size=4"]).collect();
    let global: Vec<&str> = PER_SAMPLE.iter().copied().chain(["train.batch_size=8"]).collect();
    ok(&train(2, &two, &per_rank, &["--max-steps", "3"], Some(&dump_two)));
    ok(&train(0, &one, &global, &["--max-steps", "3"], Some(&dump_one)));
    assert!(!dump_two.join("rank-0/step-4.safetensors").exists());
    for step in 1..=3 {
        let (r0, r1) = (state(&dump_two, 0, step), state(&dump_two, 1, step));
        assert_eq!(r0.len(), r1.len());
        for (name, t) in &r0 {
            assert!(bits(t) == bits(&r1[name]), "step {step}: `{name}` differs between the ranks");
        }
    }
    let (dp, single) = (state(&dump_two, 0, 3), state(&dump_one, 0, 3));
    for (name, t) in &single {
        // Attention key biases get a gradient that is zero up to rounding (a softmax ignores a shift of all
        // its logits), which AdamW scales up to learning-rate-sized steps: 1e-4 there. The ViT's are the
        // middle third of `qkv.bias`; its q and v thirds are held to 1e-5.
        let key_bias = name.ends_with("key.bias") || name.ends_with("attn.qkv.bias");
        let d = max_abs_diff(&dp[name], t);
        let tolerance = if key_bias { 1e-4 } else { 1e-5 };
        assert!(d <= tolerance, "`{name}` after 3 steps: 2 ranks differ from 1 rank by {d:e}");
        if name.ends_with("attn.qkv.bias") {
            let third = t.dim(0).unwrap() / 3;
            for start in [0, 2 * third] {
                let part = |x: &Tensor| x.narrow(0, start, third).unwrap();
                let d = max_abs_diff(&part(&dp[name]), &part(t));
                assert!(d <= 1e-5, "`{name}` [{start}..] after 3 steps: 2 ranks differ from 1 rank by {d:e}");
            }
        }
    }
    let (a, b) = (steps(&two), steps(&one));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert!((x.loss - y.loss).abs() <= 1e-5 * y.loss.abs(), "step {}: loss {} vs {}", x.step, x.loss, y.loss);
        assert!((x.grad_norm - y.grad_norm).abs() <= 1e-5 * y.grad_norm, "step {}: grad norm", x.step);
    }
}

/// With every objective (dropout, ITM negatives and MLM masks drawn per rank): a resumed 2-rank run
/// continues exactly, evaluation sharded over 2 ranks prints the one-process table, and a checkpoint of
/// 2 ranks is refused by a job of another size.
#[test]
fn two_rank_runs_resume_exactly_and_evaluate_like_one_process() {
    let (straight, split) = (scratch("dp-straight"), scratch("dp-split"));
    let bs = ["train.batch_size=4"];
    ok(&train(2, &straight, &bs, &["--max-steps", "6"], None));
    ok(&train(2, &split, &bs, &["--max-steps", "3"], None));
    ok(&train(2, &split, &bs, &["--max-steps", "6", "--resume", "latest"], None));
    let (a, b) = (steps(&straight), steps(&split));
    assert_eq!(a.len(), 6);
    assert!(a.iter().zip(&b).all(|(x, y)| same(x, y)), "the resumed 2-rank run differs from the straight one");
    assert!(a.iter().all(|s| s.losses.contains_key("itm") && s.losses.contains_key("mlm")));

    let refused = train(0, &split, &bs, &["--resume", "latest"], None);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && err.contains("trained by 2 data-parallel ranks"), "{err}");

    let checkpoint = straight.join("checkpoints/latest/model.safetensors");
    let ann = synth_file(&straight, "test.json");
    let eval = |ranks: usize, json: &Path| {
        let args = ["eval", "--checkpoint", checkpoint.to_str().unwrap(), "--ann", ann.to_str().unwrap()];
        let mut args: Vec<&str> = args.to_vec();
        args.extend(["--json", json.to_str().unwrap()]);
        ok(&finish(command(ranks, &args, &bs)));
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap();
        (v["itc"].clone(), v["rerank"].clone(), v["pairs"].clone())
    };
    let (sharded, whole) = (eval(2, &straight.join("eval-2.json")), eval(0, &straight.join("eval-1.json")));
    assert_eq!(sharded, whole, "evaluation over 2 ranks differs from one process");
}

/// The generated data of a run in `out`.
fn synth_file(out: &Path, name: &str) -> PathBuf {
    let data = out.join("data");
    let dir = std::fs::read_dir(&data).unwrap().next().unwrap().unwrap().path();
    dir.join(name)
}

/// SIGKILL to rank 1 mid-run: rank 0 (blocked in the next collective) is stopped and mpirun fails,
/// instead of hanging.
#[test]
fn a_killed_rank_stops_the_job() {
    let (_, child) = long_run("dp-killed");
    let ranks = rank_pids(child.id());
    let rank1 = ranks.iter().find(|(r, _)| *r == 1).expect("rank 1 is a child of mpirun").1;
    Command::new("kill").args(["-KILL", &rank1.to_string()]).status().unwrap();
    let killed_at = Instant::now();
    let output = wait(child, Duration::from_secs(60));
    assert!(!output.status.success(), "mpirun succeeded after a rank was killed");
    assert!(killed_at.elapsed() < Duration::from_secs(60));
    for (rank, pid) in ranks {
        assert!(!Path::new(&format!("/proc/{pid}")).exists() || is_zombie(pid), "rank {rank} still runs");
    }
}

/// A 2-rank run that would train for hours, once it has logged 2 steps: its folder and mpirun.
fn long_run(name: &str) -> (PathBuf, Child) {
    let out = scratch(name);
    let args = ["train", "--out", out.to_str().unwrap(), "--max-steps", "100000"];
    let mut cmd = command(2, &args, &["train.batch_size=4", "train.epochs=100000"]);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while steps_written(&out) < 2 {
        assert!(start.elapsed() < Duration::from_secs(60), "the run did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (out, child)
}

fn steps_written(out: &Path) -> usize {
    std::fs::read_to_string(out.join("log.jsonl")).map_or(0, |t| t.lines().filter(|l| l.contains("\"step\"")).count())
}

/// (rank, pid) of mpirun's children, from the rank OpenMPI puts in their environment.
fn rank_pids(mpirun: u32) -> Vec<(usize, u32)> {
    let mut found = vec![];
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid: u32 = stat.rsplit(')').next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
        if ppid != mpirun {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let rank = env
            .split(|&b| b == 0)
            .filter_map(|kv| std::str::from_utf8(kv).ok()?.strip_prefix("OMPI_COMM_WORLD_RANK=")?.parse().ok())
            .next();
        if let Some(rank) = rank {
            found.push((rank, pid));
        }
    }
    found
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_or(true, |s| s.rsplit(')').next().unwrap().trim().starts_with('Z'))
}

/// From tar shards, every rank's loader workers stream their own shards (rank r's worker w is stream
/// r*W + w), and a checkpoint keeps every rank's stream position: 3 steps + resume + 3 equals 6 straight.
#[test]
fn two_ranks_stream_their_own_shards_and_resume_mid_epoch() {
    let dir = scratch("dp-shards");
    let paths = alignfuse::data::synth::generate(&dir.join("data"), 64, 42).unwrap();
    alignfuse::data::shards::write(std::slice::from_ref(&paths.train), None, &dir.join("shards"), 8).unwrap();
    let pattern = format!("data.train_shards=\"{}/{{00000..00007}}.tar\"", dir.join("shards").display());
    let vocab = format!("data.vocab={:?}", paths.vocab.display().to_string());
    let sets = [pattern.as_str(), vocab.as_str(), "train.batch_size=4", "data.shuffle_buffer=6"];
    let (straight, split) = (dir.join("straight"), dir.join("split"));
    ok(&train(2, &straight, &sets, &["--max-steps", "6"], None));
    ok(&train(2, &split, &sets, &["--max-steps", "3"], None));
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(split.join("checkpoints/latest/state.json")).unwrap()).unwrap();
    assert_eq!(state["stream"]["workers"].as_array().map(Vec::len), Some(4), "2 workers on each of 2 ranks");
    assert_eq!(state["world_size"], 2);
    ok(&train(2, &split, &sets, &["--max-steps", "6", "--resume", "latest"], None));
    let (a, b) = (steps(&straight), steps(&split));
    assert_eq!(a.len(), 6);
    assert!(a.iter().zip(&b).all(|(x, y)| same(x, y)), "the resumed run differs from the straight one");
}

/// A rank that fails with an error (here rank 1 cannot write its state: a file stands where its folder
/// goes) ends every rank with that error, instead of leaving rank 0 blocked in the next collective.
#[test]
fn a_failing_rank_ends_the_job_with_its_error() {
    let out = scratch("dp-failing");
    let dump = out.with_extension("dump");
    std::fs::create_dir_all(&dump).unwrap();
    std::fs::write(dump.join("rank-1"), "in the way").unwrap();
    let output = train(2, &out, &["train.batch_size=4"], &["--max-steps", "5"], Some(&dump));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{err}");
    assert!(err.contains("error on rank 1 of 2"), "{err}");
    assert!(dump.join("rank-0/step-1.safetensors").exists() && !dump.join("rank-0/step-3.safetensors").exists());
}

/// SIGTERM to one rank only: the ranks agree at the next optimiser step to stop there, rank 0 writes one
/// checkpoint of that step and says how to resume the job.
#[test]
fn a_signal_to_one_rank_stops_every_rank_at_the_same_step() {
    let (out, child) = long_run("dp-signal");
    let rank1 = rank_pids(child.id()).into_iter().find(|(r, _)| *r == 1).expect("rank 1 runs").1;
    Command::new("kill").args(["-TERM", &rank1.to_string()]).status().unwrap();
    let output = wait(child, Duration::from_secs(60));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("resume with: mpirun -np 2 alignfuse train"), "{err}");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("checkpoints/latest/state.json")).unwrap()).unwrap();
    assert_eq!(
        state["step"].as_u64().unwrap() as usize,
        steps(&out).last().unwrap().step,
        "checkpoint at the last step"
    );
}
