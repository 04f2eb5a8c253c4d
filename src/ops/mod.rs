//! Custom ops with one entry point each and two implementations: `Kernels::Reference` composes plain
//! candle ops (every one with a backward), `Kernels::Fused` runs a fused custom op (CPU loop or CUDA
//! kernel, kernels/*.cu) with its own backward. Models call only these functions, so the switch is one
//! config key. `bench_ops` times one against the other and reports how far apart they are.
//!
//! Fused computes in f32 whatever the storage: f32 and (on CUDA) bf16 tensors are read in place, other
//! float dtypes go through an f32 copy; f64 keeps the Reference composition, which is exact in f64.

mod adamw;
mod attention;
mod bench;
mod bias;
mod constant;
mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod dropout;
mod gelu;
mod heads;
mod itc;
mod layernorm;
mod linear;
mod multi_tensor;
mod saved;
mod softmax;

pub use adamw::AdamWStep;
pub use attention::AttnDropout;
pub use bench::{bench_ops, BenchReport, CopyBench, OpBench, OutputError};
pub use multi_tensor::{adamw_step_all, ema_all, sum_squares, AdamWUpdate};

use crate::config::Kernels;
use candle_core::{bail, DType, Device, Result, Tensor, D};

/// `softmax(scores * scale + mask)` over the last dimension, for attention.
///
/// `scores`: [B, H, Lq, Lk]; `mask`: additive, broadcastable to `scores` (typically [B, 1, 1, Lk] with 0
/// for keys to attend and a large negative number for padding). The mask gets no gradient.
///
/// Rows masked entirely with a finite value (BERT's -10000) equal the unmasked softmax of that row in
/// both implementations (a constant shift). Rows whose every logit is -inf: Reference gives NaN, Fused
/// gives zeros (attend to nothing), so one empty row cannot poison the whole loss.
pub fn attention_softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>, kernels: Kernels) -> Result<Tensor> {
    if scores.rank() == 0 {
        bail!("attention_softmax: scores must have at least one dimension");
    }
    match (kernels, fused_dtype(scores)) {
        (Kernels::Fused, Some(work)) => softmax::attention_softmax_fused(scores, scale, mask, work),
        _ => {
            let mut x = (scores * scale)?;
            if let Some(m) = mask {
                x = x.broadcast_add(m)?;
            }
            candle_nn::ops::softmax(&x, D::Minus1)
        }
    }
}

/// The attention core `dropout(softmax(q k^T * scale + mask)) v` for q [B, H, Lq, Dh] and k, v
/// [B, H, Lk, Dh]; `mask` additive and broadcastable to [B, H, Lq, Lk] (no gradient), as in
/// [`attention_softmax`]. Returns [B, H, Lq, Dh] in q's dtype.
///
/// Fused keeps neither scores nor probabilities for the backward (it recomputes them), so a layer's
/// attention holds O(L) memory instead of O(L^2) between its forward and backward (on CUDA the scores exist
/// during each call, for cuBLAS), and spreads the heads over the compute threads (candle's
/// batched products run on one thread below gemm's threading size: the tiny preset's 26 x 26 tiles; there
/// the fused core costs one thread ~1.5% of the step and gains two threads ~10%). Reference composes candle
/// ops, with the softmax in f32 (torch.autocast's rule) and the dropout mask materialised from the same
/// hash the fused op evaluates in place, so both draw identical masks.
pub fn attention(
    q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>, dropout: Option<AttnDropout>,
    kernels: Kernels,
) -> Result<Tensor> {
    attention::check_shapes(q.shape(), k.shape(), v.shape())?;
    let dropout = active(dropout)?;
    match (kernels, fused_dtype(q)) {
        (Kernels::Fused, Some(work)) => attention::attention_fused(q, k, v, scale, mask, dropout, work),
        _ => {
            // Low-precision products go up to f32 for the softmax; f64 stays exact.
            let work = if q.dtype() == DType::F64 { DType::F64 } else { DType::F32 };
            let scores = q.matmul(&k.t()?)?.to_dtype(work)?;
            let mask = mask.map(|m| m.to_dtype(work)).transpose()?;
            let mut probs = attention_softmax(&scores, scale, mask.as_ref(), kernels)?;
            if let Some(d) = dropout {
                probs = (probs * d.mask(scores.dims(), scores.device())?.to_dtype(work)?)?;
            }
            probs.to_dtype(v.dtype())?.matmul(v)?.to_dtype(q.dtype())
        }
    }
}

/// The dropout to apply: none for p = 0, an error outside [0, 1).
fn active(dropout: Option<AttnDropout>) -> Result<Option<AttnDropout>> {
    match dropout {
        Some(d) if !(0.0..1.0).contains(&d.p) => bail!("dropout probability {} is outside [0, 1)", d.p),
        d => Ok(d.filter(|d| d.p > 0.0)),
    }
}

