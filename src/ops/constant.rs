//! `a @ b` where `b` is a constant: the ITC similarities against momentum keys and the feature queues.
//! candle's matmul backward computes and keeps a gradient for both operands, tracked or not: for
//! ALBEF-B's queue of 65,536 keys that is a [256, 65,600] product, zeroed and added, twice per step, and
//! 128 MiB held to the end of the backward. One node here, whose backward returns only `a`'s gradient.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};

/// The fused path of [`super::matmul_by_constant`]: a [m, k], b [k, n].
pub(super) fn matmul_by_constant_fused(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.apply_op1(ByConstant(b.detach()))
}

/// The product's sizes (m, k, n) and output shape, or an error naming the operands.
fn geometry(a: &Layout, b: &Layout) -> Result<((usize, usize, usize), Shape)> {
    match (a.dims(), b.dims()) {
        (&[m, k], &[k2, n]) if k == k2 => Ok(((m, k, n), Shape::from((m, n)))),
        (da, db) => bail!("matmul by a constant: {da:?} @ {db:?} do not fit (2-d, inner sizes equal)"),
    }
}

struct ByConstant(Tensor);

impl CustomOp1 for ByConstant {
    fn name(&self) -> &'static str {
        "alignfuse-matmul-by-constant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (storage, bl) = self.0.storage_and_layout();
        let ((m, k, n), shape) = geometry(l, bl)?;
        let Storage::Cpu(b) = &*storage else { bail!("matmul by a constant: the constant is not on the CPU") };
        Ok((s.matmul(b, (1, m, n, k), l, bl)?, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        let (storage, bl) = self.0.storage_and_layout();
        let ((m, k, n), shape) = geometry(l, bl)?;
        let Storage::Cuda(b) = &*storage else { bail!("matmul by a constant: the constant is not on the GPU") };
        Ok((s.matmul(b, (1, m, n, k), l, bl)?, shape))
    }

    fn bwd(&self, _a: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.matmul(&self.0.t()?)?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{matmul_by_constant, testing::*};
    use crate::config::Kernels;
    use candle_core::{Device, Result, Var};

    /// The plain product's values and `a`'s gradient, and no gradient for the constant (candle's matmul
    /// keeps one).
    #[test]
    fn fused_matches_the_product_without_a_gradient_for_the_constant() -> Result<()> {
        let mut r = rng(29);
        for (m, k, n) in [(1, 1, 1), (4, 16, 70), (48, 64, 96)] {
            let a = Var::from_tensor(&uniform(&mut r, &[m, k], 1.0, &Device::Cpu)?)?;
            let b = uniform(&mut r, &[k, n], 1.0, &Device::Cpu)?;
            let probe = uniform(&mut r, &[m, n], 1.0, &Device::Cpu)?;
            let run = |kernels| -> Result<_> {
                let y = matmul_by_constant(a.as_tensor(), &b, kernels)?;
                let grads = (&y * &probe)?.sum_all()?.backward()?;
                Ok((y, grads.get(a.as_tensor()).cloned().expect("a's gradient"), grads.get(&b).is_some()))
            };
            let ((y, ga, kept_b), (want, want_ga, reference_kept_b)) = (run(Kernels::Fused)?, run(Kernels::Reference)?);
            assert!(max_err(&y, &want)?.1 < 1e-6 && max_err(&ga, &want_ga)?.1 < 1e-6, "{m}x{k}x{n}");
            assert!(!kept_b && reference_kept_b, "{m}x{k}x{n}");
        }
        Ok(())
    }
}
