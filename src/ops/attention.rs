//! Fused attention core `o = dropout(softmax(q k^T * scale + mask)) v`, forward and backward, without
//! keeping the [B, H, Lq, Lk] scores or probabilities: the forward keeps only `o` and each query row's
//! log-sum-exp `lse`, and the backward recomputes `p = exp(s - lse)` from them (FlashAttention's scheme).
//! The composition keeps scores, probabilities and, with dropout, the mask and the dropped probabilities
//! until the backward: for ViT-B at 256 px, 3.2 MB each per layer and image.
//!
//! With `dO` the upstream gradient and `z` the dropout mask (0 or 1 / keep):
//! `dV = (p z)^T dO`, `dp_ij = z_ij (dO_i . v_j)`, `ds_ij = p_ij (dp_ij - D_i)` with
//! `D_i = sum_j p_ij dp_ij = dO_i . o_i`, `dQ = scale ds K`, `dK = scale ds^T Q`.
//!
//! CPU: one head at a time per thread, its [Lq, Lk] tile in scratch and the products by gemm; over short
//! rows (text) the forward also keeps the probabilities, which the backward then reads instead of
//! recomputing ([`KEPT_PROBS_MAX_KEYS`]). CUDA: the same
//! scheme over all heads at once, the products by cuBLAS (batched over B x H; tensor cores in bf16) and the
//! row passes between them in kernels/attention.cu; a layer's [B, H, Lq, Lk] scores live only during its
//! forward or backward call. Products done by the row kernels themselves (a warp per row, a shuffle
//! reduction per key) would spare even that memory but leave the tensor cores idle, at several times
//! cuBLAS's time for ViT-B's 257 tokens.

use super::cpu::{self, Mat};
use super::heads::Permute;
use super::saved::Saved;
use super::softmax::MaskGeom;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};
#[cfg(feature = "cuda")]
use candle_core::{op::BackpropOp, CustomOp1};

/// Dropout on the attention probabilities inside the fused op: element (b, h, i, j) is kept when a hash of
/// `seed` and its flat index clears `p` (see `cpu::dropout_keep`), so the backward regenerates the mask.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnDropout {
    pub p: f64,
    pub seed: u64,
}

impl AttnDropout {
    /// The [B, H, Lq, Lk] mask as a tensor (0 or 1 / (1 - p)), for the reference composition.
    pub(super) fn mask(&self, dims: &[usize], device: &Device) -> Result<Tensor> {
        let (threshold, scale) = (cpu::dropout_threshold(self.p), 1.0 / (1.0 - self.p) as f32);
        let n: usize = dims.iter().product();
        let v: Vec<f32> =
            (0..n as u64).map(|i| if cpu::dropout_keep(self.seed, i, threshold) { scale } else { 0.0 }).collect();
        Tensor::from_vec(v, dims, device)
    }
}

/// The sizes of one call: B x H heads of Lq queries and Lk keys of width Dh, `side` of them side by side
/// in each row of q, k, v and o: H on tokens [B, L, H * Dh], which the CPU reads and writes in place, 1 on
/// heads [B, H, L, Dh].
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    dh: usize,
    side: usize,
}

impl Dims {
    /// Heads [B, H, L, Dh].
    fn new(q: &Shape, k: &Shape, v: &Shape) -> Result<Self> {
        let (b, h, lq, dh) = q.dims4()?;
        let (kb, kh, lk, kd) = k.dims4()?;
        if (kb, kh, kd) != (b, h, dh) || v.dims() != k.dims() {
            bail!("attention: q {:?}, k {:?} and v {:?} do not fit [B, H, L, Dh]", q.dims(), k.dims(), v.dims());
        }
        Ok(Dims { b, h, lq, lk, dh, side: 1 })
    }

    /// Tokens [B, L, H * Dh] of `heads` heads.
    fn tokens(q: &Shape, k: &Shape, v: &Shape, heads: usize) -> Result<Self> {
        let ((b, lq, d), (kb, lk, kd)) = (q.dims3()?, k.dims3()?);
        if (kb, kd) != (b, d) || v.dims() != k.dims() {
            bail!("attention: q {:?}, k {:?} and v {:?} do not fit [B, L, H * Dh]", q.dims(), k.dims(), v.dims());
        }
        if heads == 0 || d % heads != 0 {
            bail!("attention: width {d} is not a multiple of {heads} heads");
        }
        Ok(Dims { b, h: heads, lq, lk, dh: d / heads, side: heads })
    }

    fn bh(&self) -> usize {
        self.b * self.h
    }

    /// Elements from one row of q, k, v or o to the next.
    fn width(&self) -> usize {
        self.side * self.dh
    }

    fn scores(&self) -> Shape {
        Shape::from((self.b, self.h, self.lq, self.lk))
    }
}

/// Checks that q, k and v are [B, H, Lq, Dh], [B, H, Lk, Dh] twice.
pub(super) fn check_shapes(q: &Shape, k: &Shape, v: &Shape) -> Result<()> {
    Dims::new(q, k, v).map(|_| ())
}

/// The fused path of [`super::attention`] (dropout already checked); `work` is the dtype the op reads.
pub(super) fn attention_fused(
    q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, mask: Option<&Tensor>, dropout: Option<AttnDropout>, work: DType,
) -> Result<Tensor> {
    let cast = |t: &Tensor| t.to_dtype(work)?.contiguous();
    let (qw, kw, vw) = (cast(q)?, cast(k)?, cast(v)?);
    let scores = Dims::new(qw.shape(), kw.shape(), vw.shape())?.scores();
    qw.apply_op3(&kw, &vw, Attention::new(scale, mask, scores, dropout, work)?)?.to_dtype(q.dtype())
}

