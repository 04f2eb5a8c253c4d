//! Retrieval metrics of the COCO/Flickr protocol (REFERENCE.md "Retrieval evaluation", step 4): ranks of
//! the ground truth in score rows, and R@1/5/10 from the ranks.
//!
//! Tie rule: R@K is the expectation under uniformly random tie-breaking. A query whose best correct
//! candidate has `above` candidates strictly higher and shares its score with `tied` candidates in all
//! (`tied_correct` of them correct) is a hit with probability 1 - C(tied - tied_correct, s) / C(tied, s),
//! s = K - above slots left: (K - above) / tied for one correct candidate. A constant scorer therefore
//! scores exactly chance, never 100. The reference sorts (`np.argsort(...)[::-1]`), whose tie order depends
//! on the numpy build (tests/fixtures/README.md); this is deterministic and independent of any sort, and
//! equals the reference wherever scores do not tie.

use crate::data::annotations::RetrievalSet;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Score of candidates outside a query's re-ranked top k, as in the reference.
pub const FLOOR: f32 = -100.0;

/// Where a query's ground truth stands in its row of scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Candidates scoring strictly higher than the best correct one.
    pub above: usize,
    /// Candidates with exactly the best correct score, that one included (at least 1).
    pub tied: usize,
    /// Correct candidates among `tied` (at least 1).
    pub tied_correct: usize,
}

impl Standing {
    /// The probability that a correct candidate lands in the top `k` when ties are broken uniformly at
    /// random.
    pub fn hit(&self, k: usize) -> f64 {
        let Some(slots) = k.checked_sub(self.above).filter(|&s| s > 0) else { return 0.0 };
        let (n, wrong) = (self.tied, self.tied - self.tied_correct);
        if slots > wrong {
            return 1.0;
        }
        // P(all `slots` first places go to wrong candidates) = C(wrong, slots) / C(n, slots).
        let miss: f64 = (0..slots).map(|i| (wrong - i) as f64 / (n - i) as f64).product();
        1.0 - miss
    }
}

/// The standing of one query's ground truth, its best correct candidate being the one with the highest
/// score. A NaN score never counts as higher or tied, and a NaN correct score counts as the lowest.
pub fn standing(row: &[f32], correct: &[usize]) -> Standing {
    let best = correct.iter().map(|&c| row[c]).filter(|s| !s.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    let above = row.iter().filter(|&&s| s > best).count();
    let tied_correct = correct.iter().filter(|&&c| row[c] == best).count().max(1);
    let tied = row.iter().filter(|&&s| s == best).count().max(tied_correct);
    Standing { above, tied, tied_correct }
}

/// Which candidates count as correct for each query.
#[derive(Debug, Clone, PartialEq)]
pub struct GroundTruth {
    /// For each image, the texts that are correct for text retrieval.
    pub texts_of_image: Vec<Vec<usize>>,
    /// For each text, the images that are correct for image retrieval.
    pub images_of_text: Vec<Vec<usize>>,
    /// Whether correctness is decided by caption text (`eval.match_text`) instead of annotation pairs.
    pub match_text: bool,
    /// Captions whose cleaned text is also a caption of a different image. Under the reference rule
    /// retrieving such a twin counts as a miss, which caps recall on sets with many of them.
    pub shared_captions: usize,
}

impl GroundTruth {
    /// The reference rule (`match_text = false`): an image's own captions, a caption's own image. With
    /// `match_text`, a caption is also correct for every image that has a caption with the same cleaned
    /// text, and an image is correct for a query caption when one of its captions has the query's text.
    pub fn new(set: &RetrievalSet, match_text: bool) -> Self {
        let mut by_text: HashMap<&str, Vec<usize>> = HashMap::new();
        for (t, text) in set.texts.iter().enumerate() {
            by_text.entry(text.as_str()).or_default().push(t);
        }
        let images_with = |text: &str| -> Vec<usize> {
            let mut images: Vec<usize> = by_text[text].iter().map(|&t| set.txt2img[t]).collect();
            images.sort_unstable();
            images.dedup();
            images
        };
        let shared_captions = set.texts.iter().filter(|text| images_with(text).len() > 1).count();
        let (texts_of_image, images_of_text) = if match_text {
            let texts_of_image = set
                .img2txt
                .iter()
                .map(|own| {
                    let mut texts: Vec<usize> =
                        own.iter().flat_map(|&t| by_text[set.texts[t].as_str()].iter().copied()).collect();
                    texts.sort_unstable();
                    texts.dedup();
                    texts
                })
                .collect();
            (texts_of_image, set.texts.iter().map(|text| images_with(text)).collect())
        } else {
            (set.img2txt.clone(), set.txt2img.iter().map(|&i| vec![i]).collect())
        };
        GroundTruth { texts_of_image, images_of_text, match_text, shared_captions }
    }
}

/// One line for reports: the ground-truth rule in force and how many captions it concerns.
pub fn describe_ground_truth(match_text: bool, shared_captions: usize) -> String {
    let rule = if match_text {
        "a caption is correct when its text equals a ground-truth caption's (eval.match_text = true)"
    } else {
        "annotation pairs only (reference protocol, eval.match_text = false)"
    };
    format!("ground truth: {rule}; {shared_captions} captions are shared by different images")
}

/// Recall at 1/5/10 for text retrieval (TR, image -> text) and image retrieval (IR, text -> image).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub tr_r1: f64,
    pub tr_r5: f64,
    pub tr_r10: f64,
    pub ir_r1: f64,
    pub ir_r5: f64,
    pub ir_r10: f64,
    /// (tr_r1 + tr_r5 + tr_r10) / 3.
    pub tr_mean: f64,
    /// (ir_r1 + ir_r5 + ir_r10) / 3.
    pub ir_mean: f64,
    /// (tr_mean + ir_mean) / 2.
    pub r_mean: f64,
}

