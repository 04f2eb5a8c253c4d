//! `alignfuse train`: the main job.

use super::TrainArgs;
use crate::config::Config;
use crate::train::log::named;
use crate::train::{train, TrainOptions};
use anyhow::Result;

pub fn run(args: TrainArgs) -> Result<()> {
    let cfg = Config::load(&args.cfg.config, &args.cfg.set)?;
    let opts = TrainOptions { out: args.out.clone(), resume: args.resume, max_steps: args.max_steps, label: None };
    let s = train(cfg, &opts)?;
    println!("trained {} steps in {:.1} s; checkpoint {}", s.steps, s.wall_s, s.checkpoint.display());
    if let Some(r) = &s.last {
        println!("last step: loss {:.4} ({}), {:.1} pairs/s", r.loss, named(&r.losses), r.pairs_per_s);
    }
    if s.skipped_steps + s.skipped_images > 0 {
        println!("skipped: {} non-finite steps, {} unreadable images", s.skipped_steps, s.skipped_images);
    }
    if let Some(t) = &s.test {
        println!("\ntest retrieval:\n{t}");
    }
    let summary = s.save(&args.out)?;
    println!("log: {}  summary: {}", args.out.join("log.jsonl").display(), summary.display());
    Ok(())
}
