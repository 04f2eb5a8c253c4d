//! `bench_ops`: times `Kernels::Fused` against `Kernels::Reference` (forward + backward, same inputs, same
//! run) for the shapes ALBEF trains with, checks every fused output against the reference one, and
//! measures the device's copy bandwidth to put the times in scale. Backs `alignfuse bench kernels`.

use super::testing::{max_err, rng, uniform};
use super::{
    adamw_step_all, add_bias, add_layer_norm, attention_softmax, dropout, ema_all, gelu, itc_loss, layer_norm, linear,
    linear_gelu, matmul_by_constant, mlp, multi_head_attention, sum_squares, AdamWStep, AdamWUpdate, AttnDropout,
    Positives,
};
use crate::config::Kernels;
use candle_core::{DType, Device, Result, Tensor, Var};
use rand::Rng;
use std::fmt;
use std::time::{Duration, Instant};

/// One op and shape: median wall times over the repetitions, and the error of each output.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpBench {
    /// Op, shape and variant, e.g. `attention_softmax [64, 12, 25, 25] +mask`.
    pub name: String,
    #[serde(serialize_with = "dtype_name")]
    pub dtype: DType,
    /// Forward alone (what evaluation runs).
    pub fused_fwd_ms: f64,
    pub reference_fwd_ms: f64,
    /// Forward + backward, including the upstream `sum(y * w)` and candle's gradient bookkeeping, which
    /// both paths share.
    pub fused_ms: f64,
    pub reference_ms: f64,
    pub errors: Vec<OutputError>,
}

/// Errors of one output (`y`, `d scores`, `loss`, `d sim`, `d temp`), each max |a - b| / max(1, max |b|).
/// `exact` is the reference composition run in f64 on the same inputs: where fused and reference differ,
/// it says which of the two is off (f32 sums over 65536 columns, or anything in bf16, drift).
/// NaN: one side has a NaN where the other does not.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OutputError {
    pub output: &'static str,
    pub fused_vs_reference: f64,
    pub fused_vs_exact: f64,
    pub reference_vs_exact: f64,
}

impl OpBench {
    /// Reference time over fused time, forward + backward.
    pub fn speedup(&self) -> f64 {
        self.reference_ms / self.fused_ms
    }

    /// Largest error over the outputs of the chosen kind (NaN if any is NaN).
    pub fn worst(&self, kind: impl Fn(&OutputError) -> f64) -> f64 {
        self.errors.iter().map(kind).fold(0.0, |m, e| if e.is_nan() || m.is_nan() { f64::NAN } else { m.max(e) })
    }
}

/// Device-to-device copy of one buffer; bandwidth counts the bytes read plus the bytes written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyBench {
    pub bytes: usize,
    pub ms: f64,
    pub gbps: f64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub device: String,
    pub reps: usize,
    pub ops: Vec<OpBench>,
    pub copy: CopyBench,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "kernels on {} (median of {} runs, ms; fwd = forward, f+b = forward + backward; errors: worst \
            output, max |a - b| / max(1, max |b|), exact = reference in f64)",
            self.device, self.reps
        )?;
        writeln!(
            f,
            "{:<40} {:>5} {:>9} {:>9} {:>9} {:>9} {:>7} {:>10} {:>11} {:>10}",
            "op",
            "dtype",
            "fused fwd",
            "ref fwd",
            "fused f+b",
            "ref f+b",
            "speedup",
            "fused-ref",
            "fused-exact",
            "ref-exact"
        )?;
        for op in &self.ops {
            writeln!(
                f,
                "{:<40} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>6.1}x {:>10.1e} {:>11.1e} {:>10.1e}",
                op.name,
                op.dtype.as_str(),
                op.fused_fwd_ms,
                op.reference_fwd_ms,
                op.fused_ms,
                op.reference_ms,
                op.speedup(),
                op.worst(|e| e.fused_vs_reference),
                op.worst(|e| e.fused_vs_exact),
                op.worst(|e| e.reference_vs_exact)
            )?;
        }
        let c = &self.copy;
        writeln!(f, "copy {} MiB: {:.3} ms, {:.1} GB/s (read + write)", c.bytes >> 20, c.ms, c.gbps)
    }
}

