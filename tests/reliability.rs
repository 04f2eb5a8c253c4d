//! Never lose a run: the real binary under non-finite gradients, a second process and an earlier run in
//! the same folder, SIGINT / SIGTERM, resumes with other settings or a torn log, bad numbers in the
//! config, precision settings the CPU cannot honour, and checkpoints that do not fit the config or are
//! damaged.

mod common;
use alignfuse::config::Config;
use alignfuse::model::albef::Albef;
use alignfuse::train::checkpoint::{self, Checkpoints, TrainState};
use candle_core::{Device, Tensor};
use common::{micro_config, micro_config_result, scratch};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A scratch folder with a micro config file (`extra` overrides applied) and the run folder `out` in it.
struct Case {
    config: PathBuf,
    out: PathBuf,
}

impl Case {
    fn new(name: &str, extra: &[&str]) -> Case {
        let dir = scratch(name);
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("micro.toml");
        std::fs::write(&config, toml::to_string(&micro_config(extra)).unwrap()).unwrap();
        Case { config, out: dir.join("out") }
    }

    fn train(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_alignfuse"));
        cmd.args(["train", "--config"]).arg(&self.config).arg("--out").arg(&self.out).args(args);
        cmd.current_dir(env!("CARGO_MANIFEST_DIR")).env("RAYON_NUM_THREADS", "1");
        cmd
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        self.train(args).envs(env.iter().copied()).output().unwrap()
    }

