//! The training backward pass: the summed loss, back through the graph in segments.
//!
//! candle's backward holds every node of the graph (every activation) until it returns, while the
//! parameter gradients fill up: its peak is all activations plus all gradients (PyTorch frees each
//! node's saved tensors as its backward runs). With `train.segmented_backward`, the forward cuts the
//! graph after every ViT block and after the online text layers ([`crate::model::segments`]); the
//! losses' graphs run back to the cuts, are dropped, and each segment's graph then runs with the gradient
//! of its output and is dropped in turn. With `train.grad_checkpoint`, a ViT block's graph is not kept
//! from the forward but computed again here, to the same values.
//!
//! The cut graphs are independent: ITM's and the other losses' share only leaves and weights, the ViT's
//! segments and the text encoder's feed only their own chain. On the CPU each pair runs side by side on
//! the compute threads ([`threads::overlap`]): one candle backward keeps a second thread only half busy
//! (small ops, and its bookkeeping between them is serial). A weight reached from several graphs gets
//! their gradients summed in a fixed order (the same for any thread count), not the one-graph order.

use crate::model::albef::Output;
use crate::model::segments::{Chain, Cut};
use crate::threads;
use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

/// The micro-batch's loss: `losses` summed in order (zero when there are none).
fn sum<'a>(losses: impl IntoIterator<Item = &'a Tensor>, device: &Device) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for loss in losses {
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
    let total = sum(out.losses.iter().map(|(_, loss)| loss), device)?;
    let value = total.detach();
    let cuts = std::mem::take(&mut out.cuts);
    let heads = if cuts.is_empty() {
        vec![total]
    } else {
        // With both encoders cut, the losses' graphs share little but leaves and weights: ITM's (the 3B
        // pairs through the fusion layers, the largest) runs beside the others'.
        drop(total);
        let (itm, rest): (Vec<_>, Vec<_>) = out.losses.iter().partition(|(name, _)| *name == "itm");
        let heads = [rest, itm].into_iter().filter(|losses| !losses.is_empty());
        heads.map(|losses| sum(losses.into_iter().map(|(_, loss)| loss), device)).collect::<Result<_>>()?
    };
    out.losses = out.losses.detached();
    Ok((value, through_cuts(heads, cuts, device)?))
}

/// Gradients of the sum of `heads`, whose graphs end at the leaves of `cuts` (in forward order): the
/// heads' graphs first, then each cut's segment with its leaf's gradient, last cut first, each graph
/// dropped when done. The heads run side by side, and so do the chains ([`Chain`]): a segment's output
/// feeds only later cuts of its own chain. On one thread this is one head and one chain after the other.
pub fn through_cuts(heads: Vec<Tensor>, cuts: Vec<Cut>, device: &Device) -> Result<GradStore> {
    let Some(mut grads) = merged(device, heads, &|head| Ok(Some(head.backward()?)))? else {
        anyhow::bail!("no loss to differentiate")
    };
    // Each chain starts from the gradients the heads gave its leaves. A leaf's gradient can still track
    // the weights it was multiplied by (candle detaches the gradients of inner nodes only): detached, the
    // segment's backward does not differentiate it as well.
    let seeded = cuts.into_iter().map(|cut| {
        let seed = grads.remove(&cut.leaf).map(|g| g.detach());
        (cut, seed)
    });
    let (image, text): (Vec<_>, Vec<_>) = seeded.partition(|(cut, _)| cut.chain == Chain::Image);
    let chains: Vec<_> = [image, text].into_iter().filter(|c| !c.is_empty()).collect();
    if let Some(more) = merged(device, chains, &chain)? {
        grads.extend(more)?;
    }
    Ok(grads)
}

/// The gradients of one chain's segments, last cut first, each leaf's gradient the sum of what the heads
/// gave it (`seed`) and what the chain's later segments gave it. None: no segment was reached.
fn chain(cuts: Vec<(Cut, Option<Tensor>)>) -> Result<Option<GradStore>> {
    let mut grads: Option<GradStore> = None;
    for (cut, seed) in cuts.into_iter().rev() {
        let later = grads.as_mut().and_then(|g| g.remove(&cut.leaf)).map(|g| g.detach());
        let grad = match (seed, later) {
            (Some(seed), Some(later)) => (seed + later)?,
            (Some(grad), None) | (None, Some(grad)) => grad,
            // A cut whose leaf the loss does not reach carries no gradient.
            (None, None) => continue,
        };
        let mut more = (&cut.segment.output()? * &grad)?.sum_all()?.backward()?;
        more.remove(&grad);
        match grads.as_mut() {
            Some(g) => g.extend(more)?,
            None => grads = Some(more),
        }
    }
    Ok(grads)
}

/// `f` of each item, the first beside the rest ([`threads::overlap`]), the gradients merged in order.
fn merged<T: Send>(
    device: &Device, mut items: Vec<T>, f: &(dyn Fn(T) -> Result<Option<GradStore>> + Sync),
) -> Result<Option<GradStore>> {
    if items.len() <= 1 {
        return items.pop().map_or(Ok(None), f);
    }
    let rest = items.split_off(1);
    let first = items.pop().expect("two items or more");
    let (a, b) = threads::overlap(device, || f(first), || merged(device, rest, f));
    match (a?, b?) {
        (Some(mut a), Some(b)) => {
            a.extend(b)?;
            Ok(Some(a))
        }
        (a, b) => Ok(a.or(b)),
    }
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
            let hidden = ctx.segment(Chain::Image, &x, layer.clone())?;
            let total = ctx.segment(Chain::Image, &hidden, layer)?.sqr()?.sum_all()?;
            let grads = through_cuts(vec![total], ctx.take_cuts(), &Device::Cpu)?;
            Ok(grads.get(w.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?)
        };
        let one = grad(None)?;
        assert!(one.contains(&0.0) && one.iter().any(|&g| g != 0.0), "dropout zeroes some of {one:?}");
        assert_eq!(grad(Some(false))?, one);
        assert_eq!(grad(Some(true))?, one);
        Ok(())
    }
}
