//! Image-text retrieval evaluation, the COCO/Flickr protocol of REFERENCE.md: embed every image and
//! caption (`embed`), rank by ITC cosine similarity and keep each query's top k (`sims`), re-rank those
//! by the fusion encoder's ITM logit (`rerank`), and turn ranks into R@1/5/10 (`metrics`). The report
//! carries the ITC-only numbers next to the re-ranked ones, so a user sees what re-ranking adds.
//! `bench` times the re-ranking with and without the per-image key/value reuse.

pub mod bench;
pub mod embed;
pub mod metrics;
pub mod mlm_probe;
pub mod rerank;
pub mod sims;

use crate::config::{Config, RerankScore};
use crate::data::annotations::RetrievalSet;
use crate::data::tokenizer::TextTokenizer;
use crate::dist::Dist;
use crate::model::albef::Albef;
use anyhow::{ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use metrics::{GroundTruth, Metrics};
use mlm_probe::{mlm_probe, MlmProbe};
use rerank::{rerank, reranked_standings, RerankOptions};
use serde::{Deserialize, Serialize};
use sims::itc_pass;
use std::fmt;
use std::path::Path;
use std::time::Instant;

/// What `eval` and `embed` start from: the checkpoint's model on the configured device, the retrieval
/// set of an annotation file and the tokenizer for its captions (assembled by [`crate::data`]).
pub struct EvalInputs {
    pub cfg: Config,
    pub model: Albef,
    pub set: RetrievalSet,
    pub tokenizer: TextTokenizer,
}

impl EvalInputs {
    pub fn load(cfg: Config, checkpoint: &Path, ann: &Path) -> Result<Self> {
        let tokenizer = crate::data::tokenizer(&cfg, ann)?;
        let set = crate::data::retrieval_set(&cfg, ann)?;
        let model = Albef::from_checkpoint(&cfg, checkpoint, &crate::dist::device(&cfg.device)?)?;
        Ok(EvalInputs { cfg, model, set, tokenizer })
    }

    /// [`evaluate`] on these inputs.
    pub fn evaluate(&self) -> Result<RetrievalReport> {
        evaluate(&self.model, &self.set, &self.tokenizer, &self.cfg, &*crate::dist::current(&self.cfg.device)?)
    }
}

/// Everything one evaluation measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetrievalReport {
    /// Ranked by ITC cosine similarity alone.
    pub itc: Metrics,
    /// The top k of each query re-ranked by `score`, the rest below them.
    pub rerank: Metrics,
    pub images: usize,
    pub texts: usize,
    /// Texts re-ranked per image: eval.k_test, at most the number of captions.
    pub k_i2t: usize,
    /// Images re-ranked per caption: eval.k_test, at most the number of images.
    pub k_t2i: usize,
    pub score: RerankScore,
    /// The ground-truth rule (eval.match_text) and the number of captions shared by different images.
    pub match_text: bool,
    pub shared_captions: usize,
    /// Distinct (image, caption) pairs the fusion encoder scored.
    pub pairs: usize,
    /// With eval.mlm_probe: MLM with each caption's own image against another image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlm_probe: Option<MlmProbe>,
    pub timings: Timings,
}

/// Wall-clock seconds of each stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timings {
    pub embed_s: f64,
    pub itc_s: f64,
    pub rerank_s: f64,
    pub total_s: f64,
    /// Re-ranked pairs per second.
    pub pairs_per_s: f64,
}

