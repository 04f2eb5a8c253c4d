//! The TOML configuration: one struct per section, every field documented, unknown keys rejected.
//!
//! Field names follow the ALBEF/BLIP reference configs (`image_res`, `vision_width`, `fusion_layer`,
//! `queue_size`, ...) so a user of the PyTorch code recognises them. Defaults are ALBEF-base's values;
//! the presets in `configs/` override what differs.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The whole configuration file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Seed for everything random: initialisation, data order, augmentation, masking, negatives.
    pub seed: u64,
    /// `"fused"`: custom fused ops (softmax, ITC step) with CPU and CUDA paths; `"reference"`: plain
    /// candle ops, for debugging.
    pub kernels: Kernels,
    /// Device: `"cpu"`, `"cuda"` (GPU 0, needs `--features cuda`), `"cuda:N"`, or `"auto"` (GPU 0 when built
    /// with CUDA and one opens; otherwise the CPU, and the run says why).
    pub device: String,
    pub model: ModelConfig,
    pub objectives: ObjectivesConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
}

/// Which implementation the softmax and ITC steps use.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Kernels {
    Fused,
    Reference,
}

/// The model: encoders plus the ALBEF heads, queues and momentum settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Width of the ITC projections `vision_proj` / `text_proj` (ALBEF: 256).
    pub embed_dim: usize,
    /// Initial value of the learned ITC temperature (ALBEF: 0.07); clamped to [0.001, 0.5] at every use.
    pub temp: f64,
    /// Number of momentum features kept in each ITC queue (ALBEF: 65536). Any batch size works.
    pub queue_size: usize,
    /// EMA coefficient m of the momentum twin: theta_m <- m*theta_m + (1-m)*theta (ALBEF: 0.995).
    pub momentum: f64,
    /// Weight of the momentum model's soft targets in ITC and MLM after the ramp (ALBEF: 0.4).
    pub alpha: f64,
    pub vision: VisionConfig,
    pub text: TextConfig,
}

/// The ViT image encoder (`visual_encoder.*`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VisionConfig {
    /// Input resolution in pixels (square). Position embeddings are interpolated when it changes.
    pub image_res: usize,
    /// Patch size in pixels (16 for ViT-B/16, 14 for DINOv2 ViT-S/14).
    pub patch_size: usize,
    /// Token width of the ViT.
    pub vision_width: usize,
    /// Number of transformer blocks.
    pub vision_depth: usize,
    /// Attention heads per block.
    pub vision_heads: usize,
    /// MLP hidden width = mlp_ratio * vision_width.
    pub mlp_ratio: f64,
    /// DINOv2-style layer scale: when set, each residual branch is multiplied by a learned per-channel
    /// vector (`ls1.gamma`, `ls2.gamma`) initialised to this value. Absent: no layer scale.
    pub layer_scale: Option<f64>,
    /// LayerNorm epsilon of the ViT (timm / ALBEF: 1e-6).
    pub vision_ln_eps: f64,
}

/// The BERT text + fusion encoder (`text_encoder.bert.*`) and its MLM head (`text_encoder.cls.*`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TextConfig {
    /// Vocabulary size of the word embeddings and the MLM decoder; must cover the tokenizer's vocabulary.
    pub vocab_size: usize,
    /// Token width of BERT.
    pub hidden_size: usize,
    /// Total number of layers: text layers plus fusion layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (self- and cross-attention).
    pub num_attention_heads: usize,
    /// Width of each layer's feed-forward block.
    pub intermediate_size: usize,
    /// Layers with index >= fusion_layer are fusion layers with cross-attention to the image tokens
    /// (ALBEF: 6 of 12).
    pub fusion_layer: usize,
    /// Number of learned position embeddings (longest token sequence).
    pub max_position_embeddings: usize,
    /// Number of token-type embeddings (BERT: 2; alignfuse always uses type 0).
    pub type_vocab_size: usize,
    /// LayerNorm epsilon of BERT (1e-12).
    pub layer_norm_eps: f64,
    /// Dropout on embeddings and sublayer outputs during training (ALBEF: 0.1, also in the momentum twin).
    pub hidden_dropout_prob: f64,
    /// Dropout on attention probabilities during training (ALBEF: 0.1).
    pub attention_probs_dropout_prob: f64,
}

