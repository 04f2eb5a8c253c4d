//! The tensors of a source checkpoint under their (possibly renamed) keys. Every entry remembers the
//! file keys it was made from, so that the report names what was used even after renames and fusions
//! (three HF projections become one `qkv`).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub struct Entry {
    pub tensor: Tensor,
    /// The keys in the file this tensor was read or built from.
    pub origin: Vec<String>,
}

pub struct Source {
    /// What was read (for messages).
    pub file: PathBuf,
    pub entries: BTreeMap<String, Entry>,
}

impl Source {
    pub fn new(file: &Path, tensors: impl IntoIterator<Item = (String, Tensor)>) -> Self {
        let entries = tensors.into_iter().map(|(k, t)| (k.clone(), Entry { tensor: t, origin: vec![k] })).collect();
        Source { file: file.to_path_buf(), entries }
    }

    /// A `.safetensors` file, or the `model.safetensors` of an HF model directory.
    pub fn safetensors(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("model.safetensors") } else { path.to_path_buf() };
        if !file.exists() {
            bail!("{} does not exist (an HF directory must hold model.safetensors)", file.display());
        }
        let tensors = candle_core::safetensors::load(&file, &Device::Cpu)
            .with_context(|| format!("cannot read safetensors {}", file.display()))?;
        Ok(Source::new(&file, tensors))
    }

    /// A PyTorch checkpoint (`torch.save` zip format): the state dict under `model` when the file holds
    /// a training checkpoint ({'model', 'optimizer', 'epoch', ...}, as ALBEF and BLIP save), else the
    /// top-level dict.
    pub fn pth(path: &Path) -> Result<Self> {
        let read = |key| -> Result<Vec<(String, Tensor)>> {
            candle_core::pickle::read_all_with_key(path, key)
                .with_context(|| format!("cannot read PyTorch checkpoint {}", path.display()))
        };
        let tensors = match read(Some("model")) {
            Ok(t) if !t.is_empty() => t,
            _ => read(None)?,
        };
        if tensors.is_empty() {
            bail!("{} holds no tensors (neither a state dict nor a dict with a `model` state dict)", path.display());
        }
        Ok(Source::new(path, tensors))
    }

    /// `.pth`/`.bin` -> [`Source::pth`], anything else -> [`Source::safetensors`].
    pub fn by_extension(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("pth" | "pt" | "bin") => Source::pth(path),
            _ => Source::safetensors(path),
        }
    }

    /// Renames keys: `f` returns the new key, or None to keep the old one.
    pub fn rename(&mut self, f: impl Fn(&str) -> Option<String>) {
        let entries = std::mem::take(&mut self.entries);
        self.entries = entries.into_iter().map(|(k, e)| (f(&k).unwrap_or(k), e)).collect();
    }

    /// Replaces `parts` (all present) by their concatenation along dim 0 under `key`.
    pub fn fuse(&mut self, parts: &[String], key: String) -> Result<()> {
        let taken: Vec<Entry> = parts.iter().map(|p| self.entries.remove(p).expect("caller checked")).collect();
        let tensor = Tensor::cat(&taken.iter().map(|e| &e.tensor).collect::<Vec<_>>(), 0)
            .with_context(|| format!("{}: cannot concatenate {parts:?}", self.file.display()))?;
        self.insert(key, tensor, taken.into_iter().flat_map(|e| e.origin).collect());
        Ok(())
    }

    /// Adds a tensor built from the file keys `origin` (none: made here, not read).
    pub fn insert(&mut self, key: String, tensor: Tensor, origin: Vec<String>) {
        self.entries.insert(key, Entry { tensor, origin });
    }

    /// Strips `prefix` from every key that has it.
    pub fn strip_prefix(&mut self, prefix: &str) {
        self.rename(|k| k.strip_prefix(prefix).map(str::to_string));
    }

    pub fn has(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }
}
