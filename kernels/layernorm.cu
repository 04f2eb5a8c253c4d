// Fused LayerNorm over contiguous rows of `cols` floats and its backward (formulas in
// src/ops/layernorm.rs). One warp per row for the forward and for dx (which also stores each row's mean and
// rstd); dw and db are column sums over the rows, in two deterministic stages (partial sums over chunks of
// ROWS_PER_CHUNK rows, then the chunks in order), so a run repeats bit for bit on the same GPU.
#include "common.cuh"

#define ROWS_PER_CHUNK 128

__device__ __forceinline__ void row_stats(const float *xr, int cols, float eps, int lane, float &mean, float &rstd) {
    float s = 0.0f;
    for (int j = lane; j < cols; j += 32) s += xr[j];
    mean = warp_sum(s) / cols;
    float v = 0.0f;
    for (int j = lane; j < cols; j += 32) {
        const float c = xr[j] - mean;
        v += c * c;
    }
    rstd = rsqrtf(warp_sum(v) / cols + eps);
}

extern "C" __global__ void layer_norm_fwd_f32(const float *x, const float *w, const float *b, float *y, int rows,
                                              int cols, float eps) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float *xr = x + (size_t)row * cols;
    float *yr = y + (size_t)row * cols;
    float mean, rstd;
    row_stats(xr, cols, eps, lane, mean, rstd);
    for (int j = lane; j < cols; j += 32) yr[j] = (xr[j] - mean) * rstd * w[j] + b[j];
}

// dx into dx[0 .. rows*cols); stats[2*row] = mean, stats[2*row + 1] = rstd.
extern "C" __global__ void layer_norm_bwd_dx_f32(const float *x, const float *w, const float *g, float *dx,
                                                 float *stats, int rows, int cols, float eps) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const float *xr = x + (size_t)row * cols;
    const float *gr = g + (size_t)row * cols;
    float *dr = dx + (size_t)row * cols;
    float mean, rstd;
    row_stats(xr, cols, eps, lane, mean, rstd);
    float s1 = 0.0f, s2 = 0.0f;
    for (int j = lane; j < cols; j += 32) {
        const float gw = gr[j] * w[j];
        s1 += gw;
        s2 += gw * (xr[j] - mean) * rstd;
    }
    const float c1 = warp_sum(s1) / cols, c2 = warp_sum(s2) / cols;
    for (int j = lane; j < cols; j += 32) dr[j] = rstd * (gr[j] * w[j] - c1 - (xr[j] - mean) * rstd * c2);
    if (lane == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = rstd;
    }
}

// partial[(chunk * 2 + 0) * cols + j] = sum over the chunk's rows of g * xhat, [.. + 1 ..] of g.
extern "C" __global__ void layer_norm_bwd_wb_partial_f32(const float *x, const float *g, const float *stats,
                                                         float *partial, int rows, int cols) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int chunk = blockIdx.y;
    if (j >= cols) return;
    const int end = min(rows, (chunk + 1) * ROWS_PER_CHUNK);
    float dw = 0.0f, db = 0.0f;
    for (int r = chunk * ROWS_PER_CHUNK; r < end; ++r) {
        const float gv = g[(size_t)r * cols + j];
        dw += gv * (x[(size_t)r * cols + j] - stats[2 * r]) * stats[2 * r + 1];
        db += gv;
    }
    partial[(size_t)(chunk * 2) * cols + j] = dw;
    partial[(size_t)(chunk * 2 + 1) * cols + j] = db;
}

// dw into out[0 .. cols), db into out[cols .. 2 cols): the chunks' partial sums in chunk order.
extern "C" __global__ void layer_norm_bwd_wb_final_f32(const float *partial, float *out, int chunks, int cols) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    float dw = 0.0f, db = 0.0f;
    for (int c = 0; c < chunks; ++c) {
        dw += partial[(size_t)(c * 2) * cols + j];
        db += partial[(size_t)(c * 2 + 1) * cols + j];
    }
    out[j] = dw;
    out[cols + j] = db;
}
