//! The pre-training objectives, as functions of plain tensors: `itc` (contrastive with momentum soft
//! targets over the queues), `itm` (matching with hard negatives), `mlm` (masked LM with distillation).

pub mod itc;
pub mod itm;
pub mod mlm;
