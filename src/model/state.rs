//! The model state file: safetensors under ALBEF's key names, with the `[model]` config it was written
//! for as metadata, so that a checkpoint read with a different architecture (more layers, another head
//! count) is refused by key instead of being loaded in part or computing something else.

use crate::config::{differing_keys, ModelConfig};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The metadata key holding the `[model]` section as JSON.
const MODEL_KEY: &str = "alignfuse.model";

/// Writes `tensors` to `path` with `model` as metadata (not atomic: callers write a temporary and rename).
pub fn write(path: &Path, tensors: &[(String, Tensor)], model: &ModelConfig) -> Result<()> {
    let metadata = HashMap::from([(MODEL_KEY.to_string(), serde_json::to_string(model)?)]);
    let views: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::serialize_to_file(views, Some(metadata), path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    std::fs::File::open(path)?.sync_all().with_context(|| format!("cannot sync {}", path.display()))
}

/// The tensors of a safetensors file and the `[model]` section it was written for (None for files
/// written before alignfuse stored it, or by other tools). An unreadable, empty or truncated file is an
/// error that says so and names the path.
pub fn read(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, Option<ModelConfig>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let damaged = || format!("{} is damaged (empty, truncated or not a safetensors file)", path.display());
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).with_context(damaged)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device).with_context(damaged)?;
    let model = match meta.metadata().as_ref().and_then(|m| m.get(MODEL_KEY)) {
        Some(json) => {
            Some(serde_json::from_str(json).with_context(|| format!("{}: bad {MODEL_KEY} metadata", path.display()))?)
        }
        None => None,
    };
    Ok((tensors, model))
}

/// Refuses a state written for another architecture than `cfg`, naming every differing key.
pub fn check_model(path: &Path, saved: &ModelConfig, cfg: &ModelConfig) -> Result<()> {
    let differ = differing_keys(saved, cfg)?;
    if differ.is_empty() {
        return Ok(());
    }
    let keys: Vec<String> = differ
        .iter()
        .map(|(k, ckpt, want)| format!("model.{k} = {ckpt} in the checkpoint, {want} in the config"))
        .collect();
    bail!("{} was written for another model: {} (use the config it was trained with)", path.display(), keys.join("; "))
}
