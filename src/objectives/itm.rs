//! Image-text matching with hard negatives (REFERENCE.md, ITM).

use anyhow::bail;
use candle_core::{DType, Result, Tensor, D};
use rand::Rng;

/// For each text the index of its negative image, and for each image the index of its negative text.
#[derive(Debug, Clone, PartialEq)]
pub struct ItmNegatives {
    pub image_for_text: Vec<usize>,
    pub text_for_image: Vec<usize>,
    /// Ordered pairs (i, j) of different images excluded because their captions are identical: j's image
    /// is also described by i's caption, so it is no negative.
    pub same_caption: usize,
}

/// Draws one negative image per text (from rows of `sim_t2i`) and then one negative text per image (rows
/// of `sim_i2t`), the reference's order. Both are the in-batch [B, B] ITC logits (already divided by
/// temp), row-major. Excluded: the diagonal, every pair of the same image id, and every pair whose
/// cleaned captions are identical (`captions`: equal values = equal captions), masked by -inf BEFORE
/// the softmax (the reference zeroes same-image pairs after it, which crashes on small batches). A row
/// whose only other pairs share its caption falls back to the image rule. A hard row draws from the
/// softmax over the row, a random one uniformly over the same allowed set; each row is hard with
/// probability `hard` (1: ALBEF, 0: random negatives).
pub fn sample_negatives(
    sim_i2t: &[f32], sim_t2i: &[f32], ids: &[i64], captions: &[usize], hard: f64, rng: &mut impl Rng,
) -> anyhow::Result<ItmNegatives> {
    let b = ids.len();
    if b < 2 {
        bail!("ITM needs at least 2 image-text pairs per batch to draw negatives, got {b}");
    }
    if sim_i2t.len() != b * b || sim_t2i.len() != b * b || captions.len() != b {
        bail!("ITM similarity rows must be {b} x {b}, with {b} caption groups");
    }
    let other_image = |i: usize, j: usize| j != i && ids[j] != ids[i];
    let same_caption = (0..b)
        .flat_map(|i| (0..b).map(move |j| (i, j)))
        .filter(|&(i, j)| other_image(i, j) && captions[i] == captions[j])
        .count();
    let mut draw = |sims: &[f32]| -> anyhow::Result<Vec<usize>> {
        (0..b)
            .map(|i| {
                if !(0..b).any(|j| other_image(i, j)) {
                    bail!("ITM: every pair in the batch shows image id {} (row {i}); no negative exists", ids[i]);
                }
                let distinct = (0..b).any(|j| other_image(i, j) && captions[j] != captions[i]);
                let allowed = |j: usize| other_image(i, j) && (!distinct || captions[j] != captions[i]);
                let row = &sims[i * b..(i + 1) * b];
                let max = (0..b).filter(|&j| allowed(j)).map(|j| row[j]).fold(f32::NEG_INFINITY, f32::max);
                // Non-finite logits (a diverged step, caught by the trainer's loss check) draw uniformly.
                // The extra draw happens only for a mixture, so pure hard or random rows keep their stream.
                let hard_row = hard >= 1.0 || (hard > 0.0 && rng.random::<f64>() < hard);
                let hard = hard_row && max.is_finite() && (0..b).all(|j| !allowed(j) || row[j].is_finite());
                let w: Vec<f64> = (0..b)
                    .map(|j| match (allowed(j), hard) {
                        (false, _) => 0.0,
                        (true, false) => 1.0,
                        (true, true) => ((row[j] - max) as f64).exp(),
                    })
                    .collect();
                let mut u = rng.random::<f64>() * w.iter().sum::<f64>();
                let last = (0..b).rev().find(|&j| w[j] > 0.0).expect("a positive weight exists");
                Ok((0..b)
                    .find(|&j| {
                        u -= w[j];
                        w[j] > 0.0 && u < 0.0
                    })
                    .unwrap_or(last))
            })
            .collect()
    };
    let image_for_text = draw(sim_t2i)?;
    let text_for_image = draw(sim_i2t)?;
    Ok(ItmNegatives { image_for_text, text_for_image, same_caption })
}

