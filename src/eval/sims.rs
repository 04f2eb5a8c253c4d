//! Steps 2-3 of the retrieval protocol without re-ranking: `sims = query_feat @ key_feat^T` (cosine, no
//! temperature), streamed a block of query rows at a time so that memory stays bounded (COCO 5K t2i
//! would be a 25010 x 5000 matrix), each row reduced at once to the ITC standing of its ground truth
//! and its top-k candidates.

use super::metrics::{standing, Standing};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;

/// Similarity values held at once per block of query rows (64 MiB of f32).
const BLOCK_ELEMS: usize = 1 << 24;

/// The k best candidates of every query, row-major: query q's are `idx[q*k..(q+1)*k]` with their
/// cosine similarities in `sim`, best first; ties follow a fixed pseudo-random order (see `top_k`).
#[derive(Debug, Clone, PartialEq)]
pub struct TopK {
    pub k: usize,
    pub idx: Vec<u32>,
    pub sim: Vec<f32>,
}

impl TopK {
    pub fn queries(&self) -> usize {
        self.idx.len() / self.k.max(1)
    }
}

/// One retrieval direction ranked by ITC alone.
#[derive(Debug, Clone, PartialEq)]
pub struct ItcPass {
    /// Where each query's best correct candidate stands in its row of sims.
    pub standings: Vec<Standing>,
    /// The candidates re-ranking will score.
    pub topk: TopK,
}

/// Ranks `key_feat` [N_keys, D] for every row of `query_feat` [N_queries, D] by cosine similarity;
/// `correct[q]` are the correct keys of query q; keeps the top `min(k, N_keys)` keys per query.
pub fn itc_pass(query_feat: &Tensor, key_feat: &Tensor, correct: &[Vec<usize>], k: usize) -> Result<ItcPass> {
    let (n_queries, n_keys) = (query_feat.dim(0)?, key_feat.dim(0)?);
    if correct.len() != n_queries {
        bail!("{n_queries} queries but ground truth for {}", correct.len());
    }
    let k = k.min(n_keys);
    let block = (BLOCK_ELEMS / n_keys.max(1)).max(1);
    let keys_t = key_feat.t()?;
    let (mut standings, mut idx, mut sim) = (Vec::with_capacity(n_queries), vec![], vec![]);
    for start in (0..n_queries).step_by(block) {
        let rows = block.min(n_queries - start);
        let sims = query_feat
            .narrow(0, start, rows)?
            .matmul(&keys_t)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if let Some(q) = sims.chunks(n_keys).position(|row| row.iter().any(|s| s.is_nan())) {
            bail!("the ITC similarities of query {} contain NaN: the model's features are broken", start + q);
        }
        let reduced: Vec<(Standing, Vec<(u32, f32)>)> = sims
            .par_chunks(n_keys)
            .zip(&correct[start..start + rows])
            .enumerate()
            .map(|(i, (row, correct))| (standing(row, correct), top_k(row, k, start + i)))
            .collect();
        for (at, best) in reduced {
            standings.push(at);
            idx.extend(best.iter().map(|&(i, _)| i));
            sim.extend(best.iter().map(|&(_, s)| s));
        }
    }
    Ok(ItcPass { standings, topk: TopK { k, idx, sim } })
}

/// The k highest scores of query `q`'s row as (index, score), best first. Equal scores are ordered by a
/// fixed pseudo-random permutation of the candidates (a function of q and the index), so which tied
/// candidates enter the re-rank favours no position, in particular not the ground truth's.
fn top_k(row: &[f32], k: usize, q: usize) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = row.iter().enumerate().map(|(i, &s)| (i as u32, s)).collect();
    let shuffle = |i: u32| crate::rng::splitmix(((q as u64) << 32) ^ i as u64);
    let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(shuffle(a.0).cmp(&shuffle(b.0)));
    if k < all.len() && k > 0 {
        all.select_nth_unstable_by(k - 1, order);
    }
    all.truncate(k);
    all.sort_unstable_by(order);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn top_k_orders_and_breaks_ties_without_favouring_an_index() {
        let best = top_k(&[0.1, 0.9, 0.5, 0.9, 0.2], 3, 0);
        assert_eq!(best[2], (2, 0.5));
        assert!(best[..2].contains(&(1, 0.9)) && best[..2].contains(&(3, 0.9)));
        let mut first = [0usize; 2];
        for q in 0..400 {
            let t = top_k(&[0.3, 0.3], 5, q);
            assert_eq!(t.len(), 2);
            first[t[0].0 as usize] += 1;
        }
        assert!(first[0] > 150 && first[1] > 150, "ties split across queries: {first:?}");
        assert!(top_k(&[0.3], 0, 0).is_empty());
    }

    #[test]
    fn ranks_and_top_k_of_each_row() {
        let q = Tensor::new(&[[1f32, 0.], [0., 1.], [0.6, 0.8]], &Device::Cpu).unwrap();
        let keys = Tensor::new(&[[0.8f32, 0.6], [0., 1.], [1., 0.], [-1., 0.]], &Device::Cpu).unwrap();
        let correct = vec![vec![2], vec![0], vec![3]];
        let pass = itc_pass(&q, &keys, &correct, 2).unwrap();
        assert_eq!(pass.standings.iter().map(|s| s.above).collect::<Vec<_>>(), [0, 1, 3]);
        assert_eq!(pass.topk.idx, [2, 0, 1, 0, 0, 1]);
        assert_eq!(pass.topk.queries(), 3);
        let sims = q.matmul(&keys.t().unwrap()).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(pass.topk.sim[1], sims[0][0]);
    }
}
