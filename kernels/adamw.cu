// AdamW's update in place (formulas in src/ops/adamw.rs), one thread per element.
#include "common.cuh"

// x = beta x + (1 - beta) (scale g), or with (scale g)^2 when square != 0.
extern "C" __global__ void adamw_moment_f32(float *x, const float *g, int n, float beta, float scale, int square) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const float sg = scale * g[i];
    x[i] = beta * x[i] + (1.0f - beta) * (square ? sg * sg : sg);
}

// p = p * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps).
extern "C" __global__ void adamw_update_f32(float *p, const float *m, const float *v, int n, float decay, float lr,
                                            float bc1, float bc2, float eps) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    p[i] = p[i] * decay - lr * ((m[i] / bc1) / (sqrtf(v[i] / bc2) + eps));
}
