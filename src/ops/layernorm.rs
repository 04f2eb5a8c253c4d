//! Fused LayerNorm over the last dimension, `y = (x - mean) * rstd * w + b` with `rstd = 1 / sqrt(var +
//! eps)` (biased variance, as torch), and its backward in one op: per row, with `xhat = (x - mean) * rstd`
//! and `gw = g * w`, `dx = rstd * (gw - mean(gw) - xhat * mean(gw * xhat))`; over rows, `dw = sum(g * xhat)`
//! and `db = sum(g)`. The composed version runs nine ops forward and about twenty backward, two of them
//! strided reductions over rows for `dw` and `db`. The backward returns dx, dw and db packed in one flat
//! tensor (a custom op has one output). CUDA kernels: kernels/layernorm.cu. f32 only: LayerNorm runs in
//! f32 under bf16 autocast too.

use super::cpu;
use super::saved::Saved;
use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Tensor};

/// The fused path of [`super::layer_norm`], for f32 `x`.
pub(super) fn layer_norm_fused(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = *x.dims().last().unwrap_or(&0);
    if weight.dims() != [d] || bias.dims() != [d] {
        bail!("layer_norm: weight {:?} and bias {:?} must be [{d}]", weight.dims(), bias.dims());
    }
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, LayerNorm { eps: eps as f32 })
}

struct LayerNorm {
    eps: f32,
}

/// The fused path of [`super::add_layer_norm`]: `layer_norm(a + x)` for f32 `a` and `x` of one shape, as one
/// node that keeps the sum itself. As two nodes (BERT's residual add, then its LayerNorm), the backward
/// zeroed and accumulated a gradient for the sum, on the driver thread, and the add ran there too.
/// `weight` and `bias` enter stacked ([2, D]): a custom op has three inputs.
pub(super) fn add_layer_norm_fused(a: &Tensor, x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = *x.dims().last().unwrap_or(&0);
    if a.dims() != x.dims() || weight.dims() != [d] || bias.dims() != [d] {
        bail!(
            "add_layer_norm: a {:?}, x {:?}, weight {:?} and bias {:?} do not fit",
            a.dims(),
            x.dims(),
            weight.dims(),
            bias.dims()
        );
    }
    let op = AddLayerNorm { eps: eps as f32, sum: Saved::new("add_layer_norm") };
    a.contiguous()?.apply_op3(&x.contiguous()?, &Tensor::stack(&[weight, bias], 0)?, op)
}

struct AddLayerNorm {
    eps: f32,
    /// `a + x`, from the forward.
    sum: Saved<Tensor>,
}

/// Writes `x - mean` into `out` and returns (mean, rstd) of the row.
#[inline(always)]
fn center(x: &[f32], out: &mut [f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = cpu::sum(x) / n;
    let x = &x[..out.len()];
    for j in 0..out.len() {
        out[j] = x[j] - mean;
    }
    let var = cpu::dot(out, out) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

cpu::multiversion! {
    /// One row of the forward into `y`.
    fn forward_row(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], eps: f32) {
        let (_, rstd) = center(x, y, eps);
        let (w, b) = (&w[..y.len()], &b[..y.len()]);
        for j in 0..y.len() {
            y[j] = y[j] * rstd * w[j] + b[j];
        }
    }
}

cpu::multiversion! {
    /// One row of `a + x` into `sum`.
    fn add_row(a: &[f32], x: &[f32], sum: &mut [f32]) {
        let (a, x) = (&a[..sum.len()], &x[..sum.len()]);
        for j in 0..sum.len() {
            sum[j] = a[j] + x[j];
        }
    }
}

cpu::multiversion! {
    /// One row of dx into `dx` (`gw` is scratch); returns the row's (mean, rstd) for dw.
    fn backward_row(x: &[f32], g: &[f32], w: &[f32], gw: &mut Vec<f32>, dx: &mut [f32], eps: f32) -> (f32, f32) {
        let d = dx.len();
        let (mean, rstd) = center(x, dx, eps);
        gw.resize(d, 0.0);
        let (g, w, gw) = (&g[..d], &w[..d], &mut gw[..d]);
        for j in 0..d {
            dx[j] *= rstd;
            gw[j] = g[j] * w[j];
        }
        let (c1, c2) = (cpu::sum(gw) / d as f32, cpu::dot(gw, dx) / d as f32);
        for j in 0..d {
            dx[j] = rstd * (gw[j] - c1 - dx[j] * c2);
        }
        (mean, rstd)
    }
}

/// LayerNorm of every row of `x` (rows of `w.len()`), on the compute threads.
fn forward_rows(x: &[f32], w: &[f32], b: &[f32], eps: f32) -> Vec<f32> {
    let d = w.len();
    // SAFETY: map_rows writes every row.
    let mut y = unsafe { cpu::output(x.len()) };
    cpu::map_rows(&mut y, d, || (), |_, r, yr| forward_row(&x[r * d..(r + 1) * d], w, b, yr, eps));
    y
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "alignfuse-layer-norm"
    }

    fn cpu_fwd(
        &self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, b) = (
            cpu::f32_slice(s1, l1, "layer_norm x")?,
            cpu::f32_slice(s2, l2, "layer_norm weight")?,
            cpu::f32_slice(s3, l3, "layer_norm bias")?,
        );
        Ok((CpuStorage::F32(forward_rows(x, w, b, self.eps)), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
        s3: &candle_core::CudaStorage, l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::forward(self.eps, (s1, l1), (s2, l2), (s3, l3))
    }

    fn bwd(
        &self, x: &Tensor, w: &Tensor, _b: &Tensor, _y: &Tensor, g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dwb) = backward(x, w, g, self.eps)?;
        let d = w.elem_count();
        Ok((Some(dx), Some(dwb.narrow(0, 0, d)?), Some(dwb.narrow(0, d, d)?)))
    }
}

