//! What a fused op's forward keeps for its backward. A candle custom op has one output, so anything else
//! its backward needs (a pre-activation, softmax statistics, inputs in another layout) lives in the op.

use candle_core::{bail, Result};
use std::sync::Mutex;

pub(super) struct Saved<T> {
    /// The op's name, for errors.
    op: &'static str,
    value: Mutex<Option<T>>,
}

impl<T: Clone> Saved<T> {
    pub(super) fn new(op: &'static str) -> Self {
        Saved { op, value: Mutex::new(None) }
    }

    /// Keeps `value` (the forward's).
    pub(super) fn keep(&self, value: T) -> Result<()> {
        match self.value.lock() {
            Ok(mut v) => {
                *v = Some(value);
                Ok(())
            }
            Err(_) => bail!("{}: a previous forward panicked", self.op),
        }
    }

    /// What the forward kept (for the backward).
    pub(super) fn get(&self) -> Result<T> {
        match self.value.lock().map(|v| v.clone()) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => bail!("{}: backward before forward", self.op),
            Err(_) => bail!("{}: a previous forward panicked", self.op),
        }
    }
}
