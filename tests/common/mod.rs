//! Shared helpers: load a golden fixture, compare tensors; a micro config that trains in about a second and
//! a scratch directory for end-to-end runs.
#![allow(dead_code)]

use alignfuse::config::Config;
use alignfuse::model::params::ParamStore;
use alignfuse::train::log::{read_records, Record, StepRecord};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn load_fixture(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_path(name), &Device::Cpu)
        .unwrap_or_else(|e| panic!("fixture {name}: {e} (generate it with tests/fixtures/gen_fixtures.py)"))
}

/// A store holding every fixture tensor whose name starts with one of `prefixes`.
pub fn store_from(fx: &HashMap<String, Tensor>, prefixes: &[&str]) -> ParamStore {
    let store = ParamStore::new(0, &Device::Cpu);
    for (k, t) in fx {
        if prefixes.iter().any(|p| k.starts_with(p)) {
            store.insert(k, t).unwrap();
        }
    }
    store
}

/// max |a - b| / max |b|: the relative error used by every golden test.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-12);
    diff / scale
}

#[track_caller]
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.0e}");
}

pub fn ids_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// The tiny preset shrunk to a micro model on 64 generated pairs (2 epochs of 8 steps), plus `extra`
/// overrides.
pub fn micro_config(extra: &[&str]) -> Config {
    micro_config_result(extra).unwrap()
}

/// The `--set` overrides of [`micro_config`].
pub const MICRO: &[&str] = &[
    "model.vision.image_res=16",
    "model.vision.patch_size=8",
    "model.vision.vision_width=32",
    "model.vision.vision_depth=1",
    "model.vision.vision_heads=2",
    "model.text.hidden_size=32",
    "model.text.num_hidden_layers=2",
    "model.text.fusion_layer=1",
    "model.text.num_attention_heads=2",
    "model.text.intermediate_size=64",
    "model.text.hidden_dropout_prob=0.1",
    "model.text.attention_probs_dropout_prob=0.1",
    "model.embed_dim=16",
    "model.queue_size=20",
    "data.synth_n=64",
    "data.num_workers=2",
    "data.randaugment_n=2",
    "train.batch_size=8",
    "train.epochs=2",
    "train.warmup_steps=2",
    // Pinned, so that tuning the preset's schedule leaves the tests' runs as they were.
    "train.lr=5e-4",
    "objectives.alpha_ramp_epochs=6",
    "train.log_every=1",
    "eval.k_test=4",
    "eval.batch_size=32",
    "device=cpu",
];

/// [`micro_config`], with a bad override as an error.
pub fn micro_config_result(extra: &[&str]) -> anyhow::Result<Config> {
    let sets: Vec<String> = MICRO.iter().chain(extra).map(|s| s.to_string()).collect();
    Config::load(&tiny_toml(), &sets)
}

/// configs/tiny.toml, which [`MICRO`] shrinks.
pub fn tiny_toml() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/tiny.toml")
}

/// The step records of the run in `out`.
pub fn steps(out: &Path) -> Vec<StepRecord> {
    read_records(&out.join("log.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            Record::Step(s) => Some(s),
            _ => None,
        })
        .collect()
}

/// Compares what must be identical in a resumed run (not the wall-clock throughput).
pub fn same(a: &StepRecord, b: &StepRecord) -> bool {
    (a.step, a.epoch, a.loss, &a.losses, a.lr, a.alpha, &a.metrics, a.grad_norm)
        == (b.step, b.epoch, b.loss, &b.losses, b.lr, b.alpha, &b.metrics, b.grad_norm)
}

/// An empty directory under Cargo's per-test-target scratch space.
pub fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}
