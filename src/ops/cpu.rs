//! Row kernels of the fused ops on CPU: plain loops over contiguous f32 rows, written so that LLVM
//! vectorises them (reductions keep `LANES` independent accumulators, `exp` is branch-free), with rows
//! spread over candle's own CPU thread pool (CANDLE_NUM_THREADS / RAYON_NUM_THREADS set its size).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};
use std::sync::{Mutex, PoisonError};

/// The f32 elements a contiguous CPU storage holds for `layout`; `what` names the tensor in errors.
pub(super) fn f32_slice<'a>(s: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&v[start..end]),
        (CpuStorage::F32(_), None) => bail!("{what} must be contiguous"),
        _ => bail!("{what}: the fused CPU op takes f32, got {:?}", s.dtype()),
    }
}

/// [`f32_slice`], writable (in-place ops).
pub(super) fn f32_slice_mut<'a>(s: &'a mut CpuStorage, layout: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let dtype = s.dtype();
    match (s, layout.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((start, end))) => Ok(&mut v[start..end]),
        (CpuStorage::F32(_), None) => bail!("{what} must be contiguous"),
        _ => bail!("{what}: the fused CPU op takes f32, got {dtype:?}"),
    }
}

/// Independent accumulators per reduction: enough for 8-wide vectors, and a fixed summation order so
/// results do not depend on the thread count.
pub(super) const LANES: usize = 8;

/// Below this many elements a call runs on the calling thread: waking the pool costs more than it saves.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Rows are handed to threads in parts of about this many elements.
const PART_ELEMS: usize = 1 << 14;

/// A run of consecutive rows and their results, handed to one thread at a time.
struct Part<'a, R> {
    first_row: usize,
    rows: &'a mut [f32],
    results: Vec<R>,
}

/// Calls `f(state, row_index, out_row)` for every `cols`-long row of `out` and collects the results in
/// row order; rows run on candle's thread pool when `out` is large. `init` makes scratch state, once per
/// batch of rows a thread takes.
pub(super) fn map_rows<S, R, I, F>(out: &mut [f32], cols: usize, init: I, f: F) -> Vec<R>
where
    R: Send,
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize, &mut [f32]) -> R + Sync,
{
    if cols == 0 {
        return Vec::new();
    }
    let run = |state: &mut S, first_row: usize, rows: &mut [f32]| -> Vec<R> {
        rows.chunks_mut(cols).enumerate().map(|(k, row)| f(state, first_row + k, row)).collect()
    };
    if out.len() < PARALLEL_MIN_ELEMS {
        return run(&mut init(), 0, out);
    }
    let rows_per_part = (PART_ELEMS / cols).max(1);
    let parts: Vec<Mutex<Part<R>>> = out
        .chunks_mut(rows_per_part * cols)
        .enumerate()
        .map(|(p, rows)| Mutex::new(Part { first_row: p * rows_per_part, rows, results: Vec::new() }))
        .collect();
    // Each part is locked by exactly one thread (the pool hands out disjoint ranges); the locks only let
    // the threads share the parts without unsafe code.
    candle_core::utils::barrier_pool().execute_chunked(parts.len(), |range| {
        let mut state = init();
        for part in &parts[range] {
            let mut part = part.lock().unwrap_or_else(PoisonError::into_inner);
            let Part { first_row, rows, results } = &mut *part;
            *results = run(&mut state, *first_row, rows);
        }
    });
    parts.into_iter().flat_map(|p| p.into_inner().unwrap_or_else(PoisonError::into_inner).results).collect()
}

/// `exp(x)` in f32 without branches or calls, so loops over it vectorise: Cody-Waite range reduction to
/// `r` in [-ln2/2, ln2/2] and the Cephes degree-6 polynomial (about 2 ulp, against libm's 1). Results below
/// the smallest normal f32 (x < -87.34) are 0; x > 88 gives inf (a little early: exact exp overflows at
/// 88.72, but the softmax callers only pass x <= 0); NaN stays NaN.
#[inline(always)]
pub(super) fn exp(x: f32) -> f32 {
    const LO: f32 = -87.336_55;
    const HI: f32 = 88.0;
    // 1.5 * 2^23: adding it rounds to an integer that then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(LO, HI);
    let k = xc * std::f32::consts::LOG2_E + ROUND;
    let n = k - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    let n_int = (k.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y * scale
    }
}

/// Largest element (-inf for an empty row). NaN is skipped here; callers' sums then turn it into NaN.
pub(super) fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    rest.iter().chain(acc.iter()).fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m })
}

/// Sum in f64 lanes: softmax denominators over 65536 columns would drift by ~1e-6 in f32.
pub(super) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f64; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for k in 0..LANES {
            acc[k] += c[k] as f64;
        }
    }
    (acc.iter().sum::<f64>() + rest.iter().map(|&v| v as f64).sum::<f64>()) as f32
}

/// Dot product in f64 lanes.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| x as f64 * y as f64).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..LANES {
            acc[k] += x[k] as f64 * y[k] as f64;
        }
    }
    (acc.iter().sum::<f64>() + rest) as f32
}

/// `x <- exp(x - shift)` in place; returns the sum of the new values.
pub(super) fn exp_shift_sum(x: &mut [f32], shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
    sum(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -87.3f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.001_7;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn reductions_match_sequential() {
        let x: Vec<f32> = (0..37).map(|i| ((i * 7919) % 101) as f32 / 10.0 - 5.0).collect();
        assert_eq!(max(&x), x.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        assert!((sum(&x) as f64 - x.iter().map(|&v| v as f64).sum::<f64>()).abs() < 1e-5);
        assert!((dot(&x, &x) as f64 - x.iter().map(|&v| v as f64 * v as f64).sum::<f64>()).abs() < 1e-4);
        assert_eq!(max(&[]), f32::NEG_INFINITY);
    }
}
