//! The training loop: batches from `data`, one `Albef::step` per micro-batch, AdamW with schedules,
//! checkpoints that resume exactly, validation retrieval each epoch, test retrieval at the end.
//!
//! Exact resume: every random draw of micro-batch k comes from streams keyed by (seed, k) — dropout,
//! ITM negatives, MLM masking — and the data order and augmentation from (seed, epoch, sample), so a
//! checkpoint needs only the tensors (weights, momentum twin, queues, AdamW moments) and the position.

pub mod bench;
pub mod checkpoint;
pub mod log;
pub mod optim;
pub mod schedule;

use crate::config::{Config, OnBadImage, OnNonFinite};
use crate::data::annotations::{RetrievalSet, TextOptions, TrainSet};
use crate::data::loader::TrainLoader;
use crate::data::tokenizer::TextTokenizer;
use crate::eval::RetrievalReport;
use crate::model::albef::{Albef, SeededDraws, StepBatch, StepOutput};
use crate::model::layers::Ctx;
use crate::model::params::ParamStore;
use crate::objectives::mlm::SpecialTokens;
use anyhow::{bail, ensure, Context, Result};
use checkpoint::{Checkpoints, TrainState};
use log::{RunLog, StepRecord};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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

/// With no training annotation configured, generates the synthetic shapes dataset under OUT/data (once;
/// it is deterministic in the seed) and points the config at it.
pub fn ensure_data(cfg: &mut Config, out: &Path) -> Result<()> {
    if !cfg.data.train_ann.is_empty() {
        return Ok(());
    }
    // Keyed by size and seed: an existing directory holds exactly what generate() would write.
    let dir = out.join("data").join(format!("synth-n{}-seed{}", cfg.data.synth_n, cfg.seed));
    let paths = if dir.join("vocab.txt").is_file() {
        let f = |n: &str| dir.join(n);
        crate::data::synth::SynthPaths { train: f("train.json"), val: f("val.json"), test: f("test.json"), vocab: f("vocab.txt"), dir: dir.clone() }
    } else {
        eprintln!("no training data configured: generating the synthetic shapes dataset in {}", dir.display());
        crate::data::synth::generate(&dir, cfg.data.synth_n, cfg.seed)?
    };
    cfg.data.train_ann = vec![paths.train];
    cfg.data.val_ann = Some(paths.val);
    cfg.data.test_ann = Some(paths.test);
    cfg.data.vocab.get_or_insert(paths.vocab);
    Ok(())
}

/// The tokenizer of the first training file, checked against the model's vocabulary size.
pub fn tokenizer(cfg: &Config) -> Result<TextTokenizer> {
    let ann = cfg.data.train_ann.first().or(cfg.data.test_ann.as_ref()).context("no annotation file configured")?;
    let path = cfg.vocab_path(ann)?;
    let tok = TextTokenizer::from_file(&path)?;
    ensure!(tok.vocab_size() <= cfg.model.text.vocab_size,
        "the vocabulary {} has {} tokens but model.text.vocab_size is {}", path.display(), tok.vocab_size(),
        cfg.model.text.vocab_size);
    Ok(tok)
}

pub fn text_options(cfg: &Config) -> TextOptions {
    TextOptions { max_words: cfg.data.max_words, style: cfg.data.caption_style }
}

/// Everything a run needs before its first step; `train` and `bench train` share it.
pub struct Setup {
    pub cfg: Config,
    pub device: candle_core::Device,
    pub tok: Arc<TextTokenizer>,
    pub loader: TrainLoader,
    pub model: Albef,
    pub opt: optim::AdamW,
    pub special: SpecialTokens,
    pub steps_per_epoch: usize,
    /// Micro-batches per epoch actually used: past the last full accumulation they are left out, like
    /// drop_last.
    pub micro_per_epoch: usize,
}