/// Inverted dropout of `x` with drop probability `p` in [0, 1): element i is kept, and scaled by 1 / (1 - p),
/// when a hash of (`seed`, i) clears p, the attention core's rule. The mask is regenerated, never drawn per
/// element or stored, and both devices draw the same one. Fused for f32: one node whose backward is the same
/// op on the gradient; Reference multiplies by the mask materialised from the same hash (the same bits).
pub fn dropout(x: &Tensor, p: f64, seed: u64, kernels: Kernels) -> Result<Tensor> {
    let Some(d) = active(Some(AttnDropout { p, seed }))? else { return Ok(x.clone()) };
    match (kernels, x.dtype()) {
        (Kernels::Fused, DType::F32) => dropout::dropout_fused(x, p, seed),
        _ => x * d.mask(x.dims(), x.device())?.to_dtype(x.dtype())?,
    }
}

/// Multi-head attention on tokens: q [B, Lq, H * Dh], k and v [B, Lk, H * Dh] with `heads` heads -> [B, Lq,
/// H * Dh]; `scale`, `mask` and `dropout` as in [`attention`]. Fused for f32 (and bf16 on CUDA): one node
/// that splits and merges the heads inside; otherwise [`split_heads`], [`attention`] and [`merge_heads`].
#[allow(clippy::too_many_arguments)]
pub fn multi_head_attention(
    q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, mask: Option<&Tensor>, dropout: Option<AttnDropout>,
    kernels: Kernels,
) -> Result<Tensor> {
    let dropout = active(dropout)?;
    let dtype = q.dtype();
    match kernels {
        Kernels::Fused if k.dtype() == dtype && v.dtype() == dtype && in_place(q) => {
            attention::multi_head_fused(q, k, v, heads, scale, mask, dropout)
        }
        _ => {
            let split = |x: &Tensor| split_heads(x, heads, kernels);
            merge_heads(&attention(&split(q)?, &split(k)?, &split(v)?, scale, mask, dropout, kernels)?, kernels)
        }
    }
}

/// `x + bias` with `bias` [D] broadcast over the rows of `x` [.., D]. Fused for f32 (its backward sums the
/// gradient's rows in one contiguous pass); other dtypes use candle's broadcast add.
pub fn add_bias(x: &Tensor, bias: &Tensor, kernels: Kernels) -> Result<Tensor> {
    match (kernels, x.dtype(), bias.dtype()) {
        (Kernels::Fused, DType::F32, DType::F32) => bias::add_bias_fused(x, bias),
        _ => x.broadcast_add(bias),
    }
}

/// Attention's head split, x [B, L, H * Dh] -> [B, H, L, Dh] contiguous. Fused: one autograd node (a strided
/// copy each way); Reference: reshape, transpose and copy.
pub fn split_heads(x: &Tensor, heads: usize, kernels: Kernels) -> Result<Tensor> {
    match kernels {
        Kernels::Fused => heads::split(x, heads),
        Kernels::Reference => {
            let (b, l, d) = x.dims3()?;
            x.reshape((b, l, heads, d / heads))?.transpose(1, 2)?.contiguous()
        }
    }
}

/// The inverse of [`split_heads`]: x [B, H, L, Dh] -> [B, L, H * Dh].
pub fn merge_heads(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    match kernels {
        Kernels::Fused => heads::merge(x),
        Kernels::Reference => {
            let (b, h, l, dh) = x.dims4()?;
            x.transpose(1, 2)?.reshape((b, l, h * dh))
        }
    }
}

/// `x W^T + b` for x \[.., in\], `weight` \[out, in\] and `bias` \[out\], as PyTorch's `nn.Linear`, in x's
/// dtype. Fused where x and the weight share a dtype the fused ops read in place (f32; bf16 on CUDA, as
/// torch.autocast's linear) and the bias is f32: one autograd node (the composition's flatten, transpose,
/// product, unflatten and bias add each cost the backward a gradient); otherwise candle's matmul and
/// broadcast add.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor, kernels: Kernels) -> Result<Tensor> {
    match kernels {
        Kernels::Fused if fused_linear(x, weight, bias) => linear::linear_fused(x, weight, bias, false),
        _ => {
            let (n, k) = weight.dims2()?;
            let rows = x.reshape(((), k))?;
            let mut out = x.dims().to_vec();
            if let Some(last) = out.last_mut() {
                *last = n;
            }
            rows.matmul(&weight.t()?)?.broadcast_add(&bias.to_dtype(x.dtype())?)?.reshape(out)
        }
    }
}

