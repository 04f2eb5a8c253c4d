//! Image-text matching with hard negatives (REFERENCE.md, ITM).

use anyhow::bail;
use candle_core::{DType, Result, Tensor, D};
use rand::Rng;

/// For each text the row of its negative image, and for each image the row of its negative text
/// (`u32 [B]` on the model's device).
#[derive(Debug, Clone)]
pub struct ItmNegatives {
    pub image_for_text: Tensor,
    pub text_for_image: Tensor,
    /// Ordered pairs (i, j) of different images excluded because their captions are identical: j's image
    /// is also described by i's caption, so it is no negative.
    pub same_caption: usize,
}

/// Which pairs may be each other's negatives, row-major [B, B], and how many were excluded for an
/// identical caption. Excluded: the diagonal, every pair of the same image id, and every pair whose cleaned
/// captions are identical (`captions`: equal values = equal captions). A row whose only other pairs share
/// its caption falls back to the image rule; a row without another image is an error.
pub fn allowed(ids: &[i64], captions: &[usize]) -> anyhow::Result<(Vec<bool>, usize)> {
    let b = ids.len();
    if b < 2 {
        bail!("ITM needs at least 2 image-text pairs per batch to draw negatives, got {b}");
    }
    if captions.len() != b {
        bail!("ITM needs a caption group for each of the {b} pairs, got {}", captions.len());
    }
    let other_image = |i: usize, j: usize| j != i && ids[j] != ids[i];
    let mut allowed = vec![false; b * b];
    let mut same_caption = 0;
    for i in 0..b {
        if !(0..b).any(|j| other_image(i, j)) {
            bail!("ITM: every pair in the batch shows image id {} (row {i}); no negative exists", ids[i]);
        }
        same_caption += (0..b).filter(|&j| other_image(i, j) && captions[i] == captions[j]).count();
        let distinct = (0..b).any(|j| other_image(i, j) && captions[j] != captions[i]);
        for j in 0..b {
            allowed[i * b + j] = other_image(i, j) && (!distinct || captions[j] != captions[i]);
        }
    }
    Ok((allowed, same_caption))
}

/// One negative per row of `sims` ([B, B] logits) among the `allowed` columns, drawn on the device
/// without reading it: the argmax of the row's logits (zeros for a row not in `hard_rows`) plus the
/// Gumbel noise `gumbel` [B, B], which samples the softmax over the allowed columns (uniformly for a
/// random row), as the reference's `torch.multinomial` over its softmax weights. The reference masks after
/// the softmax, which crashes on small batches; masking the logits here cannot. NaN logits (a diverged
/// step, which the trainer drops) count as 0.
pub fn draw(sims: &Tensor, allowed: &[bool], hard_rows: &[bool], gumbel: &Tensor) -> Result<Tensor> {
    let (b, dev) = (hard_rows.len(), sims.device());
    let sims = sims.detach().to_dtype(DType::F32)?;
    let sims = sims.eq(&sims)?.where_cond(&sims, &sims.zeros_like()?)?;
    let hard: Vec<f32> = hard_rows.iter().map(|&h| if h { 1.0 } else { 0.0 }).collect();
    let allowed = Tensor::from_vec(allowed.iter().map(|&a| u8::from(a)).collect::<Vec<_>>(), (b, b), dev)?;
    let noise = allowed.where_cond(gumbel, &Tensor::full(f32::NEG_INFINITY, (b, b), dev)?)?;
    let logits = sims.broadcast_mul(&Tensor::from_vec(hard, (b, 1), dev)?)?;
    (logits + noise)?.argmax(D::Minus1)
}

/// Gumbel(0, 1) noise [B, B]: from `rng` on the CPU (bit-reproducible there), from the device's generator
/// on a GPU (nothing drawn on the host and uploaded).
fn gumbel(b: usize, rng: &mut impl Rng, device: &candle_core::Device) -> Result<Tensor> {
    if device.is_cpu() {
        let g: Vec<f32> = (0..b * b).map(|_| -(-rng.random::<f64>().max(f64::MIN_POSITIVE).ln()).ln() as f32).collect();
        return Tensor::from_vec(g, (b, b), device);
    }
    Tensor::rand(0f32, 1f32, (b, b), device)?.clamp(f32::MIN_POSITIVE, 1f32)?.log()?.neg()?.log()?.neg()
}

