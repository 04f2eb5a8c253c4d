//! The ablation's report: `report.md` (one table row per variant: mean ± sample standard deviation over
//! its seeds) and `results.json` (every run's numbers, and per variant the mean, std, min and max of
//! each table column).

use super::progress::duration;
use super::run::RunResult;
use super::variants::Variant;
use crate::config::{EvalConfig, RerankScore, Select};
use crate::eval::metrics::Metrics;
use anyhow::Result;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// What the report says about how the ablation was run.
#[derive(Debug, Clone, Serialize)]
pub struct Meta {
    /// The command line that reproduces (and resumes) the ablation.
    pub command: String,
    pub seeds: Vec<u64>,
    pub planned_runs: usize,
    pub eval: EvalConfig,
    /// What picks the `best` checkpoint.
    pub select: Select,
    /// The annotation file of the final evaluation (test, else val).
    pub eval_ann: Option<PathBuf>,
    /// File names of the plots, beside the report.
    pub loss_plot: String,
    pub val_plot: String,
    /// Moving-average window of the loss plot.
    pub loss_window: usize,
}

/// A column's value of a run.
type Getter = Box<dyn Fn(&RunResult) -> Option<f64>>;

/// One table column: its results.json key, header, value of a run and format.
struct Column {
    key: String,
    header: String,
    get: Getter,
    fmt: fn(f64) -> String,
}

impl Column {
    fn new(key: &str, header: &str, get: impl Fn(&RunResult) -> Option<f64> + 'static, fmt: fn(f64) -> String) -> Self {
        Column { key: key.into(), header: header.into(), get: Box::new(get), fmt }
    }
}

/// The table's columns: re-ranked R@K, ITC r_mean, the last step's loss of every objective any run
/// logged (in name order), wall time and throughput.
fn columns(runs: &[RunResult]) -> Vec<Column> {
    let recall = |key: &str, header: &str, get: fn(&Metrics) -> f64| {
        Column::new(key, header, move |r: &RunResult| r.final_eval.map(|e| get(&e.rerank)), pct)
    };
    let mut cols = vec![
        recall("tr_r1", "TR@1", |m| m.tr_r1),
        recall("tr_r5", "TR@5", |m| m.tr_r5),
        recall("tr_r10", "TR@10", |m| m.tr_r10),
        recall("ir_r1", "IR@1", |m| m.ir_r1),
        recall("ir_r5", "IR@5", |m| m.ir_r5),
        recall("ir_r10", "IR@10", |m| m.ir_r10),
        recall("r_mean", "r_mean", |m| m.r_mean),
        Column::new("itc_r_mean", "ITC r_mean", |r| r.final_eval.map(|e| e.itc.r_mean), pct),
        Column::new("best_r_mean", "r_mean at best", |r| r.best.as_ref().map(|b| b.metrics.rerank.r_mean), pct),
        Column::new("best_itc_r_mean", "ITC at best", |r| r.best.as_ref().map(|b| b.metrics.itc.r_mean), pct),
    ];
    let losses: BTreeSet<&String> = runs.iter().filter_map(|r| r.last.as_ref()).flat_map(|s| s.losses.keys()).collect();
    for name in losses {
        let owned = name.clone();
        let get = move |r: &RunResult| r.last.as_ref().and_then(|s| s.losses.get(&owned).copied());
        cols.push(Column::new(&format!("loss_{name}"), name, get, loss));
    }
    cols.push(Column::new("wall_s", "wall", |r| Some(r.wall_s), duration));
    cols.push(Column::new("pairs_per_s", "pairs/s", |r| Some(r.pairs_per_s), |v| format!("{v:.0}")));
    cols
}

fn pct(v: f64) -> String {
    format!("{v:.1}")
}

fn loss(v: f64) -> String {
    format!("{v:.3}")
}

/// A column over a variant's seeds. `std` is the sample standard deviation (n - 1; 0 for one seed).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stat {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl Stat {
    fn of(values: &[f64]) -> Option<Stat> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        let (min, max) = values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        Some(Stat { n, mean, std: var.sqrt(), min, max })
    }
}

