//! `alignfuse import`: pretrained weights into a complete alignfuse checkpoint, with a report of every
//! source key.

use super::ImportArgs;
use crate::config::Config;
use crate::import::{import, save, Format, Options};
use anyhow::{Context, Result};
use std::path::Path;

pub fn run(args: ImportArgs) -> Result<()> {
    crate::refuse_existing(std::iter::once(args.out.as_path()).chain(args.report.as_deref()), args.overwrite)?;
    let cfg = Config::load(&args.cfg.config, &args.cfg.set)?;
    let format: Format = args.from.parse()?;
    let opts = Options {
        fusion_from: args.fusion_from,
        hub_format: args.hub_format.as_deref().map(str::parse).transpose()?,
        init: args.init,
    };
    let (tensors, report) = import(format, Path::new(&args.src), &cfg, &opts)?;
    save(&tensors, &cfg, &args.out)?;
    print!("{report}");
    if let Some(path) = &args.report {
        crate::write_atomic(path, |tmp| Ok(std::fs::write(tmp, serde_json::to_string_pretty(&report)?)?))
            .with_context(|| format!("writing the import report {}", path.display()))?;
    }
    println!("wrote {} ({} tensors)", args.out.display(), tensors.len());
    Ok(())
}
