//! The training loop: batches from `data`, one model forward per micro-batch, its named losses summed
//! here, AdamW with schedules, checkpoints that resume exactly, validation retrieval each epoch, test
//! retrieval at the end.
//!
//! Exact resume: every random draw of micro-batch k comes from streams keyed by (seed, k) — dropout,
//! ITM negatives, MLM masking — and the data order and augmentation from (seed, epoch, sample), so a
//! checkpoint needs only the tensors (weights, momentum twin, queues, AdamW moments) and the position.

pub mod backward;
pub mod bench;
pub mod checkpoint;
pub mod log;
pub mod optim;
mod run_dir;
pub mod schedule;
mod setup;
pub mod signals;
pub mod tensorboard;

pub use backward::backward;
pub use setup::Setup;
pub use signals::Interrupted;

use crate::config::{Config, OnNonFinite, Select};
use crate::data::annotations::RetrievalSet;
use crate::data::loader::Batch;
use crate::data::shards::StreamPosition;
use crate::eval::RetrievalReport;
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
    /// Move an earlier run in `out` (checkpoints, log, summary) into `out/previous-N` instead of refusing.
    pub overwrite: bool,
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
    /// The test split at the last epoch.
    pub test: Option<RetrievalReport>,
    /// The test split at the `best` checkpoint (`train.select`), as ALBEF reports it.
    pub test_at_best: Option<checkpoint::BestTest>,
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
/// epoch, the test split at the end. The folder is locked for the run; SIGINT / SIGTERM end it with a
/// checkpoint and an [`Interrupted`] error.
pub fn train(cfg: Config, opts: &TrainOptions) -> Result<TrainSummary> {
    let started = Instant::now();
    anyhow::ensure!(opts.max_steps != Some(0), "--max-steps 0: there is nothing to train");
    let dist = crate::dist::current(&cfg.device)?;
    // Rank 0 owns the run folder; the others start once it is claimed (and an old run moved aside).
    let _lock = dist.main_first(|| match dist.is_main() {
        true => run_dir::RunDir::claim(&opts.out, opts.resume.is_some(), opts.overwrite).map(Some),
        false => Ok(None),
    })?;
    signals::install()?;
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
        val_report = trainer.end_epoch(val.as_ref(), test.as_ref())?.or(val_report);
        trainer.stop_if_interrupted(false)?;
    }
    let finished = trainer.state.epoch >= cfg.train.epochs;
    let test_report = match (&test, &trainer.state.best_test) {
        // The last epoch was the best: its test retrieval is already measured.
        (Some(_), Some(b)) if finished && b.step == trainer.state.step => {
            trainer.log.eval("test", b.epoch, b.step, serde_json::to_value(&b.report)?)?;
            Some(b.report.clone())
        }
        (Some(t), _) if finished => Some(trainer.evaluate("test", t)?),
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
        test_at_best: trainer.state.best_test.clone().filter(|_| finished),
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
    /// Optimiser steps skipped in a row (non-finite loss or gradient).
    skipped_in_a_row: usize,
    /// A stop signal some rank received, agreed on by all at the last optimiser step.
    stop: Option<i32>,
}

impl Trainer {
    /// A fresh run, or the one `opts.resume` names, with its log opened.
    fn start(mut setup: Setup, opts: &TrainOptions) -> Result<Self> {
        let cfg = setup.cfg.clone();
        let ckpts = Checkpoints::new(&opts.out);
        let dist = std::rc::Rc::clone(&setup.dist);
        let mut state = match &opts.resume {
            Some(r) => setup.resume(&if r == "latest" { ckpts.latest() } else { PathBuf::from(r) })?,
            None => TrainState::fresh(&cfg, dist.world()),
        };
        state.stream = state.stream.take().map(|s| s.of_rank(dist.place(), cfg.data.num_workers.max(1))).transpose()?;
        let total_steps = setup.steps_per_epoch * cfg.train.epochs;
        let stop_at = opts.max_steps.unwrap_or(total_steps).min(total_steps);
        let resumed = opts.resume.as_ref().map(|_| state.step);
        let log = match dist.is_main() {
            true => RunLog::open(&opts.out, resumed, stop_at, &cfg.train, opts.label.as_deref())?,
            false => RunLog::quiet(&opts.out),
        };
        Ok(Trainer { setup, state, log, ckpts, stop_at, last: None, skipped_in_a_row: 0, stop: None })
    }

