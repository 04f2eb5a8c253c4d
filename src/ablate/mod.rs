//! `alignfuse ablate`: trains variants of the pre-training objectives (the ALBEF Table 1 ladder by default;
//! alpha and queue-size sweeps on request) from one config, evaluates each with the same protocol and
//! writes report.md, results.json and two PNG plots.
//!
//! Runs differ only in their objectives (and seed, with several): the parameters are drawn per name from
//! the seed, so every variant starts from the same weights, and the data are resolved once (the synthetic
//! set generated once under DIR/data), so every variant reads the same pairs in the same order. Each run
//! keeps its own directory `DIR/runs/<name>`; a re-run skips the finished ones and resumes an interrupted one.

pub mod plot;
pub mod progress;
pub mod report;
pub mod run;
pub mod variants;

use crate::config::Config;
use crate::train::TrainSummary;
use anyhow::{ensure, Context, Result};
use progress::{duration, Progress};
use report::Meta;
use run::RunResult;
use std::path::{Path, PathBuf};
use variants::Variant;

pub struct AblateOptions {
    pub config: PathBuf,
    /// `key=value` overrides for every variant, applied before the variant's own.
    pub sets: Vec<String>,
    pub out: PathBuf,
    pub variants: Vec<Variant>,
    /// Runs per variant, with the config's seed, seed + 1, ...
    pub seeds: usize,
}

/// What an ablation produced.
pub struct Ablation {
    pub runs: Vec<RunResult>,
    /// The report's markdown table.
    pub table: String,
    pub report: PathBuf,
}

const LOSS_PLOT: &str = "loss.png";
const VAL_PLOT: &str = "val_r_mean.png";

pub fn ablate(opts: &AblateOptions) -> Result<Ablation> {
    ensure!(opts.seeds >= 1, "--seeds must be at least 1");
    ensure!(!opts.variants.is_empty(), "no variants to run");
    std::fs::create_dir_all(&opts.out).with_context(|| format!("cannot create {}", opts.out.display()))?;
    // Absolute, so that the data paths in each run's config.toml compare equal from any working directory.
    let out = std::fs::canonicalize(&opts.out).with_context(|| format!("cannot resolve {}", opts.out.display()))?;
    let mut base = Config::load(&opts.config, &opts.sets)?;
    crate::data::resolve(&mut base, &out)?;
    let runs = run::plan(&opts.config, &opts.sets, &base, &opts.variants, opts.seeds, &out)?;
    let meta = Meta {
        command: command(opts),
        seeds: (0..opts.seeds as u64).map(|k| base.seed + k).collect(),
        planned_runs: runs.len(),
        eval: base.eval.clone(),
        select: base.train.select,
        eval_ann: base.data.test_ann.clone().or(base.data.val_ann.clone()),
        loss_plot: LOSS_PLOT.into(),
        val_plot: VAL_PLOT.into(),
        loss_window: 1,
    };

    let mut progress = Progress::new(runs.len());
    let mut results: Vec<RunResult> = vec![];
    let mut table = String::new();
    for (k, run) in runs.iter().enumerate() {
        let reused = run.is_finished();
        if reused {
            progress.say(
                k,
                &run.name,
                &format!("finished earlier, skipped ({})", TrainSummary::path(&run.dir).display()),
            );
        } else {
            let how = run
                .resumable()
                .map_or("training".to_string(), |c| format!("resuming the interrupted run from {}", c.display()));
            progress.say(k, &run.name, &format!("{how} in {}; {}", run.dir.display(), progress.eta(k)));
            run.train(progress.label(k, &run.name))?;
        }
        let result = run.result(reused)?;
        progress.finished(result.wall_s);
        if !reused {
            progress.say(k, &run.name, &format!("done in {}{}", duration(result.wall_s), headline(&result)));
        }
        results.push(result);
        // After every run, so that an interrupted ablation still leaves a report of what finished.
        table = write_outputs(&out, &meta, &opts.variants, &results)?;
    }
    Ok(Ablation { runs: results, table, report: out.join("report.md") })
}

/// Both plots, then results.json and report.md; returns the report's table.
fn write_outputs(out: &Path, meta: &Meta, variants: &[Variant], results: &[RunResult]) -> Result<String> {
    let names: Vec<String> = variants.iter().map(|v| v.name.clone()).collect();
    let loss_window = plot::loss(&out.join(LOSS_PLOT), &names, results)?;
    plot::val_r_mean(&out.join(VAL_PLOT), &names, results)?;
    report::write(out, &Meta { loss_window, ..meta.clone() }, variants, results)
}

/// ": test r_mean 45.1 (ITC only 40.2); at `best` (epoch 4) 46.0 (ITC only 41.3)", or nothing without an
/// evaluation.
fn headline(r: &RunResult) -> String {
    let last = match (&r.split, &r.final_eval) {
        (Some(split), Some(e)) => format!(": {split} r_mean {:.1} (ITC only {:.1})", e.rerank.r_mean, e.itc.r_mean),
        _ => return String::new(),
    };
    match &r.best {
        Some(b) => format!(
            "{last}; at `best` (epoch {}) {:.1} (ITC only {:.1})",
            b.epoch, b.metrics.rerank.r_mean, b.metrics.itc.r_mean
        ),
        None => last,
    }
}

/// The command line that repeats (and so resumes) this ablation.
fn command(opts: &AblateOptions) -> String {
    let mut words = vec![
        "alignfuse".to_string(),
        "ablate".into(),
        "--config".into(),
        shell_word(&opts.config.display().to_string()),
    ];
    for s in &opts.sets {
        words.extend(["--set".to_string(), shell_word(s)]);
    }
    let names: Vec<&str> = opts.variants.iter().map(|v| v.name.as_str()).collect();
    words.extend([
        "--variants".to_string(),
        shell_word(&names.join(",")),
        "--seeds".into(),
        opts.seeds.to_string(),
        "--out".into(),
        shell_word(&opts.out.display().to_string()),
    ]);
    words.join(" ")
}

/// `w`, single-quoted when a shell would split or expand it.
fn shell_word(w: &str) -> String {
    if !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || "._/=+,:@-".contains(c)) {
        w.to_string()
    } else {
        format!("'{}'", w.replace('\'', r"'\''"))
    }
}
