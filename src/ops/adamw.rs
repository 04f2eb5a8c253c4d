//! AdamW's update in place without temporaries (the composed update ran a dozen ops per tensor, each
//! allocating a full copy: 4.8 s of a 29 s ALBEF-B CPU step): `m = b1 m + (1 - b1) c g`,
//! `v = b2 v + (1 - b2) (c g)^2` (c: the clipping factor), then `p = p * decay - lr * (m / bc1) /
//! (sqrt(v / bc2) + eps)`; f32 only. [`adamw_step_all`] updates every parameter: on the CPU in three passes
//! over each one's memory, on CUDA in one pass over all of them, one launch (kernels/adamw.cu), where a
//! launch per op and tensor would be hundreds per step, each paying the launch cost. [`sum_squares`] takes
//! the gradients' norm the same way (two launches).

use super::cpu;
use candle_core::{bail, CpuStorage, DType, Device, InplaceOp2, InplaceOp3, Layout, Result, Tensor};

/// The hyper-parameters of one parameter's update.
#[derive(Clone, Copy, Debug)]
pub struct AdamWStep {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub lr: f32,
    /// `1 - lr * weight_decay` for decayed parameters, else 1.
    pub decay: f32,
    /// Bias corrections `1 - beta^t`.
    pub bc1: f32,
    pub bc2: f32,
    /// Gradient scale (clipping), applied before the moments.
    pub scale: f32,
}

/// Updates `m`, `v` and then `p` in place from the gradient `g` (all f32, contiguous, one shape).
fn adamw_step(p: &Tensor, m: &Tensor, v: &Tensor, g: &Tensor, h: AdamWStep) -> Result<()> {
    let g = g.contiguous()?;
    m.inplace_op2(&g, &Moment { beta: h.beta1, scale: h.scale, square: false })?;
    v.inplace_op2(&g, &Moment { beta: h.beta2, scale: h.scale, square: true })?;
    p.inplace_op3(m, v, &Update(h))
}

/// One parameter's part of [`adamw_step_all`].
pub struct AdamWUpdate<'a> {
    pub p: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub g: Tensor,
    pub step: AdamWStep,
}

/// Updates `m`, `v` and then `p` of every update in place (all f32, each with its gradient's shape).
pub fn adamw_step_all(updates: &[AdamWUpdate]) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(Device::Cuda(dev)) = updates.first().map(|u| u.p.device()) {
        return gpu::step_all(dev, updates);
    }
    updates.iter().try_for_each(|u| adamw_step(u.p, u.m, u.v, &u.g, u.step))
}

/// The sum of the squares of the elements of every f32 tensor in `tensors`, a scalar f64 on `device`: on
/// the CPU each tensor's f32 sum, added in f64; on CUDA per-chunk f32 sums added in f64 in a fixed order.
pub fn sum_squares(tensors: &[&Tensor], device: &Device) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(dev) = device {
        return gpu::sum_squares(dev, tensors);
    }
    if tensors.is_empty() {
        return Tensor::zeros((), DType::F64, device);
    }
    let squares = tensors.iter().map(|t| t.sqr()?.sum_all()?.to_dtype(DType::F64)).collect::<Result<Vec<_>>>()?;
    Tensor::stack(&squares, 0)?.sum_all()
}

/// `x = beta x + (1 - beta) (scale g)` or its square.
struct Moment {
    beta: f32,
    scale: f32,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "alignfuse-adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
        let g = cpu::f32_slice(s2, l2, "adamw gradient")?;
        let x = cpu::f32_slice_mut(s1, l1, "adamw moment")?;
        if x.len() != g.len() {
            bail!("adamw: moment {:?} for gradient {:?}", l1.dims(), l2.dims());
        }
        let (b, c, s) = (self.beta, 1.0 - self.beta, self.scale);
        match self.square {
            false => x.iter_mut().zip(g).for_each(|(x, &g)| *x = b * *x + c * (s * g)),
            true => x.iter_mut().zip(g).for_each(|(x, &g)| *x = b * *x + c * (s * g) * (s * g)),
        }
        Ok(())
    }
}

