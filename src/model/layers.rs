//! Building blocks that keep the autograd graph: candle's fused LayerNorm and softmax have no backward
//! (CANDLE-NOTES.md), so both go through `ops` (fused with their own backward, or composed).

use super::params::{Init, Pb};
use super::segments::{Cut, Cuts};
use crate::config::{Kernels, Precision};
use crate::ops::AttnDropout;
use candle_core::{DType, Result, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::cell::RefCell;

/// What a forward pass needs besides its inputs: training mode (dropout on), the seeded dropout stream,
/// which kernels run the custom ops and in which precision the matmuls run.
pub struct Ctx {
    pub train: bool,
    pub kernels: Kernels,
    pub precision: Precision,
    rng: RefCell<ChaCha8Rng>,
    /// Where the training backward is cut into segments (`train.segmented_backward`, `train.grad_checkpoint`);
    /// None: one graph.
    cuts: Option<Cuts>,
}

impl Ctx {
    pub fn new(train: bool, kernels: Kernels, rng: ChaCha8Rng) -> Self {
        Ctx { train, kernels, precision: Precision::Fp32, rng: RefCell::new(rng), cuts: None }
    }

    /// The same context, cutting the graph after each [`Ctx::segment`]; with `recompute`, the segments are
    /// computed again in the backward instead of kept.
    pub fn with_cuts(self, recompute: bool) -> Self {
        Ctx { cuts: Some(Cuts::new(recompute)), ..self }
    }

    /// A context like this one, without cuts, whose stream starts where this one stands: a segment run
    /// again in the backward draws what it drew in the forward.
    pub fn replay(&self) -> Ctx {
        Ctx::new(self.train, self.kernels, self.rng.borrow().clone()).with_precision(self.precision)
    }

    /// `f(x, self)`, where the graph is cut after when cuts are on ([`Cuts::segment`]).
    pub fn segment<F>(&self, x: &Tensor, f: F) -> Result<Tensor>
    where
        F: Fn(&Tensor, &Ctx) -> Result<Tensor> + 'static,
    {
        match &self.cuts {
            Some(cuts) => cuts.segment(x, self, f),
            None => f(x, self),
        }
    }

    /// The cuts made so far, in forward order.
    pub fn take_cuts(&self) -> Vec<Cut> {
        self.cuts.as_ref().map(Cuts::take).unwrap_or_default()
    }

    /// The same context with matmuls in `precision` (`train.precision`).
    pub fn with_precision(self, precision: Precision) -> Self {
        Ctx { precision, ..self }
    }

    /// `a @ b`: in bf16 under `precision = "bf16"`, the inputs cast down and the product back up to f32
    /// (torch.autocast's rule for matmuls; the gradients flow back through both casts), otherwise as is.
    pub fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        match self.precision {
            Precision::Bf16 => a.to_dtype(DType::BF16)?.matmul(&b.to_dtype(DType::BF16)?)?.to_dtype(DType::F32),
            Precision::Fp32 | Precision::Tf32 => a.matmul(b),
        }
    }

    /// A fresh seed from the context's stream, for ops that derive their randomness from one.
    pub fn seed(&self) -> u64 {
        self.rng.borrow_mut().random()
    }

    /// Evaluation mode: no dropout.
    pub fn eval(kernels: Kernels) -> Self {
        Self::new(false, kernels, crate::rng::stream(0, "eval", "", 0))
    }

    /// Inverted dropout (identity outside training or for p = 0), [`crate::ops::dropout`]: its mask is a hash
    /// of one seed drawn from the context's stream, so either device draws the same mask, nothing of its size
    /// is drawn, uploaded or kept, and a recomputed segment regenerates it.
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if !self.train || p <= 0.0 {
            return Ok(x.clone());
        }
        crate::ops::dropout(x, p, self.seed(), self.kernels)
    }
}

