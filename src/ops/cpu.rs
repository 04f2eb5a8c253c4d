//! Row kernels of the fused ops on CPU: plain loops over contiguous f32 rows, written so that LLVM
//! vectorises them (reductions keep `LANES` independent accumulators, `exp` is branch-free), compiled for
//! the widest vector instructions the CPU has ([`Simd`]) and spread over the compute threads
//! (crate::threads).

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result};
use rayon::prelude::*;
use std::sync::atomic::{AtomicU8, Ordering};

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

/// The vector instructions the kernels run with, picked at run time: the default build targets the x86-64
/// baseline (SSE2, 4 lanes), which left the GELU's erf, the softmaxes' exp and LayerNorm 4-16x short of an
/// AVX-512 core. Every level computes the same bits: Rust never contracts a multiply and an add into an
/// FMA, and the reductions keep a fixed number of lanes. `ALIGNFUSE_SIMD=baseline|avx2` caps the level
/// (to measure what it brings).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Simd {
    Baseline = 1,
    Avx2 = 2,
    Avx512 = 3,
}

/// The level in use (0: not chosen yet).
static LEVEL: AtomicU8 = AtomicU8::new(0);

impl Simd {
    /// The widest level this CPU supports.
    fn supported() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            let avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512dq")
                && is_x86_feature_detected!("avx512vl");
            if avx2 && avx512 {
                return Simd::Avx512;
            }
            if avx2 {
                return Simd::Avx2;
            }
        }
        Simd::Baseline
    }

    /// The level the kernels run at: the CPU's widest, or less under `ALIGNFUSE_SIMD`.
    pub(super) fn current() -> Simd {
        match LEVEL.load(Ordering::Relaxed) {
            1 => Simd::Baseline,
            2 => Simd::Avx2,
            3 => Simd::Avx512,
            _ => {
                let cap = match std::env::var("ALIGNFUSE_SIMD").as_deref() {
                    Ok("baseline") => Simd::Baseline,
                    Ok("avx2") => Simd::Avx2,
                    _ => Simd::Avx512,
                };
                Simd::set(cap)
            }
        }
    }

    /// Runs the kernels at `level`, or at the CPU's widest if it lacks `level`; returns the level set.
    pub(super) fn set(level: Simd) -> Simd {
        let level = level.min(Simd::supported());
        LEVEL.store(level as u8, Ordering::Relaxed);
        level
    }
}

/// Defines `fn $name` with its body compiled for each [`Simd`] level, and runs the copy for
/// [`Simd::current`]. The body is an `#[inline(always)]` function inlined into one
/// `#[target_feature]` function per level; what it calls must be `#[inline(always)]` (or a small
/// generic, such as the slice iterators) to be compiled with it. Arguments are plain names.
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }
            match $crate::ops::cpu::Simd::current() {
                // SAFETY: `Simd::current` never exceeds what the CPU supports.
                #[cfg(target_arch = "x86_64")]
                $crate::ops::cpu::Simd::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                $crate::ops::cpu::Simd::Avx2 => unsafe { avx2($($arg),*) },
                _ => body($($arg),*),
            }
        }
    };
}
pub(super) use multiversion;

/// Below this many elements a call runs on the calling thread: waking the pool costs more than it saves.
const PARALLEL_MIN_ELEMS: usize = 1 << 15;

/// Rows are handed to threads in parts of about this many elements.
const PART_ELEMS: usize = 1 << 14;

/// Calls `f(state, item)` for every item and collects the results in order; the items run on the compute
/// threads when `elems` (the elements they touch in all) is large. `init` makes scratch state, once per
/// batch of items a thread takes.
pub(super) fn par_map<T, S, R, I, F>(items: Vec<T>, elems: usize, init: I, f: F) -> Vec<R>
where
    T: Send,
    R: Send,
    I: Fn() -> S + Sync,
    F: Fn(&mut S, T) -> R + Sync,
{
    if elems < PARALLEL_MIN_ELEMS || items.len() < 2 {
        let mut state = init();
        return items.into_iter().map(|item| f(&mut state, item)).collect();
    }
    // rayon, not candle's barrier pool: gemm runs there too, so one set of threads serves every op.
    crate::threads::wake();
    items.into_par_iter().with_min_len(1).map_init(&init, &f).collect()
}

