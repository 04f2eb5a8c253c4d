//! The whole ALBEF model: encoders (online and momentum twin), projections, `temp`, `itm_head`, the
//! feature queue, and the pre-training forward that returns the ITC, ITM and MLM losses by name.

use super::bert::{ImageKv, ImageSide, TextEncoder};
use super::layers::{Ctx, Linear};
use super::momentum::{FeatureQueue, Momentum};
use super::params::{Init, ParamStore, Pb};
use super::segments::{Chain, Cut};
use super::vit::Vit;
use crate::config::{Config, ItcKeys, Kernels, ModelConfig, Negatives, ObjectivesConfig};
use crate::dist::Dist;
use crate::objectives::itc::Keys;
use crate::objectives::{itc, itm, mlm, Named};
use anyhow::Context;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;

/// The modules that exist twice (online and momentum): one definition, two parameter sets.
struct Encoders {
    visual_encoder: Vit,
    text_encoder: TextEncoder,
    vision_proj: Linear,
    text_proj: Linear,
}

impl Encoders {
    fn new(pb: &Pb, cfg: &ModelConfig) -> Result<Self> {
        let (vw, th) = (cfg.vision.vision_width, cfg.text.hidden_size);
        Ok(Encoders {
            visual_encoder: Vit::new(&pb.pp("visual_encoder"), &cfg.vision)?,
            text_encoder: TextEncoder::new(&pb.pp("text_encoder"), &cfg.text, vw)?,
            vision_proj: Linear::new(&pb.pp("vision_proj"), vw, cfg.embed_dim)?,
            text_proj: Linear::new(&pb.pp("text_proj"), th, cfg.embed_dim)?,
        })
    }

    fn image(&self, images: &Tensor, ctx: &Ctx) -> Result<(Tensor, Tensor)> {
        let embeds = self.visual_encoder.forward(images, ctx)?;
        let feat = normalize(&self.vision_proj.forward(&cls(&embeds)?, ctx)?)?;
        Ok((embeds, feat))
    }

    fn text(&self, ids: &Tensor, mask: &Tensor, ctx: &Ctx) -> Result<(Tensor, Tensor)> {
        // Cut here, the text encoder's backward runs beside the ViT's (`train::backward`).
        let embeds = ctx.cut(Chain::Text, self.text_encoder.bert.forward_text(ids, mask, ctx)?)?;
        let feat = normalize(&self.text_proj.forward(&cls(&embeds)?, ctx)?)?;
        Ok((embeds, feat))
    }
}

/// The `[CLS]` token of [B, L, D] -> [B, D].
fn cls(x: &Tensor) -> Result<Tensor> {
    x.narrow(1, 0, 1)?.squeeze(1)
}

/// F.normalize: x / max(||x||, 1e-12) over the last dimension, in f32 (a bf16 projection is promoted, as
/// torch.autocast runs norms in f32).
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?)
}

/// One micro-batch of image-caption pairs.
pub struct Inputs<'a> {
    pub images: &'a Tensor,
    pub input_ids: &'a Tensor,
    /// The same ids on the host, row-major: MLM masks from them without reading the device.
    pub token_ids: &'a [u32],
    pub attention_mask: &'a Tensor,
    pub image_ids: &'a [i64],
    /// Equal values mark pairs with identical cleaned captions (no ITM negatives of each other).
    pub caption_groups: &'a [usize],
}

/// The forward's random choices, made injectable so a golden test can supply the reference's draws.
pub trait Draws {
    fn negatives(
        &mut self, sim_i2t: &Tensor, sim_t2i: &Tensor, ids: &[i64], captions: &[usize],
    ) -> anyhow::Result<itm::ItmNegatives>;
    fn mlm_mask(&mut self, ids: &[u32]) -> mlm::MaskedTokens;
}

/// Draws from one seeded stream per micro-batch: negatives first, then the MLM mask (the reference's
/// order).
pub struct SeededDraws {
    pub rng: ChaCha8Rng,
    /// The probability that a row's ITM negative is drawn hard (see [`itm::sample_negatives`]).
    pub hard_negatives: f64,
    pub special: mlm::SpecialTokens,
    pub mlm_probability: f64,
}

