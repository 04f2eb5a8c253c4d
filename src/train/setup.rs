//! Everything a training run needs before its first step, shared by `train` and `bench train`: data
//! (from `crate::data`), tokenizer, loader, the model (fresh, from `train.init`, or resumed) and its
//! optimiser; and the forward of one micro-batch with its seeded draws.

use super::checkpoint::{self, TrainState};
use super::optim::AdamW;
use crate::config::Config;
use crate::config::{differing_keys, Negatives, Precision};
use crate::data::loader::{Batch, TrainLoader};
use crate::data::tokenizer::TextTokenizer;
use crate::dist::Dist;
use crate::model::albef::{Albef, Inputs, Output, SeededDraws};
use crate::model::layers::Ctx;
use crate::model::params::ParamStore;
use crate::objectives::mlm::SpecialTokens;
use anyhow::{ensure, Context, Result};
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

/// Settings that neither reorder the data nor change an update, so a resumed run may change them.
const MAY_CHANGE_ON_RESUME: [&str; 14] = [
    "device",
    "kernels",
    "eval",
    "data.val_ann",
    "data.test_ann",
    "data.num_workers",
    "data.prefetch",
    "train.log_every",
    "train.checkpoint_every",
    "train.on_nonfinite",
    "train.max_consecutive_skips",
    "train.init",
    "train.select",
    "train.tensorboard",
];

pub struct Setup {
    pub cfg: Config,
    /// The data-parallel job this process is a rank of (one process: a job of one).
    pub dist: Rc<Dist>,
    pub device: candle_core::Device,
    pub tok: Arc<TextTokenizer>,
    pub loader: TrainLoader,
    pub model: Albef,
    pub opt: AdamW,
    pub special: SpecialTokens,
    pub steps_per_epoch: usize,
    /// Micro-batches per epoch actually used: past the last full accumulation they are left out, like
    /// drop_last.
    pub micro_per_epoch: usize,
}

impl Setup {
    /// Prepares data (generating the synthetic set when none is configured), tokenizer, loader, a freshly
    /// initialised model (or `train.init`'s) and its optimiser.
    pub fn new(mut cfg: Config, out: &Path) -> Result<Self> {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let dist = crate::dist::current(&cfg.device)?;
        // Rank 0 generates the default data; the others then find it.
        dist.main_first(|| crate::data::resolve(&mut cfg, out))?;
        let device = crate::dist::device(&cfg.device)?;
        // TF32 tensor-core matmuls for f32 (a process-wide cuBLAS setting; nothing on the CPU).
        candle_core::cuda::set_gemm_reduced_precision_f32(cfg.train.precision == Precision::Tf32);
        // The CPU has no bf16 matmul kernels (candle converts element by element) and no TF32 mode.
        if device.is_cpu() {
            match cfg.train.precision {
                Precision::Bf16 => eprintln!(
                    "train.precision = \"bf16\" on the CPU: steps run about 15x slower than in fp32 (no bf16 \
                     matmul kernels there); set train.precision = \"fp32\" for CPU runs"
                ),
                Precision::Tf32 => {
                    eprintln!(
                        "train.precision = \"tf32\" on the CPU: the same as fp32 (TF32 is a GPU tensor-core mode)"
                    )
                }
                Precision::Fp32 => {}
            }
        }
        let tok = Arc::new(crate::data::train_tokenizer(&cfg)?);
        let data = crate::data::train_data(&cfg)?;
        let loader = TrainLoader::new(data, Arc::clone(&tok), &cfg, device.clone(), dist.place())?;
        let accum = cfg.train.grad_accum;
        let steps_per_epoch = loader.batches_per_epoch() / accum;
        ensure!(
            steps_per_epoch >= 1,
            "one epoch has {} batches, fewer than train.grad_accum = {accum}",
            loader.batches_per_epoch()
        );
        let model = match &cfg.train.init {
            Some(path) => Albef::from_checkpoint(&cfg, path, &device).with_context(|| {
                format!(
                    "train.init = {}: create it with `alignfuse import` (configs/small.toml: scripts/prepare-small.sh)",
                    path.display()
                )
            })?,
            None => Albef::new(&cfg, ParamStore::new(cfg.seed, &device))?,
        };
        model.sync_from(&dist, 0)?;
        let opt = AdamW::new(model.params().vars(), &cfg.train)?;
        let special = tok.special_tokens(cfg.model.text.vocab_size);
        Ok(Setup {
            dist,
            device,
            tok,
            loader,
            model,
            opt,
            special,
            steps_per_epoch,
            micro_per_epoch: steps_per_epoch * accum,
            cfg,
        })
    }

