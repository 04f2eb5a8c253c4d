//! `alignfuse ablate`: variant names, the report and plots from fixed results, and an end-to-end ablation
//! of two micro variants that is re-run (skips), resumed and refused on a changed config.

mod common;
use alignfuse::ablate::run::{EpochEval, EvalMetrics, RunResult};
use alignfuse::ablate::variants::{parse, parse_list, DEFAULT};
use alignfuse::ablate::{plot, report};
use alignfuse::config::{EvalConfig, Select};
use alignfuse::eval::metrics::Metrics;
use alignfuse::train::log::StepRecord;
use common::{micro_config, scratch};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[test]
fn default_ladder_sets_every_objective() {
    let ladder = parse_list(DEFAULT).unwrap();
    let names: Vec<&str> = ladder.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["itc", "itc+mlm", "itc+mlm+itm_rand", "itc+mlm+itm_hard", "full"]);
    assert_eq!(
        ladder[0].overrides,
        ["objectives.itc=true", "objectives.mlm=false", "objectives.itm=false", "objectives.distill=false"]
    );
    assert!(ladder[2].overrides.contains(&"objectives.itm_negatives=random".to_string()));
    assert!(ladder[3].overrides.contains(&"objectives.distill=false".to_string()));
    assert_eq!(
        ladder[4].overrides,
        [
            "objectives.itc=true",
            "objectives.mlm=true",
            "objectives.itm=true",
            "objectives.distill=true",
            "objectives.itm_negatives=hard"
        ]
    );
}

#[test]
fn names_are_canonical_and_sweeps_apply_to_full() {
    assert_eq!(parse("mlm + itc").unwrap().name, "itc+mlm");
    assert_eq!(parse("itm_hard+mod+mlm+itc").unwrap().name, "full");
    let alpha = parse("alpha=0.20").unwrap();
    assert_eq!(alpha.name, "alpha=0.2");
    assert_eq!(parse("full+alpha=0.2").unwrap(), alpha);
    assert!(alpha.overrides.contains(&"objectives.distill=true".to_string()));
    assert!(alpha.overrides.contains(&"model.alpha=0.2".to_string()));
    assert_eq!(parse("alpha=1").unwrap().overrides.last().unwrap(), "model.alpha=1.0", "a TOML float, not an integer");
    let q = parse("itc+mod+queue=256").unwrap();
    assert_eq!(q.name, "itc+mod+queue=256");
    assert!(q.overrides.contains(&"model.queue_size=256".to_string()));
    assert_eq!(parse("queue=64+alpha=0").unwrap().name, "alpha=0+queue=64");
}

#[test]
fn bad_variants_are_explained() {
    for (spec, why) in [
        ("foo", "unknown or repeated part `foo`"),
        ("itc+itc", "repeats"),
        ("full+mlm", "repeats"),
        ("itm_rand+itm_hard", "ITM a second time"),
        ("alpha=2", "not a number in [0, 1]"),
        ("alpha=x", "not a number in [0, 1]"),
        ("alpha=0.1+alpha=0.2", "repeated part"),
        ("queue=0", "whole number >= 1"),
        ("itc+alpha=0.2", "add `mod`"),
        ("mlm+itm_hard+queue=8", "add `itc`"),
        ("", "empty name"),
    ] {
        let msg = format!("{:#}", parse(spec).unwrap_err());
        assert!(msg.contains(why), "{spec:?}: {msg}");
        assert!(msg.contains("itm_rand") && msg.contains("queue=N"), "the error lists the valid forms: {msg}");
    }
    let msg = format!("{:#}", parse_list("itc+mlm,mlm+itc").unwrap_err());
    assert!(msg.contains("listed twice"), "{msg}");
}

fn metrics(r: f64) -> Metrics {
    Metrics {
        tr_r1: r,
        tr_r5: r + 10.0,
        tr_r10: r + 20.0,
        ir_r1: r,
        ir_r5: r + 10.0,
        ir_r10: r + 20.0,
        tr_mean: r + 10.0,
        ir_mean: r + 10.0,
        r_mean: r + 10.0,
    }
}

