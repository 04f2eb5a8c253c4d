//! Fused ITC step (one direction). Per row i of sim [B, N], one pass over the row computes
//! `s = sim / temp`, the soft targets `t = alpha * softmax(sim_m / temp) + (1 - alpha) * pos`, the loss
//! `loss_i = -sum_j t_j * log_softmax(s)_j` and its derivatives, which the forward stores for `bwd`:
//!
//! - `d loss_i / d sim_ij = (softmax(s)_j - t_j) / temp` (the targets sum to 1; a row without positives
//!   has NaN targets, as in the reference),
//! - `d loss_i / d temp = sum_j (d loss_i / d s_ij) * (-sim_ij / temp^2)
//!   = -sum_j (d loss_i / d sim_ij) * sim_ij / temp`.
//!
//! The op returns the row losses [B] (the caller takes the mean); `bwd` scales the stored derivatives by
//! the rows' upstream gradients. The composed version is ~10 launches and as many round trips over
//! B x (B + 65536) for ALBEF's queue. CUDA kernel: kernels/itc.cu.

use super::saved::Saved;
use super::{cpu, Positives};
use candle_core::{bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};

/// The fused path of [`super::itc_loss`] (shapes already checked); `work` is the dtype the op reads.
pub(super) fn itc_loss_fused(
    sim: &Tensor, sim_m: &Tensor, temp: &Tensor, alpha: f64, positives: Positives, work: DType,
) -> Result<Tensor> {
    let (pos, cols) = match positives {
        Positives::Diagonal => (None, None),
        Positives::Mask(m) => (Some(m.to_dtype(work)?.contiguous()?.detach()), None),
        Positives::Index(i) => (None, Some(i.contiguous()?.detach())),
    };
    let op = Itc { alpha: alpha as f32, pos, cols, saved: Saved::new("itc_loss") };
    let sim = sim.to_dtype(work)?.contiguous()?;
    let sim_m = sim_m.to_dtype(work)?.contiguous()?.detach();
    let rows = sim.apply_op3(&sim_m, &temp.to_dtype(work)?, op)?;
    rows.mean(0)
}

struct Itc {
    alpha: f32,
    /// [B, N] 0/1 positives in the working dtype, contiguous; None: one positive column per row.
    pos: Option<Tensor>,
    /// Without `pos`: row i's positive column (u32 [B], contiguous); None: the diagonal (column i).
    cols: Option<Tensor>,
    /// From the forward: d loss_i / d sim [B, N] (working dtype) and d loss_i / d temp [B] (f32).
    saved: Saved<(Tensor, Tensor)>,
}

/// Per-row constants of pass 3 (see [`itc_span`]); reciprocals so that the pass divides only for `s`.
struct RowConsts {
    temp: f32,
    inv_temp: f32,
    alpha: f32,
    /// Max of s and log of sum exp(s - max).
    max_s: f32,
    log_sum_s: f32,
    inv_sum_s: f32,
    inv_sum_q: f32,
    inv_pos_sum: f32,
}

/// Scratch rows reused by one thread: the momentum softmax and a row of zeros (the off-diagonal positives).
struct Scratch {
    q: Vec<f32>,
    zeros: Vec<f32>,
}

/// One row of the op's inputs; `pos`: its positives mask, or None for the single column `positive`.
struct Row<'a> {
    positive: usize,
    sim: &'a [f32],
    sim_m: &'a [f32],
    pos: Option<&'a [f32]>,
}