enum Case {
    Attention {
        dims: [usize; 4],
        mask: bool,
        scale: f64,
        dtype: DType,
    },
    /// The whole multi-head attention on tokens, q [B, Lq, H * Dh], k and v [B, Lk, H * Dh] (`dims` = [B, H,
    /// Lq, Lk]): the head split, the core and the merge.
    Core {
        dims: [usize; 4],
        dh: usize,
        mask: bool,
        dropout: f64,
        dtype: DType,
    },
    Itc {
        b: usize,
        n: usize,
        multi_positive: bool,
        dtype: DType,
    },
    /// MLM's loss over the vocabulary at `n` masked positions: ITC's op with temperature 1 and the target ids.
    Mlm {
        n: usize,
        vocab: usize,
    },
    /// A row-wise op; in bf16 (linear layers only), x and the weight in bf16 and the bias in f32, as
    /// `precision = "bf16"` runs them.
    Rows {
        op: RowOp,
        rows: usize,
        d: usize,
        dtype: DType,
    },
    /// ITC's similarities: b features [b, k] against n keys and queued features [k, n], a constant.
    ByConstant {
        b: usize,
        k: usize,
        n: usize,
    },
    /// The optimiser's per-parameter work (gradient norm, AdamW, EMA) over `blocks` ViT-B blocks' tensors.
    Optimizer {
        blocks: usize,
    },
}

/// The row-wise ops, benchmarked on [rows, d].
#[derive(Clone, Copy, PartialEq)]
enum RowOp {
    LayerNorm,
    /// LayerNorm of a residual sum (BERT's sublayer output), as one op.
    AddLayerNorm,
    Bias,
    Gelu,
    /// BERT's hidden dropout at 0.1.
    Dropout,
    /// A square [d, d] linear layer with bias.
    Linear,
    /// The same layer with the GELU after it, as one op.
    LinearGelu,
    /// The feed-forward sublayer, two such layers with GELU between them, as one op (CPU).
    Mlp,
}

