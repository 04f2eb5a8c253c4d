//! Checkpoints that a crash cannot corrupt.
//!
//! Each checkpoint is a directory `OUT/checkpoints/step-NNNNNNN/` holding `model.safetensors` (ALBEF key
//! names: online weights, `_m` twins, queues, temp), `optim.safetensors` (AdamW moments) and `state.json`
//! (config, step, data position, metrics). It is written under a temporary name and renamed when
//! complete; `latest` and `best` are symlinks swapped atomically (rename over the old link). A process
//! killed at any point leaves the previous `latest` intact and loadable.

use crate::config::Config;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Everything besides tensors needed to continue a run exactly. Random streams are derived from
/// (seed, purpose, step), so the seed and the position are the whole RNG state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub format: String,
    /// Optimiser steps completed.
    pub step: usize,
    /// Where the data stream continues: this epoch, from this micro-batch.
    pub epoch: usize,
    pub batch_in_epoch: usize,
    pub seed: u64,
    /// Validation r_mean (the one `train.select` names) of the best checkpoint so far.
    pub best_r_mean: Option<f64>,
    /// The test split evaluated at that checkpoint: the figure ALBEF reports.
    #[serde(default)]
    pub best_test: Option<BestTest>,
    /// Non-finite steps skipped (`on_nonfinite = "skip"`) and images skipped (`on_bad_image = "skip"`).
    pub skipped_steps: usize,
    pub skipped_images: usize,
    /// Training from shards: where each loader worker stands in this epoch's stream.
    /// (Every rank's workers, in rank order.)
    #[serde(default)]
    pub stream: Option<crate::data::shards::StreamPosition>,
    /// Data-parallel ranks that trained this run (a global batch is `train.batch_size` times this).
    #[serde(default = "one")]
    pub world_size: usize,
    pub config: Config,
}

/// The test retrieval of the epoch (0-based) whose validation r_mean marked `best`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BestTest {
    pub epoch: usize,
    pub step: usize,
    pub report: crate::eval::RetrievalReport,
}

fn one() -> usize {
    1
}

impl TrainState {
    /// The position of a run that has not trained yet.
    pub fn fresh(cfg: &Config, world_size: usize) -> Self {
        TrainState {
            format: FORMAT.into(),
            step: 0,
            epoch: 0,
            batch_in_epoch: 0,
            seed: cfg.seed,
            best_r_mean: None,
            best_test: None,
            skipped_steps: 0,
            skipped_images: 0,
            stream: None,
            world_size,
            config: cfg.clone(),
        }
    }
}

pub const FORMAT: &str = "alignfuse-checkpoint-1";

pub struct Checkpoints {
    dir: PathBuf,
}

/// A loaded checkpoint.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainState,
    pub model: HashMap<String, Tensor>,
    /// The architecture `model.safetensors` records (absent in older checkpoints).
    pub model_cfg: Option<crate::config::ModelConfig>,
    pub optim: HashMap<String, Tensor>,
}

impl Checkpoints {
    pub fn new(out: &Path) -> Self {
        Checkpoints { dir: out.join("checkpoints") }
    }

    pub fn latest(&self) -> PathBuf {
        self.dir.join("latest")
    }

    pub fn best(&self) -> PathBuf {
        self.dir.join("best")
    }

