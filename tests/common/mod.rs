//! Shared helpers for the golden-fixture tests: load a fixture file, compare tensors.
#![allow(dead_code)]

use alignfuse::model::params::ParamStore;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

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
