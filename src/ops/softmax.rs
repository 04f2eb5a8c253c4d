//! Fused attention softmax `y = softmax(x * scale + mask)` over the last dimension, with its own backward
//! `dx = scale * y * (g - sum(g * y))` (the mask gets no gradient). One pass to form the logits and their
//! max, one for exp and its sum, one to normalise: the composed version runs seven ops over the tensor,
//! each a launch on CUDA and a full memory round trip on CPU. CUDA kernels: kernels/softmax.cu.

use super::cpu;
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

/// The fused path of [`super::attention_softmax`]; `work` is the dtype the op reads (f32, or bf16 on CUDA).
pub(super) fn attention_softmax_fused(
    scores: &Tensor, scale: f64, mask: Option<&Tensor>, work: DType,
) -> Result<Tensor> {
    let x = scores.to_dtype(work)?.contiguous()?;
    let op = AttnSoftmax { scale: scale as f32 };
    let y = match mask {
        None => x.apply_op1(op)?,
        Some(m) => {
            // Fail here, with the shapes named, rather than inside the op.
            m.layout().broadcast_as(x.shape().clone())?;
            x.apply_op2(&m.to_dtype(work)?.detach(), op)?
        }
    };
    y.to_dtype(scores.dtype())
}

struct AttnSoftmax {
    scale: f32,
}

/// Where each row's mask lives: the scores seen as [d0, d1, d2, cols] (leading 1s added) and the mask's
/// strides over that view after broadcasting (0 along broadcast dimensions), so a [B, 1, 1, Lk] mask is
/// read in place rather than expanded.
#[derive(Clone, Copy)]
pub(super) struct MaskGeom {
    pub(super) d1: usize,
    pub(super) d2: usize,
    pub(super) strides: [usize; 4],
    pub(super) offset: usize,
}

impl MaskGeom {
    pub(super) fn new(scores: &Shape, mask: &Layout) -> Result<Self> {
        let dims = scores.dims();
        if dims.len() > 4 {
            bail!("attention_softmax: a mask needs scores of rank <= 4, got {:?}", dims);
        }
        let mask = mask.broadcast_as(scores.clone())?;
        let pad = 4 - dims.len();
        let (mut d, mut strides) = ([1usize; 4], [0usize; 4]);
        d[pad..].copy_from_slice(dims);
        strides[pad..].copy_from_slice(mask.stride());
        Ok(MaskGeom { d1: d[1], d2: d[2], strides, offset: mask.start_offset() })
    }

    /// Offset of the mask entry for column 0 of `row` (rows counted over d0 x d1 x d2).
    pub(super) fn row_offset(&self, row: usize) -> usize {
        let (i2, i1, i0) = (row % self.d2, row / self.d2 % self.d1, row / self.d2 / self.d1);
        self.offset + i0 * self.strides[0] + i1 * self.strides[1] + i2 * self.strides[2]
    }
}

/// Number of columns (last dimension) of the rows of `shape`.
fn cols(shape: &Shape) -> Result<usize> {
    match shape.dims().last() {
        Some(&c) => Ok(c),
        None => bail!("attention_softmax: scores must have at least one dimension"),
    }
}

cpu::multiversion! {
    /// Softmax of one row of logits in place; a row that is all -inf becomes zeros.
    fn softmax_row(y: &mut [f32]) {
        let max = cpu::max(y);
        if max == f32::NEG_INFINITY {
            y.fill(0.0);
            return;
        }
        let inv = 1.0 / cpu::exp_shift_sum(y, max);
        for v in y.iter_mut() {
            *v *= inv;
        }
    }
}

cpu::multiversion! {
    /// One row of the backward: `dx = scale * y * (g - sum(g * y))`.
    fn backward_row(y: &[f32], g: &[f32], dx: &mut [f32], scale: f32) {
        let (y, g) = (&y[..dx.len()], &g[..dx.len()]);
        let dot = cpu::dot(y, g);
        for j in 0..dx.len() {
            dx[j] = scale * y[j] * (g[j] - dot);
        }
    }
}

