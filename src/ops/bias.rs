//! Fused bias add `y = x + b` over the last dimension, whose backward sums the gradient over the rows for
//! `db` by accumulating whole rows (contiguous, vectorised) instead of candle's strided reduction over
//! the leading dimensions, which took a tenth of the CPU training step. CUDA kernels: kernels/bias.cu
//! (the column sums in two deterministic stages; they also read a bf16 linear layer's product and
//! gradient, with an f32 bias). The op takes f32.

use super::cpu;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// The fused path of [`super::add_bias`], for f32 `x`.
pub(super) fn add_bias_fused(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let d = *x.dims().last().unwrap_or(&0);
    if bias.dims() != [d] {
        bail!("add_bias: bias {:?} must be [{d}] for input {:?}", bias.dims(), x.dims());
    }
    x.contiguous()?.apply_op2(&bias.contiguous()?, AddBias)
}

cpu::multiversion! {
    /// Adds `b` to every `b.len()`-long row of `y`.
    pub(super) fn add_rows(y: &mut [f32], b: &[f32]) {
        let n = b.len();
        for row in y.chunks_exact_mut(n.max(1)) {
            let row = &mut row[..n];
            for j in 0..n {
                row[j] += b[j];
            }
        }
    }
}

/// The sums of the rows of `g` [.., cols] (bias gradients).
pub(super) fn column_sum(g: &Tensor) -> Result<Tensor> {
    let cols = *g.dims().last().unwrap_or(&0);
    g.contiguous()?.apply_op1_no_bwd(&ColumnSum { cols })
}

struct AddBias;

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "alignfuse-add-bias"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, b) = (cpu::f32_slice(s1, l1, "add_bias x")?, cpu::f32_slice(s2, l2, "add_bias bias")?);
        // One pass that writes each output once (no zero-fill, no copy first): memory-bound either way.
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks_exact(b.len().max(1)) {
            y.extend(row.iter().zip(b).map(|(&v, &bv)| v + bv));
        }
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::add_bias(s1, l1, s2, l2)
    }

    fn bwd(&self, _x: &Tensor, _b: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.clone()), Some(column_sum(g)?)))
    }
}

/// Sums the rows of `[.., cols]` into `[cols]`, in f64 on the CPU.
struct ColumnSum {
    cols: usize,
}

