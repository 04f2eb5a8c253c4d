//! The whole ALBEF model and one pre-training step: encoders (online and momentum twin), projections,
//! `temp`, `itm_head`, the feature queue, and the forward that returns ITC + ITM + MLM.

use super::bert::{ImageKv, TextEncoder};
use super::layers::{Ctx, Linear};
use super::momentum::Momentum;
use super::params::{Init, Pb, ParamStore};
use super::queue::FeatureQueue;
use super::vit::Vit;
use crate::config::{Config, ModelConfig, Negatives, ObjectivesConfig};
use crate::objectives::{itc, itm, mlm};
use candle_core::{DType, Device, Result, Tensor, Var, D};
use std::collections::HashMap;
use rand_chacha::ChaCha8Rng;

/// The modules that exist twice (online and momentum): one definition, two parameter sets.
pub struct Encoders {
    pub visual_encoder: Vit,
    pub text_encoder: TextEncoder,
    pub vision_proj: Linear,
    pub text_proj: Linear,
}

impl Encoders {
    pub fn new(pb: &Pb, cfg: &ModelConfig) -> Result<Self> {
        let (vw, th) = (cfg.vision.vision_width, cfg.text.hidden_size);
        Ok(Encoders {
            visual_encoder: Vit::new(&pb.pp("visual_encoder"), &cfg.vision)?,
            text_encoder: TextEncoder::new(&pb.pp("text_encoder"), &cfg.text, vw)?,
            vision_proj: Linear::new(&pb.pp("vision_proj"), vw, cfg.embed_dim)?,
            text_proj: Linear::new(&pb.pp("text_proj"), th, cfg.embed_dim)?,
        })
    }

    /// images -> (image_embeds [B, N, W], image_feat [B, embed_dim] L2-normalised projection of [CLS]).
    pub fn image(&self, images: &Tensor, ctx: &Ctx) -> Result<(Tensor, Tensor)> {
        let embeds = self.visual_encoder.forward(images, ctx)?;
        let feat = normalize(&self.vision_proj.forward(&cls(&embeds)?)?)?;
        Ok((embeds, feat))
    }

    /// Text mode -> (text_embeds [B, L, H], text_feat [B, embed_dim]).
    pub fn text(&self, ids: &Tensor, mask: &Tensor, ctx: &Ctx) -> Result<(Tensor, Tensor)> {
        let embeds = self.text_encoder.bert.forward_text(ids, mask, ctx)?;
        let feat = normalize(&self.text_proj.forward(&cls(&embeds)?)?)?;
        Ok((embeds, feat))
    }

    /// Fusion-mode [CLS] [B, H] of text tokens cross-attending to image tokens (input of `itm_head`).
    pub fn fusion_cls(&self, text_embeds: &Tensor, mask: &Tensor, image_embeds: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.text_encoder.bert.fusion_cls(text_embeds, mask, image_embeds, ctx)
    }

    /// [`Encoders::fusion_cls`] on precomputed image keys/values ([`ImageKv`] of G images):
    /// texts g*n..(g+1)*n of the B = G*n texts attend to image g.
    pub fn fusion_cls_kv(&self, text_embeds: &Tensor, mask: &Tensor, image_kv: &ImageKv, ctx: &Ctx) -> Result<Tensor> {
        self.text_encoder.bert.fusion_cls_kv(text_embeds, mask, image_kv, ctx)
    }
}

/// The [CLS] token of [B, L, D] -> [B, D].
fn cls(x: &Tensor) -> Result<Tensor> {
    x.narrow(1, 0, 1)?.squeeze(1)
}

/// F.normalize: x / max(||x||, 1e-12) over the last dimension.
pub fn normalize(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.maximum(1e-12)?)
}

/// One batch of the training step.
pub struct StepBatch<'a> {
    pub images: &'a Tensor,
    pub input_ids: &'a Tensor,
    pub attention_mask: &'a Tensor,
    pub image_ids: &'a [i64],
}

