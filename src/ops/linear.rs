//! Fused linear layer `y = x W^T + b` for x [.., in], W [out, in], b [out], as one autograd node. Composed,
//! a layer is five nodes (flatten x, W^T, the product, unflatten, bias add), and candle's backward zeroes
//! and accumulates a gradient for every node: two activation-sized passes per node, a sixth of the CPU
//! training step. Here the product reads x flat and W transposed in place (gemm on the CPU, into an
//! output it does not zero first; cuBLAS through candle on CUDA), the bias is added in place, and the
//! backward returns dx = g W, dW = g^T x and db = the column sums of g directly. f32; on CUDA also bf16 x
//! and weight with an f32 bias (torch.autocast's linear: a bf16 product, the bias and GELU applied to it
//! in place, the pre-activation kept in bf16, db summed in f32).
//!
//! With GELU after it (BERT's intermediate layer, the ViT's fc1) the op outputs `gelu(x W^T + b)` and keeps
//! GELU's slope itself (the pre-activation on CUDA): as two nodes, the backward zeroed and accumulated a
//! gradient for that pre-activation too, four times the layer's width, on the driver thread.

use super::bias;
use super::cpu::{self, Mat};
use super::gelu;
use super::saved::Saved;
use candle_core::{bail, CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor};

/// The fused path of [`super::linear`] (and of [`super::linear_gelu`] with `gelu`), for x and weight in one
/// dtype (f32, or bf16 on CUDA) and an f32 bias.
pub(super) fn linear_fused(x: &Tensor, weight: &Tensor, bias: &Tensor, gelu: bool) -> Result<Tensor> {
    let op = Linear { gelu: gelu.then(|| Saved::new("linear")) };
    x.contiguous()?.apply_op3(&weight.contiguous()?, &bias.contiguous()?, op)
}

struct Linear {
    /// With GELU after the product: what GELU's backward reads, kept by the forward.
    gelu: Option<Saved<gelu::Kept>>,
}

impl Linear {
    /// Keeps what GELU's backward reads.
    fn keep(&self, kept: gelu::Kept) -> Result<()> {
        self.gelu.as_ref().map_or(Ok(()), |saved| saved.keep(kept))
    }

    /// The gradient at the pre-activation from the gradient `g` of the output.
    fn pre_activation_grad(&self, g: &Tensor) -> Result<Tensor> {
        match &self.gelu {
            Some(saved) => saved.get()?.grad(g),
            None => Ok(g.clone()),
        }
    }
}

/// The product's geometry: rows m, inputs k, outputs n, and the output shape.
struct Geometry {
    m: usize,
    k: usize,
    n: usize,
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
        Ok(Geometry { m, k, n, out: Shape::from(out) })
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
        let x = cpu::f32_slice(s1, l1, "linear x")?;
        let w = cpu::f32_slice(s2, l2, "linear weight")?;
        let b = cpu::f32_slice(s3, l3, "linear bias")?;
        let y = cpu_forward(x, w, b, (g.m, g.n, g.k));
        if self.gelu.is_none() {
            return Ok((CpuStorage::F32(y), g.out));
        }
        let (h, slope) = gelu::gelu_slope_cpu(&y);
        self.keep(gelu::Kept::Slope(Tensor::from_vec(slope, g.out.clone(), &Device::Cpu)?))?;
        Ok((CpuStorage::F32(h), g.out))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
        s3: &candle_core::CudaStorage, l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let g = Geometry::new(l1, l2, l3)?;
        // x as [m, k] and W^T as [k, n], a transposed view of the contiguous [n, k] weight.
        let x = Layout::contiguous_with_offset((g.m, g.k), l1.start_offset());
        let wt = Layout::new(Shape::from((g.k, g.n)), vec![1, g.k], l2.start_offset());
        let y = s1.matmul(s2, (1, g.m, g.n, g.k), &x, &wt)?;
        let (y, _) = bias::gpu::add_bias(&y, &Layout::contiguous((g.m, g.n)), s3, l3)?;
        if self.gelu.is_none() {
            return Ok((y, g.out));
        }
        let (h, _) = gelu::gpu::launch("gelu_fwd", (&y, &Layout::contiguous(g.out.clone())), None)?;
        let none = candle_core::op::BackpropOp::none();
        self.keep(gelu::Kept::Input(Tensor::from_storage(Storage::Cuda(y), g.out.clone(), none, false)))?;
        Ok((h, g.out))
    }

    fn bwd(
        &self, x: &Tensor, w: &Tensor, _b: &Tensor, _y: &Tensor, g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: products with the tracked x and W would record them, and W's gradient (kept to the end
        // of the backward) would then hold g, activation-sized, for every layer (ALBEF-B: +2.6 GiB).
        let (n, k) = w.dims2()?;
        let g = self.pre_activation_grad(g)?;
        let (g, x, w) = (g.contiguous()?.reshape(((), n))?, x.detach(), w.detach());
        let (dx, dw) = match x.device() {
            Device::Cpu => cpu_backward(&x, &w, &g)?,
            _ => (g.matmul(&w)?.reshape(x.shape())?, g.t()?.matmul(&x.reshape(((), k))?)?),
        };
        Ok((Some(dx), Some(dw), Some(bias::column_sum(&g)?)))
    }
}