/// Which pre-training objectives run, and how. The ablation command flips these.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectivesConfig {
    /// Image-text contrastive loss.
    pub itc: bool,
    /// Image-text matching loss on the fusion encoder.
    pub itm: bool,
    /// Masked language modelling conditioned on the image.
    pub mlm: bool,
    /// Momentum distillation: soft targets from the momentum model in ITC and MLM. Off = alpha 0.
    pub distill: bool,
    /// How ITM negatives are drawn: `"hard"` (from the ITC similarity softmax) or `"random"` (uniform).
    pub itm_negatives: Negatives,
    /// With hard negatives: the share of rows whose negative is drawn hard; the others draw uniformly
    /// (1 = ALBEF: all hard).
    pub itm_hard_fraction: f64,
    /// Multi-positive ITC targets: captions of the same image id (in the batch and the idx queue) all count
    /// as positives (ALBEF/BLIP retrieval fine-tuning).
    pub itc_multi_positive: bool,
    /// ITC keys with several ranks: `"local"` (this rank's batch plus the queue, ALBEF) or `"global"`
    /// (every rank's batch plus the queue). The keys are momentum features, so gathering them carries no
    /// gradient; one rank at a global batch of N pairs equals N / B ranks with `"global"`.
    pub itc_keys: ItcKeys,
    /// MLM masking probability (0.15).
    pub mlm_probability: f64,
    /// Epochs over which alpha ramps linearly from 0 (ALBEF: 1, BLIP: 2; 0 = no ramp).
    pub alpha_ramp_epochs: f64,
}

/// Which batches' momentum features are ITC keys beside the queue (data parallel).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ItcKeys {
    Local,
    Global,
}

/// How ITM negatives are sampled.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Negatives {
    Hard,
    Random,
}

