//! The per-parameter work of a training step over every parameter at once: AdamW's update, the gradients'
//! squared norm (for clipping) and the momentum encoders' EMA. On the CPU each tensor is handled in turn; on
//! CUDA each is one pass over all of them (kernels/multi_tensor.cu: a table of every tensor's pointers goes up
//! with the step, as in PyTorch's multi-tensor apply), where a launch per op and tensor would be thousands
//! per ALBEF-B step, each paying the launch cost.

use super::adamw::{adamw_step, AdamWStep};
use candle_core::{DType, Device, Result, Tensor, Var};

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
        return gpu::adamw(dev, updates);
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

/// `twin = momentum * twin + (1 - momentum) * online` for every (online, twin) pair (f32), in place.
pub fn ema_all(pairs: &[(Var, Var)], momentum: f64) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Some(Device::Cuda(dev)) = pairs.first().map(|(p, _)| p.device()) {
        return gpu::ema(dev, pairs, momentum);
    }
    for (p, twin) in pairs {
        twin.set(&((twin.as_tensor() * momentum)? + (p.as_tensor().detach() * (1.0 - momentum))?)?)?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::AdamWUpdate;
    use crate::ops::cuda::{blocks, int, unsupported, MULTI_TENSOR};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{bail, CudaDevice, CudaStorage, Result, Shape, Storage, Tensor, Var};

    /// Elements per block (CHUNK in kernels/multi_tensor.cu).
    const CHUNK: usize = 4096;

    /// `Row` of kernels/multi_tensor.cu, field for field.
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Row {
        x: u64,
        m: u64,
        v: u64,
        g: u64,
        n: i64,
        chunk_start: i64,
        h: [f32; 8],
    }

    // SAFETY: a plain #[repr(C)] struct of numbers, read by the kernels as `Row`.
    unsafe impl DeviceRepr for Row {}

    /// The device address of a contiguous f32 tensor's first element (the tensor keeps the memory).
    fn address(t: &Tensor, dev: &CudaDevice, what: &str) -> Result<u64> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else { bail!("the {what} is not on the GPU") };
        let S::F32(slice) = &cs.slice else { return Err(unsupported(&cs.slice, what)) };
        let Some((start, _)) = layout.contiguous_offsets() else { bail!("the {what} must be contiguous") };
        let stream = dev.cuda_stream();
        let (ptr, _record) = slice.device_ptr(&stream);
        Ok(ptr + (start * std::mem::size_of::<f32>()) as u64)
    }

    /// A row reading `g` and writing `written` (x, then AdamW's m and v), all of `g`'s length.
    fn row(g: &Tensor, written: &[&Tensor], dev: &CudaDevice, what: &str) -> Result<Row> {
        let n = g.elem_count();
        let mut addresses = [0; 3];
        for (a, t) in addresses.iter_mut().zip(written) {
            if t.elem_count() != n {
                bail!("{what}: {:?} against {:?}", t.dims(), g.dims());
            }
            *a = address(t, dev, what)?;
        }
        let [x, m, v] = addresses;
        Ok(Row { x, m, v, g: address(g, dev, what)?, n: n as i64, ..Row::default() })
    }

    /// The table with each row's first block filled in, uploaded, and the number of blocks.
    fn upload(dev: &CudaDevice, mut rows: Vec<Row>) -> Result<(CudaSlice<Row>, i32, usize)> {
        let mut blocks = 0;
        for r in &mut rows {
            r.chunk_start = blocks as i64;
            blocks += (r.n as usize).div_ceil(CHUNK);
        }
        Ok((dev.clone_htod(&rows)?, int(rows.len(), "tensors")?, blocks))
    }

    /// Runs `kernel(table, count)` over every block of the table.
    fn launch(dev: &CudaDevice, kernel: &str, rows: Vec<Row>) -> Result<()> {
        let (table, count, n) = upload(dev, rows)?;
        if n > 0 {
            let (func, stream) = MULTI_TENSOR.func::<f32>(dev, kernel)?;
            let mut l = stream.launch_builder(&func);
            l.arg(&table);
            l.arg(&count);
            // SAFETY: the kernel takes (const Row *, int); every row addresses `n` f32 elements of a live tensor.
            unsafe { l.launch(blocks(n)) }.w()?;
        }
        Ok(())
    }

    pub(super) fn adamw(dev: &CudaDevice, updates: &[AdamWUpdate]) -> Result<()> {
        // Kept until the launch is queued; their memory is freed in stream order after it.
        let grads = updates.iter().map(|u| u.g.contiguous()).collect::<Result<Vec<_>>>()?;
        let rows = updates
            .iter()
            .zip(&grads)
            .map(|(u, g)| {
                let h = u.step;
                let h = [h.beta1, h.beta2, h.eps, h.lr, h.decay, h.bc1, h.bc2, h.scale];
                Ok(Row { h, ..row(g, &[u.p, u.m, u.v], dev, "adamw parameter, moments and gradient")? })
            })
            .collect::<Result<Vec<_>>>()?;
        launch(dev, "adamw_multi", rows)
    }

    pub(super) fn ema(dev: &CudaDevice, pairs: &[(Var, Var)], momentum: f64) -> Result<()> {
        let rows = pairs
            .iter()
            .map(|(p, twin)| {
                let h = [momentum as f32, (1.0 - momentum) as f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
                Ok(Row { h, ..row(p.as_tensor(), &[twin.as_tensor()], dev, "momentum twin")? })
            })
            .collect::<Result<Vec<_>>>()?;
        launch(dev, "ema_multi", rows)
    }

    pub(super) fn sum_squares(dev: &CudaDevice, tensors: &[&Tensor]) -> Result<Tensor> {
        let contiguous = tensors.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
        let rows = contiguous.iter().map(|t| row(t, &[], dev, "gradient")).collect::<Result<Vec<_>>>()?;
        let (table, count, n) = upload(dev, rows)?;
        let mut out = dev.alloc_zeros::<f64>(1)?;
        if n > 0 {
            // SAFETY: sum_squares_partial writes one partial per block.
            let mut partial = unsafe { dev.alloc::<f32>(n)? };
            let (func, stream) = MULTI_TENSOR.func::<f32>(dev, "sum_squares_partial")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&table);
            l.arg(&count);
            l.arg(&mut partial);
            // SAFETY: argument types and order match sum_squares_partial in kernels/multi_tensor.cu.
            unsafe { l.launch(blocks(n)) }.w()?;
            let (func, stream) = MULTI_TENSOR.func::<f32>(dev, "sum_squares_final")?;
            let mut l = stream.launch_builder(&func);
            let chunks = n as i64;
            l.arg(&partial);
            l.arg(&chunks);
            l.arg(&mut out);
            // SAFETY: argument types and order match sum_squares_final (one block of SUM_THREADS = BLOCK).
            unsafe { l.launch(blocks(1)) }.w()?;
        }
        let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone()));
        Ok(Tensor::from_storage(storage, Shape::from(()), BackpropOp::none(), false))
    }
}
