// Fused ITC step (one direction, REFERENCE.md "Losses: ITC"): one block per row i of sim [B, N] computes
//   s = sim / temp, q = softmax(sim_m / temp), t = alpha * q + (1 - alpha) * pos,
//   loss_i = -sum_j t_j * log_softmax(s)_j,
//   dsim_ij = d loss_i / d sim_ij = (softmax(s)_j - t_j) / temp   (the targets sum to 1),
//   dtemp_i = d loss_i / d temp = -sum_j dsim_ij * sim_ij / temp,
// replacing the chain of ~10 launches over B x (B + queue) of the composed version. pos is the diagonal
// (pos == nullptr: column i) or a 0/1 mask normalised by its row sum (an all-zero row gives NaN, as in the
// reference); with pos == nullptr and cols != nullptr row i's positive is column cols[i] (MLM: the token ids
// over the vocabulary). alpha == 0 skips sim_m. Two passes over the row: the online max/sum of exp, then the outputs.
#include "common.cuh"

template <typename T>
__device__ __forceinline__ void itc_fwd(const T *sim, const T *sim_m, const T *temp_ptr, const T *pos,
                                        const unsigned int *cols, T *dsim,
                                        float *loss, float *dtemp, int n, float alpha) {
    __shared__ float scratch[3][32];
    const int row = blockIdx.x;
    const T *sr = sim + (size_t)row * n;
    const T *mr = sim_m + (size_t)row * n;
    const T *pr = pos != nullptr ? pos + (size_t)row * n : nullptr;
    T *dr = dsim + (size_t)row * n;
    const float temp = to_f32(*temp_ptr);
    const bool soft = alpha > 0.0f;
    const int positive = cols != nullptr ? (int)cols[row] : row;

    MaxSum ss = max_sum_empty(), sq = max_sum_empty();
    float pos_sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        max_sum_push(ss, to_f32(sr[j]) / temp);
        if (soft) max_sum_push(sq, to_f32(mr[j]) / temp);
        if (pr != nullptr) pos_sum += to_f32(pr[j]);
    }
    ss = block_max_sum(ss, scratch[0], scratch[1]);
    if (soft) sq = block_max_sum(sq, scratch[0], scratch[1]);
    pos_sum = pr != nullptr ? block_sum(pos_sum, scratch[2]) : 1.0f;

    const float log_sum = logf(ss.d);
    float loss_acc = 0.0f, dtemp_acc = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float s = to_f32(sr[j]) / temp;
        const float logp = (s - ss.m) - log_sum;
        const float p = expf(s - ss.m) / ss.d;
        const float q = soft ? expf(to_f32(mr[j]) / temp - sq.m) / sq.d : 0.0f;
        const float pj = pr != nullptr ? to_f32(pr[j]) / pos_sum : (j == positive ? 1.0f : 0.0f);
        const float t = alpha * q + (1.0f - alpha) * pj;
        const float g = (p - t) / temp;
        loss_acc -= t * logp;
        dtemp_acc -= g * s;  // d loss / d temp = -sum_j g_j * sim_j / temp
        dr[j] = from_f32<T>(g);
    }
    loss_acc = block_sum(loss_acc, scratch[0]);
    dtemp_acc = block_sum(dtemp_acc, scratch[1]);
    if (threadIdx.x == 0) {
        loss[row] = loss_acc;
        dtemp[row] = dtemp_acc;
    }
}

#define ITC(NAME, T)                                                                                         \
    extern "C" __global__ void itc_fwd_##NAME(const T *sim, const T *sim_m, const T *temp, const T *pos,    \
                                             const unsigned int *cols, T *dsim, float *loss, float *dtemp,  \
                                             int n, float alpha) {                                          \
        itc_fwd<T>(sim, sim_m, temp, pos, cols, dsim, loss, dtemp, n, alpha);                                \
    }

ITC(f32, float)
ITC(bf16, __nv_bfloat16)