/// `p = p * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps)`.
struct Update(AdamWStep);

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "alignfuse-adamw-update"
    }

    fn cpu_fwd(
        &self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout,
    ) -> Result<()> {
        let (m, v) = (cpu::f32_slice(s2, l2, "adamw m")?, cpu::f32_slice(s3, l3, "adamw v")?);
        let p = cpu::f32_slice_mut(s1, l1, "adamw parameter")?;
        if p.len() != m.len() || p.len() != v.len() {
            bail!("adamw: parameter {:?} with moments {:?} and {:?}", l1.dims(), l2.dims(), l3.dims());
        }
        let h = self.0;
        p.iter_mut().zip(m).zip(v).for_each(|((p, &m), &v)| {
            *p = *p * h.decay - h.lr * ((m / h.bc1) / ((v / h.bc2).sqrt() + h.eps));
        });
        Ok(())
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::{AdamWStep, AdamWUpdate};
    use crate::ops::cuda::{int, unsupported, ADAMW};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{bail, CudaDevice, CudaStorage, Result, Shape, Storage, Tensor};

    const BLOCK: u32 = 256;

    fn blocks(n: usize) -> LaunchConfig {
        LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
    }

    /// `AdamWTensor` of kernels/adamw.cu, field for field: one row of the multi-tensor table.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Entry {
        p: u64,
        m: u64,
        v: u64,
        g: u64,
        n: i64,
        chunk_start: i64,
        /// beta1, beta2, eps, lr, decay, bc1, bc2, scale (`AdamWHyper`).
        h: [f32; 8],
    }

    // SAFETY: a plain #[repr(C)] struct of numbers, read by the kernels as `AdamWTensor`.
    unsafe impl DeviceRepr for Entry {}

    /// Elements per block of the multi-tensor kernels (ADAMW_CHUNK).
    const CHUNK: usize = 4096;

    /// The device address of a contiguous f32 tensor's first element (the tensor keeps the memory).
    fn address(t: &Tensor, dev: &CudaDevice, what: &str) -> Result<u64> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else { bail!("adamw: the {what} is not on the GPU") };
        let S::F32(slice) = &cs.slice else { return Err(unsupported(&cs.slice, "adamw")) };
        let Some((start, _)) = layout.contiguous_offsets() else { bail!("adamw: the {what} must be contiguous") };
        let stream = dev.cuda_stream();
        let (ptr, _record) = slice.device_ptr(&stream);
        Ok(ptr + (start * std::mem::size_of::<f32>()) as u64)
    }

    /// The table's rows with their first blocks filled in, uploaded, and the number of blocks.
    fn upload(
        dev: &CudaDevice, mut rows: Vec<Entry>,
    ) -> Result<(candle_core::cuda_backend::cudarc::driver::CudaSlice<Entry>, usize)> {
        let mut blocks = 0;
        for r in &mut rows {
            r.chunk_start = blocks as i64;
            blocks += (r.n as usize).div_ceil(CHUNK);
        }
        Ok((dev.clone_htod(&rows)?, blocks))
    }

    pub(super) fn step_all(dev: &CudaDevice, updates: &[AdamWUpdate]) -> Result<()> {
        // Kept until the launch is queued; the memory is freed in stream order after it.
        let grads = updates.iter().map(|u| u.g.contiguous()).collect::<Result<Vec<_>>>()?;
        let rows = updates
            .iter()
            .zip(&grads)
            .map(|(u, g)| {
                let n = u.p.elem_count();
                if [u.m, u.v, g].iter().any(|t| t.elem_count() != n) {
                    bail!(
                        "adamw: parameter {:?} with moments {:?}, {:?} and gradient {:?}",
                        u.p.dims(),
                        u.m.dims(),
                        u.v.dims(),
                        g.dims()
                    );
                }
                let AdamWStep { beta1, beta2, eps, lr, decay, bc1, bc2, scale } = u.step;
                Ok(Entry {
                    p: address(u.p, dev, "parameter")?,
                    m: address(u.m, dev, "first moment")?,
                    v: address(u.v, dev, "second moment")?,
                    g: address(g, dev, "gradient")?,
                    n: n as i64,
                    chunk_start: 0,
                    h: [beta1, beta2, eps, lr, decay, bc1, bc2, scale],
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let count = int(rows.len(), "parameters")?;
        let (table, blocks) = upload(dev, rows)?;
        if blocks > 0 {
            let (func, stream) = ADAMW.func::<f32>(dev, "adamw_multi")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&table);
            l.arg(&count);
            // SAFETY: argument types and order match adamw_multi in kernels/adamw.cu; every row's pointers
            // address `n` f32 elements of live tensors.
            unsafe { l.launch(self::blocks(blocks)) }.w()?;
        }
        Ok(())
    }

    pub(super) fn sum_squares(dev: &CudaDevice, tensors: &[&Tensor]) -> Result<Tensor> {
        let contiguous = tensors.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
        let rows = contiguous
            .iter()
            .map(|t| Ok(Entry { g: address(t, dev, "gradient")?, n: t.elem_count() as i64, ..Entry::default() }))
            .collect::<Result<Vec<_>>>()?;
        let count = int(rows.len(), "tensors")?;
        let (table, blocks) = upload(dev, rows)?;
        let mut out = dev.alloc_zeros::<f64>(1)?;
        if blocks > 0 {
            // SAFETY: sum_squares_partial writes one partial per block.
            let mut partial = unsafe { dev.alloc::<f32>(blocks)? };
            let (func, stream) = ADAMW.func::<f32>(dev, "sum_squares_partial")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&table);
            l.arg(&count);
            l.arg(&mut partial);
            // SAFETY: argument types and order match sum_squares_partial in kernels/adamw.cu.
            unsafe { l.launch(self::blocks(blocks)) }.w()?;
            let (func, stream) = ADAMW.func::<f32>(dev, "sum_squares_final")?;
            let mut l = stream.launch_builder(&func);
            let chunks = blocks as i64;
            l.arg(&partial);
            l.arg(&chunks);
            l.arg(&mut out);
            // SAFETY: argument types and order match sum_squares_final in kernels/adamw.cu (one block of
            // BLOCK = SUM_THREADS threads).
            unsafe { l.launch(self::blocks(1)) }.w()?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        Ok(Tensor::from_storage(storage, Shape::from(()), BackpropOp::none(), false))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::*;
    use candle_core::Device;

    /// The in-place update equals the composed one (what `AdamW::apply` ran before) to f32 rounding.
    #[test]
    fn in_place_update_matches_the_composition() -> Result<()> {
        let mut r = rng(3);
        let dims = [37, 53];
        let (p0, g) = (uniform(&mut r, &dims, 1.0, &Device::Cpu)?, uniform(&mut r, &dims, 0.1, &Device::Cpu)?);
        let (m0, v0) =
            (uniform(&mut r, &dims, 0.01, &Device::Cpu)?, uniform(&mut r, &dims, 1e-4, &Device::Cpu)?.abs()?);
        let h = AdamWStep {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            lr: 1e-3,
            decay: 0.99998,
            bc1: 0.19,
            bc2: 0.003,
            scale: 0.7,
        };
        let (b1, b2) = (h.beta1 as f64, h.beta2 as f64);
        let gs = (&g * h.scale as f64)?;
        let m = ((&m0 * b1)? + (&gs * (1.0 - b1))?)?;
        let v = ((&v0 * b2)? + (gs.sqr()? * (1.0 - b2))?)?;
        let update = ((&m / h.bc1 as f64)? / ((&v / h.bc2 as f64)?.sqrt()? + h.eps as f64)?)?;
        let want = ((&p0 * h.decay as f64)? - (update * h.lr as f64)?)?;
        let (p, mi, vi) = (p0.copy()?, m0.copy()?, v0.copy()?);
        adamw_step_all(&[AdamWUpdate { p: &p, m: &mi, v: &vi, g, step: h }])?;
        for (what, got, want) in [("m", &mi, &m), ("v", &vi, &v), ("p", &p, &want)] {
            let (abs, _) = max_err(got, want)?;
            assert!(abs < 1e-6, "{what}: {abs:.2e}");
        }
        assert!(max_err(&p, &p0)?.0 > 1e-4, "the parameter moved");
        Ok(())
    }
}
