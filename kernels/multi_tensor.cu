// Per-parameter work over every parameter in one launch (PyTorch's multi-tensor apply): AdamW's update, the
// gradients' squared norm and the momentum encoders' EMA (formulas in src/ops/multi_tensor.rs). The table
// lists each tensor's pointers, length, hyper-parameters and first chunk: tensor t owns grid blocks
// chunk_start .. chunk_start + ceil(n / CHUNK), and a block finds its tensor by binary search.
#include "common.cuh"

#define CHUNK 4096

struct Row {
    float *x, *m, *v;  // written: the parameter or EMA twin; AdamW's moments
    const float *g;    // read: the gradient or the online parameter
    long long n, chunk_start;
    float h[8];        // AdamW: beta1, beta2, eps, lr, decay, bc1, bc2, scale; EMA: momentum
};

// The last tensor whose chunks start at or before this block (tensors without elements own no block), and
// the block's element range in it.
__device__ __forceinline__ const Row &block_row(const Row *table, int count, long long &start, long long &end) {
    int lo = 0, hi = count;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (table[mid].chunk_start <= (long long)blockIdx.x) lo = mid;
        else hi = mid;
    }
    const Row &r = table[lo];
    start = ((long long)blockIdx.x - r.chunk_start) * CHUNK;
    end = min(r.n, start + CHUNK);
    return r;
}

// m = beta1 m + (1 - beta1) (scale g), v = beta2 v + (1 - beta2) (scale g)^2,
// x = x * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps): one pass over each element.
extern "C" __global__ void adamw_multi_f32(const Row *table, int count) {
    long long start, end;
    const Row &t = block_row(table, count, start, end);
    const float beta1 = t.h[0], beta2 = t.h[1], eps = t.h[2], lr = t.h[3], decay = t.h[4], bc1 = t.h[5],
                bc2 = t.h[6], scale = t.h[7];
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float sg = scale * t.g[i];
        const float m = beta1 * t.m[i] + (1.0f - beta1) * sg;
        const float v = beta2 * t.v[i] + (1.0f - beta2) * (sg * sg);
        t.m[i] = m;
        t.v[i] = v;
        t.x[i] = t.x[i] * decay - lr * ((m / bc1) / (sqrtf(v / bc2) + eps));
    }
}

// x = momentum x + (1 - momentum) g: the EMA twin x of the online parameter g.
extern "C" __global__ void ema_multi_f32(const Row *table, int count) {
    long long start, end;
    const Row &t = block_row(table, count, start, end);
    const float mom = t.h[0], rest = t.h[1];
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) t.x[i] = t.x[i] * mom + t.g[i] * rest;
}

// The squared global norm of the g's: each block's chunk into partial[block], then sum_squares_final adds the
// partials in a fixed order (deterministic on one GPU) into out[0] (f64).
extern "C" __global__ void sum_squares_partial_f32(const Row *table, int count, float *partial) {
    __shared__ float scratch[32];
    long long start, end;
    const Row &t = block_row(table, count, start, end);
    float s = 0.0f;
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) s += t.g[i] * t.g[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// One block of SUM_THREADS threads: thread i sums partials i, i + SUM_THREADS, ..., then a tree in shared memory.
#define SUM_THREADS 256
extern "C" __global__ void sum_squares_final_f32(const float *partial, long long chunks, double *out) {
    __shared__ double acc[SUM_THREADS];
    double s = 0.0;
    for (long long c = threadIdx.x; c < chunks; c += SUM_THREADS) s += (double)partial[c];
    acc[threadIdx.x] = s;
    __syncthreads();
    for (int half = SUM_THREADS / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) acc[threadIdx.x] += acc[threadIdx.x + half];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = acc[0];
}
