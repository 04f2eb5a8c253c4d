// Fused exact GELU y = x / 2 * (1 + erf(x / sqrt 2)) and its backward dx = g * (Phi(x) + x * phi(x)), one
// thread per element (formulas in src/ops/gelu.rs), on f32 or bf16 storage with f32 arithmetic.
#include "common.cuh"

template <typename T> __device__ __forceinline__ void gelu_fwd(const T *x, T *y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = to_f32(x[i]);
    y[i] = from_f32<T>(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)));
}

template <typename T> __device__ __forceinline__ void gelu_bwd(const T *x, const T *g, T *dx, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = to_f32(x[i]);
    const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    dx[i] = from_f32<T>(to_f32(g[i]) * (cdf + v * 0.39894228040143268f * expf(-0.5f * v * v)));
}

#define GELU(NAME, T)                                                                                        \
    extern "C" __global__ void gelu_fwd_##NAME(const T *x, T *y, int n) { gelu_fwd<T>(x, y, n); }            \
    extern "C" __global__ void gelu_bwd_##NAME(const T *x, const T *g, T *dx, int n) { gelu_bwd<T>(x, g, dx, n); }

GELU(f32, float)
GELU(bf16, __nv_bfloat16)
