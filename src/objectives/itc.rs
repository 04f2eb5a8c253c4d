//! Image-text contrastive loss against momentum keys of the batch plus the queue (REFERENCE.md, ITC).

use crate::config::Kernels;
use crate::ops::{itc_loss, Positives};
use candle_core::{Result, Tensor};

/// Momentum features of earlier batches: `image` and `text` [embed_dim, Q] (one column per queued
/// pair) and the image id of each column (-100: never written).
pub struct Queued<'a> {
    pub image: &'a Tensor,
    pub text: &'a Tensor,
    pub ids: &'a [i64],
}

/// The batch's momentum features as ITC keys: this rank's own (`local`), or every rank's in rank order
/// (`global` with data parallelism). `image` and `text` are [N, embed_dim], `ids` their image ids, and
/// this rank's pairs are rows `offset .. offset + B`.
pub struct Keys<'a> {
    pub image: &'a Tensor,
    pub text: &'a Tensor,
    pub ids: &'a [i64],
    pub offset: usize,
}

/// `sim_i2t = image_feat @ [keys.text ; text_queue] / temp` and the symmetric `sim_t2i`, soft targets
/// `alpha * softmax(sim_m) + (1 - alpha) * positives` (`sim_m` from the momentum features of the same
/// B pairs), `itc = (loss_i2t + loss_t2i) / 2`.
///
/// `multi_positive`: every key with the same image id (in the batch keys or the queue) counts as a
/// positive (`pos / pos.sum()`). Otherwise the pair's own key (row `offset + i`) is the positive.
#[allow(clippy::too_many_arguments)]
pub fn itc(
    image_feat: &Tensor, text_feat: &Tensor, image_feat_m: &Tensor, text_feat_m: &Tensor, keys: &Keys, queue: &Queued,
    temp: &Tensor, alpha: f64, multi_positive: bool, kernels: Kernels,
) -> Result<Tensor> {
    let image_feat_all = Tensor::cat(&[&keys.image.t()?, queue.image], 1)?;
    let text_feat_all = Tensor::cat(&[&keys.text.t()?, queue.text], 1)?;
    let sim_i2t = crate::ops::matmul_by_constant(image_feat, &text_feat_all, kernels)?;
    let sim_t2i = crate::ops::matmul_by_constant(text_feat, &image_feat_all, kernels)?;
    let sim_i2t_m = image_feat_m.matmul(&text_feat_all)?;
    let sim_t2i_m = text_feat_m.matmul(&image_feat_all)?;
    let b = image_feat.dim(0)?;
    let device = image_feat.device();
    let pos_mask = if multi_positive {
        Some(positive_mask(&keys.ids[keys.offset..keys.offset + b], &[keys.ids, queue.ids].concat(), device)?)
    } else if keys.image.dim(0)? != b {
        // The own key of row i is column offset + i: marked by position, not by image id.
        let rows: Vec<i64> = (keys.offset..keys.offset + b).map(|r| r as i64).collect();
        let cols: Vec<i64> = (0..keys.ids.len() as i64).chain(queue.ids.iter().map(|_| -1)).collect();
        Some(positive_mask(&rows, &cols, device)?)
    } else {
        None
    };
    let positives = || match &pos_mask {
        Some(m) => Positives::Mask(m),
        None => Positives::Diagonal,
    };
    let i2t = itc_loss(&sim_i2t, &sim_i2t_m, temp, alpha, positives(), kernels)?;
    let t2i = itc_loss(&sim_t2i, &sim_t2i_m, temp, alpha, positives(), kernels)?;
    (i2t + t2i)? / 2.0
}

/// [B, N] 0/1 mask: key j is a positive of row i when their ids are equal.
fn positive_mask(rows: &[i64], keys: &[i64], device: &candle_core::Device) -> Result<Tensor> {
    let mask: Vec<f32> = rows.iter().flat_map(|i| keys.iter().map(move |j| if i == j { 1.0 } else { 0.0 })).collect();
    Tensor::from_vec(mask, (rows.len(), keys.len()), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn positive_mask_marks_same_image_ids_in_batch_and_queue() -> Result<()> {
        let m: Vec<Vec<f32>> = positive_mask(&[0, 1, 0], &[0, 1, 0, -100, 1, 0], &Device::Cpu)?.to_vec2()?;
        assert_eq!(m[0], vec![1., 0., 1., 0., 0., 1.]);
        assert_eq!(m[1], vec![0., 1., 0., 0., 1., 0.]);
        assert_eq!(m[2], m[0]);
        Ok(())
    }

    /// Multi-positive targets `pos / pos.sum(1)` with alpha = 0, against the formula in f64.
    #[test]
    fn multi_positive_itc_matches_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let f = |v: &[f32], n: usize| -> Result<Tensor> {
            let t = Tensor::from_slice(v, (n, 2), &dev)?;
            t.broadcast_div(&t.sqr()?.sum_keepdim(1)?.sqrt()?)
        };
        let img = f(&[1., 0., 0.6, 0.8, -1., 0.2], 3)?;
        let txt = f(&[0.9, 0.1, 0.5, 0.9, -0.8, 0.5], 3)?;
        let (image_queue, text_queue) = (f(&[0.3, -0.9, 0.7, 0.1], 2)?.t()?, f(&[-0.2, 1., 0.4, 0.4], 2)?.t()?);
        let idx_queue = [1i64, 0];
        let queue = Queued { image: &image_queue, text: &text_queue, ids: &idx_queue };
        let ids = [0i64, 1, 0];
        let temp = Tensor::new(0.5f32, &dev)?;
        for kernels in [Kernels::Reference, Kernels::Fused] {
            let keys = Keys { image: &img, text: &txt, ids: &ids, offset: 0 };
            let got = itc(&img, &txt, &img, &txt, &keys, &queue, &temp, 0.0, true, kernels)?.to_scalar::<f32>()? as f64;
            let all_ids: Vec<i64> = ids.iter().chain(queue.ids).copied().collect();
            let loss_dir = |q: &Tensor, keys: &Tensor, qdata: &Tensor| -> Result<f64> {
                let k_all = Tensor::cat(&[&keys.t()?, qdata], 1)?;
                let sims: Vec<Vec<f32>> = q.matmul(&k_all)?.to_vec2()?;
                let mut total = 0.0;
                for (i, row) in sims.iter().enumerate() {
                    let s: Vec<f64> = row.iter().map(|&x| x as f64 / 0.5).collect();
                    let lse = s.iter().map(|x| x.exp()).sum::<f64>().ln();
                    let pos: Vec<usize> = (0..s.len()).filter(|&j| all_ids[j] == ids[i]).collect();
                    total -= pos.iter().map(|&j| s[j] - lse).sum::<f64>() / pos.len() as f64;
                }
                Ok(total / sims.len() as f64)
            };
            let want = (loss_dir(&img, &txt, queue.text)? + loss_dir(&txt, &img, queue.image)?) / 2.0;
            assert!((got - want).abs() < 1e-5 * want.abs(), "{kernels:?}: {got} vs {want}");
        }
        Ok(())
    }
}
