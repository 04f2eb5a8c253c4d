//! `alignfuse train`: the main job.

use super::TrainArgs;
use crate::config::Config;
use crate::train::log::named;
use crate::train::{train, Interrupted, TrainOptions};
use anyhow::Result;

pub fn run(args: TrainArgs) -> Result<()> {
    let cfg = Config::load(&args.cfg.config, &args.cfg.set)?;
    let select = cfg.select();
    let dist = crate::dist::current(&cfg.device)?;
    let opts = TrainOptions {
        out: args.out.clone(),
        resume: args.resume.clone(),
        max_steps: args.max_steps,
        label: None,
        overwrite: args.overwrite,
    };
    let s = match train(cfg, &opts) {
        Ok(s) => s,
        Err(e) => {
            if e.downcast_ref::<Interrupted>().is_some() && dist.is_main() {
                let launcher = match dist.engine() {
                    "mpi" => format!("mpirun -np {} ", dist.world()),
                    "nccl" => format!("(every rank, as launched, {} in all) ", dist.world()),
                    _ => String::new(),
                };
                eprintln!("resume with: {launcher}{}", resume_command(&args));
            }
            return Err(e);
        }
    };
    if !dist.is_main() {
        // Rank 0 reports and writes the summary for the job.
        return Ok(());
    }
    println!("trained {} steps in {:.1} s; checkpoint {}", s.steps, s.wall_s, s.checkpoint.display());
    if let Some(r) = &s.last {
        println!("last step: loss {:.4} ({}), {:.1} pairs/s", r.loss, named(&r.losses), r.pairs_per_s);
    }
    if s.skipped_steps + s.skipped_images > 0 {
        println!("skipped: {} non-finite steps, {} bad images or samples", s.skipped_steps, s.skipped_images);
    }
    let by = format!("the best by {} validation r_mean, train.select", select.describe());
    match (&s.test, &s.test_at_best) {
        (Some(t), Some(b)) if b.step == s.steps => println!("\ntest retrieval (the last epoch, also {by}):\n{t}"),
        (Some(t), Some(b)) => {
            println!("\ntest retrieval at the last epoch:\n{t}");
            let at = format!("epoch {} (step {}), {by}; ALBEF reports this one", b.epoch, b.step);
            println!("\ntest retrieval at the `best` checkpoint, {at}:\n{}", b.report);
        }
        (Some(t), None) => println!("\ntest retrieval:\n{t}"),
        (None, _) => {}
    }
    let summary = s.save(&args.out)?;
    println!("log: {}  summary: {}", args.out.join("log.jsonl").display(), summary.display());
    Ok(())
}

/// This command again, continuing from the run's latest checkpoint.
fn resume_command(args: &TrainArgs) -> String {
    let mut cmd = format!("alignfuse train --config {} --out {}", args.cfg.config.display(), args.out.display());
    for set in &args.cfg.set {
        cmd.push_str(&format!(" --set {set}"));
    }
    if let Some(n) = args.max_steps {
        cmd.push_str(&format!(" --max-steps {n}"));
    }
    cmd + " --resume latest"
}