cpu::multiversion! {
    /// One row on CPU: returns (loss_i, d loss_i / d temp) and leaves d loss_i / d sim in `out`.
    fn itc_row(row: Row<'_>, temp: f32, alpha: f32, out: &mut [f32], scratch: &mut Scratch) -> (f32, f32) {
        let Row { positive, sim, sim_m, pos } = row;
        let n = sim.len();
        let Scratch { q, zeros } = scratch;
        q.resize(n, 0.0);
        zeros.resize(n, 0.0);
        // Passes 1-2: exp(s - max) into `out`, exp(sim_m / temp - max) into `q`, with their sums.
        out.iter_mut().zip(sim).for_each(|(o, &x)| *o = x / temp);
        let max_s = cpu::max(out);
        let sum_s = cpu::exp_shift_sum(out, max_s);
        let sum_q = if alpha > 0.0 {
            q.iter_mut().zip(sim_m).for_each(|(o, &x)| *o = x / temp);
            let max_q = cpu::max(q);
            cpu::exp_shift_sum(q, max_q)
        } else {
            // Targets are the positives alone; sim_m is not read (as in the reference).
            q.fill(0.0);
            1.0
        };
        let pos_sum = pos.map_or(1.0, cpu::sum);
        let c = RowConsts {
            temp,
            inv_temp: 1.0 / temp,
            alpha,
            max_s,
            log_sum_s: sum_s.ln(),
            inv_sum_s: 1.0 / sum_s,
            inv_sum_q: 1.0 / sum_q,
            inv_pos_sum: 1.0 / pos_sum,
        };
        // Pass 3: targets, loss and derivatives.
        match pos {
            Some(p) => itc_span(&c, sim, q, p, out),
            None => {
                let (i, j) = (positive, positive + 1);
                let lo = itc_span(&c, &sim[..i], &q[..i], &zeros[..i], &mut out[..i]);
                let diag = itc_span(&c, &sim[i..j], &q[i..j], &[1.0], &mut out[i..j]);
                let hi = itc_span(&c, &sim[j..], &q[j..], &zeros[j..n], &mut out[j..]);
                (lo.0 + diag.0 + hi.0, lo.1 + diag.1 + hi.1)
            }
        }
    }
}

/// Pass 3 over a span of a row: `e` holds exp(s - max_s) on entry and d loss / d sim on return; returns the
/// span's (loss, d loss / d temp). Independent accumulators per lane so that the loop vectorises; f64 ones,
/// as f32 sums of 65536 same-signed loss terms drift by ~1e-5.
#[inline(always)]
fn itc_span(c: &RowConsts, sim: &[f32], q: &[f32], pos: &[f32], e: &mut [f32]) -> (f32, f32) {
    const LANES: usize = cpu::LANES;
    let elem = |x: f32, ej: f32, qj: f32, pj: f32| {
        // s exactly as the reference divides it: with temp = 0.001 an ulp of s moves p by 6e-5.
        let s = x / c.temp;
        let logp = (s - c.max_s) - c.log_sum_s;
        let t = c.alpha * (qj * c.inv_sum_q) + (1.0 - c.alpha) * (pj * c.inv_pos_sum);
        let g = (ej * c.inv_sum_s - t) * c.inv_temp;
        (g, -t * logp, -g * s)
    };
    let (mut loss, mut dtemp) = ([0f64; LANES], [0f64; LANES]);
    let mut ec = e.chunks_exact_mut(LANES);
    let (sc, qc, pc) = (sim.chunks_exact(LANES), q.chunks_exact(LANES), pos.chunks_exact(LANES));
    let (s_rest, q_rest, p_rest) = (sc.remainder(), qc.remainder(), pc.remainder());
    for (((e8, s8), q8), p8) in (&mut ec).zip(sc).zip(qc).zip(pc) {
        for k in 0..LANES {
            let (g, l, d) = elem(s8[k], e8[k], q8[k], p8[k]);
            e8[k] = g;
            loss[k] += l as f64;
            dtemp[k] += d as f64;
        }
    }
    let (mut loss, mut dtemp) = (loss.iter().sum::<f64>(), dtemp.iter().sum::<f64>());
    for (((ej, &x), &qj), &pj) in ec.into_remainder().iter_mut().zip(s_rest).zip(q_rest).zip(p_rest) {
        let (g, l, d) = elem(x, *ej, qj, pj);
        *ej = g;
        loss += l as f64;
        dtemp += d as f64;
    }
    (loss as f32, dtemp as f32)
}