#[derive(Serialize)]
struct Results<'a> {
    #[serde(flatten)]
    meta: &'a Meta,
    finished_runs: usize,
    variants: Vec<VariantResults<'a>>,
}

#[derive(Serialize)]
struct VariantResults<'a> {
    name: &'a str,
    overrides: &'a [String],
    runs: Vec<&'a RunResult>,
    /// Per table column (by key): the statistic over the finished runs.
    stats: BTreeMap<String, Stat>,
}

/// Writes `report.md` and `results.json` into `out` and returns the markdown table. Variants without a
/// finished run yet are left out; a partial ablation says how many runs are done.
pub fn write(out: &Path, meta: &Meta, variants: &[Variant], runs: &[RunResult]) -> Result<String> {
    let groups: Vec<(&Variant, Vec<&RunResult>)> = variants
        .iter()
        .map(|v| (v, runs.iter().filter(|r| r.variant == v.name).collect::<Vec<_>>()))
        .filter(|(_, rs)| !rs.is_empty())
        .collect();
    let columns = columns(runs);
    let results = Results {
        meta,
        finished_runs: runs.len(),
        variants: groups
            .iter()
            .map(|(v, rs)| VariantResults {
                name: &v.name,
                overrides: &v.overrides,
                runs: rs.clone(),
                stats: columns.iter().filter_map(|c| Some((c.key.clone(), stat(c, rs)?))).collect(),
            })
            .collect(),
    };
    let json = serde_json::to_string_pretty(&results)?;
    crate::write_atomic(&out.join("results.json"), |tmp| Ok(std::fs::write(tmp, &json)?))?;

    let table = table(&columns, &groups);
    let md = markdown(meta, &groups, runs, &table);
    crate::write_atomic(&out.join("report.md"), |tmp| Ok(std::fs::write(tmp, &md)?))?;
    Ok(table)
}

fn stat(c: &Column, runs: &[&RunResult]) -> Option<Stat> {
    Stat::of(&runs.iter().filter_map(|r| (c.get)(r)).collect::<Vec<_>>())
}

/// The markdown table; a cell is `mean` for one run and `mean ± std` for several. Variant marks: `†` no
/// ITM trained, `*` a run was resumed.
fn table(columns: &[Column], groups: &[(&Variant, Vec<&RunResult>)]) -> String {
    let mut t = String::from("| variant | runs |");
    for c in columns {
        let _ = write!(t, " {} |", c.header);
    }
    t.push_str("\n|---|---:|");
    t.push_str(&"---:|".repeat(columns.len()));
    for (v, rs) in groups {
        let marks = format!(
            "{}{}",
            if rs.iter().any(|r| !r.itm) { " †" } else { "" },
            if rs.iter().any(|r| r.resumed_from.is_some()) { " *" } else { "" }
        );
        let _ = write!(t, "\n| `{}`{marks} | {} |", v.name, rs.len());
        for c in columns {
            let cell = match stat(c, rs) {
                None => "–".to_string(),
                Some(s) if s.n == 1 => (c.fmt)(s.mean),
                Some(s) => format!("{} ± {}", (c.fmt)(s.mean), (c.fmt)(s.std)),
            };
            let _ = write!(t, " {cell} |");
        }
    }
    t.push('\n');
    t
}

