//! alignfuse: train ALBEF/BLIP-style vision-language models (ITC + ITM + MLM with momentum
//! distillation) on image-caption pairs and evaluate them on image-text retrieval.
//!
//! One batch flows `data` (annotations -> tensors) -> `model` (encoders, momentum twin, queues) ->
//! `objectives` (itc, itm, mlm) -> `train` (summed loss, backward, AdamW). `eval` runs the COCO/Flickr
//! retrieval protocol; `ablate` trains objective variants side by side and reports them; `ops` holds the
//! custom fused ops behind `kernels = "fused" | "reference"`.

pub mod ablate;
pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod import;
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
        "cuda" => Device::new_cuda(0)
            .context("device = \"cuda\" but no CUDA device could be opened (build with --features cuda)"),
        "auto" => Ok(if cfg!(feature = "cuda") { Device::new_cuda(0).unwrap_or(Device::Cpu) } else { Device::Cpu }),
        other => bail!("unknown device `{other}`: use cpu, cuda or auto"),
    }
}

/// Writes `path` by letting `write` fill a temporary file beside it, syncing it, then renaming it into
/// place (and syncing the folder), so that `path` never holds a half-written file (a crash or power cut
/// leaves the old one). Errors name `path`.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = std::fs::create_dir_all(dir)
        .map_err(Into::into)
        .and_then(|()| write(&tmp))
        .and_then(|()| Ok(std::fs::File::open(&tmp)?.sync_all()?))
        .and_then(|()| Ok(std::fs::rename(&tmp, path)?))
        .and_then(|()| Ok(std::fs::File::open(dir)?.sync_all()?));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}