/// The step's random choices, made injectable so a golden test can supply the reference's draws.
pub trait Draws {
    fn negatives(&mut self, sim_i2t: &[f32], sim_t2i: &[f32], ids: &[i64]) -> anyhow::Result<itm::ItmNegatives>;
    fn mlm_mask(&mut self, ids: &[u32]) -> mlm::MaskedTokens;
}

/// Draws from one seeded stream per step: negatives first, then the MLM mask (the reference's order).
pub struct SeededDraws {
    pub rng: ChaCha8Rng,
    pub negatives: Negatives,
    pub special: mlm::SpecialTokens,
    pub mlm_probability: f64,
}

impl Draws for SeededDraws {
    fn negatives(&mut self, sim_i2t: &[f32], sim_t2i: &[f32], ids: &[i64]) -> anyhow::Result<itm::ItmNegatives> {
        itm::sample_negatives(sim_i2t, sim_t2i, ids, self.negatives, &mut self.rng)
    }

    fn mlm_mask(&mut self, ids: &[u32]) -> mlm::MaskedTokens {
        mlm::mask_tokens(ids, self.special, self.mlm_probability, &mut self.rng)
    }
}

/// Losses and the numbers a log wants. Absent losses are objectives switched off (or, for MLM, a batch
/// in which nothing was masked).
pub struct StepOutput {
    pub loss: Tensor,
    pub itc: Option<Tensor>,
    pub itm: Option<Tensor>,
    pub mlm: Option<Tensor>,
    pub itm_accuracy: Option<f64>,
    pub temp: f64,
    pub alpha: f64,
    /// Seconds spent in the EMA update (the benchmark reports it apart from the forward).
    pub ema_s: f64,
}

pub struct Albef {
    pub model_cfg: ModelConfig,
    pub objectives: ObjectivesConfig,
    pub kernels: crate::config::Kernels,
    /// Trainable parameters: both encoders' online weights, `itm_head`, `temp`.
    pub params: ParamStore,
    pub online: Encoders,
    pub itm_head: Linear,
    pub temp: Var,
    pub momentum: Momentum,
    pub momentum_encoders: Encoders,
    pub queue: FeatureQueue,
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
    pub fn from_checkpoint(cfg: &Config, path: &std::path::Path, device: &Device) -> anyhow::Result<Self> {
        use anyhow::Context;
        let file = if path.is_dir() { path.join("model.safetensors") } else { path.to_path_buf() };
        let tensors = candle_core::safetensors::load(&file, device)
            .with_context(|| format!("cannot read checkpoint {}", file.display()))?;
        let mut model = Albef::new(cfg, ParamStore::new(cfg.seed, device))?;
        model.load_named(&tensors).with_context(|| format!("checkpoint {} does not fit the config", file.display()))?;
        Ok(model)
    }

    pub fn device(&self) -> &Device {
        self.params.device()
    }

    /// Clamps the stored temp in place to [0.001, 0.5] (so the gradient is taken at the clamped value and
    /// never zeroed by a clamp in the graph) and returns it.
    pub fn clamp_temp(&self) -> Result<f64> {
        self.temp.set(&self.temp.as_tensor().clamp(0.001f32, 0.5f32)?)?;
        Ok(self.temp.as_tensor().to_dtype(DType::F32)?.to_scalar::<f32>()? as f64)
    }