/// Where the image-caption pairs come from and how they are turned into tensors.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Training annotation files (ALBEF JSON). Empty (and no `train_shards`): generate the synthetic
    /// default dataset.
    pub train_ann: Vec<PathBuf>,
    /// Training tar shards in the webdataset / img2dataset layout, instead of `train_ann`: a brace
    /// pattern (`"DIR/{00000..00331}.tar"`) or a list of them.
    #[serde(deserialize_with = "one_or_many")]
    pub train_shards: Vec<String>,
    /// Samples per epoch from the shards (open_clip's `--train-num-samples`). Absent: all of them,
    /// counted from the shards' headers at start.
    pub train_num_samples: Option<usize>,
    /// Shards: samples each loader worker holds to draw from at random (1 = shard order).
    pub shuffle_buffer: usize,
    /// Validation annotation file (retrieval format), evaluated after each epoch. Optional.
    pub val_ann: Option<PathBuf>,
    /// Test annotation file (retrieval format), evaluated at the end of training. Optional.
    pub test_ann: Option<PathBuf>,
    /// Directory that relative image paths in the annotation files are resolved against
    /// (default: the annotation file's directory).
    pub image_root: Option<PathBuf>,
    /// WordPiece vocabulary: a `vocab.txt` or `tokenizer.json` (bert-base-uncased compatible).
    /// Absent with synthetic data: the generated dataset's vocabulary.
    pub vocab: Option<PathBuf>,
    /// Number of synthetic training images when no annotation is configured.
    pub synth_n: usize,
    /// `"albef"` or `"blip"` caption cleaning.
    pub caption_style: CaptionStyle,
    /// Captions are cut to this many words before tokenising (30).
    pub max_words: usize,
    /// Token sequences are cut to this length, `[CLS]` and `[SEP]` included (ALBEF pre-training: 25).
    pub max_tokens: usize,
    /// RandomResizedCrop scale range of the training transform (ALBEF pre-training: [0.2, 1.0]).
    pub crop_scale: [f64; 2],
    /// Random horizontal flip in the training transform.
    pub hflip: bool,
    /// RandAugment: number of ops drawn per image (2; 0 turns RandAugment off).
    pub randaugment_n: usize,
    /// RandAugment magnitude out of 10 (7).
    pub randaugment_m: f64,
    /// Decoding/augmentation worker threads.
    pub num_workers: usize,
    /// Batches prepared ahead of the training step, per worker.
    pub prefetch: usize,
    /// What a corrupt or missing image does during training: `"fail"` (stop with its path) or `"skip"`
    /// (drop the pair, count it and log its path).
    pub on_bad_image: OnBadImage,
    /// Image normalisation statistics: `"clip"` (ALBEF, BLIP) or `"imagenet"` (what DINOv2 and timm's
    /// ImageNet ViTs were trained with; use it with their weights).
    pub normalize: Normalize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Tf32,
    Bf16,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    Clip,
    Imagenet,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum CaptionStyle {
    Albef,
    Blip,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnBadImage {
    Fail,
    Skip,
}

/// Optimisation, schedule and checkpointing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Number of epochs.
    pub epochs: usize,
    /// Image-caption pairs per optimiser micro-batch (ITM needs at least 2).
    pub batch_size: usize,
    /// Micro-batches whose gradients are summed (averaged) before one optimiser step.
    pub grad_accum: usize,
    /// Peak learning rate (ALBEF: 1e-4).
    pub lr: f64,
    /// Learning rate at the start of warm-up (ALBEF: 1e-5).
    pub warmup_lr: f64,
    /// Final learning rate of the cosine decay (ALBEF: 1e-5).
    pub min_lr: f64,
    /// Optimiser steps of linear warm-up from warmup_lr to lr.
    pub warmup_steps: usize,
    /// `"cosine"`: per-step cosine after warm-up; `"albef"`: ALBEF's staircase warm-up (every 100 steps)
    /// then per-epoch cosine.
    pub schedule: Schedule,
    /// AdamW decoupled weight decay (ALBEF: 0.02). Biases, LayerNorm and other 1-D parameters and `temp`
    /// are not decayed.
    pub weight_decay: f64,
    /// AdamW betas.
    pub betas: [f64; 2],
    /// AdamW epsilon.
    pub eps: f64,
    /// Clip gradients to this global L2 norm (0 = off).
    pub grad_clip: f64,
    /// Write the `latest` checkpoint every this many optimiser steps (0 = only at epoch ends).
    pub checkpoint_every: usize,
    /// Print a log line every this many steps when not on a terminal.
    pub log_every: usize,
    /// What a non-finite loss or gradient does: `"stop"` (error naming the step, the loss or gradient
    /// and the last finite checkpoint) or `"skip"` (drop the step's update and count it; see
    /// `max_consecutive_skips`). A non-finite update is never applied and never checkpointed.
    pub on_nonfinite: OnNonFinite,
    /// Start from this checkpoint (an `alignfuse import` output or another run's model.safetensors)
    /// instead of the seeded initialisation. `--resume` takes precedence.
    pub init: Option<PathBuf>,
    /// Learning-rate multiplier for what a fine-tune from pretrained unimodal encoders starts from scratch:
    /// `vision_proj`, `text_proj`, `itm_head` and the fusion layers' cross-attention (1 = ALBEF: one rate).
    pub head_lr_scale: f64,
    /// Stop after this many optimiser steps in a row were skipped for non-finite losses or gradients
    /// (with `on_nonfinite = "skip"`): a run that keeps diverging is not recovering.
    pub max_consecutive_skips: usize,
    /// `"rerank"` (ALBEF) or `"itc"`: the validation r_mean that marks a checkpoint `best` (always ITC-only
    /// with `objectives.itm = false`: see [`Config::select`]).
    pub select: Select,
    /// `"fp32"`, `"tf32"` (fp32 storage, TF32 tensor-core matmuls on CUDA; the same as fp32 on the CPU) or
    /// `"bf16"` (torch.autocast's rules: linear layers and attention in bf16 with bf16 outputs; LayerNorm,
    /// the residual stream, softmax, losses, the weights, the optimiser state and checkpoints in fp32).
    pub precision: Precision,
    /// Also write the logged scalars (losses, lr, temp, alpha, ITM accuracy, grad norm, pairs/s,
    /// validation R@K) to a TensorBoard event file in the run folder.
    pub tensorboard: bool,
    /// Run the backward pass in segments, one per ViT block, each freed when done (src/train/backward.rs):
    /// the same gradients with a lower peak memory, since candle otherwise keeps every activation until
    /// the whole backward has returned.
    pub segmented_backward: bool,
    /// Activation recomputation: keep only each ViT block's input from the forward and run the block again
    /// in the backward (one more ViT forward per step, far less activation memory). Same gradients.
    pub grad_checkpoint: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Cosine,
    Albef,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OnNonFinite {
    Stop,
    Skip,
}

/// Which validation r_mean picks the `best` checkpoint.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Select {
    /// After ITM re-ranking (ALBEF).
    Rerank,
    /// Ranked by ITC similarity alone.
    Itc,
}