/// ALBEF-B at batch 64: text self-attention over 25 tokens with padding, fusion cross-attention to 257
/// image tokens (256 px), ViT self-attention over 577 tokens (384 px; 8 images to bound the CPU run), and
/// ITC against the batch plus a 65536 queue; LayerNorm, a bias add and the MLP's GELU over the ViT's 64 x 257
/// tokens (and BERT's hidden dropout over as many), one of its 768 x 768 linear layers (alone and with the
/// GELU after it); MLM's loss at 15% of 64 x 25 tokens over BERT's vocabulary; the whole multi-head attention (heads split and merged) for the
/// same three attentions (BERT's with its 0.1 dropout; the ViT's at 256 px, 16 images); ITC's similarities of
/// 64 features against the batch's keys and the queue; the optimiser's gradient norm, AdamW and EMA over two
/// ViT-B blocks' 24 tensors. bf16 rows (CUDA's in-place bf16 paths; the CPU goes through f32): attention's
/// softmax, ITC, the ViT's multi-head attention and the linear layers as `precision = "bf16"` runs them.
fn cases() -> Vec<Case> {
    let (q, b) = (65536, 64);
    vec![
        Case::Attention { dims: [64, 12, 25, 25], mask: true, scale: 0.125, dtype: DType::F32 },
        Case::Attention { dims: [64, 12, 25, 257], mask: false, scale: 0.125, dtype: DType::F32 },
        Case::Attention { dims: [8, 12, 577, 577], mask: false, scale: 0.125, dtype: DType::F32 },
        Case::Itc { b, n: b + q, multi_positive: false, dtype: DType::F32 },
        Case::Itc { b, n: b + q, multi_positive: true, dtype: DType::F32 },
        Case::Mlm { n: 240, vocab: 30522 },
        Case::Core { dims: [64, 12, 25, 25], dh: 64, mask: true, dropout: 0.1, dtype: DType::F32 },
        Case::Core { dims: [64, 12, 25, 257], dh: 64, mask: false, dropout: 0.1, dtype: DType::F32 },
        Case::Core { dims: [16, 12, 257, 257], dh: 64, mask: false, dropout: 0.0, dtype: DType::F32 },
        Case::Core { dims: [16, 12, 257, 257], dh: 64, mask: false, dropout: 0.0, dtype: DType::BF16 },
        Case::Attention { dims: [64, 12, 25, 25], mask: true, scale: 0.125, dtype: DType::BF16 },
        Case::Itc { b, n: b + q, multi_positive: false, dtype: DType::BF16 },
        Case::Rows { op: RowOp::LayerNorm, rows: 64 * 257, d: 768, dtype: DType::F32 },
        Case::Rows { op: RowOp::AddLayerNorm, rows: 64 * 257, d: 768, dtype: DType::F32 },
        Case::Rows { op: RowOp::Bias, rows: 64 * 257, d: 768, dtype: DType::F32 },
        Case::Rows { op: RowOp::Gelu, rows: 64 * 257, d: 3072, dtype: DType::F32 },
        Case::Rows { op: RowOp::Dropout, rows: 64 * 257, d: 768, dtype: DType::F32 },
        Case::Rows { op: RowOp::Linear, rows: 64 * 257, d: 768, dtype: DType::F32 },
        Case::Rows { op: RowOp::LinearGelu, rows: 64 * 257, d: 768, dtype: DType::F32 },
        Case::Rows { op: RowOp::Mlp, rows: 64 * 257, d: 768, dtype: DType::F32 },
        Case::Rows { op: RowOp::Linear, rows: 64 * 257, d: 768, dtype: DType::BF16 },
        Case::Rows { op: RowOp::LinearGelu, rows: 64 * 257, d: 768, dtype: DType::BF16 },
        Case::ByConstant { b, k: 256, n: b + q },
        Case::Optimizer { blocks: 2 },
    ]
}

/// The same inputs in the case's dtype and in f64 (for the exact answer).
struct Inputs<T> {
    native: T,
    exact: T,
}

impl Inputs<Tensor> {
    fn new(t: Tensor, dtype: DType) -> Result<Self> {
        Ok(Inputs { native: t.to_dtype(dtype)?, exact: t.to_dtype(DType::F64)? })
    }
}

impl Inputs<Var> {
    fn new(t: Tensor, dtype: DType) -> Result<Self> {
        let native = Var::from_tensor(&t.to_dtype(dtype)?)?;
        Ok(Inputs { native, exact: Var::from_tensor(&t.to_dtype(DType::F64)?)? })
    }
}

impl<T> Inputs<T> {
    fn get(&self, exact: bool) -> &T {
        if exact {
            &self.exact
        } else {
            &self.native
        }
    }
}

