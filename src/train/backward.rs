//! The training backward pass: the summed loss, back through the graph in segments.
//!
//! candle's backward holds every node of the graph (every activation) until it returns, while the
//! parameter gradients fill up: its peak is all activations plus all gradients (PyTorch frees each
//! node's saved tensors as its backward runs). With `train.segmented_backward`, the forward cuts the
//! graph after every ViT block ([`crate::model::segments`]); the loss's graph runs back to the last cut,
//! is dropped, and each block's graph then runs with the gradient of its output and is dropped in turn.
//! With `train.grad_checkpoint`, a block's graph is not kept from the forward but computed again here.
//! The gradients are the same to the bit: a block's output gets exactly its leaf's gradient, and a block
//! computed again computes the same values.

use crate::model::albef::Output;
use crate::model::segments::Cut;
use crate::objectives::Named;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

/// The micro-batch's loss: its named losses summed in order (zero when there are none).
fn sum(losses: &Named, device: &Device) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (_, loss) in losses.iter() {
        total = Some(match total {
            Some(t) => (t + loss)?,
            None => loss.clone(),
        });
    }
    Ok(match total {
        Some(t) => t,
        None => Tensor::zeros((), DType::F32, device)?,
    })
}

/// Gradients of the summed losses of `out`, and that sum. Afterwards `out` holds its losses detached and
/// no cuts: nothing of the forward's graph is left.
pub fn backward(out: &mut Output, device: &Device) -> Result<(Tensor, GradStore)> {
    let total = sum(&out.losses, device)?;
    out.losses = out.losses.detached();
    let cuts = std::mem::take(&mut out.cuts);
    let value = total.detach();
    Ok((value, through_cuts(total, cuts)?))
}

/// Gradients of `total`, whose graph ends at the leaves of `cuts` (in forward order): its own graph first,
/// then each cut's segment with its leaf's gradient, last cut first; each graph is dropped when done.
pub fn through_cuts(total: Tensor, cuts: Vec<Cut>) -> Result<GradStore> {
    let mut grads = total.backward()?;
    drop(total);
    for cut in cuts.into_iter().rev() {
        // A cut whose leaf the loss does not reach carries no gradient. A leaf's gradient can still track
        // the weights it was multiplied by (candle detaches the gradients of inner nodes only): detached,
        // the segment's backward does not differentiate it as well.
        let Some(grad) = grads.remove(&cut.leaf) else { continue };
        let grad = grad.detach();
        let mut more = (&cut.segment.output()? * &grad)?.sum_all()?.backward()?;
        more.remove(&grad);
        grads.extend(more)?;
    }
    Ok(grads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Kernels;
    use crate::model::layers::Ctx;
    use candle_core::Var;

    /// A segment run again in the backward draws the dropout mask it drew in the forward: the gradients
    /// equal those of the kept segment and of one graph, bit for bit.
    #[test]
    fn a_recomputed_segment_draws_the_same_dropout() -> Result<()> {
        let w = Var::new(&[[0.5f32, -1.0, 2.0, 0.25, 3.0, -0.75]], &Device::Cpu)?;
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0, 5.0, 6.0]], &Device::Cpu)?;
        let grad = |cuts: Option<bool>| -> Result<Vec<f32>> {
            let mut ctx = Ctx::new(true, Kernels::Fused, crate::rng::stream(7, "test", "replay", 0));
            if let Some(recompute) = cuts {
                ctx = ctx.with_cuts(recompute);
            }
            let weight = w.as_tensor().clone();
            let layer = move |x: &Tensor, ctx: &Ctx| ctx.dropout(&x.broadcast_mul(&weight)?, 0.5);
            let hidden = ctx.segment(&x, layer.clone())?;
            let total = ctx.segment(&hidden, layer)?.sqr()?.sum_all()?;
            let grads = through_cuts(total, ctx.take_cuts())?;
            Ok(grads.get(w.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?)
        };
        let one = grad(None)?;
        assert!(one.contains(&0.0) && one.iter().any(|&g| g != 0.0), "dropout zeroes some of {one:?}");
        assert_eq!(grad(Some(false))?, one);
        assert_eq!(grad(Some(true))?, one);
        Ok(())
    }
}