/// The fused path of [`super::multi_head_attention`]: q [B, Lq, H * Dh], k and v [B, Lk, H * Dh], all f32
/// (or all bf16 on CUDA).
pub(super) fn multi_head_fused(
    q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64, mask: Option<&Tensor>, dropout: Option<AttnDropout>,
) -> Result<Tensor> {
    // A width that is not a multiple of the heads fails here, before any work.
    let dims = Dims::tokens(q.shape(), k.shape(), v.shape(), heads)?;
    let core = Attention::new(scale, mask, dims.scores(), dropout, q.dtype())?;
    let op = Heads { heads, core, saved: Saved::new("attention") };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`Attention`] on tokens [B, L, H * Dh], as one node. As three nodes (split, core, merge), the backward
/// zeroed and accumulated a gradient for each of q, k and v split and for the core's output, on the driver
/// thread. On the CPU each head is read and written in place, its rows `H * Dh` apart; split and merge
/// copies (and their opposites in the backward) were 4% of the tiny step. On CUDA the heads are split and
/// merged inside the node for cuBLAS's batched products, and kept for the backward.
struct Heads {
    heads: usize,
    core: Attention,
    /// CUDA: q, k, v and o in heads [B, H, L, Dh], from the forward.
    saved: Saved<[Tensor; 4]>,
}

#[cfg(feature = "cuda")]
impl Heads {
    /// The forward on one backend: `permute` runs a split or merge on its storage, `wrap` and `unwrap`
    /// move storage in and out of tensors.
    fn forward<S>(
        &self, inputs: [(&S, &Layout); 3], permute: impl Fn(&Permute, &S, &Layout) -> Result<(S, Shape)>,
        wrap: impl Fn(S) -> Storage, unwrap: fn(&Storage) -> Option<&S>,
    ) -> Result<(S, Shape)> {
        let split = |(s, l): (&S, &Layout)| -> Result<Tensor> {
            let (storage, shape) = permute(&Permute::split(l.shape(), self.heads)?, s, l)?;
            Ok(Tensor::from_storage(wrap(storage), shape, BackpropOp::none(), false))
        };
        let [q, k, v] = [split(inputs[0])?, split(inputs[1])?, split(inputs[2])?];
        let o = q.apply_op3_no_bwd(&k, &v, &self.core)?;
        let (storage, layout) = o.storage_and_layout();
        let Some(os) = unwrap(&storage) else { bail!("attention: the output is on another device") };
        let (merged, _) = permute(&Permute::merge(layout.shape())?, os, layout)?;
        drop(storage);
        self.saved.keep([q, k, v, o])?;
        Ok((merged, inputs[0].1.shape().clone()))
    }
}

impl CustomOp3 for Heads {
    fn name(&self) -> &'static str {
        "alignfuse-multi-head-attention"
    }

    fn cpu_fwd(
        &self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::tokens(l1.shape(), l2.shape(), l3.shape(), self.heads)?;
        self.core.cpu_forward(dims, (s1, l1), (s2, l2), (s3, l3))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
        s3: &candle_core::CudaStorage, l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        fn unwrap(s: &Storage) -> Option<&candle_core::CudaStorage> {
            match s {
                Storage::Cuda(s) => Some(s),
                _ => None,
            }
        }
        self.forward([(s1, l1), (s2, l2), (s3, l3)], |p, s, l| p.cuda_fwd(s, l), Storage::Cuda, unwrap)
    }

    fn bwd(
        &self, xq: &Tensor, xk: &Tensor, xv: &Tensor, out: &Tensor, grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if xq.device().is_cpu() {
            let dims = Dims::tokens(xq.shape(), xk.shape(), xv.shape(), self.heads)?;
            let [dq, dk, dv] = self.core.cpu_backward(dims, [xq, xk, xv, out], grad)?;
            return Ok((Some(dq), Some(dk), Some(dv)));
        }
        let [q, k, v, o] = self.saved.get()?;
        let grad = grad.contiguous()?.apply_op1_no_bwd(&Permute::split(grad.shape(), self.heads)?)?;
        let merge = |d: Option<Tensor>, like: &Tensor| -> Result<Option<Tensor>> {
            d.map(|d| d.apply_op1_no_bwd(&Permute::merge(d.shape())?)?.reshape(like.shape())).transpose()
        };
        let (dq, dk, dv) = self.core.bwd(&q, &k, &v, &o, &grad)?;
        Ok((merge(dq, xq)?, merge(dk, xk)?, merge(dv, xv)?))
    }
}

struct Attention {
    scale: f32,
    /// Additive, broadcastable to the scores, in the working dtype; no gradient.
    mask: Option<Tensor>,
    dropout: Option<AttnDropout>,
    /// From the forward: each query row's log-sum-exp [B, H, Lq] (f32); -inf for a row with no finite logit.
    lse: Saved<Tensor>,
    /// From the CPU forward over at most [`KEPT_PROBS_MAX_KEYS`] keys: the probabilities before dropout.
    probs: Saved<Tensor>,
}

/// Up to this many keys the CPU keeps the probabilities for the backward instead of recomputing them from
/// the log-sum-exp: on short rows (text, 25 tokens; the tiny preset's 17 image tokens) the recomputing
/// product and exponentials cost more than the tile's memory, which PyTorch eager keeps at every length.
/// Longer rows (a ViT-B/16's 197 or 257 image tokens, also the keys of its fusion layers' cross-attention)
/// are recomputed, as on CUDA.
const KEPT_PROBS_MAX_KEYS: usize = 64;

/// Whether the CPU forward keeps the probabilities of a call of these sizes.
fn keeps_probs(dims: Dims) -> bool {
    dims.lk <= KEPT_PROBS_MAX_KEYS
}

/// The inputs of the heads on CPU and what every head shares.
struct HeadArgs<'a> {
    dims: Dims,
    scale: f32,
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    mask: Option<(&'a [f32], MaskGeom)>,
    dropout: Option<(u64, u32, f32)>,
}

/// One block of `side` heads' gradients ([L, side * Dh] each), written in place.
struct HeadGrads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// Two [Lq, Lk] tiles per thread: the probabilities and a second one for p z, then dO v^T and ds.
#[derive(Default)]
struct Scratch {
    p: Vec<f32>,
    pz: Vec<f32>,
}

