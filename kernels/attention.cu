// Fused attention core o = dropout(softmax(q k^T * scale + mask)) v without materialising the scores
// (src/ops/attention.rs has the derivation). q, o, do: [bh, lq, dh]; k, v, dk, dv: [bh, lk, dh], all
// contiguous; lse, dsum: [bh, lq] f32. One warp per query row (forward, dq) or key row (dk, dv): each lane
// holds dh / 32 of the row's features in registers, dot products are warp sums, and the forward keeps an
// online softmax (running max and sum) so a row is read once.
//
// The mask of (i0, i1, i2, j) over the rank-4 view [B, H, lq, lk] is mask[i0*ms0 + i1*ms1 + i2*ms2 + j*ms3]
// (mask == nullptr: none). Dropout keeps element (row, j) when dropout_keep(seed, row * lk + j) clears
// `threshold` (p * 2^32; 0 keeps everything) and scales it by inv_keep: the same hash as the CPU path, so
// both draw the same mask. A row whose every logit is -inf gives zeros and lse = -inf.
#include "common.cuh"

#define ATTN_MAX_DH 256
#define ATTN_REGS (ATTN_MAX_DH / 32)

__device__ __forceinline__ bool dropout_keep(unsigned long long seed, unsigned long long index,
                                             unsigned int threshold) {
    unsigned long long z = seed + (index + 1ull) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (unsigned int)(z >> 32) >= threshold;
}

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

template <typename T> __device__ __forceinline__ void load_row(const T *src, int dh, float (&dst)[ATTN_REGS]) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int t = 0; t < ATTN_REGS; t++) {
        const int d = lane + 32 * t;
        dst[t] = d < dh ? to_f32(src[d]) : 0.0f;
    }
}

template <typename T> __device__ __forceinline__ void store_row(T *dst, int dh, const float (&src)[ATTN_REGS], float s) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int t = 0; t < ATTN_REGS; t++) {
        const int d = lane + 32 * t;
        if (d < dh) dst[d] = from_f32<T>(src[t] * s);
    }
}

// Warp-wide dot product of a register row with a row in memory.
template <typename T> __device__ __forceinline__ float dot_row(const float (&x)[ATTN_REGS], const T *y, int dh) {
    const int lane = threadIdx.x % 32;
    float s = 0.0f;
#pragma unroll
    for (int t = 0; t < ATTN_REGS; t++) {
        const int d = lane + 32 * t;
        if (d < dh) s += x[t] * to_f32(y[d]);
    }
    return warp_sum(s);
}

// acc += c * y for a row y in memory.
template <typename T> __device__ __forceinline__ void axpy_row(float (&acc)[ATTN_REGS], float c, const T *y, int dh) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int t = 0; t < ATTN_REGS; t++) {
        const int d = lane + 32 * t;
        if (d < dh) acc[t] += c * to_f32(y[d]);
    }
}

__device__ __forceinline__ int warp_row() { return blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; }

template <typename T>
__device__ __forceinline__ void attn_fwd(const T *q, const T *k, const T *v, const T *mask, T *o, float *lse,
                                         AttnArgs a) {
    const int row = warp_row();
    if (row >= a.bh * a.lq) return;
    const int h = row / a.lq;
    const T *kh = k + (size_t)h * a.lk * a.dh, *vh = v + (size_t)h * a.lk * a.dh;
    const T *mr = mask_row(mask, a, row);
    float qv[ATTN_REGS], acc[ATTN_REGS];
    load_row(q + (size_t)row * a.dh, a.dh, qv);
#pragma unroll
    for (int t = 0; t < ATTN_REGS; t++) acc[t] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int j = 0; j < a.lk; j++) {
        float s = dot_row(qv, kh + (size_t)j * a.dh, a.dh) * a.scale;
        if (mr != nullptr) s += to_f32(mr[j * a.ms3]);
        if (s == -INFINITY) continue;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new), e = expf(s - m_new);
        l = l * corr + e;
        const float ez = dropout_keep(a.seed, (unsigned long long)row * a.lk + j, a.threshold) ? e * a.inv_keep : 0.0f;
#pragma unroll
        for (int t = 0; t < ATTN_REGS; t++) acc[t] *= corr;
        axpy_row(acc, ez, vh + (size_t)j * a.dh, a.dh);
        m = m_new;
    }
    store_row(o + (size_t)row * a.dh, a.dh, acc, l > 0.0f ? 1.0f / l : 0.0f);
    if (threadIdx.x % 32 == 0) lse[row] = l > 0.0f ? m + logf(l) : -INFINITY;
}