/// y = x W^T + b, weights `weight` \[out, in\] and `bias` \[out\] as in PyTorch.
#[derive(Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Fresh weights are LeCun-normal (std 1/sqrt(in_dim)): BERT's fixed 0.02 suits width 768, but at
    /// small widths it makes every attention path nearly silent, so all inputs start with the same `[CLS]`
    /// feature and contrastive training stalls at the uniform loss.
    pub fn new(pb: &Pb, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = pb.get("weight", (out_dim, in_dim), Init::Normal(1.0 / (in_dim as f64).sqrt()))?;
        let bias = Some(pb.get("bias", out_dim, Init::Const(0.0))?);
        Ok(Linear { weight, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The bias, where the layer runs as one fused node: it has one and matmuls run in f32.
    fn fused_bias(&self, ctx: &Ctx) -> Option<&Tensor> {
        self.bias.as_ref().filter(|_| ctx.precision != Precision::Bf16)
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if let Some(b) = self.fused_bias(ctx) {
            return crate::ops::linear(x, &self.weight, b, ctx.kernels);
        }
        let w = self.weight.t()?;
        let y = match x.dims() {
            [b, l, d] => ctx.matmul(&x.reshape((b * l, *d))?, &w)?.reshape((*b, *l, ()))?,
            _ => ctx.matmul(x, &w)?,
        };
        match &self.bias {
            Some(b) => crate::ops::add_bias(&y, b, ctx.kernels),
            None => Ok(y),
        }
    }

    /// `gelu(self.forward(x))`, as one fused node where the layer has a bias and matmuls run in f32.
    pub fn forward_gelu(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        if let Some(b) = self.fused_bias(ctx) {
            return crate::ops::linear_gelu(x, &self.weight, b, ctx.kernels);
        }
        crate::ops::gelu(&self.forward(x, ctx)?, ctx.kernels)
    }

    /// The output split into `n` equal parts along its last dimension, computed as `n` products with the
    /// weight's row blocks. Narrowing the output instead would cost the backward `n` zero-padded
    /// gradients of the full output width (candle's narrow backward), on activations; here the padding
    /// falls on the weight.
    pub fn forward_split(&self, x: &Tensor, n: usize, ctx: &Ctx) -> Result<Vec<Tensor>> {
        let size = self.weight.dim(0)? / n;
        (0..n)
            .map(|i| {
                let part = Linear {
                    weight: self.weight.narrow(0, i * size, size)?,
                    bias: self.bias.as_ref().map(|b| b.narrow(0, i * size, size)).transpose()?,
                };
                part.forward(x, ctx)
            })
            .collect()
    }
}

/// LayerNorm over the last dimension ([`crate::ops::layer_norm`]).
#[derive(Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(pb: &Pb, dim: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: pb.get("weight", dim, Init::Const(1.0))?,
            bias: pb.get("bias", dim, Init::Const(0.0))?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        crate::ops::layer_norm(x, &self.weight, &self.bias, self.eps, ctx.kernels)
    }

    /// `self.forward(a + x)`: BERT's residual add and LayerNorm as one node ([`crate::ops::add_layer_norm`]).
    pub fn forward_sum(&self, a: &Tensor, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        crate::ops::add_layer_norm(a, x, &self.weight, &self.bias, self.eps, ctx.kernels)
    }
}

/// A lookup table `weight` [n, dim]; its backward is candle's index_add.
#[derive(Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    pub fn new(pb: &Pb, n: usize, dim: usize) -> Result<Self> {
        Ok(Embedding { weight: pb.get("weight", (n, dim), Init::Normal(0.02))? })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// ids [B, L] (u32) -> [B, L, dim].
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        self.weight.index_select(&ids.flatten_all()?, 0)?.reshape((b, l, ()))
    }
}

/// Multi-head scaled dot-product attention on already projected q [B, Lq, D], k, v [B, Lk, D].
/// `mask` is additive, broadcastable to [B, H, Lq, Lk]. Attention-probability dropout `p` in training, its
/// mask hashed from a seed drawn from the context's stream (the fused op regenerates it in the backward).
pub fn attend(
    q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>, p: f64, ctx: &Ctx,
) -> Result<Tensor> {
    let scale = 1.0 / ((q.dim(2)? / heads) as f64).sqrt();
    let dropout = (ctx.train && p > 0.0).then(|| AttnDropout { p, seed: ctx.seed() });
    if ctx.precision != Precision::Bf16 {
        return crate::ops::multi_head_attention(q, k, v, heads, scale, mask, dropout, ctx.kernels);
    }
    let split = |x: &Tensor| crate::ops::split_heads(x, heads, ctx.kernels)?.to_dtype(DType::BF16);
    let o = crate::ops::attention(&split(q)?, &split(k)?, &split(v)?, scale, mask, dropout, ctx.kernels)?;
    crate::ops::merge_heads(&o.to_dtype(DType::F32)?, ctx.kernels)
}

/// Additive attention mask [B, 1, 1, L] from a 0/1 padding mask [B, L]: 0 where attended, -10000
/// (ALBEF's xbert) where padded.
pub fn extended_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    ((mask.ones_like()? - mask)? * -10000.0)?.reshape((b, 1, 1, l))
}