/// A finished run whose numbers grow with `level`.
fn fake_run(variant: &str, seed: u64, level: f64, itm: bool) -> RunResult {
    let eval =
        |e: usize| EvalMetrics { itc: metrics(level + e as f64), rerank: metrics(level + 2.0 * e as f64), images: 100 };
    let loss: Vec<(usize, f64)> =
        (1..=120).map(|s| (s, 8.0 / (1.0 + s as f64 / 30.0) - level / 100.0 + 0.2 * ((s * 7) % 5) as f64)).collect();
    let mut losses = BTreeMap::from([("itc".to_string(), 1.0), ("mlm".to_string(), 0.5)]);
    if itm {
        losses.insert("itm".into(), 0.5);
    }
    let metrics = BTreeMap::from([("temp".to_string(), 0.05)]);
    let last = StepRecord {
        step: 120,
        epoch: 2,
        loss: 2.0,
        losses,
        lr: 1e-5,
        alpha: 0.0,
        metrics,
        grad_norm: 1.0,
        pairs_per_s: 30.0,
    };
    RunResult {
        variant: variant.into(),
        seed,
        dir: PathBuf::from(format!("runs/{variant}")),
        itm,
        reused: false,
        resumed_from: None,
        steps: 120,
        wall_s: 60.0 + level,
        pairs_per_s: 30.0 + level,
        last: Some(last),
        split: Some("test".into()),
        final_eval: Some(eval(3)),
        best: Some(EpochEval { epoch: 1, metrics: eval(1) }),
        val: (0..3).map(|epoch| EpochEval { epoch, metrics: eval(epoch) }).collect(),
        loss,
    }
}

/// A PNG of the chart size plus a legend strip, with curves in colour.
fn assert_png(path: &Path, (w, h): (u32, u32)) {
    let img = image::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).to_rgb8();
    assert!(img.width() > w && img.height() == h, "{}: {:?}", path.display(), img.dimensions());
    let colored = img.pixels().filter(|p| p.0.iter().max().unwrap() - p.0.iter().min().unwrap() > 60).count();
    assert!(colored > 500, "{}: only {colored} coloured pixels, no curves drawn?", path.display());
}

#[test]
fn report_and_plots_from_fixed_results() {
    let out = scratch("ablate-report");
    std::fs::create_dir_all(&out).unwrap();
    let variants = parse_list("itc,full").unwrap();
    let runs = vec![fake_run("itc", 1, 20.0, false), fake_run("itc", 2, 24.0, false), fake_run("full", 1, 40.0, true)];
    let names: Vec<String> = variants.iter().map(|v| v.name.clone()).collect();
    let window = plot::loss(&out.join("loss.png"), &names, &runs).unwrap();
    assert_eq!(window, 4, "120 steps: a 4-step moving average");
    plot::val_r_mean(&out.join("val.png"), &names, &runs).unwrap();
    assert_png(&out.join("loss.png"), (960, 560));
    assert_png(&out.join("val.png"), (1280, 560));

    let meta = report::Meta {
        command: "alignfuse ablate --config x.toml --out y".into(),
        seeds: vec![1, 2],
        planned_runs: 4,
        eval: EvalConfig::default(),
        select: Select::Rerank,
        eval_ann: Some("test.json".into()),
        loss_plot: "loss.png".into(),
        val_plot: "val.png".into(),
        loss_window: window,
    };
    let table = report::write(&out, &meta, &variants, &runs).unwrap();
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains(&table));
    assert!(md.contains("3 of 4 runs finished"), "{md}");
    // itc over seeds: TR@1 of 26 and 30 (level + 2 * 3 epochs) -> 28.0 ± 2.8 (sample std); no ITM loss.
    let itc_row = table.lines().find(|l| l.starts_with("| `itc`")).unwrap();
    assert!(itc_row.contains("`itc` † | 2 | 28.0 ± 2.8 |"), "{itc_row}");
    assert!(itc_row.contains("| – |"), "no itm loss: {itc_row}");
    let full_row = table.lines().find(|l| l.starts_with("| `full`")).unwrap();
    assert!(full_row.contains("| `full` | 1 | 46.0 |") && full_row.contains("1m 40s"), "{full_row}");
    // r_mean and ITC r_mean of the last epoch (level + 2 * 3 + 10, level + 3 + 10), then at `best`, epoch 1.
    assert!(full_row.contains("| 56.0 | 53.0 | 52.0 | 51.0 |"), "{full_row}");
    assert!(itc_row.contains("| 34.0 ± 2.8 | 33.0 ± 2.8 |"), "{itc_row}");
    assert!(
        md.contains("the highest re-ranked validation r_mean") && md.contains("| `full` | 1 | 120 | test | 1 |"),
        "{md}"
    );
    assert!(md.contains("![training loss](loss.png)") && md.contains("moving average over 4 steps"));
    assert!(md.contains("sample standard deviation"));
    // Chance over 100 images: IR R@1/5/10 = 1, 5, 10 %; TR = 1 - 0.99^K = 1, 4.90, 9.56 %.
    assert!(md.contains("its 100 images scores r_mean ≈ 5.2."), "{md}");

    let json: Value = serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let itc = &json["variants"][0];
    assert_eq!(itc["name"], "itc");
    assert_eq!(itc["runs"].as_array().unwrap().len(), 2);
    assert_eq!(itc["stats"]["tr_r1"]["mean"], 28.0);
    assert_eq!(itc["stats"]["tr_r1"]["min"], 26.0);
    assert!(itc["stats"].get("loss_itm").is_none());
    assert_eq!(json["variants"][1]["runs"][0]["val"][2]["rerank"]["r_mean"], 54.0);
    assert_eq!(json["finished_runs"], 3);
    assert_eq!(json["command"], meta.command);
}