impl AttnSoftmax {
    fn cpu(&self, x: &[f32], shape: &Shape, mask: Option<(&[f32], MaskGeom)>) -> Result<(CpuStorage, Shape)> {
        let cols = cols(shape)?;
        let scale = self.scale;
        // SAFETY: map_rows writes every row.
        let mut y = unsafe { cpu::output(x.len()) };
        cpu::map_rows(
            &mut y,
            cols,
            || (),
            |_, r, yr| {
                let xr = &x[r * cols..(r + 1) * cols];
                match mask {
                    None => yr.iter_mut().zip(xr).for_each(|(o, &v)| *o = v * scale),
                    Some((m, geom)) => {
                        let (off, step) = (geom.row_offset(r), geom.strides[3]);
                        if step == 1 {
                            let mr = &m[off..off + cols];
                            yr.iter_mut().zip(xr).zip(mr).for_each(|((o, &v), &mv)| *o = v * scale + mv);
                        } else {
                            yr.iter_mut()
                                .zip(xr)
                                .enumerate()
                                .for_each(|(j, (o, &v))| *o = v * scale + m[off + j * step]);
                        }
                    }
                }
                softmax_row(yr);
            },
        );
        Ok((CpuStorage::F32(y), shape.clone()))
    }

    fn grad(&self, y: &Tensor, grad_y: &Tensor) -> Result<Tensor> {
        y.apply_op2_no_bwd(&grad_y.contiguous()?, &AttnSoftmaxBwd { scale: self.scale })
    }
}

impl CustomOp1 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "alignfuse-attention-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu(cpu::f32_slice(s, l, "attention_softmax scores")?, l.shape(), None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::forward(self.scale, s, l, None)
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad(y, grad_y)?))
    }
}

impl CustomOp2 for AttnSoftmax {
    fn name(&self) -> &'static str {
        "alignfuse-attention-softmax-masked"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu::f32_slice(s1, l1, "attention_softmax scores")?;
        let CpuStorage::F32(m) = s2 else { bail!("attention_softmax mask: expected f32, got {:?}", s2.dtype()) };
        self.cpu(x, l1.shape(), Some((m, MaskGeom::new(l1.shape(), l2)?)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::forward(self.scale, s1, l1, Some((s2, l2)))
    }

    fn bwd(
        &self, _x: &Tensor, _mask: &Tensor, y: &Tensor, grad_y: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(self.grad(y, grad_y)?), None))
    }
}