impl HeadArgs<'_> {
    /// Head `hh`'s q, k and v from their first element to their block's end, rows `width` apart.
    fn head(&self, hh: usize) -> (&[f32], &[f32], &[f32]) {
        let Dims { lq, lk, dh, side, .. } = self.dims;
        let (w, block, at) = (self.dims.width(), hh / side, (hh % side) * dh);
        (
            &self.q[block * lq * w + at..(block + 1) * lq * w],
            &self.k[block * lk * w + at..(block + 1) * lk * w],
            &self.v[block * lk * w + at..(block + 1) * lk * w],
        )
    }

    /// `s = scale q k^T + mask` of head `hh` into `s` [Lq, Lk].
    #[inline(always)]
    fn logits(&self, hh: usize, s: &mut Vec<f32>) {
        let Dims { lq, lk, dh, .. } = self.dims;
        let (qh, kh, _) = self.head(hh);
        let w = self.dims.width();
        s.resize(lq * lk, 0.0);
        cpu::matmul(s, lk, (lq, lk, dh), Mat::rows(qh, w), Mat::transposed(kh, w), self.scale);
        if let Some((m, geom)) = self.mask {
            for (i, row) in s.chunks_mut(lk).enumerate() {
                let (off, step) = (geom.row_offset(hh * lq + i), geom.strides[3]);
                if step == 1 {
                    row.iter_mut().zip(&m[off..off + lk]).for_each(|(x, &mv)| *x += mv);
                } else {
                    row.iter_mut().enumerate().for_each(|(j, x)| *x += m[off + j * step]);
                }
            }
        }
    }

    /// `p = exp(s - shift)` over the tile, each row shifted by its entry of `shifts` (-inf: a row of zeros).
    /// One pass over the whole tile after the shifts: row by row, rows of 17-28 keys left most of a 16-lane
    /// exp in its remainder loop.
    #[inline(always)]
    fn exp_rows(&self, p: &mut [f32], shifts: &[f32]) {
        for (row, &shift) in p.chunks_mut(self.dims.lk).zip(shifts) {
            if shift == f32::NEG_INFINITY {
                row.fill(f32::NEG_INFINITY);
            } else {
                row.iter_mut().for_each(|x| *x -= shift);
            }
        }
        p.iter_mut().for_each(|x| *x = cpu::exp(*x));
    }

    /// Multiplies row `i` of head `hh`'s probabilities by the dropout mask (0 or 1 / keep).
    #[inline(always)]
    fn drop_row(&self, hh: usize, i: usize, row: &mut [f32]) {
        if let Some((seed, threshold, inv_keep)) = self.dropout {
            let base = ((hh * self.dims.lq + i) * self.dims.lk) as u64;
            for (j, x) in row.iter_mut().enumerate() {
                *x = if cpu::dropout_keep(seed, base + j as u64, threshold) { *x * inv_keep } else { 0.0 };
            }
        }
    }

    /// Forward of the heads of `block`: writes their output rows [Lq, side * Dh] (and with `kept` their
    /// probabilities before dropout, [side, Lq, Lk]) and returns the rows' log-sum-exp, head by head.
    #[inline(always)]
    fn forward(&self, block: usize, out: &mut [f32], s: &mut Vec<f32>, mut kept: Option<&mut [f32]>) -> Vec<f32> {
        let Dims { lq, lk, dh, side, .. } = self.dims;
        let mut lse = Vec::with_capacity(side * lq);
        for j in 0..side {
            let hh = block * side + j;
            self.logits(hh, s);
            let max: Vec<f32> = s.chunks(lk).map(cpu::max).collect();
            self.exp_rows(s, &max);
            for (row, m) in s.chunks_mut(lk).zip(max) {
                if m == f32::NEG_INFINITY {
                    lse.push(m);
                    continue;
                }
                let sum = cpu::sum(row);
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
                lse.push(m + sum.ln());
            }
            if let Some(kept) = kept.as_deref_mut() {
                kept[j * lq * lk..(j + 1) * lq * lk].copy_from_slice(s);
            }
            for (i, row) in s.chunks_mut(lk).enumerate() {
                self.drop_row(hh, i, row);
            }
            let w = self.dims.width();
            cpu::matmul(&mut out[j * dh..], w, (lq, dh, lk), Mat::rows(s, lk), Mat::rows(self.head(hh).2, w), 1.0);
        }
        lse
    }

    /// Backward of the heads of `block` from their output `o`, upstream gradient `go` (rows [Lq, side * Dh])
    /// and `lse`, or the probabilities the forward `kept`: writes their dq, dk, dv.
    #[inline(always)]
    fn backward(
        &self, block: usize, (o, go, lse): (&[f32], &[f32], &[f32]), kept: Option<&[f32]>, g: HeadGrads,
        scratch: &mut Scratch,
    ) {
        let Dims { lq, lk, dh, side, .. } = self.dims;
        let w = self.dims.width();
        let Scratch { p: recomputed, pz } = scratch;
        for j in 0..side {
            let hh = block * side + j;
            let (qh, kh, vh) = self.head(hh);
            let (oh, goh) = (&o[j * dh..], &go[j * dh..]);
            let p: &[f32] = match kept {
                Some(kept) => &kept[j * lq * lk..(j + 1) * lq * lk],
                None => {
                    self.logits(hh, recomputed);
                    self.exp_rows(recomputed, &lse[j * lq..(j + 1) * lq]);
                    recomputed
                }
            };
            // dV = (p z)^T dO.
            let dropped = if self.dropout.is_some() {
                pz.clear();
                pz.extend_from_slice(p);
                for (i, row) in pz.chunks_mut(lk).enumerate() {
                    self.drop_row(hh, i, row);
                }
                &pz[..]
            } else {
                p
            };
            cpu::matmul(&mut g.dv[j * dh..], w, (lk, dh, lq), Mat::transposed(dropped, lk), Mat::rows(goh, w), 1.0);
            pz.resize(lq * lk, 0.0);
            // ds = p (z (dO v^T) - D), reusing pz for dO v^T.
            cpu::matmul(pz, lk, (lq, lk, dh), Mat::rows(goh, w), Mat::transposed(vh, w), 1.0);
            for i in 0..lq {
                let d = cpu::dot(&goh[i * w..i * w + dh], &oh[i * w..i * w + dh]);
                let dp = &mut pz[i * lk..(i + 1) * lk];
                self.drop_row(hh, i, dp);
                dp.iter_mut().zip(&p[i * lk..(i + 1) * lk]).for_each(|(g, &pv)| *g = pv * (*g - d));
            }
            cpu::matmul(&mut g.dq[j * dh..], w, (lq, dh, lk), Mat::rows(pz, lk), Mat::rows(kh, w), self.scale);
            cpu::matmul(&mut g.dk[j * dh..], w, (lk, dh, lq), Mat::transposed(pz, lk), Mat::rows(qh, w), self.scale);
        }
    }
}