impl Draws for SeededDraws {
    fn negatives(
        &mut self, sim_i2t: &Tensor, sim_t2i: &Tensor, ids: &[i64], captions: &[usize],
    ) -> anyhow::Result<itm::ItmNegatives> {
        itm::sample_negatives(sim_i2t, sim_t2i, ids, captions, self.hard_negatives, &mut self.rng)
    }

    fn mlm_mask(&mut self, ids: &[u32]) -> mlm::MaskedTokens {
        mlm::mask_tokens(ids, self.special, self.mlm_probability, &mut self.rng)
    }
}

/// What one forward gives: `losses` by name (`itc`, `itm`, `mlm`; an objective switched off is absent,
/// and so is MLM for a batch in which nothing was masked), unsummed, `metrics` (`temp`, `itm_acc`,
/// `itm_same_caption`: pairs kept out of the ITM negatives for sharing a caption), and
/// the momentum features ITC wants queued, which the caller passes to [`Albef::enqueue`] once the update
/// they came with has proved finite.
pub struct Output {
    pub losses: Named,
    pub metrics: Named,
    pub queue_update: Option<QueueUpdate>,
    /// Where `ctx` cut the graph, for `train::backward`.
    pub cuts: Vec<Cut>,
}

/// Every rank's momentum features (no gradient) and image ids of a micro-batch, in rank order: the
/// ITC queue's update, and the ITC keys with `objectives.itc_keys = "global"`.
pub struct QueueUpdate {
    pub image_feat_m: Tensor,
    pub text_feat_m: Tensor,
    pub image_ids: Vec<i64>,
    /// Where this rank's pairs start among them.
    pub offset: usize,
}

/// [`QueueUpdate`] of this micro-batch: gathered from every rank (one process: its own features).
fn gather_keys(dist: &Dist, image_feat_m: &Tensor, text_feat_m: &Tensor, ids: &[i64]) -> anyhow::Result<QueueUpdate> {
    if dist.solo() {
        let (image_feat_m, text_feat_m) = (image_feat_m.clone(), text_feat_m.clone());
        return Ok(QueueUpdate { image_feat_m, text_feat_m, image_ids: ids.to_vec(), offset: 0 });
    }
    let id_tensor = Tensor::new(ids, image_feat_m.device())?;
    Ok(QueueUpdate {
        image_feat_m: dist.all_gather(image_feat_m)?,
        text_feat_m: dist.all_gather(text_feat_m)?,
        image_ids: dist.all_gather(&id_tensor)?.to_vec1()?,
        offset: dist.rank() * ids.len(),
    })
}

/// The online encoders' outputs for a batch.
struct Online {
    image_embeds: Tensor,
    image_feat: Tensor,
    text_embeds: Tensor,
    text_feat: Tensor,
}

/// The momentum encoders' outputs, computed only where an objective reads them.
struct Teacher {
    image: Option<(Tensor, Tensor)>,
    text_feat: Option<Tensor>,
}

impl Teacher {
    /// (image_feat_m, text_feat_m) when both were computed.
    fn feats(&self) -> Option<(&Tensor, &Tensor)> {
        match (&self.image, &self.text_feat) {
            (Some((_, image_feat)), Some(text_feat)) => Some((image_feat, text_feat)),
            _ => None,
        }
    }
}

pub struct Albef {
    model_cfg: ModelConfig,
    objectives: ObjectivesConfig,
    kernels: Kernels,
    /// Trainable parameters: both encoders' online weights, `itm_head`, `temp`.
    params: ParamStore,
    online: Encoders,
    itm_head: Linear,
    temp: Var,
    momentum: Momentum,
    momentum_encoders: Encoders,
    queue: FeatureQueue,
}

impl Albef {
    /// Builds the model; parameters already in `params` (a loaded checkpoint) are used, missing ones are
    /// initialised from the seed. The momentum twin starts as a copy of the online weights.
    pub fn new(cfg: &Config, params: ParamStore) -> Result<Self> {
        let m = &cfg.model;
        let root = params.root();
        let online = Encoders::new(&root, m)?;
        let itm_head = Linear::new(&root.pp("itm_head"), m.text.hidden_size, 2)?;
        params.get("temp", (), Init::Const(m.temp))?;
        let temp = params.var("temp").expect("temp was just created");
        let momentum = Momentum::copy_of(&params, m.momentum)?;
        let momentum_encoders = Encoders::new(&momentum.store.root(), m)?;
        let queue = FeatureQueue::new(m.embed_dim, m.queue_size, cfg.seed, params.device())?;
        Ok(Albef {
            model_cfg: m.clone(),
            objectives: cfg.objectives.clone(),
            kernels: cfg.kernels,
            params,
            online,
            itm_head,
            temp,
            momentum,
            momentum_encoders,
            queue,
        })
    }

