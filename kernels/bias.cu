// Fused bias add y = x + b over contiguous rows of `cols` floats, and the column sums of its backward
// (db = sum of the gradient's rows) in two deterministic stages: partial sums over chunks of
// ROWS_PER_CHUNK rows, then the chunks in order, so a run repeats bit for bit on the same GPU.
#include "common.cuh"

#define ROWS_PER_CHUNK 128

extern "C" __global__ void add_bias_f32(const float *x, const float *b, float *y, int n, int cols) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i] + b[i % cols];
}

// partial[chunk * cols + j] = sum over the chunk's rows of g[r, j].
extern "C" __global__ void column_sum_partial_f32(const float *g, float *partial, int rows, int cols) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y;
    if (j >= cols) return;
    const int end = min(rows, (chunk + 1) * ROWS_PER_CHUNK);
    float s = 0.0f;
    for (int r = chunk * ROWS_PER_CHUNK; r < end; ++r) s += g[(size_t)r * cols + j];
    partial[(size_t)chunk * cols + j] = s;
}

extern "C" __global__ void column_sum_final_f32(const float *partial, float *out, int chunks, int cols) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[(size_t)c * cols + j];
    out[j] = s;
}
