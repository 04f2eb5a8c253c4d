// Inverted dropout y = x * keep(i) / (1 - p) with keep(i) = dropout_keep(seed, i, threshold), one thread per
// element (src/ops/dropout.rs). The backward is the same kernel on the gradient.
#include "common.cuh"

extern "C" __global__ void dropout_f32(const float *x, float *y, long long n, unsigned long long seed,
                                       unsigned int threshold, float scale) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = dropout_keep(seed, (unsigned long long)i, threshold) ? x[i] * scale : 0.0f;
}
