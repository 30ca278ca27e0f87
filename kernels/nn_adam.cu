// Adam (bias-corrected, decoupled weight decay, clipping by global norm) over one flat float32
// parameter buffer: two launches per step for every parameter of a network. The Numba twins
// with the same argument order are in fastface/nn/adam.py.
//
// Everything that changes from step to step (the step count, the learning rate, the norm) is
// read from device memory, so a whole training step can be captured in a CUDA graph and
// replayed: the host never passes a per-step value as a launch argument.
//
// hyper = [lr, beta1, beta2, eps, weight_decay, clip_norm]; clip_norm <= 0 means no clipping.
#include <cuda_fp16.h>

#define ADAM_THREADS 256

// Pass 1. Block k writes partial[k], the sum of squares of its grid-stride share of grad, so
// that pass 2 can reduce the n_parts partials in a fixed order (the norm does not depend on
// thread timing). Launched with exactly n_parts blocks of ADAM_THREADS threads. Thread 0 of
// block 0 also advances the step counter read by pass 2.
extern "C" __global__ void adam_prepare(const float* __restrict__ grad, long long n, float* __restrict__ partial,
                             int* __restrict__ step)
{
    __shared__ float s[ADAM_THREADS];
    float acc = 0.0f;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = grad[i];
        acc += g * g;
    }
    s[threadIdx.x] = acc;
    __syncthreads();
    for (int w = ADAM_THREADS / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        partial[blockIdx.x] = s[0];
        if (blockIdx.x == 0) step[0] += 1;
    }
}

// Pass 2. Every block first reduces the n_parts (<= ADAM_THREADS) partials in the same fixed
// order, so all blocks agree on the global norm and the clipping factor; a non-finite norm
// (an overflow of fp16 gradients) skips the update. Then each thread updates a grid-stride
// share of the elements: m, v, p, and the float16 shadow copy of p when one is given.
extern "C" __global__ void adam_update(float* __restrict__ param, const float* __restrict__ grad,
                            float* __restrict__ m, float* __restrict__ v, __half* __restrict__ shadow,
                            long long n, const float* __restrict__ partial, int n_parts,
                            const int* __restrict__ step, const float* __restrict__ hyper)
{
    __shared__ float s[ADAM_THREADS];
    s[threadIdx.x] = threadIdx.x < n_parts ? partial[threadIdx.x] : 0.0f;
    __syncthreads();
    for (int w = ADAM_THREADS / 2; w > 0; w >>= 1) {
        if (threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
        __syncthreads();
    }
    const float norm = sqrtf(s[0]);
    if (!isfinite(norm)) return;
    const float lr = hyper[0], beta1 = hyper[1], beta2 = hyper[2], eps = hyper[3];
    const float weight_decay = hyper[4], clip_norm = hyper[5];
    const float clip = (clip_norm > 0.0f && norm > clip_norm) ? clip_norm / norm : 1.0f;
    const float t = (float)step[0];
    const float bc1 = 1.0f - powf(beta1, t);
    const float bc2 = 1.0f - powf(beta2, t);
    const float decay = 1.0f - lr * weight_decay;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = grad[i] * clip;
        const float mi = beta1 * m[i] + (1.0f - beta1) * g;
        const float vi = beta2 * v[i] + (1.0f - beta2) * g * g;
        m[i] = mi;
        v[i] = vi;
        const float p = param[i] * decay - lr * (mi / bc1) / (sqrtf(vi / bc2) + eps);
        param[i] = p;
        if (shadow != nullptr) shadow[i] = __float2half_rn(p);
    }
}