/// `gelu(x W^T + b)`: [`linear`] then [`gelu`], as BERT's intermediate layer and the ViT's fc1. Fused where
/// [`linear`] is, as one node that keeps the pre-activation itself (the backward then neither zeroes nor
/// accumulates a gradient for it); otherwise the two ops.
pub fn linear_gelu(x: &Tensor, weight: &Tensor, bias: &Tensor, kernels: Kernels) -> Result<Tensor> {
    match kernels {
        Kernels::Fused if fused_linear(x, weight, bias) => linear::linear_fused(x, weight, bias, true),
        _ => gelu(&linear(x, weight, bias, kernels)?, kernels),
    }
}

/// `linear(gelu(linear(x, w1, b1)), w2, b2)`: the transformer's feed-forward sublayer (BERT's intermediate and
/// output dense layers, the ViT's fc1 and fc2). Fused on the CPU for f32 as one node, so the backward keeps
/// the gradient of the hidden layer inside it; otherwise [`linear_gelu`] and [`linear`].
pub fn mlp(x: &Tensor, fc1: (&Tensor, &Tensor), fc2: (&Tensor, &Tensor), kernels: Kernels) -> Result<Tensor> {
    let f32s = [x, fc1.0, fc1.1, fc2.0, fc2.1].iter().all(|t| t.dtype() == DType::F32);
    match kernels {
        Kernels::Fused if x.device().is_cpu() && f32s && in_place(x) => linear::mlp_fused(x, fc1, fc2),
        _ => linear(&linear_gelu(x, fc1.0, fc1.1, kernels)?, fc2.0, fc2.1, kernels),
    }
}

/// Whether the fused linear layer takes these inputs: x and the weight in one dtype read in place, an f32 bias.
fn fused_linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> bool {
    weight.dtype() == x.dtype() && bias.dtype() == DType::F32 && in_place(x)
}

/// `a @ b` for a [m, k] and a constant `b` [k, n]: no gradient flows to `b` and none is computed for it.
/// Fused for f32 (one node whose backward returns `a`'s gradient only); otherwise candle's matmul.
pub fn matmul_by_constant(a: &Tensor, b: &Tensor, kernels: Kernels) -> Result<Tensor> {
    match (kernels, a.dtype(), b.dtype()) {
        (Kernels::Fused, DType::F32, DType::F32) => constant::matmul_by_constant_fused(a, b),
        _ => a.matmul(b),
    }
}

/// The exact (erf) GELU, as BERT and timm's ViT use. Fused for f32; other dtypes use candle's `gelu_erf`.
pub fn gelu(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    match (kernels, x.dtype()) {
        (Kernels::Fused, DType::F32) => gelu::gelu_fused(x),
        _ => x.gelu_erf(),
    }
}

/// LayerNorm over the last dimension with `weight` and `bias` [D]: `(x - mean) / sqrt(var + eps) * weight +
/// bias`, the biased variance as torch. Fused for f32 (others go through f32); f64 keeps the composition.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, kernels: Kernels) -> Result<Tensor> {
    match (kernels, fused_dtype(x)) {
        (Kernels::Fused, Some(_)) => {
            let f32s = |t: &Tensor| t.to_dtype(DType::F32);
            layernorm::layer_norm_fused(&f32s(x)?, &f32s(weight)?, &f32s(bias)?, eps)?.to_dtype(x.dtype())
        }
        _ => {
            let mean = x.mean_keepdim(D::Minus1)?;
            let xc = x.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
            xn.broadcast_mul(weight)?.broadcast_add(bias)
        }
    }
}

/// `layer_norm(a + x)`: BERT's residual add and LayerNorm after each sublayer. Fused for f32 as one node
/// that adds and normalises on the compute threads and keeps the sum itself; otherwise the add, then
/// [`layer_norm`].
pub fn add_layer_norm(
    a: &Tensor, x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64, kernels: Kernels,
) -> Result<Tensor> {
    match (kernels, a.dtype(), x.dtype(), weight.dtype(), bias.dtype()) {
        (Kernels::Fused, DType::F32, DType::F32, DType::F32, DType::F32) => {
            layernorm::add_layer_norm_fused(a, x, weight, bias, eps)
        }
        _ => layer_norm(&(a + x)?, weight, bias, eps, kernels),
    }
}

