//! The training loop: batches from `data`, one model forward per micro-batch, its named losses summed
//! here, AdamW with schedules, checkpoints that resume exactly, validation retrieval each epoch, test
//! retrieval at the end.
//!
//! Exact resume: every random draw of micro-batch k comes from streams keyed by (seed, k) — dropout,
//! ITM negatives, MLM masking — and the data order and augmentation from (seed, epoch, sample), so a
//! checkpoint needs only the tensors (weights, momentum twin, queues, AdamW moments) and the position.

pub mod bench;
pub mod checkpoint;
pub mod log;
pub mod optim;
pub mod schedule;
mod setup;

pub use setup::Setup;

use crate::config::{Config, OnNonFinite};
use crate::data::annotations::RetrievalSet;
use crate::data::loader::Batch;
use crate::eval::RetrievalReport;
use crate::objectives::Named;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use checkpoint::{Checkpoints, TrainState};
use log::{RunLog, StepRecord};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

pub struct TrainOptions {
    pub out: PathBuf,
    /// A checkpoint directory, or `latest` for OUT/checkpoints/latest.
    pub resume: Option<String>,
    /// Stop (with a checkpoint) after this many optimiser steps in total.
    pub max_steps: Option<usize>,
    /// Prefix of every progress line, so a caller running several trainings (`ablate`) says which one.
    pub label: Option<String>,
}

#[derive(Debug, serde::Serialize)]
pub struct TrainSummary {
    pub steps: usize,
    /// Seconds of this session only: a resumed run's earlier sessions are not included.
    pub wall_s: f64,
    /// The step this session resumed from, when it did.
    pub resumed_from: Option<usize>,
    pub last: Option<StepRecord>,
    pub val: Option<RetrievalReport>,
    pub test: Option<RetrievalReport>,
    pub checkpoint: PathBuf,
    pub skipped_steps: usize,
    pub skipped_images: usize,
}

impl TrainSummary {
    /// `OUT/summary.json`, written last by `train` and `ablate`: its presence marks a finished run.
    pub fn path(out: &Path) -> PathBuf {
        out.join("summary.json")
    }

    pub fn save(&self, out: &Path) -> Result<PathBuf> {
        let path = Self::path(out);
        let text = serde_json::to_string_pretty(self)?;
        crate::write_atomic(&path, |tmp| Ok(std::fs::write(tmp, text)?))?;
        Ok(path)
    }
}

/// Trains `cfg` into `opts.out`: epochs of optimiser steps, validation and a checkpoint after each
/// epoch, the test split at the end.
pub fn train(cfg: Config, opts: &TrainOptions) -> Result<TrainSummary> {
    let started = Instant::now();
    let setup = Setup::new(cfg, &opts.out)?;
    let cfg = setup.cfg.clone();
    let retrieval = |ann: &Option<PathBuf>| ann.as_ref().map(|p| crate::data::retrieval_set(&cfg, p)).transpose();
    let (val, test) = (retrieval(&cfg.data.val_ann)?, retrieval(&cfg.data.test_ann)?);
    let mut trainer = Trainer::start(setup, opts)?;
    let resumed_from = opts.resume.as_ref().map(|_| trainer.state.step);
    let mut val_report = None;
    while trainer.state.epoch < cfg.train.epochs && trainer.state.step < trainer.stop_at {
        if !trainer.epoch()? {
            break;
        }
        val_report = trainer.end_epoch(val.as_ref())?.or(val_report);
    }
    let test_report = match (&test, trainer.state.epoch >= cfg.train.epochs) {
        (Some(t), true) => Some(trainer.evaluate("test", t)?),
        _ => None,
    };
    trainer.log.finish();
    let latest = trainer.ckpts.latest();
    Ok(TrainSummary {
        steps: trainer.state.step,
        wall_s: started.elapsed().as_secs_f64(),
        resumed_from,
        last: trainer.last,
        val: val_report,
        test: test_report,
        checkpoint: std::fs::canonicalize(&latest).unwrap_or(latest),
        skipped_steps: trainer.state.skipped_steps,
        skipped_images: trainer.state.skipped_images,
    })
}

/// A run in progress: the model and optimiser, where the run stands, its log and checkpoints.
struct Trainer {
    setup: Setup,
    state: TrainState,
    log: RunLog,
    ckpts: Checkpoints,
    /// Total optimiser steps this session trains to.
    stop_at: usize,
    last: Option<StepRecord>,
}

