//! `alignfuse embed`: the L2-normalised ITC projections of every image and caption of an annotation
//! file, for building search indexes outside alignfuse (layout: `eval::embed::write_embeddings`).

use super::EmbedArgs;
use crate::config::Config;
use crate::eval::embed::write_embeddings;
use crate::eval::EvalInputs;
use anyhow::{Context, Result};

pub fn run(args: EmbedArgs) -> Result<()> {
    crate::refuse_existing([args.out.as_path()], args.overwrite)?;
    let cfg = Config::load(&args.cfg.config, &args.cfg.set)?;
    let inputs = EvalInputs::load(cfg, &args.checkpoint, &args.ann)?;
    let set = &inputs.set;
    let dim = write_embeddings(&inputs.model, set, &inputs.tokenizer, &inputs.cfg, &args.out)
        .with_context(|| format!("embedding {} with {}", args.ann.display(), args.checkpoint.display()))?;
    println!(
        "wrote {} image and {} caption embeddings ({dim}-d) to {}",
        set.images.len(),
        set.texts.len(),
        args.out.display()
    );
    Ok(())
}