/// `dx = scale * y * (g - sum(g * y))` per row, from the forward's output `y` and the upstream gradient `g`.
struct AttnSoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for AttnSoftmaxBwd {
    fn name(&self) -> &'static str {
        "alignfuse-attention-softmax-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = cpu::f32_slice(s1, l1, "attention_softmax output")?;
        let g = cpu::f32_slice(s2, l2, "attention_softmax gradient")?;
        if l1.shape() != l2.shape() {
            bail!("attention_softmax backward: gradient {:?} for output {:?}", l2.dims(), l1.dims());
        }
        let cols = cols(l1.shape())?;
        let scale = self.scale;
        // SAFETY: map_rows writes every row.
        let mut dx = unsafe { cpu::output(y.len()) };
        cpu::map_rows(
            &mut dx,
            cols,
            || (),
            |_, r, dr| backward_row(&y[r * cols..(r + 1) * cols], &g[r * cols..(r + 1) * cols], dr, scale),
        );
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::backward(self.scale, s1, l1, s2, l2)
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::{cols, MaskGeom};
    use crate::ops::cuda::{contiguous, int, per_row, unsupported, SOFTMAX};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Shape, WithDType};

    pub(super) fn forward(
        scale: f32, x: &CudaStorage, xl: &Layout, mask: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = &x.device;
        let slice = match mask {
            None => match &x.slice {
                S::F32(xs) => S::F32(fwd::<f32>(dev, scale, xs, xl, None)?),
                S::BF16(xs) => S::BF16(fwd(dev, scale, xs, xl, None)?),
                other => return Err(unsupported(other, "attention_softmax")),
            },
            Some((m, ml)) => {
                let geom = MaskGeom::new(xl.shape(), ml)?;
                match (&x.slice, &m.slice) {
                    (S::F32(xs), S::F32(ms)) => S::F32(fwd::<f32>(dev, scale, xs, xl, Some((ms, geom)))?),
                    (S::BF16(xs), S::BF16(ms)) => S::BF16(fwd(dev, scale, xs, xl, Some((ms, geom)))?),
                    (other, _) => return Err(unsupported(other, "attention_softmax")),
                }
            }
        };
        Ok((CudaStorage { slice, device: dev.clone() }, xl.shape().clone()))
    }

    /// `mask`: the mask's whole storage and where each row's entries sit in it.
    fn fwd<T: DeviceRepr + WithDType>(
        dev: &CudaDevice, scale: f32, x: &CudaSlice<T>, xl: &Layout, mask: Option<(&CudaSlice<T>, MaskGeom)>,
    ) -> Result<CudaSlice<T>> {
        let x = contiguous(x, xl, "attention_softmax scores")?;
        let (el, cols) = (xl.shape().elem_count(), cols(xl.shape())?);
        let rows = el.checked_div(cols).unwrap_or(0);
        // SAFETY: the kernel writes every element.
        let y = unsafe { dev.alloc::<T>(el)? };
        if el == 0 {
            return Ok(y);
        }
        let (func, stream) = SOFTMAX.func::<T>(dev, "attn_softmax_fwd")?;
        let mask_view = mask.map(|(m, g)| m.slice(g.offset..));
        let g = mask.map_or(MaskGeom { d1: 1, d2: 1, strides: [0; 4], offset: 0 }, |(_, g)| g);
        let stride = |k: usize| g.strides[k] as i64;
        let mut b = stream.launch_builder(&func);
        b.arg(&x);
        match &mask_view {
            Some(m) => b.arg(m),
            None => b.arg(&0usize),
        };
        b.arg(&y);
        candle_core::builder_arg!(
            b,
            int(rows, "rows")?,
            int(cols, "cols")?,
            scale,
            int(g.d1, "mask dim 1")?,
            int(g.d2, "mask dim 2")?,
            stride(0),
            stride(1),
            stride(2),
            stride(3)
        );
        // SAFETY: argument types and order match attn_softmax_fwd in kernels/softmax.cu.
        unsafe { b.launch(per_row(rows)) }.w()?;
        Ok(y)
    }

    pub(super) fn backward(
        scale: f32, y: &CudaStorage, yl: &Layout, g: &CudaStorage, gl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        if yl.shape() != gl.shape() {
            bail!("attention_softmax backward: gradient {:?} for output {:?}", gl.dims(), yl.dims());
        }
        let dev = &y.device;
        let slice = match (&y.slice, &g.slice) {
            (S::F32(ys), S::F32(gs)) => S::F32(bwd::<f32>(dev, scale, ys, yl, gs, gl)?),
            (S::BF16(ys), S::BF16(gs)) => S::BF16(bwd(dev, scale, ys, yl, gs, gl)?),
            (other, _) => return Err(unsupported(other, "attention_softmax backward")),
        };
        Ok((CudaStorage { slice, device: dev.clone() }, yl.shape().clone()))
    }

    fn bwd<T: DeviceRepr + WithDType>(
        dev: &CudaDevice, scale: f32, y: &CudaSlice<T>, yl: &Layout, g: &CudaSlice<T>, gl: &Layout,
    ) -> Result<CudaSlice<T>> {
        let (y, g) = (contiguous(y, yl, "attention_softmax output")?, contiguous(g, gl, "attention_softmax gradient")?);
        let (el, cols) = (yl.shape().elem_count(), cols(yl.shape())?);
        let rows = el.checked_div(cols).unwrap_or(0);
        // SAFETY: the kernel writes every element.
        let dx = unsafe { dev.alloc::<T>(el)? };
        if el == 0 {
            return Ok(dx);
        }
        let (func, stream) = SOFTMAX.func::<T>(dev, "attn_softmax_bwd")?;
        let mut b = stream.launch_builder(&func);
        b.arg(&y);
        b.arg(&g);
        b.arg(&dx);
        candle_core::builder_arg!(b, int(rows, "rows")?, int(cols, "cols")?, scale);
        // SAFETY: argument types and order match attn_softmax_bwd in kernels/softmax.cu.
        unsafe { b.launch(per_row(rows)) }.w()?;
        Ok(dx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_abs, max_err, rng, uniform};
    use super::super::{attention_softmax, Kernels};
    use candle_core::{DType, Device, Result, Tensor, Var};
    use rand::Rng;

    struct Case {
        dims: Vec<usize>,
        mask_dims: Option<Vec<usize>>,
        scale: f64,
        range: f32,
    }

    /// Forward output and d(sum(y * w))/d scores for both implementations.
    fn run(x: &Tensor, scale: f64, mask: Option<&Tensor>, w: &Tensor, k: Kernels) -> Result<(Tensor, Tensor)> {
        let var = Var::from_tensor(x)?;
        let y = attention_softmax(var.as_tensor(), scale, mask, k)?;
        let grads = (y.to_dtype(DType::F32)? * w)?.sum_all()?.backward()?;
        let dx = grads.get(var.as_tensor()).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()))?;
        Ok((y, dx))
    }

    /// The size of `dx = scale * y * (g - sum(g * y))`, against which its error is measured: with large
    /// logits (scale 1e4) g - sum(g * y) cancels, and f32 paths that round differently by 1 ulp part by
    /// ulp(g) * scale in absolute terms, however small dx itself comes out.
    fn dx_scale(scale: f64, w: &Tensor) -> Result<f64> {
        Ok((scale * max_abs(w)?).max(1.0))
    }

    /// Padding masks in BERT style: 0 to attend, -10000 for padding; some rows of `mask_dims` fully masked.
    fn padding_mask(r: &mut rand_chacha::ChaCha8Rng, dims: &[usize]) -> Result<Tensor> {
        let cols = *dims.last().unwrap_or(&1);
        let rows = dims.iter().product::<usize>() / cols.max(1);
        let mut v = Vec::with_capacity(rows * cols);
        for row in 0..rows {
            let keep = if row % 3 == 2 { 0 } else { r.random_range(1..=cols) };
            v.extend((0..cols).map(|j| if j < keep { 0f32 } else { -10000.0 }));
        }
        Tensor::from_vec(v, dims, &Device::Cpu)
    }

    #[test]
    fn matches_reference_forward_and_gradient() -> Result<()> {
        let cases = [
            Case { dims: vec![1], mask_dims: None, scale: 1.0, range: 1.0 },
            Case { dims: vec![1, 1, 1, 1], mask_dims: Some(vec![1, 1, 1, 1]), scale: 0.125, range: 3.0 },
            Case { dims: vec![2, 3, 5, 7], mask_dims: Some(vec![2, 1, 1, 7]), scale: 0.125, range: 4.0 },
            Case { dims: vec![3, 2, 25, 25], mask_dims: Some(vec![3, 1, 1, 25]), scale: 0.125, range: 8.0 },
            Case { dims: vec![2, 2, 3, 577], mask_dims: Some(vec![2, 1, 1, 577]), scale: 0.125, range: 8.0 },
            Case { dims: vec![2, 3, 9, 577], mask_dims: None, scale: 0.125, range: 8.0 },
            // Large enough to be split over the thread pool.
            Case { dims: vec![3, 4, 7, 577], mask_dims: Some(vec![3, 1, 1, 577]), scale: 0.125, range: 8.0 },
            Case { dims: vec![2, 2, 4, 6], mask_dims: Some(vec![2, 1, 4, 6]), scale: 1.0, range: 2.0 },
            Case { dims: vec![4, 9], mask_dims: Some(vec![9]), scale: 1.0, range: 2.0 },
            Case { dims: vec![5, 3, 33], mask_dims: Some(vec![5, 3, 1]), scale: 1.0, range: 2.0 },
            // Large logits: x * scale up to 1e4.
            Case { dims: vec![2, 2, 7, 31], mask_dims: Some(vec![2, 1, 1, 31]), scale: 1e4, range: 1.0 },
            Case { dims: vec![1, 1, 2, 577], mask_dims: None, scale: 1e4, range: 1.0 },
        ];
        let mut r = rng(1);
        for c in &cases {
            let x = uniform(&mut r, &c.dims, c.range, &Device::Cpu)?;
            let w = uniform(&mut r, &c.dims, 1.0, &Device::Cpu)?;
            let mask = c.mask_dims.as_ref().map(|d| padding_mask(&mut r, d)).transpose()?;
            let (y_ref, dx_ref) = run(&x, c.scale, mask.as_ref(), &w, Kernels::Reference)?;
            let (y, dx) = run(&x, c.scale, mask.as_ref(), &w, Kernels::Fused)?;
            let y_err = max_err(&y, &y_ref)?.0;
            let dx_err = max_err(&dx, &dx_ref)?.0 / dx_scale(c.scale, &w)?;
            assert!(y_err <= 1e-6, "{:?} mask {:?} scale {}: y error {y_err:e}", c.dims, c.mask_dims, c.scale);
            assert!(dx_err <= 1e-6, "{:?} mask {:?} scale {}: dx error {dx_err:e}", c.dims, c.mask_dims, c.scale);
        }
        Ok(())
    }

    #[test]
    fn strided_scores_and_low_precision_inputs() -> Result<()> {
        let mut r = rng(2);
        let base = uniform(&mut r, &[2, 3, 7, 5], 3.0, &Device::Cpu)?;
        let x = base.transpose(2, 3)?; // [2, 3, 5, 7], not contiguous
        let mask = padding_mask(&mut r, &[2, 1, 1, 7])?;
        let w = uniform(&mut r, &[2, 3, 5, 7], 1.0, &Device::Cpu)?;
        let (y_ref, dx_ref) = run(&x, 0.5, Some(&mask), &w, Kernels::Reference)?;
        let (y, dx) = run(&x, 0.5, Some(&mask), &w, Kernels::Fused)?;
        assert!(max_err(&y, &y_ref)?.0 <= 1e-6);
        assert!(max_err(&dx, &dx_ref)?.0 <= 1e-6 * dx_scale(0.5, &w)?);

        for dtype in [DType::BF16, DType::F16] {
            let (xl, ml) = (x.to_dtype(dtype)?, mask.to_dtype(dtype)?);
            let (y, dx) = run(&xl, 0.5, Some(&ml), &w, Kernels::Fused)?;
            assert_eq!((y.dtype(), dx.dtype()), (dtype, dtype));
            // The fused op rounds once at the end; compare with the f32 reference of the rounded inputs.
            let (x32, m32) = (xl.to_dtype(DType::F32)?, ml.to_dtype(DType::F32)?);
            let (y32, dx32) = run(&x32, 0.5, Some(&m32), &w, Kernels::Reference)?;
            assert!(max_err(&y, &y32)?.0 <= 1e-2, "{dtype:?}");
            assert!(max_err(&dx, &dx32)?.0 <= 1e-2 * dx_scale(0.5, &w)?, "{dtype:?}");
        }
        Ok(())
    }

    #[test]
    fn fully_masked_rows() -> Result<()> {
        let mut r = rng(3);
        let x = uniform(&mut r, &[2, 2, 3, 7], 2.0, &Device::Cpu)?;
        let w = uniform(&mut r, &[2, 2, 3, 7], 1.0, &Device::Cpu)?;
        // Batch 1 entirely padded with -10000: both give the unmasked softmax of the row (a constant shift).
        let m: Vec<f32> = (0..14).map(|k| if k < 4 { 0.0 } else { -10000.0 }).collect();
        let mask = Tensor::from_vec(m, (2, 1, 1, 7), &Device::Cpu)?;
        let (y_ref, dx_ref) = run(&x, 0.3, Some(&mask), &w, Kernels::Reference)?;
        let (y, dx) = run(&x, 0.3, Some(&mask), &w, Kernels::Fused)?;
        assert!(max_err(&y, &y_ref)?.0 <= 1e-6 && max_err(&dx, &dx_ref)?.0 <= 1e-6 * dx_scale(0.3, &w)?);
        let unmasked = attention_softmax(&x.narrow(0, 1, 1)?, 0.3, None, Kernels::Reference)?;
        assert!(max_err(&y.narrow(0, 1, 1)?, &unmasked)?.0 <= 1e-3);

        // With -inf the reference row is NaN; the fused row is zeros with a zero gradient.
        let m: Vec<f32> = (0..14).map(|k| if k < 4 { 0.0 } else { f32::NEG_INFINITY }).collect();
        let mask = Tensor::from_vec(m, (2, 1, 1, 7), &Device::Cpu)?;
        let (y_ref, _) = run(&x, 0.3, Some(&mask), &w, Kernels::Reference)?;
        let (y, dx) = run(&x, 0.3, Some(&mask), &w, Kernels::Fused)?;
        assert!(y_ref.narrow(0, 1, 1)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|v| v.is_nan()));
        assert!(y.narrow(0, 1, 1)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|&v| v == 0.0));
        assert!(dx.narrow(0, 1, 1)?.flatten_all()?.to_vec1::<f32>()?.iter().all(|&v| v == 0.0));
        assert!(max_err(&y.narrow(0, 0, 1)?, &y_ref.narrow(0, 0, 1)?)?.0 <= 1e-6);
        Ok(())
    }

    #[test]
    fn mask_gets_no_gradient_and_bad_shapes_are_errors() -> Result<()> {
        let mut r = rng(4);
        let x = Var::from_tensor(&uniform(&mut r, &[2, 2, 3, 5], 1.0, &Device::Cpu)?)?;
        let mask = Var::from_tensor(&padding_mask(&mut r, &[2, 1, 1, 5])?)?;
        let y = attention_softmax(x.as_tensor(), 1.0, Some(mask.as_tensor()), Kernels::Fused)?;
        let grads = y.sqr()?.sum_all()?.backward()?;
        assert!(grads.get(x.as_tensor()).is_some());
        assert!(grads.get(mask.as_tensor()).is_none());

        let bad_mask = Tensor::zeros((2, 1, 1, 4), DType::F32, &Device::Cpu)?;
        assert!(attention_softmax(x.as_tensor(), 1.0, Some(&bad_mask), Kernels::Fused).is_err());
        let rank5 = Tensor::zeros((1, 2, 2, 3, 5), DType::F32, &Device::Cpu)?;
        let m5 = Tensor::zeros(5, DType::F32, &Device::Cpu)?;
        assert!(attention_softmax(&rank5, 1.0, Some(&m5), Kernels::Fused).is_err());
        assert!(attention_softmax(&Tensor::new(1f32, &Device::Cpu)?, 1.0, None, Kernels::Fused).is_err());
        Ok(())
    }
}
