//! `alignfuse import`: pretrained weights from other codebases' files onto alignfuse's (ALBEF) names.
//!
//! Each format turns its file into a [`Source`] (keys renamed towards ALBEF's, HF q/k/v fused into timm's
//! `qkv`) and a routing function from those keys to model tensors. [`assemble`] then builds a complete
//! checkpoint for the config: routed tensors replace the seeded initialisation (or a base checkpoint),
//! shapes are checked (a mismatch is an error naming both shapes; only `pos_embed` grids are resized, as
//! ALBEF does between resolutions), momentum twins the file lacks are copies of the online weights, and
//! the [`Report`] lists every file key as used, ignored (with why) or not placed.

mod checkpoints;
pub mod hub;
pub mod onnx;
mod source;
mod text;
mod vision;

pub use source::Source;

use crate::config::Config;
use crate::model::albef::Albef;
use crate::model::params::ParamStore;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    HfBert,
    Dinov2Onnx,
    HfVit,
    Timm,
    Albef,
    Blip,
    HfHub,
}

impl std::str::FromStr for Format {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "hf-bert" => Format::HfBert,
            "dinov2-onnx" => Format::Dinov2Onnx,
            "hf-vit" => Format::HfVit,
            "timm" => Format::Timm,
            "albef" => Format::Albef,
            "blip" => Format::Blip,
            "hf-hub" => Format::HfHub,
            other => {
                bail!("unknown import format `{other}`: use hf-bert, dinov2-onnx, hf-vit, timm, albef, blip or hf-hub")
            }
        })
    }
}

#[derive(Default, Clone)]
pub struct Options {
    /// hf-bert: the source layers that seed the fusion layers fusion_layer, fusion_layer+1, ... (their
    /// self-attention and feed-forward; cross-attention stays freshly initialised). Without it, source
    /// layer i seeds layer i wherever both exist.
    pub fusion_from: Option<Vec<usize>>,
    /// hf-hub: the format of the cached files (default: from config.json's `model_type`).
    pub hub_format: Option<Format>,
    /// A checkpoint to start from instead of the seeded initialisation (to combine imports).
    pub init: Option<PathBuf>,
}

/// Where a source key goes.
pub enum Route {
    /// Into these model tensors (one source layer may seed several layers).
    To(Vec<String>),
    /// Deliberately not used, and why.
    Ignore(String),
    /// Not placeable, and why.
    Unplaced(String),
}

/// Where a file key goes in the model (None: not placed).
pub type Router<'a> = Box<dyn Fn(&str) -> Option<Route> + 'a>;

/// A source file made ready for [`assemble`].
pub struct Plan<'a> {
    pub source: Source,
    pub route: Router<'a>,
    /// File keys a format set aside while reading (e.g. ONNX weights outside the backbone).
    pub ignored: Vec<(String, String)>,
    pub unplaced: Vec<(String, String)>,
    pub notes: Vec<String>,
}

impl<'a> Plan<'a> {
    fn new(source: Source, route: impl Fn(&str) -> Option<Route> + 'a) -> Self {
        Plan { source, route: Box::new(route), ignored: vec![], unplaced: vec![], notes: vec![] }
    }
}

#[derive(Serialize, Default, Debug)]
pub struct Report {
    pub source: PathBuf,
    /// File key -> the model tensors it was written to.
    pub used: BTreeMap<String, Vec<String>>,
    /// File key -> why it was not used.
    pub ignored: BTreeMap<String, String>,
    /// File key -> why it could not be placed.
    pub unplaced: BTreeMap<String, String>,
    /// Model tensors whose position grid was interpolated.
    pub interpolated: Vec<String>,
    /// Momentum (`_m`) tensors copied from imported online weights.
    pub momentum_copied: Vec<String>,
    /// Model tensors not written by this import (seeded init or the base checkpoint).
    pub kept: Vec<String>,
    pub notes: Vec<String>,
}

/// Reads `src` in `format` and builds the full model state for `cfg`; returns it with the report.
pub fn import(format: Format, src: &Path, cfg: &Config, opts: &Options) -> Result<(Vec<(String, Tensor)>, Report)> {
    if opts.fusion_from.is_some() && !matches!(format, Format::HfBert | Format::HfHub) {
        bail!("--fusion-from applies to hf-bert imports only");
    }
    let plan = match format {
        Format::HfBert => text::hf_bert(src, cfg, opts.fusion_from.as_deref())?,
        Format::Dinov2Onnx => vision::dinov2_onnx(src)?,
        Format::HfVit => vision::hf_vit(src)?,
        Format::Timm => vision::timm(src)?,
        Format::Albef => checkpoints::albef(src, cfg)?,
        Format::Blip => checkpoints::blip(src, cfg)?,
        Format::HfHub => {
            let (dir, format) = hub::resolve(&src.to_string_lossy(), opts.hub_format)?;
            let mut inner = opts.clone();
            inner.hub_format = None;
            return import(format, &dir, cfg, &inner);
        }
    };
    assemble(plan, cfg, opts.init.as_deref())
}

