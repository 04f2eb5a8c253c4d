//! Masked language modelling conditioned on the image, with momentum distillation (REFERENCE.md, MLM).

use crate::config::Kernels;
use crate::ops::{self, Positives};
use candle_core::{bail, Result, Tensor, D};
use rand::Rng;

/// The token ids masking needs to know.
#[derive(Debug, Clone, Copy)]
pub struct SpecialTokens {
    pub pad: u32,
    pub cls: u32,
    pub mask: u32,
    /// Random replacements are drawn from [0, vocab_size) of the model's word embeddings, specials
    /// included, as the reference does (`randint(config.vocab_size)`).
    pub vocab_size: u32,
}

/// Masked input ids and their labels (the original id where masked, -100 elsewhere).
#[derive(Debug, Clone, PartialEq)]
pub struct MaskedTokens {
    pub ids: Vec<u32>,
    pub labels: Vec<i64>,
}

/// BERT masking as the reference: each position is masked with probability `p` except `[PAD]` and `[CLS]`
/// (`[SEP]` can be; the attention mask is not consulted); a masked position becomes `[MASK]` (80%), a random
/// id (10%) or stays (10%).
pub fn mask_tokens(ids: &[u32], special: SpecialTokens, p: f64, rng: &mut impl Rng) -> MaskedTokens {
    let mut out = ids.to_vec();
    let mut labels = vec![-100i64; ids.len()];
    for (i, &id) in ids.iter().enumerate() {
        if id == special.pad || id == special.cls || rng.random::<f64>() >= p {
            continue;
        }
        labels[i] = id as i64;
        let r = rng.random::<f64>();
        if r < 0.8 {
            out[i] = special.mask;
        } else if r < 0.9 {
            out[i] = rng.random_range(0..special.vocab_size);
        }
    }
    MaskedTokens { ids: out, labels }
}

/// The masked positions of `labels` (row-major indices, u32, as [`crate::model::bert::TextEncoder::mlm_logits_at`]
/// takes them) and their original ids; None when nothing is masked (the reference would return a NaN
/// loss).
pub fn masked_positions(labels: &[i64]) -> Option<(Vec<u32>, Vec<u32>)> {
    let (positions, targets): (Vec<u32>, Vec<u32>) =
        labels.iter().enumerate().filter(|(_, &l)| l != -100).map(|(i, &l)| (i as u32, l as u32)).unzip();
    (!positions.is_empty()).then_some((positions, targets))
}