cpu::multiversion! {
    /// [`HeadArgs::forward`] at the CPU's vector width.
    fn block_forward(
        args: &HeadArgs<'_>, block: usize, out: &mut [f32], s: &mut Vec<f32>, kept: Option<&mut [f32]>,
    ) -> Vec<f32> {
        args.forward(block, out, s, kept)
    }
}

cpu::multiversion! {
    /// [`HeadArgs::backward`] at the CPU's vector width.
    fn block_backward(
        args: &HeadArgs<'_>, block: usize, rows: (&[f32], &[f32], &[f32]), kept: Option<&[f32]>,
        grads: HeadGrads<'_>, scratch: &mut Scratch,
    ) {
        args.backward(block, rows, kept, grads, scratch)
    }
}

impl Attention {
    /// The core for scores of shape `scores`, read in `work`; a mask that does not broadcast to the scores
    /// fails here, with the shapes named, rather than inside the op.
    fn new(
        scale: f64, mask: Option<&Tensor>, scores: Shape, dropout: Option<AttnDropout>, work: DType,
    ) -> Result<Self> {
        let mask = match mask {
            Some(m) => {
                m.layout().broadcast_as(scores)?;
                Some(m.to_dtype(work)?.detach())
            }
            None => None,
        };
        let (lse, probs) = (Saved::new("attention"), Saved::new("attention"));
        Ok(Attention { scale: scale as f32, mask, dropout, lse, probs })
    }

    fn dropout_consts(&self) -> Option<(u64, u32, f32)> {
        self.dropout.map(|d| (d.seed, cpu::dropout_threshold(d.p), 1.0 / (1.0 - d.p) as f32))
    }

    /// Runs `f` with the CPU arguments every head shares.
    fn with_cpu_args<R>(
        &self, dims: Dims, [q, k, v]: [&[f32]; 3], f: impl FnOnce(&HeadArgs) -> Result<R>,
    ) -> Result<R> {
        let guard = self.mask.as_ref().map(|m| m.storage_and_layout());
        let mask = match &guard {
            Some((storage, layout)) => match &**storage {
                Storage::Cpu(CpuStorage::F32(m)) => Some((m.as_slice(), MaskGeom::new(&dims.scores(), layout)?)),
                _ => bail!("attention: the mask must be f32 on the CPU"),
            },
            None => None,
        };
        f(&HeadArgs { dims, scale: self.scale, q, k, v, mask, dropout: self.dropout_consts() })
    }