/// Calls `f(state, row_index, out_row)` for every `cols`-long row of `out` and collects the results in
/// row order; rows run on the compute threads when `out` is large, in parts of about `PART_ELEMS`.
pub(super) fn map_rows<S, R, I, F>(out: &mut [f32], cols: usize, init: I, f: F) -> Vec<R>
where
    R: Send,
    I: Fn() -> S + Sync,
    F: Fn(&mut S, usize, &mut [f32]) -> R + Sync,
{
    if cols == 0 {
        return Vec::new();
    }
    let rows_per_part = (PART_ELEMS / cols).max(1);
    let elems = out.len();
    let parts: Vec<(usize, &mut [f32])> =
        out.chunks_mut(rows_per_part * cols).enumerate().map(|(p, rows)| (p * rows_per_part, rows)).collect();
    let run = |state: &mut S, (first_row, rows): (usize, &mut [f32])| -> Vec<R> {
        rows.chunks_mut(cols).enumerate().map(|(k, row)| f(state, first_row + k, row)).collect()
    };
    par_map(parts, elems, init, run).into_iter().flatten().collect()
}

/// `f(offset, part)` over consecutive parts of `out` that hold whole `cols`-long rows (1 for element-wise
/// kernels), on the compute threads when `out` is large.
pub(super) fn map_parts(out: &mut [f32], cols: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let part = (PART_ELEMS / cols.max(1)).max(1) * cols;
    map_rows(out, part, || (), |_, r, rows| f(r * part, rows));
}

/// [`map_parts`] for an element-wise kernel with two outputs of one length: `f(offset, a_part, b_part)`.
pub(super) fn map_part_pairs(a: &mut [f32], b: &mut [f32], f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync) {
    let elems = a.len();
    let parts: Vec<_> = a.chunks_mut(PART_ELEMS).zip(b.chunks_mut(PART_ELEMS)).enumerate().collect();
    par_map(parts, elems, || (), |_, (p, (a, b))| f(p * PART_ELEMS, a, b));
}

/// Rows per block of [`row_sums`] (ROWS_PER_CHUNK of the CUDA column sums).
const SUM_BLOCK_ROWS: usize = 128;

/// The sum over `rows` rows of what `add(block, acc)` adds for the rows of `block` into an f64 accumulator
/// of `width`: blocks of `SUM_BLOCK_ROWS` rows run on the compute threads and their sums are added in block
/// order, so the bits do not depend on the thread count. (Column sums of gradients: run after the parallel
/// part of a backward, on the driver thread alone, they were 1% of its samples at 2 threads.)
pub(super) fn row_sums(rows: usize, width: usize, add: impl Fn(std::ops::Range<usize>, &mut [f64]) + Sync) -> Vec<f64> {
    let blocks: Vec<usize> = (0..rows.div_ceil(SUM_BLOCK_ROWS)).collect();
    let partial = |_: &mut (), b: usize| {
        let mut acc = vec![0f64; width];
        add(b * SUM_BLOCK_ROWS..rows.min((b + 1) * SUM_BLOCK_ROWS), &mut acc);
        acc
    };
    let mut total = vec![0f64; width];
    for p in par_map(blocks, rows * width, || (), partial) {
        total.iter_mut().zip(&p).for_each(|(t, v)| *t += v);
    }
    total
}

/// A matrix operand of [`matmul`]: its elements and the strides of its rows and columns, so a transposed
/// operand is read in place.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

impl<'a> Mat<'a> {
    /// A row-major matrix whose rows start `stride` elements apart (its width when they are packed).
    pub(super) fn rows(data: &'a [f32], stride: usize) -> Self {
        Mat { data, row_stride: stride, col_stride: 1 }
    }

    /// The transpose of a row-major matrix whose rows start `stride` elements apart.
    pub(super) fn transposed(data: &'a [f32], stride: usize) -> Self {
        Mat { data, row_stride: 1, col_stride: stride }
    }

    fn fits(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < self.data.len()
    }
}