impl Trainer {
    /// A fresh run, or the one `opts.resume` names, with its log opened.
    fn start(mut setup: Setup, opts: &TrainOptions) -> Result<Self> {
        let cfg = setup.cfg.clone();
        let ckpts = Checkpoints::new(&opts.out);
        let state = match &opts.resume {
            Some(r) => setup.resume(&if r == "latest" { ckpts.latest() } else { PathBuf::from(r) })?,
            None => TrainState::fresh(&cfg),
        };
        let total_steps = setup.steps_per_epoch * cfg.train.epochs;
        let stop_at = opts.max_steps.unwrap_or(total_steps).min(total_steps);
        let resumed = opts.resume.as_ref().map(|_| state.step);
        let log = RunLog::open(&opts.out, resumed, stop_at, cfg.train.log_every, opts.label.as_deref())?;
        Ok(Trainer { setup, state, log, ckpts, stop_at, last: None })
    }

    /// Trains the current epoch from where the state stands. False when it stopped mid-epoch at the
    /// step limit (after writing a checkpoint).
    fn epoch(&mut self) -> Result<bool> {
        let (epoch, accum, micro_per_epoch) =
            (self.state.epoch, self.setup.cfg.train.grad_accum, self.setup.micro_per_epoch);
        let mut batches = self.setup.loader.epoch(epoch, self.state.batch_in_epoch)?;
        let mut step = Accumulated::default();
        for bi in self.state.batch_in_epoch..micro_per_epoch {
            let batch = batches.next().context("the loader ended before the epoch did")??;
            self.note_skipped_images(&batch);
            step.started.get_or_insert(Instant::now());
            self.micro_batch(&batch, (epoch * micro_per_epoch + bi) as u64, &mut step)?;
            if (bi + 1) % accum != 0 {
                continue;
            }
            self.optimizer_step(std::mem::take(&mut step), bi + 1)?;
            let mid_epoch = self.state.batch_in_epoch < micro_per_epoch;
            if self.state.step >= self.stop_at && mid_epoch {
                drop(batches);
                self.save(false)?;
                return Ok(false);
            }
            let every = self.setup.cfg.train.checkpoint_every;
            if every > 0 && self.state.step.is_multiple_of(every) && mid_epoch {
                self.save(false)?;
            }
        }
        Ok(true)
    }

    fn note_skipped_images(&mut self, batch: &Batch) {
        for p in &batch.skipped {
            self.log.say(&format!("skipped unreadable image {}", p.display()));
        }
        self.state.skipped_images += batch.skipped.len();
    }

    /// Forward and backward of micro-batch number `micro` (counted from the start of training); its
    /// gradients join the step's unless a loss is not finite (train.on_nonfinite).
    fn micro_batch(&mut self, batch: &Batch, micro: u64, step: &mut Accumulated) -> Result<()> {
        let cfg = &self.setup.cfg;
        let alpha = schedule::alpha(
            cfg.effective_alpha(),
            cfg.objectives.alpha_ramp_epochs,
            self.state.step,
            self.setup.steps_per_epoch,
        );
        let on_nonfinite = cfg.train.on_nonfinite;
        self.setup.model.update_momentum()?;
        let out = self.setup.forward(batch, micro, alpha)?;
        let losses = out.losses.values()?;
        match losses.iter().find(|(_, v)| !v.is_finite()) {
            Some((name, v)) if on_nonfinite == OnNonFinite::Stop => {
                self.log.finish();
                bail!(
                    "step {} (epoch {}, batch {}): loss `{name}` is {v}; stopping. The last good checkpoint is {} \
                    (set train.on_nonfinite = \"skip\" to drop such steps)",
                    self.state.step + 1,
                    self.state.epoch,
                    micro as usize % self.setup.micro_per_epoch,
                    self.ckpts.latest().display()
                );
            }
            Some((name, v)) => {
                self.log.say(&format!("step {}: loss `{name}` is {v}; update skipped", self.state.step + 1));
                step.poisoned = true;
                self.setup.opt.discard();
            }
            None if !step.poisoned => {
                let total = sum(&out.losses, self.setup.model.device())?;
                self.setup.opt.accumulate(&total.backward()?)?;
                step.add(total.to_scalar::<f32>()? as f64, &losses, &out.metrics.values()?, alpha, batch.indices.len());
            }
            None => {}
        }
        Ok(())
    }