impl Setup {
    /// Prepares data (generating the synthetic set when none is configured), tokenizer, loader, a freshly
    /// initialised model and its optimiser.
    pub fn new(mut cfg: Config, out: &Path) -> Result<Self> {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        ensure_data(&mut cfg, out)?;
        let device = crate::device(&cfg.device)?;
        let tok = Arc::new(tokenizer(&cfg)?);
        let set = Arc::new(TrainSet::load(&cfg.data.train_ann, cfg.data.image_root.as_deref(), text_options(&cfg),
            cfg.data.on_bad_image == OnBadImage::Fail)?);
        let loader = TrainLoader::new(set, Arc::clone(&tok), &cfg, device.clone())?;
        let accum = cfg.train.grad_accum;
        let steps_per_epoch = loader.batches_per_epoch() / accum;
        ensure!(steps_per_epoch >= 1, "one epoch has {} batches, fewer than train.grad_accum = {accum}", loader.batches_per_epoch());
        let model = match &cfg.train.init {
            Some(path) => Albef::from_checkpoint(&cfg, path, &device).with_context(|| {
                format!("train.init = {}: create it with `alignfuse import` (configs/small.toml: scripts/prepare-small.sh)",
                    path.display())
            })?,
            None => Albef::new(&cfg, ParamStore::new(cfg.seed, &device))?,
        };
        let opt = optim::AdamW::new(model.params.vars(), &cfg.train)?;
        let special = SpecialTokens { pad: tok.pad_id(), cls: tok.cls_id(), mask: tok.mask_id(), vocab_size: tok.vocab_size() as u32 };
        Ok(Setup { device, tok, loader, model, opt, special, steps_per_epoch, micro_per_epoch: steps_per_epoch * accum, cfg })
    }

}

/// The forward of micro-batch number `micro` (counted from the start of training): its dropout masks,
/// negatives and MLM masking come from streams keyed by (seed, micro).
pub fn forward(model: &mut Albef, cfg: &Config, special: SpecialTokens, batch: &crate::data::loader::Batch, micro: u64,
    alpha: f64) -> Result<StepOutput> {
    let mut draws = SeededDraws {
        rng: crate::rng::stream(cfg.seed, "draws", "", micro),
        negatives: cfg.objectives.itm_negatives,
        special,
        mlm_probability: cfg.objectives.mlm_probability,
    };
    let ctx = Ctx::new(true, cfg.kernels, crate::rng::stream(cfg.seed, "dropout", "online", micro));
    let ctx_m = Ctx::new(true, cfg.kernels, crate::rng::stream(cfg.seed, "dropout", "momentum", micro));
    let image_ids: Vec<i64> = batch.image_ids.iter().map(|&i| i as i64).collect();
    let sb = StepBatch { images: &batch.images, input_ids: &batch.input_ids, attention_mask: &batch.attention_mask, image_ids: &image_ids };
    model.step(&sb, alpha, &mut draws, &ctx, &ctx_m)
}