impl Select {
    /// The r_mean it picks by, in words.
    pub fn describe(self) -> &'static str {
        match self {
            Select::Rerank => "re-ranked",
            Select::Itc => "ITC-only",
        }
    }
}

/// Retrieval evaluation (the COCO/Flickr protocol).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Candidates re-ranked by ITM per query (COCO 256, Flickr 128).
    pub k_test: usize,
    /// Re-rank score: `"itm"` (ALBEF: ITM positive logit) or `"itm+itc"` (BLIP/LAVIS: logit + ITC cosine).
    pub score: RerankScore,
    /// Images or captions encoded per batch.
    pub batch_size: usize,
    /// Count a retrieved caption as correct when its cleaned text equals a ground-truth caption's text
    /// (for datasets where different images share identical captions). Off: the reference protocol.
    pub match_text: bool,
    /// Also measure whether the fusion encoder reads the image: MLM on the set's captions with each
    /// caption's own image against another image of the set (`eval::mlm_probe`). Off: not computed.
    pub mlm_probe: bool,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum RerankScore {
    #[serde(rename = "itm")]
    Itm,
    #[serde(rename = "itm+itc")]
    ItmItc,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 42,
            kernels: Kernels::Fused,
            device: "auto".into(),
            model: ModelConfig::default(),
            objectives: ObjectivesConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            eval: EvalConfig::default(),
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            embed_dim: 256,
            temp: 0.07,
            queue_size: 65536,
            momentum: 0.995,
            alpha: 0.4,
            vision: VisionConfig::default(),
            text: TextConfig::default(),
        }
    }
}

impl Default for VisionConfig {
    fn default() -> Self {
        VisionConfig {
            image_res: 256,
            patch_size: 16,
            vision_width: 768,
            vision_depth: 12,
            vision_heads: 12,
            mlp_ratio: 4.0,
            layer_scale: None,
            vision_ln_eps: 1e-6,
        }
    }
}

impl Default for TextConfig {
    fn default() -> Self {
        TextConfig {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            fusion_layer: 6,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
        }
    }
}

impl Default for ObjectivesConfig {
    fn default() -> Self {
        ObjectivesConfig {
            itc: true,
            itm: true,
            mlm: true,
            distill: true,
            itm_negatives: Negatives::Hard,
            itm_hard_fraction: 1.0,
            itc_multi_positive: false,
            itc_keys: ItcKeys::Local,
            mlm_probability: 0.15,
            alpha_ramp_epochs: 1.0,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train_ann: vec![],
            train_shards: vec![],
            train_num_samples: None,
            shuffle_buffer: 1000,
            val_ann: None,
            test_ann: None,
            image_root: None,
            vocab: None,
            synth_n: 2000,
            caption_style: CaptionStyle::Albef,
            max_words: 30,
            max_tokens: 25,
            crop_scale: [0.2, 1.0],
            hflip: true,
            randaugment_n: 2,
            randaugment_m: 7.0,
            num_workers: 2,
            prefetch: 2,
            on_bad_image: OnBadImage::Fail,
            normalize: Normalize::Clip,
        }
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: 30,
            batch_size: 64,
            grad_accum: 1,
            lr: 1e-4,
            warmup_lr: 1e-5,
            min_lr: 1e-5,
            warmup_steps: 2000,
            schedule: Schedule::Cosine,
            weight_decay: 0.02,
            betas: [0.9, 0.999],
            eps: 1e-8,
            grad_clip: 0.0,
            checkpoint_every: 0,
            log_every: 50,
            on_nonfinite: OnNonFinite::Stop,
            init: None,
            head_lr_scale: 1.0,
            max_consecutive_skips: 10,
            select: Select::Rerank,
            precision: Precision::Fp32,
            tensorboard: true,
            segmented_backward: true,
            grad_checkpoint: false,
        }
    }
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { k_test: 256, score: RerankScore::Itm, batch_size: 64, match_text: false, mlm_probe: false }
    }
}

impl Config {
    /// The validation r_mean that picks `best`: `train.select`, but ITC-only when no ITM objective is
    /// trained, since re-ranking by an untrained head would pick epochs at random.
    pub fn select(&self) -> Select {
        if self.objectives.itm {
            self.train.select
        } else {
            Select::Itc
        }
    }

