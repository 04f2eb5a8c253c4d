// AdamW's update in place (formulas in src/ops/adamw.rs) and the gradients' squared norm, each over every
// parameter in one launch.
#include "common.cuh"

// One launch over every parameter (PyTorch's multi-tensor apply): the table lists each tensor's pointers,
// length, hyper-parameters and first chunk; tensor t owns grid blocks chunk_start .. chunk_start +
// ceil(n / ADAMW_CHUNK), and a block finds its tensor by binary search. One pass over each element:
// m = beta1 m + (1 - beta1) (scale g), v = beta2 v + (1 - beta2) (scale g)^2,
// p = p * decay - lr * (m / bc1) / (sqrt(v / bc2) + eps).
#define ADAMW_CHUNK 4096

struct AdamWHyper {
    float beta1, beta2, eps, lr, decay, bc1, bc2, scale;
};

struct AdamWTensor {
    float *p, *m, *v;
    const float *g;
    long long n, chunk_start;
    AdamWHyper h;
};

// The last tensor whose chunks start at or before this block (tensors without elements own no block).
__device__ __forceinline__ const AdamWTensor &block_tensor(const AdamWTensor *table, int count) {
    int lo = 0, hi = count;
    while (hi - lo > 1) {
        const int mid = (lo + hi) / 2;
        if (table[mid].chunk_start <= (long long)blockIdx.x) lo = mid;
        else hi = mid;
    }
    return table[lo];
}

extern "C" __global__ void adamw_multi_f32(const AdamWTensor *table, int count) {
    const AdamWTensor &t = block_tensor(table, count);
    const AdamWHyper h = t.h;
    const long long start = ((long long)blockIdx.x - t.chunk_start) * ADAMW_CHUNK;
    const long long end = min(t.n, start + ADAMW_CHUNK);
    for (long long i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float sg = h.scale * t.g[i];
        const float m = h.beta1 * t.m[i] + (1.0f - h.beta1) * sg;
        const float v = h.beta2 * t.v[i] + (1.0f - h.beta2) * (sg * sg);
        t.m[i] = m;
        t.v[i] = v;
        t.p[i] = t.p[i] * h.decay - h.lr * ((m / h.bc1) / (sqrtf(v / h.bc2) + h.eps));
    }
}

// The squared global norm of the gradients g of the same table: each block's chunk into partial[block], then
// sum_squares_final adds the partials in a fixed order (deterministic on one GPU) into out[0] (f64).
extern "C" __global__ void sum_squares_partial_f32(const AdamWTensor *table, int count, float *partial) {
    __shared__ float scratch[32];
    const AdamWTensor &t = block_tensor(table, count);
    const long long start = ((long long)blockIdx.x - t.chunk_start) * ADAMW_CHUNK;
    const long long end = min(t.n, start + ADAMW_CHUNK);
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