/// Runs the retrieval protocol on `set` with the online encoders of `model` in eval mode, following
/// `cfg.eval` (k_test, score, batch_size, match_text); captions are tokenised to `data.max_tokens`.
/// With several ranks, every rank embeds the whole set (as ALBEF) and re-ranks a share of the images.
pub fn evaluate(
    model: &Albef, set: &RetrievalSet, tokenizer: &TextTokenizer, cfg: &Config, dist: &Dist,
) -> Result<RetrievalReport> {
    ensure!(!set.images.is_empty(), "the retrieval set has no images");
    ensure!(cfg.eval.k_test >= 1, "eval.k_test must be at least 1");
    let start = Instant::now();
    let emb = embed::embed_set(model, set, tokenizer, cfg, true)?;
    let tokens = emb.tokens.as_ref().context("token features are kept for re-ranking")?;
    let embed_s = start.elapsed().as_secs_f64();

    let gt = GroundTruth::new(set, cfg.eval.match_text);
    let i2t = itc_pass(&emb.image_feat, &emb.text_feat, &gt.texts_of_image, cfg.eval.k_test)?;
    let t2i = itc_pass(&emb.text_feat, &emb.image_feat, &gt.images_of_text, cfg.eval.k_test)?;
    let itc_s = start.elapsed().as_secs_f64() - embed_s;

    // One image with its k_test candidates per forward, the reference's batch.
    let opts = RerankOptions { score: cfg.eval.score, reuse_kv: true, pairs_per_forward: cfg.eval.k_test };
    let scores = rerank(model, tokens, &i2t.topk, &t2i.topk, &opts, dist)?;
    let tr = reranked_standings(&i2t.topk, &scores.i2t, set.texts.len(), &gt.texts_of_image);
    let ir = reranked_standings(&t2i.topk, &scores.t2i, set.images.len(), &gt.images_of_text);
    let rerank_s = start.elapsed().as_secs_f64() - embed_s - itc_s;
    let probe = cfg.eval.mlm_probe.then(|| mlm_probe(model, set, tokenizer, tokens, cfg)).transpose()?;
    let total_s = start.elapsed().as_secs_f64();
    Ok(RetrievalReport {
        itc: Metrics::from_standings(&i2t.standings, &t2i.standings),
        rerank: Metrics::from_standings(&tr, &ir),
        images: set.images.len(),
        texts: set.texts.len(),
        k_i2t: i2t.topk.k,
        k_t2i: t2i.topk.k,
        score: cfg.eval.score,
        match_text: gt.match_text,
        shared_captions: gt.shared_captions,
        pairs: scores.pairs,
        mlm_probe: probe,
        timings: Timings { embed_s, itc_s, rerank_s, total_s, pairs_per_s: scores.pairs as f64 / rerank_s.max(1e-9) },
    })
}

impl fmt::Display for RetrievalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let score = match self.score {
            RerankScore::Itm => "ITM logit",
            RerankScore::ItmItc => "ITM logit + ITC similarity",
        };
        writeln!(f, "retrieval: {} images, {} captions; re-ranking the top {} captions per image and {} images per caption by {score}",
            self.images, self.texts, self.k_i2t, self.k_t2i)?;
        writeln!(f, "{}", metrics::describe_ground_truth(self.match_text, self.shared_captions))?;
        writeln!(
            f,
            "{:<14} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>8} {:>8} {:>8}",
            "", "TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10", "tr_mean", "ir_mean", "r_mean"
        )?;
        for (name, m) in [("ITC only", &self.itc), ("re-ranked", &self.rerank)] {
            writeln!(
                f,
                "{name:<14} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>8.2} {:>8.2} {:>8.2}",
                m.tr_r1, m.tr_r5, m.tr_r10, m.ir_r1, m.ir_r5, m.ir_r10, m.tr_mean, m.ir_mean, m.r_mean
            )?;
        }
        if (self.k_i2t < 10 && self.texts > self.k_i2t) || (self.k_t2i < 10 && self.images > self.k_t2i) {
            writeln!(
                f,
                "note: fewer than 10 candidates re-ranked: a ground truth outside the top k ties with every other \
candidate outside it, so re-ranked R@K for K > k counts it at the random-tie expectation"
            )?;
        }
        if let Some(probe) = &self.mlm_probe {
            writeln!(f, "{probe}")?;
        }
        let t = &self.timings;
        write!(
            f,
            "time: embed {:.2} s, ITC {:.2} s, re-rank {:.2} s ({} pairs, {:.0} pairs/s), total {:.2} s",
            t.embed_s, t.itc_s, t.rerank_s, self.pairs, t.pairs_per_s, t.total_s
        )
    }
}

/// A progress bar on stderr; indicatif draws nothing when stderr is not a terminal.
fn progress(len: usize, what: &'static str) -> ProgressBar {
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
        .map(|s| s.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(len as u64).with_style(style).with_prefix(what)
}