    /// Reads a TOML file, applies `key=value` overrides (dotted paths, values parsed as TOML, bare words
    /// as strings), rejects unknown keys by name and validates the values.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
        Self::from_toml_str(&text, overrides).with_context(|| format!("in config file {}", path.display()))
    }

    /// Parses TOML text (see [`Config::load`]).
    pub fn from_toml_str(text: &str, overrides: &[String]) -> Result<Config> {
        let mut value: toml::Table = toml::from_str(text)?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let cfg: Config = toml::Value::Table(value).try_into()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values the types cannot express; each error names the key. Sizes, widths, depths, head
    /// counts and resolutions must be positive, rates and probabilities in range, every float finite.
    pub fn validate(&self) -> Result<()> {
        self.validate_vision()?;
        self.validate_text()?;
        self.validate_model()?;
        self.validate_data()?;
        self.validate_train()?;
        check(self.eval.k_test >= 1, "eval.k_test", "must be at least 1".into())?;
        check(self.eval.batch_size >= 1, "eval.batch_size", "must be at least 1".into())?;
        check(
            self.objectives.itc || self.objectives.itm || self.objectives.mlm,
            "objectives",
            "at least one of itc, itm, mlm must be on".into(),
        )?;
        check(
            self.device == "cpu" || self.device == "auto" || crate::cuda_ordinal(&self.device).is_ok(),
            "device",
            format!("{:?} is not one of \"cpu\", \"cuda\", \"cuda:N\", \"auto\"", self.device),
        )
    }

    fn validate_vision(&self) -> Result<()> {
        let v = &self.model.vision;
        positive(&[
            ("model.vision.image_res", v.image_res),
            ("model.vision.patch_size", v.patch_size),
            ("model.vision.vision_width", v.vision_width),
            ("model.vision.vision_depth", v.vision_depth),
            ("model.vision.vision_heads", v.vision_heads),
        ])?;
        check(
            v.image_res.is_multiple_of(v.patch_size),
            "model.vision.image_res",
            format!("{} is not a multiple of patch_size {}", v.image_res, v.patch_size),
        )?;
        check(
            v.vision_width.is_multiple_of(v.vision_heads),
            "model.vision.vision_heads",
            format!("vision_width {} is not divisible by {} heads", v.vision_width, v.vision_heads),
        )?;
        check(
            (v.vision_width as f64 * v.mlp_ratio).round() >= 1.0 && v.mlp_ratio.is_finite(),
            "model.vision.mlp_ratio",
            format!("{} gives an MLP of no units (vision_width {})", v.mlp_ratio, v.vision_width),
        )?;
        if let Some(ls) = v.layer_scale {
            check(ls > 0.0 && ls.is_finite(), "model.vision.layer_scale", format!("{ls} must be positive"))?;
        }
        above_zero("model.vision.vision_ln_eps", v.vision_ln_eps)
    }

    fn validate_text(&self) -> Result<()> {
        let t = &self.model.text;
        positive(&[
            ("model.text.vocab_size", t.vocab_size),
            ("model.text.hidden_size", t.hidden_size),
            ("model.text.num_hidden_layers", t.num_hidden_layers),
            ("model.text.num_attention_heads", t.num_attention_heads),
            ("model.text.intermediate_size", t.intermediate_size),
            ("model.text.max_position_embeddings", t.max_position_embeddings),
            ("model.text.type_vocab_size", t.type_vocab_size),
        ])?;
        check(
            t.hidden_size.is_multiple_of(t.num_attention_heads),
            "model.text.num_attention_heads",
            format!("hidden_size {} is not divisible by {} heads", t.hidden_size, t.num_attention_heads),
        )?;
        check(
            t.fusion_layer >= 1 && t.fusion_layer < t.num_hidden_layers,
            "model.text.fusion_layer",
            format!(
                "{} must lie in [1, num_hidden_layers = {}) so that text and fusion layers both exist",
                t.fusion_layer, t.num_hidden_layers
            ),
        )?;
        above_zero("model.text.layer_norm_eps", t.layer_norm_eps)?;
        for (key, p) in [
            ("model.text.hidden_dropout_prob", t.hidden_dropout_prob),
            ("model.text.attention_probs_dropout_prob", t.attention_probs_dropout_prob),
        ] {
            // p = 1 would scale the kept (no) units by 1 / 0.
            check((0.0..1.0).contains(&p), key, format!("{p} is outside [0, 1)"))?;
        }
        Ok(())
    }

    /// The model's own numbers and the probabilities that weigh objectives.
    fn validate_model(&self) -> Result<()> {
        for (key, p) in [
            ("model.alpha", self.model.alpha),
            ("model.momentum", self.model.momentum),
            ("objectives.mlm_probability", self.objectives.mlm_probability),
            ("objectives.itm_hard_fraction", self.objectives.itm_hard_fraction),
        ] {
            check((0.0..=1.0).contains(&p), key, format!("{p} is outside [0, 1]"))?;
        }
        check(
            self.model.temp >= 0.001 && self.model.temp <= 0.5,
            "model.temp",
            format!("{} is outside the clamp range [0.001, 0.5]", self.model.temp),
        )?;
        at_least_zero("objectives.alpha_ramp_epochs", self.objectives.alpha_ramp_epochs)?;
        positive(&[("model.queue_size", self.model.queue_size), ("model.embed_dim", self.model.embed_dim)])
    }

    fn validate_data(&self) -> Result<()> {
        let d = &self.data;
        positive(&[
            ("data.synth_n", d.synth_n),
            ("data.max_words", d.max_words),
            ("data.num_workers", d.num_workers),
            ("data.prefetch", d.prefetch),
            ("data.shuffle_buffer", d.shuffle_buffer),
        ])?;
        check(
            d.train_ann.is_empty() || d.train_shards.is_empty(),
            "data.train_shards",
            "is set together with data.train_ann: train from one of them".into(),
        )?;
        check(
            d.train_num_samples.is_none_or(|n| n > 0),
            "data.train_num_samples",
            "must be positive (or absent: every sample of the shards)".into(),
        )?;
        check(
            d.max_tokens >= 3 && d.max_tokens <= self.model.text.max_position_embeddings,
            "data.max_tokens",
            format!(
                "{} must lie in [3, max_position_embeddings = {}]",
                d.max_tokens, self.model.text.max_position_embeddings
            ),
        )?;
        let [lo, hi] = d.crop_scale;
        check(0.0 < lo && lo <= hi && hi <= 1.0, "data.crop_scale", format!("[{lo}, {hi}] is not 0 < lo <= hi <= 1"))?;
        at_least_zero("data.randaugment_m", d.randaugment_m)
    }

    fn validate_train(&self) -> Result<()> {
        let t = &self.train;
        positive(&[
            ("train.epochs", t.epochs),
            ("train.batch_size", t.batch_size),
            ("train.grad_accum", t.grad_accum),
            ("train.max_consecutive_skips", t.max_consecutive_skips),
        ])?;
        check(
            t.batch_size >= 2 || !self.objectives.itm,
            "train.batch_size",
            format!("{} < 2: ITM needs at least 2 pairs per batch to draw negatives", t.batch_size),
        )?;
        for (key, v) in [
            ("train.lr", t.lr),
            ("train.warmup_lr", t.warmup_lr),
            ("train.min_lr", t.min_lr),
            ("train.weight_decay", t.weight_decay),
            ("train.grad_clip", t.grad_clip),
        ] {
            at_least_zero(key, v)?;
        }
        for (key, b) in [("train.betas[0]", t.betas[0]), ("train.betas[1]", t.betas[1])] {
            check((0.0..1.0).contains(&b), key, format!("{b} is outside [0, 1)"))?;
        }
        above_zero("train.eps", t.eps)?;
        above_zero("train.head_lr_scale", t.head_lr_scale)
    }

    /// The WordPiece vocabulary: `data.vocab`, or else the `vocab.txt` beside `ann` (where `synth`
    /// writes the generated dataset's vocabulary).
    pub fn vocab_path(&self, ann: &Path) -> Result<PathBuf> {
        if let Some(v) = &self.data.vocab {
            return Ok(v.clone());
        }
        let beside = ann.parent().unwrap_or(Path::new(".")).join("vocab.txt");
        if beside.is_file() {
            Ok(beside)
        } else {
            bail!(
                "no vocabulary: set `data.vocab` to a vocab.txt or tokenizer.json (none found beside {})",
                ann.display()
            )
        }
    }

    /// Alpha actually used: 0 when distillation is off.
    pub fn effective_alpha(&self) -> f64 {
        if self.objectives.distill {
            self.model.alpha
        } else {
            0.0
        }
    }
}

