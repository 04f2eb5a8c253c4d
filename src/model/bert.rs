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

    /// The key and value projections of the tokens attended to.
    fn project_kv(&self, kv: &Tensor, ctx: &Ctx) -> Result<(Tensor, Tensor)> {
        Ok((self.key.forward(kv, ctx)?, self.value.forward(kv, ctx)?))
    }

    /// `x` [B, L, H] attends to projected keys and values [G, N, H] with B = G * n: rows g*n..(g+1)*n
    /// share key set g. n = 1 is ordinary batched attention. For n > 1 each group's rows are read as one
    /// query sequence of n*L tokens, so the shared keys enter one large matmul instead of n copies
    /// (per-row results are the same: attention rows are independent). A mask needs n = 1.
    fn attend_to(&self, x: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>, ctx: &Ctx) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let g = k.dim(0)?;
        if g == 0 || b % g != 0 || (b != g && mask.is_some()) {
            candle_core::bail!(
                "attention: {b} query rows cannot share {g} key sets{}",
                if mask.is_some() { " under a per-row mask" } else { "" }
            )
        }
        let q = self.query.forward(x, ctx)?.reshape((g, b / g * l, h))?;
        let a = attend(&q, k, v, self.heads, mask, self.p_attn, ctx)?.reshape((b, l, h))?;
        let a = ctx.dropout(&self.dense.forward(&a, ctx)?, self.p_hidden)?;
        self.norm.forward_sum(&a, x, ctx)
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

    /// `image_kv`: this layer's cross-attention keys and values of the image tokens (fusion layers only).
    /// `cls_only`: compute the output for the `[CLS]` position only ([B, 1, H]); it still attends to every
    /// token, and every later sublayer works per position, so its value is unchanged.
    fn forward(
        &self, x: &Tensor, mask: &Tensor, image_kv: Option<&(Tensor, Tensor)>, cls_only: bool, ctx: &Ctx,
    ) -> Result<Tensor> {
        let (k, v) = self.attention.project_kv(x, ctx)?;
        let queries = if cls_only { x.narrow(1, 0, 1)? } else { x.clone() };
        let mut x = self.attention.attend_to(&queries, &k, &v, Some(mask), ctx)?;
        if let (Some(cross), Some((k, v))) = (&self.crossattention, image_kv) {
            x = cross.attend_to(&x, k, v, None, ctx)?;
        }
        let h = ctx.dropout(&Linear::mlp(&self.intermediate, &self.output, &x, ctx)?, self.p_hidden)?;
        self.output_norm.forward_sum(&h, &x, ctx)
    }
}

/// Per fusion layer, the cross-attention keys and values [G, N, H] of G images ([`Bert::image_kv`]).
pub struct ImageKv {
    layers: Vec<(Tensor, Tensor)>,
}