    /// A model with the state of a checkpoint: a `.safetensors` file of [`Albef::named_tensors`], or a
    /// checkpoint directory holding `model.safetensors`.
    pub fn from_checkpoint(cfg: &Config, path: &Path, device: &Device) -> anyhow::Result<Self> {
        let file = if path.is_dir() { path.join("model.safetensors") } else { path.to_path_buf() };
        let (tensors, saved) = super::state::read(&file, device)?;
        let mut model = Albef::new(cfg, ParamStore::new(cfg.seed, device))?;
        model.load_state(&file, &tensors, saved.as_ref())?;
        Ok(model)
    }

    /// Loads a checkpoint's tensors into this model: the architecture it was written for (when the file
    /// records it) must be the config's, every model tensor must be there with its shape, and a tensor
    /// the model has no place for (a layer the config does not have) is refused by name.
    pub fn load_state(
        &mut self, file: &Path, tensors: &HashMap<String, Tensor>, saved: Option<&ModelConfig>,
    ) -> anyhow::Result<()> {
        if let Some(saved) = saved {
            super::state::check_model(file, saved, &self.model_cfg)?;
        }
        let unused = self
            .load_named(tensors)
            .with_context(|| format!("checkpoint {} does not fit the config", file.display()))?;
        if !unused.is_empty() {
            let shown: Vec<&str> = unused.iter().take(6).map(String::as_str).collect();
            anyhow::bail!(
                "checkpoint {} holds {} tensors the config has no place for ({}{}): it was written for a \
                larger model; use the config it was trained with",
                file.display(),
                unused.len(),
                shown.join(", "),
                if unused.len() > shown.len() { ", ..." } else { "" }
            );
        }
        Ok(())
    }

    pub fn device(&self) -> &Device {
        self.params.device()
    }

    pub fn kernels(&self) -> Kernels {
        self.kernels
    }

    /// The trainable parameters (what the optimiser updates).
    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    /// The feature queue (for inspection; the forward maintains it).
    pub fn queue(&self) -> &FeatureQueue {
        &self.queue
    }

    /// Online image encoder: images [B, 3, H, W] -> (image_embeds [B, N, W], image_feat [B, embed_dim],
    /// the L2-normalised projection of `[CLS]`).
    pub fn image(&self, images: &Tensor, ctx: &Ctx) -> Result<(Tensor, Tensor)> {
        self.online.image(images, ctx)
    }

    /// Online text encoder in text mode: ids, mask [B, L] -> (text_embeds [B, L, H], text_feat [B, embed_dim]).
    pub fn text(&self, ids: &Tensor, mask: &Tensor, ctx: &Ctx) -> Result<(Tensor, Tensor)> {
        self.online.text(ids, mask, ctx)
    }

    /// The fusion layers' cross-attention keys and values of image_embeds [G, N, W], for scoring many
    /// texts against the same images with [`Albef::itm_logits`].
    pub fn image_kv(&self, image_embeds: &Tensor, ctx: &Ctx) -> Result<ImageKv> {
        self.online.text_encoder.bert.image_kv(image_embeds, ctx)
    }

    /// ITM logits [B, 2] (column 1: match) of text_embeds [B, L, H] with padding mask [B, L] against
    /// their images: the fusion encoder's `[CLS]` through `itm_head`, in f32 (the loss reads them). Training
    /// and re-ranking both score pairs here.
    pub fn itm_logits(&self, text_embeds: &Tensor, mask: &Tensor, image: ImageSide, ctx: &Ctx) -> Result<Tensor> {
        let cls = self.online.text_encoder.bert.fusion_cls(text_embeds, mask, image, ctx)?;
        self.itm_head.forward(&cls, ctx)?.to_dtype(DType::F32)
    }