/// The routing and shape rules described in the module docs.
pub fn assemble(plan: Plan, cfg: &Config, init: Option<&Path>) -> Result<(Vec<(String, Tensor)>, Report)> {
    let device = Device::Cpu;
    let model = match init {
        Some(path) => Albef::from_checkpoint(cfg, path, &device)?,
        None => Albef::new(cfg, ParamStore::new(cfg.seed, &device))?,
    };
    let state = model.named_tensors()?;
    let index: HashMap<&str, &Tensor> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let file = plan.source.file.display().to_string();
    let mut report = Report { source: plan.source.file.clone(), notes: plan.notes, ..Default::default() };
    report.ignored.extend(plan.ignored);
    report.unplaced.extend(plan.unplaced);
    let mut written: HashMap<String, Tensor> = HashMap::new();
    for (key, entry) in &plan.source.entries {
        let origin = || entry.origin.iter().filter(|o| !o.is_empty());
        match (plan.route)(key) {
            None => origin().for_each(|o| {
                report.unplaced.insert(o.clone(), format!("no alignfuse tensor corresponds to `{key}`"));
            }),
            Some(Route::Ignore(why)) => origin().for_each(|o| {
                report.ignored.insert(o.clone(), why.clone());
            }),
            Some(Route::Unplaced(why)) => origin().for_each(|o| {
                report.unplaced.insert(o.clone(), why.clone());
            }),
            Some(Route::To(dsts)) => {
                for dst in dsts {
                    let Some(want) = index.get(dst.as_str()) else {
                        origin().for_each(|o| {
                            report
                                .unplaced
                                .insert(o.clone(), format!("maps to `{dst}`, which this config's model does not have"));
                        });
                        continue;
                    };
                    let t = fit(&file, key, &entry.tensor, &dst, want, &mut report)?;
                    origin().for_each(|o| report.used.entry(o.clone()).or_default().push(dst.clone()));
                    written.insert(dst, t);
                }
            }
        }
    }
    if report.used.is_empty() {
        bail!(
            "{file}: no tensor could be placed; is it really in this format? (first keys: {:?})",
            plan.source.entries.keys().take(5).collect::<Vec<_>>()
        );
    }
    // Momentum twins the file did not provide start as copies of the imported online weights.
    for (name, _) in &state {
        if let Some(twin) = crate::model::momentum::checkpoint_name(name) {
            if !written.contains_key(&twin) {
                if let Some(t) = written.get(name).cloned() {
                    written.insert(twin.clone(), t);
                    report.momentum_copied.push(twin);
                }
            }
        }
    }
    let out = state
        .into_iter()
        .map(|(name, t)| match written.remove(&name) {
            Some(new) => (name, new),
            None => {
                report.kept.push(name.clone());
                (name, t)
            }
        })
        .collect();
    Ok((out, report))
}

/// `t` (file key `key`) made to fit model tensor `dst`: same dtype, same shape, or a `pos_embed` whose
/// square grid is interpolated. Any other shape difference is an error.
fn fit(file: &str, key: &str, t: &Tensor, dst: &str, want: &Tensor, report: &mut Report) -> Result<Tensor> {
    let t = t.to_dtype(want.dtype())?;
    if t.dims() == want.dims() {
        return Ok(t);
    }
    let mismatch =
        || format!("{file}: `{key}` has shape {:?}, but `{dst}` in the model has shape {:?}", t.dims(), want.dims());
    if dst.ends_with("pos_embed") && t.rank() == 3 && t.dim(2)? == want.dim(2)? {
        let grid = ((want.dim(1)? - 1) as f64).sqrt().round() as usize;
        let resized = crate::model::vit::interpolate_pos_embed(&t, grid).with_context(mismatch)?;
        report.interpolated.push(format!("{dst}: {} -> {} tokens", t.dim(1)?, want.dim(1)?));
        return Ok(resized);
    }
    bail!(mismatch())
}

/// Writes the state as a checkpoint alignfuse loads (`--resume`/`eval --checkpoint`/`train.init`),
/// recording `cfg.model` as the architecture it is for.
pub fn save(tensors: &[(String, Tensor)], cfg: &Config, out: &Path) -> Result<()> {
    crate::write_atomic(out, |tmp| crate::model::state::write(tmp, tensors, &cfg.model))
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "source: {}", self.source.display())?;
        writeln!(f, "used {} keys:", self.used.len())?;
        for (k, dsts) in &self.used {
            writeln!(f, "  {k} -> {}", dsts.join(", "))?;
        }
        writeln!(f, "ignored {} keys:", self.ignored.len())?;
        for (k, why) in &self.ignored {
            writeln!(f, "  {k}: {why}")?;
        }
        writeln!(f, "could not place {} keys:", self.unplaced.len())?;
        for (k, why) in &self.unplaced {
            writeln!(f, "  {k}: {why}")?;
        }
        for line in &self.interpolated {
            writeln!(f, "interpolated {line}")?;
        }
        writeln!(f, "momentum tensors copied from the imported online weights: {}", self.momentum_copied.len())?;
        writeln!(f, "model tensors not from this file ({}), by pattern:", self.kept.len())?;
        for (pattern, n) in patterns(&self.kept) {
            writeln!(f, "  {pattern}{}", if n > 1 { format!("  (x{n})") } else { String::new() })?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// Names with layer indices replaced by `*`, counted, in first-seen order.
fn patterns(names: &[String]) -> Vec<(String, usize)> {
    let mut out: Vec<(String, usize)> = vec![];
    for name in names {
        let p: String =
            name.split('.').map(|s| if s.parse::<usize>().is_ok() { "*" } else { s }).collect::<Vec<_>>().join(".");
        match out.iter_mut().find(|(q, _)| *q == p) {
            Some((_, n)) => *n += 1,
            None => out.push((p, 1)),
        }
    }
    out
}
