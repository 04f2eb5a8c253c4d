//! AdamW with weight-decay groups, gradient accumulation and global-norm clipping. candle-nn's AdamW has
//! no parameter groups or clipping, and its moments cannot be saved for an exact resume.

use crate::config::TrainConfig;
use crate::dist::Dist;
use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use std::collections::HashMap;

/// Gradient elements per all-reduce: 25 MiB of f32, PyTorch DDP's default bucket.
const BUCKET: usize = 25 << 18;

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// Multiplies the learning rate (see [`lr_scale`]).
    lr_scale: f64,
    m: Tensor,
    v: Tensor,
    /// Gradient summed over the micro-batches of the current optimiser step.
    acc: Option<Tensor>,
}

pub struct AdamW {
    slots: Vec<Slot>,
    /// Optimiser steps taken (bias correction uses it).
    pub steps: usize,
    micro: usize,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
}

/// Decay applies to weight matrices and embeddings (>= 2 dims, pos_embed and cls_token included, as in
/// ALBEF); biases, LayerNorm, layer-scale gammas and the 0-D `temp` are not decayed (ALBEF's rule decays
/// temp, a quirk we do not copy).
pub fn decays(var: &Var) -> bool {
    var.rank() >= 2
}

/// `train.head_lr_scale` for the parts a fine-tune from unimodal encoders starts from scratch (the ITC
/// projections, the ITM head, the fusion layers' cross-attention), 1 for the rest.
pub fn lr_scale(name: &str, cfg: &TrainConfig) -> f64 {
    let fresh = ["vision_proj.", "text_proj.", "itm_head."].iter().any(|p| name.starts_with(p))
        || name.contains(".crossattention.");
    if fresh {
        cfg.head_lr_scale
    } else {
        1.0
    }
}