/// `x W^T + b` on the CPU for x [m, k], W [n, k] and b [n].
fn cpu_forward(x: &[f32], w: &[f32], b: &[f32], (m, n, k): (usize, usize, usize)) -> Vec<f32> {
    // SAFETY: the product writes every element without reading it.
    let mut y = unsafe { cpu::output(m * n) };
    cpu::par_matmul(&mut y, (m, n, k), Mat::rows(x, k), Mat::transposed(w, k));
    cpu::map_parts(&mut y, n, |_, rows| bias::add_rows(rows, b));
    y
}

/// The fused path of [`super::mlp`] on the CPU: `gelu(x W1^T + b1) W2^T + b2` as one node, for f32 x [.., k],
/// W1 [h, k], W2 [n, h]. As two fused linear nodes, the backward zeroed and accumulated the gradient of the
/// hidden layer between them, [m, h] (four times the model's width), on the driver thread. The weights and
/// biases enter packed flat (a CustomOp takes three inputs); their gradients leave through the
/// concatenation's backward, weight-sized.
pub(super) fn mlp_fused(x: &Tensor, (w1, b1): (&Tensor, &Tensor), (w2, b2): (&Tensor, &Tensor)) -> Result<Tensor> {
    let ((h, k), (n, h2)) = (w1.dims2()?, w2.dims2()?);
    if x.dims().last() != Some(&k) || h2 != h || b1.dims() != [h] || b2.dims() != [n] {
        bail!(
            "mlp: x {:?}, fc1 {:?} + {:?} and fc2 {:?} + {:?} do not fit",
            x.dims(),
            w1.dims(),
            b1.dims(),
            w2.dims(),
            b2.dims()
        );
    }
    let weights = Tensor::cat(&[w1.flatten_all()?, w2.flatten_all()?], 0)?;
    let biases = Tensor::cat(&[b1, b2], 0)?;
    x.contiguous()?.apply_op3(&weights, &biases, Mlp { h, k, n, saved: Saved::new("mlp") })
}

/// [`mlp_fused`]'s node: x [.., k] through h hidden units to n outputs.
struct Mlp {
    h: usize,
    k: usize,
    n: usize,
    /// GELU's slope and the hidden layer [m, h], from the forward.
    saved: Saved<[Tensor; 2]>,
}

