//! `hf-hub`: a repo id resolved through the local Hugging Face cache. alignfuse is built with hf-hub's
//! cache API only (no network features), so this never downloads: it works with HF_HUB_OFFLINE=1, and a
//! repo that is not cached is an error saying where it looked.

use super::Format;
use anyhow::{bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;

/// `REPO[@REVISION]` -> (the cached snapshot directory, the format of its files). The format comes
/// from config.json's `model_type` unless given.
pub fn resolve(spec: &str, format: Option<Format>) -> Result<(PathBuf, Format)> {
    let (id, revision) = spec.split_once('@').unwrap_or((spec, "main"));
    let cache = match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => Cache::new(dir.into()),
        None => Cache::from_env(),
    };
    let repo = cache.repo(Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string()));
    let weights = repo.get("model.safetensors").with_context(|| {
        format!(
            "`{id}` (revision {revision}) has no cached model.safetensors under {} (set HF_HOME or HF_HUB_CACHE; \
             alignfuse reads the cache only and never downloads)",
            cache.path().display()
        )
    })?;
    let dir = weights.parent().context("cached file without a folder")?.to_path_buf();
    let format = match format {
        Some(f) => f,
        None => {
            let config = repo
                .get("config.json")
                .with_context(|| format!("`{id}` has no cached config.json; pass --hub-format"))?;
            let text = std::fs::read_to_string(&config).with_context(|| format!("cannot read {}", config.display()))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not JSON", config.display()))?;
            match json.get("model_type").and_then(|v| v.as_str()) {
                Some("bert") => Format::HfBert,
                Some("vit" | "dinov2" | "deit") => Format::HfVit,
                Some("blip") => Format::Blip,
                other => bail!("{}: model_type {other:?} has no importer; pass --hub-format", config.display()),
            }
        }
    };
    if format == Format::HfHub {
        bail!("--hub-format must name the files' format, not hf-hub");
    }
    Ok((dir, format))
}
