//! Building blocks that keep the autograd graph: candle's fused LayerNorm and softmax have no backward
//! (CANDLE-NOTES.md), so both go through `ops` (fused with their own backward, or composed).

use super::params::{Init, Pb};
use super::segments::{Chain, Cut, Cuts};
use crate::config::{Kernels, Precision};
use crate::ops::AttnDropout;
use candle_core::{DType, Result, Tensor, TensorId};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::sync::Mutex;

/// What a forward pass needs besides its inputs: training mode (dropout on), the seeded dropout stream,
/// which kernels run the custom ops and in which precision the matmuls run.
pub struct Ctx {
    pub train: bool,
    pub kernels: Kernels,
    pub precision: Precision,
    rng: Mutex<ChaCha8Rng>,
    /// The bf16 copies of the weights cast in this pass ([`Ctx::autocast_weight`]).
    casts: Mutex<HashMap<TensorId, Tensor>>,
    /// Where the training backward is cut into segments (`train.segmented_backward`, `train.grad_checkpoint`);
    /// None: one graph.
    cuts: Option<Cuts>,
}

impl Ctx {
    pub fn new(train: bool, kernels: Kernels, rng: ChaCha8Rng) -> Self {
        let (precision, casts) = (Precision::Fp32, Mutex::default());
        Ctx { train, kernels, precision, rng: Mutex::new(rng), casts, cuts: None }
    }

    /// The same context, cutting the graph after each [`Ctx::segment`]; with `recompute`, the segments are
    /// computed again in the backward instead of kept.
    pub fn with_cuts(self, recompute: bool) -> Self {
        Ctx { cuts: Some(Cuts::new(recompute)), ..self }
    }

    /// A context like this one, without cuts, whose stream starts where this one stands: a segment run
    /// again in the backward draws what it drew in the forward.
    pub fn replay(&self) -> Ctx {
        Ctx::new(self.train, self.kernels, self.rng().clone()).with_precision(self.precision)
    }

    /// `f(x, self)`, where the graph is cut after when cuts are on ([`Cuts::segment`]).
    pub fn segment<F>(&self, chain: Chain, x: &Tensor, f: F) -> Result<Tensor>
    where
        F: Fn(&Tensor, &Ctx) -> Result<Tensor> + Send + Sync + 'static,
    {
        match &self.cuts {
            Some(cuts) => cuts.segment(chain, x, self, f),
            None => f(x, self),
        }
    }

    /// `output`, the graph cut after it when cuts are on, never recomputed ([`Cuts::cut`]).
    pub fn cut(&self, chain: Chain, output: Tensor) -> Result<Tensor> {
        match &self.cuts {
            Some(cuts) => cuts.cut(chain, output),
            None => Ok(output),
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

    /// `x` in the dtype this context's products read: bf16 under `precision = "bf16"`, otherwise as is. As
    /// torch.autocast, linear layers and attention then output bf16; LayerNorm, the residual adds and the
    /// losses take f32 ([`LayerNorm`], [`Ctx::dropout`], the heads), and gradients flow back through the casts.
    pub fn autocast(&self, x: &Tensor) -> Result<Tensor> {
        match self.precision {
            Precision::Bf16 => x.to_dtype(DType::BF16),
            Precision::Fp32 | Precision::Tf32 => Ok(x.clone()),
        }
    }

    /// A weight as [`Ctx::autocast`] gives it, cast once per pass: a layer that runs several times in one
    /// forward (the text and fusion layers, for ITM's pairs and again for MLM) reads one bf16 copy, whose
    /// backward sums every use's gradient before the one cast back, as torch.autocast's cache of casts.
    pub fn autocast_weight(&self, w: &Tensor) -> Result<Tensor> {
        if self.precision != Precision::Bf16 || w.dtype() == DType::BF16 {
            return Ok(w.clone());
        }
        let mut casts = self.casts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cast) = casts.get(&w.id()) {
            return Ok(cast.clone());
        }
        let cast = w.to_dtype(DType::BF16)?;
        casts.insert(w.id(), cast.clone());
        Ok(cast)
    }

    /// `a @ b` for products read by f32 ops (the patch embedding, the MLM decoder): in bf16 under `precision =
    /// "bf16"`, the product back in f32.
    pub fn matmul(&self, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        self.autocast(a)?.matmul(&self.autocast(b)?)?.to_dtype(DType::F32)
    }

    /// A fresh seed from the context's stream, for ops that derive their randomness from one.
    pub fn seed(&self) -> u64 {
        self.rng().random()
    }

    /// The stream (a lock, so that the momentum forward can run on another compute thread,
    /// [`crate::threads::overlap`]; only one thread ever uses a context at a time).
    fn rng(&self) -> std::sync::MutexGuard<'_, ChaCha8Rng> {
        self.rng.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Evaluation mode: no dropout.
    pub fn eval(kernels: Kernels) -> Self {
        Self::new(false, kernels, crate::rng::stream(0, "eval", "", 0))
    }

    /// Inverted dropout (identity outside training or for p = 0), [`crate::ops::dropout`]: its mask is a hash
    /// of one seed drawn from the context's stream, so either device draws the same mask, nothing of its size
    /// is drawn, uploaded or kept, and a recomputed segment regenerates it. Returns f32: a residual add in
    /// f32 follows it (torch.autocast promotes a bf16 sublayer output there).
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        if !self.train || p <= 0.0 {
            return Ok(x);
        }
        crate::ops::dropout(&x, p, self.seed(), self.kernels)
    }
}

