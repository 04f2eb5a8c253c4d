//! Image-text contrastive loss against momentum keys of the batch plus the queue (REFERENCE.md, ITC).

use crate::config::Kernels;
use crate::model::queue::FeatureQueue;
use crate::ops::{itc_loss, Positives};
use candle_core::{Result, Tensor};

pub struct ItcOutput {
    pub loss: Tensor,
}

/// `sim_i2t = image_feat @ [text_feat_m ; text_queue] / temp` and the symmetric `sim_t2i`, soft targets
/// `alpha * softmax(sim_m) + (1 - alpha) * positives`, `itc = (loss_i2t + loss_t2i) / 2`.
///
/// `ids`: with multi-positive targets, the batch's image ids; every key with the same image id (in the
/// batch or the idx queue) counts as a positive (`pos / pos.sum()`). None: the diagonal is the positive.
#[allow(clippy::too_many_arguments)]
pub fn itc(image_feat: &Tensor, text_feat: &Tensor, image_feat_m: &Tensor, text_feat_m: &Tensor,
    queue: &FeatureQueue, temp: &Tensor, alpha: f64, ids: Option<&[i64]>, kernels: Kernels) -> Result<ItcOutput> {
    let image_feat_all = Tensor::cat(&[&image_feat_m.t()?, &queue.image_queue], 1)?;
    let text_feat_all = Tensor::cat(&[&text_feat_m.t()?, &queue.text_queue], 1)?;
    let sim_i2t = image_feat.matmul(&text_feat_all)?;
    let sim_t2i = text_feat.matmul(&image_feat_all)?;
    let sim_i2t_m = image_feat_m.matmul(&text_feat_all)?;
    let sim_t2i_m = text_feat_m.matmul(&image_feat_all)?;
    let pos_mask = ids.map(|ids| positive_mask(ids, &queue.idx_queue, image_feat.device())).transpose()?;
    let positives = || match &pos_mask {
        Some(m) => Positives::Mask(m),
        None => Positives::Diagonal,
    };
    let i2t = itc_loss(&sim_i2t, &sim_i2t_m, temp, alpha, positives(), kernels)?;
    let t2i = itc_loss(&sim_t2i, &sim_t2i_m, temp, alpha, positives(), kernels)?;
    Ok(ItcOutput { loss: ((i2t + t2i)? / 2.0)? })
}

/// [B, B + Q] 0/1 mask: key j is a positive of row i when it shows the same image.
fn positive_mask(ids: &[i64], idx_queue: &[i64], device: &candle_core::Device) -> Result<Tensor> {
    let all: Vec<i64> = ids.iter().chain(idx_queue).copied().collect();
    let mask: Vec<f32> =
        ids.iter().flat_map(|i| all.iter().map(move |j| if i == j { 1.0 } else { 0.0 })).collect();
    Tensor::from_vec(mask, (ids.len(), all.len()), device)
}
