// Global average pooling of fastface.nn (NHWC), with the producer's bias and ReLU fused in as a
// prologue, a = relu?(x + in_bias[c]), as in nn_conv.cu. The Numba twins with the same argument
// order are in fastface/nn/pool.py.
#include <cuda_fp16.h>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// One thread per (b, c) sums the HW pixels of its channel in a fixed order (deterministic):
// neighbouring threads read neighbouring channels, so each step of the loop is one coalesced
// row. out is (B, ld) with ld >= C; columns C.. are left as they are (the caller keeps a column
// of ones there that carries the next layer's bias).
template <typename TIn, typename TOut>
__global__ void global_avg_pool_fwd(const TIn* __restrict__ x, const float* __restrict__ in_bias,
                                    int in_relu, int B, int HW, int C, int ld, TOut* __restrict__ out)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= B * C) return;
    const int b = t / C, c = t - b * C;
    const float bias = in_bias != nullptr ? in_bias[c] : 0.0f;
    const TIn* p = x + (long long)b * HW * C + c;
    float acc = 0.0f;
    for (int i = 0; i < HW; ++i) {
        float a = to_float(p[(long long)i * C]) + bias;
        acc += in_relu ? fmaxf(a, 0.0f) : a;
    }
    out[(long long)b * ld + c] = from_float<TOut>(acc / (float)HW);
}

// One thread per input element: grad_x = grad_out[b, c] / HW * (ReLU derivative) * scale.
// grad_out is (B, ld) with ld >= C (columns C.. are ignored).
template <typename TIn, typename TG, typename TOut>
__global__ void global_avg_pool_bwd(const TIn* __restrict__ x, const float* __restrict__ in_bias,
                                    int in_relu, const TG* __restrict__ grad_out,
                                    int B, int HW, int C, int ld, float scale, TOut* __restrict__ grad_x)
{
    const long long total = (long long)B * HW * C;
    const long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    const int c = (int)(t % C);
    const int b = (int)(t / ((long long)HW * C));
    float g = to_float(grad_out[(long long)b * ld + c]) * (scale / (float)HW);
    if (in_relu) {
        float a = to_float(x[t]) + (in_bias != nullptr ? in_bias[c] : 0.0f);
        if (!(a > 0.0f)) g = 0.0f;
    }
    grad_x[t] = from_float<TOut>(g);
}
