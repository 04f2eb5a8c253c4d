//! Image decoding and the ALBEF image transforms, computed on 8-bit RGB like the PIL/OpenCV reference
//! pipeline so that augmented images match it, then normalised to CHW `f32` with CLIP statistics.
//!
//! Train: RandomResizedCrop (torchvision's sampling) with PIL's bicubic resampling, optional horizontal
//! flip, then ALBEF's RandAugment. Test: bicubic resize to `res x res`. The resampler re-implements PIL's
//! 8-bit bicubic (a = -0.5, kernel widened on downscaling, 22-bit fixed point, Pillow 13's pass order)
//! with precomputed per-output weights: it reproduces Pillow byte for byte, while
//! `image::imageops::resize` (same kernel) walks pixels column-wise through an f32 RGBA copy and is
//! several times slower.

use crate::config::{Config, DataConfig, Normalize};
use ::image::{DynamicImage, ImageReader, RgbImage};
use anyhow::{ensure, Context, Result};
use rand::Rng;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// CLIP's per-channel mean, used by ALBEF and BLIP for normalisation.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
/// CLIP's per-channel standard deviation, (0.26862954, 0.26130258, 0.27577711) as f32.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// torchvision's default aspect-ratio range of RandomResizedCrop.
pub const CROP_RATIO: [f64; 2] = [3.0 / 4.0, 4.0 / 3.0];

/// Grey that geometric RandAugment ops fill uncovered pixels with (ALBEF's `replace_value`).
const FILL: [u8; 3] = [128, 128, 128];
/// RandAugment's magnitude scale (ALBEF `MAX_LEVEL`).
const MAX_LEVEL: f64 = 10.0;
/// Translation at full magnitude in pixels, independent of the image size (ALBEF `translate_const`).
const TRANSLATE_CONST: f64 = 10.0;

/// Decodes an image file (format guessed from its bytes) to RGB; transparent pixels are composited on
/// white, because stamp-like images (Tux Paint) keep arbitrary colours under zero alpha.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot open image {}", path.display()))?;
    decode_rgb(&bytes).with_context(|| format!("image {}", path.display()))
}

/// [`load_rgb`] of an encoded image in memory (a tar shard's member).
pub fn decode_rgb(bytes: &[u8]) -> Result<RgbImage> {
    let decoded = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .context("cannot read the image")?
        .decode()
        .context("cannot decode the image")?;
    ensure!(decoded.width() > 0 && decoded.height() > 0, "the image is empty");
    Ok(composite_on_white(decoded))
}

fn composite_on_white(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    let (w, h) = rgba.dimensions();
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    for px in rgba.as_raw().chunks_exact(4) {
        let a = u32::from(px[3]);
        for &c in &px[..3] {
            out.push(((u32::from(c) * a + 255 * (255 - a) + 127) / 255) as u8);
        }
    }
    RgbImage::from_raw(w, h, out).expect("buffer has w*h*3 bytes")
}

/// A crop rectangle in pixels: top-left corner `(x, y)`, size `w x h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

/// torchvision's `RandomResizedCrop.get_params`: up to 10 tries of an area fraction uniform in `scale`
/// and a log-uniform aspect ratio in `ratio`, then a centre crop clamped to `ratio` as the fallback.
/// Sizes are rounded half to even like Python's `round`.
pub fn random_resized_crop_box(
    width: usize, height: usize, scale: [f64; 2], ratio: [f64; 2], rng: &mut impl Rng,
) -> CropBox {
    let area = (width * height) as f64;
    let (log_lo, log_hi) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, log_lo, log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even() as usize;
        let h = (target_area / aspect).sqrt().round_ties_even() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return CropBox { x, y, w, h };
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0] {
        (width, ((width as f64 / ratio[0]).round_ties_even() as usize).clamp(1, height))
    } else if in_ratio > ratio[1] {
        (((height as f64 * ratio[1]).round_ties_even() as usize).clamp(1, width), height)
    } else {
        (width, height)
    };
    CropBox { x: (width - w) / 2, y: (height - h) / 2, w, h }
}

/// Uniform in [lo, hi); `lo` when the range is empty (a fixed scale such as `[1.0, 1.0]`).
fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// PIL's fixed-point precision for 8-bit resampling (`PRECISION_BITS` in Resample.c).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per-output-pixel bicubic weights along one axis: output `i` reads `count[i]` inputs from `start[i]`
/// with the fixed-point weights `weights[i * ksize ..]`.
struct Taps {
    start: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i32>,
    ksize: usize,
}

/// PIL's bicubic kernel, a = -0.5.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` pixels to `out_size`.
fn bicubic_taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = 2.0 * filter_scale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut taps = Taps {
        start: Vec::with_capacity(out_size),
        count: Vec::with_capacity(out_size),
        weights: vec![0; out_size * ksize],
        ksize,
    };
    let mut w = vec![0f64; ksize];
    for (i, k) in taps.weights.chunks_exact_mut(ksize).enumerate() {
        let center = (i as f64 + 0.5) * scale;
        // `as i64` truncates toward zero like C's `(int)` cast; negatives are clamped to 0 anyway.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = hi - lo;
        let mut sum = 0.0;
        for (x, wx) in w[..n].iter_mut().enumerate() {
            *wx = bicubic((x as f64 + lo as f64 - center + 0.5) / filter_scale);
            sum += *wx;
        }
        for (kx, &wx) in k.iter_mut().zip(&w[..n]) {
            let v = if sum != 0.0 { wx / sum } else { wx } * f64::from(1u32 << PRECISION_BITS);
            *kx = if v < 0.0 { (v - 0.5) as i32 } else { (v + 0.5) as i32 };
        }
        taps.start.push(lo);
        taps.count.push(n);
    }
    taps
}