impl CustomOp3 for Mlp {
    fn name(&self) -> &'static str {
        "alignfuse-mlp"
    }

    fn cpu_fwd(
        &self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let Mlp { h, k, n, .. } = *self;
        let x = cpu::f32_slice(s1, l1, "mlp x")?;
        let (w1, w2) = cpu::f32_slice(s2, l2, "mlp weights")?.split_at(h * k);
        let (b1, b2) = cpu::f32_slice(s3, l3, "mlp biases")?.split_at(h);
        let m = x.len() / k.max(1);
        let pre = cpu_forward(x, w1, b1, (m, h, k));
        let (hidden, slope) = gelu::gelu_slope_cpu(&pre);
        let y = cpu_forward(&hidden, w2, b2, (m, n, h));
        let keep = |v: Vec<f32>| Tensor::from_vec(v, (m, h), &Device::Cpu);
        self.saved.keep([keep(slope)?, keep(hidden)?])?;
        let mut out = l1.dims().to_vec();
        *out.last_mut().expect("x is at least 1-d") = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(
        &self, x: &Tensor, weights: &Tensor, _b: &Tensor, _y: &Tensor, g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Mlp { h, k, n, .. } = *self;
        let [slope, hidden] = self.saved.get()?;
        let (x, weights) = (x.detach(), weights.detach());
        let w1 = weights.narrow(0, 0, h * k)?.reshape((h, k))?;
        let w2 = weights.narrow(0, h * k, n * h)?.reshape((n, h))?;
        let g = g.contiguous()?.reshape(((), n))?;
        let (dh, dw2) = cpu_backward(&hidden, &w2, &g)?;
        let dpre = gelu::Kept::Slope(slope).grad(&dh)?;
        let (dx, dw1) = cpu_backward(&x, &w1, &dpre)?;
        let dw = Tensor::cat(&[dw1.flatten_all()?, dw2.flatten_all()?], 0)?;
        let db = Tensor::cat(&[bias::column_sum(&dpre)?, bias::column_sum(&g)?], 0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// dx = g W and dW = g^T x on the CPU: candle's products, without zero-filling their outputs first.
fn cpu_backward(x: &Tensor, w: &Tensor, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let ((n, k), m) = (w.dims2()?, g.dim(0)?);
    let guards = [x, w, g].map(|t| t.storage_and_layout());
    let slice = |i: usize, what: &str| match &*guards[i].0 {
        Storage::Cpu(s) => cpu::f32_slice(s, guards[i].1, what),
        _ => bail!("linear backward: {what} is not on the CPU"),
    };
    let (xs, ws, gs) = (slice(0, "linear x")?, slice(1, "linear weight")?, slice(2, "linear gradient")?);
    // SAFETY: each product writes every element of its output without reading it.
    let (mut dx, mut dw) = unsafe { (cpu::output(m * k), cpu::output(n * k)) };
    cpu::par_matmul(&mut dx, (m, k, n), Mat::rows(gs, n), Mat::rows(ws, k));
    cpu::par_matmul(&mut dw, (n, k, m), Mat::transposed(gs, n), Mat::rows(xs, k));
    Ok((Tensor::from_vec(dx, x.shape(), &Device::Cpu)?, Tensor::from_vec(dw, (n, k), &Device::Cpu)?))
}

#[cfg(test)]
mod tests {
    use super::super::{linear, linear_gelu, mlp, testing::*};
    use crate::config::Kernels;
    use candle_core::{Device, Result, Tensor, Var};

    /// With and without the GELU after it; the reference composes candle's ops (and the reference GELU).
    #[test]
    fn fused_matches_composition_values_and_gradients() -> Result<()> {
        let mut r = rng(13);
        let cases = [(vec![5usize, 3], 4usize), (vec![4, 33, 96], 384), (vec![2, 3, 70, 64], 1)];
        for ((dims, out), gelu) in cases.iter().flat_map(|c| [(c.clone(), false), (c.clone(), true)]) {
            let layer = if gelu { linear_gelu } else { linear };
            let k = *dims.last().unwrap();
            let x = Var::from_tensor(&uniform(&mut r, &dims, 2.0, &Device::Cpu)?)?;
            let w = Var::from_tensor(&uniform(&mut r, &[out, k], 0.5, &Device::Cpu)?)?;
            let b = Var::from_tensor(&uniform(&mut r, &[out], 1.0, &Device::Cpu)?)?;
            let mut out_dims = dims.clone();
            *out_dims.last_mut().unwrap() = out;
            let probe = uniform(&mut r, &out_dims, 1.0, &Device::Cpu)?;
            let run = |kernels: Kernels| -> Result<Vec<Tensor>> {
                let y = layer(x.as_tensor(), w.as_tensor(), b.as_tensor(), kernels)?;
                let g = (&y * &probe)?.sum_all()?.backward()?;
                let grad = |v: &Var| g.get(v.as_tensor()).cloned().expect("a gradient");
                Ok(vec![y.clone(), grad(&x), grad(&w), grad(&b)])
            };
            let (fused, reference) = (run(Kernels::Fused)?, run(Kernels::Reference)?);
            // A gradient that records its own graph keeps every layer's output gradient alive.
            assert!(fused[1..].iter().all(|g| !g.track_op()), "{dims:?}: a gradient holds a graph");
            for (what, (f, rf)) in ["y", "dx", "dw", "db"].iter().zip(fused.iter().zip(&reference)) {
                assert_eq!(f.dims(), rf.dims(), "{dims:?} gelu {gelu} {what}");
                let (_, err) = max_err(f, rf)?;
                assert!(err < 1e-5, "{dims:?} gelu {gelu} {what}: relative error {err:.2e}");
            }
        }
        Ok(())
    }

    /// The feed-forward sublayer as one node equals the two fused layers to the bit (values and every
    /// gradient) and the reference composition to 1e-5.
    #[test]
    fn mlp_matches_two_layers_bit_for_bit() -> Result<()> {
        let mut r = rng(14);
        for (dims, hidden, out) in [(vec![5usize, 3], 4usize, 2usize), (vec![4, 33, 96], 384, 96)] {
            let k = *dims.last().unwrap();
            let var = |r: &mut _, d: &[usize], range| Var::from_tensor(&uniform(r, d, range, &Device::Cpu)?);
            let x = var(&mut r, &dims, 2.0)?;
            let (w1, b1) = (var(&mut r, &[hidden, k], 0.5)?, var(&mut r, &[hidden], 1.0)?);
            let (w2, b2) = (var(&mut r, &[out, hidden], 0.5)?, var(&mut r, &[out], 1.0)?);
            let mut out_dims = dims.clone();
            *out_dims.last_mut().unwrap() = out;
            let probe = uniform(&mut r, &out_dims, 1.0, &Device::Cpu)?;
            let run = |one_node: bool, kernels: Kernels| -> Result<Vec<Tensor>> {
                let (fc1, fc2) = ((w1.as_tensor(), b1.as_tensor()), (w2.as_tensor(), b2.as_tensor()));
                let y = if one_node {
                    mlp(x.as_tensor(), fc1, fc2, kernels)?
                } else {
                    linear(&linear_gelu(x.as_tensor(), fc1.0, fc1.1, kernels)?, fc2.0, fc2.1, kernels)?
                };
                let g = (&y * &probe)?.sum_all()?.backward()?;
                let mut all = vec![y];
                for v in [&x, &w1, &b1, &w2, &b2] {
                    all.push(g.get(v.as_tensor()).cloned().expect("a gradient"));
                }
                Ok(all)
            };
            let (one, two, reference) =
                (run(true, Kernels::Fused)?, run(false, Kernels::Fused)?, run(true, Kernels::Reference)?);
            for (i, what) in ["y", "dx", "dw1", "db1", "dw2", "db2"].iter().enumerate() {
                assert_eq!(max_err(&one[i], &two[i])?.0, 0.0, "{dims:?} {what}: not the two layers' bits");
                let (_, err) = max_err(&one[i], &reference[i])?;
                assert!(err < 1e-5, "{dims:?} {what}: relative error {err:.2e}");
            }
        }
        Ok(())
    }
}
