//! Inverted dropout as one node: element i of x survives when a hash of (seed, i) clears p
//! (`cpu::dropout_keep`, the attention core's rule) and is scaled by 1 / (1 - p). Nothing mask-sized is
//! drawn, uploaded or kept for the backward, which is the same op on the gradient; the CUDA kernel
//! (kernels/dropout.cu) computes the mask the CPU loop does. f32 only.

use super::cpu;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The fused path of [`super::dropout`], for f32 `x` and p in (0, 1).
pub(super) fn dropout_fused(x: &Tensor, p: f64, seed: u64) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Dropout { seed, threshold: cpu::dropout_threshold(p), scale: 1.0 / (1.0 - p) as f32 })
}

struct Dropout {
    seed: u64,
    threshold: u32,
    scale: f32,
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "alignfuse-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu::f32_slice(s, l, "dropout input")?;
        // SAFETY: map_parts writes every element.
        let mut y = unsafe { cpu::output(x.len()) };
        cpu::map_parts(&mut y, 1, |start, part| {
            for (i, out) in (start..).zip(part.iter_mut()) {
                *out = if cpu::dropout_keep(self.seed, i as u64, self.threshold) { x[i] * self.scale } else { 0.0 };
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::launch(self, s, l)
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::Dropout;
    use crate::ops::cuda::{contiguous, per_element, unsupported, DROPOUT};
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, Shape};

    pub(super) fn launch(d: &Dropout, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = &x.device;
        let S::F32(xs) = &x.slice else { return Err(unsupported(&x.slice, "dropout")) };
        let xs = contiguous(xs, xl, "dropout input")?;
        let n = xl.shape().elem_count();
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<f32>(n)? };
        if n > 0 {
            let (func, stream) = DROPOUT.func::<f32>(dev, "dropout")?;
            let mut l = stream.launch_builder(&func);
            l.arg(&xs);
            l.arg(&out);
            candle_core::builder_arg!(l, n as i64, d.seed, d.threshold, d.scale);
            // SAFETY: argument types and order match dropout_f32 in kernels/dropout.cu.
            unsafe { l.launch(per_element(n)) }.w()?;
        }
        Ok((CudaStorage { slice: S::F32(out), device: dev.clone() }, xl.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{dropout, testing::*};
    use crate::config::Kernels;
    use candle_core::{Device, Result, Tensor, Var};

    /// The fused op and the composition with the materialised mask agree to the bit, values and gradients;
    /// the kept share is 1 - p and the kept elements are scaled by 1 / (1 - p).
    #[test]
    fn fused_matches_the_materialised_mask() -> Result<()> {
        let mut r = rng(5);
        for (dims, p) in [(vec![7usize], 0.5), (vec![4, 33, 96], 0.1), (vec![3, 1000, 64], 0.3)] {
            let x = Var::from_tensor(&(uniform(&mut r, &dims, 1.0, &Device::Cpu)? + 2.0)?)?;
            let probe = uniform(&mut r, &dims, 1.0, &Device::Cpu)?;
            let run = |k: Kernels| -> Result<Vec<Tensor>> {
                let y = dropout(x.as_tensor(), p, 42, k)?;
                let g = (&y * &probe)?.sum_all()?.backward()?;
                Ok(vec![y.clone(), g.get(x.as_tensor()).cloned().expect("a gradient")])
            };
            let (fused, reference) = (run(Kernels::Fused)?, run(Kernels::Reference)?);
            for (what, (f, rf)) in ["y", "dx"].iter().zip(fused.iter().zip(&reference)) {
                assert_eq!(max_err(f, rf)?.0, 0.0, "{dims:?} {what}");
            }
            let (y, x) = (fused[0].flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
            let kept: Vec<(f32, f32)> = y.iter().zip(&x).filter(|(y, _)| **y != 0.0).map(|(y, x)| (*y, *x)).collect();
            assert!(kept.iter().all(|(y, x)| (y - x / (1.0 - p as f32)).abs() < 1e-5), "{dims:?}: kept scaled");
            if y.len() > 1000 {
                let share = kept.len() as f64 / y.len() as f64;
                assert!((share - (1.0 - p)).abs() < 0.02, "{dims:?}: kept {share}, expected {}", 1.0 - p);
            }
        }
        assert_eq!(
            dropout(&Tensor::ones(3, candle_core::DType::F32, &Device::Cpu)?, 0.0, 1, Kernels::Fused)?
                .to_vec1::<f32>()?,
            [1.0; 3]
        );
        assert!(dropout(&Tensor::ones(3, candle_core::DType::F32, &Device::Cpu)?, 1.0, 1, Kernels::Fused).is_err());
        Ok(())
    }
}
