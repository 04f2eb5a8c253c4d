//! `alignfuse bench`: throughput benchmarks. Each reports ratios against a baseline measured in the
//! same run where one exists.

use super::BenchArgs;
use crate::config::Config;
use anyhow::{bail, Context, Result};

pub fn run(args: BenchArgs) -> Result<()> {
    let cfg = || -> Result<Config> {
        let path = args.config.as_ref().context("this benchmark needs --config")?;
        Config::load(path, &args.set)
    };
    let json = match args.what.as_str() {
        "train" => {
            let dir = std::env::temp_dir().join("alignfuse-bench");
            let r = crate::train::bench::bench_train(cfg()?, &dir, args.steps)?;
            println!("{r}");
            serde_json::to_value(&r)?
        }
        "rerank" => {
            let cfg = cfg()?;
            let device = crate::device(&cfg.device)?;
            let r = crate::eval::bench::bench_rerank(&cfg, args.images, cfg.eval.k_test, &device)?;
            println!("{r}");
            serde_json::to_value(&r)?
        }
        "data" => {
            let mut cfg = cfg()?;
            let paths = match &args.data {
                Some(dir) => image_files(dir)?,
                None => {
                    crate::train::ensure_data(&mut cfg, &std::env::temp_dir().join("alignfuse-bench"))?;
                    let text = crate::train::text_options(&cfg);
                    let set = crate::data::annotations::TrainSet::load(&cfg.data.train_ann, cfg.data.image_root.as_deref(), text, true)?;
                    set.entries.into_iter().map(|e| e.image).collect()
                }
            };
            let transform = crate::data::image::TrainTransform::from_config(&cfg.data, cfg.model.vision.image_res);
            let r = crate::data::image::bench_transforms(&paths, &transform, cfg.data.num_workers, 2)?;
            println!("decode + train transform at {} px: {r}", cfg.model.vision.image_res);
            serde_json::json!({"images": r.images, "threads": r.threads, "seconds": r.seconds, "images_per_sec": r.images_per_sec})
        }
        "kernels" => {
            let device = match &args.config {
                Some(p) => crate::device(&Config::load(p, &args.set)?.device)?,
                None => crate::device("auto")?,
            };
            let r = crate::ops::bench_ops(&device, args.steps)?;
            println!("{r}");
            serde_json::to_value(&r)?
        }
        other => bail!("unknown benchmark `{other}`: use train, rerank, data or kernels"),
    };
    if let Some(p) = &args.json {
        let text = serde_json::to_string_pretty(&json)?;
    crate::write_atomic(p, |tmp| Ok(std::fs::write(tmp, text)?))?;
    }
    Ok(())
}

/// PNG and JPEG files under `dir`, recursively, in sorted order.
fn image_files(dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))? {
            let p = entry?.path();
            let ext = p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
            if p.is_dir() {
                stack.push(p);
            } else if matches!(ext.as_deref(), Some("png" | "jpg" | "jpeg")) {
                out.push(p);
            }
        }
    }
    out.sort();
    anyhow::ensure!(!out.is_empty(), "no PNG or JPEG images under {}", dir.display());
    Ok(out)
}