impl AdamW {
    /// One slot per parameter, in name order (the store is sorted).
    pub fn new(params: Vec<(String, Var)>, cfg: &TrainConfig) -> Result<Self> {
        let slots = params
            .into_iter()
            .map(|(name, var)| {
                // Separate storage each: the update writes the moments in place.
                let (m, v) = (var.as_tensor().zeros_like()?, var.as_tensor().zeros_like()?);
                Ok(Slot { decay: decays(&var), lr_scale: lr_scale(&name, cfg), name, var, m, v, acc: None })
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(AdamW {
            slots,
            steps: 0,
            micro: 0,
            beta1: cfg.betas[0],
            beta2: cfg.betas[1],
            eps: cfg.eps,
            weight_decay: cfg.weight_decay,
        })
    }

    /// Adds one micro-batch's gradients. A parameter the loss did not reach contributes zero.
    pub fn accumulate(&mut self, grads: &GradStore) -> Result<()> {
        for s in &mut self.slots {
            if let Some(g) = grads.get(s.var.as_tensor()) {
                s.acc = Some(match s.acc.take() {
                    Some(a) => (a + g)?,
                    None => g.clone(),
                });
            }
        }
        self.micro += 1;
        Ok(())
    }

    /// Data parallel: sums the accumulated gradients over the ranks, in buckets of at most
    /// `BUCKET` elements (few large transfers instead of one per parameter, as PyTorch's DDP), so
    /// the step averages every rank's micro-batches and all ranks apply the same update.
    pub fn all_reduce(&mut self, dist: &Dist) -> Result<()> {
        if dist.solo() {
            return Ok(());
        }
        let mut start = 0;
        while start < self.slots.len() {
            let (mut end, mut len) = (start, 0);
            while end < self.slots.len() && (end == start || len + self.slots[end].var.elem_count() <= BUCKET) {
                len += self.slots[end].var.elem_count();
                end += 1;
            }
            let parts = self.slots[start..end]
                .iter()
                .map(|s| match &s.acc {
                    Some(a) => a.flatten_all(),
                    None => s.var.as_tensor().zeros_like()?.flatten_all(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let summed = dist.all_reduce_sum(&Tensor::cat(&parts, 0)?)?;
            let mut at = 0;
            for s in &mut self.slots[start..end] {
                let n = s.var.elem_count();
                s.acc = Some(summed.narrow(0, at, n)?.reshape(s.var.shape())?);
                at += n;
            }
            start = end;
        }
        // The sums now cover every rank's micro-batches: the average divides by all of them.
        self.micro *= dist.world();
        Ok(())
    }

    /// Drops the accumulated gradients (a skipped step).
    pub fn discard(&mut self) {
        self.slots.iter_mut().for_each(|s| s.acc = None);
        self.micro = 0;
    }

    /// [`AdamW::norm_squared`], read, then [`AdamW::apply`] when the norm is finite; otherwise the
    /// gradients are dropped and no parameter or moment changes. Returns the norm before clipping.
    pub fn step(&mut self, lr: f64, max_norm: f64) -> Result<f64> {
        let norm = crate::readback::read(&self.norm_squared()?)?[0].sqrt();
        match norm.is_finite() {
            true => self.apply(lr, max_norm, norm)?,
            false => self.discard(),
        }
        Ok(norm)
    }

    /// Averages the accumulated gradients over the micro-batches and returns the squared global norm as a
    /// scalar f64 tensor, still on the device (the caller reads it with whatever else it reads).
    pub fn norm_squared(&mut self) -> Result<Tensor> {
        if self.micro == 0 {
            bail!("optimizer step without accumulated gradients");
        }
        // The sums stay as accumulated; the average's 1/micro joins the update's gradient scale.
        let inv = 1.0 / self.micro as f64;
        let accs: Vec<&Tensor> = self.slots.iter().filter_map(|s| s.acc.as_ref()).collect();
        let device = self.slots.first().map_or(candle_core::Device::Cpu, |s| s.var.device().clone());
        Ok((crate::ops::sum_squares(&accs, &device)? * (inv * inv))?)
    }

    /// Averages the accumulated gradients, clips them to `max_norm` (0 = off) given their finite global
    /// `norm`, and applies one AdamW update at `lr` (both scales enter the in-place update as one factor).
    pub fn apply(&mut self, lr: f64, max_norm: f64, norm: f64) -> Result<()> {
        if self.micro == 0 {
            bail!("optimizer step without accumulated gradients");
        }
        let clip = if max_norm > 0.0 && norm > max_norm { max_norm / (norm + 1e-6) } else { 1.0 };
        self.steps += 1;
        let t = self.steps as i32;
        let (bc1, bc2) = (1.0 - self.beta1.powi(t), 1.0 - self.beta2.powi(t));
        let updates: Vec<_> = self
            .slots
            .iter_mut()
            .filter_map(|s| {
                let g = s.acc.take()?;
                let lr = lr * s.lr_scale;
                let decay = if s.decay && self.weight_decay > 0.0 { 1.0 - lr * self.weight_decay } else { 1.0 };
                let step = crate::ops::AdamWStep {
                    beta1: self.beta1 as f32,
                    beta2: self.beta2 as f32,
                    eps: self.eps as f32,
                    lr: lr as f32,
                    decay: decay as f32,
                    bc1: bc1 as f32,
                    bc2: bc2 as f32,
                    scale: (clip / self.micro as f64) as f32,
                };
                Some(crate::ops::AdamWUpdate { p: s.var.as_tensor(), m: &s.m, v: &s.v, g, step })
            })
            .collect();
        crate::ops::adamw_step_all(&updates)?;
        self.micro = 0;
        Ok(())
    }

    /// Moments as named tensors (`m.<param>`, `v.<param>`) for the checkpoint.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.slots
            .iter()
            .flat_map(|s| [(format!("m.{}", s.name), s.m.clone()), (format!("v.{}", s.name), s.v.clone())])
            .collect()
    }

    /// Restores moments written by [`AdamW::state_tensors`] and the step count.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: usize) -> Result<()> {
        for s in &mut self.slots {
            for (key, slot) in [(format!("m.{}", s.name), &mut s.m), (format!("v.{}", s.name), &mut s.v)] {
                let t = tensors.get(&key).with_context(|| format!("optimizer state lacks `{key}`"))?;
                if t.dims() != slot.dims() {
                    bail!("optimizer state `{key}` has shape {:?}, the parameter {:?}", t.dims(), slot.dims());
                }
                // A copy of its own: the update writes the moments in place.
                *slot = t.to_device(slot.device())?.to_dtype(slot.dtype())?.copy()?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One step against the PyTorch AdamW formula worked by hand.
    #[test]
    fn matches_the_adamw_formula_with_decay_groups() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[[1.0f32, -2.0]], &dev)?;
        let b = Var::new(&[0.5f32], &dev)?;
        let cfg = TrainConfig { weight_decay: 0.1, ..TrainConfig::default() };
        let mut opt = AdamW::new(vec![("b".into(), b.clone()), ("w".into(), w.clone())], &cfg)?;
        // loss = 3*w0 + 4*w1 + 2*b, two micro-batches of the same gradient.
        for _ in 0..2 {
            let loss = (w.as_tensor().matmul(&Tensor::new(&[[3f32], [4.]], &dev)?)?.sum_all()?
                + (b.as_tensor() * 2.0)?.sum_all()?)?;
            opt.accumulate(&loss.backward()?)?;
        }
        let norm = opt.step(0.01, 0.0)?;
        assert!((norm - (9.0f64 + 16.0 + 4.0).sqrt()).abs() < 1e-5);
        // First step: m_hat = g, v_hat = g^2, update = g / (|g| + eps) ~= sign(g).
        let w_new: Vec<f32> = w.as_tensor().flatten_all()?.to_vec1()?;
        let expect = |p: f64, decay: f64| (p * (1.0 - 0.01 * decay) - 0.01) as f32;
        assert!((w_new[0] - expect(1.0, 0.1)).abs() < 1e-6, "{w_new:?}");
        assert!((w_new[1] - expect(-2.0, 0.1)).abs() < 1e-6);
        let b_new: Vec<f32> = b.as_tensor().to_vec1()?;
        assert!((b_new[0] - expect(0.5, 0.0)).abs() < 1e-6, "bias must not decay");
        Ok(())
    }

    /// An infinite gradient behind a finite loss is reported by the norm and never applied.
    #[test]
    fn non_finite_gradients_are_not_applied() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[[1.0f32, 0.0]], &dev)?;
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], &TrainConfig::default())?;
        let loss = w.as_tensor().sqrt()?.sum_all()?; // 1, with d sqrt(x)/dx = inf at 0
        assert_eq!(loss.to_scalar::<f32>()?, 1.0);
        opt.accumulate(&loss.backward()?)?;
        assert!(!opt.step(0.01, 1.0)?.is_finite());
        assert_eq!(w.as_tensor().to_vec2::<f32>()?, [[1.0, 0.0]]);
        let m: Vec<f32> = opt.state_tensors()[0].1.flatten_all()?.to_vec1()?;
        assert_eq!(m, [0.0, 0.0], "moments untouched");
        assert!(opt.step(0.01, 1.0).is_err(), "the gradients were dropped");
        Ok(())
    }

