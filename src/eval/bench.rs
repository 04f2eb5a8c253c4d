//! Re-ranking throughput: the same candidates scored with per-image key/value reuse and without it
//! (every pair projects the image tokens again, as the reference's `repeat` does).

use super::embed::embed_batches;
use super::rerank::{rerank, RerankOptions};
use super::sims::itc_pass;
use crate::config::{Config, RerankScore};
use crate::data::tokenizer::Encoded;
use crate::model::albef::Albef;
use crate::model::params::ParamStore;
use anyhow::{ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;
use std::fmt;
use std::time::Instant;

/// Captions per image in the benchmark set (COCO and Flickr30K have 5).
const CAPTIONS_PER_IMAGE: usize = 5;

/// What [`bench_rerank`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct RerankBench {
    pub images: usize,
    pub texts: usize,
    /// Candidates per query in each direction.
    pub k: usize,
    /// Pairs the two directions ask for together, and the distinct ones that are scored.
    pub requested_pairs: usize,
    pub pairs: usize,
    /// Best of two runs, seconds.
    pub reuse_kv_s: f64,
    pub plain_s: f64,
    pub reuse_kv_pairs_per_s: f64,
    pub plain_pairs_per_s: f64,
    /// plain_s / reuse_kv_s.
    pub speedup: f64,
    /// Largest |difference| between the two paths' scores: float rounding only.
    pub max_abs_diff: f32,
}

/// Times re-ranking on a randomly initialised model of `cfg` over `n_images` random images with five
/// random captions each (lengths up to `data.max_tokens`), `k` candidates per query in both directions,
/// `k` pairs per forward as in evaluation. Each path runs twice, alternating; the faster run counts.
pub fn bench_rerank(cfg: &Config, n_images: usize, k: usize, device: &Device) -> Result<RerankBench> {
    ensure!(n_images >= 1 && k >= 1, "the re-rank benchmark needs at least one image and k >= 1");
    ensure!(cfg.model.text.vocab_size > 5, "model.text.vocab_size must exceed the 5 special tokens");
    let model = Albef::new(cfg, ParamStore::new(cfg.seed, device))?;
    let mut rng = crate::rng::stream(cfg.seed, "bench", "rerank", 0);
    let res = cfg.model.vision.image_res;
    let batch = cfg.eval.batch_size.max(1);
    let images: Vec<Result<Tensor>> = (0..n_images)
        .step_by(batch)
        .map(|start| {
            let b = batch.min(n_images - start);
            let pixels: Vec<f32> = (0..b * 3 * res * res).map(|_| StandardNormal.sample(&mut rng)).collect();
            Ok(Tensor::from_vec(pixels, (b, 3, res, res), device)?)
        })
        .collect();
    let n_texts = n_images * CAPTIONS_PER_IMAGE;
    let texts: Vec<Encoded> = (0..n_texts)
        .step_by(batch)
        .map(|start| {
            random_captions(&mut rng, batch.min(n_texts - start), cfg.data.max_tokens, cfg.model.text.vocab_size)
        })
        .collect();
    let emb = embed_batches(&model, images.into_iter(), &texts, true, &|_| ())?;
    let tokens = emb.tokens.as_ref().context("token features are kept for re-ranking")?;
    let own_captions: Vec<Vec<usize>> =
        (0..n_images).map(|i| (i * CAPTIONS_PER_IMAGE..(i + 1) * CAPTIONS_PER_IMAGE).collect()).collect();
    let own_image: Vec<Vec<usize>> = (0..n_texts).map(|t| vec![t / CAPTIONS_PER_IMAGE]).collect();
    let i2t = itc_pass(&emb.image_feat, &emb.text_feat, &own_captions, k)?.topk;
    let t2i = itc_pass(&emb.text_feat, &emb.image_feat, &own_image, k)?.topk;

    let run = |reuse_kv: bool| -> Result<(f64, Vec<f32>, usize)> {
        let opts = RerankOptions { score: RerankScore::Itm, reuse_kv, pairs_per_forward: k };
        let start = Instant::now();
        let out = rerank(&model, tokens, &i2t, &t2i, &opts, &crate::dist::Dist::single())?;
        Ok((start.elapsed().as_secs_f64(), [out.i2t, out.t2i].concat(), out.pairs))
    };
    let (reuse_a, reused, pairs) = run(true)?;
    let (plain_a, plain, _) = run(false)?;
    let (reuse_b, _, _) = run(true)?;
    let (plain_b, _, _) = run(false)?;
    let (reuse_kv_s, plain_s) = (reuse_a.min(reuse_b), plain_a.min(plain_b));
    let max_abs_diff = reused.iter().zip(&plain).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    Ok(RerankBench {
        images: n_images,
        texts: n_texts,
        k,
        requested_pairs: reused.len(),
        pairs,
        reuse_kv_s,
        plain_s,
        reuse_kv_pairs_per_s: pairs as f64 / reuse_kv_s,
        plain_pairs_per_s: pairs as f64 / plain_s,
        speedup: plain_s / reuse_kv_s,
        max_abs_diff,
    })
}

/// `b` token sequences `[2, random ids..., 3]` of random lengths in [3, max_tokens], padded with 0.
fn random_captions(rng: &mut impl Rng, b: usize, max_tokens: usize, vocab: usize) -> Encoded {
    let max_tokens = max_tokens.max(3);
    let lens: Vec<usize> = (0..b).map(|_| rng.random_range(3..=max_tokens)).collect();
    let len = lens.iter().copied().max().unwrap_or(3);
    let (mut ids, mut mask) = (Vec::with_capacity(b * len), Vec::with_capacity(b * len));
    for &n in &lens {
        ids.push(2);
        ids.extend((2..n).map(|_| rng.random_range(5..vocab) as u32));
        ids.push(3);
        ids.resize(ids.len() + len - n, 0);
        mask.extend((0..len).map(|t| if t < n { 1.0 } else { 0.0 }));
    }
    Encoded { ids, mask, batch: b, len }
}

impl fmt::Display for RerankBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "re-rank: {} images, {} captions, k = {}: {} pairs asked, {} distinct scored",
            self.images, self.texts, self.k, self.requested_pairs, self.pairs
        )?;
        writeln!(f, "  with image K/V reuse: {:8.3} s  {:10.0} pairs/s", self.reuse_kv_s, self.reuse_kv_pairs_per_s)?;
        writeln!(f, "  without (plain):      {:8.3} s  {:10.0} pairs/s", self.plain_s, self.plain_pairs_per_s)?;
        write!(f, "  speed-up {:.2}x; max |score difference| {:.1e}", self.speedup, self.max_abs_diff)
    }
}
