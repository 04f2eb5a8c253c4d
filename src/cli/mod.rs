//! The command line: one file per subcommand; this file holds the argument definitions and dispatch.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "alignfuse",
    version,
    about = "Train ALBEF/BLIP-style vision-language models (ITC + ITM + MLM with \
momentum distillation) on image-caption pairs and evaluate them on image-text retrieval."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train a model (generates the synthetic default dataset when no data is configured), validating
    /// each epoch and evaluating on the test split at the end.
    Train(TrainArgs),
    /// Retrieval evaluation (COCO/Flickr protocol): ITC ranking, top-k ITM re-ranking, R@1/5/10.
    Eval(EvalArgs),
    /// Write the L2-normalised image and text embeddings of an annotation file to safetensors.
    Embed(EmbedArgs),
    /// Train and evaluate objective / distillation variants from one initialisation and write a report.
    Ablate(AblateArgs),
    /// Generate the synthetic shapes dataset (images, ALBEF annotation files, vocabulary).
    Synth(SynthArgs),
    /// Prepare data: a WordPiece vocabulary from captions, or the Tux Paint stamps as annotation files.
    Prepare(PrepareArgs),
    /// Import pretrained weights (HF BERT, DINOv2 ONNX, HF ViT / timm, ALBEF, BLIP) into alignfuse names.
    Import(ImportArgs),
    /// Benchmarks: training-step throughput, data transforms, custom kernels.
    Bench(BenchArgs),
    /// Start this machine's data-parallel ranks (NCCL, one per GPU) with torchrun's environment and
    /// supervise them: `alignfuse launch --nproc-per-node 8 train --config ...`.
    Launch(LaunchArgs),
}

#[derive(Args)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub plan: crate::dist::launch::Plan,
    /// The alignfuse command every rank runs, e.g. `train --config configs/base.toml --out runs/x`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

