//! Where the training graph is cut into segments for `train::backward`, and which segments are
//! recomputed in the backward instead of kept (`train.grad_checkpoint`).
//!
//! candle's backward keeps every activation until it returns; cut after each encoder block, the backward
//! runs one segment at a time and drops each when done. A recomputed segment keeps nothing from the
//! forward but its input: the backward runs it again, with its graph, just before it needs it.

use super::layers::Ctx;
use candle_core::{Result, Tensor, Var};
use std::cell::RefCell;

/// A place where the graph is cut: the segment's output was handed on as `leaf`, a copy that starts a
/// graph of its own.
pub struct Cut {
    pub leaf: Tensor,
    pub segment: Segment,
}

/// The output of a segment, with its graph: kept from the forward, or computed again.
pub enum Segment {
    Kept(Tensor),
    Recompute(Box<dyn Fn() -> Result<Tensor>>),
}

impl Segment {
    pub fn output(self) -> Result<Tensor> {
        match self {
            Segment::Kept(output) => Ok(output),
            Segment::Recompute(run) => run(),
        }
    }
}

/// The cuts of one forward, in forward order.
pub struct Cuts {
    cuts: RefCell<Vec<Cut>>,
    recompute: bool,
}

impl Cuts {
    /// With `recompute`, [`Cuts::segment`] keeps only its input (activation recomputation).
    pub fn new(recompute: bool) -> Self {
        Cuts { cuts: RefCell::new(Vec::new()), recompute }
    }

    /// `f(x, ctx)`, cut after. When recomputing, the second run starts from the same state of the
    /// context's stream, so its dropout masks (hashes of seeds drawn from it) are the ones of the first; `f`
    /// must not draw from the GPU's generator (ITM's noise), which cannot replay.
    pub fn segment<F>(&self, x: &Tensor, ctx: &Ctx, f: F) -> Result<Tensor>
    where
        F: Fn(&Tensor, &Ctx) -> Result<Tensor> + 'static,
    {
        let replay = self.recompute.then(|| ctx.replay());
        let output = f(x, ctx)?;
        if !output.track_op() {
            return Ok(output);
        }
        // The rest of the forward builds on a leaf copy of the output's values.
        let leaf = Var::from_tensor(&output.detach())?.as_tensor().clone();
        let segment = match replay {
            None => Segment::Kept(output),
            Some(replay) => {
                // Only the values stay; the block's graph is dropped with `output`.
                drop(output);
                let x = x.clone();
                Segment::Recompute(Box::new(move || f(&x, &replay)))
            }
        };
        self.cuts.borrow_mut().push(Cut { leaf: leaf.clone(), segment });
        Ok(leaf)
    }

    pub fn take(&self) -> Vec<Cut> {
        self.cuts.take()
    }
}