fn ablate(cfg_file: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_alignfuse"))
        .args(["ablate", "--config"])
        .arg(cfg_file)
        .arg("--out")
        .arg(out)
        .args(["--variants", "itc,full"])
        .args(extra)
        .env("RAYON_NUM_THREADS", "1")
        .output()
        .unwrap()
}

fn results(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn end_to_end_skips_finished_and_resumes_interrupted() {
    let out = scratch("ablate-e2e");
    std::fs::create_dir_all(&out).unwrap();
    let cfg_file = out.join("micro.toml");
    std::fs::write(&cfg_file, toml::to_string(&micro_config(&[])).unwrap()).unwrap();

    let first = ablate(&cfg_file, &out, &[]);
    assert!(first.status.success(), "{}", stderr(&first));
    for f in [
        "report.md",
        "results.json",
        "loss.png",
        "val_r_mean.png",
        "runs/itc/summary.json",
        "runs/full/summary.json",
        "runs/full/config.toml",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let data: Vec<_> = std::fs::read_dir(out.join("data")).unwrap().collect();
    assert_eq!(data.len(), 1, "one shared dataset");
    let r1 = results(&out);
    assert_eq!(r1["finished_runs"], 2);
    let full = &r1["variants"][1]["runs"][0];
    assert_eq!(full["variant"], "full");
    assert_eq!(full["steps"], 16);
    assert!(full["final_eval"]["rerank"]["r_mean"].is_number());
    assert_eq!(full["val"].as_array().unwrap().len(), 2);
    // The test split at `best` is the trainer's, from summary.json.
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("runs/full/summary.json")).unwrap()).unwrap();
    assert_eq!(full["best"]["epoch"], summary["test_at_best"]["epoch"]);
    assert_eq!(full["best"]["rerank"], summary["test_at_best"]["report"]["rerank"]);
    assert_eq!(r1["variants"][0]["runs"][0]["last"]["itm"], Value::Null, "itc trains no ITM");
    let report = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(report.contains("| `itc` † | 1 |") && report.contains("| `full` | 1 |"), "{report}");

    // Re-run: both are skipped; their numbers (wall times included) are read back unchanged.
    let again = ablate(&cfg_file, &out, &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(stderr(&again).matches("finished earlier, skipped").count(), 2, "{}", stderr(&again));
    let r2 = results(&out);
    for v in 0..2 {
        let (a, b) = (&r1["variants"][v]["runs"][0], &r2["variants"][v]["runs"][0]);
        assert_eq!(b["reused"], true);
        for key in ["wall_s", "final_eval", "last", "val"] {
            assert_eq!(a[key], b[key], "{key} changed on a re-run");
        }
    }

    // An interrupted run (no summary.json, a checkpoint) resumes from it: here at its last step, so only
    // the final evaluation runs again, and it gives the same numbers.
    std::fs::remove_file(out.join("runs/full/summary.json")).unwrap();
    let resumed = ablate(&cfg_file, &out, &[]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(stderr(&resumed).contains("resuming the interrupted run"), "{}", stderr(&resumed));
    let r3 = results(&out);
    let full3 = &r3["variants"][1]["runs"][0];
    assert_eq!(full3["resumed_from"], 16);
    assert_eq!(full3["final_eval"], full["final_eval"]);
    assert!(std::fs::read_to_string(out.join("report.md")).unwrap().contains("| `full` * | 1 |"));

    // A changed config is refused before anything trains, naming the run directory and the key.
    let changed = ablate(&cfg_file, &out, &["--set", "train.epochs=3"]);
    assert!(!changed.status.success());
    let msg = stderr(&changed);
    assert!(msg.contains("runs/itc/config.toml") && msg.contains("train.epochs"), "{msg}");
}
