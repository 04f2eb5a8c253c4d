//! `alignfuse bench`: throughput benchmarks. Each reports ratios against a baseline measured in the
//! same run where one exists.

use super::BenchArgs;
use crate::config::Config;
use anyhow::{bail, Context, Result};

pub fn run(args: BenchArgs) -> Result<()> {
    crate::refuse_existing(args.json.as_deref(), args.overwrite)?;
    let cfg = || -> Result<Config> {
        let path = args.config.as_ref().context("this benchmark needs --config")?;
        Config::load(path, &args.set)
    };
    let work_dir = std::env::temp_dir().join("alignfuse-bench");
    let json = match args.what.as_str() {
        "train" => {
            let cfg = cfg()?;
            let dist = crate::dist::current(&cfg.device)?;
            let r = crate::train::bench::bench_train(cfg, &work_dir, args.steps)?;
            if !dist.is_main() {
                return Ok(()); // rank 0 reports for the job
            }
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
        "data" if args.shards => {
            let r = crate::data::shards::bench(cfg()?, &work_dir, args.cold)?;
            println!("{r}");
            serde_json::to_value(&r)?
        }
        "data" => {
            let cfg = cfg()?;
            let res = cfg.model.vision.image_res;
            let r = crate::data::image::bench_images(cfg, args.data.as_deref(), &work_dir)?;
            println!("decode + train transform at {res} px: {r}");
            serde_json::to_value(&r)?
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
