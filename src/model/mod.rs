//! Encoders and the ALBEF model: parameters (`params`), building blocks (`layers`), the ViT (`vit`),
//! the text/fusion BERT with its MLM head (`bert`).

pub mod bert;
pub mod layers;
pub mod params;
pub mod vit;
pub mod albef;
pub mod momentum;
pub mod queue;
