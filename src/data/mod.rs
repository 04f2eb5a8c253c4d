//! The data pipeline: annotation files -> cleaned captions and augmented images -> candle batches, and
//! the one place that assembles a run's inputs from the config (used by train, eval, embed, bench and
//! ablate alike).
//!
//! `annotations` reads ALBEF-format JSON and cleans captions like the reference `pre_caption`,
//! `tokenizer` turns captions into WordPiece ids, `image` decodes and augments, `loader` runs all of it on
//! worker threads ahead of the training step. `synth` generates the default shapes dataset and
//! `tuxpaint` converts the Tux Paint stamps into annotation files.
//!
//! Determinism: every random draw here (epoch order, caption choice, augmentation, dataset generation
//! and splits) comes from a [`crate::rng::stream`] keyed by what it is for and by (epoch, sample), so
//! nothing depends on thread timing or on how many workers run.

pub mod annotations;
pub mod image;
pub mod loader;
pub mod shards;
pub mod synth;
pub mod tokenizer;
pub mod tuxpaint;

use crate::config::{Config, OnBadImage};
use annotations::{RetrievalSet, TextOptions, TrainSet};
use anyhow::{ensure, Context, Result};
use loader::TrainData;
use shards::ShardSet;
use std::path::Path;
use std::sync::Arc;
use tokenizer::TextTokenizer;

/// With no training annotation configured, generates the synthetic shapes dataset under OUT/data (once;
/// it is deterministic in the seed) and points the config's train, val, test and vocab at it.
pub fn resolve(cfg: &mut Config, out: &Path) -> Result<()> {
    if !cfg.data.train_ann.is_empty() || !cfg.data.train_shards.is_empty() {
        return Ok(());
    }
    // Keyed by size and seed: an existing directory holds exactly what generate() would write.
    let dir = out.join("data").join(format!("synth-n{}-seed{}", cfg.data.synth_n, cfg.seed));
    let paths = if dir.join("vocab.txt").is_file() {
        synth::SynthPaths::of(&dir)
    } else {
        eprintln!("no training data configured: generating the synthetic shapes dataset in {}", dir.display());
        synth::generate(&dir, cfg.data.synth_n, cfg.seed)?
    };
    cfg.data.train_ann = vec![paths.train];
    cfg.data.val_ann = Some(paths.val);
    cfg.data.test_ann = Some(paths.test);
    cfg.data.vocab.get_or_insert(paths.vocab);
    Ok(())
}

/// How captions are cleaned (`data.max_words`, `data.caption_style`).
pub fn text_options(cfg: &Config) -> TextOptions {
    TextOptions { max_words: cfg.data.max_words, style: cfg.data.caption_style }
}

/// The tokenizer for the captions of `ann`: `data.vocab`, or the `vocab.txt` beside `ann`. Refused when
/// it can produce more ids than the model has word embeddings.
pub fn tokenizer(cfg: &Config, ann: &Path) -> Result<TextTokenizer> {
    let path = cfg.vocab_path(ann)?;
    let tok = TextTokenizer::from_file(&path)?;
    ensure!(
        tok.vocab_size() <= cfg.model.text.vocab_size,
        "the vocabulary {} has {} tokens but model.text.vocab_size is {}: the vocabulary does not fit the model",
        path.display(),
        tok.vocab_size(),
        cfg.model.text.vocab_size
    );
    Ok(tok)
}

/// The tokenizer of the first training file (else the test file; shards need `data.vocab` or one).
pub fn train_tokenizer(cfg: &Config) -> Result<TextTokenizer> {
    let ann = cfg.data.train_ann.first().or(cfg.data.test_ann.as_ref()).or(cfg.data.vocab.as_ref());
    tokenizer(cfg, ann.context("no vocabulary: set data.vocab (training from shards needs it)")?)
}

/// The training pairs: `data.train_shards` when set, else the annotation files.
pub fn train_data(cfg: &Config) -> Result<TrainData> {
    if cfg.data.train_shards.is_empty() {
        return Ok(TrainData::Pairs(Arc::new(train_set(cfg)?)));
    }
    Ok(TrainData::Shards(Arc::new(ShardSet::open(&cfg.data.train_shards, cfg.data.train_num_samples)?)))
}

/// The training pairs of `data.train_ann` (image files checked up front unless bad images are skipped).
pub fn train_set(cfg: &Config) -> Result<TrainSet> {
    TrainSet::load(
        &cfg.data.train_ann,
        cfg.data.image_root.as_deref(),
        text_options(cfg),
        cfg.data.on_bad_image == OnBadImage::Fail,
    )
}

/// The retrieval set of `ann` (every caption kept with its image).
pub fn retrieval_set(cfg: &Config, ann: &Path) -> Result<RetrievalSet> {
    RetrievalSet::load(ann, cfg.data.image_root.as_deref(), text_options(cfg))
}
