//! Fused linear layer `y = x W^T + b` for x [.., in], W [out, in], b [out], as one autograd node. Composed,
//! a layer is five nodes (flatten x, W^T, the product, unflatten, bias add), and candle's backward zeroes
//! and accumulates a gradient for every node: two activation-sized passes per node, a sixth of the CPU
//! training step. Here the product reads x flat and W transposed in place (the backend's matmul: gemm on
//! the CPU, cuBLAS on CUDA), the bias is added in place, and the backward returns dx = g W, dW = g^T x
//! and db = the column sums of g directly. f32 only.

use super::{bias, cpu};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

/// The fused path of [`super::linear`], for f32 x, weight and bias.
pub(super) fn linear_fused(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)
}

struct Linear;

/// The product's geometry: rows m, inputs k, outputs n, x as [m, k], W^T as [k, n] (a transposed view of
/// the contiguous [n, k] weight) and the output shape.
struct Geometry {
    m: usize,
    k: usize,
    n: usize,
    x: Layout,
    wt: Layout,
    out: Shape,
}

impl Geometry {
    fn new(xl: &Layout, wl: &Layout, bl: &Layout) -> Result<Self> {
        let (&[n, k], Some(&xk)) = (wl.dims(), xl.dims().last()) else {
            bail!("linear: weight {:?} must be [out, in] and x {:?} at least 1-d", wl.dims(), xl.dims())
        };
        if xk != k || bl.dims() != [n] {
            bail!("linear: x {:?}, weight {:?} and bias {:?} do not fit", xl.dims(), wl.dims(), bl.dims());
        }
        if !xl.is_contiguous() || !wl.is_contiguous() {
            bail!("linear: x and weight must be contiguous");
        }
        let m = xl.shape().elem_count() / k.max(1);
        let mut out = xl.dims().to_vec();
        *out.last_mut().expect("x is at least 1-d") = n;
        Ok(Geometry {
            m,
            k,
            n,
            x: Layout::contiguous_with_offset((m, k), xl.start_offset()),
            wt: Layout::new(Shape::from((k, n)), vec![1, k], wl.start_offset()),
            out: Shape::from(out),
        })
    }
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "alignfuse-linear"
    }

    fn cpu_fwd(
        &self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(l1, l2, l3)?;
        let b = cpu::f32_slice(s3, l3, "linear bias")?;
        let CpuStorage::F32(mut y) = s1.matmul(s2, (1, g.m, g.n, g.k), &g.x, &g.wt)? else {
            bail!("linear: the fused CPU op takes f32, got {:?}", s1.dtype())
        };
        cpu::map_parts(&mut y, g.n, |_, rows| bias::add_rows(rows, b));
        Ok((CpuStorage::F32(y), g.out))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
        s3: &candle_core::CudaStorage, l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = Geometry::new(l1, l2, l3)?;
        let y = s1.matmul(s2, (1, g.m, g.n, g.k), &g.x, &g.wt)?;
        let (y, _) = bias::gpu::add_bias(&y, &Layout::contiguous((g.m, g.n)), s3, l3)?;
        Ok((y, g.out))
    }

    fn bwd(
        &self, x: &Tensor, w: &Tensor, _b: &Tensor, _y: &Tensor, g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: products with the tracked x and W would record them, and W's gradient (kept to the end
        // of the backward) would then hold g, activation-sized, for every layer (ALBEF-B: +2.6 GiB).
        let (n, k) = w.dims2()?;
        let (g, x, w) = (g.contiguous()?.reshape(((), n))?, x.detach(), w.detach());
        let dx = g.matmul(&w)?.reshape(x.shape())?;
        let dw = g.t()?.matmul(&x.reshape(((), k))?)?;
        Ok((Some(dx), Some(dw), Some(bias::column_sum(&g)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{linear, testing::*};
    use crate::config::Kernels;
    use candle_core::{Device, Result, Tensor, Var};

    #[test]
    fn fused_matches_composition_values_and_gradients() -> Result<()> {
        let mut r = rng(13);
        for (dims, out) in [(vec![5usize, 3], 4usize), (vec![4, 33, 96], 384), (vec![2, 3, 70, 64], 1)] {
            let k = *dims.last().unwrap();
            let x = Var::from_tensor(&uniform(&mut r, &dims, 2.0, &Device::Cpu)?)?;
            let w = Var::from_tensor(&uniform(&mut r, &[out, k], 0.5, &Device::Cpu)?)?;
            let b = Var::from_tensor(&uniform(&mut r, &[out], 1.0, &Device::Cpu)?)?;
            let mut out_dims = dims.clone();
            *out_dims.last_mut().unwrap() = out;
            let probe = uniform(&mut r, &out_dims, 1.0, &Device::Cpu)?;
            let run = |kernels: Kernels| -> Result<Vec<Tensor>> {
                let y = linear(x.as_tensor(), w.as_tensor(), b.as_tensor(), kernels)?;
                let g = (&y * &probe)?.sum_all()?.backward()?;
                let grad = |v: &Var| g.get(v.as_tensor()).cloned().expect("a gradient");
                Ok(vec![y.clone(), grad(&x), grad(&w), grad(&b)])
            };
            let (fused, reference) = (run(Kernels::Fused)?, run(Kernels::Reference)?);
            // A gradient that records its own graph keeps every layer's output gradient alive.
            assert!(fused[1..].iter().all(|g| !g.track_op()), "{dims:?}: a gradient holds a graph");
            for (what, (f, rf)) in ["y", "dx", "dw", "db"].iter().zip(fused.iter().zip(&reference)) {
                assert_eq!(f.dims(), rf.dims(), "{dims:?} {what}");
                let (_, err) = max_err(f, rf)?;
                assert!(err < 1e-5, "{dims:?} {what}: relative error {err:.2e}");
            }
        }
        Ok(())
    }
}