/// The dotted keys whose values differ between two serialisable settings, with both values as TOML
/// (absent: `-`).
pub fn differing_keys<T: Serialize>(a: &T, b: &T) -> Result<Vec<(String, String, String)>> {
    let (a, b) = (toml::Table::try_from(a)?, toml::Table::try_from(b)?);
    let mut out = vec![];
    diff_tables(&a, &b, "", &mut out);
    Ok(out)
}

fn diff_tables(a: &toml::Table, b: &toml::Table, prefix: &str, out: &mut Vec<(String, String, String)>) {
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match (a.get(k), b.get(k)) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => diff_tables(x, y, &key, out),
            (x, y) if x != y => {
                let show = |v: Option<&toml::Value>| v.map_or("-".to_string(), |v| v.to_string());
                out.push((key, show(x), show(y)));
            }
            _ => {}
        }
    }
}

/// Each (key, value) must be at least 1.
/// A string or a list of strings (`data.train_shards = "a/{0..9}.tar"` or `["a.tar", "b.tar"]`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn positive(values: &[(&str, usize)]) -> Result<()> {
    values.iter().try_for_each(|&(key, v)| check(v >= 1, key, "must be at least 1".into()))
}

/// A finite value > 0.
fn above_zero(key: &str, v: f64) -> Result<()> {
    check(v > 0.0 && v.is_finite(), key, format!("{v} must be positive"))
}

