//! `alignfuse eval`: the retrieval protocol on a checkpoint and a retrieval annotation file; prints the
//! ITC-only and re-ranked table and optionally writes every number as JSON.

use super::EvalArgs;
use crate::config::{Config, RerankScore};
use crate::eval::{EvalInputs, RetrievalReport};
use anyhow::{anyhow, Context, Result};
use serde::de::IntoDeserializer;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub fn run(args: EvalArgs) -> Result<()> {
    crate::refuse_existing(args.json.as_deref(), args.overwrite)?;
    let mut cfg = Config::load(&args.cfg.config, &args.cfg.set)?;
    if let Some(k) = args.k_test {
        cfg.eval.k_test = k;
    }
    if let Some(score) = &args.score {
        cfg.eval.score = RerankScore::deserialize(score.as_str().into_deserializer())
            .map_err(|e: serde::de::value::Error| anyhow!("--score {score:?}: {e}"))?;
    }
    cfg.validate().context("with --k-test / --score applied")?;
    // Under mpirun / launch, every rank re-ranks a share of the images.
    let dist = crate::dist::current(&cfg.device)?;
    let report = EvalInputs::load(cfg, &args.checkpoint, &args.ann)?
        .evaluate()
        .with_context(|| format!("evaluating {} on {}", args.checkpoint.display(), args.ann.display()))?;
    if !dist.is_main() {
        return Ok(()); // rank 0 reports for the job
    }
    println!("{report}");
    if let Some(path) = &args.json {
        #[derive(Serialize)]
        struct Output<'a> {
            checkpoint: &'a Path,
            ann: &'a Path,
            #[serde(flatten)]
            report: &'a RetrievalReport,
        }
        let text =
            serde_json::to_string_pretty(&Output { checkpoint: &args.checkpoint, ann: &args.ann, report: &report })?;
        crate::write_atomic(path, |tmp| Ok(std::fs::write(tmp, text)?))?;
    }
    Ok(())
}