/// PIL's `clip8`: drop the fixed-point fraction and saturate to a byte.
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Crops `region` out of `img` and resizes it to `out_w x out_h` with PIL's bicubic filter, pixel for
/// pixel what `img.crop(box).resize(size, Image.BICUBIC)` gives (torchvision's `resized_crop`): the
/// crop's edges act as image edges. Like Pillow 13, the vertical pass runs first when the height
/// shrinks and loses more than twice as many pixels as the width; otherwise the horizontal pass runs first
/// over just the rows the vertical pass reads; the order changes the 8-bit rounding of the result.
pub fn resize_bicubic(img: &RgbImage, region: CropBox, out_w: usize, out_h: usize) -> RgbImage {
    if out_w == 0 || out_h == 0 {
        return RgbImage::new(out_w as u32, out_h as u32);
    }
    let stride = img.width() as usize * 3;
    let src = img.as_raw();
    let (need_h, need_v) = (out_w != region.w, out_h != region.h);
    let vertical_first =
        need_h && out_h < region.h && 2 * (region.w as i64 - out_w as i64) < region.h as i64 - out_h as i64;
    let out = if vertical_first {
        let mid = vertical_pass(src, stride, region.x, region.w, &bicubic_taps(region.h, out_h), region.y as isize);
        horizontal_pass(&mid, region.w * 3, 0, 0..out_h, &bicubic_taps(region.w, out_w))
    } else {
        let vertical = need_v.then(|| bicubic_taps(region.h, out_h));
        let rows = match &vertical {
            Some(t) => t.start[0]..t.start[out_h - 1] + t.count[out_h - 1],
            None => 0..region.h,
        };
        let first = rows.start;
        let src_rows = region.y + rows.start..region.y + rows.end;
        let (mid, mid_w) = if need_h {
            (horizontal_pass(src, stride, region.x, src_rows, &bicubic_taps(region.w, out_w)), out_w)
        } else {
            let copy = src_rows.flat_map(|r| &src[r * stride + region.x * 3..r * stride + (region.x + region.w) * 3]);
            (copy.copied().collect(), region.w)
        };
        match vertical {
            Some(taps) => vertical_pass(&mid, mid_w * 3, 0, mid_w, &taps, -(first as isize)),
            None => mid,
        }
    };
    RgbImage::from_raw(out_w as u32, out_h as u32, out).expect("buffer has w*h*3 bytes")
}

/// PIL's `ImagingResampleHorizontal_8bpc`: each row of `rows` in `src` (row length `stride` bytes),
/// pixels from `x0` on, resampled to `taps.start.len()` pixels.
fn horizontal_pass(src: &[u8], stride: usize, x0: usize, rows: Range<usize>, taps: &Taps) -> Vec<u8> {
    let out_w = taps.start.len();
    let mut out = vec![0u8; rows.len() * out_w * 3];
    for (r, out_row) in rows.zip(out.chunks_exact_mut(out_w * 3)) {
        let row = &src[r * stride + x0 * 3..(r + 1) * stride];
        for (i, px) in out_row.chunks_exact_mut(3).enumerate() {
            let k = &taps.weights[i * taps.ksize..i * taps.ksize + taps.count[i]];
            let inputs = &row[taps.start[i] * 3..(taps.start[i] + taps.count[i]) * 3];
            let mut acc = [1i32 << (PRECISION_BITS - 1); 3];
            for (p, &kx) in inputs.chunks_exact(3).zip(k) {
                acc[0] += i32::from(p[0]) * kx;
                acc[1] += i32::from(p[1]) * kx;
                acc[2] += i32::from(p[2]) * kx;
            }
            px.copy_from_slice(&acc.map(clip8));
        }
    }
    out
}