impl Metrics {
    /// R@K = 100 * mean over queries of the hit probability ([`Standing::hit`]) from the TR standing of
    /// every image and the IR standing of every caption; without ties, 100 * mean(rank < K) in the
    /// reference's order of float operations.
    pub fn from_standings(tr: &[Standing], ir: &[Standing]) -> Self {
        let recall =
            |all: &[Standing], k: usize| 100.0 * (all.iter().map(|s| s.hit(k)).sum::<f64>() / all.len() as f64);
        let (tr_r1, tr_r5, tr_r10) = (recall(tr, 1), recall(tr, 5), recall(tr, 10));
        let (ir_r1, ir_r5, ir_r10) = (recall(ir, 1), recall(ir, 5), recall(ir, 10));
        let tr_mean = (tr_r1 + tr_r5 + tr_r10) / 3.0;
        let ir_mean = (ir_r1 + ir_r5 + ir_r10) / 3.0;
        Metrics { tr_r1, tr_r5, tr_r10, ir_r1, ir_r5, ir_r10, tr_mean, ir_mean, r_mean: (tr_mean + ir_mean) / 2.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn standings_count_above_and_tied() {
        let st = |above, tied, tied_correct| Standing { above, tied, tied_correct };
        assert_eq!(standing(&[0.5, 0.5, 0.5], &[2]), st(0, 3, 1));
        assert_eq!(standing(&[0.9, 0.5, 0.7, 0.5], &[1, 3]), st(2, 2, 2));
        assert_eq!(standing(&[0.1, f32::NAN, 0.3], &[0]), st(1, 1, 1));
        assert_eq!(standing(&[0.1, 0.2, f32::NAN], &[2]), st(2, 1, 1));
    }

    /// The hit probability against random tie-breaking simulated: scores jittered below the tie gap.
    #[test]
    fn hit_probability_is_random_tie_breaking() {
        let row = [0.7f32, 0.5, 0.5, 0.5, 0.5, 0.5, 0.2, 0.5];
        let correct = [2usize, 5];
        let s = standing(&row, &correct);
        assert_eq!(s, Standing { above: 1, tied: 6, tied_correct: 2 });
        let mut rng = crate::rng::stream(3, "test", "ties", 0);
        let n = 40_000;
        for k in [1, 2, 3, 5] {
            let hits = (0..n)
                .filter(|_| {
                    let jittered: Vec<f32> =
                        row.iter().map(|&x| x + 1e-4 * rand::Rng::random::<f32>(&mut rng)).collect();
                    standing(&jittered, &correct).above < k
                })
                .count();
            let p = hits as f64 / n as f64;
            assert!((p - s.hit(k)).abs() < 0.01, "k={k}: simulated {p}, formula {}", s.hit(k));
        }
        assert_eq!(s.hit(1), 0.0);
        assert!((s.hit(2) - 2.0 / 6.0).abs() < 1e-12);
        assert_eq!(s.hit(6), 1.0);
    }

    /// Every score equal: R@K is exactly what a random ranking gets.
    #[test]
    fn a_constant_scorer_scores_chance() {
        let (images, texts) = (7usize, 21usize);
        let tr: Vec<Standing> = (0..images).map(|i| standing(&[0.3; 21], &[3 * i, 3 * i + 1, 3 * i + 2])).collect();
        let ir: Vec<Standing> = (0..texts).map(|t| standing(&[0.3; 7], &[t / 3])).collect();
        let m = Metrics::from_standings(&tr, &ir);
        let choose = |n: usize, k: usize| (0..k).map(|i| (n - i) as f64 / (k - i) as f64).product::<f64>();
        for (k, tr_k, ir_k) in [(1, m.tr_r1, m.ir_r1), (5, m.tr_r5, m.ir_r5), (10, m.tr_r10, m.ir_r10)] {
            let tr_chance = 100.0 * (1.0 - choose(texts - 3, k) / choose(texts, k));
            let ir_chance = 100.0 * (k as f64 / images as f64).min(1.0);
            assert!((tr_k - tr_chance).abs() < 1e-9 && (ir_k - ir_chance).abs() < 1e-9, "R@{k}: {tr_k} {ir_k}");
        }
    }

    #[test]
    fn match_text_extends_the_ground_truth() {
        let texts = ["a dog", "a cat", "a dog", "a bird", "a cat"].map(String::from).to_vec();
        let set = RetrievalSet {
            images: (0..3).map(|i| PathBuf::from(format!("{i}.png"))).collect(),
            texts,
            img2txt: vec![vec![0, 1], vec![2, 3], vec![4]],
            txt2img: vec![0, 0, 1, 1, 2],
        };
        let plain = GroundTruth::new(&set, false);
        assert_eq!(plain.texts_of_image, set.img2txt);
        assert_eq!(plain.images_of_text, [[0], [0], [1], [1], [2]]);
        assert_eq!(plain.shared_captions, 4, "both dogs and both cats");
        let matched = GroundTruth::new(&set, true);
        assert_eq!(matched.texts_of_image, vec![vec![0, 1, 2, 4], vec![0, 2, 3], vec![1, 4]]);
        assert_eq!(matched.images_of_text, vec![vec![0, 1], vec![0, 2], vec![0, 1], vec![1], vec![0, 2]]);
        let line = describe_ground_truth(matched.match_text, matched.shared_captions);
        assert!(line.contains("match_text = true") && line.contains("4 captions"), "{line}");
    }
}