pub fn train(cfg: Config, opts: &TrainOptions) -> Result<TrainSummary> {
    let started = Instant::now();
    let mut run = Setup::new(cfg, &opts.out)?;
    let cfg = run.cfg.clone();
    let retrieval = |ann: &Option<PathBuf>| {
        ann.as_ref().map(|p| RetrievalSet::load(p, cfg.data.image_root.as_deref(), text_options(&cfg))).transpose()
    };
    let (val, test) = (retrieval(&cfg.data.val_ann)?, retrieval(&cfg.data.test_ann)?);
    let (steps_per_epoch, micro_per_epoch, accum) = (run.steps_per_epoch, run.micro_per_epoch, cfg.train.grad_accum);
    let total_steps = steps_per_epoch * cfg.train.epochs;
    let stop_at = opts.max_steps.unwrap_or(total_steps).min(total_steps);

    let ckpts = Checkpoints::new(&opts.out);
    let mut state = TrainState {
        format: checkpoint::FORMAT.into(),
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        seed: cfg.seed,
        best_r_mean: None,
        skipped_steps: 0,
        skipped_images: 0,
        config: cfg.clone(),
    };
    if let Some(r) = &opts.resume {
        let dir = if r == "latest" { ckpts.latest() } else { PathBuf::from(r) };
        let loaded = checkpoint::load(&dir, &run.device)?;
        ensure!(loaded.state.config.model == cfg.model && loaded.state.config.seed == cfg.seed,
            "{}: the checkpoint was trained with a different [model] section or seed than this config", dir.display());
        run.model.load_named(&loaded.model).with_context(|| format!("loading {}", dir.display()))?;
        run.opt.load_state(&loaded.optim, loaded.state.step)?;
        state = TrainState { config: cfg.clone(), ..loaded.state };
        eprintln!("resuming from {} at step {} (epoch {}, batch {})", dir.display(), state.step, state.epoch, state.batch_in_epoch);
    }
    let resumed_from = opts.resume.as_ref().map(|_| state.step);
    let mut log = RunLog::open(&opts.out, resumed_from, stop_at, cfg.train.log_every, opts.label.as_deref())?;
    let alpha_max = cfg.effective_alpha();
    let mut last: Option<StepRecord> = None;
    let mut val_report = None;

    'epochs: while state.epoch < cfg.train.epochs && state.step < stop_at {
        let epoch = state.epoch;
        let mut batches = run.loader.epoch(epoch, state.batch_in_epoch)?;
        let mut group = Group::default();
        for bi in state.batch_in_epoch..micro_per_epoch {
            let batch = batches.next().context("the loader ended before the epoch did")??;
            for p in &batch.skipped {
                log.say(&format!("skipped unreadable image {}", p.display()));
            }
            state.skipped_images += batch.skipped.len();
            group.started.get_or_insert(Instant::now());
            let micro = (epoch * micro_per_epoch + bi) as u64;
            let alpha = schedule::alpha(alpha_max, cfg.objectives.alpha_ramp_epochs, state.step, steps_per_epoch);
            let out = forward(&mut run.model, &cfg, run.special, &batch, micro, alpha)?;
            match non_finite(&out)? {
                Some((name, v)) if cfg.train.on_nonfinite == OnNonFinite::Stop => {
                    log.finish();
                    bail!("step {} (epoch {epoch}, batch {bi}): loss `{name}` is {v}; stopping. The last good \
                        checkpoint is {} (set train.on_nonfinite = \"skip\" to drop such steps)", state.step + 1,
                        ckpts.latest().display());
                }
                Some((name, v)) => {
                    log.say(&format!("step {}: loss `{name}` is {v}; update skipped", state.step + 1));
                    group.poisoned = true;
                    run.opt.discard();
                }
                None if !group.poisoned => {
                    run.opt.accumulate(&out.loss.backward()?)?;
                    group.add(&out, batch.indices.len())?;
                }
                None => {}
            }
            if (bi + 1) % accum != 0 {
                continue;
            }
            let lr = schedule::learning_rate(&cfg.train, state.step, steps_per_epoch);
            state.step += 1;
            state.batch_in_epoch = bi + 1;
            if group.poisoned {
                state.skipped_steps += 1;
                run.opt.discard();
            } else {
                let grad_norm = run.opt.step(lr, cfg.train.grad_clip)?;
                let rec = group.record(state.step, epoch, lr, grad_norm);
                log.step(&rec)?;
                last = Some(rec);
            }
            group = Group::default();
            let periodic = cfg.train.checkpoint_every > 0 && state.step % cfg.train.checkpoint_every == 0;
            if state.step >= stop_at && state.batch_in_epoch < micro_per_epoch {
                drop(batches);
                save(&ckpts, &state, &run.model, &run.opt, false)?;
                break 'epochs;
            }
            if periodic && state.batch_in_epoch < micro_per_epoch {
                save(&ckpts, &state, &run.model, &run.opt, false)?;
            }
        }
        drop(batches);
        state.epoch += 1;
        state.batch_in_epoch = 0;
        let mut is_best = false;
        if let Some(v) = &val {
            let report = crate::eval::evaluate(&run.model, v, &run.tok, &cfg)?;
            let r = report.rerank.r_mean;
            log.say(&format!("epoch {epoch} validation: r_mean {r:.2} (ITC only {:.2})", report.itc.r_mean));
            log.eval("val", epoch, state.step, serde_json::to_value(&report)?)?;
            is_best = state.best_r_mean.is_none_or(|b| r > b);
            if is_best {
                state.best_r_mean = Some(r);
            }
            val_report = Some(report);
        }
        save(&ckpts, &state, &run.model, &run.opt, is_best)?;
    }
    let finished = state.epoch >= cfg.train.epochs;
    let test_report = match (&test, finished) {
        (Some(t), true) => {
            let report = crate::eval::evaluate(&run.model, t, &run.tok, &cfg)?;
            log.eval("test", state.epoch.saturating_sub(1), state.step, serde_json::to_value(&report)?)?;
            Some(report)
        }
        _ => None,
    };
    log.finish();
    Ok(TrainSummary {
        steps: state.step,
        wall_s: started.elapsed().as_secs_f64(),
        resumed_from,
        last,
        val: val_report,
        test: test_report,
        checkpoint: std::fs::canonicalize(ckpts.latest()).unwrap_or_else(|_| ckpts.latest()),
        skipped_steps: state.skipped_steps,
        skipped_images: state.skipped_images,
    })
}