    /// One pre-training step's forward: ITC against momentum keys and the queue (then enqueue), ITM with
    /// negatives from `draws`, MLM with momentum distillation. `alpha` is this step's (ramped) weight;
    /// `ctx` drives the online model, `ctx_m` the momentum model (dropout is on in both, as in ALBEF).
    pub fn step(&mut self, batch: &StepBatch, alpha: f64, draws: &mut dyn Draws, ctx: &Ctx, ctx_m: &Ctx)
        -> anyhow::Result<StepOutput> {
        let obj = self.objectives.clone();
        let temp_value = self.clamp_temp()?;
        let temp = self.temp.as_tensor().clone();
        let (images, ids, mask) = (batch.images, batch.input_ids, batch.attention_mask);
        let b = images.dim(0)?;
        let (image_embeds, image_feat) = self.online.image(images, ctx)?;
        let (text_embeds, text_feat) = self.online.text(ids, mask, ctx)?;

        // The EMA update comes before any momentum forward.
        let ema_start = std::time::Instant::now();
        self.momentum.update()?;
        let ema_s = ema_start.elapsed().as_secs_f64();
        let hard = obj.itm && obj.itm_negatives == Negatives::Hard;
        let need_feat_m = obj.itc || hard;
        let need_image_m = need_feat_m || (obj.mlm && alpha > 0.0);
        let image_m = if need_image_m { Some(self.momentum_encoders.image(images, ctx_m)?) } else { None };
        let text_feat_m = if need_feat_m { Some(self.momentum_encoders.text(ids, mask, ctx_m)?.1) } else { None };

        let mut total: Option<Tensor> = None;
        let mut add = |l: &Tensor| -> Result<()> {
            total = Some(match total.take() {
                Some(t) => (t + l)?,
                None => l.clone(),
            });
            Ok(())
        };

        let itc_loss = match (&image_m, &text_feat_m) {
            (Some((_, image_feat_m)), Some(text_feat_m)) if obj.itc => {
                let ids_for_pos = obj.itc_multi_positive.then_some(batch.image_ids);
                let out = itc::itc(&image_feat, &text_feat, image_feat_m, text_feat_m, &self.queue, &temp, alpha,
                    ids_for_pos, self.kernels)?;
                add(&out.loss)?;
                Some(out.loss)
            }
            _ => None,
        };

        let (itm_loss, itm_accuracy) = if obj.itm {
            // Hard negatives come from the ITC logits of the batch: online queries vs momentum keys / temp.
            let (sim_i2t, sim_t2i) = match (&image_m, &text_feat_m) {
                (Some((_, image_feat_m)), Some(text_feat_m)) => {
                    let s = |q: &Tensor, k: &Tensor| -> Result<Vec<f32>> {
                        (q.detach().matmul(&k.t()?)? / temp_value)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
                    };
                    (s(&image_feat, text_feat_m)?, s(&text_feat, image_feat_m)?)
                }
                _ => (vec![0.0; b * b], vec![0.0; b * b]),
            };
            let neg = draws.negatives(&sim_i2t, &sim_t2i, batch.image_ids)?;
            let out = itm::itm(&self.online.text_encoder.bert, &self.itm_head, &text_embeds, mask, &image_embeds, &neg, ctx)?;
            add(&out.loss)?;
            (Some(out.loss), Some(out.accuracy))
        } else {
            (None, None)
        };

        let mlm_loss = if obj.mlm {
            let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
            let masked = draws.mlm_mask(&flat);
            let masked_ids = Tensor::from_vec(masked.ids.clone(), ids.shape(), ids.device())?;
            let logits = self.online.text_encoder.mlm_logits(&masked_ids, mask, &image_embeds, ctx)?;
            let logits_m = match &image_m {
                Some((image_embeds_m, _)) if alpha > 0.0 => {
                    Some(self.momentum_encoders.text_encoder.mlm_logits(&masked_ids, mask, image_embeds_m, ctx_m)?)
                }
                _ => None,
            };
            let loss = mlm::mlm_loss(&logits, logits_m.as_ref(), &masked.labels, alpha)?;
            if let Some(l) = &loss {
                add(l)?;
            }
            loss
        } else {
            None
        };

        // Enqueue after the ITC loss, with the momentum features of this batch.
        if let (Some((_, image_feat_m)), Some(text_feat_m)) = (&image_m, &text_feat_m) {
            if obj.itc {
                self.queue.enqueue(image_feat_m, text_feat_m, batch.image_ids)?;
            }
        }

        let loss = match total {
            Some(t) => t,
            None => Tensor::zeros((), DType::F32, self.device())?,
        };
        Ok(StepOutput { loss, itc: itc_loss, itm: itm_loss, mlm: mlm_loss, itm_accuracy, temp: temp_value, alpha, ema_s })
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
        use anyhow::Context;
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