    /// Trains the current epoch from where the state stands. False when it stopped mid-epoch at the
    /// step limit (after writing a checkpoint).
    fn epoch(&mut self) -> Result<bool> {
        let (epoch, accum, micro_per_epoch) =
            (self.state.epoch, self.setup.cfg.train.grad_accum, self.setup.micro_per_epoch);
        let mut batches = self.setup.loader.epoch(epoch, self.state.batch_in_epoch, self.state.stream.as_ref())?;
        let mut step = Accumulated::default();
        for bi in self.state.batch_in_epoch..micro_per_epoch {
            let mut batch = batches.next().context("the loader ended before the epoch did")??;
            self.note_skipped_images(&batch);
            if let Some((w, at)) = batch.stream.take() {
                let workers = self.setup.cfg.data.num_workers;
                self.state.stream.get_or_insert_with(|| StreamPosition { workers: vec![None; workers] }).workers[w] =
                    Some(at);
            }
            if step.started.is_none() {
                // Once per optimiser step, before its first forward: the EMA reads only applied updates.
                step.started = Some(Instant::now());
                self.setup.model.update_momentum()?;
            }
            self.micro_batch(&batch, (epoch * micro_per_epoch + bi) as u64, &mut step)?;
            if (bi + 1) % accum != 0 {
                continue;
            }
            self.optimizer_step(std::mem::take(&mut step), bi + 1)?;
            let mid_epoch = self.state.batch_in_epoch < micro_per_epoch;
            if self.stop_signal().is_some() {
                // At an epoch's last step too: the resumed run validates that epoch first.
                drop(batches);
                return self.stop_if_interrupted(true).map(|_| false);
            }
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
        for what in &batch.skipped {
            self.log.say(&format!("skipped {what}"));
        }
        self.state.skipped_images += batch.skipped.len();
    }

    /// Forward and backward of micro-batch number `micro` (counted from the start of training): its
    /// gradients, losses and metrics (still on the device) and queue update join the step's.
    fn micro_batch(&mut self, batch: &Batch, micro: u64, step: &mut Accumulated) -> Result<()> {
        let cfg = &self.setup.cfg;
        let alpha = schedule::alpha(
            cfg.effective_alpha(),
            cfg.objectives.alpha_ramp_epochs,
            self.state.step,
            self.setup.steps_per_epoch,
        );
        let mut out = self.setup.forward(batch, micro, alpha)?;
        let (total, mut grads) = backward(&mut out, self.setup.model.device())?;
        poison_point(self.state.step + 1, &mut grads, &self.setup.model)?;
        self.setup.opt.accumulate(&grads)?;
        step.add(&total, &out, alpha, batch.image_ids.len() * self.setup.dist.world())?;
        step.queue_updates.extend(out.queue_update);
        Ok(())
    }

    /// A non-finite loss or gradient in `step`: stop, naming it and the last finite checkpoint
    /// (`train.on_nonfinite = "stop"`), or drop the step's gradients and queue updates (`"skip"`).
    fn non_finite(&mut self, step: usize, what: &str) -> Result<()> {
        self.setup.opt.discard();
        if self.setup.cfg.train.on_nonfinite == OnNonFinite::Stop {
            self.log.finish();
            bail!(
                "step {step}: {what}; stopping, nothing was applied. {} (set train.on_nonfinite = \"skip\" to \
                 drop such steps)",
                self.ckpts.last_finite()
            );
        }
        self.log.say(&format!("step {step}: {what}; update skipped"));
        Ok(())
    }

    /// Reads the step's gradient norm, losses and metrics (the step's one device-to-host transfer), then
    /// applies the accumulated gradients when all are finite (and enqueues the step's momentum features),
    /// or counts the step as skipped; logs it and moves the position to micro-batch `batch_in_epoch`.
    /// With several ranks, the gradients are averaged over them first, and so are the losses and
    /// metrics (so every rank takes the same decisions) and whether a stop signal came.
    fn optimizer_step(&mut self, step: Accumulated, batch_in_epoch: usize) -> Result<()> {
        let lr = schedule::learning_rate(&self.setup.cfg.train, self.state.step, self.setup.steps_per_epoch);
        self.state.step += 1;
        self.state.batch_in_epoch = batch_in_epoch;
        let dist = std::rc::Rc::clone(&self.setup.dist);
        self.setup.opt.all_reduce(&dist)?;
        let norm_squared = self.setup.opt.norm_squared()?.reshape(1)?;
        let mut shared = step.values()?;
        if !dist.solo() {
            // Ranks agree on the step's numbers and on whether any of them was asked to stop.
            let signal = Tensor::new(&[signals::requested().unwrap_or(0) as f64], self.setup.model.device())?;
            shared = dist.mean(&Tensor::cat(&[&shared, &signal], 0)?)?;
        }
        let values = crate::readback::read(&Tensor::cat(&[&norm_squared, &shared], 0)?)?;
        let grad_norm = values[0].sqrt();
        let mut values = &values[1..];
        if !dist.solo() {
            if values[values.len() - 1] > 0.0 {
                self.stop = Some(signals::requested().unwrap_or(signal_hook::consts::SIGTERM));
            }
            values = &values[..values.len() - 1];
        }
        let (record, bad_loss) = step.record(values, self.state.step, self.state.epoch, lr, grad_norm);
        let problem = match bad_loss {
            Some((name, v)) => Some(format!("loss `{name}` is {v}")),
            None if !grad_norm.is_finite() => Some(format!("the gradient norm is {grad_norm}")),
            None => None,
        };
        let Some(problem) = problem else {
            self.setup.opt.apply(lr, self.setup.cfg.train.grad_clip, grad_norm)?;
            for update in &step.queue_updates {
                self.setup.model.enqueue(update)?;
            }
            dump_point(&self.setup, self.state.step)?;
            self.skipped_in_a_row = 0;
            self.log.step(&record)?;
            self.last = Some(record);
            return Ok(());
        };
        self.non_finite(self.state.step, &problem)?;
        self.state.skipped_steps += 1;
        self.skipped_in_a_row += 1;
        let limit = self.setup.cfg.train.max_consecutive_skips;
        if self.skipped_in_a_row >= limit {
            self.log.finish();
            bail!(
                "step {}: {limit} optimiser steps in a row were skipped for non-finite values \
                 (train.max_consecutive_skips); the run is diverging, stopping. {}",
                self.state.step,
                self.ckpts.last_finite()
            );
        }
        Ok(())
    }

    /// After a SIGINT / SIGTERM: writes a checkpoint of the current position (unless one was just
    /// written) and stops with [`Interrupted`].
    fn stop_if_interrupted(&mut self, save: bool) -> Result<()> {
        let Some(signal) = self.stop_signal() else { return Ok(()) };
        if save {
            self.save(false)?;
        }
        self.log.finish();
        let checkpoint = std::fs::canonicalize(self.ckpts.latest()).unwrap_or_else(|_| self.ckpts.latest());
        Err(Interrupted { signal, step: self.state.step, checkpoint }.into())
    }

    /// The signal to stop on: this process's own on one process; with several ranks, the one all ranks
    /// agreed on at the last optimiser step (they must stop at the same step).
    fn stop_signal(&self) -> Option<i32> {
        match self.setup.dist.solo() {
            true => signals::requested(),
            false => self.stop,
        }
    }

    /// Closes the epoch: validation (when a split is configured) and a checkpoint, marked `best` when
    /// the validation r_mean `train.select` names improved. A new `best` also evaluates the test split
    /// (ALBEF evaluates it every epoch and reports the best epoch's), kept in the run's state.
    fn end_epoch(
        &mut self, val: Option<&RetrievalSet>, test: Option<&RetrievalSet>,
    ) -> Result<Option<RetrievalReport>> {
        self.state.epoch += 1;
        self.state.batch_in_epoch = 0;
        self.state.stream = None;
        let report = val.map(|v| self.evaluate("val", v)).transpose()?;
        let is_best = match &report {
            Some(r) => {
                let select = self.setup.cfg.select();
                let r_mean = match select {
                    Select::Rerank => r.rerank.r_mean,
                    Select::Itc => r.itc.r_mean,
                };
                let what = select.describe();
                let best = self.state.best_r_mean.is_none_or(|b| r_mean > b);
                if best {
                    self.state.best_r_mean = Some(r_mean);
                    self.log.say(&format!("best checkpoint so far by {what} validation r_mean (train.select)"));
                }
                best
            }
            None => false,
        };
        if let (true, Some(t)) = (is_best, test) {
            let report = self.evaluate("test_at_best", t)?;
            let (epoch, step) = (self.state.epoch - 1, self.state.step);
            self.state.best_test = Some(checkpoint::BestTest { epoch, step, report });
        }
        self.save(is_best)?;
        Ok(report)
    }

    /// Retrieval on `set`, logged under `split` for the last finished epoch.
    fn evaluate(&mut self, split: &str, set: &RetrievalSet) -> Result<RetrievalReport> {
        let setup = &self.setup;
        let report = crate::eval::evaluate(&setup.model, set, &setup.tok, &setup.cfg, &setup.dist)?;
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

    /// A checkpoint of the current position, written by rank 0 (with every rank's shard positions).
    fn save(&self, is_best: bool) -> Result<PathBuf> {
        let (model, opt, dist) = (&self.setup.model, &self.setup.opt, &self.setup.dist);
        let mut state = self.state.clone();
        state.stream = StreamPosition::gather(self.state.stream.as_ref(), dist, model.device())?;
        match dist.is_main() {
            true => self.ckpts.save(&state, model.named_tensors()?, opt.state_tensors(), is_best),
            false => Ok(self.ckpts.latest()),
        }
    }
}

/// Test hook for the reliability tests: `ALIGNFUSE_POISON_GRADIENT=N` makes one gradient of step N NaN
/// behind a finite loss, as an overflow in a backward pass would.
fn poison_point(
    step: usize, grads: &mut candle_core::backprop::GradStore, model: &crate::model::albef::Albef,
) -> Result<()> {
    if std::env::var("ALIGNFUSE_POISON_GRADIENT").ok().and_then(|v| v.parse::<usize>().ok()) == Some(step) {
        let (_, temp) = model.params().vars().into_iter().find(|(n, _)| n == "temp").context("no temp")?;
        if let Some(g) = grads.remove(temp.as_tensor()) {
            grads.insert(temp.as_tensor(), (g * f64::NAN)?);
        }
    }
    Ok(())
}

/// Test hook for the data-parallel tests: `ALIGNFUSE_DUMP_STATE=DIR` makes every rank write its model
/// state (parameters, momentum twin, queues) after each applied step to `DIR/rank-R/step-N.safetensors`.
fn dump_point(setup: &Setup, step: usize) -> Result<()> {
    let Some(dir) = std::env::var_os("ALIGNFUSE_DUMP_STATE") else { return Ok(()) };
    let dir = PathBuf::from(dir).join(format!("rank-{}", setup.dist.rank()));
    std::fs::create_dir_all(&dir)?;
    let tensors: std::collections::HashMap<String, Tensor> = setup.model.named_tensors()?.into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join(format!("step-{step}.safetensors")))?;
    Ok(())
}

/// What the micro-batches of one optimiser step leave for it: their losses and metrics, still on the
/// device, and their queue updates.
#[derive(Default)]
struct Accumulated {
    /// Per micro-batch: the names of its losses and of its metrics, and `[total, losses.., metrics..]`.
    micro: Vec<(Vec<&'static str>, Vec<&'static str>, Tensor)>,
    pairs: usize,
    alpha: f64,
    started: Option<Instant>,
    /// The micro-batches' momentum features, enqueued once the update is applied.
    queue_updates: Vec<crate::model::albef::QueueUpdate>,
}

impl Accumulated {
    /// Keeps the micro-batch's losses and metrics, detached: a loss still tracking its graph would hold
    /// every activation of the forward (and, with `grad_accum` > 1, of every micro-batch) until the step.
    fn add(&mut self, total: &Tensor, out: &crate::model::albef::Output, alpha: f64, pairs: usize) -> Result<()> {
        let scalars = std::iter::once(total)
            .chain(out.losses.iter().chain(out.metrics.iter()).map(|(_, t)| t))
            .map(|t| t.detach().to_dtype(DType::F64)?.reshape(1))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let names = |n: &crate::objectives::Named| n.iter().map(|(name, _)| name).collect();
        self.micro.push((names(&out.losses), names(&out.metrics), Tensor::cat(&scalars, 0)?));
        self.alpha = alpha;
        self.pairs += pairs;
        Ok(())
    }