/// Draws one negative image per text (from rows of `sim_t2i`) and then one negative text per image (rows
/// of `sim_i2t`), the reference's order, both [B, B] in-batch ITC logits (divided by temp). Each row is
/// hard (softmax over its logits) with probability `hard` (1: ALBEF, 0: random negatives), else uniform
/// over the allowed pairs ([`allowed`]); the randomness comes from `rng`, the draw happens on the device.
pub fn sample_negatives(
    sim_i2t: &Tensor, sim_t2i: &Tensor, ids: &[i64], captions: &[usize], hard: f64, rng: &mut impl Rng,
) -> anyhow::Result<ItmNegatives> {
    let b = ids.len();
    let (allowed, same_caption) = allowed(ids, captions)?;
    for sims in [sim_i2t, sim_t2i] {
        if sims.dims() != [b, b] {
            bail!("ITM similarities must be {b} x {b}, got {:?}", sims.dims());
        }
    }
    let mut negatives = |sims: &Tensor| -> Result<Tensor> {
        let hard_rows: Vec<bool> = (0..b).map(|_| hard >= 1.0 || (hard > 0.0 && rng.random::<f64>() < hard)).collect();
        draw(sims, &allowed, &hard_rows, &gumbel(b, rng, sims.device())?)
    };
    let image_for_text = negatives(sim_t2i)?;
    let text_for_image = negatives(sim_i2t)?;
    Ok(ItmNegatives { image_for_text, text_for_image, same_caption })
}

/// The in-batch ITC logits hard negatives are drawn from, [B, B] each: `sim_i2t` online image features
/// against momentum text features, `sim_t2i` the converse, divided by `temp` (a scalar tensor), no
/// gradient.
pub fn similarities(
    image_feat: &Tensor, text_feat: &Tensor, image_feat_m: &Tensor, text_feat_m: &Tensor, temp: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let sim = |q: &Tensor, k: &Tensor| q.detach().matmul(&k.t()?)?.broadcast_div(&temp.detach());
    Ok((sim(image_feat, text_feat_m)?, sim(text_feat, image_feat_m)?))
}

/// The 3B pairs ITM scores, in the reference's order: the B positives, (text b, negative image of text
/// b), (negative text of image b, image b); labels 1 for the positives, 0 for the rest. Gradients flow
/// into the negatives' embeddings.
pub struct ItmPairs {
    pub text_embeds: Tensor,
    pub mask: Tensor,
    pub image_embeds: Tensor,
    pub labels: Tensor,
}

pub fn pairs(text_embeds: &Tensor, text_mask: &Tensor, image_embeds: &Tensor, neg: &ItmNegatives) -> Result<ItmPairs> {
    let b = text_embeds.dim(0)?;
    let dev = text_embeds.device();
    let (img_neg, txt_neg) = (&neg.image_for_text, &neg.text_for_image);
    let labels: Vec<u32> = (0..3 * b).map(|i| u32::from(i < b)).collect();
    Ok(ItmPairs {
        text_embeds: Tensor::cat(&[text_embeds, text_embeds, &text_embeds.index_select(txt_neg, 0)?], 0)?,
        mask: Tensor::cat(&[text_mask, text_mask, &text_mask.index_select(txt_neg, 0)?], 0)?,
        image_embeds: Tensor::cat(&[image_embeds, &image_embeds.index_select(img_neg, 0)?, image_embeds], 0)?,
        labels: Tensor::from_vec(labels, 3 * b, dev)?,
    })
}

