//! BERT with HF parameter names, split as ALBEF's xbert: layers below `fusion_layer` encode text,
//! layers from it on are fusion layers that also cross-attend to the image tokens (`crossattention.*`).
//! Dropout is real in training mode (candle-transformers' bert.rs is inference-only).

use super::layers::{attend, extended_mask, Ctx, Embedding, LayerNorm, Linear};
use super::params::{Init, Pb};
use crate::config::TextConfig;
use candle_core::{Result, Tensor};

/// `BertAttention`: self- or cross-attention plus its output projection, dropout and residual LayerNorm.
struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
    p_attn: f64,
    p_hidden: f64,
}

impl Attention {
    fn new(pb: &Pb, cfg: &TextConfig, kv_width: usize) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Attention {
            query: Linear::new(&pb.pp("self.query"), h, h)?,
            key: Linear::new(&pb.pp("self.key"), kv_width, h)?,
            value: Linear::new(&pb.pp("self.value"), kv_width, h)?,
            dense: Linear::new(&pb.pp("output.dense"), h, h)?,
            norm: LayerNorm::new(&pb.pp("output.LayerNorm"), h, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
            p_attn: cfg.attention_probs_dropout_prob,
            p_hidden: cfg.hidden_dropout_prob,
        })
    }

    /// `x` attends to `kv` (itself for self-attention, the image tokens for cross-attention).
    fn forward(&self, x: &Tensor, kv: &Tensor, mask: Option<&Tensor>, ctx: &Ctx) -> Result<Tensor> {
        let q = self.query.forward(x)?;
        let (k, v) = (self.key.forward(kv)?, self.value.forward(kv)?);
        let a = attend(&q, &k, &v, self.heads, mask, self.p_attn, ctx)?;
        let a = ctx.dropout(&self.dense.forward(&a)?, self.p_hidden)?;
        self.norm.forward(&(a + x)?)
    }
}

struct Layer {
    attention: Attention,
    crossattention: Option<Attention>,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
    p_hidden: f64,
}

impl Layer {
    fn new(pb: &Pb, cfg: &TextConfig, cross_width: Option<usize>) -> Result<Self> {
        Ok(Layer {
            attention: Attention::new(&pb.pp("attention"), cfg, cfg.hidden_size)?,
            crossattention: cross_width.map(|w| Attention::new(&pb.pp("crossattention"), cfg, w)).transpose()?,
            intermediate: Linear::new(&pb.pp("intermediate.dense"), cfg.hidden_size, cfg.intermediate_size)?,
            output: Linear::new(&pb.pp("output.dense"), cfg.intermediate_size, cfg.hidden_size)?,
            output_norm: LayerNorm::new(&pb.pp("output.LayerNorm"), cfg.hidden_size, cfg.layer_norm_eps)?,
            p_hidden: cfg.hidden_dropout_prob,
        })
    }

    fn forward(&self, x: &Tensor, mask: &Tensor, image: Option<&Tensor>, ctx: &Ctx) -> Result<Tensor> {
        let mut x = self.attention.forward(x, x, Some(mask), ctx)?;
        if let (Some(cross), Some(img)) = (&self.crossattention, image) {
            x = cross.forward(&x, img, None, ctx)?;
        }
        let h = self.intermediate.forward(&x)?.gelu_erf()?;
        let h = ctx.dropout(&self.output.forward(&h)?, self.p_hidden)?;
        self.output_norm.forward(&(h + x)?)
    }
}

/// `text_encoder.bert`: embeddings and all layers.
pub struct Bert {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    embed_norm: LayerNorm,
    layers: Vec<Layer>,
    fusion_layer: usize,
    p_hidden: f64,
}

