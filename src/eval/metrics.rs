//! Retrieval metrics of the COCO/Flickr protocol (REFERENCE.md "Retrieval evaluation", step 4): ranks of
//! the ground truth in score rows, and R@1/5/10 from the ranks.
//!
//! Tie rule: a candidate's rank is the number of candidates with a strictly greater score, so ties go to
//! the ground truth. The reference sorts (`np.argsort(...)[::-1]`), whose tie order depends on the numpy
//! build (tests/fixtures/README.md); counting is deterministic and independent of any sort.

use crate::data::annotations::RetrievalSet;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Score of candidates outside a query's re-ranked top k, as in the reference.
pub const FLOOR: f32 = -100.0;

/// Rank of the best correct candidate of one query: `min over c in correct of #{j : row[j] > row[c]}`,
/// computed as the number of scores strictly above the best correct score. A NaN score never counts as
/// greater, and a NaN correct score counts as the lowest.
pub fn best_rank(row: &[f32], correct: &[usize]) -> usize {
    let best = correct.iter().map(|&c| row[c]).filter(|s| !s.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    row.iter().filter(|&&s| s > best).count()
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
    /// R@K = 100 * mean(rank < K) from the TR rank of every image and the IR rank of every caption,
    /// evaluated in the reference's order of float operations.
    pub fn from_ranks(tr_ranks: &[usize], ir_ranks: &[usize]) -> Self {
        let recall =
            |ranks: &[usize], k: usize| 100.0 * (ranks.iter().filter(|&&r| r < k).count() as f64 / ranks.len() as f64);
        let (tr_r1, tr_r5, tr_r10) = (recall(tr_ranks, 1), recall(tr_ranks, 5), recall(tr_ranks, 10));
        let (ir_r1, ir_r5, ir_r10) = (recall(ir_ranks, 1), recall(ir_ranks, 5), recall(ir_ranks, 10));
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
    fn ties_go_to_the_ground_truth() {
        assert_eq!(best_rank(&[0.5, 0.5, 0.5], &[2]), 0);
        assert_eq!(best_rank(&[0.9, 0.5, 0.7, 0.5], &[1, 3]), 2);
        assert_eq!(best_rank(&[0.1, f32::NAN, 0.3], &[0]), 1);
        assert_eq!(best_rank(&[0.1, 0.2, f32::NAN], &[2]), 2);
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