/// PIL's `ImagingResampleVertical_8bpc` over the `width` pixels from column `x0` of `src` (row length
/// `stride` bytes): output row `j` combines source rows `taps.start[j] + t + row_offset`.
fn vertical_pass(src: &[u8], stride: usize, x0: usize, width: usize, taps: &Taps, row_offset: isize) -> Vec<u8> {
    let row_len = width * 3;
    let mut out = vec![0u8; row_len * taps.start.len()];
    let mut acc = vec![0i32; row_len];
    for (j, out_row) in out.chunks_exact_mut(row_len).enumerate() {
        acc.fill(1 << (PRECISION_BITS - 1));
        let k = &taps.weights[j * taps.ksize..j * taps.ksize + taps.count[j]];
        for (t, &ky) in k.iter().enumerate() {
            let r = (taps.start[j] + t) as isize + row_offset;
            let start = r as usize * stride + x0 * 3;
            for (a, &p) in acc.iter_mut().zip(&src[start..start + row_len]) {
                *a += i32::from(p) * ky;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    out
}

/// Mirrors the image left-right in place.
pub fn flip_horizontal(img: &mut RgbImage) {
    let w = img.width() as usize;
    if w == 0 {
        return;
    }
    for row in img.chunks_exact_mut(w * 3) {
        for x in 0..w / 2 {
            let (a, b) = (x * 3, (w - 1 - x) * 3);
            for c in 0..3 {
                row.swap(a + c, b + c);
            }
        }
    }
}

/// The operations of ALBEF's RandomAugment as configured for pre-training and retrieval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AugOp {
    Identity,
    AutoContrast,
    Equalize,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
}

/// The ops RandAugment draws from, uniformly and with replacement.
pub const RANDAUGMENT_OPS: [AugOp; 10] = [
    AugOp::Identity,
    AugOp::AutoContrast,
    AugOp::Equalize,
    AugOp::Brightness,
    AugOp::Sharpness,
    AugOp::ShearX,
    AugOp::ShearY,
    AugOp::TranslateX,
    AugOp::TranslateY,
    AugOp::Rotate,
];

/// ALBEF's `RandomAugment(N, M)`: draw `n` ops with replacement, apply each with probability 0.5 at
/// magnitude `m` out of 10. Enhancements use the factor `m/10*1.8+0.1` (no random sign, as in the
/// reference); shears `m/10*0.3`, translations `m/10*10` pixels and rotations `m/10*30` degrees each get
/// a random sign; geometric ops fill with grey 128 and sample bilinearly like `cv2.warpAffine`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RandAugment {
    pub n: usize,
    pub m: f64,
}

impl RandAugment {
    pub fn apply(&self, img: &mut RgbImage, rng: &mut impl Rng) {
        let ops: Vec<AugOp> =
            (0..self.n).map(|_| RANDAUGMENT_OPS[rng.random_range(0..RANDAUGMENT_OPS.len())]).collect();
        for op in ops {
            if rng.random::<f64>() > 0.5 {
                continue;
            }
            let level = self.m / MAX_LEVEL;
            let mut signed = |v: f64| if rng.random::<f64>() > 0.5 { -v } else { v };
            match op {
                AugOp::Identity => {}
                AugOp::AutoContrast => autocontrast(img),
                AugOp::Equalize => equalize(img),
                AugOp::Brightness => brightness(img, level * 1.8 + 0.1),
                AugOp::Sharpness => sharpness(img, level * 1.8 + 0.1),
                AugOp::ShearX => {
                    let f = signed(level * 0.3);
                    *img = warp_affine(img, [1.0, -f, 0.0, 0.0, 1.0, 0.0]);
                }
                AugOp::ShearY => {
                    let f = signed(level * 0.3);
                    *img = warp_affine(img, [1.0, 0.0, 0.0, -f, 1.0, 0.0]);
                }
                AugOp::TranslateX => {
                    let d = signed(level * TRANSLATE_CONST);
                    *img = warp_affine(img, [1.0, 0.0, d, 0.0, 1.0, 0.0]);
                }
                AugOp::TranslateY => {
                    let d = signed(level * TRANSLATE_CONST);
                    *img = warp_affine(img, [1.0, 0.0, 0.0, 0.0, 1.0, d]);
                }
                AugOp::Rotate => {
                    let deg = signed(level * 30.0);
                    *img = rotate(img, deg);
                }
            }
        }
    }
}

/// Applies a per-channel lookup table to every pixel.
fn apply_luts(img: &mut RgbImage, luts: &[[u8; 256]; 3]) {
    for px in img.chunks_exact_mut(3) {
        for c in 0..3 {
            px[c] = luts[c][px[c] as usize];
        }
    }
}

fn histograms(img: &RgbImage) -> [[u32; 256]; 3] {
    let mut hist = [[0u32; 256]; 3];
    for px in img.chunks_exact(3) {
        for c in 0..3 {
            hist[c][px[c] as usize] += 1;
        }
    }
    hist
}

/// `PIL.ImageOps.autocontrast` (cutoff 0): stretch each channel's [min, max] to [0, 255], truncating.
fn autocontrast(img: &mut RgbImage) {
    let hist = histograms(img);
    let luts = hist.map(|h| {
        let mut lut: [u8; 256] = std::array::from_fn(|i| i as u8);
        let lo = h.iter().position(|&n| n > 0).unwrap_or(0);
        let hi = h.iter().rposition(|&n| n > 0).unwrap_or(0);
        if hi > lo {
            let scale = 255.0 / (hi - lo) as f64;
            let offset = -(lo as f64) * scale;
            for (i, v) in lut.iter_mut().enumerate() {
                *v = (i as f64 * scale + offset).clamp(0.0, 255.0) as u8;
            }
        }
        lut
    });
    apply_luts(img, &luts);
}

/// `PIL.ImageOps.equalize`: per channel, map through the cumulative histogram in steps of
/// (pixels outside the last used bin) / 255; a channel with a single value is left alone.
fn equalize(img: &mut RgbImage) {
    let hist = histograms(img);
    let luts = hist.map(|h| {
        let mut lut: [u8; 256] = std::array::from_fn(|i| i as u8);
        let last = h.iter().rposition(|&n| n > 0).unwrap_or(0);
        let step = (h.iter().sum::<u32>() - h[last]) / 255;
        if step > 0 {
            let mut cum = step / 2;
            for (v, &n) in lut.iter_mut().zip(&h) {
                *v = (cum / step).min(255) as u8;
                cum += n;
            }
        }
        lut
    });
    apply_luts(img, &luts);
}

/// ALBEF's brightness: multiply by `factor` and truncate (computed in f32 like the numpy table).
fn brightness(img: &mut RgbImage, factor: f64) {
    let lut: [u8; 256] = std::array::from_fn(|i| (i as f32 * factor as f32).clamp(0.0, 255.0) as u8);
    apply_luts(img, &[lut; 3]);
}

/// ALBEF's sharpness: blend with the 3x3 smoothing filter `[1 1 1; 1 5 1; 1 1 1] / 13`; the 1-pixel
/// border is kept. The reference casts out-of-range blends to uint8 with wrap-around; this clamps.
fn sharpness(img: &mut RgbImage, factor: f64) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w < 3 || h < 3 || factor == 1.0 {
        return;
    }
    let stride = w * 3;
    let src = img.as_raw().clone();
    let f = factor as f32;
    for (y, out) in img.chunks_exact_mut(stride).enumerate().take(h - 1).skip(1) {
        let (up, mid, down) = (
            &src[(y - 1) * stride..y * stride],
            &src[y * stride..(y + 1) * stride],
            &src[(y + 1) * stride..(y + 2) * stride],
        );
        for i in 3..stride - 3 {
            let p = |row: &[u8], k: usize| u32::from(row[k]);
            let sum = p(up, i - 3)
                + p(up, i)
                + p(up, i + 3)
                + p(mid, i - 3)
                + 5 * p(mid, i)
                + p(mid, i + 3)
                + p(down, i - 3)
                + p(down, i)
                + p(down, i + 3);
            // Rounded division by 13 (no ties: sum/13 is never exactly k + 0.5).
            let smooth = ((2 * sum + 13) / 26) as f32;
            out[i] = (smooth + f * (f32::from(mid[i]) - smooth)).clamp(0.0, 255.0) as u8;
        }
    }
}