// dq and D_i = do_i . o_i (stored in dsum for attn_bwd_dkv).
template <typename T>
__device__ __forceinline__ void attn_bwd_dq(const T *q, const T *k, const T *v, const T *mask, const T *o,
                                            const T *go, const float *lse, T *dq, float *dsum, AttnArgs a) {
    const int row = warp_row();
    if (row >= a.bh * a.lq) return;
    const int h = row / a.lq;
    const T *kh = k + (size_t)h * a.lk * a.dh, *vh = v + (size_t)h * a.lk * a.dh;
    const T *mr = mask_row(mask, a, row);
    float gv[ATTN_REGS], qv[ATTN_REGS], acc[ATTN_REGS];
    load_row(go + (size_t)row * a.dh, a.dh, gv);
    load_row(q + (size_t)row * a.dh, a.dh, qv);
#pragma unroll
    for (int t = 0; t < ATTN_REGS; t++) acc[t] = 0.0f;
    const float d = dot_row(gv, o + (size_t)row * a.dh, a.dh);
    const float l = lse[row];
    if (l != -INFINITY) {
        for (int j = 0; j < a.lk; j++) {
            float s = dot_row(qv, kh + (size_t)j * a.dh, a.dh) * a.scale;
            if (mr != nullptr) s += to_f32(mr[j * a.ms3]);
            const float p = expf(s - l);
            const float z = dropout_keep(a.seed, (unsigned long long)row * a.lk + j, a.threshold) ? a.inv_keep : 0.0f;
            const float ds = p * (z * dot_row(gv, vh + (size_t)j * a.dh, a.dh) - d);
            axpy_row(acc, ds, kh + (size_t)j * a.dh, a.dh);
        }
    }
    store_row(dq + (size_t)row * a.dh, a.dh, acc, a.scale);
    if (threadIdx.x % 32 == 0) dsum[row] = d;
}

template <typename T>
__device__ __forceinline__ void attn_bwd_dkv(const T *q, const T *k, const T *v, const T *mask, const T *go,
                                             const float *lse, const float *dsum, T *dk, T *dv, AttnArgs a) {
    const int row = warp_row();  // a key row, over bh * lk
    if (row >= a.bh * a.lk) return;
    const int h = row / a.lk, j = row % a.lk;
    float kv[ATTN_REGS], vv[ATTN_REGS], ak[ATTN_REGS], av[ATTN_REGS];
    load_row(k + (size_t)row * a.dh, a.dh, kv);
    load_row(v + (size_t)row * a.dh, a.dh, vv);
#pragma unroll
    for (int t = 0; t < ATTN_REGS; t++) ak[t] = av[t] = 0.0f;
    for (int i = 0; i < a.lq; i++) {
        const int qrow = h * a.lq + i;
        const float l = lse[qrow];
        if (l == -INFINITY) continue;
        const T *qi = q + (size_t)qrow * a.dh, *gi = go + (size_t)qrow * a.dh;
        const T *mr = mask_row(mask, a, qrow);
        float s = dot_row(kv, qi, a.dh) * a.scale;
        if (mr != nullptr) s += to_f32(mr[j * a.ms3]);
        const float p = expf(s - l);
        const float z = dropout_keep(a.seed, (unsigned long long)qrow * a.lk + j, a.threshold) ? a.inv_keep : 0.0f;
        axpy_row(av, p * z, gi, a.dh);
        const float ds = p * (z * dot_row(vv, gi, a.dh) - dsum[qrow]);
        axpy_row(ak, ds, qi, a.dh);
    }
    store_row(dk + (size_t)row * a.dh, a.dh, ak, a.scale);
    store_row(dv + (size_t)row * a.dh, a.dh, av, 1.0f);
}

#define ATTENTION(NAME, T)                                                                                    \
    extern "C" __global__ void attn_fwd_##NAME(const T *q, const T *k, const T *v, const T *mask, T *o,      \
                                               float *lse, AttnArgs a) {                                     \
        attn_fwd<T>(q, k, v, mask, o, lse, a);                                                               \
    }                                                                                                        \
    extern "C" __global__ void attn_bwd_dq_##NAME(const T *q, const T *k, const T *v, const T *mask,         \
                                                  const T *o, const T *go, const float *lse, T *dq,          \
                                                  float *dsum, AttnArgs a) {                                 \
        attn_bwd_dq<T>(q, k, v, mask, o, go, lse, dq, dsum, a);                                              \
    }                                                                                                        \
    extern "C" __global__ void attn_bwd_dkv_##NAME(const T *q, const T *k, const T *v, const T *mask,        \
                                                   const T *go, const float *lse, const float *dsum, T *dk, \
                                                   T *dv, AttnArgs a) {                                      \
        attn_bwd_dkv<T>(q, k, v, mask, go, lse, dsum, dk, dv, a);                                            \
    }

ATTENTION(f32, float)
ATTENTION(bf16, __nv_bfloat16)
