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
pub mod dist;
pub mod eval;
pub mod import;
pub mod model;
pub mod objectives;
pub mod ops;
pub mod readback;
pub mod rng;
pub mod threads;
pub mod train;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use std::path::Path;

/// The device named by the config: `cpu`, `cuda` (GPU 0), `cuda:N` or `auto` (GPU 0 when this build has
/// CUDA and a GPU opens, else the CPU, saying why). Prints the device it picked.
/// MiB of memory in use on the GPU that `device` is (total minus free, as nvidia-smi counts it: the CUDA
/// context, the allocator's pool and every process on it); `None` on the CPU.
pub fn device_memory_used_mib(device: &Device) -> Option<f64> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        let (free, total) = d.cuda_stream().context().mem_get_info().ok()?;
        return Some((total - free) as f64 / 1048576.0);
    }
    let _ = device;
    None
}

pub fn device(spec: &str) -> Result<Device> {
    let device = match spec {
        "cpu" => Device::Cpu,
        "auto" if !cfg!(feature = "cuda") => {
            eprintln!("device = auto: this build has no CUDA support (build with --features cuda); using the CPU");
            Device::Cpu
        }
        "auto" => Device::new_cuda(0).unwrap_or_else(|e| {
            eprintln!("device = auto: no CUDA device could be opened ({e}); using the CPU");
            Device::Cpu
        }),
        _ => {
            let ordinal = cuda_ordinal(spec)?;
            Device::new_cuda(ordinal).with_context(|| {
                format!(
                    "device = \"{spec}\" but CUDA device {ordinal} could not be opened (build with --features cuda)"
                )
            })?
        }
    };
    eprintln!(
        "device: {}",
        if device.is_cuda() { format!("cuda:{}", cuda_ordinal(spec).unwrap_or(0)) } else { "cpu".into() }
    );
    Ok(device)
}

/// The GPU number of `cuda` (0) or `cuda:N`.
pub fn cuda_ordinal(spec: &str) -> Result<usize> {
    match spec.strip_prefix("cuda") {
        Some("") => Ok(0),
        Some(n) => n.strip_prefix(':').and_then(|n| n.parse().ok()).with_context(|| bad_device(spec)),
        None => bail!(bad_device(spec)),
    }
}

fn bad_device(spec: &str) -> String {
    format!("unknown device `{spec}`: use cpu, cuda, cuda:N or auto")
}

/// Outputs are never replaced unless asked: without `overwrite`, the first of `paths` that exists is
/// refused by name. Commands call it before any work, so a refusal costs nothing.
pub fn refuse_existing<'a>(paths: impl IntoIterator<Item = &'a Path>, overwrite: bool) -> Result<()> {
    if overwrite {
        return Ok(());
    }
    match paths.into_iter().find(|p| p.exists()) {
        Some(p) => bail!("{} exists: pass --overwrite to replace it, or write somewhere else", p.display()),
        None => Ok(()),
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