/// Which entries of an ITC row are positives.
pub enum Positives<'a> {
    /// Row i's positive is column i (the paired caption / image of the batch); needs N >= B.
    Diagonal,
    /// A [B, N] 0/1 f32 mask (same image id = positive); targets are `mask / mask.sum(1)` (a row without
    /// positives gives a NaN loss in both implementations).
    Mask(&'a Tensor),
    /// Row i's positive is column `index[i]`, a u32 \[B\] tensor with entries below N (MLM: the masked tokens'
    /// ids over the vocabulary).
    Index(&'a Tensor),
}

/// One direction of the ITC loss with momentum-distilled soft targets (REFERENCE.md "Losses: ITC"):
/// `s = sim / temp`, `t = alpha * softmax(sim_m / temp) + (1 - alpha) * positives`,
/// `loss = -mean_i sum_j t_ij * log_softmax(s)_ij`.
///
/// `sim`: [B, N] cosine similarities of online queries against momentum keys (batch then queue), with
/// gradient; `sim_m`: [B, N] the momentum queries' similarities (no gradient); `temp`: a one-element
/// tensor with gradient. No gradient flows through the targets. Returns an f32 scalar.
pub fn itc_loss(
    sim: &Tensor, sim_m: &Tensor, temp: &Tensor, alpha: f64, positives: Positives, kernels: Kernels,
) -> Result<Tensor> {
    let (b, n) = sim.dims2()?;
    if n == 0 {
        bail!("itc_loss: sim has no columns");
    }
    if sim_m.dims() != [b, n] {
        bail!("itc_loss: sim_m has shape {:?}, sim {:?}", sim_m.dims(), sim.dims());
    }
    if temp.elem_count() != 1 {
        bail!("itc_loss: temp must have one element, it has shape {:?}", temp.dims());
    }
    match positives {
        Positives::Diagonal if b > n => {
            bail!("itc_loss: diagonal positives need at least as many columns as rows, sim is {b}x{n}")
        }
        Positives::Mask(m) if m.dims() != [b, n] => {
            bail!("itc_loss: positives mask has shape {:?}, sim {:?}", m.dims(), sim.dims())
        }
        Positives::Index(i) if i.dims() != [b] || i.dtype() != DType::U32 => {
            bail!("itc_loss: positive indices must be u32 [{b}], got {:?} {:?}", i.dtype(), i.dims())
        }
        _ => {}
    }
    match (kernels, fused_dtype(sim)) {
        (Kernels::Fused, Some(work)) => itc::itc_loss_fused(sim, sim_m, temp, alpha, positives, work),
        _ => itc_loss_reference(sim, sim_m, temp, alpha, positives),
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
        Positives::Index(i) => {
            let columns = Tensor::arange(0u32, n as u32, sim.device())?.unsqueeze(0)?;
            i.unsqueeze(1)?.broadcast_eq(&columns)?.to_dtype(sim.dtype())?
        }
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

/// The storage dtype a fused op computes from for `t`, None where Fused keeps the Reference path (f64 and
/// non-float dtypes). bf16 is read in place by the CUDA kernels; elsewhere the fused ops take f32.
fn fused_dtype(t: &Tensor) -> Option<DType> {
    match (t.device(), t.dtype()) {
        (Device::Cuda(_), DType::BF16) => Some(DType::BF16),
        (_, DType::F32 | DType::BF16 | DType::F16) => Some(DType::F32),
        _ => None,
    }
}

/// Whether the fused ops read `t` as it is (no copy into another dtype first).
fn in_place(t: &Tensor) -> bool {
    fused_dtype(t) == Some(t.dtype())
}

/// Seeded inputs and comparisons shared by the ops' tests and the benchmark.
mod testing {
    use candle_core::{Device, Result, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    pub(super) fn rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Uniform in [-range, range), f32.
    pub(super) fn uniform(rng: &mut ChaCha8Rng, dims: &[usize], range: f32, device: &Device) -> Result<Tensor> {
        let n = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-range..range)).collect();
        Tensor::from_vec(v, dims, device)
    }

    /// (max |a - b|, that divided by max(1, max |b|)) over all elements, in f64; NaN where either has a
    /// NaN the other lacks.
    pub(super) fn max_err(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
        let a = a.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        let b = b.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1::<f64>()?;
        if a.len() != b.len() {
            candle_core::bail!("comparing {} elements with {}", a.len(), b.len());
        }
        let (mut abs, mut scale) = (0f64, 1f64);
        for (x, y) in a.iter().zip(&b) {
            if x.is_nan() != y.is_nan() {
                return Ok((f64::NAN, f64::NAN));
            }
            if !x.is_nan() {
                abs = abs.max((x - y).abs());
                scale = scale.max(y.abs());
            }
        }
        Ok((abs, abs / scale))
    }

    /// max |t| in f64.
    #[cfg(test)]
    pub(super) fn max_abs(t: &Tensor) -> Result<f64> {
        t.abs()?.flatten_all()?.max(0)?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()
    }
}