    /// The forward on the CPU: blocks of `dims.side` heads (one batch element on tokens) spread over the
    /// compute threads; keeps the log-sum-exp.
    fn cpu_forward(
        &self, dims: Dims, (s1, l1): (&CpuStorage, &Layout), (s2, l2): (&CpuStorage, &Layout),
        (s3, l3): (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let q = cpu::f32_slice(s1, l1, "attention q")?;
        let k = cpu::f32_slice(s2, l2, "attention k")?;
        let v = cpu::f32_slice(s3, l3, "attention v")?;
        let (out, lse) = self.with_cpu_args(dims, [q, k, v], |args| {
            let Dims { lq, lk, side, .. } = dims;
            // SAFETY: every block's forward writes its output rows in full, and its probabilities if kept.
            let mut out = unsafe { cpu::output(q.len()) };
            let mut probs = keeps_probs(dims).then(|| unsafe { cpu::output(dims.bh() * lq * lk) });
            let block_probs = (side * lq * lk).max(1);
            let kept: Vec<Option<&mut [f32]>> = match &mut probs {
                Some(p) => p.chunks_mut(block_probs).map(Some).collect(),
                None => (0..dims.bh() / side).map(|_| None).collect(),
            };
            let blocks: Vec<_> = out.chunks_mut(lq * dims.width()).zip(kept).enumerate().collect();
            let lse = cpu::par_map(blocks, dims.bh() * lq * lk, Vec::new, |s, (b, (o, kept))| {
                block_forward(args, b, o, s, kept)
            });
            if let Some(p) = probs {
                self.probs.keep(Tensor::from_vec(p, dims.scores(), &Device::Cpu)?)?;
            }
            Ok((out, lse.concat()))
        })?;
        self.lse.keep(Tensor::from_vec(lse, (dims.b, dims.h, dims.lq), &Device::Cpu)?)?;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    /// The backward on the CPU from the op's inputs and output `[q, k, v, o]` and the upstream gradient.
    fn cpu_backward(&self, dims: Dims, [q, k, v, o]: [&Tensor; 4], go: &Tensor) -> Result<[Tensor; 3]> {
        let go = go.to_dtype(DType::F32)?.contiguous()?;
        let lse = self.lse.get()?;
        let probs = keeps_probs(dims).then(|| self.probs.get()).transpose()?;
        let guards: Vec<_> =
            [q, k, v, o, &go, &lse].into_iter().chain(&probs).map(|t| t.storage_and_layout()).collect();
        let slice = |i: usize, what: &str| match &*guards[i].0 {
            Storage::Cpu(s) => cpu::f32_slice(s, guards[i].1, what),
            _ => bail!("attention backward: {what} is not on the CPU"),
        };
        let (qs, ks, vs) = (slice(0, "q")?, slice(1, "k")?, slice(2, "v")?);
        let (os, gs, ls) = (slice(3, "output")?, slice(4, "gradient")?, slice(5, "log-sum-exp")?);
        let ps = probs.is_some().then(|| slice(6, "probabilities")).transpose()?;
        self.with_cpu_args(dims, [qs, ks, vs], |args| {
            let Dims { lq, lk, side, .. } = dims;
            let w = dims.width();
            // SAFETY: every block's backward writes its dq, dk and dv in full (gemm without reading them).
            let (mut dq, mut dk, mut dv) =
                unsafe { (cpu::output(qs.len()), cpu::output(ks.len()), cpu::output(vs.len())) };
            let blocks: Vec<(usize, HeadGrads)> = dq
                .chunks_mut(lq * w)
                .zip(dk.chunks_mut(lk * w))
                .zip(dv.chunks_mut(lk * w))
                .map(|((dq, dk), dv)| HeadGrads { dq, dk, dv })
                .enumerate()
                .collect();
            cpu::par_map(blocks, dims.bh() * lq * lk * 2, Scratch::default, |scratch, (b, g)| {
                let rows = b * lq * w..(b + 1) * lq * w;
                let block = (&os[rows.clone()], &gs[rows], &ls[b * side * lq..(b + 1) * side * lq]);
                let kept = ps.map(|p| &p[b * side * lq * lk..(b + 1) * side * lq * lk]);
                block_backward(args, b, block, kept, g, scratch)
            });
            let tensor = |d: Vec<f32>, t: &Tensor| Tensor::from_vec(d, t.shape(), &Device::Cpu);
            Ok([tensor(dq, q)?, tensor(dk, k)?, tensor(dv, v)?])
        })
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "alignfuse-attention"
    }

    fn cpu_fwd(
        &self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::new(l1.shape(), l2.shape(), l3.shape())?;
        self.cpu_forward(dims, (s1, l1), (s2, l2), (s3, l3))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
        s3: &candle_core::CudaStorage, l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let args = self.kernel_args(Dims::new(l1.shape(), l2.shape(), l3.shape())?)?;
        let (out, lse) = gpu::forward(args, (s1, l1), (s2, l2), (s3, l3), self.mask.as_ref())?;
        self.lse.keep(lse)?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [dq, dk, dv] = match q.device() {
            Device::Cpu => self.cpu_backward(Dims::new(q.shape(), k.shape(), v.shape())?, [q, k, v, o], grad)?,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => {
                let dims = Dims::new(q.shape(), k.shape(), v.shape())?;
                let grad = grad.to_dtype(o.dtype())?.contiguous()?;
                gpu::backward(self.kernel_args(dims)?, [q, k, v, &grad], &self.lse.get()?, self.mask.as_ref())?
            }
            other => bail!("attention: no backward on {other:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(feature = "cuda")]
impl Attention {
    fn kernel_args(&self, dims: Dims) -> Result<gpu::KernelArgs> {
        gpu::KernelArgs::new(dims, self.scale, self.dropout_consts().unwrap_or((0, 0, 1.0)))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::{Dims, MaskGeom};
    use crate::ops::cuda::{contiguous, int, per_row, ATTENTION};
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchArgs, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{
        bail, CudaDevice, CudaStorage, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
    };

    /// `AttnArgs` of kernels/attention.cu, field for field (`#[repr(C)]` lays it out as the C struct).
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub(super) struct KernelArgs {
        bh: i32,
        lq: i32,
        lk: i32,
        dh: i32,
        scale: f32,
        seed: u64,
        threshold: u32,
        inv_keep: f32,
        d1: i32,
        d2: i32,
        ms: [i64; 4],
    }

    // SAFETY: a plain #[repr(C)] struct of numbers, passed by value as the kernels' `AttnArgs`.
    unsafe impl DeviceRepr for KernelArgs {}

    impl KernelArgs {
        pub(super) fn new(dims: Dims, scale: f32, (seed, threshold, inv_keep): (u64, u32, f32)) -> Result<Self> {
            Ok(KernelArgs {
                bh: int(dims.bh(), "attention heads")?,
                lq: int(dims.lq, "attention queries")?,
                lk: int(dims.lk, "attention keys")?,
                dh: int(dims.dh, "attention head width")?,
                scale,
                seed,
                threshold,
                inv_keep,
                d1: 1,
                d2: 1,
                ms: [0; 4],
            })
        }

        fn with_mask(mut self, geom: Option<MaskGeom>) -> Self {
            if let Some(g) = geom {
                (self.d1, self.d2) = (g.d1 as i32, g.d2 as i32);
                self.ms = g.strides.map(|s| s as i64);
            }
            self
        }

        /// Score rows (query rows of every head).
        fn rows(&self) -> usize {
            self.bh as usize * self.lq as usize
        }
    }

    fn on_gpu<'a>(s: &'a Storage, what: &str) -> Result<&'a CudaStorage> {
        match s {
            Storage::Cuda(c) => Ok(c),
            _ => bail!("attention: {what} is not on the GPU"),
        }
    }

    /// The mask's elements from its first entry on, and where each score row's entries sit, for q and k
    /// of layouts `ql` and `kl`; (None, None) without a mask.
    fn mask_arg<'a, T: CudaDType, G: std::ops::Deref<Target = Storage>>(
        guard: &'a Option<(G, &Layout)>, ql: &Layout, kl: &Layout,
    ) -> Result<(Option<CudaView<'a, T>>, Option<MaskGeom>)> {
        let Some((s, l)) = guard else { return Ok((None, None)) };
        let (qd, kd) = (ql.dims(), kl.dims());
        let geom = MaskGeom::new(&Shape::from((qd[0], qd[1], qd[2], kd[2])), l)?;
        Ok((Some(on_gpu(s, "the mask")?.as_cuda_slice::<T>()?.slice(geom.offset..)), Some(geom)))
    }

    /// The elements of a contiguous tensor on the GPU, from its `storage_and_layout()`.
    fn view<'a, T: CudaDType + DeviceRepr, G: std::ops::Deref<Target = Storage>>(
        (storage, layout): &'a (G, &Layout), what: &str,
    ) -> Result<CudaView<'a, T>> {
        contiguous(on_gpu(storage, what)?.as_cuda_slice::<T>()?, layout, what)
    }

    /// Pushes the scores and the mask (or a null pointer), the arguments both row kernels start with.
    fn push_scores<'a, T>(b: &mut LaunchArgs<'a>, s: &'a CudaView<'a, T>, mask: &'a Option<CudaView<'a, T>>) {
        b.arg(s);
        match mask {
            Some(m) => b.arg(m),
            None => b.arg(&0usize),
        };
    }

    fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: &Shape) -> Tensor {
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
        Tensor::from_storage(storage, shape.clone(), BackpropOp::none(), false)
    }