impl Bert {
    /// `encoder_width`: width of the image tokens the fusion layers cross-attend to.
    pub fn new(pb: &Pb, cfg: &TextConfig, encoder_width: usize) -> Result<Self> {
        let e = pb.pp("embeddings");
        let h = cfg.hidden_size;
        Ok(Bert {
            word_embeddings: Embedding::new(&e.pp("word_embeddings"), cfg.vocab_size, h)?,
            position_embeddings: Embedding::new(&e.pp("position_embeddings"), cfg.max_position_embeddings, h)?,
            token_type_embeddings: Embedding::new(&e.pp("token_type_embeddings"), cfg.type_vocab_size, h)?,
            embed_norm: LayerNorm::new(&e.pp("LayerNorm"), h, cfg.layer_norm_eps)?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| {
                    let cross = (i >= cfg.fusion_layer).then_some(encoder_width);
                    Layer::new(&pb.pp(format!("encoder.layer.{i}")), cfg, cross)
                })
                .collect::<Result<_>>()?,
            fusion_layer: cfg.fusion_layer,
            p_hidden: cfg.hidden_dropout_prob,
        })
    }

    pub fn word_embeddings(&self) -> &Tensor {
        self.word_embeddings.weight()
    }

    fn embed(&self, ids: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let pos = Tensor::arange(0u32, l as u32, ids.device())?.unsqueeze(0)?.broadcast_as((b, l))?.contiguous()?;
        let types = Tensor::zeros((b, l), candle_core::DType::U32, ids.device())?;
        let x = self.word_embeddings.forward(ids)?;
        let x = (x + self.position_embeddings.forward(&pos)?)?;
        let x = (x + self.token_type_embeddings.forward(&types)?)?;
        ctx.dropout(&self.embed_norm.forward(&x)?, self.p_hidden)
    }

    fn run(&self, mut x: Tensor, mask: &Tensor, layers: std::ops::Range<usize>, image: Option<&Tensor>, ctx: &Ctx)
        -> Result<Tensor> {
        let ext = extended_mask(mask)?;
        for layer in &self.layers[layers] {
            x = layer.forward(&x, &ext, image, ctx)?;
        }
        Ok(x)
    }

    /// Text mode: ids [B, L], mask [B, L] (1 = token, 0 = padding) -> text_embeds [B, L, H].
    pub fn forward_text(&self, ids: &Tensor, mask: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.run(self.embed(ids, ctx)?, mask, 0..self.fusion_layer, None, ctx)
    }

    /// Fusion mode: text_embeds [B, L, H] cross-attend to image_embeds [B, N, W] in the fusion layers.
    pub fn forward_fusion(&self, text_embeds: &Tensor, mask: &Tensor, image_embeds: &Tensor, ctx: &Ctx)
        -> Result<Tensor> {
        self.run(text_embeds.clone(), mask, self.fusion_layer..self.layers.len(), Some(image_embeds), ctx)
    }

    /// Multimodal mode: all layers from the ids (text layers, then fusion layers with the image).
    pub fn forward_multimodal(&self, ids: &Tensor, mask: &Tensor, image_embeds: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let text = self.forward_text(ids, mask, ctx)?;
        self.forward_fusion(&text, mask, image_embeds, ctx)
    }
}

/// BERT's `cls.predictions`: dense + GELU + LayerNorm, then the decoder tied to the word embeddings.
pub struct MlmHead {
    dense: Linear,
    norm: LayerNorm,
    bias: Tensor,
}

impl MlmHead {
    pub fn new(pb: &Pb, cfg: &TextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(MlmHead {
            dense: Linear::new(&pb.pp("transform.dense"), h, h)?,
            norm: LayerNorm::new(&pb.pp("transform.LayerNorm"), h, cfg.layer_norm_eps)?,
            bias: pb.get("bias", cfg.vocab_size, Init::Const(0.0))?,
        })
    }

    /// hidden [B, L, H] -> logits [B, L, V] with `word_embeddings` [V, H] as the decoder.
    pub fn forward(&self, hidden: &Tensor, word_embeddings: &Tensor) -> Result<Tensor> {
        let x = self.norm.forward(&self.dense.forward(hidden)?.gelu_erf()?)?;
        let (b, l, h) = x.dims3()?;
        x.reshape((b * l, h))?.matmul(&word_embeddings.t()?)?.broadcast_add(&self.bias)?.reshape((b, l, ()))
    }
}

/// `text_encoder`: BERT plus its MLM head (ALBEF's BertForMaskedLM).
pub struct TextEncoder {
    pub bert: Bert,
    pub cls: MlmHead,
}

impl TextEncoder {
    pub fn new(pb: &Pb, cfg: &TextConfig, encoder_width: usize) -> Result<Self> {
        Ok(TextEncoder {
            bert: Bert::new(&pb.pp("bert"), cfg, encoder_width)?,
            cls: MlmHead::new(&pb.pp("cls.predictions"), cfg)?,
        })
    }

    /// MLM logits of (masked) ids conditioned on the image: all layers, then the head.
    pub fn mlm_logits(&self, ids: &Tensor, mask: &Tensor, image_embeds: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let hidden = self.bert.forward_multimodal(ids, mask, image_embeds, ctx)?;
        self.cls.forward(&hidden, self.bert.word_embeddings())
    }
}
