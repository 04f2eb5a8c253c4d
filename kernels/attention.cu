// The row passes of the fused attention core o = dropout(softmax(q k^T * scale + mask)) v
// (src/ops/attention.rs has the derivation). The products q k^T, p v and the backward's four go to cuBLAS
// (tensor cores in bf16); these kernels are what lies between them, one warp per query row of the scores
// s [bh * lq, lk] (contiguous), so the probabilities never exist outside one layer's call:
// attn_probs_fwd: pz = dropout(softmax(s * scale + mask)) and the row's log-sum-exp lse;
// attn_probs_bwd: from s, lse and dpz = do v^T, the recomputed pz (for dv = pz^T do) and
// ds = scale * p * (z * dpz - D) with D = sum_j pz_j dpz_j (= do . o), for dq = ds k and dk = ds^T q.
//
// The mask of (i0, i1, i2, j) over the rank-4 view [B, H, lq, lk] is mask[i0*ms0 + i1*ms1 + i2*ms2 + j*ms3]
// (mask == nullptr: none). Dropout keeps element (row, j) when dropout_keep(seed, row * lk + j) clears
// `threshold` (p * 2^32; 0 keeps everything) and scales it by inv_keep: the same hash as the CPU path, so
// both draw the same mask. A row whose every logit is -inf gives zeros and lse = -inf.
#include "common.cuh"

struct AttnArgs {
    int bh, lq, lk, dh;
    float scale;
    unsigned long long seed;
    unsigned int threshold;
    float inv_keep;
    int d1, d2;
    long long ms0, ms1, ms2, ms3;
};

// The mask entries of query row `row` (over bh * lq), or nullptr.
template <typename T> __device__ __forceinline__ const T *mask_row(const T *mask, const AttnArgs &a, int row) {
    if (mask == nullptr) return nullptr;
    const int i2 = row % a.d2, i1 = (row / a.d2) % a.d1, i0 = row / a.d2 / a.d1;
    return mask + i0 * a.ms0 + i1 * a.ms1 + i2 * a.ms2;
}

__device__ __forceinline__ int warp_row() { return blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; }

template <typename T> __device__ __forceinline__ float logit(const T *sr, const T *mr, int j, const AttnArgs &a) {
    const float x = to_f32(sr[j]) * a.scale;
    return mr != nullptr ? x + to_f32(mr[j * a.ms3]) : x;
}

// The dropout factor of element (row, j): 0 or inv_keep.
__device__ __forceinline__ float keep(const AttnArgs &a, int row, int j) {
    return dropout_keep(a.seed, (unsigned long long)row * a.lk + j, a.threshold) ? a.inv_keep : 0.0f;
}

template <typename T>
__device__ __forceinline__ void attn_probs_fwd(const T *s, const T *mask, T *pz, float *lse, AttnArgs a) {
    const int row = warp_row(), lane = threadIdx.x % 32;
    if (row >= a.bh * a.lq) return;
    const T *sr = s + (size_t)row * a.lk, *mr = mask_row(mask, a, row);
    T *out = pz + (size_t)row * a.lk;
    float mx = -INFINITY;
    for (int j = lane; j < a.lk; j += 32) mx = fmaxf(mx, logit(sr, mr, j, a));
    mx = warp_max(mx);
    float sum = 0.0f;
    if (mx != -INFINITY)
        for (int j = lane; j < a.lk; j += 32) sum += expf(logit(sr, mr, j, a) - mx);
    sum = warp_sum(sum);
    const float l = mx == -INFINITY ? -INFINITY : mx + logf(sum);  // a NaN logit stays NaN, as on the CPU
    for (int j = lane; j < a.lk; j += 32)
        out[j] = from_f32<T>(l == -INFINITY ? 0.0f : expf(logit(sr, mr, j, a) - l) * keep(a, row, j));
    if (lane == 0) lse[row] = l;
}

template <typename T>
__device__ __forceinline__ void attn_probs_bwd(const T *s, const T *mask, const float *lse, const T *dpz, T *pz,
                                               T *ds, AttnArgs a) {
    const int row = warp_row(), lane = threadIdx.x % 32;
    if (row >= a.bh * a.lq) return;
    const size_t at = (size_t)row * a.lk;
    const T *sr = s + at, *gr = dpz + at, *mr = mask_row(mask, a, row);
    const float l = lse[row];
    auto prob = [&](int j) { return l == -INFINITY ? 0.0f : expf(logit(sr, mr, j, a) - l); };
    float d = 0.0f;
    for (int j = lane; j < a.lk; j += 32) d += prob(j) * keep(a, row, j) * to_f32(gr[j]);
    d = warp_sum(d);
    for (int j = lane; j < a.lk; j += 32) {
        const float p = prob(j), z = keep(a, row, j);
        pz[at + j] = from_f32<T>(p * z);
        ds[at + j] = from_f32<T>(a.scale * p * (z * to_f32(gr[j]) - d));
    }
}

#define ATTENTION(NAME, T)                                                                                    \
    extern "C" __global__ void attn_probs_fwd_##NAME(const T *s, const T *mask, T *pz, float *lse,           \
                                                     AttnArgs a) {                                           \
        attn_probs_fwd<T>(s, mask, pz, lse, a);                                                              \
    }                                                                                                        \
    extern "C" __global__ void attn_probs_bwd_##NAME(const T *s, const T *mask, const float *lse,            \
                                                     const T *dpz, T *pz, T *ds, AttnArgs a) {               \
        attn_probs_bwd<T>(s, mask, lse, dpz, pz, ds, a);                                                     \
    }

ATTENTION(f32, float)
ATTENTION(bf16, __nv_bfloat16)