/// Runs every case on `device` (`reps` timed runs each, after one warm-up) and the copy bandwidth test.
pub fn bench_ops(device: &Device, reps: usize) -> Result<BenchReport> {
    let reps = reps.max(1);
    let mut r = rng(2024);
    let mut ops = Vec::new();
    for case in cases() {
        ops.push(match case {
            Case::Attention { dims, mask, scale, dtype } => {
                let x = Inputs::<Var>::new(uniform(&mut r, &dims, 4.0, device)?, dtype)?;
                let w = Inputs::<Tensor>::new(uniform(&mut r, &dims, 1.0, device)?, DType::F32)?;
                let m = mask.then(|| Inputs::<Tensor>::new(padding_mask(&mut r, dims[0], dims[3], device)?, dtype));
                let m = m.transpose()?;
                let run = |k: Kernels, exact: bool, backward: bool| -> Result<Vec<Tensor>> {
                    let x = x.get(exact).as_tensor();
                    let y = attention_softmax(x, scale, m.as_ref().map(|m| m.get(exact)), k)?;
                    if !backward {
                        return Ok(vec![y]);
                    }
                    let w = w.get(exact);
                    let grads = (y.to_dtype(w.dtype())? * w)?.sum_all()?.backward()?;
                    Ok(vec![y, grad(&grads, x)?])
                };
                let name = format!("attention_softmax {:?}{}", dims, if mask { " +mask" } else { "" });
                compare(device, reps, name, dtype, &["y", "d scores"], run)?
            }
            Case::Core { dims, dh, mask, dropout, dtype } => {
                bench_core(device, reps, &mut r, (dims, dh), mask, dropout, dtype)?
            }
            Case::Itc { b, n, multi_positive, dtype } => {
                let sim_f32 = uniform(&mut r, &[b, n], 1.0, device)?;
                let sim_m = Inputs::<Tensor>::new((&sim_f32 + uniform(&mut r, &[b, n], 0.05, device)?)?, dtype)?;
                let sim = Inputs::<Var>::new(sim_f32, dtype)?;
                let temp = Inputs::<Var>::new(Tensor::new(&[0.07f32], device)?, dtype)?;
                let pos = if multi_positive {
                    let v: Vec<f32> =
                        (0..b * n).map(|k| if k / n == k % n || r.random_bool(1e-4) { 1.0 } else { 0.0 }).collect();
                    Some(Inputs::<Tensor>::new(Tensor::from_vec(v, (b, n), device)?, dtype)?)
                } else {
                    None
                };
                let run = |k: Kernels, exact: bool, backward: bool| -> Result<Vec<Tensor>> {
                    let positives = pos.as_ref().map_or(Positives::Diagonal, |p| Positives::Mask(p.get(exact)));
                    let (s, t) = (sim.get(exact).as_tensor(), temp.get(exact).as_tensor());
                    let loss = itc_loss(s, sim_m.get(exact), t, 0.4, positives, k)?;
                    if !backward {
                        return Ok(vec![loss]);
                    }
                    let grads = loss.backward()?;
                    Ok(vec![loss, grad(&grads, s)?, grad(&grads, t)?])
                };
                let name = format!("itc_loss [{b}, {n}] {}", if multi_positive { "mask" } else { "diagonal" });
                compare(device, reps, name, dtype, &["loss", "d sim", "d temp"], run)?
            }
            Case::Mlm { n, vocab } => {
                let logits = Inputs::<Var>::new(uniform(&mut r, &[n, vocab], 8.0, device)?, DType::F32)?;
                let logits_m = Inputs::<Tensor>::new(uniform(&mut r, &[n, vocab], 8.0, device)?, DType::F32)?;
                let ids: Vec<u32> = (0..n).map(|_| r.random_range(0..vocab as u32)).collect();
                let ids = Tensor::new(ids.as_slice(), device)?;
                let temp = Inputs::<Tensor>::new(Tensor::new(&[1f32], device)?, DType::F32)?;
                let run = |k: Kernels, exact: bool, backward: bool| -> Result<Vec<Tensor>> {
                    let x = logits.get(exact).as_tensor();
                    let loss = itc_loss(x, logits_m.get(exact), temp.get(exact), 0.4, Positives::Index(&ids), k)?;
                    if !backward {
                        return Ok(vec![loss]);
                    }
                    let grads = loss.backward()?;
                    Ok(vec![loss, grad(&grads, x)?])
                };
                compare(device, reps, format!("mlm_loss [{n}, {vocab}]"), DType::F32, &["loss", "d logits"], run)?
            }
            Case::Rows { op, rows, d, dtype } => bench_rows(device, reps, &mut r, op, (rows, d), dtype)?,
            Case::ByConstant { b, k, n } => bench_by_constant(device, reps, &mut r, b, k, n)?,
            Case::Optimizer { blocks } => bench_optimizer(device, reps, &mut r, blocks)?,
        });
    }
    Ok(BenchReport { device: format!("{device:?}"), reps, ops, copy: copy_bandwidth(device, reps)? })
}