    /// The online model's MLM logits [N, V] of (masked) ids [B, L] with padding mask [B, L] at `positions`
    /// (u32 \[N\], row-major into B x L), conditioned on image_embeds [B, N_img, W].
    pub fn mlm_logits_at(
        &self, ids: &Tensor, mask: &Tensor, image_embeds: &Tensor, positions: &Tensor, ctx: &Ctx,
    ) -> Result<Tensor> {
        self.online.text_encoder.mlm_logits_at(ids, mask, image_embeds, positions, ctx)
    }

    /// One EMA step of the momentum twin towards the online weights.
    pub fn update_momentum(&self) -> Result<()> {
        self.momentum.update()
    }

    /// Data parallel: every rank takes rank `root`'s parameters and momentum twin (as PyTorch's DDP does
    /// at start), so the ranks start identical even when their initialisation or loaded files differ.
    pub fn sync_from(&self, dist: &Dist, root: usize) -> anyhow::Result<()> {
        if dist.solo() {
            return Ok(());
        }
        for (_, var) in self.params.vars().into_iter().chain(self.momentum.store.vars()) {
            var.set(&dist.broadcast(var.as_tensor(), root)?)?;
        }
        Ok(())
    }

    /// Clamps the stored temp in place to [0.001, 0.5], on the device (so the gradient is taken at the
    /// clamped value and never zeroed by a clamp in the graph).
    pub fn clamp_temp(&self) -> Result<()> {
        self.temp.set(&self.temp.as_tensor().clamp(0.001f32, 0.5f32)?)
    }

    /// Writes a batch's momentum features into the ITC queue (after the ITC loss that read the queue).
    pub fn enqueue(&mut self, update: &QueueUpdate) -> Result<()> {
        self.queue.enqueue(&update.image_feat_m, &update.text_feat_m, &update.image_ids)
    }

    /// The pre-training forward of one micro-batch: ITC against momentum keys and the queue, ITM with
    /// negatives from `draws`, MLM with momentum distillation. `alpha` is this micro-batch's (ramped)
    /// distillation weight; `ctx` drives the online model, `ctx_m` the momentum model (dropout is on in
    /// both, as in ALBEF). Call [`Albef::update_momentum`] first and [`Albef::enqueue`] after.
    pub fn forward(
        &self, batch: &Inputs, alpha: f64, draws: &mut dyn Draws, ctx: &Ctx, ctx_m: &Ctx, dist: &Dist,
    ) -> anyhow::Result<Output> {
        let obj = self.objectives.clone();
        self.clamp_temp()?;
        let temp = self.temp.as_tensor().clone();
        let online = || -> Result<Online> {
            let (image_embeds, image_feat) = self.online.image(batch.images, ctx)?;
            let (text_embeds, text_feat) = self.online.text(batch.input_ids, batch.attention_mask, ctx)?;
            Ok(Online { image_embeds, image_feat, text_embeds, text_feat })
        };
        let teacher = || self.teacher(batch, alpha, ctx_m);
        // On the CPU the momentum encoders run beside the online ones, on a second compute thread.
        let (online, teacher) = crate::threads::overlap(self.device(), online, teacher);
        let (online, teacher) = (online?, teacher?);
        let (mut losses, mut metrics) = (Named::default(), Named::default());
        metrics.insert("temp", temp.copy()?);
        // Every rank's momentum features (and image ids), in rank order: the queue takes them all
        // (ALBEF's concat_all_gather), and global ITC keys are them.
        let gathered = match (obj.itc, teacher.feats()) {
            (true, Some((image_feat_m, text_feat_m))) => {
                Some(gather_keys(dist, image_feat_m, text_feat_m, batch.image_ids)?)
            }
            _ => None,
        };
        if let (Some(all), Some((image_feat_m, text_feat_m))) = (&gathered, teacher.feats()) {
            let keys = match obj.itc_keys {
                ItcKeys::Global => {
                    Keys { image: &all.image_feat_m, text: &all.text_feat_m, ids: &all.image_ids, offset: all.offset }
                }
                ItcKeys::Local => Keys { image: image_feat_m, text: text_feat_m, ids: batch.image_ids, offset: 0 },
            };
            let loss = itc::itc(
                &online.image_feat,
                &online.text_feat,
                image_feat_m,
                text_feat_m,
                &keys,
                &self.queue.keys(),
                &temp,
                alpha,
                obj.itc_multi_positive,
                self.kernels,
            )?;
            losses.insert("itc", loss);
        }
        if obj.itm {
            let (loss, accuracy, same_caption) = self.itm(batch, &online, &teacher, &temp, draws, ctx)?;
            losses.insert("itm", loss);
            metrics.insert("itm_acc", accuracy);
            metrics.insert("itm_same_caption", Tensor::new(same_caption as f32, self.device())?);
        }
        if obj.mlm {
            let image_embeds_m = teacher.image.as_ref().map(|(embeds, _)| embeds).filter(|_| alpha > 0.0);
            // A micro-batch without a masked token adds zero, and still names the loss: every data-parallel
            // rank must report the same losses (the log's mean over micro-batches is unchanged).
            let loss = self.mlm(batch, &online.image_embeds, image_embeds_m, alpha, draws, ctx, ctx_m)?;
            losses.insert("mlm", loss.map_or_else(|| Tensor::zeros((), DType::F32, self.device()), Ok)?);
        }
        Ok(Output { losses, metrics, queue_update: gathered, cuts: ctx.take_cuts() })
    }

