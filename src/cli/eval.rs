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
use candle_core::Device;
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
        write_atomic(path, |tmp| Ok(std::fs::write(tmp, text)?))?;
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
    let model = Albef::from_checkpoint(&cfg, checkpoint, &device(&cfg)?)?;
    let text = TextOptions { max_words: cfg.data.max_words, style: cfg.data.caption_style };
    let set = RetrievalSet::load(ann, cfg.data.image_root.as_deref(), text)?;
    let tokenizer = TextTokenizer::from_file(&cfg.vocab_path(ann)?)?;
    Ok(Inputs { cfg, model, set, tokenizer })
}

/// The device `cfg.device` names: "cpu", "cuda" (GPU 0) or "auto" (CUDA when built with it and present).
pub(super) fn device(cfg: &Config) -> Result<Device> {
    Ok(match cfg.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0).context("device = \"cuda\": no usable CUDA device (is alignfuse built with --features cuda?)")?,
        _ => Device::cuda_if_available(0)?,
    })
}

/// Writes `path` by letting `write` fill a temporary file beside it, then renaming it into place, so
/// that `path` never holds a half-written file. Errors name `path`.
pub(super) fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let name = path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = std::fs::create_dir_all(dir)
        .map_err(Into::into)
        .and_then(|()| write(&tmp))
        .and_then(|()| Ok(std::fs::rename(&tmp, path)?));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}
