//! One ALBEF pre-training step against a PyTorch reference written from REFERENCE.md's formulas
//! (tests/fixtures/gen_fixtures.py): the three losses, per-loss gradients, temp clamp, EMA update and the
//! queue after enqueue. The random parts (queues, negatives, MLM mask) are fixture inputs.

mod common;
use alignfuse::config::{Config, Kernels};
use alignfuse::model::albef::{Albef, Draws, Inputs, Output};
use alignfuse::model::layers::Ctx;
use alignfuse::model::params::ParamStore;
use alignfuse::objectives::{itm::ItmNegatives, mlm::MaskedTokens};
use candle_core::{DType, Device, Tensor};
use common::*;
use std::collections::HashMap;

struct FixedDraws {
    neg: ItmNegatives,
    mlm: MaskedTokens,
}

impl Draws for FixedDraws {
    fn negatives(&mut self, _: &Tensor, _: &Tensor, _: &[i64], _: &[usize]) -> anyhow::Result<ItmNegatives> {
        Ok(self.neg.clone())
    }
    fn mlm_mask(&mut self, _: &[u32]) -> MaskedTokens {
        self.mlm.clone()
    }
}

fn to_u32(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

fn flat_i64(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_dtype(DType::I64).unwrap().to_vec1().unwrap()
}

/// Builds the fixture's model, loads its state, runs one step (EMA update, then the forward); returns the
/// model, the forward's output and the fixture.
fn run_step(kernels: Kernels) -> (Albef, Output, HashMap<String, Tensor>) {
    let fx = load_fixture("albef_step.safetensors");
    let mut cfg = Config::load(&fixture_path("albef_step.toml"), &[]).unwrap();
    cfg.kernels = kernels;
    let mut model = Albef::new(&cfg, ParamStore::new(0, &Device::Cpu)).unwrap();
    let state: HashMap<String, Tensor> = fx
        .iter()
        .filter(|(k, _)| !["input.", "output.", "grad", "probe."].iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let unused = model.load_named(&state).unwrap();
    assert!(unused.is_empty(), "fixture tensors the model does not use: {unused:?}");
    let mut draws = FixedDraws {
        neg: ItmNegatives {
            image_for_text: to_u32(&fx["input.neg_image_for_text"]),
            text_for_image: to_u32(&fx["input.neg_text_for_image"]),
            same_caption: 0,
        },
        mlm: MaskedTokens {
            ids: flat_i64(&fx["input.mlm_input_ids"]).into_iter().map(|x| x as u32).collect(),
            labels: flat_i64(&fx["input.mlm_labels"]),
        },
    };
    let ids = ids_u32(&fx["input.input_ids"]);
    let image_ids: Vec<i64> = (0..ids.dim(0).unwrap() as i64).collect();
    let caption_groups: Vec<usize> = (0..image_ids.len()).collect();
    let batch = Inputs {
        images: &fx["input.image"],
        input_ids: &ids,
        token_ids: &ids.flatten_all().unwrap().to_vec1::<u32>().unwrap(),
        attention_mask: &fx["input.attention_mask"],
        image_ids: &image_ids,
        caption_groups: &caption_groups,
    };
    let ctx = Ctx::eval(kernels);
    model.update_momentum().unwrap();
    let out = model.forward(&batch, cfg.model.alpha, &mut draws, &ctx, &ctx, &alignfuse::dist::Dist::single()).unwrap();
    model.enqueue(out.queue_update.as_ref().unwrap()).unwrap();
    (model, out, fx)
}

fn scalar(t: &Tensor) -> Tensor {
    t.flatten_all().unwrap()
}

fn check(kernels: Kernels) {
    let (model, out, fx) = run_step(kernels);
    let state: HashMap<String, Tensor> = model.named_tensors().unwrap().into_iter().collect();
    assert_close("temp after clamp", &state["temp"].reshape(()).unwrap(), &fx["output.temp_clamped"], 0.0);
    assert_eq!(out.metrics.get("temp").unwrap().to_scalar::<f32>().unwrap(), 0.5);
    let loss = |name| out.losses.get(name).unwrap_or_else(|| panic!("no {name} loss"));
    let losses = [("itc", loss("itc")), ("itm", loss("itm")), ("mlm", loss("mlm"))];
    for (name, loss) in losses {
        assert_close(&format!("loss_{name}"), &scalar(loss), &scalar(&fx[&format!("output.loss_{name}")]), 1e-5);
    }
    let total: f32 = losses.iter().map(|(_, l)| l.to_scalar::<f32>().unwrap()).sum();

    for (name, loss) in losses {
        let grads = loss.backward().unwrap();
        let prefix = format!("grad_{name}.");
        let mut n = 0;
        for (k, want) in fx.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let pname = &k[prefix.len()..];
            let var = model.params().var(pname).unwrap_or_else(|| panic!("no parameter {pname}"));
            let got = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient for {pname}"));
            assert_close(k, &got.reshape(want.shape()).unwrap(), want, 1e-4);
            n += 1;
        }
        assert!(n >= 5, "{name}: only {n} gradients in the fixture");
    }
    let mut out = out;
    let (summed, _) = alignfuse::train::backward(&mut out, &Device::Cpu).unwrap();
    assert!((summed.to_scalar::<f32>().unwrap() - total).abs() < 1e-5);

    // EMA happened before the momentum forward, on the momentum twin only.
    for (k, want) in fx.iter().filter(|(k, _)| k.starts_with("output.ema.")) {
        let ckpt = &k["output.ema.".len()..];
        assert_close(k, &state[ckpt], want, 1e-6);
    }
    // Queue after enqueue: batch first at ptr 6, wrapping to columns 0 and 1.
    assert_close("image_queue", &model.queue().image_queue, &fx["output.image_queue"], 1e-5);
    assert_close("text_queue", &model.queue().text_queue, &fx["output.text_queue"], 1e-5);
    assert_eq!(model.queue().ptr as i64, flat_i64(&fx["output.queue_ptr"])[0]);
}

#[test]
fn golden_step_reference_kernels() {
    check(Kernels::Reference);
}

#[test]
fn golden_step_fused_kernels() {
    check(Kernels::Fused);
}

/// A saved state reloads into an identical model.
#[test]
fn state_round_trips() {
    let (model, _, _) = run_step(Kernels::Reference);
    let state: HashMap<String, Tensor> = model.named_tensors().unwrap().into_iter().collect();
    let cfg = Config::load(&fixture_path("albef_step.toml"), &[]).unwrap();
    let mut other = Albef::new(&cfg, ParamStore::new(99, &Device::Cpu)).unwrap();
    assert!(other.load_named(&state).unwrap().is_empty());
    for (name, t) in other.named_tensors().unwrap() {
        assert_close(&name, &t.to_dtype(DType::F32).unwrap(), &state[&name].to_dtype(DType::F32).unwrap(), 0.0);
    }
    let mut missing = state.clone();
    missing.remove("text_queue");
    let err = other.load_named(&missing).unwrap_err();
    assert!(err.to_string().contains("text_queue"), "{err}");
}
