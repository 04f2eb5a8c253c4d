//! One ablation run, a variant with a seed, in its own directory `DIR/runs/<name>`: trained, resumed from
//! its `latest` checkpoint when an earlier `ablate` was interrupted, or skipped when finished; then read
//! back from disk (summary.json and log.jsonl), so a fresh and a skipped run report the same way.

use super::variants::Variant;
use crate::config::{differing_keys, Config};
use crate::eval::metrics::Metrics;
use crate::train::checkpoint::Checkpoints;
use crate::train::log::{read_records, Record, StepRecord};
use crate::train::{train, TrainOptions, TrainSummary};
use anyhow::{ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A planned run.
#[derive(Debug, Clone)]
pub struct Run {
    pub variant: Variant,
    pub seed: u64,
    /// The variant's name, with `-seed<S>` for every seed after the config's own.
    pub name: String,
    pub dir: PathBuf,
    /// The config file with the user's overrides, then the variant's, the seed, and the shared data paths.
    pub cfg: Config,
}

/// Every run of the ablation. All configs are loaded and validated, and checked against what earlier runs
/// in the same directories were trained with, before anything trains: a bad variant costs no time.
/// `base` is the user's config with its data resolved: every run shares its data paths.
pub fn plan(
    config: &Path, sets: &[String], base: &Config, variants: &[Variant], seeds: usize, out: &Path,
) -> Result<Vec<Run>> {
    let mut runs = vec![];
    for variant in variants {
        let overrides: Vec<String> = sets.iter().chain(&variant.overrides).cloned().collect();
        let mut cfg = Config::load(config, &overrides).with_context(|| format!("variant `{}`", variant.name))?;
        cfg.data.train_ann = base.data.train_ann.clone();
        cfg.data.val_ann = base.data.val_ann.clone();
        cfg.data.test_ann = base.data.test_ann.clone();
        cfg.data.vocab = base.data.vocab.clone();
        for k in 0..seeds as u64 {
            let seed = base.seed + k;
            let name = if k == 0 { variant.name.clone() } else { format!("{}-seed{seed}", variant.name) };
            let run = Run {
                variant: variant.clone(),
                seed,
                dir: out.join("runs").join(&name),
                name,
                cfg: Config { seed, ..cfg.clone() },
            };
            run.check_config()?;
            runs.push(run);
        }
    }
    Ok(runs)
}

impl Run {
    fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    pub fn is_finished(&self) -> bool {
        TrainSummary::path(&self.dir).is_file()
    }

    /// The checkpoint an interrupted run resumes from.
    pub fn resumable(&self) -> Option<PathBuf> {
        Some(Checkpoints::new(&self.dir).latest()).filter(|l| l.exists())
    }

    /// Refuses a run directory whose `config.toml` (what it was trained with) differs from this run's
    /// config: skipping or resuming it would mix two configs in one table.
    fn check_config(&self) -> Result<()> {
        let path = self.config_path();
        if !path.exists() {
            return Ok(());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let old: toml::Table =
            toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
        let differ: Vec<String> = differing_keys(&old, &self.cfg_table()?)?.into_iter().map(|(k, _, _)| k).collect();
        ensure!(
            differ.is_empty(),
            "{} was trained with a different config than this ablation gives `{}` \
            (differing keys: {}): use another --out, or delete {} to retrain it",
            path.display(),
            self.name,
            differ.join(", "),
            self.dir.display()
        );
        Ok(())
    }

    fn cfg_table(&self) -> Result<toml::Table> {
        Ok(toml::Table::try_from(&self.cfg)?)
    }

    /// Trains the run to the end, resuming when a checkpoint is there, and writes its `config.toml`
    /// (reusable with `alignfuse train --config`) and, last, `summary.json`.
    pub fn train(&self, label: String) -> Result<()> {
        let resume = self.resumable().map(|_| "latest".to_string());
        let cfg_text = toml::to_string(&self.cfg)?;
        crate::write_atomic(&self.config_path(), |tmp| Ok(std::fs::write(tmp, &cfg_text)?))?;
        // Without a checkpoint there is nothing to resume: an interrupted start is moved aside, not lost.
        let overwrite = resume.is_none();
        let opts = TrainOptions { out: self.dir.clone(), resume, max_steps: None, label: Some(label), overwrite };
        let summary = train(self.cfg.clone(), &opts).with_context(|| format!("training {}", self.dir.display()))?;
        summary.save(&self.dir)?;
        Ok(())
    }

    /// The finished run's numbers, from its summary.json and log.jsonl. `reused`: finished by an earlier
    /// `ablate`.
    pub fn result(&self, reused: bool) -> Result<RunResult> {
        let path = TrainSummary::path(&self.dir);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let summary: SummaryTimes =
            serde_json::from_str(&text).with_context(|| format!("{} is not a run summary", path.display()))?;
        let log = self.dir.join("log.jsonl");
        let (mut steps, mut val, mut test) = (vec![], vec![], None);
        for record in read_records(&log)? {
            match record {
                Record::Step(s) => steps.push(s),
                Record::Eval { split, epoch, metrics, .. } => {
                    let m: EvalMetrics = serde_json::from_value(metrics).with_context(|| {
                        format!(
                            "{}: the {split} record of epoch {epoch} has no itc/rerank/images metrics",
                            log.display()
                        )
                    })?;
                    match split.as_str() {
                        "val" => val.push(EpochEval { epoch, metrics: m }),
                        "test" => test = Some(m),
                        _ => {}
                    }
                }
            }
        }
        let (split, final_eval) = match (test, val.last()) {
            (Some(t), _) => (Some("test".to_string()), Some(t)),
            (None, Some(v)) => (Some("val".to_string()), Some(v.metrics)),
            (None, None) => (None, None),
        };
        Ok(RunResult {
            variant: self.variant.name.clone(),
            seed: self.seed,
            dir: self.dir.clone(),
            itm: self.cfg.objectives.itm,
            reused,
            resumed_from: summary.resumed_from,
            steps: summary.steps,
            wall_s: summary.wall_s,
            pairs_per_s: median(steps.iter().map(|s| s.pairs_per_s).filter(|p| *p > 0.0).collect()),
            loss: steps.iter().map(|s| (s.step, s.loss)).collect(),
            last: steps.pop(),
            split,
            final_eval,
            best: summary.test_at_best.map(|b| EpochEval { epoch: b.epoch, metrics: b.report }),
            val,
        })
    }
}

/// The part of summary.json the report needs.
#[derive(Deserialize)]
struct SummaryTimes {
    steps: usize,
    wall_s: f64,
    #[serde(default)]
    resumed_from: Option<usize>,
    /// Absent in summaries written before the trainer evaluated the test split at `best`.
    #[serde(default)]
    test_at_best: Option<BestTest>,
}

/// summary.json's `test_at_best`, its step left out.
#[derive(Deserialize)]
struct BestTest {
    epoch: usize,
    report: EvalMetrics,
}

/// What one finished run measured.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    pub variant: String,
    pub seed: u64,
    pub dir: PathBuf,
    /// Whether ITM was trained: without it, the re-ranked numbers come from a randomly initialised head.
    pub itm: bool,
    /// Finished by an earlier `ablate`, read back rather than retrained.
    pub reused: bool,
    /// The step the last training session resumed from: `wall_s` then covers that session only.
    pub resumed_from: Option<usize>,
    pub steps: usize,
    /// Training plus the per-epoch validation and the final test evaluation.
    pub wall_s: f64,
    /// Median over steps of the trainer's per-step throughput (forward, backward, update; no evaluation).
    pub pairs_per_s: f64,
    /// The last optimiser step's record (its losses are one batch's).
    pub last: Option<StepRecord>,
    /// The split of `final_eval`: `test`, or `val` (the last epoch's) when no test set is configured.
    pub split: Option<String>,
    pub final_eval: Option<EvalMetrics>,
    /// The test split at the checkpoint `train.select` chose on validation (what ALBEF reports), and its
    /// epoch; none without a test set.
    pub best: Option<EpochEval>,
    /// Validation after each epoch (0-based).
    pub val: Vec<EpochEval>,
    /// (step, total loss) of every optimiser step.
    pub loss: Vec<(usize, f64)>,
}

/// Retrieval metrics ranked by ITC alone and after ITM re-ranking.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalMetrics {
    pub itc: Metrics,
    pub rerank: Metrics,
    /// Images in the evaluated split.
    pub images: usize,
}

impl EvalMetrics {
    /// r_mean of a random ranking, the level below which a run has learnt nothing: IR R@K = K/N over N
    /// images, TR R@K ~ 1 - (1 - 1/N)^K (one of an image's captions, a 1/N share of all, in the top K).
    pub fn chance_r_mean(&self) -> f64 {
        let n = self.images.max(1) as f64;
        let (tr, ir): (Vec<f64>, Vec<f64>) =
            [1.0, 5.0, 10.0].iter().map(|&k: &f64| (1.0 - (1.0 - 1.0 / n).powf(k), (k / n).min(1.0))).unzip();
        50.0 * (tr.iter().sum::<f64>() + ir.iter().sum::<f64>()) / 3.0
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct EpochEval {
    pub epoch: usize,
    #[serde(flatten)]
    pub metrics: EvalMetrics,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}
