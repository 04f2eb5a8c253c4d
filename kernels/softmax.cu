// Fused attention softmax: y = softmax(x * scale + mask) over the last dimension, and its backward
// dx = scale * y * (g - sum(g * y)). One warp per row (attention rows are at most a few hundred long),
// f32 arithmetic for f32 and bf16 storage.
//
// x, y, g, dx are contiguous [rows, cols]. The rows enumerate a rank-4 view [d0, d1, d2, cols] of the
// scores; the additive mask of (i0, i1, i2, j) is mask[i0*ms0 + i1*ms1 + i2*ms2 + j*ms3] (a broadcast
// dimension has stride 0, so a [B, 1, 1, Lk] padding mask is read in place). mask == nullptr: no mask.
// A row whose every logit is -inf (fully masked with -inf) comes out as zeros rather than NaN.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void attn_softmax_fwd(const T *x, const T *mask, T *y, int rows, int cols,
                                                 float scale, int d1, int d2, long long ms0, long long ms1,
                                                 long long ms2, long long ms3) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T *xr = x + (size_t)row * cols;
    T *yr = y + (size_t)row * cols;
    const T *mr = nullptr;
    if (mask != nullptr) {
        const int i2 = row % d2, i1 = (row / d2) % d1, i0 = row / d2 / d1;
        mr = mask + i0 * ms0 + i1 * ms1 + i2 * ms2;
    }
    auto logit = [&](int j) {
        float v = to_f32(xr[j]) * scale;
        return mr != nullptr ? v + to_f32(mr[j * ms3]) : v;
    };
    float mx = -INFINITY;
    for (int j = lane; j < cols; j += 32) mx = fmaxf(mx, logit(j));
    mx = warp_max(mx);
    if (mx == -INFINITY) {
        for (int j = lane; j < cols; j += 32) yr[j] = from_f32<T>(0.0f);
        return;
    }
    float sum = 0.0f;
    for (int j = lane; j < cols; j += 32) sum += expf(logit(j) - mx);
    const float inv = 1.0f / warp_sum(sum);
    for (int j = lane; j < cols; j += 32) yr[j] = from_f32<T>(expf(logit(j) - mx) * inv);
}

template <typename T>
__device__ __forceinline__ void attn_softmax_bwd(const T *y, const T *g, T *dx, int rows, int cols, float scale) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const T *yr = y + (size_t)row * cols;
    const T *gr = g + (size_t)row * cols;
    T *dr = dx + (size_t)row * cols;
    float dot = 0.0f;
    for (int j = lane; j < cols; j += 32) dot += to_f32(yr[j]) * to_f32(gr[j]);
    dot = warp_sum(dot);
    for (int j = lane; j < cols; j += 32) dr[j] = from_f32<T>(scale * to_f32(yr[j]) * (to_f32(gr[j]) - dot));
}

#define ATTN_SOFTMAX(NAME, T)                                                                                \
    extern "C" __global__ void attn_softmax_fwd_##NAME(const T *x, const T *mask, T *y, int rows, int cols,  \
                                                      float scale, int d1, int d2, long long ms0,           \
                                                      long long ms1, long long ms2, long long ms3) {        \
        attn_softmax_fwd<T>(x, mask, y, rows, cols, scale, d1, d2, ms0, ms1, ms2, ms3);                      \
    }                                                                                                        \
    extern "C" __global__ void attn_softmax_bwd_##NAME(const T *y, const T *g, T *dx, int rows, int cols,   \
                                                      float scale) {                                        \
        attn_softmax_bwd<T>(y, g, dx, rows, cols, scale);                                                    \
    }

ATTN_SOFTMAX(f32, float)
ATTN_SOFTMAX(bf16, __nv_bfloat16)