/// The in-batch ITC logits hard negatives are drawn from, row-major [B, B] each: `sim_i2t` online image
/// features against momentum text features, `sim_t2i` the converse, divided by `temp`, no gradient.
pub fn similarities(
    image_feat: &Tensor, text_feat: &Tensor, image_feat_m: &Tensor, text_feat_m: &Tensor, temp: f64,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let sim = |q: &Tensor, k: &Tensor| -> Result<Vec<f32>> {
        (q.detach().matmul(&k.t()?)? / temp)?.flatten_all()?.to_dtype(DType::F32)?.to_vec1()
    };
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
    let idx = |v: &[usize]| Tensor::from_vec(v.iter().map(|&i| i as u32).collect::<Vec<_>>(), v.len(), dev);
    let (img_neg, txt_neg) = (idx(&neg.image_for_text)?, idx(&neg.text_for_image)?);
    let labels: Vec<u32> = (0..3 * b).map(|i| u32::from(i < b)).collect();
    Ok(ItmPairs {
        text_embeds: Tensor::cat(&[text_embeds, text_embeds, &text_embeds.index_select(&txt_neg, 0)?], 0)?,
        mask: Tensor::cat(&[text_mask, text_mask, &text_mask.index_select(&txt_neg, 0)?], 0)?,
        image_embeds: Tensor::cat(&[image_embeds, &image_embeds.index_select(&img_neg, 0)?, image_embeds], 0)?,
        labels: Tensor::from_vec(labels, 3 * b, dev)?,
    })
}

/// Cross-entropy of ITM logits [N, 2] against labels [N] (1 = match), and the fraction of pairs the head
/// classifies correctly (a scalar tensor, read only when logged).
pub fn loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let loss = candle_nn::loss::cross_entropy(logits, labels)?;
    let accuracy = logits.argmax(D::Minus1)?.eq(labels)?.to_dtype(DType::F32)?.mean_all()?;
    Ok((loss, accuracy))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negatives_never_diagonal_or_same_image() {
        for b in 2..12usize {
            for seed in 0..200u64 {
                let mut rng = crate::rng::stream(seed, "test", "neg", b as u64);
                // Ids with repeats: image k shown by captions 2k and 2k+1 when b is large enough.
                let ids: Vec<i64> = (0..b).map(|i| if b > 3 { (i / 2) as i64 } else { i as i64 }).collect();
                let sims: Vec<f32> = (0..b * b).map(|_| rng.random::<f32>() * 20.0 - 10.0).collect();
                let mode = if seed % 2 == 0 { 1.0 } else { 0.0 };
                let captions: Vec<usize> = (0..b).collect();
                let neg = sample_negatives(&sims, &sims, &ids, &captions, mode, &mut rng).unwrap();
                for i in 0..b {
                    for j in [neg.image_for_text[i], neg.text_for_image[i]] {
                        assert!(j != i && ids[j] != ids[i], "b={b} seed={seed} row {i} drew {j}");
                    }
                }
            }
        }
    }

    #[test]
    fn hard_negatives_follow_the_softmax() {
        // Row 0 prefers column 2 (logit 2 vs 0): p = e^2 / (1 + e^2) ~= 0.881.
        let sims = [0., 0., 2., 0., 0., 0., 0., 0., 0.];
        let mut rng = crate::rng::stream(1, "test", "hard", 0);
        let n = 20000;
        let hits = (0..n)
            .filter(|_| {
                let neg = sample_negatives(&sims, &sims, &[0, 1, 2], &[0, 1, 2], 1.0, &mut rng).unwrap();
                neg.text_for_image[0] == 2
            })
            .count();
        let p = hits as f64 / n as f64;
        assert!((p - 0.8808).abs() < 0.01, "{p}");
    }

    #[test]
    fn small_or_single_image_batches_are_clear_errors() {
        let mut rng = crate::rng::stream(0, "t", "", 0);
        let e = sample_negatives(&[0.], &[0.], &[3], &[0], 1.0, &mut rng).unwrap_err();
        assert!(e.to_string().contains("at least 2"));
        let e = sample_negatives(&[0.; 4], &[0.; 4], &[5, 5], &[0, 1], 1.0, &mut rng).unwrap_err();
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
            let neg = sample_negatives(&sims, &sims, &[0, 1, 2, 3], &[7, 7, 8, 9], 1.0, &mut rng).unwrap();
            assert_eq!(neg.same_caption, 2);
            for (i, j) in [(0, 1), (1, 0)] {
                assert_ne!(neg.image_for_text[i], j);
                assert_ne!(neg.text_for_image[i], j);
            }
        }
        let neg = sample_negatives(&[0.; 4], &[0.; 4], &[0, 1], &[7, 7], 0.0, &mut rng).unwrap();
        assert_eq!((neg.image_for_text, neg.same_caption), (vec![1, 0], 2));
    }
}