    /// The momentum encoders on the batch: features for ITC and hard negatives, image tokens for MLM
    /// distillation.
    fn teacher(&self, batch: &Inputs, alpha: f64, ctx_m: &Ctx) -> Result<Teacher> {
        let obj = &self.objectives;
        let need_feat = obj.itc || (obj.itm && obj.itm_negatives == Negatives::Hard);
        let need_image = need_feat || (obj.mlm && alpha > 0.0);
        let image = if need_image { Some(self.momentum_encoders.image(batch.images, ctx_m)?) } else { None };
        let text_feat = if need_feat {
            Some(self.momentum_encoders.text(batch.input_ids, batch.attention_mask, ctx_m)?.1)
        } else {
            None
        };
        Ok(Teacher { image, text_feat })
    }

    /// ITM loss, accuracy and the number of same-caption pairs kept out of the negatives: negatives drawn
    /// from the in-batch similarities (online queries against momentum keys, / temp), the 3B pairs scored
    /// by [`Albef::itm_logits`].
    fn itm(
        &self, batch: &Inputs, online: &Online, teacher: &Teacher, temp: &Tensor, draws: &mut dyn Draws, ctx: &Ctx,
    ) -> anyhow::Result<(Tensor, Tensor, usize)> {
        let b = batch.image_ids.len();
        let (sim_i2t, sim_t2i) = match teacher.feats() {
            Some((image_feat_m, text_feat_m)) => {
                itm::similarities(&online.image_feat, &online.text_feat, image_feat_m, text_feat_m, temp)?
            }
            None => {
                (Tensor::zeros((b, b), DType::F32, self.device())?, Tensor::zeros((b, b), DType::F32, self.device())?)
            }
        };
        let neg = draws.negatives(&sim_i2t, &sim_t2i, batch.image_ids, batch.caption_groups)?;
        let pairs = itm::pairs(&online.text_embeds, batch.attention_mask, &online.image_embeds, &neg)?;
        let logits = self.itm_logits(&pairs.text_embeds, &pairs.mask, ImageSide::Tokens(&pairs.image_embeds), ctx)?;
        let (loss, accuracy) = itm::loss(&logits, &pairs.labels)?;
        Ok((loss, accuracy, neg.same_caption))
    }

    /// MLM loss of the masked captions conditioned on the image, distilled from the momentum model's
    /// logits when `image_embeds_m` is given.
    #[allow(clippy::too_many_arguments)]
    fn mlm(
        &self, batch: &Inputs, image_embeds: &Tensor, image_embeds_m: Option<&Tensor>, alpha: f64,
        draws: &mut dyn Draws, ctx: &Ctx, ctx_m: &Ctx,
    ) -> anyhow::Result<Option<Tensor>> {
        let (ids, mask) = (batch.input_ids, batch.attention_mask);
        let masked = draws.mlm_mask(batch.token_ids);
        let Some((positions, targets)) = mlm::masked_positions(&masked.labels) else { return Ok(None) };
        let positions = Tensor::from_vec(positions, targets.len(), ids.device())?;
        let masked_ids = Tensor::from_vec(masked.ids, ids.shape(), ids.device())?;
        let logits = self.mlm_logits_at(&masked_ids, mask, image_embeds, &positions, ctx)?;
        let logits_m = image_embeds_m
            .map(|embeds_m| {
                self.momentum_encoders.text_encoder.mlm_logits_at(&masked_ids, mask, embeds_m, &positions, ctx_m)
            })
            .transpose()?;
        Ok(Some(mlm::mlm_loss(&logits, logits_m.as_ref(), &targets, alpha, ctx.kernels)?))
    }