/// y = x W^T + b, weights `weight` \[out, in\] and `bias` \[out\] as in PyTorch; one fused node
/// ([`crate::ops::linear`]), in bf16 under `precision = "bf16"` (the bias stays f32).
#[derive(Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    /// Fresh weights are LeCun-normal (std 1/sqrt(in_dim)): BERT's fixed 0.02 suits width 768, but at
    /// small widths it makes every attention path nearly silent, so all inputs start with the same `[CLS]`
    /// feature and contrastive training stalls at the uniform loss.
    pub fn new(pb: &Pb, in_dim: usize, out_dim: usize) -> Result<Self> {
        let weight = pb.get("weight", (out_dim, in_dim), Init::Normal(1.0 / (in_dim as f64).sqrt()))?;
        let bias = pb.get("bias", out_dim, Init::Const(0.0))?;
        Ok(Linear { weight, bias })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        crate::ops::linear(&ctx.autocast(x)?, &ctx.autocast_weight(&self.weight)?, &self.bias, ctx.kernels)
    }

    /// `gelu(self.forward(x))` as one fused node.
    pub fn forward_gelu(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        crate::ops::linear_gelu(&ctx.autocast(x)?, &ctx.autocast_weight(&self.weight)?, &self.bias, ctx.kernels)
    }

    /// `fc2(gelu(fc1(x)))`, the feed-forward sublayer, as one fused node on the CPU ([`crate::ops::mlp`]).
    pub fn mlp(fc1: &Linear, fc2: &Linear, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (w1, w2) = (ctx.autocast_weight(&fc1.weight)?, ctx.autocast_weight(&fc2.weight)?);
        crate::ops::mlp(&ctx.autocast(x)?, (&w1, &fc1.bias), (&w2, &fc2.bias), ctx.kernels)
    }

    /// The output split into `n` equal parts along its last dimension, computed as `n` products with the
    /// weight's row blocks. Narrowing the output instead would cost the backward `n` zero-padded
    /// gradients of the full output width (candle's narrow backward), on activations; here the padding
    /// falls on the weight.
    pub fn forward_split(&self, x: &Tensor, n: usize, ctx: &Ctx) -> Result<Vec<Tensor>> {
        let size = self.weight.dim(0)? / n;
        let weight = ctx.autocast_weight(&self.weight)?;
        (0..n)
            .map(|i| {
                let part =
                    Linear { weight: weight.narrow(0, i * size, size)?, bias: self.bias.narrow(0, i * size, size)? };
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

    /// In f32 whatever the input's dtype (torch.autocast's rule for LayerNorm).
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        crate::ops::layer_norm(&x.to_dtype(DType::F32)?, &self.weight, &self.bias, self.eps, ctx.kernels)
    }

    /// `self.forward(a + x)`: BERT's residual add and LayerNorm as one node ([`crate::ops::add_layer_norm`]),
    /// in f32.
    pub fn forward_sum(&self, a: &Tensor, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        crate::ops::add_layer_norm(&f32(a)?, &f32(x)?, &self.weight, &self.bias, self.eps, ctx.kernels)
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

/// Multi-head scaled dot-product attention on already projected q [B, Lq, D], k, v [B, Lk, D], in bf16
/// under `precision = "bf16"` (the softmax in f32 inside the op). `mask` is additive, broadcastable to [B, H,
/// Lq, Lk]. Attention-probability dropout `p` in training, its mask hashed from a seed drawn from the
/// context's stream (the fused op regenerates it in the backward).
pub fn attend(
    q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>, p: f64, ctx: &Ctx,
) -> Result<Tensor> {
    let scale = 1.0 / ((q.dim(2)? / heads) as f64).sqrt();
    let dropout = (ctx.train && p > 0.0).then(|| AttnDropout { p, seed: ctx.seed() });
    let (q, k, v) = (ctx.autocast(q)?, ctx.autocast(k)?, ctx.autocast(v)?);
    crate::ops::multi_head_attention(&q, &k, &v, heads, scale, mask, dropout, ctx.kernels)
}

/// Additive attention mask [B, 1, 1, L] from a 0/1 padding mask [B, L]: 0 where attended, -10000
/// (ALBEF's xbert) where padded.
pub fn extended_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    ((mask.ones_like()? - mask)? * -10000.0)?.reshape((b, 1, 1, l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::ParamStore;
    use candle_core::{Device, Var};

    /// torch.autocast's dtypes under `precision = "bf16"`: linear layers and attention give bf16, LayerNorm,
    /// the hidden dropout and what the residual adds read give f32; a weight is cast once per pass (the
    /// layer `lin` runs twice); every weight still gets an f32 gradient.
    #[test]
    fn bf16_keeps_products_in_bf16_and_the_rest_in_f32() -> Result<()> {
        let store = ParamStore::new(3, &Device::Cpu);
        let (lin, fc) = (Linear::new(&store.root().pp("lin"), 8, 8)?, Linear::new(&store.root().pp("fc"), 8, 16)?);
        let norm = LayerNorm::new(&store.root().pp("norm"), 8, 1e-6)?;
        let x = Var::from_tensor(&(Tensor::arange(0f32, 48.0, &Device::Cpu)?.reshape((2, 3, 8))? / 10.0)?)?;
        for precision in [Precision::Bf16, Precision::Fp32] {
            let ctx = Ctx::new(true, Kernels::Fused, crate::rng::stream(0, "test", "", 0)).with_precision(precision);
            let product = if precision == Precision::Bf16 { DType::BF16 } else { DType::F32 };
            let y = lin.forward(x.as_tensor(), &ctx)?;
            let a = attend(&y, &y, &y, 2, None, 0.1, &ctx)?;
            let h = fc.forward_gelu(&a, &ctx)?;
            assert_eq!([y.dtype(), a.dtype(), h.dtype()], [product; 3], "{precision:?}");
            let d = ctx.dropout(&lin.forward(&a, &ctx)?, 0.1)?;
            let out = norm.forward_sum(&d, x.as_tensor(), &ctx)?;
            let n = norm.forward(&y, &ctx)?;
            assert_eq!([d.dtype(), out.dtype(), n.dtype()], [DType::F32; 3], "{precision:?}");
            let (w1, w2) = (ctx.autocast_weight(lin.weight())?, ctx.autocast_weight(lin.weight())?);
            assert_eq!((w1.id(), w1.dtype()), (w2.id(), product), "{precision:?}: a weight is cast once per pass");
            let grads = ((out.sum_all()? + n.sum_all()?)? + h.to_dtype(DType::F32)?.sum_all()?)?.backward()?;
            for (name, v) in store.vars() {
                let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{precision:?}: no gradient for {name}"));
                assert_eq!(g.dtype(), DType::F32, "{precision:?}: {name}");
            }
        }
        Ok(())
    }
}
