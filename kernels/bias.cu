// Fused bias add y = x + b over contiguous rows of `cols` elements, and the column sums of its backward
// (db = sum of the gradient's rows) in two deterministic stages: partial sums over chunks of
// ROWS_PER_CHUNK rows, then the chunks in order, so a run repeats bit for bit on the same GPU. x, y and
// the gradient are f32 or bf16 (a bf16 linear layer's product); the bias and its gradient stay f32 (the
// master weights), and the sums run in f32.
#include "common.cuh"

#define ROWS_PER_CHUNK 128

template <typename T> __device__ __forceinline__ void add_bias(const T *x, const float *b, T *y, int n, int cols) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = from_f32<T>(to_f32(x[i]) + b[i % cols]);
}

// partial[chunk * cols + j] = sum over the chunk's rows of g[r, j].
template <typename T>
__device__ __forceinline__ void column_sum_partial(const T *g, float *partial, int rows, int cols) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y;
    if (j >= cols) return;
    const int end = min(rows, (chunk + 1) * ROWS_PER_CHUNK);
    float s = 0.0f;
    for (int r = chunk * ROWS_PER_CHUNK; r < end; ++r) s += to_f32(g[(size_t)r * cols + j]);
    partial[(size_t)chunk * cols + j] = s;
}

#define BIAS(NAME, T)                                                                                        \
    extern "C" __global__ void add_bias_##NAME(const T *x, const float *b, T *y, int n, int cols) {         \
        add_bias<T>(x, b, y, n, cols);                                                                       \
    }                                                                                                        \
    extern "C" __global__ void column_sum_partial_##NAME(const T *g, float *partial, int rows, int cols) {  \
        column_sum_partial<T>(g, partial, rows, cols);                                                       \
    }

BIAS(f32, float)
BIAS(bf16, __nv_bfloat16)

extern "C" __global__ void column_sum_final_f32(const float *partial, float *out, int chunks, int cols) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float s = 0.0f;
    for (int c = 0; c < chunks; ++c) s += partial[(size_t)c * cols + j];
    out[j] = s;
}
