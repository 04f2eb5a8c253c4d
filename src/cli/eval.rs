//! `alignfuse eval`: the retrieval protocol on a checkpoint and a retrieval annotation file; prints the
//! ITC-only and re-ranked table and optionally writes every number as JSON. Also the loading and
//! file-writing steps `alignfuse embed` shares.

use super::EvalArgs;
use crate::config::{Config, RerankScore};
use crate::data::annotations::{RetrievalSet, TextOptions};
use crate::data::tokenizer::TextTokenizer;
use crate::eval::{evaluate, RetrievalReport};
use crate::model::albef::Albef;
use anyhow::{anyhow, Context, Result};
use serde::de::IntoDeserializer;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub fn run(args: EvalArgs) -> Result<()> {
    let mut cfg = Config::load(&args.cfg.config, &args.cfg.set)?;
    if let Some(k) = args.k_test {
        cfg.eval.k_test = k;
    }
    if let Some(score) = &args.score {
        cfg.eval.score = RerankScore::deserialize(score.as_str().into_deserializer())
            .map_err(|e: serde::de::value::Error| anyhow!("--score {score:?}: {e}"))?;
    }
    cfg.validate().context("with --k-test / --score applied")?;
    let inputs = load_inputs(cfg, &args.checkpoint, &args.ann)?;
    let report = evaluate(&inputs.model, &inputs.set, &inputs.tokenizer, &inputs.cfg)
        .with_context(|| format!("evaluating {} on {}", args.checkpoint.display(), args.ann.display()))?;
    println!("{report}");
    if let Some(path) = &args.json {
        #[derive(Serialize)]
        struct Output<'a> {
            checkpoint: &'a Path,
            ann: &'a Path,
            #[serde(flatten)]
            report: &'a RetrievalReport,
        }
        let text = serde_json::to_string_pretty(&Output { checkpoint: &args.checkpoint, ann: &args.ann, report: &report })?;
        crate::write_atomic(path, |tmp| Ok(std::fs::write(tmp, text)?))?;
    }
    Ok(())
}

/// What `eval` and `embed` start from.
pub(super) struct Inputs {
    pub cfg: Config,
    pub model: Albef,
    pub set: RetrievalSet,
    pub tokenizer: TextTokenizer,
}

/// The checkpoint's model on the configured device, the retrieval set of `ann` (captions cleaned as
/// `data.caption_style` / `data.max_words`) and the vocabulary `cfg.vocab_path(ann)`.
pub(super) fn load_inputs(cfg: Config, checkpoint: &Path, ann: &Path) -> Result<Inputs> {
    let model = Albef::from_checkpoint(&cfg, checkpoint, &crate::device(&cfg.device)?)?;
    let text = TextOptions { max_words: cfg.data.max_words, style: cfg.data.caption_style };
    let set = RetrievalSet::load(ann, cfg.data.image_root.as_deref(), text)?;
    let tokenizer = TextTokenizer::from_file(&cfg.vocab_path(ann)?)?;
    Ok(Inputs { cfg, model, set, tokenizer })
}
