//! The data pipeline: annotation files -> cleaned captions and augmented images -> candle batches.
//!
//! `annotations` reads ALBEF-format JSON, `caption` cleans text like the reference `pre_caption`,
//! `tokenizer` turns captions into WordPiece ids, `image` decodes and augments, `loader` runs all of it on
//! worker threads ahead of the training step. `synth` generates the default shapes dataset and
//! `tuxpaint` converts the Tux Paint stamps into annotation files.
//!
//! Determinism: every random draw here (epoch order, caption choice, augmentation, dataset generation
//! and splits) comes from a [`crate::rng::stream`] keyed by what it is for and by (epoch, sample), so
//! nothing depends on thread timing or on how many workers run.

pub mod annotations;
pub mod caption;
pub mod image;
pub mod loader;
pub mod synth;
pub mod tokenizer;
pub mod tuxpaint;
