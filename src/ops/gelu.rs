//! Fused GELU with the exact (erf) form, `y = x / 2 * (1 + erf(x / sqrt 2))`, and its backward
//! `dx = g * (Phi(x) + x * phi(x))`. candle's `gelu_erf` calls libm's scalar `erf` per element (8% of the CPU
//! training step); here erf is Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7) over the
//! branch-free `cpu::exp`, so the loop vectorises (to the CPU's widest vectors, `cpu::Simd`). CUDA kernels:
//! kernels/gelu.cu (`erff`; they also read bf16 for a bf16 linear layer's GELU). The op takes f32.

use super::cpu;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// The fused path of [`super::gelu`], for f32 `x`.
pub(super) fn gelu_fused(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// erf(x), |error| < 1.5e-7 (Abramowitz & Stegun 7.1.26).
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let e = 1.0 - poly * cpu::exp(-a * a);
    e.copysign(x)
}

cpu::multiversion! {
    /// `y = gelu(x)` over `y`'s length.
    fn forward(x: &[f32], y: &mut [f32]) {
        // Index loops: iterator adapters may stay out of line, compiled for the baseline.
        let x = &x[..y.len()];
        for i in 0..y.len() {
            y[i] = 0.5 * x[i] * (1.0 + erf(x[i] * FRAC_1_SQRT_2));
        }
    }
}

cpu::multiversion! {
    /// `dx = g * gelu'(x)` over `dx`'s length.
    fn backward(x: &[f32], g: &[f32], dx: &mut [f32]) {
        let (x, g) = (&x[..dx.len()], &g[..dx.len()]);
        for i in 0..dx.len() {
            let v = x[i];
            let cdf = 0.5 * (1.0 + erf(v * FRAC_1_SQRT_2));
            dx[i] = g[i] * (cdf + v * INV_SQRT_2PI * cpu::exp(-0.5 * v * v));
        }
    }
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "alignfuse-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(gelu_cpu(cpu::f32_slice(s, l, "gelu x")?)), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::launch("gelu_fwd", (s, l), None)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_grad(x, g)?))
    }
}

/// `gelu(x)` on the CPU, on the compute threads.
pub(super) fn gelu_cpu(x: &[f32]) -> Vec<f32> {
    // SAFETY: map_parts writes every element.
    let mut y = unsafe { cpu::output(x.len()) };
    cpu::map_parts(&mut y, 1, |i, part| forward(&x[i..], part));
    y
}

/// The gradient at the input `x` of GELU from the gradient `g` of its output (no graph).
pub(super) fn gelu_grad(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(&g.contiguous()?, &GeluBwd)
}

/// (x, g) -> g * (Phi(x) + x * phi(x)).
struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "alignfuse-gelu-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (cpu::f32_slice(s1, l1, "gelu x")?, cpu::f32_slice(s2, l2, "gelu gradient")?);
        if x.len() != g.len() {
            candle_core::bail!("gelu backward: gradient {:?} for input {:?}", l2.dims(), l1.dims());
        }
        // SAFETY: map_parts writes every element.
        let mut dx = unsafe { cpu::output(x.len()) };
        cpu::map_parts(&mut dx, 1, |i, part| backward(&x[i..], &g[i..], part));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        gpu::launch("gelu_bwd", (s1, l1), Some((s2, l2)))
    }
}

#[cfg(feature = "cuda")]
pub(super) mod gpu {
    use crate::ops::cuda::{contiguous, int, per_element, unsupported, GELU};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::{bail, CudaStorage, Layout, Result, Shape, WithDType};

    /// `gelu_fwd(x, y, n)` or `gelu_bwd(x, g, dx, n)` over every element, on f32 or bf16 storage (a bf16
    /// linear layer's pre-activation), the output in the input's dtype.
    pub(in crate::ops) fn launch(
        root: &str, (x, xl): (&CudaStorage, &Layout), g: Option<(&CudaStorage, &Layout)>,
    ) -> Result<(CudaStorage, Shape)> {
        if let Some((_, gl)) = g {
            if gl.shape() != xl.shape() {
                bail!("gelu backward: gradient {:?} for input {:?}", gl.dims(), xl.dims());
            }
        }
        let slice = match (&x.slice, g.map(|(g, gl)| (&g.slice, gl))) {
            (S::F32(xs), None) => S::F32(run(root, x, (xs, xl), None)?),
            (S::F32(xs), Some((S::F32(gs), gl))) => S::F32(run(root, x, (xs, xl), Some((gs, gl)))?),
            (S::BF16(xs), None) => S::BF16(run(root, x, (xs, xl), None)?),
            (S::BF16(xs), Some((S::BF16(gs), gl))) => S::BF16(run(root, x, (xs, xl), Some((gs, gl)))?),
            _ => return Err(unsupported(&x.slice, "gelu")),
        };
        Ok((CudaStorage { slice, device: x.device.clone() }, xl.shape().clone()))
    }

    fn run<T: WithDType + DeviceRepr>(
        root: &str, x: &CudaStorage, (xs, xl): (&CudaSlice<T>, &Layout), g: Option<(&CudaSlice<T>, &Layout)>,
    ) -> Result<CudaSlice<T>> {
        let dev = &x.device;
        let xs = contiguous(xs, xl, "gelu x")?;
        let gs = g.map(|(gs, gl)| contiguous(gs, gl, "gelu gradient")).transpose()?;
        let n = xl.shape().elem_count();
        // SAFETY: the kernel writes every element.
        let out = unsafe { dev.alloc::<T>(n)? };
        if n > 0 {
            let (func, stream) = GELU.func::<T>(dev, root)?;
            let mut l = stream.launch_builder(&func);
            l.arg(&xs);
            if let Some(gs) = &gs {
                l.arg(gs);
            }
            l.arg(&out);
            candle_core::builder_arg!(l, int(n, "elements")?);
            // SAFETY: argument types and order match gelu_fwd / gelu_bwd in kernels/gelu.cu.
            unsafe { l.launch(per_element(n)) }.w()?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{gelu, testing::*};
    use crate::config::Kernels;
    use candle_core::{Device, Result, Tensor, Var};

    #[test]
    fn fused_matches_composition_values_and_gradients() -> Result<()> {
        let mut r = rng(11);
        for (dims, range) in [(vec![7usize], 1.0), (vec![4, 33, 96], 6.0), (vec![3, 1000, 64], 12.0)] {
            let x = Var::from_tensor(&uniform(&mut r, &dims, range, &Device::Cpu)?)?;
            let probe = uniform(&mut r, &dims, 1.0, &Device::Cpu)?;
            let run = |k: Kernels| -> Result<Vec<Tensor>> {
                let y = gelu(x.as_tensor(), k)?;
                let g = (&y * &probe)?.sum_all()?.backward()?;
                Ok(vec![y.clone(), g.get(x.as_tensor()).cloned().expect("a gradient")])
            };
            let (fused, reference) = (run(Kernels::Fused)?, run(Kernels::Reference)?);
            for (what, (f, rf)) in ["y", "dx"].iter().zip(fused.iter().zip(&reference)) {
                let (_, err) = max_err(f, rf)?;
                assert!(err < 1e-6, "{dims:?} {what}: relative error {err:.2e}");
            }
        }
        Ok(())
    }
}