/// BERT padding for [B, 1, 1, Lk]: per batch row a random number of attended keys, the rest -10000.
fn padding_mask(r: &mut rand_chacha::ChaCha8Rng, b: usize, lk: usize, device: &Device) -> Result<Tensor> {
    let keep: Vec<usize> = (0..b).map(|_| r.random_range(1..=lk)).collect();
    let v: Vec<f32> = (0..b * lk).map(|k| if k % lk < keep[k / lk] { 0.0 } else { -10000.0 }).collect();
    Tensor::from_vec(v, (b, 1, 1, lk), device)
}

/// The multi-head attention with a random probe as the upstream gradient; q, k and v in `dtype`, the mask f32.
fn bench_core(
    device: &Device, reps: usize, r: &mut rand_chacha::ChaCha8Rng, ([b, h, lq, lk], dh): ([usize; 4], usize),
    mask: bool, p: f64, dtype: DType,
) -> Result<OpBench> {
    let mut input = |l: usize, range: f32| Inputs::<Var>::new(uniform(r, &[b, l, h * dh], range, device)?, dtype);
    let (q, k, v) = (input(lq, 2.0)?, input(lk, 2.0)?, input(lk, 1.0)?);
    let probe = Inputs::<Tensor>::new(uniform(r, &[b, lq, h * dh], 1.0, device)?, DType::F32)?;
    let m = mask.then(|| Inputs::<Tensor>::new(padding_mask(r, b, lk, device)?, DType::F32)).transpose()?;
    let dropout = Some(AttnDropout { p, seed: 99 });
    let scale = 1.0 / (dh as f64).sqrt();
    let run = |kernels: Kernels, exact: bool, backward: bool| -> Result<Vec<Tensor>> {
        let (q, k, v) = (q.get(exact).as_tensor(), k.get(exact).as_tensor(), v.get(exact).as_tensor());
        let o = multi_head_attention(q, k, v, h, scale, m.as_ref().map(|m| m.get(exact)), dropout, kernels)?;
        if !backward {
            return Ok(vec![o]);
        }
        let probe = probe.get(exact);
        let grads = (o.to_dtype(probe.dtype())? * probe)?.sum_all()?.backward()?;
        Ok(vec![o, grad(&grads, q)?, grad(&grads, k)?, grad(&grads, v)?])
    };
    let name = format!(
        "attention [{b}, {h}, {lq}, {lk}] dh {dh}{}{}",
        if mask { " +mask" } else { "" },
        if p > 0.0 { format!(" p {p}") } else { String::new() }
    );
    compare(device, reps, name, dtype, &["o", "dq", "dk", "dv"], run)
}