    /// Every tensor of the model state under ALBEF's checkpoint names: online parameters, the `_m`
    /// twins, `image_queue`, `text_queue` [embed_dim, Q], `queue_ptr` and `idx_queue` (int64).
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out: Vec<(String, Tensor)> =
            self.params.vars().into_iter().map(|(n, v)| (n, v.as_tensor().detach())).collect();
        for (name, var) in self.momentum.store.vars() {
            let ckpt = super::momentum::checkpoint_name(&name).expect("momentum parameters have twins");
            out.push((ckpt, var.as_tensor().detach()));
        }
        let dev = self.device();
        out.push(("image_queue".into(), self.queue.image_queue.clone()));
        out.push(("text_queue".into(), self.queue.text_queue.clone()));
        out.push(("queue_ptr".into(), Tensor::new(&[self.queue.ptr as i64], dev)?));
        out.push(("idx_queue".into(), Tensor::new(self.queue.idx_queue.as_slice(), dev)?.unsqueeze(0)?));
        Ok(out)
    }

    /// Loads a state written by [`Albef::named_tensors`] (or an import). Every model tensor must be
    /// present with the right shape; returns the names of file tensors the model does not use.
    pub fn load_named(&mut self, tensors: &HashMap<String, Tensor>) -> anyhow::Result<Vec<String>> {
        let mut used = std::collections::HashSet::new();
        let mut take = |name: &str| -> anyhow::Result<Tensor> {
            used.insert(name.to_string());
            tensors.get(name).cloned().with_context(|| format!("tensor `{name}` is missing"))
        };
        let check = |name: &str, t: &Tensor, want: &Tensor| -> anyhow::Result<()> {
            if t.dims() != want.dims() {
                anyhow::bail!("tensor `{name}` has shape {:?}, the model expects {:?}", t.dims(), want.dims());
            }
            Ok(())
        };
        for (name, var) in self.params.vars() {
            let t = take(&name)?;
            check(&name, &t, var.as_tensor())?;
            self.params.insert(&name, &t)?;
        }
        for (name, var) in self.momentum.store.vars() {
            let ckpt = super::momentum::checkpoint_name(&name).expect("momentum parameters have twins");
            let t = take(&ckpt)?;
            check(&ckpt, &t, var.as_tensor())?;
            self.momentum.store.insert(&name, &t)?;
        }
        for (name, slot) in [("image_queue", &mut self.queue.image_queue), ("text_queue", &mut self.queue.text_queue)] {
            let t = take(name)?;
            check(name, &t, slot)?;
            *slot = t.to_dtype(DType::F32)?.to_device(self.params.device())?;
        }
        let q = self.queue.size();
        let ptr = take("queue_ptr")?.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        match ptr.as_slice() {
            [p] if (0..q as i64).contains(p) => self.queue.ptr = *p as usize,
            _ => anyhow::bail!("tensor `queue_ptr` must hold one index in [0, {q}), got {ptr:?}"),
        }
        // ALBEF pre-training checkpoints have no idx_queue; keep the "never written" marks then.
        if tensors.contains_key("idx_queue") {
            let idx = take("idx_queue")?.flatten_all()?.to_dtype(DType::I64)?.to_vec1::<i64>()?;
            if idx.len() != q {
                anyhow::bail!("tensor `idx_queue` has {} entries, the queue holds {q}", idx.len());
            }
            self.queue.idx_queue = idx;
        }
        let mut unused: Vec<String> = tensors.keys().filter(|k| !used.contains(*k)).cloned().collect();
        unused.sort();
        Ok(unused)
    }
}
