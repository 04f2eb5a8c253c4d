//! `alignfuse embed`: the L2-normalised ITC projections of every image and caption of an annotation
//! file, for building search indexes outside alignfuse.

use super::eval::load_inputs;
use super::EmbedArgs;
use crate::config::Config;
use crate::eval::embed::embed_set;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Writes a safetensors file with `image_embeds` [N_images, embed_dim] (row i = entry i of the
/// annotation file), `text_embeds` [N_texts, embed_dim] (every caption in file order, an entry's
/// captions together), `txt2img` i64 [N_texts] (the image row of each caption) and `text_offsets` i64
/// [N_images + 1] (the captions of image i are rows text_offsets[i]..text_offsets[i+1]). Cosine
/// similarity is the dot product of two rows.
pub fn run(args: EmbedArgs) -> Result<()> {
    let cfg = Config::load(&args.cfg.config, &args.cfg.set)?;
    let inputs = load_inputs(cfg, &args.checkpoint, &args.ann)?;
    let set = &inputs.set;
    let emb = embed_set(&inputs.model, set, &inputs.tokenizer, &inputs.cfg, false)
        .with_context(|| format!("embedding {} with {}", args.ann.display(), args.checkpoint.display()))?;
    let cpu = |t: &Tensor| -> Result<Tensor> { Ok(t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?) };
    let i64s = |v: Vec<i64>| -> Result<Tensor> { Ok(Tensor::new(v.as_slice(), &Device::Cpu)?) };
    let offsets = std::iter::once(0).chain(set.img2txt.iter().scan(0, |end, own| {
        *end += own.len() as i64;
        Some(*end)
    }));
    let tensors = HashMap::from([
        ("image_embeds", cpu(&emb.image_feat)?),
        ("text_embeds", cpu(&emb.text_feat)?),
        ("txt2img", i64s(set.txt2img.iter().map(|&i| i as i64).collect())?),
        ("text_offsets", i64s(offsets.collect())?),
    ]);
    crate::write_atomic(&args.out, |tmp| Ok(candle_core::safetensors::save(&tensors, tmp)?))?;
    println!("wrote {} image and {} caption embeddings ({}-d) to {}", set.images.len(), set.texts.len(),
        emb.image_feat.dim(1)?, args.out.display());
    Ok(())
}