/// A row-wise op over [rows, d], with a random probe as the upstream gradient.
fn bench_rows(
    device: &Device, reps: usize, r: &mut rand_chacha::ChaCha8Rng, op: RowOp, (rows, d): (usize, usize), dtype: DType,
) -> Result<OpBench> {
    let x = Inputs::<Var>::new(uniform(r, &[rows, d], 4.0, device)?, dtype)?;
    let w = Inputs::<Var>::new((uniform(r, &[d], 0.5, device)? + 1.0)?, DType::F32)?;
    let b = Inputs::<Var>::new(uniform(r, &[d], 0.5, device)?, DType::F32)?;
    let probe = Inputs::<Tensor>::new(uniform(r, &[rows, d], 1.0, device)?, DType::F32)?;
    let wl = match op {
        RowOp::Linear | RowOp::LinearGelu | RowOp::Mlp => {
            Some(Inputs::<Var>::new(uniform(r, &[d, d], (d as f32).powf(-0.5), device)?, dtype)?)
        }
        _ => None,
    };
    let residual = match op {
        RowOp::AddLayerNorm => Some(Inputs::<Var>::new(uniform(r, &[rows, d], 1.0, device)?, DType::F32)?),
        _ => None,
    };
    let run = |k: Kernels, exact: bool, backward: bool| -> Result<Vec<Tensor>> {
        let (x, w, b) = (x.get(exact).as_tensor(), w.get(exact).as_tensor(), b.get(exact).as_tensor());
        let wl = wl.as_ref().map(|w| w.get(exact).as_tensor());
        let a = residual.as_ref().map(|a| a.get(exact).as_tensor());
        let y = match (op, wl) {
            (RowOp::LayerNorm, _) => layer_norm(x, w, b, 1e-6, k)?,
            (RowOp::AddLayerNorm, _) => add_layer_norm(a.expect("the residual case has a sum"), x, w, b, 1e-6, k)?,
            (RowOp::Bias, _) => add_bias(x, b, k)?,
            (RowOp::Gelu, _) => gelu(x, k)?,
            (RowOp::Dropout, _) => dropout(x, 0.1, 7, k)?,
            (RowOp::Linear, wl) => linear(x, wl.expect("the linear case has a weight"), b, k)?,
            (RowOp::LinearGelu, wl) => linear_gelu(x, wl.expect("the linear case has a weight"), b, k)?,
            // fc1 and fc2 share the square weight and the bias: [d, d] through d hidden units.
            (RowOp::Mlp, wl) => {
                let fc = (wl.expect("the mlp case has a weight"), b);
                mlp(x, fc, fc, k)?
            }
        };
        if !backward {
            return Ok(vec![y]);
        }
        let probe = probe.get(exact);
        let grads = (y.to_dtype(probe.dtype())? * probe)?.sum_all()?.backward()?;
        let mut out = vec![y, grad(&grads, x)?];
        match (op, wl) {
            (RowOp::LayerNorm | RowOp::AddLayerNorm, _) => out.push(grad(&grads, w)?),
            (RowOp::Linear | RowOp::LinearGelu | RowOp::Mlp, Some(wl)) => out.push(grad(&grads, wl)?),
            _ => {}
        }
        if !matches!(op, RowOp::Gelu | RowOp::Dropout) {
            out.push(grad(&grads, b)?);
        }
        if let Some(a) = a {
            out.push(grad(&grads, a)?);
        }
        Ok(out)
    };
    let (name, outputs): (&str, &[&'static str]) = match op {
        RowOp::LayerNorm => ("layer_norm", &["y", "dx", "dw", "db"]),
        RowOp::AddLayerNorm => ("add_layer_norm", &["y", "dx", "dw", "db", "da"]),
        RowOp::Bias => ("add_bias", &["y", "dx", "db"]),
        RowOp::Gelu => ("gelu", &["y", "dx"]),
        RowOp::Dropout => ("dropout", &["y", "dx"]),
        RowOp::Linear => ("linear", &["y", "dx", "dw", "db"]),
        RowOp::LinearGelu => ("linear_gelu", &["y", "dx", "dw", "db"]),
        RowOp::Mlp => ("mlp", &["y", "dx", "dw", "db"]),
    };
    compare(device, reps, format!("{name} [{rows}, {d}]"), dtype, outputs, run)
}

fn bench_by_constant(
    device: &Device, reps: usize, r: &mut rand_chacha::ChaCha8Rng, b: usize, k: usize, n: usize,
) -> Result<OpBench> {
    let a = Inputs::<Var>::new(uniform(r, &[b, k], 1.0, device)?, DType::F32)?;
    let keys = Inputs::<Tensor>::new(uniform(r, &[k, n], 1.0, device)?, DType::F32)?;
    let probe = Inputs::<Tensor>::new(uniform(r, &[b, n], 1.0, device)?, DType::F32)?;
    let run = |kernels: Kernels, exact: bool, backward: bool| -> Result<Vec<Tensor>> {
        let a = a.get(exact).as_tensor();
        let y = matmul_by_constant(a, keys.get(exact), kernels)?;
        if !backward {
            return Ok(vec![y]);
        }
        let grads = (&y * probe.get(exact))?.sum_all()?.backward()?;
        Ok(vec![y, grad(&grads, a)?])
    };
    compare(device, reps, format!("matmul_by_constant [{b}, {k}] @ [{k}, {n}]"), DType::F32, &["y", "da"], run)
}

/// The optimiser's per-parameter work over `blocks` ViT-B blocks' 24 tensors, on fresh copies each run (the
/// updates are in place): the gradients' squared norm, AdamW's update and the EMA of momentum twins toward
/// the parameters, fused (one launch each on CUDA) against their formulas in candle ops per tensor. Nothing
/// here has a backward: "f+b" runs the same again.
fn bench_optimizer(device: &Device, reps: usize, r: &mut rand_chacha::ChaCha8Rng, blocks: usize) -> Result<OpBench> {
    let (d, mlp) = (768, 3072);
    let block: [&[usize]; 12] =
        [&[3 * d, d], &[3 * d], &[d, d], &[d], &[mlp, d], &[mlp], &[d, mlp], &[d], &[d], &[d], &[d], &[d]];
    // Per tensor: parameter, m, v, gradient, momentum twin.
    let state = (0..blocks)
        .flat_map(|_| block)
        .map(|dims| {
            let mut t = |range: f32, abs: bool| {
                let x = uniform(r, dims, range, device)?;
                Inputs::<Tensor>::new(if abs { x.abs()? } else { x }, DType::F32)
            };
            Ok([t(1.0, false)?, t(0.01, false)?, t(1e-4, true)?, t(0.1, false)?, t(1.0, false)?])
        })
        .collect::<Result<Vec<_>>>()?;
    let h =
        AdamWStep { beta1: 0.9, beta2: 0.999, eps: 1e-8, lr: 1e-4, decay: 0.999998, bc1: 0.19, bc2: 0.002, scale: 0.5 };
    let (b1, b2, momentum) = (h.beta1 as f64, h.beta2 as f64, 0.995);
    let run = |kernels: Kernels, exact: bool, _backward: bool| -> Result<Vec<Tensor>> {
        let (norm, updated) = match kernels {
            Kernels::Fused => {
                let grads: Vec<&Tensor> = state.iter().map(|s| s[3].get(exact)).collect();
                let norm = sum_squares(&grads, device)?;
                let copies = state
                    .iter()
                    .map(|[p, m, v, _, _]| Ok([p.get(exact).copy()?, m.get(exact).copy()?, v.get(exact).copy()?]))
                    .collect::<Result<Vec<_>>>()?;
                let updates: Vec<_> = copies
                    .iter()
                    .zip(&grads)
                    .map(|([p, m, v], g)| AdamWUpdate { p, m, v, g: (*g).clone(), step: h })
                    .collect();
                adamw_step_all(&updates)?;
                let pairs = state
                    .iter()
                    .map(|s| Ok((Var::from_tensor(s[0].get(exact))?, Var::from_tensor(s[4].get(exact))?)))
                    .collect::<Result<Vec<_>>>()?;
                ema_all(&pairs, momentum)?;
                let updated = copies
                    .into_iter()
                    .zip(pairs)
                    .map(|([p, m, v], (_, twin))| [p, m, v, twin.as_tensor().clone()])
                    .collect();
                (norm, updated)
            }
            Kernels::Reference => {
                let squares = state.iter().map(|s| s[3].get(exact).sqr()?.sum_all()).collect::<Result<Vec<_>>>()?;
                let updated = state
                    .iter()
                    .map(|[p, m, v, g, twin]| {
                        let gs = (g.get(exact) * h.scale as f64)?;
                        let m = ((m.get(exact) * b1)? + (&gs * (1.0 - b1))?)?;
                        let v = ((v.get(exact) * b2)? + (gs.sqr()? * (1.0 - b2))?)?;
                        let step = ((&m / h.bc1 as f64)? / ((&v / h.bc2 as f64)?.sqrt()? + h.eps as f64)?)?;
                        let p_next = ((p.get(exact) * h.decay as f64)? - (step * h.lr as f64)?)?;
                        let twin = ((twin.get(exact) * momentum)? + (p.get(exact) * (1.0 - momentum))?)?;
                        Ok([p_next, m, v, twin])
                    })
                    .collect::<Result<Vec<_>>>()?;
                (Tensor::stack(&squares, 0)?.sum_all()?, updated)
            }
        };
        let mut out = vec![norm];
        for i in 0..4 {
            out.push(Tensor::cat(&updated.iter().map(|t| t[i].flatten_all()).collect::<Result<Vec<_>>>()?, 0)?);
        }
        Ok(out)
    };
    let name = format!("optimizer {} tensors ({blocks} ViT-B blocks)", block.len() * blocks);
    compare(device, reps, name, DType::F32, &["norm^2", "params", "m", "v", "ema"], run)
}

fn grad(grads: &candle_core::backprop::GradStore, t: &Tensor) -> Result<Tensor> {
    grads.get(t).cloned().ok_or_else(|| candle_core::Error::Msg("the benchmarked op gave no gradient".into()))
}

/// Times `run(kernels, exact = false, backward)` for both implementations, without and with the backward,
/// and compares the outputs with each other and with `run(Reference, exact = true, backward = true)`.
fn compare(
    device: &Device, reps: usize, name: String, dtype: DType, outputs: &[&'static str],
    run: impl Fn(Kernels, bool, bool) -> Result<Vec<Tensor>>,
) -> Result<OpBench> {
    let (fused_fwd_ms, _) = time(device, reps, || run(Kernels::Fused, false, false))?;
    let (reference_fwd_ms, _) = time(device, reps, || run(Kernels::Reference, false, false))?;
    let (fused_ms, fused) = time(device, reps, || run(Kernels::Fused, false, true))?;
    let (reference_ms, reference) = time(device, reps, || run(Kernels::Reference, false, true))?;
    let exact = run(Kernels::Reference, true, true)?;
    let mut errors = Vec::new();
    for (((&output, f), r), e) in outputs.iter().zip(&fused).zip(&reference).zip(&exact) {
        errors.push(OutputError {
            output,
            fused_vs_reference: max_err(f, r)?.1,
            fused_vs_exact: max_err(f, e)?.1,
            reference_vs_exact: max_err(r, e)?.1,
        });
    }
    Ok(OpBench { name, dtype, fused_fwd_ms, reference_fwd_ms, fused_ms, reference_ms, errors })
}

/// Median milliseconds of `reps` runs of `f` after one warm-up (which also loads CUDA modules), with the
/// device synchronised around each; returns the warm-up's outputs.
fn time<T>(device: &Device, reps: usize, f: impl Fn() -> Result<T>) -> Result<(f64, T)> {
    let out = f()?;
    device.synchronize()?;
    let mut times: Vec<Duration> = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        let o = f()?;
        device.synchronize()?;
        times.push(start.elapsed());
        drop(o);
    }
    times.sort();
    Ok((times[times.len() / 2].as_secs_f64() * 1e3, out))
}

fn copy_bandwidth(device: &Device, reps: usize) -> Result<CopyBench> {
    let bytes = 256 << 20;
    let src = Tensor::zeros(bytes / 4, DType::F32, device)?;
    let (ms, _) = time(device, reps, || src.copy())?;
    Ok(CopyBench { bytes, ms, gbps: 2.0 * bytes as f64 / (ms * 1e-3) / 1e9 })
}

fn dtype_name<S: serde::Serializer>(d: &DType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(d.as_str())
}

#[cfg(test)]
mod tests {
    fn err(output: &'static str, e: f64) -> super::OutputError {
        super::OutputError { output, fused_vs_reference: e, fused_vs_exact: 1e-7, reference_vs_exact: 0.0 }
    }

    #[test]
    fn report_formats() {
        let report = super::BenchReport {
            device: "Cpu".into(),
            reps: 1,
            ops: vec![super::OpBench {
                name: "x".into(),
                dtype: candle_core::DType::F32,
                fused_fwd_ms: 0.5,
                reference_fwd_ms: 2.0,
                fused_ms: 1.0,
                reference_ms: 3.0,
                errors: vec![err("y", 1e-7), err("d", f64::NAN)],
            }],
            copy: super::CopyBench { bytes: 1 << 20, ms: 1.0, gbps: 2.0 },
        };
        let text = report.to_string();
        assert!(text.contains("3.0x") && text.contains("NaN"), "{text}");
    }
}