/// Options shared by every command that reads a config.
#[derive(Args, Clone)]
pub struct ConfigArgs {
    /// TOML config file (see configs/).
    #[arg(long)]
    pub config: PathBuf,
    /// Override a config key, e.g. `--set train.lr=3e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Run directory for checkpoints, logs and generated data.
    #[arg(long, default_value = "runs/default")]
    pub out: PathBuf,
    /// Resume from a checkpoint: a path, or `latest` for OUT/checkpoints/latest.
    #[arg(long)]
    pub resume: Option<String>,
    /// Stop after this many optimiser steps (for smoke tests and resume checks).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Train into an --out that already holds a run, moving that run (checkpoints, log, summary) into
    /// OUT/previous-N first. Nothing is deleted.
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Checkpoint (.safetensors) to evaluate.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Retrieval annotation file (ALBEF val/test format).
    #[arg(long)]
    pub ann: PathBuf,
    /// Candidates re-ranked by ITM per query (default: eval.k_test).
    #[arg(long)]
    pub k_test: Option<usize>,
    /// Re-rank score: `itm` (ALBEF) or `itm+itc` (BLIP/LAVIS) (default: eval.score).
    #[arg(long)]
    pub score: Option<String>,
    /// Write every number as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file (otherwise refused).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    #[arg(long)]
    pub checkpoint: PathBuf,
    #[arg(long)]
    pub ann: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing --out file (otherwise refused).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct AblateArgs {
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Ablation directory: the shared data (data/), one run directory per variant and seed (runs/), and
    /// report.md, results.json, loss.png, val_r_mean.png. Re-running skips finished runs and resumes an
    /// interrupted one.
    #[arg(long)]
    pub out: PathBuf,
    /// Comma-separated variants (default: the ALBEF Table 1 ladder
    /// itc,itc+mlm,itc+mlm+itm_rand,itc+mlm+itm_hard,full). A variant is `+`-joined objectives from itc,
    /// mlm, itm_rand (ITM, random negatives), itm_hard (ITM, hard negatives), mod (momentum distillation),
    /// or `full` (= itc+mlm+itm_hard+mod). Sweeps: `alpha=X` (distillation weight, 0..1) and `queue=N` (ITC
    /// queue length), of `full` when alone, e.g. `--variants full,alpha=0.2,alpha=0.8,queue=256`, or of the
    /// objectives they are joined to, e.g. `itc+mod+queue=256`.
    #[arg(long, verbatim_doc_comment)]
    pub variants: Option<String>,
    /// Runs per variant, with seeds seed, seed+1, ... (initialisation and data order change; the data do not).
    #[arg(long, default_value_t = 1)]
    pub seeds: usize,
}

#[derive(Args)]
pub struct SynthArgs {
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Number of training images (val and test get a tenth each, at least 50).
    #[arg(long, default_value_t = 2000)]
    pub n: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Write into an --out that already holds a dataset (otherwise refused).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct PrepareArgs {
    #[command(subcommand)]
    pub what: PrepareWhat,
}

#[derive(Subcommand)]
pub enum PrepareWhat {
    /// Train a WordPiece vocabulary (vocab.txt) on the captions of annotation files.
    Vocab {
        #[arg(long, required = true, num_args = 1..)]
        ann: Vec<PathBuf>,
        #[arg(long, default_value_t = 8000)]
        size: usize,
        #[arg(long)]
        out: PathBuf,
        /// Replace an existing --out file (otherwise refused).
        #[arg(long)]
        overwrite: bool,
    },
    /// Write annotation files' pairs as webdataset tar shards (the img2dataset layout) for
    /// `data.train_shards`.
    Shards {
        #[arg(long, required = true, num_args = 1..)]
        ann: Vec<PathBuf>,
        /// Folder relative image paths are resolved against (default: each annotation file's folder).
        #[arg(long)]
        image_root: Option<PathBuf>,
        /// An empty (or new) folder for the shards.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1000)]
        per_shard: usize,
    },
    /// Turn the Tux Paint stamps into train/val/test annotation files.
    Tuxpaint {
        #[arg(long, default_value = "/usr/share/tuxpaint/stamps")]
        src: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Write into an --out that already holds annotation files (otherwise refused).
        #[arg(long)]
        overwrite: bool,
    },
}

#[derive(Args)]
pub struct ImportArgs {
    /// Source format: hf-bert, dinov2-onnx, hf-vit, timm, albef, blip, or hf-hub (SRC is a repo id
    /// `org/name[@revision]` read from the local Hugging Face cache).
    #[arg(long = "from")]
    pub from: String,
    /// Source file or directory (or repo id for hf-hub).
    pub src: String,
    #[command(flatten)]
    pub cfg: ConfigArgs,
    /// Checkpoint to write (.safetensors): the complete model state for the config.
    #[arg(long)]
    pub out: PathBuf,
    /// Start from this checkpoint instead of the seeded initialisation (to combine imports, e.g. a
    /// ViT from DINOv2 and a text encoder from MiniLM).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// hf-bert: source layers seeding the fusion layers, in order, e.g. `3,4,5` (cross-attention stays fresh).
    #[arg(long, value_delimiter = ',')]
    pub fusion_from: Option<Vec<usize>>,
    /// hf-hub: the cached files' format (default: from config.json's model_type).
    #[arg(long)]
    pub hub_format: Option<String>,
    /// Also write the report (every key used, ignored or not placed) as JSON here.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Replace an existing --out or --report file (otherwise refused; `--init X --out X` needs it).
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct BenchArgs {
    /// What to time: `train` (training steps: pairs/s, time per phase, peak memory), `rerank` (ITM
    /// re-ranking: pairs/s with and without cross-attention K/V reuse), `data` (image transforms),
    /// `kernels` (custom ops against the plain candle composition).
    #[arg(default_value = "train")]
    pub what: String,
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Timed training steps (`train`) or repetitions per op (`kernels`).
    #[arg(long, default_value_t = 10)]
    pub steps: usize,
    /// Folder of images to decode and transform (`data`; default: the configured training images).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// `data`: the configured training images from loose files against the same pairs written as tar
    /// shards (the ratio is shards / loose).
    #[arg(long)]
    pub shards: bool,
    /// `data --shards`: drop the OS page cache before every timed run (Linux, root), so both read from disk.
    #[arg(long)]
    pub cold: bool,
    /// Images in the synthetic retrieval set (`rerank`; five captions each).
    #[arg(long, default_value_t = 200)]
    pub images: usize,
    /// Write the results as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Replace an existing --json file (otherwise refused).
    #[arg(long)]
    pub overwrite: bool,
}

mod ablate;
mod bench;
mod embed;
mod eval;
mod import;
mod prepare;
mod synth;
mod train;

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(args) => eval::run(args),
        Command::Embed(args) => embed::run(args),
        Command::Ablate(a) => ablate::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Prepare(a) => prepare::run(a),
        Command::Import(a) => import::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Launch(a) => match crate::dist::launch::run(&a.plan, &a.command)? {
            0 => Ok(()),
            code => std::process::exit(code),
        },
    }
}
