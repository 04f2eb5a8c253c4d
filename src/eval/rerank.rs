//! Step 3 of the retrieval protocol: re-rank each query's ITC top k by the fusion encoder's ITM
//! positive logit (ALBEF), or logit + ITC cosine (BLIP/LAVIS); every other candidate keeps [`FLOOR`].
//!
//! This is where evaluation spends its time (COCO 5K: 5000*256 + 25010*256 fusion passes), so:
//! - a pair asked for by both directions is scored once (its ITM logit does not depend on the direction);
//! - pairs are grouped by image, and each image's cross-attention keys/values are computed once
//!   ([`Albef::image_kv`]) and shared by all of its candidate texts,
//!   many texts per fusion forward;
//! - the last fusion layer computes the `[CLS]` position only, the one `itm_head` reads;
//! - each forward is cut to the longest caption among its texts.

use super::embed::TokenFeatures;
use super::metrics::{standing, Standing, FLOOR};
use super::progress;
use super::sims::TopK;
use crate::config::RerankScore;
use crate::dist::{Dist, Place};
use crate::model::albef::Albef;
use crate::model::bert::ImageSide;
use crate::model::layers::Ctx;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// How candidate pairs go through the fusion encoder.
#[derive(Debug, Clone, Copy)]
pub struct RerankOptions {
    pub score: RerankScore,
    /// Compute each image's cross-attention keys/values once (on) or let every candidate pair project
    /// the image tokens again, as the reference's `repeat` does (off: for benchmarks).
    pub reuse_kv: bool,
    /// Candidate texts of one image per fusion forward.
    pub pairs_per_forward: usize,
}

/// Re-ranked scores aligned with the ITC top k: `i2t[s]` scores the pair of slot s of the image-to-text
/// [`TopK`], `t2i[s]` that of the text-to-image one.
#[derive(Debug, Clone, PartialEq)]
pub struct Reranked {
    pub i2t: Vec<f32>,
    pub t2i: Vec<f32>,
    /// Distinct pairs that went through the fusion encoder.
    pub pairs: usize,
}

/// Scores the candidates of both directions. `i2t` holds the top texts of every image, `t2i` the top
/// images of every text; `tokens` the token features of the same set. With several ranks, each scores
/// the pairs of every R-th image and the scores are summed over the ranks (every slot is scored by one
/// rank, zero on the others), so every rank ends with the one-process scores exactly.
pub fn rerank(
    model: &Albef, tokens: &TokenFeatures, i2t: &TopK, t2i: &TopK, opts: &RerankOptions, dist: &Dist,
) -> Result<Reranked> {
    ensure!(opts.pairs_per_forward >= 1, "at least one pair per fusion forward");
    let (n_images, n_texts) = (tokens.images()?, tokens.text_len.len());
    ensure!(
        i2t.queries() == n_images
            && i2t.idx.iter().all(|&t| (t as usize) < n_texts)
            && t2i.queries() == n_texts
            && t2i.idx.iter().all(|&i| (i as usize) < n_images),
        "the candidate lists do not belong to these {n_images} images and {n_texts} captions"
    );
    let n_i2t = i2t.idx.len();
    // (image, text, slot): slots below n_i2t are i2t's, the rest t2i's. Sorting groups by image and
    // puts a pair's two slots next to each other.
    let mut pairs: Vec<(u32, u32, usize)> = Vec::with_capacity(n_i2t + t2i.idx.len());
    pairs.extend(i2t.idx.iter().enumerate().map(|(s, &t)| ((s / i2t.k) as u32, t, s)));
    pairs.extend(t2i.idx.iter().enumerate().map(|(s, &img)| (img, (s / t2i.k) as u32, n_i2t + s)));
    pairs.sort_unstable();
    let unique = pairs.chunk_by(|a, b| (a.0, a.1) == (b.0, b.1)).count();

    let ctx = Ctx::eval(model.kernels());
    let mut scores = vec![0f32; pairs.len()];
    let Place { rank, world } = dist.place();
    let mine = |group: &&[(u32, u32, usize)]| group[0].0 as usize % world == rank;
    let bar = progress(
        pairs.chunk_by(|a, b| a.0 == b.0).filter(mine).map(|g| g.chunk_by(|a, b| a.1 == b.1).count()).sum(),
        "re-rank",
    );
    for group in pairs.chunk_by(|a, b| a.0 == b.0).filter(mine) {
        let image = group[0].0 as usize;
        let texts: Vec<u32> = group.chunk_by(|a, b| a.1 == b.1).map(|same| same[0].1).collect();
        let image_embeds = tokens.image_embeds(image)?;
        let kv = if opts.reuse_kv { Some(model.image_kv(&image_embeds, &ctx)?) } else { None };
        let mut logits = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(opts.pairs_per_forward) {
            let ids = Tensor::from_slice(chunk, chunk.len(), model.device())?;
            let len = chunk.iter().map(|&t| tokens.text_len[t as usize]).max().unwrap_or(1);
            let text = tokens.text_embeds.index_select(&ids, 0)?.narrow(1, 0, len)?;
            let mask = tokens.text_mask.index_select(&ids, 0)?.narrow(1, 0, len)?;
            let itm = match &kv {
                Some(kv) => model.itm_logits(&text, &mask, ImageSide::Kv(kv), &ctx)?,
                None => {
                    let (_, n, w) = image_embeds.dims3()?;
                    let repeated = image_embeds.broadcast_as((chunk.len(), n, w))?.contiguous()?;
                    model.itm_logits(&text, &mask, ImageSide::Tokens(&repeated), &ctx)?
                }
            };
            let positive = itm.narrow(1, 1, 1)?.squeeze(1)?;
            logits.extend(positive.to_dtype(DType::F32)?.to_vec1::<f32>()?);
            bar.inc(chunk.len() as u64);
        }
        if let Some(at) = logits.iter().position(|l| l.is_nan()) {
            bail!("the ITM logit of image {image} with text {} is NaN: the model is broken", texts[at]);
        }
        for (logit, same) in logits.iter().zip(group.chunk_by(|a, b| a.1 == b.1)) {
            for &(_, _, slot) in same {
                scores[slot] = *logit;
            }
        }
    }
    bar.finish_and_clear();
    if !dist.solo() {
        let shape = scores.len();
        scores = dist.all_reduce_sum(&Tensor::from_vec(scores, shape, model.device())?)?.to_vec1()?;
    }
    let mut t2i_scores = scores.split_off(n_i2t);
    if opts.score == RerankScore::ItmItc {
        for (score, sim) in scores.iter_mut().zip(&i2t.sim).chain(t2i_scores.iter_mut().zip(&t2i.sim)) {
            *score += sim;
        }
    }
    Ok(Reranked { i2t: scores, t2i: t2i_scores, pairs: unique })
}

/// Standings of one direction after re-ranking: query q's row over `n_keys` candidates is [`FLOOR`]
/// except at its top-k slots, which hold `scores`; then where its best correct candidate stands (a
/// ground truth outside the top k ties with every other candidate outside it).
pub fn reranked_standings(topk: &TopK, scores: &[f32], n_keys: usize, correct: &[Vec<usize>]) -> Vec<Standing> {
    let k = topk.k;
    (0..topk.queries())
        .into_par_iter()
        .map_init(
            || vec![FLOOR; n_keys],
            |row, q| {
                let slots = q * k..(q + 1) * k;
                for s in slots.clone() {
                    row[topk.idx[s] as usize] = scores[s];
                }
                let rank = standing(row, &correct[q]);
                for s in slots {
                    row[topk.idx[s] as usize] = FLOOR;
                }
                rank
            },
        )
        .collect()
}
