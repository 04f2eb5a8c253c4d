// Fused exact GELU y = x / 2 * (1 + erf(x / sqrt 2)) and its backward dx = g * (Phi(x) + x * phi(x)), one
// thread per element (formulas in src/ops/gelu.rs).
#include "common.cuh"

extern "C" __global__ void gelu_fwd_f32(const float *x, float *y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = 0.5f * x[i] * (1.0f + erff(x[i] * 0.70710678118654752f));
}

extern "C" __global__ void gelu_bwd_f32(const float *x, const float *g, float *dx, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float v = x[i];
    const float cdf = 0.5f * (1.0f + erff(v * 0.70710678118654752f));
    dx[i] = g[i] * (cdf + v * 0.39894228040143268f * expf(-0.5f * v * v));
}
