//! Does the fusion encoder read the image? MLM on the set's captions, each conditioned once on its own
//! image and once on another image of the set, with the same masks. A fusion encoder that ignores its
//! cross-attention predicts the masked words equally well from either image, and ITM, which only sees
//! the image through the same cross-attention, then has nothing to tell a match by.

use super::embed::TokenFeatures;
use crate::config::Config;
use crate::data::annotations::RetrievalSet;
use crate::data::tokenizer::{to_tensors, TextTokenizer};
use crate::model::albef::Albef;
use crate::model::layers::Ctx;
use crate::objectives::mlm;
use crate::rng;
use anyhow::{ensure, Result};
use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};
use std::fmt;

/// MLM of one conditioning, over every masked token of the set.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct MlmScore {
    /// Mean cross-entropy (nats) of the masked tokens' original ids.
    pub loss: f64,
    /// Share of masked tokens whose original id is the top logit.
    pub accuracy: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MlmProbe {
    /// Masked tokens scored.
    pub masked: usize,
    /// Each caption with its own image.
    pub own: MlmScore,
    /// Each caption with the image half the set away (entry (i + n/2) mod n of n).
    pub other: MlmScore,
}

/// The probe on `set` (eval mode, no distillation). Masks follow training's rule
/// (`objectives.mlm_probability`, BERT's 80/10/10) from the seed's `mlm_probe` stream, drawn caption
/// by caption in set order, so they do not depend on `eval.batch_size`.
pub fn mlm_probe(
    model: &Albef, set: &RetrievalSet, tokenizer: &TextTokenizer, tokens: &TokenFeatures, cfg: &Config,
) -> Result<MlmProbe> {
    let n = set.images.len();
    ensure!(n >= 2, "eval.mlm_probe needs at least two images in the set (it has {n})");
    let ctx = Ctx::eval(model.kernels());
    let special = tokenizer.special_tokens(cfg.model.text.vocab_size);
    let mut rng = rng::stream(cfg.seed, "mlm_probe", "", 0);
    let (mut masked, mut own, mut other) = (0, Sums::default(), Sums::default());
    let batch = cfg.eval.batch_size;
    for (b, texts) in set.texts.chunks(batch).enumerate() {
        let enc = tokenizer.encode_batch(texts, cfg.data.max_tokens)?;
        let m = mlm::mask_tokens(&enc.ids, special, cfg.objectives.mlm_probability, &mut rng);
        let Some((positions, targets)) = mlm::masked_positions(&m.labels) else { continue };
        let (_, mask) = to_tensors(&enc, model.device())?;
        let ids = Tensor::from_vec(m.ids, mask.shape(), model.device())?;
        let positions = Tensor::from_vec(positions, targets.len(), model.device())?;
        let targets = Tensor::from_slice(&targets, targets.len(), model.device())?;
        let images_of = |pick: &dyn Fn(usize) -> usize| -> Result<Tensor> {
            let rows = (0..texts.len()).map(|j| tokens.image_embeds(pick(set.txt2img[b * batch + j])));
            Ok(Tensor::cat(&rows.collect::<Result<Vec<_>>>()?, 0)?)
        };
        for (sums, image) in [(&mut own, images_of(&|i| i)?), (&mut other, images_of(&|i| (i + n / 2) % n)?)] {
            sums.add(&model.mlm_logits_at(&ids, &mask, &image, &positions, &ctx)?, &targets)?;
        }
        masked += targets.dim(0)?;
    }
    ensure!(masked > 0, "eval.mlm_probe: no token of the set's captions was masked");
    Ok(MlmProbe { masked, own: own.score(masked), other: other.score(masked) })
}

#[derive(Default)]
struct Sums {
    nll: f64,
    correct: f64,
}

impl Sums {
    fn add(&mut self, logits: &Tensor, targets: &Tensor) -> Result<()> {
        let logits = logits.to_dtype(DType::F32)?;
        let log_p = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        let picked = log_p.gather(&targets.unsqueeze(1)?, 1)?;
        self.nll -= picked.sum_all()?.to_scalar::<f32>()? as f64;
        let hits = logits.argmax(D::Minus1)?.eq(targets)?.to_dtype(DType::F32)?;
        self.correct += hits.sum_all()?.to_scalar::<f32>()? as f64;
        Ok(())
    }

    fn score(&self, masked: usize) -> MlmScore {
        MlmScore { loss: self.nll / masked as f64, accuracy: self.correct / masked as f64 }
    }
}

impl fmt::Display for MlmProbe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "MLM probe ({} masked tokens): own image {:.3} nats, accuracy {:.3}; another image {:.3} nats, \
accuracy {:.3} (a fusion encoder that ignores the image scores both alike)",
            self.masked, self.own.loss, self.own.accuracy, self.other.loss, self.other.accuracy
        )
    }
}