/// `cv2.getRotationMatrix2D((W/2, H/2), deg, 1)` then warpAffine: positive degrees turn the content
/// counter-clockwise. `inv` below is the inverse map (output pixel -> source position).
fn rotate(img: &RgbImage, deg: f64) -> RgbImage {
    let (cx, cy) = (img.width() as f64 / 2.0, img.height() as f64 / 2.0);
    let (s, c) = deg.to_radians().sin_cos();
    warp_affine(img, [c, -s, (1.0 - c) * cx + s * cy, s, c, -s * cx + (1.0 - c) * cy])
}

/// Samples `img` at `inv * (x, y, 1)` for every output pixel with bilinear interpolation, taps outside
/// the image reading [`FILL`] (OpenCV's `INTER_LINEAR` with a constant border; integer pixel
/// coordinates, no half-pixel shift).
fn warp_affine(img: &RgbImage, inv: [f64; 6]) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let src = img.as_raw();
    let mut out = vec![0u8; src.len()];
    let tap = |x: i64, y: i64| -> [f32; 3] {
        if x < 0 || y < 0 || x >= w || y >= h {
            FILL.map(f32::from)
        } else {
            let i = ((y * w + x) * 3) as usize;
            [src[i], src[i + 1], src[i + 2]].map(f32::from)
        }
    };
    for (y, row) in out.chunks_exact_mut(w as usize * 3).enumerate() {
        for (x, px) in row.chunks_exact_mut(3).enumerate() {
            let sx = inv[0] * x as f64 + inv[1] * y as f64 + inv[2];
            let sy = inv[3] * x as f64 + inv[4] * y as f64 + inv[5];
            let (x0, y0) = (floor(sx), floor(sy));
            let (fx, fy) = ((sx - x0 as f64) as f32, (sy - y0 as f64) as f32);
            if x0 < -1 || y0 < -1 || x0 >= w || y0 >= h {
                px.copy_from_slice(&FILL);
                continue;
            }
            let (p00, p10, p01, p11) = if x0 >= 0 && y0 >= 0 && x0 + 1 < w && y0 + 1 < h {
                // Fast path, all four taps inside.
                let i = ((y0 * w + x0) * 3) as usize;
                let j = i + w as usize * 3;
                let at = |k: usize| [src[k], src[k + 1], src[k + 2]].map(f32::from);
                (at(i), at(i + 3), at(j), at(j + 3))
            } else {
                (tap(x0, y0), tap(x0 + 1, y0), tap(x0, y0 + 1), tap(x0 + 1, y0 + 1))
            };
            for c in 0..3 {
                let top = p00[c] + fx * (p10[c] - p00[c]);
                let bottom = p01[c] + fx * (p11[c] - p01[c]);
                // Round half up; `+ 0.5` then truncation, because `f32::round` is a libm call on
                // baseline x86-64 and this runs for every subpixel.
                px[c] = ((top + fy * (bottom - top)).clamp(0.0, 255.0) + 0.5) as u8;
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).expect("buffer has w*h*3 bytes")
}

/// `v.floor() as i64` without the libm call (`f64::floor` is one on baseline x86-64).
fn floor(v: f64) -> i64 {
    let t = v as i64;
    if (t as f64) > v {
        t - 1
    } else {
        t
    }
}

/// ImageNet's per-channel mean and standard deviation (DINOv2, timm).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// ToTensor + Normalize with `norm`'s statistics into `out` (CHW, length `3*w*h`), through a per-channel
/// table of the 256 possible values (same f32 arithmetic as torchvision, so identical results).
fn normalize_into(img: &RgbImage, norm: Normalize, out: &mut [f32]) -> Result<()> {
    let (mean, std) = match norm {
        Normalize::Clip => (CLIP_MEAN, CLIP_STD),
        Normalize::Imagenet => (IMAGENET_MEAN, IMAGENET_STD),
    };
    let plane = img.width() as usize * img.height() as usize;
    ensure!(out.len() == 3 * plane, "output buffer holds {} values, the image needs {}", out.len(), 3 * plane);
    let luts: [[f32; 256]; 3] = std::array::from_fn(|c| std::array::from_fn(|v| (v as f32 / 255.0 - mean[c]) / std[c]));
    let (r, rest) = out.split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for (i, px) in img.chunks_exact(3).enumerate() {
        r[i] = luts[0][px[0] as usize];
        g[i] = luts[1][px[1] as usize];
        b[i] = luts[2][px[2] as usize];
    }
    Ok(())
}

/// The training transform: RandomResizedCrop(res, scale, ratio 3/4..4/3, bicubic), horizontal flip
/// with p = 0.5 when enabled, RandAugment, CLIP normalisation.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainTransform {
    pub res: usize,
    pub crop_scale: [f64; 2],
    pub hflip: bool,
    pub randaugment: RandAugment,
    pub normalize: Normalize,
}

