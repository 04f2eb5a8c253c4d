//! Where the training graph is cut into segments for `train::backward`, and which segments are
//! recomputed in the backward instead of kept (`train.grad_checkpoint`).
//!
//! candle's backward keeps every activation until it returns; cut after each encoder block, the backward
//! runs one segment at a time and drops each when done. A recomputed segment keeps nothing from the
//! forward but its input: the backward runs it again, with its graph, just before it needs it.
//!
//! Each cut belongs to a [`Chain`], one per encoder: a chain's segments feed only its own later cuts (and
//! the losses), never another chain's, so the backward runs the two chains side by side.

use super::layers::Ctx;
use candle_core::{Result, Tensor, Var};
use std::sync::Mutex;

/// A place where the graph is cut: the segment's output was handed on as `leaf`, a copy that starts a
/// graph of its own.
pub struct Cut {
    pub chain: Chain,
    pub leaf: Tensor,
    pub segment: Segment,
}

/// The encoder whose graph a cut divides: the ViT (after each block) or the text encoder (after its
/// text layers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chain {
    Image,
    Text,
}

/// The output of a segment, with its graph: kept from the forward, or computed again.
pub enum Segment {
    Kept(Tensor),
    Recompute(Box<dyn Fn() -> Result<Tensor> + Send + Sync>),
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
    cuts: Mutex<Vec<Cut>>,
    recompute: bool,
}

impl Cuts {
    /// With `recompute`, [`Cuts::segment`] keeps only its input (activation recomputation).
    pub fn new(recompute: bool) -> Self {
        Cuts { cuts: Mutex::new(Vec::new()), recompute }
    }

    /// `f(x, ctx)`, cut after. When recomputing, the second run starts from the same state of the
    /// context's stream, so its dropout masks (hashes of seeds drawn from it) are the ones of the first; `f`
    /// must not draw from the GPU's generator (ITM's noise), which cannot replay.
    pub fn segment<F>(&self, chain: Chain, x: &Tensor, ctx: &Ctx, f: F) -> Result<Tensor>
    where
        F: Fn(&Tensor, &Ctx) -> Result<Tensor> + Send + Sync + 'static,
    {
        let replay = self.recompute.then(|| ctx.replay());
        let output = f(x, ctx)?;
        match replay {
            None => self.cut(chain, output),
            Some(_) if !output.track_op() => Ok(output),
            Some(replay) => {
                let leaf = leaf_of(&output)?;
                // Only the values stay; the block's graph is dropped with `output`.
                drop(output);
                let x = x.clone();
                let segment = Segment::Recompute(Box::new(move || f(&x, &replay)));
                self.lock().push(Cut { chain, leaf: leaf.clone(), segment });
                Ok(leaf)
            }
        }
    }

    /// `output` handed on as a leaf, its graph kept for the backward (never recomputed).
    pub fn cut(&self, chain: Chain, output: Tensor) -> Result<Tensor> {
        if !output.track_op() {
            return Ok(output);
        }
        let leaf = leaf_of(&output)?;
        self.lock().push(Cut { chain, leaf: leaf.clone(), segment: Segment::Kept(output) });
        Ok(leaf)
    }

    pub fn take(&self) -> Vec<Cut> {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Cut>> {
        self.cuts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The leaf copy of a segment's output values the rest of the forward builds on.
fn leaf_of(output: &Tensor) -> Result<Tensor> {
    Ok(Var::from_tensor(&output.detach())?.as_tensor().clone())
}
