//! alignfuse: train ALBEF/BLIP-style vision-language models (ITC + ITM + MLM with momentum
//! distillation) on image-caption pairs and evaluate them on image-text retrieval.
//!
//! One batch flows `data` (annotations -> tensors) -> `model` (encoders, momentum twin, queues) ->
//! `objectives` (itc, itm, mlm) -> `train` (summed loss, backward, AdamW). `eval` runs the COCO/Flickr
//! retrieval protocol; `ops` holds the custom fused ops behind `kernels = "fused" | "reference"`.

pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod model;
pub mod objectives;
pub mod ops;
pub mod rng;
pub mod train;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::Path;

/// The device named by the config: `cpu`, `cuda` (GPU 0) or `auto` (CUDA when built with it and present).
pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0).context("device = \"cuda\" but no CUDA device could be opened (build with --features cuda)"),
        "auto" => Ok(if cfg!(feature = "cuda") { Device::new_cuda(0).unwrap_or(Device::Cpu) } else { Device::Cpu }),
        other => bail!("unknown device `{other}`: use cpu, cuda or auto"),
    }
}

/// Writes a file completely under a temporary name, then renames it over `path`: readers never see a
/// half-written file, and a crash leaves the old one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().context("path has no file name")?.to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))
}