/// `(1 - alpha) * CE(logits, targets) + alpha * mean over masked tokens of
/// -sum_v softmax(logits_m) * log_softmax(logits)`. `logits`: [N, V] at the N masked positions;
/// `logits_m`: the momentum model's at the same positions (no gradient), needed when alpha > 0.
///
/// That is ITC's loss with temperature 1 and the target ids as the positives, so it runs the same op: fused,
/// one pass per row over the vocabulary gives log-softmax, targets, loss and gradient (CPU loop or
/// kernels/itc.cu) instead of a dozen [N, V] tensors.
pub fn mlm_loss(
    logits: &Tensor, logits_m: Option<&Tensor>, targets: &[u32], alpha: f64, kernels: Kernels,
) -> Result<Tensor> {
    let vocab = logits.dim(D::Minus1)?;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= vocab) {
        bail!("mlm_loss: target id {bad} is outside the vocabulary of {vocab}");
    }
    let ids = Tensor::from_slice(targets, targets.len(), logits.device())?;
    // Without a teacher the targets are the ids alone, and the op does not read logits_m.
    let (logits_m, alpha) = match logits_m {
        Some(lm) => (lm, alpha),
        None => (logits, 0.0),
    };
    let temp = Tensor::ones(1, logits.dtype(), logits.device())?;
    ops::itc_loss(logits, logits_m, &temp, alpha, Positives::Index(&ids), kernels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_statistics_match_the_reference() {
        let special = SpecialTokens { pad: 0, cls: 1, mask: 2, vocab_size: 1000 };
        let mut rng = crate::rng::stream(7, "test", "mlm", 0);
        let ids: Vec<u32> = (0..200_000)
            .map(|i| {
                if i % 10 == 0 {
                    1
                } else if i % 10 == 9 {
                    0
                } else {
                    100 + (i % 7) as u32
                }
            })
            .collect();
        let m = mask_tokens(&ids, special, 0.15, &mut rng);
        let eligible = ids.iter().filter(|&&i| i > 1).count() as f64;
        let masked: Vec<usize> = (0..ids.len()).filter(|&i| m.labels[i] != -100).collect();
        assert!(masked.iter().all(|&i| ids[i] > 1), "[PAD]/[CLS] masked");
        let frac = masked.len() as f64 / eligible;
        // 160k eligible: sd of the fraction ~ 0.0009; 5 sd bounds.
        assert!((frac - 0.15).abs() < 0.0045, "{frac}");
        let n = masked.len() as f64;
        let to_mask = masked.iter().filter(|&&i| m.ids[i] == 2).count() as f64 / n;
        let kept = masked.iter().filter(|&&i| m.ids[i] == ids[i]).count() as f64 / n;
        assert!((to_mask - 0.8).abs() < 0.01, "{to_mask}");
        // Random ids rarely coincide with the original (1/1000), so kept ~ 0.1 + 0.1/1000.
        assert!((kept - 0.1).abs() < 0.008, "{kept}");
        assert!(m.labels.iter().enumerate().all(|(i, &l)| l == -100 || l == ids[i] as i64));
        assert!((0..ids.len()).all(|i| m.labels[i] != -100 || m.ids[i] == ids[i]));
    }

    /// The loss as ALBEF writes it: cross-entropy at the targets mixed with the soft cross-entropy against
    /// the teacher's softmax.
    fn loss_as_written(logits: &Tensor, logits_m: &Tensor, targets: &[u32], alpha: f64) -> Result<Tensor> {
        let t = Tensor::from_slice(targets, (targets.len(), 1), logits.device())?;
        let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
        let ce = logp.gather(&t, 1)?.mean_all()?.neg()?;
        let soft = candle_nn::ops::softmax(logits_m, D::Minus1)?;
        let distill = (soft * &logp)?.sum(1)?.mean_all()?.neg()?;
        (ce * (1.0 - alpha))? + (distill * alpha)?
    }

    #[test]
    fn loss_and_gradient_match_albefs_formula() -> Result<()> {
        use candle_core::{Device, Var};
        let dev = Device::Cpu;
        let mut rng = crate::rng::stream(3, "test", "mlm", 0);
        let (n, vocab) = (7, 1000);
        let logits = Var::from_tensor(&(Tensor::rand(-4f32, 4f32, (n, vocab), &dev)?))?;
        let logits_m = (logits.as_tensor() + Tensor::rand(-0.5f32, 0.5f32, (n, vocab), &dev)?)?.detach();
        let targets: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab as u32)).collect();
        let want = loss_as_written(logits.as_tensor(), &logits_m, &targets, 0.4)?;
        let want_grad = want.backward()?.get(logits.as_tensor()).cloned().expect("gradient");
        for kernels in [Kernels::Fused, Kernels::Reference] {
            let got = mlm_loss(logits.as_tensor(), Some(&logits_m), &targets, 0.4, kernels)?;
            let grad = got.backward()?.get(logits.as_tensor()).cloned().expect("gradient");
            let loss_err = (got.to_scalar::<f32>()? - want.to_scalar::<f32>()?).abs();
            let grad_err = (grad - &want_grad)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(loss_err < 1e-5 && grad_err < 1e-7, "{kernels:?}: loss {loss_err:e} grad {grad_err:e}");
            // Without a teacher: plain cross-entropy.
            let ce = mlm_loss(logits.as_tensor(), None, &targets, 0.4, kernels)?.to_scalar::<f32>()?;
            let ce_want = loss_as_written(logits.as_tensor(), &logits_m, &targets, 0.0)?.to_scalar::<f32>()?;
            assert!((ce - ce_want).abs() < 1e-5, "{kernels:?}: {ce} vs {ce_want}");
            let bad = mlm_loss(logits.as_tensor(), None, &[vocab as u32], 0.4, kernels).unwrap_err().to_string();
            assert!(bad.contains("outside the vocabulary of 1000"), "{bad}");
        }
        Ok(())
    }

    #[test]
    fn masked_positions_and_their_ids() {
        assert_eq!(masked_positions(&[-100, -100, -100]), None);
        assert_eq!(masked_positions(&[-100, 7, -100, 3]), Some((vec![1, 3], vec![7, 3])));
    }
}
