//! Fused GELU with the exact (erf) form, `y = x / 2 * (1 + erf(x / sqrt 2))`, and its backward
//! `dx = g * (Phi(x) + x * phi(x))`. candle's `gelu_erf` calls libm's scalar `erf` per element (8% of the CPU
//! training step); here erf is Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7) over the
//! branch-free `cpu::exp`, so the loop vectorises (to the CPU's widest vectors, `cpu::Simd`). A fused
//! layer ending in GELU keeps the slope its forward computed with the same exp ([`Kept`]), so its backward
//! is one product and gives the bits of recomputing it. CUDA kernels: kernels/gelu.cu (`erff`; they also read
//! bf16 for a bf16 linear layer's GELU). The op takes f32.

use super::cpu;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// The fused path of [`super::gelu`], for f32 `x`.
pub(super) fn gelu_fused(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f32 = 0.398_942_3;

/// `(gelu(x), gelu'(x))`, the slope `Phi(x) + x phi(x)`. One exp serves both: erf(|x| / sqrt 2) in
/// Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7) multiplies its polynomial by exp(-x^2 / 2), which is
/// phi(x) * sqrt(2 pi). Callers that need only one of the two let the compiler drop the other.
#[inline(always)]
fn gelu_and_slope(x: f32) -> (f32, f32) {
    let a = x.abs() * FRAC_1_SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_72 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let e = cpu::exp(-a * a);
    let cdf = 0.5 * (1.0 + (1.0 - poly * e).copysign(x));
    (x * cdf, cdf + x * INV_SQRT_2PI * e)
}

cpu::multiversion! {
    /// `y = gelu(x)` over `y`'s length.
    fn forward(x: &[f32], y: &mut [f32]) {
        // Index loops: iterator adapters may stay out of line, compiled for the baseline.
        let x = &x[..y.len()];
        for i in 0..y.len() {
            y[i] = gelu_and_slope(x[i]).0;
        }
    }
}

cpu::multiversion! {
    /// `y = gelu(x)` and `d = gelu'(x)` over `y`'s length.
    fn forward_slope(x: &[f32], y: &mut [f32], d: &mut [f32]) {
        let (x, d) = (&x[..y.len()], &mut d[..y.len()]);
        for i in 0..y.len() {
            (y[i], d[i]) = gelu_and_slope(x[i]);
        }
    }
}

cpu::multiversion! {
    /// `dx = g * gelu'(x)` over `dx`'s length.
    fn backward(x: &[f32], g: &[f32], dx: &mut [f32]) {
        let (x, g) = (&x[..dx.len()], &g[..dx.len()]);
        for i in 0..dx.len() {
            dx[i] = g[i] * gelu_and_slope(x[i]).1;
        }
    }
}

cpu::multiversion! {
    /// `dx = g * d` over `dx`'s length, `d` the slope the forward kept.
    fn backward_slope(d: &[f32], g: &[f32], dx: &mut [f32]) {
        let (d, g) = (&d[..dx.len()], &g[..dx.len()]);
        for i in 0..dx.len() {
            dx[i] = g[i] * d[i];
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
fn gelu_cpu(x: &[f32]) -> Vec<f32> {
    // SAFETY: map_parts writes every element.
    let mut y = unsafe { cpu::output(x.len()) };
    cpu::map_parts(&mut y, 1, |i, part| forward(&x[i..], part));
    y
}

/// `(gelu(x), gelu'(x))` on the CPU, on the compute threads: a fused layer's output and what its backward
/// keeps ([`Kept::Slope`]).
pub(super) fn gelu_slope_cpu(x: &[f32]) -> (Vec<f32>, Vec<f32>) {
    // SAFETY: map_part_pairs writes every element of both.
    let (mut y, mut d) = unsafe { (cpu::output(x.len()), cpu::output(x.len())) };
    cpu::map_part_pairs(&mut y, &mut d, |i, y, d| forward_slope(&x[i..], y, d));
    (y, d)
}

/// What the backward of a fused layer ending in GELU reads, kept by its forward.
#[derive(Clone)]
pub(super) enum Kept {
    /// The slope gelu'(x) (CPU), computed with the output's exp: the backward is one product, where
    /// recomputing erf and phi from x was 4% of the CPU training step.
    Slope(Tensor),
    /// The pre-activation x (CUDA, whose kernel recomputes the slope).
    #[cfg(feature = "cuda")]
    Input(Tensor),
}

impl Kept {
    /// The gradient at the pre-activation from the gradient `g` of the output (no graph).
    pub(super) fn grad(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Kept::Slope(d) => d.apply_op2_no_bwd(&g.contiguous()?, &GeluBwd::Slope),
            #[cfg(feature = "cuda")]
            Kept::Input(x) => gelu_grad(x, g),
        }
    }
}

/// The gradient at the input `x` of GELU from the gradient `g` of its output (no graph).
fn gelu_grad(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(&g.contiguous()?, &GeluBwd::Input)
}

/// (x, g) -> g * gelu'(x), or (d, g) -> g * d from the kept slope: the same bits.
enum GeluBwd {
    Input,
    Slope,
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "alignfuse-gelu-bwd"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (cpu::f32_slice(s1, l1, "gelu x")?, cpu::f32_slice(s2, l2, "gelu gradient")?);
        if x.len() != g.len() {
            candle_core::bail!("gelu backward: gradient {:?} for input {:?}", l2.dims(), l1.dims());
        }
        let kernel = match self {
            GeluBwd::Input => backward,
            GeluBwd::Slope => backward_slope,
        };
        // SAFETY: map_parts writes every element.
        let mut dx = unsafe { cpu::output(x.len()) };
        cpu::map_parts(&mut dx, 1, |i, part| kernel(&x[i..], &g[i..], part));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match self {
            GeluBwd::Input => gpu::launch("gelu_bwd", (s1, l1), Some((s2, l2))),
            GeluBwd::Slope => candle_core::bail!("gelu backward: the slope is kept on the CPU only"),
        }
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

    /// The slope a fused layer keeps gives the bits of recomputing it from the input, as does its output.
    #[test]
    fn kept_slope_matches_recomputed_bits() -> Result<()> {
        let mut r = rng(12);
        let (x, g) = (uniform(&mut r, &[3, 700], 8.0, &Device::Cpu)?, uniform(&mut r, &[3, 700], 1.0, &Device::Cpu)?);
        let (y, slope) = super::gelu_slope_cpu(&x.flatten_all()?.to_vec1()?);
        assert_eq!(y, super::gelu_cpu(&x.flatten_all()?.to_vec1()?));
        let kept = super::Kept::Slope(Tensor::from_vec(slope, x.shape(), &Device::Cpu)?).grad(&g)?;
        let recomputed = super::gelu_grad(&x, &g)?;
        assert_eq!(kept.flatten_all()?.to_vec1::<f32>()?, recomputed.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }
}
