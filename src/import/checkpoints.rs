//! Released ALBEF and BLIP checkpoints: the same families of names as alignfuse's own (ALBEF's), with
//! the differences between their model classes resolved here.

use super::text::{bert_route, mlm_route};
use super::vision::vision_route;
use super::{Plan, Route, Source};
use crate::config::Config;
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// `albef`: an ALBEF `.pth` (pre-training: `text_encoder.bert.*` + `text_encoder.cls.*`; retrieval
/// fine-tuning: a BertModel, so `text_encoder.*` without `bert.`, which the reference strips when it
/// loads one into the other; here it is put back). Online and `_m` weights, queues and temp are kept;
/// `pos_embed` is interpolated to the configured resolution.
pub fn albef<'a>(path: &Path, cfg: &Config) -> Result<Plan<'a>> {
    let src = Source::by_extension(path)?;
    let fusion_layer = cfg.model.text.fusion_layer;
    Ok(Plan::new(src, move |k| checkpoint_route(k, fusion_layer)))
}

/// `blip`: a BLIP `.pth` (salesforce/BLIP names) or an HF `BlipForImageTextRetrieval` directory or
/// safetensors (HF's converter names, mapped back). BLIP runs one text encoder twice (text-only, and with
/// cross-attention in every layer); alignfuse keeps ALBEF's split, so layers below `fusion_layer` take
/// BLIP's layers without their cross-attention.
pub fn blip<'a>(path: &Path, cfg: &Config) -> Result<Plan<'a>> {
    let mut src = Source::by_extension(path)?;
    let hf = src.entries.keys().any(|k| k.starts_with("vision_model."));
    if hf {
        hf_blip_to_blip(&mut src);
    }
    let mut notes = vec![format!(
        "BLIP's text encoder is shared by its text and multimodal modes; here layers < {} are text-only and \
         layers >= {} fuse (ALBEF's split), so fine-tune before comparing with BLIP's numbers",
        cfg.model.text.fusion_layer, cfg.model.text.fusion_layer
    )];
    // BLIP's embeddings have no token types; zeros make alignfuse's sum equal to BLIP's.
    let t = &cfg.model.text;
    for head in ["text_encoder", "text_encoder_m"] {
        let key = format!("{head}.embeddings.token_type_embeddings.weight");
        if src.has(&format!("{head}.embeddings.word_embeddings.weight")) && !src.has(&key) {
            let zeros = Tensor::zeros((t.type_vocab_size, t.hidden_size), DType::F32, &Device::Cpu)?;
            src.insert(key.clone(), zeros, vec![]);
            notes.push(format!("{key}: zeros (BLIP has no token-type embeddings)"));
        }
    }
    if hf {
        notes.push(
            "HF's BlipForImageTextRetrieval has no momentum model, queues or temp: they start from the \
                    imported weights / the config"
                .into(),
        );
    }
    let fusion_layer = cfg.model.text.fusion_layer;
    let mut plan = Plan::new(src, move |k| checkpoint_route(k, fusion_layer));
    plan.notes = notes;
    Ok(plan)
}

/// Routes ALBEF / BLIP checkpoint keys (BLIP calls the queue pointer `ptr_queue`).
fn checkpoint_route(key: &str, fusion_layer: usize) -> Option<Route> {
    let to = |k: &str| Some(Route::To(vec![k.to_string()]));
    match key {
        "temp" | "image_queue" | "text_queue" | "queue_ptr" | "idx_queue" => return to(key),
        "ptr_queue" => return to("queue_ptr"),
        _ => {}
    }
    let (head, rest) = key.split_once('.')?;
    match head {
        "visual_encoder" | "visual_encoder_m" => vision_route(rest, &format!("{head}.")),
        "text_encoder" | "text_encoder_m" => match rest.strip_prefix("cls.") {
            Some(h) => mlm_route(h, &format!("{head}.cls.")),
            None => bert_route(
                rest.strip_prefix("bert.").unwrap_or(rest),
                &format!("{head}.bert."),
                &|n| vec![n],
                fusion_layer,
            ),
        },
        "vision_proj" | "text_proj" | "vision_proj_m" | "text_proj_m" | "itm_head" => to(key),
        _ => None,
    }
}

/// The inverse of HF's `convert_blip_original_pytorch_to_hf.py` renames for the vision tower.
fn hf_blip_to_blip(src: &mut Source) {
    src.rename(|k| {
        let rest = k.strip_prefix("vision_model.")?;
        let rest = [
            ("embeddings.class_embedding", "cls_token"),
            ("embeddings.position_embedding", "pos_embed"),
            ("embeddings.patch_embedding.", "patch_embed.proj."),
            ("post_layernorm.", "norm."),
            ("encoder.layers.", "blocks."),
        ]
        .iter()
        .fold(rest.to_string(), |acc, (from, to)| match acc.strip_prefix(from) {
            Some(r) => format!("{to}{r}"),
            None => acc,
        });
        let rest = rest
            .replace(".self_attn.qkv.", ".attn.qkv.")
            .replace(".self_attn.projection.", ".attn.proj.")
            .replace(".layer_norm1.", ".norm1.")
            .replace(".layer_norm2.", ".norm2.");
        Some(format!("visual_encoder.{rest}"))
    });
}
