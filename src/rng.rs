//! Seeded random streams. candle's CPU RNG cannot be seeded, so every draw (initialisation, data order,
//! augmentation, masking, negatives, dropout) comes from a ChaCha stream named by what it is for; a
//! stream depends only on (seed, purpose, key, index), never on thread timing or call order elsewhere.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The stream for `purpose` (e.g. "init", "dropout"), `key` (e.g. a parameter name) and `index`
/// (e.g. a step or sample number).
pub fn stream(seed: u64, purpose: &str, key: &str, index: u64) -> ChaCha8Rng {
    let mut h = splitmix(seed ^ 0x9e37_79b9_7f4a_7c15);
    for b in purpose.bytes().chain([0xff]).chain(key.bytes()) {
        h = splitmix(h ^ b as u64);
    }
    ChaCha8Rng::seed_from_u64(splitmix(h ^ index))
}

/// SplitMix64's finaliser: a well-mixed 64-bit hash of `z`.
pub fn splitmix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