impl TrainTransform {
    /// The transform `[data]` describes, at the model's input resolution `res`.
    pub fn from_config(data: &DataConfig, res: usize) -> Self {
        TrainTransform {
            res,
            crop_scale: data.crop_scale,
            hflip: data.hflip,
            randaugment: RandAugment { n: data.randaugment_n, m: data.randaugment_m },
            normalize: data.normalize,
        }
    }

    /// Transforms `img` into `out` (CHW f32, length `3*res*res`). All randomness comes from `rng`, which
    /// the loader seeds per (seed, epoch, sample).
    pub fn apply(&self, img: &RgbImage, rng: &mut impl Rng, out: &mut [f32]) -> Result<()> {
        ensure!(self.res > 0, "the image resolution must be positive");
        let (w, h) = (img.width() as usize, img.height() as usize);
        let crop = random_resized_crop_box(w, h, self.crop_scale, CROP_RATIO, rng);
        let mut x = resize_bicubic(img, crop, self.res, self.res);
        if self.hflip && rng.random::<f64>() < 0.5 {
            flip_horizontal(&mut x);
        }
        self.randaugment.apply(&mut x, rng);
        normalize_into(&x, self.normalize, out)
    }
}

/// The evaluation transform: bicubic resize to `res x res` (aspect ratio not kept, as in the reference)
/// and normalisation into `out` (CHW f32, length `3*res*res`).
pub fn test_transform(img: &RgbImage, res: usize, norm: Normalize, out: &mut [f32]) -> Result<()> {
    ensure!(res > 0, "the image resolution must be positive");
    let full = CropBox { x: 0, y: 0, w: img.width() as usize, h: img.height() as usize };
    normalize_into(&resize_bicubic(img, full, res, res), norm, out)
}

/// Throughput of decode + train transform, for `alignfuse bench`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BenchReport {
    pub images: usize,
    pub threads: usize,
    pub seconds: f64,
    pub images_per_sec: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "decode + train transform: {} images in {:.2} s on {} threads = {:.1} images/s",
            self.images, self.seconds, self.threads, self.images_per_sec
        )
    }
}

/// Decodes and train-transforms every image of `paths` `rounds` times on `threads` threads (image `i`
/// on thread `i % threads`, like interleaved data-loader workers) and reports images per second.
pub fn bench_transforms(
    paths: &[PathBuf], transform: &TrainTransform, threads: usize, rounds: usize,
) -> Result<BenchReport> {
    ensure!(!paths.is_empty(), "bench needs images");
    timed(threads, rounds, |t, round| {
        let mut out = vec![0f32; 3 * transform.res * transform.res];
        for (i, path) in paths.iter().enumerate().skip(t).step_by(threads) {
            let mut rng = crate::rng::stream(0, "bench", &round.to_string(), i as u64);
            transform.apply(&load_rgb(path)?, &mut rng, &mut out)?;
        }
        Ok(paths.iter().skip(t).step_by(threads).count())
    })
}

/// Runs `work(thread, round)` (which returns the images it handled) on `threads` threads for each of
/// `rounds` rounds and reports images per second over all of it.
pub fn timed(
    threads: usize, rounds: usize, work: impl Fn(usize, usize) -> Result<usize> + Sync,
) -> Result<BenchReport> {
    ensure!(threads > 0 && rounds > 0, "bench needs threads and rounds (got {threads}, {rounds})");
    let start = Instant::now();
    let work = &work;
    let images = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| scope.spawn(move || (0..rounds).map(|round| work(t, round)).sum::<Result<usize>>()))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().map_err(|_| anyhow::anyhow!("bench thread panicked"))?)
            .sum::<Result<usize>>()
    })?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(BenchReport { images, threads, seconds, images_per_sec: images as f64 / seconds })
}

/// `alignfuse bench data`: [`bench_transforms`] at the config's resolution and augmentation, over the
/// images under `folder`, or else the configured training images (the synthetic set is generated under
/// `work_dir` when no data is configured), on `data.num_workers` threads, two rounds.
pub fn bench_images(mut cfg: Config, folder: Option<&Path>, work_dir: &Path) -> Result<BenchReport> {
    let paths = match folder {
        Some(dir) => image_files(dir)?,
        None => {
            super::resolve(&mut cfg, work_dir)?;
            super::train_set(&cfg)?.entries.into_iter().map(|e| e.image).collect()
        }
    };
    let transform = TrainTransform::from_config(&cfg.data, cfg.model.vision.image_res);
    bench_transforms(&paths, &transform, cfg.data.num_workers, 2)
}