    /// Loads the checkpoint in `dir` (model, optimiser) and returns its position. Every setting that
    /// changes the data order or the update must be the checkpoint's, or resuming would not continue the
    /// same run: the error names each differing key.
    pub fn resume(&mut self, dir: &Path) -> Result<TrainState> {
        let loaded = checkpoint::load(dir, &self.device)?;
        let world = self.dist.world();
        ensure!(
            loaded.state.world_size == world,
            "{} was trained by {} data-parallel ranks and this job has {world}: the global batch and the data order \
             depend on it, so resume with {} ranks (or start a fresh run)",
            dir.display(),
            loaded.state.world_size,
            loaded.state.world_size
        );
        let differ: Vec<String> = differing_keys(&loaded.state.config, &self.cfg)?
            .into_iter()
            .filter(|(key, _, _)| !MAY_CHANGE_ON_RESUME.iter().any(|k| key == k || key.starts_with(&format!("{k}."))))
            .map(|(key, ckpt, now)| format!("{key} = {ckpt} in the checkpoint, {now} now"))
            .collect();
        ensure!(
            differ.is_empty(),
            "{} cannot be resumed with this config: {} (resume with the run's own settings, or train into a \
             fresh --out)",
            dir.display(),
            differ.join("; ")
        );
        let file = dir.join("model.safetensors");
        self.model.load_state(&file, &loaded.model, loaded.model_cfg.as_ref())?;
        self.opt.load_state(&loaded.optim, loaded.state.step)?;
        let state = TrainState { config: self.cfg.clone(), ..loaded.state };
        eprintln!(
            "resuming from {} at step {} (epoch {}, batch {})",
            dir.display(),
            state.step,
            state.epoch,
            state.batch_in_epoch
        );
        Ok(state)
    }

    /// The model's forward of micro-batch number `micro` (counted from the start of training; the
    /// caller updates the momentum twin before and enqueues after): its dropout masks, negatives and MLM
    /// masking come from streams keyed by (seed, micro).
    pub fn forward(&mut self, batch: &Batch, micro: u64, alpha: f64) -> Result<Output> {
        crate::threads::wake();
        let (cfg, seed) = (&self.cfg, self.cfg.seed);
        // Every rank draws from its own streams (rank 0's are a lone process's).
        let rank = self.dist.stream_label();
        let mut draws = SeededDraws {
            rng: crate::rng::stream(seed, "draws", &rank, micro),
            hard_negatives: match cfg.objectives.itm_negatives {
                Negatives::Hard => cfg.objectives.itm_hard_fraction,
                Negatives::Random => 0.0,
            },
            special: self.special,
            mlm_probability: cfg.objectives.mlm_probability,
        };
        if !self.device.is_cpu() {
            // The GPU's generator (ITM's Gumbel noise) restarts from (seed, micro) for every micro-batch.
            self.device.set_seed(crate::rng::splitmix(seed ^ micro ^ ((self.dist.rank() as u64) << 40)))?;
        }
        let dropout = |which: &str| crate::rng::stream(seed, "dropout", &format!("{which}{rank}"), micro);
        let mut ctx = Ctx::new(true, cfg.kernels, dropout("online")).with_precision(cfg.train.precision);
        if cfg.train.segmented_backward || cfg.train.grad_checkpoint {
            ctx = ctx.with_cuts(cfg.train.grad_checkpoint);
        }
        let ctx_m = Ctx::new(true, cfg.kernels, dropout("momentum")).with_precision(cfg.train.precision);
        let image_ids: Vec<i64> = batch.image_ids.iter().map(|&i| i as i64).collect();
        let inputs = Inputs {
            images: &batch.images,
            input_ids: &batch.input_ids,
            token_ids: &batch.token_ids,
            attention_mask: &batch.attention_mask,
            image_ids: &image_ids,
            caption_groups: &batch.caption_groups,
        };
        self.model.forward(&inputs, alpha, &mut draws, &ctx, &ctx_m, &self.dist)
    }
}