    /// Writes a complete checkpoint and points `latest` (and `best` when `is_best`) at it. A tensor that
    /// is not finite is never written: the error names it, and `latest` keeps pointing at the last
    /// finite checkpoint. Re-saving a step (an epoch end right after a periodic save) writes a new
    /// directory and moves the links over, so `latest` never points at nothing.
    pub fn save(
        &self, state: &TrainState, model: Vec<(String, Tensor)>, optim: Vec<(String, Tensor)>, is_best: bool,
    ) -> Result<PathBuf> {
        if let Some(name) = first_non_finite(model.iter().chain(&optim))? {
            bail!("step {}: `{name}` is not finite, so no checkpoint was written; {}", state.step, self.last_finite());
        }
        std::fs::create_dir_all(&self.dir).with_context(|| format!("cannot create {}", self.dir.display()))?;
        let name = self.free_name(state.step);
        let tmp = self.dir.join(format!(".tmp-{name}"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp)?;
        crate::model::state::write(&tmp.join("model.safetensors"), &model, &state.config.model)?;
        crash_point(state.step);
        crate::model::state::write(&tmp.join("optim.safetensors"), &optim, &state.config.model)?;
        let state_file = tmp.join("state.json");
        std::fs::write(&state_file, serde_json::to_vec_pretty(state)?)?;
        std::fs::File::open(&state_file)?.sync_all()?;
        sync_dir(&tmp)?;
        let final_dir = self.dir.join(&name);
        std::fs::rename(&tmp, &final_dir)?;
        self.point("latest", &name)?;
        if is_best {
            self.point("best", &name)?;
        }
        sync_dir(&self.dir)?;
        self.prune()?;
        Ok(final_dir)
    }

    /// `step-NNNNNNN`, or `step-NNNNNNN.K` with the first free K when that step was saved already.
    fn free_name(&self, step: usize) -> String {
        let base = format!("step-{step:07}");
        std::iter::once(base.clone())
            .chain((1..).map(|k| format!("{base}.{k}")))
            .find(|n| !self.dir.join(n).exists())
            .expect("an unused name exists")
    }

    /// Where a stopped run can continue from, for error messages.
    pub fn last_finite(&self) -> String {
        match std::fs::canonicalize(self.latest()) {
            Ok(dir) => format!("the last finite checkpoint is {}", dir.display()),
            Err(_) => "no checkpoint has been written yet".into(),
        }
    }

    /// Atomically makes `link` point at `target` (a sibling directory name).
    fn point(&self, link: &str, target: &str) -> Result<()> {
        let tmp = self.dir.join(format!(".{link}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(target, &tmp)?;
        std::fs::rename(&tmp, self.dir.join(link))
            .with_context(|| format!("cannot update {link} in {}", self.dir.display()))
    }

    /// Removes checkpoint directories that neither `latest` nor `best` points at, and stale temporaries.
    fn prune(&self) -> Result<()> {
        let keep: Vec<PathBuf> =
            [self.latest(), self.best()].iter().filter_map(|l| std::fs::read_link(l).ok()).collect();
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let stale = name.starts_with(".tmp-") || name.starts_with(".old-");
            let unreferenced = name.starts_with("step-") && !keep.iter().any(|k| k.as_os_str() == entry.file_name());
            if stale || unreferenced {
                std::fs::remove_dir_all(entry.path())?;
            }
        }
        Ok(())
    }
}

/// Loads a checkpoint directory (or a `latest` / `best` link).
pub fn load(dir: &Path, device: &candle_core::Device) -> Result<Loaded> {
    if !dir.exists() {
        bail!("no checkpoint at {} (a run resumes from OUT/checkpoints/latest once it has saved one)", dir.display());
    }
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).with_context(|| format!("cannot read {}", state_path.display()))?;
    let state: TrainState = serde_json::from_str(&text)
        .with_context(|| format!("{} is not an alignfuse checkpoint state", state_path.display()))?;
    if state.format != FORMAT {
        bail!("{}: checkpoint format `{}`, expected `{FORMAT}`", state_path.display(), state.format);
    }
    let read = |f: &str| crate::model::state::read(&dir.join(f), device);
    let ((model, model_cfg), (optim, _)) = (read("model.safetensors")?, read("optim.safetensors")?);
    Ok(Loaded { dir: dir.to_path_buf(), state, model, model_cfg, optim })
}

/// The name of the first floating-point tensor holding a NaN or an infinity (one reduction each:
/// `0 * x` is 0 for finite x and NaN otherwise).
fn first_non_finite<'a>(tensors: impl Iterator<Item = &'a (String, Tensor)>) -> Result<Option<String>> {
    for (name, t) in tensors {
        if t.dtype().is_float() {
            let s = (t * 0.0)?.sum_all()?.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
            if s != 0.0 {
                return Ok(Some(name.clone()));
            }
        }
    }
    Ok(None)
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)?.sync_all()?;
    Ok(())
}

/// Test hook for the crash-safety test: `ALIGNFUSE_ABORT_IN_CHECKPOINT=N` kills the process in the middle
/// of writing the checkpoint of step N, as a power cut or `kill -9` would.
fn crash_point(step: usize) {
    if std::env::var("ALIGNFUSE_ABORT_IN_CHECKPOINT").ok().and_then(|v| v.parse::<usize>().ok()) == Some(step) {
        std::process::abort();
    }
}
