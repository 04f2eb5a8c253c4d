//! Reads from the device to the host in the training step, all through [`read`]. Each read waits for
//! everything queued on the device before it, so the step makes as few as it can: one per micro-batch
//! (its total loss, named losses and metrics together) and one per optimiser step (the gradient norm).
//! [`count`] lets a test hold the step to that.

use candle_core::{DType, Result, Tensor};
use std::cell::Cell;

thread_local! {
    static READS: Cell<usize> = const { Cell::new(0) };
}

/// The values of `t` (any shape, any float dtype) on the host, as f64.
pub fn read(t: &Tensor) -> Result<Vec<f64>> {
    READS.with(|r| r.set(r.get() + 1));
    t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()
}

/// Reads made through [`read`] on this thread so far.
pub fn count() -> usize {
    READS.with(Cell::get)
}
