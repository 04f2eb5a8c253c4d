//! Custom ops with one entry point each and two implementations: `Kernels::Reference` composes plain
//! candle ops (every one with a backward), `Kernels::Fused` runs a fused custom op (CPU loop or CUDA
//! kernel) with its own backward. Models call only these functions, so the switch is one config key.

use crate::config::Kernels;
use candle_core::{DType, Result, Tensor, D};

/// `softmax(scores * scale + mask)` over the last dimension, for attention.
///
/// `scores`: [B, H, Lq, Lk]; `mask`: additive, broadcastable to `scores` (typically [B, 1, 1, Lk] with 0
/// for keys to attend and a large negative number for padding). The mask gets no gradient.
pub fn attention_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>, kernels: Kernels) -> Result<Tensor> {
    match kernels {
        Kernels::Reference | Kernels::Fused => {
            let mut x = (scores * scale)?;
            if let Some(m) = mask {
                x = x.broadcast_add(m)?;
            }
            candle_nn::ops::softmax(&x, D::Minus1)
        }
    }
}

/// Which entries of an ITC row are positives.
pub enum Positives<'a> {
    /// Row i's positive is column i (the paired caption / image of the batch).
    Diagonal,
    /// A [B, N] 0/1 f32 mask (same image id = positive); targets are `mask / mask.sum(1)`.
    Mask(&'a Tensor),
}

/// One direction of the ITC loss with momentum-distilled soft targets (REFERENCE.md "Losses: ITC"):
/// `s = sim / temp`, `t = alpha * softmax(sim_m / temp) + (1 - alpha) * positives`,
/// `loss = -mean_i sum_j t_ij * log_softmax(s)_ij`.
///
/// `sim`: [B, N] cosine similarities of online queries against momentum keys (batch then queue), with
/// gradient; `sim_m`: [B, N] the momentum queries' similarities (no gradient); `temp`: a one-element
/// tensor with gradient. No gradient flows through the targets.
pub fn itc_loss(sim: &Tensor, sim_m: &Tensor, temp: &Tensor, alpha: f64, positives: Positives,
    kernels: Kernels) -> Result<Tensor> {
    match kernels {
        Kernels::Reference | Kernels::Fused => itc_loss_reference(sim, sim_m, temp, alpha, positives),
    }
}

fn itc_loss_reference(sim: &Tensor, sim_m: &Tensor, temp: &Tensor, alpha: f64, positives: Positives) -> Result<Tensor> {
    let (b, n) = sim.dims2()?;
    let temp = temp.reshape(())?;
    let pos = match positives {
        Positives::Diagonal => {
            let eye: Vec<f32> = (0..b * n).map(|k| if k / n == k % n { 1.0 } else { 0.0 }).collect();
            Tensor::from_vec(eye, (b, n), sim.device())?.to_dtype(sim.dtype())?
        }
        Positives::Mask(m) => m.broadcast_div(&m.sum_keepdim(1)?)?,
    };
    let targets = if alpha > 0.0 {
        let soft = candle_nn::ops::softmax(&sim_m.broadcast_div(&temp.detach())?, D::Minus1)?;
        ((soft * alpha)? + (pos * (1.0 - alpha))?)?.detach()
    } else {
        pos
    };
    let logp = candle_nn::ops::log_softmax(&sim.broadcast_div(&temp)?, D::Minus1)?;
    let per_row = (logp * targets)?.sum(1)?;
    per_row.mean(0)?.neg()?.to_dtype(DType::F32)
}