    /// The forward on the GPU: s = q k^T (cuBLAS), pz = dropout(softmax(s * scale + mask)) with each row's
    /// log-sum-exp (attn_probs_fwd), o = pz v (cuBLAS). Returns o's storage and lse [B, H, Lq] (f32); s and
    /// pz are freed here.
    pub(super) fn forward(
        args: KernelArgs, q: (&CudaStorage, &Layout), k: (&CudaStorage, &Layout), v: (&CudaStorage, &Layout),
        mask: Option<&Tensor>,
    ) -> Result<(CudaStorage, Tensor)> {
        match q.0.dtype() {
            DType::F32 => fwd::<f32>(args, q, k, v, mask),
            DType::BF16 => fwd::<half::bf16>(args, q, k, v, mask),
            other => bail!("attention: no CUDA kernel for {other:?} (expects f32 or bf16)"),
        }
    }

    fn fwd<T: CudaDType + DeviceRepr + WithDType>(
        args: KernelArgs, (q, ql): (&CudaStorage, &Layout), (k, kl): (&CudaStorage, &Layout),
        (v, vl): (&CudaStorage, &Layout), mask: Option<&Tensor>,
    ) -> Result<(CudaStorage, Tensor)> {
        let dev = &q.device;
        let (bh, lq, lk, dh) = (args.bh as usize, args.lq as usize, args.lk as usize, args.dh as usize);
        for (l, what) in [(ql, "q"), (kl, "k"), (vl, "v")] {
            if !l.is_contiguous() {
                bail!("attention: {what} must be contiguous");
            }
        }
        // [B, H, L, Dh] as a batch of B * H matrices.
        let heads = |l: &Layout, rows: usize| Layout::contiguous_with_offset((bh, rows, dh), l.start_offset());
        let scores = q.matmul(k, (bh, lq, lk, dh), &heads(ql, lq), &heads(kl, lk).transpose(1, 2)?)?;
        let guard = mask.map(|m| m.storage_and_layout());
        let (mask_view, geom) = mask_arg::<T, _>(&guard, ql, kl)?;
        let args = args.with_mask(geom);
        let s = scores.as_cuda_slice::<T>()?.slice(..);
        // SAFETY: attn_probs_fwd writes every element of both.
        let (pz, lse) = unsafe { (dev.alloc::<T>(args.rows() * lk)?, dev.alloc::<f32>(args.rows())?) };
        if args.rows() > 0 {
            let (func, stream) = ATTENTION.func::<T>(dev, "attn_probs_fwd")?;
            let mut b = stream.launch_builder(&func);
            push_scores(&mut b, &s, &mask_view);
            b.arg(&pz);
            b.arg(&lse);
            b.arg(&args);
            // SAFETY: argument types and order match attn_probs_fwd in kernels/attention.cu.
            unsafe { b.launch(per_row(args.rows())) }.w()?;
        }
        let pz = CudaStorage::wrap_cuda_slice(pz, dev.clone());
        let o = pz.matmul(v, (bh, lq, dh, lk), &Layout::contiguous((bh, lq, lk)), &heads(vl, lk))?;
        let lse_shape = Shape::from((ql.dims()[0], ql.dims()[1], ql.dims()[2]));
        Ok((o, wrap(lse, dev, &lse_shape)))
    }

    /// The backward on the GPU from [q, k, v, upstream gradient] (contiguous, one dtype) and the forward's
    /// lse: s = q k^T and dpz = do v^T (cuBLAS), pz and ds (attn_probs_bwd), then dv = pz^T do, dq = ds k,
    /// dk = ds^T q (cuBLAS).
    pub(super) fn backward(
        args: KernelArgs, tensors: [&Tensor; 4], lse: &Tensor, mask: Option<&Tensor>,
    ) -> Result<[Tensor; 3]> {
        match tensors[0].dtype() {
            DType::F32 => bwd::<f32>(args, tensors, lse, mask),
            DType::BF16 => bwd::<half::bf16>(args, tensors, lse, mask),
            other => bail!("attention backward: no CUDA kernel for {other:?} (expects f32 or bf16)"),
        }
    }

