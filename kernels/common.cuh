// Helpers shared by the alignfuse kernels: dtype conversion (all arithmetic is f32) and warp / block
// reductions, including the online (running max, running sum of exp) softmax state.
#pragma once
#include <cuda_bf16.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Softmax normaliser of a stream of logits: m = max so far, d = sum of exp(x - m). Merging is exact up to
// rounding, so the row can be split over threads in any order.
struct MaxSum {
    float m;
    float d;
};

__device__ __forceinline__ MaxSum max_sum_empty() { return {-INFINITY, 0.0f}; }

__device__ __forceinline__ void max_sum_push(MaxSum &s, float x) {
    if (x > s.m) {
        s.d = s.d * expf(s.m - x) + 1.0f;
        s.m = x;
    } else if (x != -INFINITY) {  // NaN lands here and poisons d, as it poisons the reference sum
        s.d += expf(x - s.m);
    }
}

__device__ __forceinline__ MaxSum max_sum_merge(MaxSum a, MaxSum b) {
    float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return max_sum_empty();
    return {m, a.d * expf(a.m - m) + b.d * expf(b.m - m)};
}

__device__ __forceinline__ MaxSum warp_max_sum(MaxSum s) {
    for (int o = 16; o > 0; o >>= 1) {
        MaxSum other = {__shfl_xor_sync(0xffffffffu, s.m, o), __shfl_xor_sync(0xffffffffu, s.d, o)};
        s = max_sum_merge(s, other);
    }
    return s;
}

// Block-wide reductions for blockDim.x a multiple of 32 (at most 1024); every thread gets the result.
// `scratch` holds at least 32 entries and may be reused after the call returns.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ MaxSum block_max_sum(MaxSum s, float *scratch_m, float *scratch_d) {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
    s = warp_max_sum(s);
    __syncthreads();
    if (lane == 0) {
        scratch_m[warp] = s.m;
        scratch_d[warp] = s.d;
    }
    __syncthreads();
    s = lane < warps ? MaxSum{scratch_m[lane], scratch_d[lane]} : max_sum_empty();
    return warp_max_sum(s);
}

// Whether element `index` of a dropout mask survives: the top 32 bits of splitmix64's output for
// seed + index against threshold = p * 2^32 (the CPU's cpu::dropout_keep, so both draw the same mask).
__device__ __forceinline__ bool dropout_keep(unsigned long long seed, unsigned long long index,
                                             unsigned int threshold) {
    unsigned long long z = seed + (index + 1ull) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (unsigned int)(z >> 32) >= threshold;
}