    fn spawn(&self, args: &[&str]) -> Child {
        self.train(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
    }

    /// Step records in the run's log.
    fn logged_steps(&self) -> usize {
        let log = std::fs::read_to_string(self.out.join("log.jsonl")).unwrap_or_default();
        log.lines().filter(|l| l.contains("\"kind\":\"step\"")).count()
    }

    fn wait_for_steps(&self, n: usize) {
        let start = Instant::now();
        while self.logged_steps() < n {
            assert!(start.elapsed() < Duration::from_secs(300), "no step {n} logged in {}", self.out.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn latest(&self) -> checkpoint::Loaded {
        checkpoint::load(&self.out.join("checkpoints/latest"), &Device::Cpu).unwrap()
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn signal(child: &Child, signals: &[&str]) {
    let kills: Vec<String> = signals.iter().map(|s| format!("kill -{s} {}", child.id())).collect();
    assert!(Command::new("bash").args(["-c", &kills.join("; sleep 0.02; ")]).status().unwrap().success());
}

/// Every floating-point tensor of every checkpoint under `out` is finite.
fn assert_checkpoints_finite(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out.join("checkpoints")) else { return };
    for e in entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("step-")) {
        for file in ["model.safetensors", "optim.safetensors"] {
            for (name, t) in candle_core::safetensors::load(e.path().join(file), &Device::Cpu).unwrap() {
                if t.dtype().is_float() {
                    let s = (&t * 0.0).unwrap().sum_all().unwrap().to_dtype(candle_core::DType::F32).unwrap();
                    assert_eq!(
                        s.to_scalar::<f32>().unwrap(),
                        0.0,
                        "{}/{file}: {name} is not finite",
                        e.path().display()
                    );
                }
            }
        }
    }
}

#[test]
fn a_nan_gradient_behind_a_finite_loss_is_never_applied() {
    // Stop: the error names the step and the last finite checkpoint, which `latest` still is.
    let case = Case::new("rel-nan-stop", &["train.checkpoint_every=2"]);
    let o = case.run(&["--max-steps", "6"], &[("ALIGNFUSE_POISON_GRADIENT", "3")]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("step 3: the gradient norm is NaN") && err.contains("nothing was applied"), "{err}");
    assert!(err.contains("the last finite checkpoint is") && err.contains("step-0000002"), "{err}");
    assert_eq!(case.latest().state.step, 2);
    assert_checkpoints_finite(&case.out);

    let first = Case::new("rel-nan-first", &[]);
    let err = stderr(&first.run(&["--max-steps", "3"], &[("ALIGNFUSE_POISON_GRADIENT", "1")]));
    assert!(
        err.contains("step 1: the gradient norm is NaN") && err.contains("no checkpoint has been written yet"),
        "{err}"
    );

    // Skip: the step is counted, not logged as trained, and nothing non-finite reaches a checkpoint.
    let skip = Case::new("rel-nan-skip", &["train.on_nonfinite=skip", "train.checkpoint_every=2"]);
    let o = skip.run(&["--max-steps", "6"], &[("ALIGNFUSE_POISON_GRADIENT", "3")]);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(skip.out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["skipped_steps"], 1);
    assert_eq!(skip.logged_steps(), 5);
    assert!(stderr(&o).contains("step 3: the gradient norm is NaN; update skipped"));
    assert_checkpoints_finite(&skip.out);
}

#[test]
fn a_diverging_run_stops_after_consecutive_skips_without_writing_nan() {
    let case = Case::new(
        "rel-diverge",
        &[
            "train.lr=1e30",
            "train.warmup_steps=0",
            "train.grad_clip=0",
            "train.on_nonfinite=skip",
            "train.max_consecutive_skips=3",
        ],
    );
    let o = case.run(&["--max-steps", "8"], &[]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("3 optimiser steps in a row were skipped") && err.contains("train.max_consecutive_skips"),
        "{err}"
    );
    assert_checkpoints_finite(&case.out);
}

#[test]
fn a_non_finite_tensor_is_never_checkpointed() {
    let dir = scratch("rel-ckpt-nan");
    let ckpts = Checkpoints::new(&dir);
    let mut state = TrainState::fresh(&micro_config(&[]), 1);
    let finite = vec![("w".to_string(), Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap())];
    state.step = 1;
    ckpts.save(&state, finite.clone(), vec![], false).unwrap();
    let nan = vec![("w".to_string(), Tensor::new(&[1f32, f32::NAN], &Device::Cpu).unwrap())];
    state.step = 2;
    let err = format!("{:#}", ckpts.save(&state, nan, vec![], false).unwrap_err());
    assert!(err.contains("step 2: `w` is not finite") && err.contains("step-0000001"), "{err}");
    let inf = vec![("m.w".to_string(), Tensor::new(&[f32::INFINITY, 0.], &Device::Cpu).unwrap())];
    assert!(ckpts.save(&state, finite, inf, false).is_err(), "optimiser state is checked too");
    assert_eq!(std::fs::read_link(ckpts.latest()).unwrap(), Path::new("step-0000001"));
    assert!(!dir.join("checkpoints/step-0000002").exists());
}

#[test]
fn a_run_folder_is_never_trained_over_and_never_shared() {
    let case = Case::new("rel-folder", &["train.epochs=400"]);
    assert!(case.run(&["--max-steps", "2"], &[]).status.success());
    let again = case.run(&["--max-steps", "2"], &[]);
    let err = stderr(&again);
    assert!(!again.status.success() && err.contains("already holds a run") && err.contains("--resume latest"), "{err}");
    assert_eq!(case.latest().state.step, 2, "the refused run changed nothing");

    let o = case.run(&["--max-steps", "1", "--overwrite"], &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let aside = case.out.join("previous-1");
    assert!(
        aside.join("log.jsonl").is_file() && aside.join("checkpoints").is_dir(),
        "the old run was moved, not deleted"
    );
    assert_eq!(case.latest().state.step, 1);

    // A second process on a folder in use fails at once, naming the first.
    let mut first = case.spawn(&["--resume", "latest"]);
    case.wait_for_steps(3);
    let second = case.run(&["--resume", "latest"], &[]);
    first.kill().unwrap();
    first.wait().unwrap();
    let err = stderr(&second);
    assert!(!second.status.success(), "{err}");
    assert!(
        err.contains("in use by another alignfuse process") && err.contains(&format!("pid {}", first.id())),
        "{err}"
    );
}

#[test]
fn sigint_and_sigterm_checkpoint_and_tell_how_to_resume() {
    for (sig, code) in [("INT", 130), ("TERM", 143)] {
        let case = Case::new(&format!("rel-sig{sig}"), &["train.epochs=400"]);
        let child = case.spawn(&[]);
        case.wait_for_steps(2);
        signal(&child, &[sig]);
        let out = child.wait_with_output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{err}");
        assert!(err.contains("resume with: alignfuse train") && err.contains("--resume latest"), "{err}");
        let step = case.latest().state.step;
        assert_eq!(step, case.logged_steps(), "the checkpoint is the last logged step");
        let target = (step + 2).to_string();
        let resumed = case.run(&["--resume", "latest", "--max-steps", &target], &[]);
        assert!(resumed.status.success(), "{}", stderr(&resumed));
        assert_eq!(case.logged_steps(), step + 2);
    }
    // A second SIGINT ends the process at once, without finishing the step (slow ones here: a signal
    // raised twice before it is handled counts once, so the two are sent 20 ms apart).
    let slow = [
        "train.epochs=400",
        "data.synth_n=128",
        "train.batch_size=32",
        "model.vision.image_res=64",
        "model.vision.vision_width=128",
        "model.vision.vision_depth=4",
    ];
    let case = Case::new("rel-sig-twice", &slow);
    let child = case.spawn(&[]);
    case.wait_for_steps(1);
    signal(&child, &["INT", "INT"]);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130));
    assert!(!stderr(&out).contains("resume with"), "{}", stderr(&out));
}

#[test]
fn resume_names_changed_settings_and_survives_a_torn_log() {
    let case = Case::new("rel-resume", &[]);
    assert!(case.run(&["--max-steps", "3"], &[]).status.success());
    let o = case.run(&["--resume", "latest", "--set", "train.batch_size=4", "--set", "seed=7"], &[]);
    let err = stderr(&o);
    assert!(!o.status.success());
    assert!(err.contains("train.batch_size = 8 in the checkpoint, 4 now") && err.contains("seed = 42"), "{err}");
    for allowed in ["train.log_every=5", "data.num_workers=1"] {
        let o = case.run(&["--resume", "latest", "--max-steps", "3", "--set", allowed], &[]);
        assert!(o.status.success(), "{allowed}: {}", stderr(&o));
    }

    // A kill mid-write leaves half a line: the resume drops it and keeps every earlier byte.
    let log = case.out.join("log.jsonl");
    let before = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, format!("{before}{{\"kind\":\"step\",\"step\":4,\"epo")).unwrap();
    let o = case.run(&["--resume", "latest", "--max-steps", "5"], &[]);
    assert!(o.status.success() && stderr(&o).contains("dropped a torn last line"), "{}", stderr(&o));
    let after = std::fs::read_to_string(&log).unwrap();
    assert!(after.starts_with(&before), "logged values survive a resume to the last digit");
    assert_eq!(case.logged_steps(), 5);

    let o = case.run(&["--max-steps", "0"], &[]);
    assert!(stderr(&o).contains("nothing to train"), "{}", stderr(&o));
}

/// Reduced precision on the CPU trains, and says what it costs there rather than running 15x slower
/// (bf16) or pretending (tf32) in silence; fp32 says nothing.
#[test]
fn cpu_precision_settings_say_what_they_do() {
    for (precision, says) in [("bf16", Some("15x slower")), ("tf32", Some("the same as fp32")), ("fp32", None)] {
        let case = Case::new(&format!("rel-precision-{precision}"), &[&format!("train.precision={precision}")]);
        let o = case.run(&["--max-steps", "1"], &[]);
        let err = stderr(&o);
        assert!(o.status.success(), "{precision}: {err}");
        let warned = err.contains(&format!("train.precision = \"{precision}\" on the CPU"));
        assert_eq!(warned, says.is_some(), "{precision}: {err}");
        assert!(says.is_none_or(|s| err.contains(s)), "{precision}: {err}");
    }
}

/// Every numeric key set to 0 and to -1: an error naming the key, or (where 0 is a legitimate value) a
/// training step; never a panic.
#[test]
fn every_numeric_key_at_zero_and_minus_one_is_an_error_or_trains() {
    let table = toml::Table::try_from(Config::default()).unwrap();
    let mut keys = vec![];
    numeric_keys(&table, "", &mut keys);
    assert!(keys.len() > 50, "{keys:?}");
    let mut trained = vec![];
    for key in &keys {
        for value in ["0", "-1"] {
            let set = format!("{key}={value}");
            let loaded = std::panic::catch_unwind(|| Config::from_toml_str("", std::slice::from_ref(&set)));
            match loaded.unwrap_or_else(|_| panic!("{set}: loading the config panicked")) {
                Err(e) => {
                    assert!(format!("{e:#}").contains(key.as_str()), "{set}: the error does not name the key: {e:#}")
                }
                Ok(_) => trained.push(set),
            }
        }
    }
    // The accepted ones train a step on the micro model (zero rates, probabilities, seeds, ...).
    for set in &trained {
        let out = scratch(&format!("rel-zero-{set}"));
        let result = std::panic::catch_unwind(|| {
            let cfg = micro_config_result(&[set.as_str(), "train.epochs=1"])?;
            let opts = alignfuse::train::TrainOptions {
                out: out.clone(),
                resume: None,
                max_steps: Some(1),
                label: None,
                overwrite: false,
            };
            alignfuse::train::train(cfg, &opts).map(|_| ())
        });
        match result {
            Err(_) => panic!("{set}: training panicked"),
            Ok(Err(e)) => {
                let key = set.split('=').next().unwrap();
                assert!(
                    format!("{e:#}").contains(key),
                    "{set}: accepted by the config, then failed without naming it: {e:#}"
                );
            }
            Ok(Ok(())) => {}
        }
    }
    assert!(
        trained.iter().any(|s| s == "train.lr=0") && !trained.iter().any(|s| s.starts_with("model.vision.image_res"))
    );
}

fn numeric_keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
    for (k, v) in table {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match v {
            toml::Value::Table(t) => numeric_keys(t, &key, out),
            toml::Value::Integer(_) | toml::Value::Float(_) => out.push(key),
            toml::Value::Array(a) if a.iter().all(|x| x.is_integer() || x.is_float()) => out.push(key),
            _ => {}
        }
    }
}

#[test]
fn checkpoints_that_do_not_fit_the_config_or_are_damaged_are_refused() {
    let case = Case::new("rel-fit", &["model.text.num_hidden_layers=3"]);
    assert!(case.run(&["--max-steps", "1"], &[]).status.success());
    let file = case.out.join("checkpoints/latest/model.safetensors");
    let load = |sets: &[&str], file: &Path| {
        let cfg = micro_config(sets);
        Albef::from_checkpoint(&cfg, file, &Device::Cpu).map(|_| ()).map_err(|e| format!("{e:#}"))
    };
    load(&["model.text.num_hidden_layers=3"], &file).unwrap();
    let err = load(&["model.text.num_hidden_layers=3", "model.text.num_attention_heads=4"], &file).unwrap_err();
    assert!(err.contains("model.text.num_attention_heads = 2 in the checkpoint, 4 in the config"), "{err}");
    let err = load(&[], &file).unwrap_err();
    assert!(err.contains("model.text.num_hidden_layers = 3 in the checkpoint, 2 in the config"), "{err}");

    // Without the recorded architecture (another tool's file), extra layers are still refused by name.
    let bare = case.out.join("bare.safetensors");
    let tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&tensors, &bare).unwrap();
    let err = load(&[], &bare).unwrap_err();
    assert!(err.contains("tensors the config has no place for") && err.contains("encoder.layer.2."), "{err}");

