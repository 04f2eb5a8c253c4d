//! The momentum (EMA) twin: the same module definitions built on a second, frozen parameter set.
//! `theta_m <- m * theta_m + (1 - m) * theta`, applied every step before the momentum forward.

use super::params::ParamStore;
use candle_core::{Result, Var};

/// Online parameter name prefixes that have a momentum copy (ALBEF: not `temp`, not `itm_head`).
pub const PREFIXES: [&str; 4] = ["visual_encoder.", "text_encoder.", "vision_proj.", "text_proj."];

/// The checkpoint name of a parameter's momentum copy: `visual_encoder.x` -> `visual_encoder_m.x`.
pub fn checkpoint_name(name: &str) -> Option<String> {
    let (head, rest) = name.split_once('.')?;
    PREFIXES.iter().any(|p| p.strip_suffix('.') == Some(head)).then(|| format!("{head}_m.{rest}"))
}

/// The inverse of [`checkpoint_name`].
pub fn online_name(ckpt_name: &str) -> Option<String> {
    let (head, rest) = ckpt_name.split_once('.')?;
    let head = head.strip_suffix("_m")?;
    checkpoint_name(&format!("{head}.{rest}")).map(|_| format!("{head}.{rest}"))
}

pub struct Momentum {
    pub store: ParamStore,
    /// (online, momentum) pairs, sorted by name.
    pairs: Vec<(Var, Var)>,
    pub m: f64,
}

impl Momentum {
    /// A frozen copy of the online parameters under [`PREFIXES`].
    pub fn copy_of(online: &ParamStore, m: f64) -> Result<Self> {
        let store = ParamStore::new_frozen(0, online.device());
        let mut pairs = vec![];
        for (name, var) in online.vars() {
            if checkpoint_name(&name).is_some() {
                store.insert(&name, var.as_tensor())?;
                pairs.push((var, store.var(&name).expect("just inserted")));
            }
        }
        Ok(Momentum { store, pairs, m })
    }

    /// One EMA step over every pair.
    pub fn update(&self) -> Result<()> {
        for (p, pm) in &self.pairs {
            let next = ((pm.as_tensor() * self.m)? + (p.as_tensor().detach() * (1.0 - self.m))?)?;
            pm.set(&next)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(checkpoint_name("visual_encoder.blocks.0.norm1.weight").unwrap(), "visual_encoder_m.blocks.0.norm1.weight");
        assert_eq!(checkpoint_name("text_proj.weight").unwrap(), "text_proj_m.weight");
        assert_eq!(checkpoint_name("itm_head.weight"), None);
        assert_eq!(checkpoint_name("temp"), None);
        assert_eq!(online_name("text_encoder_m.bert.embeddings.word_embeddings.weight").unwrap(),
            "text_encoder.bert.embeddings.word_embeddings.weight");
        assert_eq!(online_name("itm_head_m.weight"), None);
    }
}
