//! alignfuse: train ALBEF/BLIP-style vision-language models (ITC + ITM + MLM with momentum
//! distillation) on image-caption pairs and evaluate them on image-text retrieval.
//!
//! One batch flows `data` (annotations -> tensors) -> `model` (encoders, momentum twin, queues) ->
//! `objectives` (itc, itm, mlm) -> `train` (summed loss, backward, AdamW). `eval` runs the COCO/Flickr
//! retrieval protocol; `ops` holds the custom fused ops behind `kernels = "fused" | "reference"`.

pub mod cli;
pub mod config;
pub mod data;
pub mod eval;
pub mod model;
pub mod objectives;
pub mod ops;
pub mod rng;