fn save(ckpts: &Checkpoints, state: &TrainState, model: &Albef, opt: &optim::AdamW, is_best: bool) -> Result<PathBuf> {
    ckpts.save(state, model.named_tensors()?, opt.state_tensors(), is_best)
}

/// The first non-finite loss of a step, by name.
fn non_finite(out: &StepOutput) -> Result<Option<(&'static str, f32)>> {
    for (name, t) in [("itc", &out.itc), ("itm", &out.itm), ("mlm", &out.mlm)] {
        if let Some(t) = t {
            let v = t.to_scalar::<f32>()?;
            if !v.is_finite() {
                return Ok(Some((name, v)));
            }
        }
    }
    Ok(None)
}

/// Loss sums over the micro-batches of one optimiser step.
#[derive(Default)]
struct Group {
    n: usize,
    pairs: usize,
    loss: f64,
    itc: Option<f64>,
    itm: Option<f64>,
    mlm: Option<f64>,
    itm_acc: Option<f64>,
    alpha: f64,
    temp: f64,
    poisoned: bool,
    started: Option<Instant>,
}

impl Group {
    fn add(&mut self, out: &StepOutput, pairs: usize) -> Result<()> {
        let v = |t: &Option<candle_core::Tensor>| -> Result<Option<f64>> {
            t.as_ref().map(|t| Ok(t.to_scalar::<f32>()? as f64)).transpose()
        };
        let add = |acc: &mut Option<f64>, x: Option<f64>| {
            if let Some(x) = x {
                *acc = Some(acc.unwrap_or(0.0) + x);
            }
        };
        add(&mut self.itc, v(&out.itc)?);
        add(&mut self.itm, v(&out.itm)?);
        add(&mut self.mlm, v(&out.mlm)?);
        add(&mut self.itm_acc, out.itm_accuracy);
        self.loss += out.loss.to_scalar::<f32>()? as f64;
        self.alpha = out.alpha;
        self.temp = out.temp;
        self.n += 1;
        self.pairs += pairs;
        Ok(())
    }

    fn record(&self, step: usize, epoch: usize, lr: f64, grad_norm: f64) -> StepRecord {
        let n = self.n.max(1) as f64;
        let mean = |x: Option<f64>| x.map(|x| x / n);
        let secs = self.started.map_or(0.0, |s| s.elapsed().as_secs_f64());
        StepRecord {
            step,
            epoch,
            loss: self.loss / n,
            itc: mean(self.itc),
            itm: mean(self.itm),
            mlm: mean(self.mlm),
            lr,
            alpha: self.alpha,
            temp: self.temp,
            itm_acc: mean(self.itm_acc),
            grad_norm,
            pairs_per_s: if secs > 0.0 { self.pairs as f64 / secs } else { 0.0 },
        }
    }
}