cpu::multiversion! {
    /// Adds every `acc.len()`-long row of `g` into `acc`.
    fn column_sums(g: &[f32], acc: &mut [f64]) {
        let cols = acc.len();
        for row in g.chunks_exact(cols.max(1)) {
            let row = &row[..cols];
            for j in 0..cols {
                acc[j] += row[j] as f64;
            }
        }
    }
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "alignfuse-column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, cols) = (cpu::f32_slice(s, l, "add_bias gradient")?, self.cols);
        let acc = cpu::row_sums(g.len().checked_div(cols).unwrap_or(0), cols, |rows, acc| {
            column_sums(&g[rows.start * cols..rows.end * cols], acc)
        });
        Ok((CpuStorage::F32(acc.into_iter().map(|v| v as f32).collect()), Shape::from(self.cols)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::column_sum(self.cols, s, l)
    }
}

#[cfg(feature = "cuda")]
pub(super) mod gpu {
    use crate::ops::cuda::{blocks, contiguous, int, per_element, unsupported, BIAS, BLOCK};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, Shape, WithDType};

    /// Rows per partial column sum (ROWS_PER_CHUNK in kernels/bias.cu).
    const ROWS_PER_CHUNK: usize = 128;

    /// `x + b` for f32 or bf16 `x` (a bf16 linear layer's product) and an f32 bias, in `x`'s dtype.
    pub(in crate::ops) fn add_bias(
        x: &CudaStorage, xl: &Layout, b: &CudaStorage, bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let S::F32(bs) = &b.slice else { return Err(unsupported(&b.slice, "add_bias bias")) };
        let bs = contiguous(bs, bl, "add_bias bias")?;
        let slice = match &x.slice {
            S::F32(xs) => S::F32(add(x, (xs, xl), &bs, bl.shape().elem_count())?),
            S::BF16(xs) => S::BF16(add(x, (xs, xl), &bs, bl.shape().elem_count())?),
            other => return Err(unsupported(other, "add_bias")),
        };
        Ok((CudaStorage { slice, device: x.device.clone() }, xl.shape().clone()))
    }

    fn add<T: WithDType + DeviceRepr>(
        x: &CudaStorage, (xs, xl): (&CudaSlice<T>, &Layout), bs: &CudaView<'_, f32>, d: usize,
    ) -> Result<CudaSlice<T>> {
        let dev = &x.device;
        let xs = contiguous(xs, xl, "add_bias x")?;
        let n = xl.shape().elem_count();
        // SAFETY: the kernel writes every element.
        let y = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            let (func, stream) = BIAS.func::<T>(dev, "add_bias")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&xs);
            l.arg(bs);
            l.arg(&y);
            candle_core::builder_arg!(l, int(n, "elements")?, int(d, "cols")?);
            // SAFETY: argument types and order match add_bias in kernels/bias.cu.
            unsafe { l.launch(per_element(n)) }.w()?;
        }
        Ok(y)
    }

    /// The f32 column sums of an f32 or bf16 gradient [.., cols].
    pub(super) fn column_sum(cols: usize, g: &CudaStorage, gl: &Layout) -> Result<(CudaStorage, Shape)> {
        let out = match &g.slice {
            S::F32(gs) => sum(cols, g, (gs, gl))?,
            S::BF16(gs) => sum(cols, g, (gs, gl))?,
            other => return Err(unsupported(other, "column_sum")),
        };
        Ok((CudaStorage { slice: S::F32(out), device: g.device.clone() }, Shape::from(cols)))
    }

    fn sum<T: WithDType + DeviceRepr>(
        cols: usize, g: &CudaStorage, (gs, gl): (&CudaSlice<T>, &Layout),
    ) -> Result<CudaSlice<f32>> {
        let dev = &g.device;
        let gs = contiguous(gs, gl, "column_sum gradient")?;
        let rows = gl.shape().elem_count().checked_div(cols).unwrap_or(0);
        let chunks = rows.div_ceil(ROWS_PER_CHUNK).max(1);
        let col_blocks = cols.div_ceil(BLOCK as usize).max(1) as u32;
        // SAFETY: the kernels write every element.
        let partial = unsafe { dev.alloc::<f32>(chunks * cols.max(1))? };
        let out = unsafe { dev.alloc::<f32>(cols.max(1))? };
        let (func, stream) = BIAS.func::<T>(dev, "column_sum_partial")?;
        let mut l = stream.launch_builder(&func);
        l.arg(&gs);
        l.arg(&partial);
        candle_core::builder_arg!(l, int(rows, "rows")?, int(cols, "cols")?);
        let grid = (col_blocks, int(chunks, "row chunks")? as u32, 1);
        // SAFETY: argument types and order match column_sum_partial in kernels/bias.cu.
        unsafe { l.launch(LaunchConfig { grid_dim: grid, block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        let (func, stream) = BIAS.func::<f32>(dev, "column_sum_final")?;
        let mut l = stream.launch_builder(&func);
        l.arg(&partial);
        l.arg(&out);
        candle_core::builder_arg!(l, int(chunks, "row chunks")?, int(cols, "cols")?);
        // SAFETY: argument types and order match column_sum_final in kernels/bias.cu.
        unsafe { l.launch(blocks(col_blocks as usize)) }.w()?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{add_bias, testing::*};
    use crate::config::Kernels;
    use candle_core::{Device, Result, Tensor, Var};

    #[test]
    fn fused_matches_composition_values_and_gradients() -> Result<()> {
        let mut r = rng(9);
        for dims in [vec![5usize, 3], vec![4, 33, 96], vec![3, 700, 64]] {
            let d = *dims.last().unwrap();
            let x = Var::from_tensor(&uniform(&mut r, &dims, 2.0, &Device::Cpu)?)?;
            let b = Var::from_tensor(&uniform(&mut r, &[d], 1.0, &Device::Cpu)?)?;
            let probe = uniform(&mut r, &dims, 1.0, &Device::Cpu)?;
            let run = |k: Kernels| -> Result<Vec<Tensor>> {
                let y = add_bias(x.as_tensor(), b.as_tensor(), k)?;
                let g = (&y * &probe)?.sum_all()?.backward()?;
                let grad = |v: &Var| g.get(v.as_tensor()).cloned().expect("a gradient");
                Ok(vec![y.clone(), grad(&x), grad(&b)])
            };
            let (fused, reference) = (run(Kernels::Fused)?, run(Kernels::Reference)?);
            for (what, (f, rf)) in ["y", "dx", "db"].iter().zip(fused.iter().zip(&reference)) {
                let (_, err) = max_err(f, rf)?;
                assert!(err < 1e-5, "{dims:?} {what}: relative error {err:.2e}");
            }
        }
        Ok(())
    }
}