/// Cross-entropy of ITM logits \[N, 2\] against labels \[N\] (1 = match), and the fraction of pairs the head
/// classifies correctly (a scalar tensor, read only when logged).
pub fn loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let loss = candle_nn::loss::cross_entropy(logits, labels)?;
    let accuracy = logits.argmax(D::Minus1)?.eq(labels)?.to_dtype(DType::F32)?.mean_all()?;
    Ok((loss, accuracy))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// [`sample_negatives`] on row-major B x B logits (the same for both directions), read back.
    fn sample(
        sims: &[f32], ids: &[i64], captions: &[usize], hard: f64, rng: &mut impl Rng,
    ) -> anyhow::Result<(Vec<usize>, Vec<usize>, usize)> {
        let b = ids.len();
        let t = Tensor::from_slice(sims, (b, b), &Device::Cpu)?;
        let neg = sample_negatives(&t, &t, ids, captions, hard, rng)?;
        let read =
            |t: &Tensor| -> Result<Vec<usize>> { Ok(t.to_vec1::<u32>()?.into_iter().map(|i| i as usize).collect()) };
        Ok((read(&neg.image_for_text)?, read(&neg.text_for_image)?, neg.same_caption))
    }

    #[test]
    fn negatives_never_diagonal_or_same_image() {
        for b in 2..12usize {
            for seed in 0..200u64 {
                let mut rng = crate::rng::stream(seed, "test", "neg", b as u64);
                // Ids with repeats: image k shown by captions 2k and 2k+1 when b is large enough.
                let ids: Vec<i64> = (0..b).map(|i| if b > 3 { (i / 2) as i64 } else { i as i64 }).collect();
                let mut sims: Vec<f32> = (0..b * b).map(|_| rng.random::<f32>() * 20.0 - 10.0).collect();
                sims[0] = f32::NAN;
                let mode = [1.0, 0.0, 0.5][seed as usize % 3];
                let captions: Vec<usize> = (0..b).collect();
                let (image_for_text, text_for_image, _) = sample(&sims, &ids, &captions, mode, &mut rng).unwrap();
                for i in 0..b {
                    for j in [image_for_text[i], text_for_image[i]] {
                        assert!(j != i && ids[j] != ids[i], "b={b} seed={seed} row {i} drew {j}");
                    }
                }
            }
        }
    }

    /// Hard rows sample the softmax over the allowed logits, random rows the allowed columns uniformly.
    #[test]
    fn negatives_follow_the_softmax_or_are_uniform() {
        // Row 0 prefers column 2 (logit 2 vs 0): p = e^2 / (1 + e^2) ~= 0.881.
        let sims = [0., 0., 2., 0., 0., 0., 0., 0., 0.];
        let mut rng = crate::rng::stream(1, "test", "hard", 0);
        let n = 20000;
        for (hard, want) in [(1.0, 0.8808), (0.0, 0.5)] {
            let hits =
                (0..n).filter(|_| sample(&sims, &[0, 1, 2], &[0, 1, 2], hard, &mut rng).unwrap().1[0] == 2).count();
            let p = hits as f64 / n as f64;
            assert!((p - want).abs() < 0.01, "hard {hard}: {p}");
        }
    }

    #[test]
    fn small_or_single_image_batches_are_clear_errors() {
        let mut rng = crate::rng::stream(0, "t", "", 0);
        let e = sample(&[0.], &[3], &[0], 1.0, &mut rng).unwrap_err();
        assert!(e.to_string().contains("at least 2"));
        let e = sample(&[0.; 4], &[5, 5], &[0, 1], 1.0, &mut rng).unwrap_err();
        assert!(e.to_string().contains("image id 5"));
    }

    /// Two images captioned "a flower.": neither is the other's negative, however similar; the count says
    /// how many pairs were excluded. With nothing else in the batch the image rule is the fallback.
    #[test]
    fn identical_captions_are_no_negatives() {
        let mut rng = crate::rng::stream(2, "test", "captions", 0);
        let mut sims = [0f32; 16];
        sims[1] = 30.0; // row 0 strongly prefers column 1, its caption twin
        sims[4] = 30.0;
        for _ in 0..500 {
            let (image_for_text, text_for_image, same_caption) =
                sample(&sims, &[0, 1, 2, 3], &[7, 7, 8, 9], 1.0, &mut rng).unwrap();
            assert_eq!(same_caption, 2);
            for (i, j) in [(0, 1), (1, 0)] {
                assert_ne!(image_for_text[i], j);
                assert_ne!(text_for_image[i], j);
            }
        }
        let (image_for_text, _, same_caption) = sample(&[0.; 4], &[0, 1], &[7, 7], 0.0, &mut rng).unwrap();
        assert_eq!((image_for_text, same_caption), (vec![1, 0], 2));
    }
}