fn markdown(meta: &Meta, groups: &[(&Variant, Vec<&RunResult>)], runs: &[RunResult], table: &str) -> String {
    let mut md = String::from("# Ablation\n\n");
    let _ = writeln!(md, "```\n{}\n```\n", meta.command);
    let seeds: Vec<String> = meta.seeds.iter().map(|s| s.to_string()).collect();
    let _ = writeln!(md, "{} of {} runs finished; seeds {}.", runs.len(), meta.planned_runs, seeds.join(", "));
    let split = runs.iter().find_map(|r| r.split.clone()).unwrap_or_else(|| "no evaluation".into());
    let score = match meta.eval.score {
        RerankScore::Itm => "the ITM logit",
        RerankScore::ItmItc => "the ITM logit + ITC similarity",
    };
    let ann = meta.eval_ann.as_ref().map_or(String::new(), |p| format!(" ({})", p.display()));
    let _ = write!(
        md,
        "Every run starts from the same initialisation (each parameter is drawn from the seed and \
its name), reads the same data in the same order and is evaluated the same way: retrieval on the {split} split{ann}, \
the top {} candidates of each query re-ranked by {score}.",
        meta.eval.k_test
    );
    if let Some(e) = runs.iter().find_map(|r| r.final_eval) {
        let _ = write!(md, " A random ranking of its {} images scores r_mean ≈ {:.1}.", e.images, e.chance_r_mean());
    }
    md.push_str("\n\n");
    md.push_str(table);
    md.push('\n');
    md.push_str(&notes(meta, groups, runs));
    md.push_str("\n## Variants\n\n");
    for (v, _) in groups {
        let _ = writeln!(md, "- `{}`: {}", v.name, v.overrides.join(", "));
    }
    let _ = writeln!(
        md,
        "\n## Plots\n\nTotal training loss per step{} (the total sums different objectives in \
different rows; compare slopes, not levels):\n\n![training loss]({})\n\nValidation r_mean after each epoch, \
ITM re-ranked and ITC only:\n\n![validation r_mean]({})\n",
        if meta.loss_window > 1 { format!(", moving average over {} steps", meta.loss_window) } else { String::new() },
        meta.loss_plot,
        meta.val_plot
    );
    md.push_str(
        "## Runs\n\n| run | seed | steps | final split | best epoch | directory |\n|---|---:|---:|---|---:|---|\n",
    );
    for r in runs {
        let _ = writeln!(
            md,
            "| `{}` | {} | {} | {} | {} | {}{} |",
            r.variant,
            r.seed,
            r.steps,
            r.split.as_deref().unwrap_or("–"),
            r.best.as_ref().map_or("–".to_string(), |b| b.epoch.to_string()),
            r.dir.display(),
            if r.reused { " (finished earlier)" } else { "" }
        );
    }
    md
}

/// The bullet points under the table: what the columns mean and the marks used.
fn notes(meta: &Meta, groups: &[(&Variant, Vec<&RunResult>)], runs: &[RunResult]) -> String {
    let mut md = String::new();
    md.push_str(
        "- R@K in %, after ITM re-ranking; r_mean is the mean of the six R@K. ITC r_mean: ranked by ITC \
similarity alone.\n",
    );
    if runs.iter().any(|r| r.best.is_some()) {
        let _ = writeln!(
            md,
            "- r_mean at best, ITC at best: the test split at the `best` checkpoint, the epoch of the highest {} \
validation r_mean (`train.select`), as ALBEF reports retrieval; its epoch is under Runs. The other columns \
are the last epoch's.",
            meta.select.describe(),
        );
    }
    if runs.iter().any(|r| !r.itm) {
        md.push_str(
            "- † no ITM objective: the ITM head stays at its random initialisation, so the re-ranked columns \
are not meaningful for this row and its `best` follows ITC-only validation; compare its ITC columns.\n",
        );
    }
    if meta.eval.k_test < 10 {
        let _ = writeln!(
            md,
            "- k_test = {} < 10: a ground truth outside the top k ties with every candidate outside it \
after re-ranking, so the re-ranked R@K for K > k counts it at the random-tie expectation.",
            meta.eval.k_test
        );
    }
    md.push_str(
        "- loss columns (itc / itm / mlm): losses of the last optimiser step (one batch). With `mod` \
(momentum distillation) ITC and MLM are cross-entropies against soft targets, bounded below by the targets' \
entropy, so they are not comparable with the rows without it.\n",
    );
    md.push_str(
        "- wall: training plus validation after each epoch and the final evaluation. pairs/s: median \
training-step throughput (forward, backward, update).\n",
    );
    if runs.iter().any(|r| r.resumed_from.is_some()) {
        md.push_str("- * resumed after an interruption: wall covers the last session only.\n");
    }
    if groups.iter().any(|(_, rs)| rs.len() > 1) {
        md.push_str(
            "- Several seeds: mean ± sample standard deviation (n − 1) over the seeds; min and max are in \
results.json.\n",
        );
    }
    md
}