    /// The fresh heads move `head_lr_scale` times as far as the encoders on the same gradient.
    #[test]
    fn head_lr_scale_applies_to_projections_heads_and_cross_attention_only() -> Result<()> {
        let dev = Device::Cpu;
        let names = [
            "text_proj.weight",
            "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
            "text_encoder.bert.encoder.layer.3.attention.self.key.weight",
        ];
        let vars: Vec<Var> = names.iter().map(|_| Var::new(&[[0f32]], &dev)).collect::<candle_core::Result<_>>()?;
        let cfg = TrainConfig { head_lr_scale: 10.0, weight_decay: 0.0, ..TrainConfig::default() };
        let mut opt = AdamW::new(names.iter().map(|n| n.to_string()).zip(vars.iter().cloned()).collect(), &cfg)?;
        let loss = vars.iter().map(|v| v.as_tensor().sum_all()).collect::<candle_core::Result<Vec<_>>>()?;
        opt.accumulate(&Tensor::stack(&loss, 0)?.sum_all()?.backward()?)?;
        opt.step(0.01, 0.0)?;
        let moved: Vec<f32> = vars
            .iter()
            .map(|v| v.as_tensor().flatten_all()?.to_vec1::<f32>().map(|x| -x[0]))
            .collect::<candle_core::Result<_>>()?;
        assert!(
            (moved[0] - 0.1).abs() < 1e-6 && (moved[1] - 0.1).abs() < 1e-6 && (moved[2] - 0.01).abs() < 1e-6,
            "{moved:?}"
        );
        Ok(())
    }

    #[test]
    fn clipping_scales_the_gradient_to_the_max_norm() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::new(&[[0f32, 0.]], &dev)?;
        let mut opt = AdamW::new(vec![("w".into(), w.clone())], &TrainConfig::default())?;
        let loss = w.as_tensor().matmul(&Tensor::new(&[[30f32], [40.]], &dev)?)?.sum_all()?;
        opt.accumulate(&loss.backward()?)?;
        assert!((opt.step(1.0, 5.0)? - 50.0).abs() < 1e-4);
        // The first moment holds (1 - beta1) * clipped gradient = 0.1 * (3, 4).
        let m: Vec<f32> = opt.state_tensors()[0].1.flatten_all()?.to_vec1()?;
        assert!((m[0] - 0.3).abs() < 1e-5 && (m[1] - 0.4).abs() < 1e-5, "{m:?}");
        Ok(())
    }
}