/// The gradients of LayerNorm's input `x` and of its weight and bias (concatenated, [2 * D]) from the output's
/// gradient `g`.
fn backward(x: &Tensor, w: &Tensor, g: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let (n, d) = (x.elem_count(), w.elem_count());
    let packed = x.apply_op3_no_bwd(w, &g.contiguous()?, &LayerNormBwd { eps })?;
    Ok((packed.narrow(0, 0, n)?.reshape(x.shape())?, packed.narrow(0, n, 2 * d)?))
}

impl CustomOp3 for AddLayerNorm {
    fn name(&self) -> &'static str {
        "alignfuse-add-layer-norm"
    }

    fn cpu_fwd(
        &self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, x, wb) = (
            cpu::f32_slice(s1, l1, "add_layer_norm a")?,
            cpu::f32_slice(s2, l2, "add_layer_norm x")?,
            cpu::f32_slice(s3, l3, "add_layer_norm weight and bias")?,
        );
        let d = wb.len() / 2;
        let (w, b) = wb.split_at(d);
        // SAFETY: map_rows writes every row.
        let mut sum = unsafe { cpu::output(a.len()) };
        cpu::map_rows(&mut sum, d, || (), |_, r, sr| add_row(&a[r * d..(r + 1) * d], &x[r * d..(r + 1) * d], sr));
        let y = forward_rows(&sum, w, b, self.eps);
        self.sum.keep(Tensor::from_vec(sum, l1.shape(), &Device::Cpu)?)?;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
        s3: &candle_core::CudaStorage, l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let sum = s1.binary_impl::<candle_core::op::Add>(s2, l1, l2)?;
        let (d, at) = (l3.shape().elem_count() / 2, l3.start_offset());
        let (w, b) = (Layout::contiguous_with_offset(d, at), Layout::contiguous_with_offset(d, at + d));
        let (y, shape) = gpu::forward(self.eps, (&sum, &Layout::contiguous(l1.shape())), (s3, &w), (s3, &b))?;
        let none = candle_core::op::BackpropOp::none();
        self.sum.keep(Tensor::from_storage(candle_core::Storage::Cuda(sum), shape.clone(), none, false))?;
        Ok((y, shape))
    }

    fn bwd(
        &self, _a: &Tensor, _x: &Tensor, wb: &Tensor, _y: &Tensor, g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dsum, dwb) = backward(&self.sum.get()?, &wb.get(0)?, g, self.eps)?;
        Ok((Some(dsum.clone()), Some(dsum), Some(dwb.reshape(wb.shape())?)))
    }
}