impl CustomOp3 for Itc {
    fn name(&self) -> &'static str {
        "alignfuse-itc"
    }

    fn cpu_fwd(
        &self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, n) = l1.shape().dims2()?;
        let sim = cpu::f32_slice(s1, l1, "itc_loss sim")?;
        let sim_m = cpu::f32_slice(s2, l2, "itc_loss sim_m")?;
        let temp = match (s3, l3.shape().elem_count()) {
            (CpuStorage::F32(v), 1) => v[l3.start_offset()],
            _ => bail!("itc_loss: temp must be one f32 element"),
        };
        let pos_guard = self.pos.as_ref().map(|p| p.storage_and_layout());
        let pos = match &pos_guard {
            Some((storage, layout)) => match &**storage {
                Storage::Cpu(s) => Some(cpu::f32_slice(s, layout, "itc_loss positives")?),
                _ => bail!("itc_loss: positives mask is not on the CPU"),
            },
            None => None,
        };
        let cols_guard = self.cols.as_ref().map(|c| c.storage_and_layout());
        let cols = match &cols_guard {
            Some((storage, layout)) => match (&**storage, layout.contiguous_offsets()) {
                (Storage::Cpu(CpuStorage::U32(c)), Some((start, end))) => Some(&c[start..end]),
                _ => bail!("itc_loss: positive indices must be contiguous u32 on the CPU"),
            },
            None => None,
        };
        if let Some(&bad) = cols.and_then(|c| c.iter().find(|&&c| c as usize >= n)) {
            bail!("itc_loss: positive index {bad} is out of range for {n} columns");
        }
        let alpha = self.alpha;
        // SAFETY: map_rows writes every row (itc_row writes all of `out`).
        let mut dsim = unsafe { cpu::output(b * n) };
        let rows = cpu::map_rows(
            &mut dsim,
            n,
            || Scratch { q: Vec::new(), zeros: Vec::new() },
            |scratch, r, out| {
                let span = r * n..(r + 1) * n;
                let (sim, sim_m, pos) = (&sim[span.clone()], &sim_m[span.clone()], pos.map(|p| &p[span]));
                let positive = cols.map_or(r, |c| c[r] as usize);
                itc_row(Row { positive, sim, sim_m, pos }, temp, alpha, out, scratch)
            },
        );
        let (loss, dtemp): (Vec<f32>, Vec<f32>) = rows.into_iter().unzip();
        self.saved.keep((Tensor::from_vec(dsim, (b, n), &Device::Cpu)?, Tensor::from_vec(dtemp, b, &Device::Cpu)?))?;
        Ok((CpuStorage::F32(loss), Shape::from(b)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self, s1: &candle_core::CudaStorage, l1: &Layout, s2: &candle_core::CudaStorage, l2: &Layout,
        s3: &candle_core::CudaStorage, l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (pos_guard, cols_guard) =
            (self.pos.as_ref().map(|p| p.storage_and_layout()), self.cols.as_ref().map(|c| c.storage_and_layout()));
        let pos = gpu::on_gpu(&pos_guard, "positives mask")?;
        let cols = gpu::on_gpu(&cols_guard, "positive indices")?;
        let out = gpu::forward(self.alpha, (s1, l1), (s2, l2), (s3, l3), pos, cols)?;
        self.saved.keep((out.dsim, out.dtemp))?;
        Ok((out.loss, Shape::from(l1.dims()[0])))
    }

    fn bwd(
        &self, _sim: &Tensor, _sim_m: &Tensor, temp: &Tensor, _loss: &Tensor, grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dsim, dtemp) = self.saved.get()?;
        let grad = grad.to_dtype(DType::F32)?;
        let dsim = dsim.broadcast_mul(&grad.to_dtype(dsim.dtype())?.unsqueeze(1)?)?;
        let dtemp = (dtemp * grad)?.sum_all()?.to_dtype(temp.dtype())?.reshape(temp.shape())?;
        Ok((Some(dsim), None, Some(dtemp)))
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use crate::ops::cuda::{contiguous, int, unsupported, ITC};
    use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};
    use candle_core::op::BackpropOp;
    use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Storage, Tensor, WithDType};

    pub(super) struct Outputs {
        pub loss: CudaStorage,
        pub dsim: Tensor,
        pub dtemp: Tensor,
    }

    type Arg<'a> = (&'a CudaStorage, &'a Layout);

    /// The CUDA storage behind an optional tensor's storage guard; `what` names it in the error.
    pub(super) fn on_gpu<'a, G: std::ops::Deref<Target = Storage>>(
        guard: &'a Option<(G, &'a Layout)>, what: &str,
    ) -> Result<Option<Arg<'a>>> {
        match guard {
            Some((storage, layout)) => match &**storage {
                Storage::Cuda(s) => Ok(Some((s, *layout))),
                _ => bail!("itc_loss: {what} is not on the GPU"),
            },
            None => Ok(None),
        }
    }

    pub(super) fn forward(
        alpha: f32, sim: Arg, sim_m: Arg, temp: Arg, pos: Option<Arg>, cols: Option<Arg>,
    ) -> Result<Outputs> {
        let dev = &sim.0.device;
        let cols = match cols {
            Some((c, l)) => Some(contiguous(c.as_cuda_slice::<u32>()?, l, "itc_loss positive indices")?),
            None => None,
        };
        let cols = cols.as_ref();
        let (b, n) = sim.1.shape().dims2()?;
        let (ls, lm, lt) = (sim.1, sim_m.1, temp.1);
        let (dsim, loss, dtemp) = match (&sim.0.slice, &sim_m.0.slice, &temp.0.slice, pos.map(|(p, l)| (&p.slice, l))) {
            (S::F32(s), S::F32(m), S::F32(t), None) => {
                fwd(dev, alpha, [(s, ls), (m, lm), (t, lt)], None, cols, S::F32)?
            }
            (S::F32(s), S::F32(m), S::F32(t), Some((S::F32(p), lp))) => {
                fwd(dev, alpha, [(s, ls), (m, lm), (t, lt)], Some((p, lp)), cols, S::F32)?
            }
            (S::BF16(s), S::BF16(m), S::BF16(t), None) => {
                fwd(dev, alpha, [(s, ls), (m, lm), (t, lt)], None, cols, S::BF16)?
            }
            (S::BF16(s), S::BF16(m), S::BF16(t), Some((S::BF16(p), lp))) => {
                fwd(dev, alpha, [(s, ls), (m, lm), (t, lt)], Some((p, lp)), cols, S::BF16)?
            }
            (other, ..) => return Err(unsupported(other, "itc_loss")),
        };
        let tensor = |slice: S, shape: &[usize]| {
            let storage = Storage::Cuda(CudaStorage { slice, device: dev.clone() });
            Tensor::from_storage(storage, shape, BackpropOp::none(), false)
        };
        Ok(Outputs {
            loss: CudaStorage { slice: S::F32(loss), device: dev.clone() },
            dsim: tensor(dsim, &[b, n]),
            dtemp: tensor(S::F32(dtemp), &[b]),
        })
    }

    type In<'a, T> = (&'a CudaSlice<T>, &'a Layout);

    /// Launches itc_fwd (one block per row) on `[sim, sim_m, temp]` and the positives. Returns
    /// (d loss_i / d sim wrapped by `wrap`, loss_i, d loss_i / d temp).
    fn fwd<T: DeviceRepr + WithDType>(
        dev: &CudaDevice, alpha: f32, [sim, sim_m, temp]: [In<T>; 3], pos: Option<In<T>>, cols: Option<&CudaView<u32>>,
        wrap: fn(CudaSlice<T>) -> S,
    ) -> Result<(S, CudaSlice<f32>, CudaSlice<f32>)> {
        let (b, n) = sim.1.shape().dims2()?;
        let s = contiguous(sim.0, sim.1, "itc_loss sim")?;
        let m = contiguous(sim_m.0, sim_m.1, "itc_loss sim_m")?;
        if temp.1.shape().elem_count() != 1 {
            bail!("itc_loss: temp must have one element");
        }
        let t = temp.0.slice(temp.1.start_offset()..temp.1.start_offset() + 1);
        let p = pos.map(|(p, l)| contiguous(p, l, "itc_loss positives")).transpose()?;
        // SAFETY: the kernel writes every element of all three.
        let (dsim, loss, dtemp) = unsafe { (dev.alloc::<T>(b * n)?, dev.alloc::<f32>(b)?, dev.alloc::<f32>(b)?) };
        if b == 0 {
            return Ok((wrap(dsim), loss, dtemp));
        }
        let (func, stream) = ITC.func::<T>(dev, "itc_fwd")?;
        let mut builder = stream.launch_builder(&func);
        builder.arg(&s);
        builder.arg(&m);
        builder.arg(&t);
        match &p {
            Some(p) => builder.arg(p),
            None => builder.arg(&0usize),
        };
        match cols {
            Some(c) => builder.arg(c),
            None => builder.arg(&0usize),
        };
        builder.arg(&dsim);
        builder.arg(&loss);
        builder.arg(&dtemp);
        candle_core::builder_arg!(builder, int(n, "itc_loss columns")?, alpha);
        // Up to 1024 threads (a multiple of 32) per row; rows run on different SMs.
        let threads = n.next_multiple_of(32).min(1024) as u32;
        let grid = int(b, "itc_loss rows")? as u32;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: argument types and order match itc_fwd in kernels/itc.cu.
        unsafe { builder.launch(cfg) }.w()?;
        Ok((wrap(dsim), loss, dtemp))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_abs, max_err, rng, uniform};
    use super::super::{itc_loss, Kernels, Positives};
    use candle_core::{DType, Device, Result, Tensor, Var};
    use rand::Rng;

    /// Loss and gradients w.r.t. sim and temp; also whether sim_m got a gradient.
    fn run(
        sim: &Tensor, sim_m: &Tensor, temp: f32, alpha: f64, pos: Option<&Tensor>, k: Kernels,
    ) -> Result<(Tensor, Tensor, Tensor, bool)> {
        let (sim, sim_m) = (Var::from_tensor(sim)?, Var::from_tensor(sim_m)?);
        let temp = Var::from_tensor(&Tensor::new(&[temp], &Device::Cpu)?.to_dtype(sim.dtype())?)?;
        let positives = pos.map_or(Positives::Diagonal, Positives::Mask);
        let loss = itc_loss(sim.as_tensor(), sim_m.as_tensor(), temp.as_tensor(), alpha, positives, k)?;
        let grads = loss.backward()?;
        let get = |t: &Tensor| grads.get(t).cloned().ok_or_else(|| candle_core::Error::Msg("no gradient".into()));
        Ok((loss, get(sim.as_tensor())?, get(temp.as_tensor())?, grads.get(sim_m.as_tensor()).is_some()))
    }

    fn mask(r: &mut rand_chacha::ChaCha8Rng, b: usize, n: usize) -> Result<Tensor> {
        let v: Vec<f32> = (0..b * n).map(|k| if k / n == k % n || r.random_bool(0.1) { 1.0 } else { 0.0 }).collect();
        Tensor::from_vec(v, (b, n), &Device::Cpu)
    }

    /// Errors of (loss, d sim, d temp) against `want`, each relative to the size of what it is computed
    /// from: |loss|; for d sim_ij = (p_ij - t_ij) / (B temp), 1 / (B temp); for d temp = -sum_ij d sim_ij *
    /// sim_ij / temp, 2 max |sim| / temp^2. p and t nearly cancel (alpha = 1 and sim_m close to sim), so
    /// the results can be far smaller than the rounding of the terms in any f32 evaluation.
    fn check(
        label: &str, sim: &Tensor, temp: f32, got: &(Tensor, Tensor, Tensor, bool),
        want: &(Tensor, Tensor, Tensor, bool), tol: f64,
    ) -> Result<()> {
        let (b, temp) = (sim.dim(0)? as f64, temp as f64);
        let loss = max_err(&got.0, &want.0)?.1;
        let dsim = max_err(&got.1, &want.1)?.0 * b * temp;
        let dtemp = max_err(&got.2, &want.2)?.0 * temp * temp / (2.0 * max_abs(sim)?);
        assert!(loss <= tol && dsim <= tol && dtemp <= tol, "{label}: loss {loss:e} dsim {dsim:e} dtemp {dtemp:e}");
        assert!(!got.3 && !want.3, "{label}: sim_m got a gradient");
        Ok(())
    }

    #[test]
    fn matches_reference_loss_and_gradients() -> Result<()> {
        let mut r = rng(11);
        // (B, N): the batch alone, odd lengths, and queues behind the batch (the last one is split over the
        // thread pool).
        for (b, n) in [(1, 1), (1, 7), (3, 7), (4, 4), (5, 69), (8, 577), (16, 16 + 1031), (4, 4 + 16384)] {
            // Cosines in [-1, 1]; sim_m near sim, as the momentum model is.
            let sim = uniform(&mut r, &[b, n], 1.0, &Device::Cpu)?;
            let sim_m = (&sim + uniform(&mut r, &[b, n], 0.1, &Device::Cpu)?)?;
            let m = mask(&mut r, b, n)?;
            let f64s = |t: &Tensor| t.to_dtype(DType::F64);
            let (sim64, sim_m64, m64) = (f64s(&sim)?, f64s(&sim_m)?, f64s(&m)?);
            // temp 0.001 is the clamp's floor: logits up to 1000.
            for (temp, alpha) in [(0.07, 0.4), (0.5, 0.0), (0.001, 0.4), (0.07, 1.0)] {
                for masked in [false, true] {
                    let label = format!("B={b} N={n} temp={temp} alpha={alpha} mask={masked}");
                    let got = run(&sim, &sim_m, temp, alpha, masked.then_some(&m), Kernels::Fused)?;
                    // The yardstick is the reference composition evaluated in f64 on the same inputs: over
                    // thousands of columns the f32 reference's own sums drift by more than 1e-6. At temp 0.001
                    // the f32 rounding of the logits (~1000, shared by both f32 paths) moves p by ~1e-5, so
                    // there the f32 reference, which rounds them the same way, is the yardstick.
                    let want = if temp < 0.01 {
                        run(&sim, &sim_m, temp, alpha, masked.then_some(&m), Kernels::Reference)?
                    } else {
                        run(&sim64, &sim_m64, temp, alpha, masked.then_some(&m64), Kernels::Reference)?
                    };
                    check(&label, &sim, temp, &got, &want, 1e-6)?;
                }
            }
        }
        Ok(())
    }

    #[test]
    fn upstream_gradient_scales_and_low_precision_inputs() -> Result<()> {
        let mut r = rng(12);
        let sim = uniform(&mut r, &[4, 37], 1.0, &Device::Cpu)?;
        let sim_m = uniform(&mut r, &[4, 37], 1.0, &Device::Cpu)?;
        let grads = |k: Kernels| -> Result<Vec<f32>> {
            let (s, t) = (Var::from_tensor(&sim)?, Var::new(&[0.07f32], &Device::Cpu)?);
            let loss = itc_loss(s.as_tensor(), &sim_m, t.as_tensor(), 0.4, Positives::Diagonal, k)?;
            let g = (loss * 3.0)?.backward()?;
            let mut v = g.get(s.as_tensor()).map_or(Ok(vec![]), |t| t.flatten_all()?.to_vec1::<f32>())?;
            v.extend(g.get(t.as_tensor()).map_or(Ok(vec![]), |t| t.to_vec1::<f32>())?);
            Ok(v)
        };
        let (a, b) = (grads(Kernels::Fused)?, grads(Kernels::Reference)?);
        assert_eq!(a.len(), b.len());
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() <= 1e-5 * (1.0 + y.abs())), "{a:?} vs {b:?}");

        for dtype in [DType::BF16, DType::F16] {
            let (sl, ml) = (sim.to_dtype(dtype)?, sim_m.to_dtype(dtype)?);
            let got = run(&sl, &ml, 0.07, 0.4, None, Kernels::Fused)?;
            assert_eq!((got.0.dtype(), got.1.dtype(), got.2.dtype()), (DType::F32, dtype, dtype));
            let want = run(&sl.to_dtype(DType::F32)?, &ml.to_dtype(DType::F32)?, 0.07, 0.4, None, Kernels::Reference)?;
            // Only temp's rounding to the storage dtype and the final rounding of the gradients differ.
            check(&format!("{dtype:?}"), &sim, 0.07, &got, &want, 2e-2)?;
        }
        Ok(())
    }

    #[test]
    fn index_positives_match_their_one_hot_mask() -> Result<()> {
        let mut r = rng(14);
        let (b, n) = (6, 4099);
        let sim = uniform(&mut r, &[b, n], 4.0, &Device::Cpu)?;
        let sim_m = (&sim + uniform(&mut r, &[b, n], 0.5, &Device::Cpu)?)?;
        let cols: Vec<u32> = (0..b).map(|_| r.random_range(0..n as u32)).collect();
        let one_hot: Vec<f32> = (0..b * n).map(|k| if cols[k / n] as usize == k % n { 1.0 } else { 0.0 }).collect();
        let one_hot = Tensor::from_vec(one_hot, (b, n), &Device::Cpu)?;
        let index = Tensor::new(cols.as_slice(), &Device::Cpu)?;
        let want = run(&sim, &sim_m, 1.0, 0.4, Some(&one_hot), Kernels::Reference)?;
        for k in [Kernels::Fused, Kernels::Reference] {
            let (s, t) = (Var::from_tensor(&sim)?, Var::new(&[1f32], &Device::Cpu)?);
            let loss = itc_loss(s.as_tensor(), &sim_m, t.as_tensor(), 0.4, Positives::Index(&index), k)?;
            let grads = loss.backward()?;
            let get = |v: &Var| grads.get(v.as_tensor()).cloned().expect("gradient");
            check(&format!("{k:?}"), &sim, 1.0, &(loss.clone(), get(&s), get(&t), false), &want, 1e-6)?;
        }
        let out_of_range = Tensor::new(&[0u32, 1, 2, 3, 4, n as u32], &Device::Cpu)?;
        let temp = Tensor::new(&[1f32], &Device::Cpu)?;
        assert!(itc_loss(&sim, &sim_m, &temp, 0.4, Positives::Index(&out_of_range), Kernels::Fused).is_err());
        assert!(itc_loss(&sim, &sim_m, &temp, 0.4, Positives::Index(&index.narrow(0, 0, 5)?), Kernels::Fused).is_err());
        Ok(())
    }

    #[test]
    fn rows_without_positives_and_bad_shapes() -> Result<()> {
        let mut r = rng(13);
        let sim = uniform(&mut r, &[3, 5], 1.0, &Device::Cpu)?;
        let mut m = vec![1f32; 15];
        m[5..10].fill(0.0);
        let m = Tensor::from_vec(m, (3, 5), &Device::Cpu)?;
        for k in [Kernels::Reference, Kernels::Fused] {
            let (loss, ..) = run(&sim, &sim, 0.07, 0.4, Some(&m), k)?;
            assert!(loss.to_scalar::<f32>()?.is_nan(), "{k:?}");
        }
        let temp = Tensor::new(&[0.07f32], &Device::Cpu)?;
        let wide = Tensor::zeros((6, 5), DType::F32, &Device::Cpu)?;
        let short = Tensor::zeros((3, 4), DType::F32, &Device::Cpu)?;
        for k in [Kernels::Reference, Kernels::Fused] {
            assert!(itc_loss(&wide, &wide, &temp, 0.4, Positives::Diagonal, k).is_err());
            assert!(itc_loss(&sim, &short, &temp, 0.4, Positives::Diagonal, k).is_err());
            assert!(itc_loss(&sim, &sim, &temp, 0.4, Positives::Mask(&short), k).is_err());
            assert!(itc_loss(&sim, &sim, &sim, 0.4, Positives::Diagonal, k).is_err());
            assert!(itc_loss(&sim.flatten_all()?, &sim, &temp, 0.4, Positives::Diagonal, k).is_err());
        }
        Ok(())
    }
}
