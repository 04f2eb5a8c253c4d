//! The ViT and BERT encoders against HF transformers / timm golden outputs and autograd gradients
//! (fixtures from tests/fixtures/gen_fixtures.py), plus the every-parameter-gets-a-gradient check.

mod common;
use alignfuse::config::{Kernels, TextConfig, VisionConfig};
use alignfuse::model::bert::TextEncoder;
use alignfuse::model::layers::Ctx;
use alignfuse::model::params::ParamStore;
use alignfuse::model::vit::{interpolate_pos_embed, Vit};
use candle_core::{Device, Tensor, Var};
use common::*;

fn bert_cfg() -> TextConfig {
    TextConfig {
        vocab_size: 50,
        hidden_size: 32,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        intermediate_size: 64,
        fusion_layer: 2,
        max_position_embeddings: 16,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
    }
}

fn vit_cfg(layer_scale: Option<f64>) -> VisionConfig {
    VisionConfig {
        image_res: 32,
        patch_size: 8,
        vision_width: 32,
        vision_depth: 2,
        vision_heads: 4,
        mlp_ratio: 4.0,
        layer_scale,
        vision_ln_eps: 1e-6,
    }
}

/// Every weight in the fixture is used and the model asks for no weight the fixture lacks.
fn assert_names_match(store: &ParamStore, n_fixture: usize) {
    assert_eq!(
        store.len(),
        n_fixture,
        "the model created parameters the fixture does not have: {:?}",
        store.vars().iter().map(|(n, _)| n.clone()).collect::<Vec<_>>()
    );
}

fn check_grads(
    fx: &std::collections::HashMap<String, Tensor>, store: &ParamStore, grads: &candle_core::backprop::GradStore,
) {
    let mut n = 0;
    for (k, want) in fx.iter().filter(|(k, _)| k.starts_with("grad.") && !k.starts_with("grad.input.")) {
        let name = &k["grad.".len()..];
        let var = store.var(name).unwrap_or_else(|| panic!("no parameter {name}"));
        let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_close(k, got, want, 1e-4);
        n += 1;
    }
    assert!(n >= 4, "fixture has too few gradients");
}

#[test]
fn bert_matches_hf_transformers() {
    let fx = load_fixture("bert.safetensors");
    let store = store_from(&fx, &["text_encoder."]);
    let n_weights = store.len();
    let te = TextEncoder::new(&store.root().pp("text_encoder"), &bert_cfg(), 32).unwrap();
    assert_names_match(&store, n_weights);
    let ctx = Ctx::eval(Kernels::Reference);
    let ids = ids_u32(&fx["input.input_ids"]);
    let mask = &fx["input.attention_mask"];
    let image = Var::from_tensor(&fx["input.image_embeds"]).unwrap();
    let text = te.bert.forward_text(&ids, mask, &ctx).unwrap();
    assert_close("text_embeds", &text, &fx["output.text_embeds"], 1e-5);
    let fused = te.bert.forward_fusion(&fx["output.text_embeds"], mask, image.as_tensor(), &ctx).unwrap();
    assert_close("fusion_embeds", &fused, &fx["output.fusion_embeds"], 1e-5);
    let logits = te.mlm_logits(&ids, mask, image.as_tensor(), &ctx).unwrap();
    assert_close("mlm_logits", &logits, &fx["output.mlm_logits"], 1e-5);
    let s = (logits * &fx["probe.mlm_logits"]).unwrap().sum_all().unwrap();
    let grads = s.backward().unwrap();
    check_grads(&fx, &store, &grads);
    assert_close("grad image_embeds", grads.get(image.as_tensor()).unwrap(), &fx["grad.input.image_embeds"], 1e-4);
}