    /// Every micro-batch's values, concatenated: what [`Accumulated::record`] reads.
    fn values(&self) -> Result<Tensor> {
        let parts: Vec<&Tensor> = self.micro.iter().map(|(_, _, t)| t).collect();
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The step's record from the read `values` (means over the micro-batches), and the first loss that
    /// is not finite.
    fn record(
        &self, values: &[f64], step: usize, epoch: usize, lr: f64, grad_norm: f64,
    ) -> (StepRecord, Option<(&'static str, f64)>) {
        let (mut loss, mut losses, mut metrics) = (0.0, BTreeMap::new(), BTreeMap::<String, f64>::new());
        let mut bad = None;
        let mut at = values.iter().copied();
        for (loss_names, metric_names, _) in &self.micro {
            loss += at.next().unwrap_or(f64::NAN);
            for (name, v) in loss_names.iter().zip(at.by_ref()) {
                if !v.is_finite() && bad.is_none() {
                    bad = Some((*name, v));
                }
                *losses.entry(name.to_string()).or_default() += v;
            }
            for (name, v) in metric_names.iter().zip(at.by_ref()) {
                *metrics.entry(name.to_string()).or_default() += v;
            }
        }
        let n = self.micro.len().max(1) as f64;
        let mean = |m: BTreeMap<String, f64>| m.into_iter().map(|(k, v)| (k, v / n)).collect();
        let secs = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        let record = StepRecord {
            step,
            epoch,
            loss: loss / n,
            losses: mean(losses),
            lr,
            alpha: self.alpha,
            metrics: mean(metrics),
            grad_norm,
            pairs_per_s: if secs > 0.0 { self.pairs as f64 / secs } else { 0.0 },
        };
        (record, bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::albef::Output;
    use crate::objectives::Named;

    /// A micro-batch's values are kept without their graph: with `grad_accum` > 1 a tracked loss would
    /// hold every micro-batch's activations until the optimiser step.
    #[test]
    fn accumulated_values_hold_no_graph() -> Result<()> {
        let w = candle_core::Var::new(&[1f32, 2.0], &candle_core::Device::Cpu)?;
        let loss = w.as_tensor().sqr()?.sum_all()?;
        let mut losses = Named::default();
        losses.insert("itc", loss.clone());
        let out = Output { losses, metrics: Named::default(), queue_update: None, cuts: Vec::new() };
        let mut step = Accumulated::default();
        step.add(&loss, &out, 0.4, 2)?;
        assert!(loss.track_op() && !step.values()?.track_op());
        assert_eq!(step.values()?.to_vec1::<f64>()?, [5.0, 5.0]);
        Ok(())
    }
}