/// PNG and JPEG files under `dir`, recursively, in sorted order.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let p = entry?.path();
            let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            if p.is_dir() {
                stack.push(p);
            } else if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
                out.push(p);
            }
        }
    }
    out.sort();
    ensure!(!out.is_empty(), "no PNG or JPEG images under {}", dir.display());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::image::{Rgba, RgbaImage};

    /// The test pattern the PIL reference values below were computed from (7x5 unless stated).
    fn pattern_of(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            ::image::Rgb(std::array::from_fn(|c| ((x * 37 + y * 91 + c as u32 * 53 + x * y * 13) % 256) as u8))
        })
    }

    fn pattern() -> RgbImage {
        pattern_of(7, 5)
    }

    fn full(img: &RgbImage) -> CropBox {
        CropBox { x: 0, y: 0, w: img.width() as usize, h: img.height() as usize }
    }

    fn rng(i: u64) -> rand_chacha::ChaCha8Rng {
        crate::rng::stream(7, "image-test", "", i)
    }

    /// Expected bytes from Pillow 13: `Image.fromarray(pattern).resize(size, Image.BICUBIC)` and
    /// `.crop((1, 2, 6, 5)).resize((4, 4), Image.BICUBIC)`. (Checked beyond these on 640 random
    /// crops and sizes of the Tux Paint stamps: identical bytes.)
    #[test]
    fn bicubic_matches_pil_exactly() {
        let img = pattern();
        let down = [
            57, 114, 164, 131, 150, 148, 126, 151, 175, 162, 142, 126, 155, 144, 116, 148, 135, 127, 148, 142, 116,
            139, 98, 152, 103, 160, 142, 127, 149, 112, 143, 84, 142, 130, 119, 172,
        ];
        assert_eq!(resize_bicubic(&img, full(&img), 4, 3).as_raw()[..], down);
        let h_only = [
            27, 80, 134, 111, 172, 213, 195, 150, 91, 136, 189, 187, 167, 112, 95, 90, 143, 204, 182, 123, 87, 127,
            156, 147, 160, 101, 99, 81, 134, 132, 171, 124, 107, 153, 108, 169, 127, 189, 129, 119, 101, 143, 111, 109,
            163,
        ];
        assert_eq!(resize_bicubic(&img, full(&img), 3, 5).as_raw()[..], h_only);
        let v_only = [
            79, 132, 123, 127, 118, 179, 122, 175, 114, 170, 109, 162, 104, 165, 157, 160, 152, 116, 147, 104, 157, 91,
            144, 135, 169, 160, 124, 96, 149, 88, 174, 113, 166, 138, 102, 94, 127, 119, 180, 144, 98, 151,
        ];
        assert_eq!(resize_bicubic(&img, full(&img), 7, 2).as_raw()[..], v_only);
        let crop = [
            210, 45, 101, 59, 127, 204, 156, 223, 102, 238, 72, 60, 137, 122, 147, 168, 144, 87, 140, 129, 130, 163,
            153, 182, 117, 195, 127, 163, 141, 81, 153, 65, 140, 94, 149, 206, 164, 216, 54, 46, 121, 191, 186, 72,
            124, 75, 63, 116,
        ];
        assert_eq!(resize_bicubic(&img, CropBox { x: 1, y: 2, w: 5, h: 3 }, 4, 4).as_raw()[..], crop);
        let up = resize_bicubic(&img, full(&img), 11, 9);
        assert_eq!(up.as_raw()[..12], [0, 43, 96, 5, 58, 110, 31, 84, 139, 55, 106, 177]);
        assert_eq!(up.as_raw()[up.len() - 6..], [75, 156, 209, 129, 204, 255]);
        assert_eq!(resize_bicubic(&img, full(&img), 7, 5), img, "same size is a copy");
        // 5x12 -> 4x5 loses far more height than width: Pillow 13 resizes vertically first.
        let tall = pattern_of(5, 12);
        let want = [
            85, 124, 140, 122, 144, 154, 152, 137, 140, 118, 151, 163, 115, 153, 125, 135, 157, 111, 150, 126, 135,
            143, 109, 114, 123, 171, 141, 103, 148, 178, 145, 118, 174, 180, 88, 153, 140, 86, 148, 173, 90, 151, 146,
            112, 166, 96, 126, 132, 148, 117, 147, 134, 107, 99, 88, 98, 161, 99, 161, 90,
        ];
        assert_eq!(resize_bicubic(&tall, full(&tall), 4, 5).as_raw()[..], want);
    }

    /// Expected bytes from `PIL.ImageOps.equalize` / `autocontrast` on the same pattern (the reference's
    /// OpenCV versions are written to give PIL's output).
    #[test]
    fn equalize_and_autocontrast_match_pil() {
        let mut img = pattern();
        equalize(&mut img);
        assert_eq!(img.as_raw()[..15], [0, 53, 106, 37, 90, 143, 74, 127, 180, 111, 164, 217, 148, 201, 254]);
        assert_eq!(img.as_raw()[90..], [30, 83, 136, 119, 172, 225, 208, 5, 58, 41, 94, 147, 130, 183, 236]);
        let mut img = pattern();
        autocontrast(&mut img);
        assert_eq!(img.as_raw()[..15], [0, 49, 94, 38, 88, 134, 77, 126, 174, 115, 165, 214, 154, 204, 254]);
        assert_eq!(img.as_raw()[90..], [31, 81, 126, 123, 173, 223, 216, 0, 42, 42, 92, 138, 135, 185, 235]);
        let mut flat = RgbImage::from_pixel(4, 4, ::image::Rgb([9, 9, 9]));
        equalize(&mut flat);
        autocontrast(&mut flat);
        assert!(flat.pixels().all(|p| p.0 == [9, 9, 9]), "single-valued channels are left alone");
    }

    /// Reference bytes from OpenCV 5 running the reference's own calls on the 7x5 pattern:
    /// `cv2.warpAffine(img, M, (7, 5), borderValue=(128,)*3)` with M = [[1, .21, 0], [0, 1, 0]] (ShearX),
    /// [[1, 0, 0], [-.21, 1, 0]] (ShearY), `getRotationMatrix2D((3.5, 2.5), 21, 1)`, and the sharpness
    /// blend at factor 1.36 (filter2D with [1 1 1; 1 5 1; 1 1 1]/13). OpenCV interpolates in fixed
    /// point (1/32 pixel), so values may differ by 1.
    const CV_SHEAR_X: [u8; 105] = [
        0, 53, 106, 37, 90, 143, 74, 127, 180, 111, 164, 217, 148, 201, 254, 185, 238, 35, 222, 19, 72, 99, 141, 183,
        130, 184, 236, 180, 234, 84, 230, 81, 80, 78, 78, 130, 74, 128, 180, 124, 178, 230, 159, 190, 72, 219, 123, 69,
        133, 79, 132, 89, 142, 195, 152, 205, 109, 215, 119, 65, 129, 75, 128, 87, 107, 126, 45, 98, 151, 121, 174,
        132, 197, 155, 47, 178, 70, 123, 93, 146, 199, 169, 127, 180, 125, 133, 142, 122, 175, 187, 170, 223, 61, 44,
        97, 150, 133, 145, 198, 181, 19, 72, 55, 108, 161,
    ];
    const CV_SHEAR_Y: [u8; 105] = [
        0, 53, 106, 59, 112, 165, 123, 176, 122, 193, 85, 138, 53, 106, 159, 93, 133, 186, 112, 165, 218, 91, 144, 197,
        163, 162, 215, 133, 186, 90, 162, 120, 173, 155, 208, 46, 236, 46, 99, 92, 78, 131, 182, 235, 32, 213, 64, 117,
        101, 154, 100, 197, 89, 142, 83, 136, 148, 136, 189, 242, 194, 58, 111, 17, 70, 123, 115, 168, 167, 111, 164,
        68, 166, 124, 177, 185, 23, 76, 45, 96, 146, 129, 169, 208, 108, 161, 214, 183, 224, 64, 71, 102, 133, 125,
        144, 164, 141, 108, 117, 128, 128, 128, 128, 128, 128,
    ];
    const CV_ROTATE: [u8; 105] = [
        128, 128, 128, 114, 128, 143, 117, 151, 184, 145, 197, 250, 145, 198, 106, 151, 144, 182, 128, 143, 157, 44,
        89, 133, 86, 139, 155, 168, 129, 130, 124, 76, 129, 102, 119, 137, 138, 100, 153, 78, 111, 145, 90, 143, 196,
        161, 191, 168, 138, 155, 115, 138, 162, 169, 164, 187, 68, 181, 121, 174, 204, 22, 74, 159, 202, 83, 233, 52,
        102, 108, 150, 102, 207, 88, 111, 116, 93, 146, 104, 121, 174, 112, 142, 195, 91, 128, 102, 65, 118, 170, 124,
        177, 98, 111, 129, 146, 155, 103, 151, 139, 77, 107, 116, 126, 137,
    ];
    const CV_SHARPEN: [u8; 105] = [
        0, 53, 106, 37, 90, 143, 74, 127, 180, 111, 164, 217, 148, 201, 254, 185, 238, 35, 222, 19, 72, 91, 144, 197,
        148, 208, 255, 205, 255, 12, 255, 9, 76, 6, 73, 141, 70, 138, 205, 135, 188, 241, 182, 235, 32, 255, 13, 87,
        23, 97, 165, 107, 175, 249, 185, 255, 0, 255, 16, 76, 48, 101, 154, 17, 70, 123, 85, 146, 220, 176, 243, 0,
        255, 20, 87, 43, 118, 178, 141, 215, 255, 217, 14, 67, 108, 161, 214, 197, 250, 47, 30, 83, 136, 119, 172, 225,
        208, 5, 58, 41, 94, 147, 130, 183, 236,
    ];

    #[test]
    fn randaugment_ops_match_opencv_reference() {
        let close = |got: &RgbImage, want: &[u8; 105], what: &str| {
            for (i, (&g, &w)) in got.as_raw().iter().zip(want).enumerate() {
                assert!(g.abs_diff(w) <= 1, "{what}: byte {i} is {g}, OpenCV gives {w}");
            }
        };
        let img = pattern();
        close(&warp_affine(&img, [1.0, -0.21, 0.0, 0.0, 1.0, 0.0]), &CV_SHEAR_X, "ShearX");
        close(&warp_affine(&img, [1.0, 0.0, 0.0, 0.21, 1.0, 0.0]), &CV_SHEAR_Y, "ShearY");
        close(&rotate(&img, 21.0), &CV_ROTATE, "Rotate");
        let mut sharp = img.clone();
        sharpness(&mut sharp, 1.36);
        close(&sharp, &CV_SHARPEN, "Sharpness");
    }

    #[test]
    fn point_ops() {
        let mut img = RgbImage::from_fn(3, 1, |x, _| ::image::Rgb([[100, 200, 0][x as usize]; 3]));
        brightness(&mut img, 0.7 * 1.8 + 0.1);
        assert_eq!(img.as_raw()[..], [136, 136, 136, 255, 255, 255, 0, 0, 0]);
        let mut flat = RgbImage::from_pixel(5, 5, ::image::Rgb([77, 77, 77]));
        sharpness(&mut flat, 1.9);
        assert!(flat.pixels().all(|p| p.0 == [77; 3]), "a flat image has nothing to sharpen");
        let mut dot = RgbImage::from_pixel(5, 5, ::image::Rgb([100, 100, 100]));
        dot.put_pixel(2, 2, ::image::Rgb([200, 200, 200]));
        sharpness(&mut dot, 1.36);
        // smooth = round((5*200 + 8*100)/13) = 138; 138 + 1.36*(200-138) = 222.32
        assert_eq!(dot.get_pixel(2, 2).0, [222; 3]);
        // neighbour: smooth = round((5*100 + 7*100 + 200)/13) = 108; 108 + 1.36*(100-108) = 97.12
        assert_eq!(dot.get_pixel(1, 1).0, [97; 3]);
        assert_eq!(dot.get_pixel(0, 0).0, [100; 3], "border kept");
    }

    #[test]
    fn geometric_ops_follow_opencv_conventions() {
        let img = pattern();
        let shifted = warp_affine(&img, [1.0, 0.0, 3.0, 0.0, 1.0, 0.0]);
        assert_eq!(shifted.get_pixel(0, 1), img.get_pixel(3, 1), "positive offset moves content left");
        assert_eq!(shifted.get_pixel(4, 1).0, FILL);
        let sheared = warp_affine(&img, [1.0, -0.3, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(sheared.get_pixel(5, 0), img.get_pixel(5, 0), "row 0 is the shear's fixed line");
        // 90 degrees about (W/2, H/2) = (4, 4) on 8x8: a dot right of centre ends up above it.
        let mut sq = RgbImage::from_pixel(8, 8, ::image::Rgb([0, 0, 0]));
        sq.put_pixel(7, 4, ::image::Rgb([255, 0, 0]));
        let turned = rotate(&sq, 90.0);
        assert_eq!(turned.get_pixel(4, 1).0, [255, 0, 0]);
        assert_eq!(turned.get_pixel(0, 0).0, FILL, "OpenCV's centre W/2 leaves row 0 uncovered");
        let mut flipped = img.clone();
        flip_horizontal(&mut flipped);
        assert_eq!(flipped.get_pixel(0, 2), img.get_pixel(6, 2));
        flip_horizontal(&mut flipped);
        assert_eq!(flipped, img);
    }

    #[test]
    fn crop_box_follows_torchvision() {
        for i in 0..200 {
            let (w, h) = (40 + (i as usize * 7) % 60, 30 + (i as usize * 13) % 50);
            let b = random_resized_crop_box(w, h, [0.2, 1.0], CROP_RATIO, &mut rng(i));
            assert!(b.w >= 1 && b.h >= 1 && b.x + b.w <= w && b.y + b.h <= h, "{b:?} in {w}x{h}");
        }
        // No try can fit a 1000x10 strip: centre crop at the widest allowed ratio.
        let b = random_resized_crop_box(1000, 10, [0.2, 1.0], CROP_RATIO, &mut rng(0));
        assert_eq!(b, CropBox { x: 493, y: 0, w: 13, h: 10 });
        let b = random_resized_crop_box(10, 1000, [0.5, 1.0], CROP_RATIO, &mut rng(0));
        assert_eq!(b, CropBox { x: 0, y: 493, w: 10, h: 13 });
        let b = random_resized_crop_box(64, 48, [1.0, 1.0], [4.0 / 3.0, 4.0 / 3.0], &mut rng(0));
        assert_eq!(b, CropBox { x: 0, y: 0, w: 64, h: 48 }, "a fixed full-area crop");
    }

    #[test]
    fn transforms_are_deterministic_and_normalised() {
        let img = pattern();
        let t = TrainTransform {
            res: 6,
            crop_scale: [0.2, 1.0],
            hflip: true,
            randaugment: RandAugment { n: 2, m: 7.0 },
            normalize: Normalize::Clip,
        };
        let mut a = vec![0f32; 3 * 36];
        let mut b = vec![0f32; 3 * 36];
        t.apply(&img, &mut rng(1), &mut a).unwrap();
        t.apply(&img, &mut rng(1), &mut b).unwrap();
        assert_eq!(a, b);
        let differs = (2..20).any(|i| {
            t.apply(&img, &mut rng(i), &mut b).unwrap();
            a != b
        });
        assert!(differs);
        let white = RgbImage::from_pixel(9, 4, ::image::Rgb([255, 255, 255]));
        test_transform(&white, 3, Normalize::Clip, &mut a[..27]).unwrap();
        for c in 0..3 {
            let want = (1.0 - CLIP_MEAN[c]) / CLIP_STD[c];
            assert!(a[c * 9..c * 9 + 9].iter().all(|&v| (v - want).abs() < 1e-6));
        }
        assert!(test_transform(&white, 3, Normalize::Clip, &mut a[..26]).is_err(), "wrong buffer size is an error");
    }

    #[test]
    fn randaugment_applies_about_half_the_ops() {
        let ra = RandAugment { n: 1, m: 7.0 };
        let base = pattern();
        let changed = (0..400)
            .filter(|&i| {
                let mut img = base.clone();
                ra.apply(&mut img, &mut rng(i));
                img != base
            })
            .count();
        // p = 0.5 per op times 9/10 non-identity ops; equalize/autocontrast always change this pattern.
        assert!((130..230).contains(&changed), "{changed} of 400 changed");
    }

    #[test]
    fn loads_with_alpha_on_white_and_names_bad_files() {
        let dir = std::env::temp_dir().join(format!("alignfuse-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut rgba = RgbaImage::from_pixel(2, 1, Rgba([10, 20, 30, 0]));
        rgba.put_pixel(1, 0, Rgba([200, 0, 0, 255]));
        let path = dir.join("a.png");
        rgba.save(&path).unwrap();
        let rgb = load_rgb(&path).unwrap();
        assert_eq!(rgb.as_raw()[..], [255, 255, 255, 200, 0, 0]);
        let half = dir.join("half.png");
        RgbaImage::from_pixel(1, 1, Rgba([0, 0, 0, 128])).save(&half).unwrap();
        assert_eq!(load_rgb(&half).unwrap().as_raw()[..], [127, 127, 127]);
        let bad = dir.join("bad.jpg");
        std::fs::write(&bad, b"not an image").unwrap();
        let err = format!("{:#}", load_rgb(&bad).unwrap_err());
        assert!(err.contains("bad.jpg"), "{err}");
        let err = format!("{:#}", load_rgb(&dir.join("gone.png")).unwrap_err());
        assert!(err.contains("gone.png"), "{err}");
        let t = TrainTransform {
            res: 4,
            crop_scale: [0.5, 1.0],
            hflip: false,
            randaugment: RandAugment { n: 2, m: 7.0 },
            normalize: Normalize::Clip,
        };
        let report = bench_transforms(&[path.clone(), half], &t, 2, 2).unwrap();
        assert_eq!(report.images, 4);
        assert!(bench_transforms(&[bad], &t, 2, 1).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