    fn bwd<T: CudaDType + DeviceRepr + WithDType>(
        args: KernelArgs, tensors: [&Tensor; 4], lse: &Tensor, mask: Option<&Tensor>,
    ) -> Result<[Tensor; 3]> {
        let [q, k, v, go] = tensors.map(|t| t.detach());
        let Device::Cuda(dev) = q.device() else { bail!("attention backward: q is not on the GPU") };
        let (s, dpz) = (q.matmul(&k.t()?)?, go.matmul(&v.t()?)?);
        let guard = mask.map(|m| m.storage_and_layout());
        let (mask_view, geom) = mask_arg::<T, _>(&guard, q.layout(), k.layout())?;
        let args = args.with_mask(geom);
        let n = args.rows() * args.lk as usize;
        // SAFETY: attn_probs_bwd writes every element of both.
        let (pz, ds) = unsafe { (dev.alloc::<T>(n)?, dev.alloc::<T>(n)?) };
        if args.rows() > 0 {
            let guards = [s.storage_and_layout(), dpz.storage_and_layout(), lse.storage_and_layout()];
            let (s_view, dpz_view) = (view::<T, _>(&guards[0], "scores")?, view::<T, _>(&guards[1], "dpz")?);
            let lse_view = view::<f32, _>(&guards[2], "log-sum-exp")?;
            let (func, stream) = ATTENTION.func::<T>(dev, "attn_probs_bwd")?;
            let mut b = stream.launch_builder(&func);
            push_scores(&mut b, &s_view, &mask_view);
            b.arg(&lse_view);
            b.arg(&dpz_view);
            b.arg(&pz);
            b.arg(&ds);
            b.arg(&args);
            // SAFETY: argument types and order match attn_probs_bwd in kernels/attention.cu.
            unsafe { b.launch(per_row(args.rows())) }.w()?;
        }
        let (pz, ds) = (wrap(pz, dev, s.shape()), wrap(ds, dev, s.shape()));
        Ok([ds.matmul(&k)?, ds.t()?.matmul(&q)?, pz.t()?.matmul(&go)?])
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_err, rng, uniform};
    use super::super::{attention, AttnDropout, Kernels};
    use super::attention_fused;
    use candle_core::{DType, Device, Result, Tensor, Var};
    use rand::Rng;