/// (x, w, g) -> [dx (flat), dw, db].
struct LayerNormBwd {
    eps: f32,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "alignfuse-layer-norm-bwd"
    }

    fn cpu_fwd(
        &self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (
            cpu::f32_slice(s1, l1, "layer_norm x")?,
            cpu::f32_slice(s2, l2, "layer_norm weight")?,
            cpu::f32_slice(s3, l3, "layer_norm gradient")?,
        );
        if x.len() != g.len() {
            bail!("layer_norm backward: gradient {:?} for input {:?}", l3.dims(), l1.dims());
        }
        let (n, d) = (x.len(), w.len());
        // SAFETY: map_rows writes every row of dx, and dw and db are written below.
        let mut out = unsafe { cpu::output(n + 2 * d) };
        let (dx, dwb) = out.split_at_mut(n);
        let stats = cpu::map_rows(dx, d, Vec::new, |gw: &mut Vec<f32>, r, dr| {
            backward_row(&x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d], w, gw, dr, self.eps)
        });
        // dw, db: column sums over the rows, accumulated row by row (contiguous, vectorised), in f64.
        let sums = cpu::row_sums(stats.len(), 2 * d, |rows, acc| {
            let (dw, db) = acc.split_at_mut(d);
            for r in rows {
                let ((mean, rstd), xr, gr) = (stats[r], &x[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
                for j in 0..d {
                    dw[j] += (gr[j] * (xr[j] - mean) * rstd) as f64;
                    db[j] += gr[j] as f64;
                }
            }
        });
        dwb.iter_mut().zip(&sums).for_each(|(o, &v)| *o = v as f32);
        Ok((CpuStorage::F32(out), Shape::from(n + 2 * d)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
        s3: &candle_core::CudaStorage, l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::backward(self.eps, (s1, l1), (s2, l2), (s3, l3))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use crate::ops::cuda::{contiguous, int, per_element, per_row, unsupported, BLOCK, LAYERNORM};
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{bail, CudaStorage, Layout, Result, Shape};

    /// Rows per partial column sum (ROWS_PER_CHUNK in kernels/layernorm.cu).
    const ROWS_PER_CHUNK: usize = 128;

    type Arg<'a> = (&'a CudaStorage, &'a Layout);

    fn f32s<'a>((s, l): Arg<'a>, what: &str) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, f32>> {
        match &s.slice {
            S::F32(v) => contiguous(v, l, what),
            other => Err(unsupported(other, "layer_norm")),
        }
    }

    pub(super) fn forward(eps: f32, x: Arg, w: Arg, b: Arg) -> Result<(CudaStorage, Shape)> {
        let dev = &x.0.device;
        let (xs, ws, bs) = (f32s(x, "x")?, f32s(w, "weight")?, f32s(b, "bias")?);
        let (n, d) = (x.1.shape().elem_count(), w.1.shape().elem_count());
        let rows = n.checked_div(d).unwrap_or(0);
        // SAFETY: the kernel writes every element.
        let y = unsafe { dev.alloc::<f32>(n)? };
        if n > 0 {
            let (func, stream) = LAYERNORM.func::<f32>(dev, "layer_norm_fwd")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&xs);
            l.arg(&ws);
            l.arg(&bs);
            l.arg(&y);
            candle_core::builder_arg!(l, int(rows, "rows")?, int(d, "cols")?, eps);
            // SAFETY: argument types and order match layer_norm_fwd in kernels/layernorm.cu.
            unsafe { l.launch(per_row(rows)) }.w()?;
        }
        Ok((CudaStorage { slice: S::F32(y), device: dev.clone() }, x.1.shape().clone()))
    }

    pub(super) fn backward(eps: f32, x: Arg, w: Arg, g: Arg) -> Result<(CudaStorage, Shape)> {
        if x.1.shape() != g.1.shape() {
            bail!("layer_norm backward: gradient {:?} for input {:?}", g.1.dims(), x.1.dims());
        }
        let dev = &x.0.device;
        let (xs, ws, gs) = (f32s(x, "x")?, f32s(w, "weight")?, f32s(g, "gradient")?);
        let (n, d) = (x.1.shape().elem_count(), w.1.shape().elem_count());
        let rows = n.checked_div(d).unwrap_or(0);
        // SAFETY: the kernels write every element: dx by rows, then dw and db by columns.
        let mut out = unsafe { dev.alloc::<f32>(n + 2 * d)? };
        let stats = unsafe { dev.alloc::<f32>(2 * rows.max(1))? };
        if n > 0 {
            {
                let (func, stream) = LAYERNORM.func::<f32>(dev, "layer_norm_bwd_dx")?;
                let mut l = stream.launch_builder(&func);
                l.arg(&xs);
                l.arg(&ws);
                l.arg(&gs);
                l.arg(&out);
                l.arg(&stats);
                candle_core::builder_arg!(l, int(rows, "rows")?, int(d, "cols")?, eps);
                // SAFETY: argument types and order match layer_norm_bwd_dx in kernels/layernorm.cu.
                unsafe { l.launch(per_row(rows)) }.w()?;
            }
            let chunks = rows.div_ceil(ROWS_PER_CHUNK);
            // SAFETY: the partial kernel writes every element.
            let partial = unsafe { dev.alloc::<f32>(2 * chunks * d)? };
            let col_blocks = d.div_ceil(BLOCK as usize) as u32;
            let (func, stream) = LAYERNORM.func::<f32>(dev, "layer_norm_bwd_wb_partial")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&xs);
            l.arg(&gs);
            l.arg(&stats);
            l.arg(&partial);
            candle_core::builder_arg!(l, int(rows, "rows")?, int(d, "cols")?);
            let grid = (col_blocks, int(chunks, "row chunks")? as u32, 1);
            let cfg = LaunchConfig { grid_dim: grid, block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
            // SAFETY: argument types and order match layer_norm_bwd_wb_partial in kernels/layernorm.cu.
            unsafe { l.launch(cfg) }.w()?;
            let (func, stream) = LAYERNORM.func::<f32>(dev, "layer_norm_bwd_wb_final")?;
            let mut wb = out.slice_mut(n..);
            let mut l = stream.launch_builder(&func);
            l.arg(&partial);
            l.arg(&mut wb);
            candle_core::builder_arg!(l, int(chunks, "row chunks")?, int(d, "cols")?);
            // SAFETY: argument types and order match layer_norm_bwd_wb_final in kernels/layernorm.cu.
            unsafe { l.launch(per_element(d)) }.w()?;
        }
        Ok((CudaStorage { slice: S::F32(out), device: dev.clone() }, Shape::from(n + 2 * d)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{add_layer_norm, layer_norm, testing::*};
    use crate::config::Kernels;
    use candle_core::{Device, Result, Tensor, Var};

    /// Values and gradients of the fused op against the composition, on rows that straddle the thread-pool
    /// threshold and with a large mean (where a one-pass variance would cancel); alone (x, weight, bias) and
    /// after a residual add (a, x, weight, bias; the reference adds, then composes the LayerNorm).
    #[test]
    fn fused_matches_composition_values_and_gradients() -> Result<()> {
        let mut r = rng(5);
        let cases = [vec![3usize, 7], vec![4, 33, 96], vec![2, 1024, 64]];
        for (dims, residual) in cases.iter().flat_map(|c| [(c.clone(), false), (c.clone(), true)]) {
            let d = *dims.last().unwrap();
            let a = Var::from_tensor(&uniform(&mut r, &dims, 1.0, &Device::Cpu)?)?;
            let x = Var::from_tensor(&(uniform(&mut r, &dims, 2.0, &Device::Cpu)? + 50.0)?)?;
            let w = Var::from_tensor(&(uniform(&mut r, &[d], 0.5, &Device::Cpu)? + 1.0)?)?;
            let b = Var::from_tensor(&uniform(&mut r, &[d], 0.5, &Device::Cpu)?)?;
            let probe = uniform(&mut r, &dims, 1.0, &Device::Cpu)?;
            let run = |k: Kernels| -> Result<Vec<Tensor>> {
                let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
                let y = match residual {
                    true => add_layer_norm(a.as_tensor(), xt, wt, bt, 1e-6, k)?,
                    false => layer_norm(xt, wt, bt, 1e-6, k)?,
                };
                let g = (&y * &probe)?.sum_all()?.backward()?;
                let grad = |v: &Var| g.get(v.as_tensor()).cloned().expect("a gradient");
                let mut out = vec![y.clone(), grad(&x), grad(&w), grad(&b)];
                if residual {
                    out.push(grad(&a));
                }
                Ok(out)
            };
            let (fused, reference) = (run(Kernels::Fused)?, run(Kernels::Reference)?);
            assert!(fused[1..].iter().all(|g| !g.track_op()), "{dims:?}: a gradient holds a graph");
            for (what, (f, rf)) in ["y", "dx", "dw", "db", "da"].iter().zip(fused.iter().zip(&reference)) {
                assert_eq!(f.dims(), rf.dims(), "{dims:?} residual {residual} {what}");
                let (_, err) = max_err(f, rf)?;
                assert!(err < 1e-5, "{dims:?} residual {residual} {what}: relative error {err:.2e}");
            }
        }
        Ok(())
    }
}
