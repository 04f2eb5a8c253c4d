//! Momentum contrast's two halves (MoCo, which ALBEF builds on): the momentum (EMA) twin, the same module
//! definitions built on a second, frozen parameter set (`theta_m <- m * theta_m + (1 - m) * theta`,
//! applied before the momentum forward), and the feature queue that keeps the twin's features of earlier
//! batches as extra ITC keys.

use super::params::ParamStore;
use crate::objectives::itc::Queued;
use candle_core::{Device, Result, Tensor, Var};
use rand_distr::{Distribution, StandardNormal};

/// Online parameter name prefixes that have a momentum copy (ALBEF: not `temp`, not `itm_head`).
pub const PREFIXES: [&str; 4] = ["visual_encoder.", "text_encoder.", "vision_proj.", "text_proj."];

/// The checkpoint name of a parameter's momentum copy: `visual_encoder.x` -> `visual_encoder_m.x`.
pub fn checkpoint_name(name: &str) -> Option<String> {
    let (head, rest) = name.split_once('.')?;
    PREFIXES.iter().any(|p| p.strip_suffix('.') == Some(head)).then(|| format!("{head}_m.{rest}"))
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
        crate::ops::ema_all(&self.pairs, self.m)
    }
}

/// The ITC feature queues: `image_queue`, `text_queue` [embed_dim, Q] of momentum features from earlier
/// batches, an `idx_queue` of their image ids, and the write pointer. Any batch size works: writes wrap
/// around the end (the reference asserts Q % B == 0, BLIP #101).
pub struct FeatureQueue {
    pub image_queue: Tensor,
    pub text_queue: Tensor,
    /// Image ids of the queued features; -100 marks a slot never written (as ALBEF's retrieval model).
    pub idx_queue: Vec<i64>,
    pub ptr: usize,
}

impl FeatureQueue {
    /// randn columns, L2-normalised per column, from the seeded stream.
    pub fn new(embed_dim: usize, size: usize, seed: u64, device: &Device) -> Result<Self> {
        let make = |key: &str| -> Result<Tensor> {
            let mut rng = crate::rng::stream(seed, "queue", key, 0);
            let v: Vec<f32> = (0..embed_dim * size).map(|_| StandardNormal.sample(&mut rng)).collect();
            let q = Tensor::from_vec(v, (embed_dim, size), device)?;
            q.broadcast_div(&q.sqr()?.sum_keepdim(0)?.sqrt()?)
        };
        Ok(FeatureQueue { image_queue: make("image")?, text_queue: make("text")?, idx_queue: vec![-100; size], ptr: 0 })
    }

    pub fn size(&self) -> usize {
        self.idx_queue.len()
    }

    /// The queued features as ITC's extra keys.
    pub fn keys(&self) -> Queued<'_> {
        Queued { image: &self.image_queue, text: &self.text_queue, ids: &self.idx_queue }
    }

    /// Writes the batch's momentum features [B, D] (and image ids) into columns [ptr, ptr + B) mod Q.
    /// A batch larger than the queue keeps its last Q rows.
    pub fn enqueue(&mut self, image_feat_m: &Tensor, text_feat_m: &Tensor, ids: &[i64]) -> Result<()> {
        let q = self.size();
        let b = image_feat_m.dim(0)?;
        let skip = b.saturating_sub(q);
        let (img, txt) = (image_feat_m.narrow(0, skip, b - skip)?, text_feat_m.narrow(0, skip, b - skip)?);
        let ids = &ids[skip..];
        let n = b - skip;
        let mut start = 0;
        while start < n {
            let len = (q - self.ptr).min(n - start);
            let cols = self.ptr..self.ptr + len;
            let d = self.image_queue.dim(0)?;
            self.image_queue =
                self.image_queue.slice_assign(&[0..d, cols.clone()], &img.narrow(0, start, len)?.t()?)?;
            self.text_queue = self.text_queue.slice_assign(&[0..d, cols.clone()], &txt.narrow(0, start, len)?.t()?)?;
            self.idx_queue[cols].copy_from_slice(&ids[start..start + len]);
            self.ptr = (self.ptr + len) % q;
            start += len;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        assert_eq!(
            checkpoint_name("visual_encoder.blocks.0.norm1.weight").unwrap(),
            "visual_encoder_m.blocks.0.norm1.weight"
        );
        assert_eq!(checkpoint_name("text_proj.weight").unwrap(), "text_proj_m.weight");
        assert_eq!(checkpoint_name("itm_head.weight"), None);
        assert_eq!(checkpoint_name("temp"), None);
    }

    #[test]
    fn enqueue_wraps_for_any_batch_size() -> Result<()> {
        let dev = Device::Cpu;
        let mut q = FeatureQueue::new(2, 5, 0, &dev)?;
        let norms: Vec<f32> = q.image_queue.sqr()?.sum(0)?.to_vec1()?;
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));
        q.ptr = 3;
        let feats = Tensor::new(&[[1f32, 10.], [2., 20.], [3., 30.]], &dev)?;
        q.enqueue(&feats, &(&feats * 2.0)?, &[7, 8, 9])?;
        assert_eq!(q.ptr, 1);
        assert_eq!(q.idx_queue, vec![9, -100, -100, 7, 8]);
        let cols: Vec<Vec<f32>> = q.image_queue.to_vec2()?;
        assert_eq!((cols[0][3], cols[0][4], cols[0][0]), (1., 2., 3.));
        assert_eq!((cols[1][3], cols[1][4], cols[1][0]), (10., 20., 30.));
        let t: Vec<Vec<f32>> = q.text_queue.to_vec2()?;
        assert_eq!(t[1][0], 60.);
        // A batch longer than the queue keeps its newest rows.
        let big = Tensor::arange(0f32, 14., &dev)?.reshape((7, 2))?;
        q.enqueue(&big, &big, &[0, 1, 2, 3, 4, 5, 6])?;
        assert_eq!(q.idx_queue, vec![6, 2, 3, 4, 5]);
        assert_eq!(q.ptr, 1);
        Ok(())
    }
}
