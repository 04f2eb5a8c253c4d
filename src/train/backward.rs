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
    let mut grads = total.backward()?;
    drop(total);
    for cut in cuts.into_iter().rev() {
        // A cut whose leaf the loss does not reach carries no gradient.
        let Some(grad) = grads.remove(&cut.leaf) else { continue };
        let mut more = (&cut.segment.output()? * &grad)?.sum_all()?.backward()?;
        more.remove(&grad);
        grads.extend(more)?;
    }
    Ok((value, grads))
}