    let bytes = std::fs::read(&file).unwrap();
    for (name, cut) in [("truncated", bytes.len() / 2), ("empty", 0)] {
        let damaged = case.out.join(format!("{name}.safetensors"));
        std::fs::write(&damaged, &bytes[..cut]).unwrap();
        let err = load(&["model.text.num_hidden_layers=3"], &damaged).unwrap_err();
        assert!(err.contains(&format!("{} is damaged", damaged.display())), "{name}: {err}");
    }
}

/// `alignfuse launch` gives each rank torchrun's environment and stops the job when a rank fails: here
/// every rank of a CPU config refuses NCCL ranks (which need GPUs), naming its RANK and WORLD_SIZE.
#[test]
fn launch_starts_ranks_with_their_environment_and_fails_with_them() {
    let case = Case::new("launch", &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_alignfuse"))
        .args(["launch", "--nproc-per-node", "2", "--master-port", "29533", "train", "--config"])
        .arg(&case.config)
        .arg("--out")
        .arg(&case.out)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("launch: started ranks [0, 1] of 2"), "{err}");
    assert!(err.contains("launch: rank ") && err.contains("failed"), "{err}");
    assert!(err.contains("RANK=0 WORLD_SIZE=2") || err.contains("RANK=1 WORLD_SIZE=2"), "{err}");
    assert!(err.contains("device = \"cpu\"") && err.contains("mpirun -np N"), "{err}");
    assert!(!case.out.join("checkpoints").exists());
}