/// `dst = scale * a @ b` for a [m, k], b [k, n] and a row-major dst [m, n] whose rows start `dst_stride`
/// elements apart, on the calling thread (callers spread independent products over the pool); gemm's
/// kernels, as candle's matmul.
pub(super) fn matmul(dst: &mut [f32], dst_stride: usize, dims: (usize, usize, usize), a: Mat, b: Mat, scale: f32) {
    product(dst, dst_stride, dims, a, b, scale, false)
}

/// `dst = a @ b` as [`matmul`], on the compute threads (gemm splits the output's blocks over them, so the
/// bits do not depend on the thread count): candle's own matmul, without its zero-filled output.
pub(super) fn par_matmul(dst: &mut [f32], dims: (usize, usize, usize), a: Mat, b: Mat) {
    product(dst, dims.1, dims, a, b, 1.0, true)
}

/// [`matmul`], and with `threaded` on the compute threads.
fn product(
    dst: &mut [f32], dst_stride: usize, (m, n, k): (usize, usize, usize), a: Mat, b: Mat, scale: f32, threaded: bool,
) {
    let out = Mat { data: dst, row_stride: dst_stride, col_stride: 1 };
    assert!(
        a.fits(m, k) && b.fits(k, n) && out.fits(m, n) && dst_stride >= n,
        "matmul operands smaller than {m}x{k} @ {k}x{n}"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        dst.chunks_mut(dst_stride).take(m).for_each(|row| row[..n].fill(0.0));
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threaded && threads > 1 {
        crate::threads::wake();
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the assertion above keeps every element gemm reads or writes inside the three slices, and
    // `dst` is borrowed mutably while `a` and `b` are shared borrows, so they do not overlap.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_stride as isize,
            false,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            0.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A buffer of `n` f32 left as the allocator hands it out, for a kernel's output. Zero-filled
/// (`vec![0.0; n]`), every fused op paid a serial pass over its output on the driver thread before its
/// parallel kernel ran: 1.5% of a tiny step on one thread, more on two.
///
/// # Safety
/// The caller writes every element before anything reads it.
pub(super) unsafe fn output(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: the capacity is n, and f32 has no invalid bit patterns; the caller writes every element
    // before it is read (candle's `alloc_uninit` does the same for its outputs).
    #[allow(clippy::uninit_vec)]
    unsafe {
        v.set_len(n)
    };
    v
}

/// Whether element `index` of a dropout mask survives: the top 32 bits of splitmix64's output for
/// `seed + index` against `threshold` = p * 2^32. A hash rather than a stream, so a backward (or a CUDA
/// kernel) regenerates any element of the mask instead of storing it.
#[inline(always)]
pub(super) fn dropout_keep(seed: u64, index: u64, threshold: u32) -> bool {
    let mut z = seed.wrapping_add(index.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 32) as u32 >= threshold
}

/// The threshold of [`dropout_keep`] for drop probability `p` in [0, 1).
pub(super) fn dropout_threshold(p: f64) -> u32 {
    (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32
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
#[inline(always)]
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
#[inline(always)]
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
#[inline(always)]
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
#[inline(always)]
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

    /// The bits of every fused CPU op's outputs and gradients, on inputs large enough for the parallel
    /// paths (gemm's threads, the row sums' blocks).
    fn fused_bits() -> candle_core::Result<Vec<Vec<u32>>> {
        use super::super::testing::{rng, uniform};
        use super::super::{
            add_layer_norm, attention, attention_softmax, dropout, gelu, itc_loss, layer_norm, linear, linear_gelu,
        };
        use super::super::{mlp, multi_head_attention, Positives};
        use crate::config::Kernels::Fused;
        use candle_core::{Device, Tensor, Var};
        let dev = &Device::Cpu;
        let mut r = rng(21);
        let var = |r: &mut _, dims: &[usize]| Var::from_tensor(&uniform(r, dims, 3.0, dev)?);
        let (x, w, b) = (var(&mut r, &[3, 70, 96])?, var(&mut r, &[96])?, var(&mut r, &[96])?);
        let (wl, scores) = (var(&mut r, &[40, 96])?, var(&mut r, &[2, 4, 9, 37])?);
        let (q, k, v) = (var(&mut r, &[2, 3, 70, 16])?, var(&mut r, &[2, 3, 70, 16])?, var(&mut r, &[2, 3, 70, 16])?);
        let (sim, sim_m) = (var(&mut r, &[8, 40])?, uniform(&mut r, &[8, 40], 1.0, dev)?);
        let temp = Var::from_tensor(&Tensor::new(&[0.07f32], dev)?)?;
        let bias = wl.narrow(1, 0, 1)?.squeeze(1)?;
        let outputs = [
            gelu(&x, Fused)?,
            dropout(&x, 0.3, 17, Fused)?,
            layer_norm(&x, &w, &b, 1e-6, Fused)?,
            add_layer_norm(
                &q.reshape((3, 70, 32))?,
                &x.narrow(2, 0, 32)?,
                &w.narrow(0, 0, 32)?,
                &b.narrow(0, 0, 32)?,
                1e-6,
                Fused,
            )?,
            linear(&x, &wl, &bias, Fused)?,
            linear_gelu(&x, &wl, &bias, Fused)?,
            mlp(&x, (&wl, &bias), (&wl.t()?.contiguous()?, &w), Fused)?,
            attention_softmax(&scores, 0.3, None, Fused)?,
            attention(&q, &k, &v, 0.25, None, None, Fused)?,
            multi_head_attention(&x, &x, &w.broadcast_mul(&x)?, 4, 0.25, None, None, Fused)?,
            itc_loss(&sim, &sim_m, &temp, 0.4, Positives::Diagonal, Fused)?,
        ];
        let mut bits = Vec::new();
        for y in &outputs {
            let grads = y.sqr()?.sum_all()?.backward()?;
            bits.push(y.flatten_all()?.to_vec1::<f32>()?);
            for t in [&x, &w, &b, &wl, &scores, &q, &k, &v, &sim, &temp] {
                if let Some(g) = grads.get(t) {
                    bits.push(g.flatten_all()?.to_vec1::<f32>()?);
                }
            }
        }
        Ok(bits.into_iter().map(|v| v.into_iter().map(f32::to_bits).collect()).collect())
    }

    /// Every fused CPU op, forward and backward, gives the same bits at each vector level this CPU has
    /// (the claim `Simd` rests on). Other tests may run meanwhile at whichever level is set: by that
    /// claim their results do not change.
    #[test]
    fn every_simd_level_computes_the_same_bits() -> candle_core::Result<()> {
        let before = Simd::current();
        let levels = [Simd::Baseline, Simd::Avx2, Simd::Avx512].map(|l| (l, Simd::set(l), fused_bits()));
        Simd::set(before);
        let baseline = levels[0].2.as_ref().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        for (asked, got, bits) in &levels[1..] {
            assert!(bits.as_ref().is_ok_and(|b| b == baseline), "{asked:?} (ran at {got:?}) differs from the baseline");
        }
        Ok(())
    }

    /// ... and the same bits on one compute thread as on three (gemm splits output blocks, the row sums add
    /// fixed blocks in order).
    #[test]
    fn every_thread_count_computes_the_same_bits() -> candle_core::Result<()> {
        // A plain rayon pool: the compute pool's spin bookkeeping is global, and its own test checks it.
        let on = |threads| {
            let pool =
                rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(candle_core::Error::wrap)?;
            pool.install(fused_bits)
        };
        assert!(on(1)? == on(3)?, "the fused ops' bits depend on the thread count");
        // The row sums in f64 directly (rounded to f32, an order's effect rarely shows): terms of 1e15 and
        // fractions, whose sum depends on the order they are added in.
        let sums = || {
            let term = |r: usize, j: usize| ((r * 7919 + j) % 1000) as f64 * 1e12 + 0.37 * r as f64;
            row_sums(1000, 40, |rows, acc| {
                rows.for_each(|r| acc.iter_mut().enumerate().for_each(|(j, a)| *a += term(r, j)))
            })
            .into_iter()
            .map(f64::to_bits)
            .collect::<Vec<_>>()
        };
        let sums_on = |threads| rayon::ThreadPoolBuilder::new().num_threads(threads).build().map(|p| p.install(sums));
        assert_eq!(sums_on(1).map_err(candle_core::Error::wrap)?, sums_on(3).map_err(candle_core::Error::wrap)?);
        Ok(())
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