    /// Output and d(sum(o * w))/d(q, k, v).
    fn run(
        [q, k, v]: [&Tensor; 3], mask: Option<&Tensor>, dropout: Option<AttnDropout>, w: &Tensor, kernels: Kernels,
    ) -> Result<Vec<Tensor>> {
        let (q, k, v) = (Var::from_tensor(q)?, Var::from_tensor(k)?, Var::from_tensor(v)?);
        let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
        // Fused: the core op at every size (the public function composes below its size threshold).
        let o = match kernels {
            Kernels::Fused => attention_fused(q, k, v, 0.125, mask, dropout.filter(|d| d.p > 0.0), DType::F32)?,
            Kernels::Reference => attention(q, k, v, 0.125, mask, dropout, kernels)?,
        };
        let grads = (o.to_dtype(DType::F32)? * w)?.sum_all()?.backward()?;
        let get = |t: &Tensor| grads.get(t).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()));
        Ok(vec![o.clone(), get(q)?, get(k)?, get(v)?])
    }

    /// BERT padding: per batch row a random number of attended keys, the rest -10000.
    fn padding(r: &mut rand_chacha::ChaCha8Rng, b: usize, lk: usize) -> Result<Tensor> {
        let keep: Vec<usize> = (0..b).map(|_| r.random_range(1..=lk)).collect();
        let v: Vec<f32> = (0..b * lk).map(|i| if i % lk < keep[i / lk] { 0.0 } else { -10000.0 }).collect();
        Tensor::from_vec(v, (b, 1, 1, lk), &Device::Cpu)
    }

    fn compare(label: &str, got: &[Tensor], want: &[Tensor], tol: f64) -> Result<()> {
        for (name, (g, w)) in ["o", "dq", "dk", "dv"].iter().zip(got.iter().zip(want)) {
            let err = max_err(g, w)?.1;
            assert!(err <= tol, "{label}: {name} error {err:e}");
        }
        Ok(())
    }

    #[test]
    fn matches_reference_forward_and_gradients() -> Result<()> {
        let mut r = rng(21);
        // (B, H, Lq, Lk, Dh): text self-attention, cross-attention to image tokens, a ViT, odd sizes, and
        // enough heads to spread over the thread pool; 257 keys are past KEPT_PROBS_MAX_KEYS, so the
        // backward recomputes the probabilities there and reads the kept ones elsewhere.
        for (b, h, lq, lk, dh) in
            [(1, 1, 1, 1, 1), (2, 3, 5, 7, 4), (3, 4, 25, 25, 16), (2, 2, 9, 257, 32), (4, 12, 50, 50, 64)]
        {
            let q = uniform(&mut r, &[b, h, lq, dh], 2.0, &Device::Cpu)?;
            let k = uniform(&mut r, &[b, h, lk, dh], 2.0, &Device::Cpu)?;
            let v = uniform(&mut r, &[b, h, lk, dh], 1.0, &Device::Cpu)?;
            let w = uniform(&mut r, &[b, h, lq, dh], 1.0, &Device::Cpu)?;
            let mask = padding(&mut r, b, lk)?;
            for (masked, p) in [(false, 0.0), (true, 0.0), (true, 0.1), (false, 0.5)] {
                let m = masked.then_some(&mask);
                let d = Some(AttnDropout { p, seed: 7 + b as u64 });
                let label = format!("[{b}, {h}, {lq}, {lk}, {dh}] mask={masked} p={p}");
                let got = run([&q, &k, &v], m, d, &w, Kernels::Fused)?;
                let want = run([&q, &k, &v], m, d, &w, Kernels::Reference)?;
                compare(&label, &got, &want, 1e-5)?;
            }
        }
        Ok(())
    }

    /// On tokens [B, L, H * Dh], the one-node op equals the fused split, core and merge to the bit and the
    /// reference composition to 1e-5, values and gradients.
    #[test]
    fn heads_inside_match_split_core_and_merge() -> Result<()> {
        use super::super::{merge_heads, multi_head_attention, split_heads};
        let mut r = rng(23);
        for (b, h, lq, lk, dh) in [(1, 1, 1, 1, 1), (3, 4, 25, 25, 16), (2, 2, 9, 17, 8)] {
            let t = |l: usize, range: f32, r: &mut _| uniform(r, &[b, l, h * dh], range, &Device::Cpu);
            let (q, k, v, w) = (t(lq, 2.0, &mut r)?, t(lk, 2.0, &mut r)?, t(lk, 1.0, &mut r)?, t(lq, 1.0, &mut r)?);
            let mask = padding(&mut r, b, lk)?;
            for (m, p) in [(None, 0.0), (Some(&mask), 0.1)] {
                let d = Some(AttnDropout { p, seed: 3 });
                let run = |one_node: bool, kernels: Kernels| -> Result<Vec<Tensor>> {
                    let [q, k, v] = [&q, &k, &v].map(|x| Var::from_tensor(x).expect("a variable"));
                    let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                    let o = if one_node {
                        multi_head_attention(q, k, v, h, 0.125, m, d, kernels)?
                    } else {
                        let split = |x: &Tensor| split_heads(x, h, kernels);
                        merge_heads(&attention(&split(q)?, &split(k)?, &split(v)?, 0.125, m, d, kernels)?, kernels)?
                    };
                    let grads = (&o * &w)?.sum_all()?.backward()?;
                    let get = |t: &Tensor| grads.get(t).cloned().expect("a gradient");
                    Ok(vec![o.clone(), get(q), get(k), get(v)])
                };
                let label = format!("[{b}, {lq}, {h} x {dh}] keys {lk} p={p}");
                let got = run(true, Kernels::Fused)?;
                compare(&label, &got, &run(false, Kernels::Fused)?, 0.0)?;
                compare(&label, &got, &run(true, Kernels::Reference)?, 1e-5)?;
            }
        }
        Ok(())
    }

    #[test]
    fn dropout_draws_its_rate_and_the_seed_fixes_it() -> Result<()> {
        let mut r = rng(22);
        let (q, k) =
            (uniform(&mut r, &[2, 4, 64, 8], 1.0, &Device::Cpu)?, uniform(&mut r, &[2, 4, 64, 8], 1.0, &Device::Cpu)?);
        let v = Tensor::ones((2, 4, 64, 8), DType::F32, &Device::Cpu)?;
        let d = AttnDropout { p: 0.3, seed: 5 };
        let mask = d.mask(&[2, 4, 64, 64], &Device::Cpu)?;
        let kept = mask.ne(0f32)?.to_dtype(DType::F32)?.mean_all()?.to_scalar::<f32>()?;
        // 32768 draws: sd of the kept fraction ~0.0025.
        assert!((kept - 0.7).abs() < 0.0125, "kept {kept}");
        let a = attention(&q, &k, &v, 1.0, None, Some(d), Kernels::Fused)?;
        let b = attention(&q, &k, &v, 1.0, None, Some(d), Kernels::Fused)?;
        let c = attention(&q, &k, &v, 1.0, None, Some(AttnDropout { seed: 6, ..d }), Kernels::Fused)?;
        assert_eq!(max_err(&a, &b)?.0, 0.0);
        assert!(max_err(&a, &c)?.0 > 0.1);
        Ok(())
    }

    #[test]
    fn strided_low_precision_and_fully_masked_rows() -> Result<()> {
        let mut r = rng(23);
        // Projections split into heads: [B, L, H, Dh] transposed, not contiguous.
        let split = |t: Tensor| t.transpose(1, 2);
        let q = split(uniform(&mut r, &[2, 6, 3, 8], 2.0, &Device::Cpu)?)?;
        let k = split(uniform(&mut r, &[2, 9, 3, 8], 2.0, &Device::Cpu)?)?;
        let v = split(uniform(&mut r, &[2, 9, 3, 8], 1.0, &Device::Cpu)?)?;
        let w = uniform(&mut r, &[2, 3, 6, 8], 1.0, &Device::Cpu)?;
        // Batch 1's keys all masked with -inf: its rows give zeros (the reference gives NaN).
        let m: Vec<f32> = (0..18).map(|i| if i < 9 { 0.0 } else { f32::NEG_INFINITY }).collect();
        let mask = Tensor::from_vec(m, (2, 1, 1, 9), &Device::Cpu)?;
        let got = run([&q, &k, &v], Some(&mask), None, &w, Kernels::Fused)?;
        let want = run([&q, &k, &v], Some(&mask), None, &w, Kernels::Reference)?;
        let first = |ts: &[Tensor]| ts.iter().map(|t| t.narrow(0, 0, 1)).collect::<Result<Vec<_>>>();
        compare("strided, batch 0", &first(&got)?, &first(&want)?, 1e-5)?;
        for t in &got {
            assert!(t.narrow(0, 1, 1)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|&x| x == 0.0));
        }

        for dtype in [DType::BF16, DType::F16] {
            let (ql, kl, vl) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?, v.to_dtype(dtype)?);
            let got = run([&ql, &kl, &vl], None, None, &w, Kernels::Fused)?;
            assert!(got.iter().all(|t| t.dtype() == dtype), "{dtype:?}");
            let f32s = |t: &Tensor| t.to_dtype(DType::F32);
            let want = run([&f32s(&ql)?, &f32s(&kl)?, &f32s(&vl)?], None, None, &w, Kernels::Reference)?;
            compare(&format!("{dtype:?}"), &got, &want, 2e-2)?;
        }
        Ok(())
    }

    #[test]
    fn bad_shapes_and_rates_are_errors() -> Result<()> {
        let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu);
        let (q, k) = (t(&[2, 3, 4, 8])?, t(&[2, 3, 5, 8])?);
        for kernels in [Kernels::Fused, Kernels::Reference] {
            assert!(attention(&q, &k, &t(&[2, 3, 6, 8])?, 1.0, None, None, kernels).is_err());
            assert!(attention(&q, &t(&[2, 3, 5, 7])?, &t(&[2, 3, 5, 7])?, 1.0, None, None, kernels).is_err());
            assert!(attention(&q, &k, &k, 1.0, Some(&t(&[2, 1, 1, 4])?), None, kernels).is_err());
            assert!(attention(&q, &k, &k, 1.0, None, Some(AttnDropout { p: 1.0, seed: 0 }), kernels).is_err());
        }
        assert!(attention(&t(&[3, 4, 8])?, &t(&[3, 5, 8])?, &t(&[3, 5, 8])?, 1.0, None, None, Kernels::Fused).is_err());
        Ok(())
    }
}