/// A finite value >= 0.
fn at_least_zero(key: &str, v: f64) -> Result<()> {
    check(v >= 0.0 && v.is_finite(), key, format!("{v} must be zero or positive"))
}

/// Ok when `ok`, else an error naming `key` and why.
fn check(ok: bool, key: &str, why: String) -> Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("invalid value for `{key}`: {why}")
    }
}

/// Applies one `a.b.c=value` override to a parsed TOML table.
fn apply_override(root: &mut toml::Table, spec: &str) -> Result<()> {
    let (key, raw) = spec.split_once('=').with_context(|| format!("override `{spec}` is not of the form key=value"))?;
    let key = key.trim();
    let value = parse_override_value(raw.trim());
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|s| !s.is_empty()).with_context(|| format!("override `{spec}` has an empty key"))?;
    let mut table = root;
    for p in parts {
        let entry = table.entry(p.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        table = entry.as_table_mut().with_context(|| format!("override `{spec}`: `{p}` is not a section"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

/// A value as TOML (`3`, `1e-4`, `true`, `[1, 2]`, `"x"`), or else the bare text as a string.
fn parse_override_value(raw: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_parse_and_validate() {
        for name in ["tiny", "small", "albef-base"] {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs").join(format!("{name}.toml"));
            Config::load(&path, &[]).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        }
    }

    #[test]
    fn devices_parse() {
        assert_eq!(crate::cuda_ordinal("cuda").unwrap(), 0);
        assert_eq!(crate::cuda_ordinal("cuda:3").unwrap(), 3);
        for bad in ["cuda:", "cuda:x", "gpu", "cuda3"] {
            assert!(crate::cuda_ordinal(bad).is_err(), "{bad}");
            let err = Config::from_toml_str(&format!("device = \"{bad}\""), &[]).unwrap_err();
            assert!(format!("{err:#}").contains("device"), "{err:#}");
        }
        assert!(Config::from_toml_str("device = \"cuda:1\"", &[]).is_ok());
        assert!(matches!(crate::device("auto").unwrap(), candle_core::Device::Cpu), "no CUDA in the default build");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml_str("[model]\nembed_dimm = 3\n", &[]).unwrap_err();
        assert!(format!("{err:#}").contains("embed_dimm"), "{err:#}");
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let cfg = Config::from_toml_str(
            "",
            &[
                "model.vision.image_res=32".into(),
                "model.vision.patch_size=8".into(),
                "kernels=reference".into(),
                "train.lr=3e-4".into(),
            ],
        )
        .unwrap();
        assert_eq!(cfg.model.vision.image_res, 32);
        assert_eq!(cfg.kernels, Kernels::Reference);
        assert_eq!(cfg.train.lr, 3e-4);
        let err = Config::from_toml_str("", &["train.nope=1".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("nope"));
        let err = Config::from_toml_str("", &["model.text.fusion_layer=12".into()]).unwrap_err();
        assert!(format!("{err:#}").contains("model.text.fusion_layer"));
    }
}
