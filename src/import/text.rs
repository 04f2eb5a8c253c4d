//! BERT weights (HF names) onto `text_encoder.bert.*` / `text_encoder.cls.*`.

use super::{Plan, Route, Source};
use crate::config::Config;
use anyhow::{bail, Result};
use std::path::Path;

/// `hf-bert`: an HF BERT directory or safetensors file (`BertModel` names, or `BertForMaskedLM` with
/// `bert.` and `cls.`). See [`super::Options::fusion_from`] for the layer mapping.
pub fn hf_bert<'a>(path: &Path, cfg: &'a Config, fusion_from: Option<&[usize]>) -> Result<Plan<'a>> {
    let mut src = Source::by_extension(path)?;
    src.strip_prefix("bert.");
    let t = &cfg.model.text;
    let fusion_from = fusion_from.map(<[usize]>::to_vec);
    if let Some(list) = &fusion_from {
        let n_fusion = t.num_hidden_layers - t.fusion_layer;
        if list.len() > n_fusion {
            bail!("--fusion-from names {} layers, but the config has {n_fusion} fusion layers", list.len());
        }
    }
    let (n_layers, fusion_layer) = (t.num_hidden_layers, t.fusion_layer);
    let chosen = fusion_from.is_some();
    let targets = move |s: usize| -> Vec<usize> {
        let mut out = vec![];
        if s < n_layers && (fusion_from.is_none() || s < fusion_layer) {
            out.push(s);
        }
        if let Some(list) = &fusion_from {
            out.extend(list.iter().enumerate().filter(|(_, &l)| l == s).map(|(i, _)| fusion_layer + i));
        }
        out
    };
    let mut plan = Plan::new(src, move |key| match key.strip_prefix("cls.") {
        Some(head) => mlm_route(head, "text_encoder.cls."),
        None => match bert_route(key, "text_encoder.bert.", &targets, fusion_layer) {
            // With an explicit choice of layers, the others are left out on purpose.
            Some(Route::Unplaced(why)) if chosen => Some(Route::Ignore(format!("{why} (not chosen by --fusion-from)"))),
            route => route,
        },
    });
    plan.notes.push("cross-attention of the fusion layers is freshly initialised (as in ALBEF)".into());
    Ok(plan)
}

/// A key of a BERT encoder (relative to it: `embeddings.*`, `encoder.layer.N.*`) into the encoder at
/// `base`; `targets(N)` are the model layers source layer N seeds. Cross-attention only exists in
/// layers >= `fusion_layer`.
pub fn bert_route(key: &str, base: &str, targets: &dyn Fn(usize) -> Vec<usize>, fusion_layer: usize) -> Option<Route> {
    if key.ends_with("position_ids") {
        return Some(Route::Ignore("a buffer of position ids, not a weight".into()));
    }
    if key.starts_with("embeddings.") {
        return Some(Route::To(vec![format!("{base}{key}")]));
    }
    if key.starts_with("pooler.") {
        return Some(Route::Ignore("BERT pooler: ALBEF's text encoder has none".into()));
    }
    let (n, sub) = key.strip_prefix("encoder.layer.")?.split_once('.')?;
    let n: usize = n.parse().ok()?;
    let mut layers = targets(n);
    if sub.starts_with("crossattention.") {
        layers.retain(|&l| l >= fusion_layer);
        if layers.is_empty() {
            return Some(Route::Ignore(format!(
                "cross-attention of source layer {n}, a text-only layer here (only layers >= fusion_layer = {fusion_layer} have it)"
            )));
        }
    }
    if layers.is_empty() {
        return Some(Route::Unplaced(format!("source layer {n} maps to no layer of this config")));
    }
    Some(Route::To(layers.into_iter().map(|l| format!("{base}encoder.layer.{l}.{sub}")).collect()))
}

/// A key of BERT's MLM head relative to `cls.`, into the head at `base`.
pub fn mlm_route(key: &str, base: &str) -> Option<Route> {
    match key {
        "predictions.decoder.weight" => Some(Route::Ignore("tied to the word embeddings in alignfuse".into())),
        "predictions.decoder.bias" => Some(Route::Ignore("the same tensor as cls.predictions.bias".into())),
        k if k.starts_with("predictions.") => Some(Route::To(vec![format!("{base}{k}")])),
        k if k.starts_with("seq_relationship.") => {
            Some(Route::Ignore("next-sentence head: not an ALBEF objective".into()))
        }
        _ => None,
    }
}