#[test]
fn fused_kernels_match_too() {
    let fx = load_fixture("bert.safetensors");
    let store = store_from(&fx, &["text_encoder."]);
    let te = TextEncoder::new(&store.root().pp("text_encoder"), &bert_cfg(), 32).unwrap();
    let ids = ids_u32(&fx["input.input_ids"]);
    let logits = te
        .mlm_logits(&ids, &fx["input.attention_mask"], &fx["input.image_embeds"], &Ctx::eval(Kernels::Fused))
        .unwrap();
    assert_close("mlm_logits (fused)", &logits, &fx["output.mlm_logits"], 1e-5);
    // The head on chosen positions only (what the MLM loss reads) gives those rows of HF's logits.
    let (b, l, v) = fx["output.mlm_logits"].dims3().unwrap();
    let picked: Vec<u32> = vec![0, 3, (l + 1) as u32, (b * l - 1) as u32];
    let positions = candle_core::Tensor::new(picked.as_slice(), &candle_core::Device::Cpu).unwrap();
    let at = te
        .mlm_logits_at(
            &ids,
            &fx["input.attention_mask"],
            &fx["input.image_embeds"],
            &positions,
            &Ctx::eval(Kernels::Fused),
        )
        .unwrap();
    let want = fx["output.mlm_logits"].reshape((b * l, v)).unwrap().index_select(&positions, 0).unwrap();
    assert_close("mlm_logits_at", &at, &want, 1e-5);
}

fn check_vit(file: &str, layer_scale: Option<f64>) {
    let fx = load_fixture(file);
    let store = store_from(&fx, &["visual_encoder."]);
    let n_weights = store.len();
    let vit = Vit::new(&store.root().pp("visual_encoder"), &vit_cfg(layer_scale)).unwrap();
    assert_names_match(&store, n_weights);
    let out = vit.forward(&fx["input.image"], &Ctx::eval(Kernels::Reference)).unwrap();
    assert_close("image_embeds", &out, &fx["output.image_embeds"], 1e-5);
    let s = (out * &fx["probe.image_embeds"]).unwrap().sum_all().unwrap();
    check_grads(&fx, &store, &s.backward().unwrap());
}

#[test]
fn vit_matches_timm() {
    check_vit("vit.safetensors", None);
}

#[test]
fn vit_with_layer_scale_matches_timm() {
    check_vit("vit_ls.safetensors", Some(1.0));
}

#[test]
fn pos_embed_interpolation_matches_torch_bicubic() {
    let fx = load_fixture("pos_interp.safetensors");
    let pos = &fx["input.pos_embed"];
    assert_close("6x6", &interpolate_pos_embed(pos, 6).unwrap(), &fx["output.pos_embed_6x6"], 1e-5);
    assert_close("3x3", &interpolate_pos_embed(pos, 3).unwrap(), &fx["output.pos_embed_3x3"], 1e-5);
}

/// Catches the silent-gradient trap (fused softmax / LayerNorm without backward): after one backward
/// every trainable parameter of each freshly initialised encoder has a non-zero gradient.
#[test]
fn every_parameter_gets_a_gradient() {
    let dev = Device::Cpu;
    for kernels in [Kernels::Reference, Kernels::Fused] {
        let store = ParamStore::new(3, &dev);
        let vit = Vit::new(&store.root().pp("visual_encoder"), &vit_cfg(Some(0.5))).unwrap();
        let te = TextEncoder::new(&store.root().pp("text_encoder"), &bert_cfg(), 32).unwrap();
        let ctx = Ctx::new(true, kernels, alignfuse::rng::stream(0, "test", "", 0));
        let img = Tensor::from_vec(
            (0..2 * 3 * 32 * 32).map(|i| ((i * 7919) % 255) as f32 / 255.0).collect::<Vec<_>>(),
            (2, 3, 32, 32),
            &dev,
        )
        .unwrap();
        let image_embeds = vit.forward(&img, &ctx).unwrap();
        let ids = Tensor::new(&[[2u32, 7, 9, 11, 3], [2, 5, 3, 0, 0]], &dev).unwrap();
        let mask = Tensor::new(&[[1f32, 1., 1., 1., 1.], [1., 1., 1., 0., 0.]], &dev).unwrap();
        let logits = te.mlm_logits(&ids, &mask, &image_embeds, &ctx).unwrap();
        let probe = Tensor::from_vec(
            (0..logits.elem_count()).map(|i| ((i * 31) % 17) as f32 - 8.0).collect::<Vec<_>>(),
            logits.shape(),
            &dev,
        )
        .unwrap();
        let grads = (logits * probe).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, var) in store.vars() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{kernels:?}: no gradient for {name}"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0, "{kernels:?}: zero gradient for {name}");
        }
    }
}
