//! The ALBEF model: named parameters with seeded initialisation (`params`), building blocks (`layers`),
//! the ViT (`vit`), the text/fusion BERT with its MLM head (`bert`), the momentum twin and its feature
//! queue (`momentum`), and the whole model with its pre-training forward (`albef`).

pub mod albef;
pub mod bert;
pub mod layers;
pub mod momentum;
pub mod params;
pub mod vit;
