//! What a run reports: one JSON record per optimiser step and per evaluation in `OUT/log.jsonl`, a
//! progress bar on a terminal, plain lines otherwise.

use super::tensorboard::EventWriter;
use crate::config::TrainConfig;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::{Path, PathBuf};

/// One optimiser step's numbers: the summed loss, each objective's loss and each metric (`temp`,
/// `itm_acc`) by name, means over the step's micro-batches.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: usize,
    pub loss: f64,
    pub losses: BTreeMap<String, f64>,
    pub lr: f64,
    pub alpha: f64,
    pub metrics: BTreeMap<String, f64>,
    pub grad_norm: f64,
    pub pairs_per_s: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    Step(StepRecord),
    /// Retrieval metrics of a split: `val` after each epoch, `test_at_best` after an epoch that became
    /// `best`, `test` at the end.
    Eval {
        split: String,
        epoch: usize,
        step: usize,
        metrics: serde_json::Value,
    },
}

impl Record {
    fn step(&self) -> usize {
        match self {
            Record::Step(s) => s.step,
            Record::Eval { step, .. } => *step,
        }
    }
}

pub struct RunLog {
    path: PathBuf,
    /// None on data-parallel ranks other than 0, which write and print nothing.
    file: Option<BufWriter<std::fs::File>>,
    /// `train.tensorboard`: the same scalars as TensorBoard events.
    events: Option<EventWriter>,
    bar: Option<ProgressBar>,
    log_every: usize,
    /// `label` plus a space, or empty: prepended to every line for the user.
    prefix: String,
}

impl RunLog {
    /// Opens `OUT/log.jsonl`. When resuming at `resume_step`, records past it (written by the interrupted
    /// run after its last checkpoint) are dropped so the log matches the resumed state; the kept lines stay
    /// byte for byte. `label` starts every line (and the progress bar) for the user.
    pub fn open(
        out: &Path, resume_step: Option<usize>, total_steps: usize, train: &TrainConfig, label: Option<&str>,
    ) -> Result<Self> {
        let prefix = label.map_or(String::new(), |l| format!("{l} "));
        let path = out.join("log.jsonl");
        let kept = match resume_step {
            Some(step) if path.exists() => lines_up_to(&path, step)?,
            _ => String::new(),
        };
        crate::write_atomic(&path, |tmp| Ok(std::fs::write(tmp, &kept)?))?;
        let file = std::fs::OpenOptions::new().append(true).open(&path);
        let file = BufWriter::new(file.with_context(|| format!("cannot write {}", path.display()))?);
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps as u64);
            bar.set_style(
                ProgressStyle::with_template(
                    "{prefix}{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            bar.set_prefix(prefix.clone());
            bar.set_position(resume_step.unwrap_or(0) as u64);
            bar
        });
        let events = train.tensorboard.then(|| EventWriter::create(out, resume_step)).transpose()?;
        Ok(RunLog { path, file: Some(file), events, bar, log_every: train.log_every.max(1), prefix })
    }

    /// The log of a data-parallel rank other than 0: rank 0 reports for every rank.
    pub fn quiet(out: &Path) -> Self {
        RunLog { path: out.join("log.jsonl"), file: None, events: None, bar: None, log_every: 1, prefix: String::new() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn step(&mut self, r: &StepRecord) -> Result<()> {
        if self.file.is_none() {
            return Ok(());
        }
        self.write(&Record::Step(r.clone()))?;
        if let Some(events) = &mut self.events {
            let losses = r.losses.iter().map(|(k, v)| (format!("loss/{k}"), *v));
            let metrics = r.metrics.iter().map(|(k, v)| (k.clone(), *v));
            let fixed = [("loss", r.loss), ("lr", r.lr), ("alpha", r.alpha), ("grad_norm", r.grad_norm)];
            let fixed = fixed.into_iter().chain([("pairs_per_s", r.pairs_per_s)]).map(|(k, v)| (k.to_string(), v));
            let all: Vec<(String, f64)> = fixed.chain(losses).chain(metrics).collect();
            events.scalars(r.step, all.iter().map(|(k, v)| (k.as_str(), *v)))?;
        }
        let line = format!(
            "epoch {} step {} loss {:.4} ({}) lr {:.2e} alpha {:.3} {} {:.1} pairs/s",
            r.epoch,
            r.step,
            r.loss,
            named(&r.losses),
            r.lr,
            r.alpha,
            named(&r.metrics),
            r.pairs_per_s
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.step as u64);
                bar.set_message(line);
            }
            None if r.step.is_multiple_of(self.log_every) => eprintln!("{}{line}", self.prefix),
            None => {}
        }
        Ok(())
    }

    pub fn eval(&mut self, split: &str, epoch: usize, step: usize, metrics: serde_json::Value) -> Result<()> {
        if let Some(events) = &mut self.events {
            let mut scalars = vec![];
            numbers(&metrics, split, &mut scalars);
            events.scalars(step, scalars.iter().map(|(k, v)| (k.as_str(), *v)))?;
        }
        self.write(&Record::Eval { split: split.into(), epoch, step, metrics })
    }

    /// A line for the user that must not be overwritten by the progress bar.
    pub fn say(&self, msg: &str) {
        if self.file.is_none() {
            return;
        }
        let line = format!("{}{msg}", self.prefix);
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn write(&mut self, r: &Record) -> Result<()> {
        if let Some(file) = &mut self.file {
            writeln!(file, "{}", serde_json::to_string(r)?)?;
            file.flush()?;
        }
        Ok(())
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The numbers in `v`, tagged by their path under `prefix` (`val/itc/txt_r1`).
fn numbers(v: &serde_json::Value, prefix: &str, out: &mut Vec<(String, f64)>) {
    match v {
        serde_json::Value::Number(n) => out.extend(n.as_f64().map(|x| (prefix.to_string(), x))),
        serde_json::Value::Object(map) => map.iter().for_each(|(k, v)| numbers(v, &format!("{prefix}/{k}"), out)),
        _ => {}
    }
}

/// `name value` pairs, four decimals: `itc 2.3026 itm 0.6931`.
pub fn named(values: &BTreeMap<String, f64>) -> String {
    values.iter().map(|(k, v)| format!("{k} {v:.4}")).collect::<Vec<_>>().join(" ")
}

/// The lines of a log up to step `step`, verbatim. A last line that does not parse (the process was
/// killed while writing it) is dropped with a message; a malformed line before it is an error.
fn lines_up_to(path: &Path, step: usize) -> Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let lines: Vec<(usize, &str)> = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let mut kept = String::new();
    for (k, &(i, line)) in lines.iter().enumerate() {
        match serde_json::from_str::<Record>(line) {
            Ok(r) if r.step() <= step => {
                kept.push_str(line);
                kept.push('\n');
            }
            Ok(_) => {}
            Err(_) if k + 1 == lines.len() => {
                eprintln!(
                    "{}:{}: dropped a torn last line (the run was stopped while writing it)",
                    path.display(),
                    i + 1
                )
            }
            Err(e) => bail!("{}:{}: not a log record: {e}", path.display(), i + 1),
        }
    }
    Ok(kept)
}

/// All records of a log file; a malformed line is an error naming its line number.
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}:{}: not a log record", path.display(), i + 1))
        })
        .collect()
}