    /// Applies the accumulated gradients (or drops them when a micro-batch was not finite), logs the step
    /// and moves the position to micro-batch `batch_in_epoch` of the epoch.
    fn optimizer_step(&mut self, step: Accumulated, batch_in_epoch: usize) -> Result<()> {
        let lr = schedule::learning_rate(&self.setup.cfg.train, self.state.step, self.setup.steps_per_epoch);
        self.state.step += 1;
        self.state.batch_in_epoch = batch_in_epoch;
        if step.poisoned {
            self.state.skipped_steps += 1;
            self.setup.opt.discard();
            return Ok(());
        }
        let grad_norm = self.setup.opt.step(lr, self.setup.cfg.train.grad_clip)?;
        let record = step.record(self.state.step, self.state.epoch, lr, grad_norm);
        self.log.step(&record)?;
        self.last = Some(record);
        Ok(())
    }

    /// Closes the epoch: validation (when a split is configured) and a checkpoint, marked `best` when
    /// validation improved.
    fn end_epoch(&mut self, val: Option<&RetrievalSet>) -> Result<Option<RetrievalReport>> {
        self.state.epoch += 1;
        self.state.batch_in_epoch = 0;
        let report = val.map(|v| self.evaluate("val", v)).transpose()?;
        let is_best = match &report {
            Some(r) => {
                let best = self.state.best_r_mean.is_none_or(|b| r.rerank.r_mean > b);
                if best {
                    self.state.best_r_mean = Some(r.rerank.r_mean);
                }
                best
            }
            None => false,
        };
        self.save(is_best)?;
        Ok(report)
    }

    /// Retrieval on `set`, logged under `split` for the last finished epoch.
    fn evaluate(&mut self, split: &str, set: &RetrievalSet) -> Result<RetrievalReport> {
        let report = crate::eval::evaluate(&self.setup.model, set, &self.setup.tok, &self.setup.cfg)?;
        let epoch = self.state.epoch.saturating_sub(1);
        if split == "val" {
            self.log.say(&format!(
                "epoch {epoch} validation: r_mean {:.2} (ITC only {:.2})",
                report.rerank.r_mean, report.itc.r_mean
            ));
        }
        self.log.eval(split, epoch, self.state.step, serde_json::to_value(&report)?)?;
        Ok(report)
    }

    fn save(&self, is_best: bool) -> Result<PathBuf> {
        let (model, opt) = (&self.setup.model, &self.setup.opt);
        self.ckpts.save(&self.state, model.named_tensors()?, opt.state_tensors(), is_best)
    }
}

/// The micro-batch's loss: its named losses summed in order (zero when there are none).
pub fn sum(losses: &Named, device: &candle_core::Device) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (_, loss) in losses.iter() {
        total = Some(match total {
            Some(t) => (t + loss)?,
            None => loss.clone(),
        });
    }
    Ok(match total {
        Some(t) => t,
        None => Tensor::zeros((), DType::F32, device)?,
    })
}

/// Loss and metric sums over the micro-batches of one optimiser step.
#[derive(Default)]
struct Accumulated {
    n: usize,
    pairs: usize,
    loss: f64,
    losses: BTreeMap<String, f64>,
    metrics: BTreeMap<String, f64>,
    alpha: f64,
    poisoned: bool,
    started: Option<Instant>,
}

impl Accumulated {
    fn add(&mut self, loss: f64, losses: &[(&str, f64)], metrics: &[(&str, f64)], alpha: f64, pairs: usize) {
        for (sums, values) in [(&mut self.losses, losses), (&mut self.metrics, metrics)] {
            for (name, v) in values {
                *sums.entry(name.to_string()).or_default() += v;
            }
        }
        self.loss += loss;
        self.alpha = alpha;
        self.n += 1;
        self.pairs += pairs;
    }

    /// Means over the micro-batches.
    fn record(&self, step: usize, epoch: usize, lr: f64, grad_norm: f64) -> StepRecord {
        let n = self.n.max(1) as f64;
        let mean = |m: &BTreeMap<String, f64>| m.iter().map(|(k, v)| (k.clone(), v / n)).collect();
        let secs = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        StepRecord {
            step,
            epoch,
            loss: self.loss / n,
            losses: mean(&self.losses),
            lr,
            alpha: self.alpha,
            metrics: mean(&self.metrics),
            grad_norm,
            pairs_per_s: if secs > 0.0 { self.pairs as f64 / secs } else { 0.0 },
        }
    }
}
