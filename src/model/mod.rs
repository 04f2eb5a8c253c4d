//! The ALBEF model: named parameters with seeded initialisation (`params`), building blocks (`layers`),
//! the ViT (`vit`), the text/fusion BERT with its MLM head (`bert`), the momentum twin and its feature
//! queue (`momentum`), the whole model with its pre-training forward (`albef`), where its graph is cut
//! for the backward (`segments`), and the state file that records which architecture a checkpoint was
//! written for (`state`).

pub mod albef;
pub mod bert;
pub mod layers;
pub mod momentum;
pub mod params;
pub mod segments;
pub mod state;
pub mod vit;
