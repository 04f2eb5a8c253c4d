//! Step 1 of the retrieval protocol: one eval-mode pass of the online encoders over every image (test
//! transform) and every caption (text mode), batched.

use super::progress;
use crate::config::Config;
use crate::data::annotations::RetrievalSet;
use crate::data::loader::eval_image_batches;
use crate::data::tokenizer::{to_tensors, Encoded, TextTokenizer};
use crate::model::albef::Albef;
use crate::model::layers::Ctx;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use std::path::Path;

/// The L2-normalised projections of a set, and the token features re-ranking needs.
pub struct Embeddings {
    /// `image_feat` [N_images, embed_dim], in set order.
    pub image_feat: Tensor,
    /// `text_feat` [N_texts, embed_dim], in set order.
    pub text_feat: Tensor,
    /// Absent when only the projections were asked for.
    pub tokens: Option<TokenFeatures>,
}

/// Token features of every image and caption (all detached: no autograd graph is kept alive).
pub struct TokenFeatures {
    /// `image_embeds` in encoding batches of `image_batch` images [b, N, W], so that no second
    /// [N_images, N, W] copy is ever made (COCO 5K at 384 px: 9 GB in f32).
    image_chunks: Vec<Tensor>,
    image_batch: usize,
    /// `text_embeds` [N_texts, L, H], zero-padded to the longest caption of the set.
    pub text_embeds: Tensor,
    /// Attention mask [N_texts, L] (1 = token).
    pub text_mask: Tensor,
    /// Number of tokens of each caption (`[CLS]` and `[SEP]` included).
    pub text_len: Vec<usize>,
}

impl TokenFeatures {
    /// Number of images.
    pub fn images(&self) -> Result<usize> {
        self.image_chunks.iter().try_fold(0, |n, chunk| Ok(n + chunk.dim(0)?))
    }

    /// `image_embeds` of image `i`: [1, N, W].
    pub fn image_embeds(&self, i: usize) -> Result<Tensor> {
        let chunk = self.image_chunks.get(i / self.image_batch).with_context(|| format!("no image {i}"))?;
        Ok(chunk.narrow(0, i % self.image_batch, 1)?)
    }
}

/// Embeds every image and caption of `set` with the online encoders in eval mode, `eval.batch_size` at a
/// time (captions tokenised to `data.max_tokens` by a tokenizer from [`crate::data::tokenizer()`], which
/// checks it against the model). `keep_tokens`: also keep the token features.
pub fn embed_set(
    model: &Albef, set: &RetrievalSet, tokenizer: &TextTokenizer, cfg: &Config, keep_tokens: bool,
) -> Result<Embeddings> {
    let batch = cfg.eval.batch_size;
    ensure!(batch >= 1, "eval.batch_size must be at least 1");
    let texts = set
        .texts
        .chunks(batch)
        .map(|texts| tokenizer.encode_batch(texts, cfg.data.max_tokens))
        .collect::<Result<Vec<_>>>()?;
    let images = eval_image_batches(
        &set.images,
        cfg.model.vision.image_res,
        cfg.data.normalize,
        batch,
        cfg.data.num_workers,
        model.device().clone(),
    )?
    .map(|b| b.map(|b| b.images));
    let bar = progress(set.images.len() + set.texts.len(), "embed");
    let out = embed_batches(model, images, &texts, keep_tokens, &|n| bar.inc(n as u64))?;
    bar.finish_and_clear();
    Ok(out)
}

/// [`embed_set`] on ready inputs: image batches [b, 3, res, res] (all of one size but the last) and
/// tokenised caption batches (each padded to its own longest caption, like the reference). `done(n)` is
/// told after each batch of n images or captions.
pub fn embed_batches(
    model: &Albef, images: impl Iterator<Item = Result<Tensor>>, texts: &[Encoded], keep_tokens: bool,
    done: &dyn Fn(usize),
) -> Result<Embeddings> {
    let ctx = Ctx::eval(model.kernels());
    let (mut image_feat, mut image_chunks) = (vec![], vec![]);
    for batch in images {
        let (embeds, feat) = model.image(&batch?, &ctx)?;
        image_feat.push(feat.detach());
        done(feat.dim(0)?);
        if keep_tokens {
            image_chunks.push(embeds.detach());
        }
    }
    let image_batch = match image_feat.split_last() {
        Some((_, full)) => {
            let b = image_feat[0].dim(0)?;
            ensure!(
                full.iter().all(|f| f.dim(0).is_ok_and(|n| n == b)),
                "image batches must all hold {b} images but the last"
            );
            b
        }
        None => anyhow::bail!("there are no images to embed"),
    };
    let len = texts.iter().map(|e| e.len).max().context("there are no captions to embed")?;
    let (mut text_feat, mut text_embeds, mut text_mask) = (vec![], vec![], vec![]);
    for enc in texts {
        let (ids, mask) = to_tensors(enc, model.device())?;
        let (embeds, feat) = model.text(&ids, &mask, &ctx)?;
        text_feat.push(feat.detach());
        if keep_tokens {
            text_embeds.push(embeds.detach().pad_with_zeros(1, 0, len - enc.len)?);
            text_mask.push(mask.pad_with_zeros(D::Minus1, 0, len - enc.len)?);
        }
        done(enc.batch);
    }
    let tokens = if keep_tokens {
        Some(TokenFeatures {
            image_chunks,
            image_batch,
            text_embeds: Tensor::cat(&text_embeds, 0)?,
            text_mask: Tensor::cat(&text_mask, 0)?,
            text_len: texts.iter().flat_map(token_counts).collect(),
        })
    } else {
        None
    };
    Ok(Embeddings { image_feat: Tensor::cat(&image_feat, 0)?, text_feat: Tensor::cat(&text_feat, 0)?, tokens })
}

/// Writes `set`'s embeddings to a safetensors file: `image_embeds` [N_images, embed_dim] (row i = entry i
/// of the annotation file), `text_embeds` [N_texts, embed_dim] (every caption in file order, an entry's
/// captions together), `txt2img` i64 \[N_texts\] (the image row of each caption) and `text_offsets` i64
/// \[N_images + 1\] (the captions of image i are rows `text_offsets[i]..text_offsets[i+1]`). Cosine
/// similarity is the dot product of two rows. Returns the embedding width.
pub fn write_embeddings(
    model: &Albef, set: &RetrievalSet, tokenizer: &TextTokenizer, cfg: &Config, out: &Path,
) -> Result<usize> {
    let emb = embed_set(model, set, tokenizer, cfg, false)?;
    let cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
    let i64s = |v: Vec<i64>| -> Result<Tensor> { Ok(Tensor::new(v.as_slice(), &Device::Cpu)?) };
    let offsets = std::iter::once(0).chain(set.img2txt.iter().scan(0, |end, own| {
        *end += own.len() as i64;
        Some(*end)
    }));
    let tensors = HashMap::from([
        ("image_embeds", cpu(&emb.image_feat)?),
        ("text_embeds", cpu(&emb.text_feat)?),
        ("txt2img", i64s(set.txt2img.iter().map(|&i| i as i64).collect())?),
        ("text_offsets", i64s(offsets.collect())?),
    ]);
    crate::write_atomic(out, |tmp| Ok(candle_core::safetensors::save(&tensors, tmp)?))?;
    Ok(emb.image_feat.dim(1)?)
}

/// Tokens per row of a tokenised batch.
fn token_counts(enc: &Encoded) -> Vec<usize> {
    enc.mask.chunks(enc.len.max(1)).take(enc.batch).map(|row| row.iter().filter(|&&m| m > 0.0).count()).collect()
}
