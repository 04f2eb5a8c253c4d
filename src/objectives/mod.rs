//! The pre-training objectives, as functions of plain tensors: `itc` (contrastive with momentum soft
//! targets over the queues), `itm` (matching with hard negatives), `mlm` (masked LM with distillation).
//! Nothing here knows the model: callers pass features, logits and queue tensors.

pub mod itc;
pub mod itm;
pub mod mlm;

use candle_core::Tensor;

/// Scalar tensors by name, in the order they were added: a forward's losses, or its metrics. The
/// training loop sums, checks, logs and accumulates losses by iterating this, so an objective is added in
/// its own file plus the one line of the model's forward that inserts its loss.
#[derive(Debug, Default, Clone)]
pub struct Named(Vec<(&'static str, Tensor)>);

impl Named {
    pub fn insert(&mut self, name: &'static str, value: Tensor) {
        self.0.push((name, value));
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, t)| t)
    }

    /// The same values, cut from the graph that computed them.
    pub fn detached(&self) -> Named {
        Named(self.0.iter().map(|(n, t)| (*n, t.detach())).collect())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'static str, &Tensor)> {
        self.0.iter().map(|(n, t)| (*n, t))
    }
}