/// What the fusion layers cross-attend to: image tokens [B, N, W] (one image per text), or their keys
/// and values already projected ([`Bert::image_kv`] of G images; texts g*n..(g+1)*n of the B = G*n texts
/// attend to image g).
#[derive(Clone, Copy)]
pub enum ImageSide<'a> {
    Tokens(&'a Tensor),
    Kv(&'a ImageKv),
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
        ctx.dropout(&self.embed_norm.forward(&x, ctx)?, self.p_hidden)
    }

    /// Runs `layers` on hidden states `x`; with `cls_only`, the last of them computes `[CLS]` only.
    fn run(
        &self, mut x: Tensor, mask: &Tensor, layers: std::ops::Range<usize>, image: Option<ImageSide>, cls_only: bool,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let ext = extended_mask(mask)?;
        let last = layers.end.saturating_sub(1);
        for i in layers {
            let layer = &self.layers[i];
            let kv = match (image, &layer.crossattention) {
                (Some(ImageSide::Tokens(img)), Some(cross)) => Some(cross.project_kv(img, ctx)?),
                (Some(ImageSide::Kv(kv)), Some(_)) => match kv.layers.get(i - self.fusion_layer) {
                    Some(layer_kv) => Some(layer_kv.clone()),
                    None => candle_core::bail!(
                        "image keys/values cover {} fusion layers, the model has more",
                        kv.layers.len()
                    ),
                },
                _ => None,
            };
            x = layer.forward(&x, &ext, kv.as_ref(), cls_only && i == last, ctx)?;
        }
        Ok(x)
    }

    /// Text mode: ids [B, L], mask [B, L] (1 = token, 0 = padding) -> text_embeds [B, L, H].
    pub fn forward_text(&self, ids: &Tensor, mask: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        self.run(self.embed(ids, ctx)?, mask, 0..self.fusion_layer, None, false, ctx)
    }

    /// Fusion mode: text_embeds [B, L, H] cross-attend to image_embeds [B, N, W] in the fusion layers.
    pub fn forward_fusion(
        &self, text_embeds: &Tensor, mask: &Tensor, image_embeds: &Tensor, ctx: &Ctx,
    ) -> Result<Tensor> {
        self.run(text_embeds.clone(), mask, self.fusion_range(), Some(ImageSide::Tokens(image_embeds)), false, ctx)
    }

    /// The fusion-mode `[CLS]` [B, H] (what `itm_head` reads): [`Bert::forward_fusion`] with the last layer
    /// computed for `[CLS]` only. With keys/values of G = B images it is the token path op for op; with
    /// images shared by several texts it equals it up to float rounding.
    pub fn fusion_cls(&self, text_embeds: &Tensor, mask: &Tensor, image: ImageSide, ctx: &Ctx) -> Result<Tensor> {
        self.run(text_embeds.clone(), mask, self.fusion_range(), Some(image), true, ctx)?.squeeze(1)
    }

    /// The cross-attention keys and values of image_embeds [G, N, W] in every fusion layer. They depend
    /// only on the image, so re-ranking computes them once per image instead of once per candidate text.
    pub fn image_kv(&self, image_embeds: &Tensor, ctx: &Ctx) -> Result<ImageKv> {
        let layers = self.layers[self.fusion_layer..]
            .iter()
            .map(|layer| match &layer.crossattention {
                Some(cross) => cross.project_kv(image_embeds, ctx),
                None => candle_core::bail!("fusion layers have cross-attention"),
            })
            .collect::<Result<_>>()?;
        Ok(ImageKv { layers })
    }

    fn fusion_range(&self) -> std::ops::Range<usize> {
        self.fusion_layer..self.layers.len()
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

    /// hidden [.., H] -> logits [.., V] with `word_embeddings` [V, H] as the decoder.
    pub fn forward(&self, hidden: &Tensor, word_embeddings: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let x = self.norm.forward(&self.dense.forward_gelu(hidden, ctx)?, ctx)?;
        let mut dims = x.dims().to_vec();
        let h = dims.pop().unwrap_or(0);
        let logits = ctx.matmul(&x.reshape(((), h))?, &word_embeddings.t()?)?.broadcast_add(&self.bias)?;
        dims.push(logits.dim(1)?);
        logits.reshape(dims)
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

    /// MLM logits [B, L, V] of (masked) ids conditioned on the image: all layers, then the head.
    pub fn mlm_logits(&self, ids: &Tensor, mask: &Tensor, image_embeds: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let hidden = self.bert.forward_multimodal(ids, mask, image_embeds, ctx)?;
        self.cls.forward(&hidden, self.bert.word_embeddings(), ctx)
    }

    /// The rows of [`TextEncoder::mlm_logits`] at `positions` (u32 \[N\], row-major indices into B x L):
    /// [N, V]. The head works per position, so it runs on those rows only: the loss reads only masked
    /// positions, and the decoder over the vocabulary (30522 wide in BERT) is the costliest part of it.
    pub fn mlm_logits_at(
        &self, ids: &Tensor, mask: &Tensor, image_embeds: &Tensor, positions: &Tensor, ctx: &Ctx,
    ) -> Result<Tensor> {
        let hidden = self.bert.forward_multimodal(ids, mask, image_embeds, ctx)?;
        let rows = hidden.reshape(((), hidden.dim(2)?))?.index_select(positions, 0)?;
        self.cls.forward(&rows, self.bert.word_embeddings(), ctx)
    }
}
