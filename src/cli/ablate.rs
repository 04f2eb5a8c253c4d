//! `alignfuse ablate`: the objective / distillation ablation (see `crate::ablate`).

use super::AblateArgs;
use crate::ablate::{ablate, variants, AblateOptions};
use anyhow::Result;

pub fn run(args: AblateArgs) -> Result<()> {
    let variants = variants::parse_list(args.variants.as_deref().unwrap_or(variants::DEFAULT))?;
    let opts =
        AblateOptions { config: args.cfg.config, sets: args.cfg.set, out: args.out, variants, seeds: args.seeds };
    let a = ablate(&opts).inspect_err(|e| {
        if e.chain().any(|c| c.downcast_ref::<crate::train::Interrupted>().is_some()) {
            eprintln!("resume with: the same alignfuse ablate command (finished runs are skipped, this one resumes)");
        }
    })?;
    println!("{}", a.table);
    println!("report: {}", a.report.display());
    Ok(())
}
