// Convolution gather kernels of fastface.nn (NHWC): im2col_fwd builds the GEMM operand of a
// convolution, im2col_bwd is its adjoint (col2im). The Numba twins with the same argument order
// are in fastface/nn/conv.py.
//
// cols has one row per output pixel (b, oh, ow) and one column per (kh, kw, c), c fastest, so
// that the row-major (KH, KW, C, Cout) weight is the (K, Cout) right operand of the GEMM and the
// product is the NHWC output itself. Both kernels apply an optional prologue to the input,
// a = relu?(x + in_bias[c]): the previous layer's bias and ReLU are fused into the gather
// instead of costing a pass of their own, and im2col_bwd multiplies by that ReLU's derivative.
// Zero padding is in the space of `a` (after the prologue).
//
// Flat indices are int: the host checks that B*Ho*Wo*KH*KW*C < 2^31 (64-bit divisions would
// cost more than the memory traffic of these kernels).
#include <cuda_fp16.h>

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// V consecutive channels moved as one aligned vector (16 bytes for V = 8 halves or 4 floats).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
    T v[V];
};

// One thread writes V consecutive channels of one (output pixel, kh, kw) entry of cols: the
// flat thread index times V *is* the flat cols index, so stores are contiguous across a warp
// (the widest possible), while the reads of neighbouring threads hit the same input pixel's
// channels (contiguous in NHWC) and overlap between kh, kw in L2. 1-D grid of 256 threads.
template <typename TIn, typename TOut, int V>
__global__ void im2col_fwd(const TIn* __restrict__ x, const float* __restrict__ in_bias, int in_relu,
                           int B, int H, int W, int C, int KH, int KW, int stride, int pad,
                           int Ho, int Wo, TOut* __restrict__ cols)
{
    const int groups = C / V;
    const int total = B * Ho * Wo * KH * KW * groups;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    int r = t / groups;
    const int c0 = (t - r * groups) * V;
    const int kw = r % KW; r /= KW;
    const int kh = r % KH; r /= KH;
    const int ow = r % Wo; r /= Wo;
    const int oh = r % Ho;
    const int b = r / Ho;
    const int ih = oh * stride - pad + kh;
    const int iw = ow * stride - pad + kw;
    Pack<TOut, V> out;
    if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
#pragma unroll
        for (int v = 0; v < V; ++v) out.v[v] = from_float<TOut>(0.0f);
    } else {
        const Pack<TIn, V> in = *reinterpret_cast<const Pack<TIn, V>*>(x + ((b * H + ih) * W + iw) * C + c0);
#pragma unroll
        for (int v = 0; v < V; ++v) {
            float a = to_float(in.v[v]);
            if (in_bias != nullptr) a += in_bias[c0 + v];
            if (in_relu) a = fmaxf(a, 0.0f);
            out.v[v] = from_float<TOut>(a);
        }
    }
    *reinterpret_cast<Pack<TOut, V>*>(cols + (long long)t * V) = out;
}

// The same gather for channel counts that allow no vector (the 3-channel stem): one thread
// copies the KW*C entries of one (output pixel, kh), which are contiguous in cols and, tap by
// tap, in x. One index decode per KW*C entries instead of one per entry: with C = 3 the decode,
// not the memory, would otherwise bound the stem's gather. 1-D grid of 256 threads.
template <typename TIn, typename TOut>
__global__ void im2col_fwd_run(const TIn* __restrict__ x, const float* __restrict__ in_bias, int in_relu,
                               int B, int H, int W, int C, int KH, int KW, int stride, int pad,
                               int Ho, int Wo, TOut* __restrict__ cols)
{
    const int total = B * Ho * Wo * KH;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    const int kh = t % KH;
    int r = t / KH;  // the output pixel (b, oh, ow), the cols row
    const int ow = r % Wo; r /= Wo;
    const int oh = r % Ho;
    const int b = r / Ho;
    const int ih = oh * stride - pad + kh;
    const int run = KW * C;
    TOut* out = cols + (long long)t * run;  // == ((row * KH + kh) * KW + 0) * C
    const bool row_ok = ih >= 0 && ih < H;
    for (int kw = 0; kw < KW; ++kw) {
        const int iw = ow * stride - pad + kw;
        if (!row_ok || iw < 0 || iw >= W) {
            for (int c = 0; c < C; ++c) out[kw * C + c] = from_float<TOut>(0.0f);
            continue;
        }
        const TIn* in = x + ((b * H + ih) * W + iw) * C;
        for (int c = 0; c < C; ++c) {
            float a = to_float(in[c]);
            if (in_bias != nullptr) a += in_bias[c];
            if (in_relu) a = fmaxf(a, 0.0f);
            out[kw * C + c] = from_float<TOut>(a);
        }
    }
}

// im2col_fwd for a square K x K kernel and 2^gshift groups of V channels (C = V << gshift), with
// a cheaper index decode: the grid is (blocks along one output row, Ho, B), so b and oh are the
// block's coordinates, the group is a mask, and the tap and ow come from divisions by the
// constants K*K and K. The generic kernel's six runtime divisions per 16 bytes bounded it by
// instructions (about 200 per thread), not by memory. Inside one output row the flat thread index
// times V is the flat cols offset, exactly as in im2col_fwd, so the memory access pattern and
// the arithmetic (one float32 add, max, one rounding per entry) are the same: same bits out.
// The host checks Ho, B <= 65535 (grid limits). Blocks of 256 threads along the row.
template <typename TIn, typename TOut, int V, int K>
__global__ void im2col_fwd_rows(const TIn* __restrict__ x, const float* __restrict__ in_bias, int in_relu,
                                int H, int W, int C, int gshift, int stride, int pad,
                                int Ho, int Wo, TOut* __restrict__ cols)
{
    const int row_len = (Wo * K * K) << gshift;  // threads per output row
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= row_len) return;
    const int oh = blockIdx.y;
    const int b = blockIdx.z;
    const int c0 = (t & ((1 << gshift) - 1)) * V;
    const int q = t >> gshift;  // (ow, kh, kw)
    const int tap = q % (K * K);
    const int ow = q / (K * K);
    const int kh = tap / K;
    const int kw = tap - kh * K;
    const int ih = oh * stride - pad + kh;
    const int iw = ow * stride - pad + kw;
    Pack<TOut, V> out;
    if (ih < 0 || ih >= H || iw < 0 || iw >= W) {
#pragma unroll
        for (int v = 0; v < V; ++v) out.v[v] = from_float<TOut>(0.0f);
    } else {
        const Pack<TIn, V> in = *reinterpret_cast<const Pack<TIn, V>*>(x + ((b * H + ih) * W + iw) * C + c0);
#pragma unroll
        for (int v = 0; v < V; ++v) {
            float a = to_float(in.v[v]);
            if (in_bias != nullptr) a += in_bias[c0 + v];
            if (in_relu) a = fmaxf(a, 0.0f);
            out.v[v] = from_float<TOut>(a);
        }
    }
    const long long row = (long long)b * Ho + oh;
    *reinterpret_cast<Pack<TOut, V>*>(cols + row * row_len * V + (long long)t * V) = out;
}

// The gather of a patchify convolution (stride == kernel, no padding) of a float32 image whose
// KW*C and W*C are multiples of 4 (the 4x4/4 stem on 3 channels): then each (output pixel, kh)
// row of cols is KW*C contiguous floats of x, a float4-aligned run, and the gather is a pure
// re-layout. One thread moves one float4 of one run (16 bytes read, 4 outputs written: 8 bytes
// as half4, or 16 as float4); the flat thread index times 4 is the flat cols index, so a warp's
// stores are 32 contiguous vectors, and its loads are whole 48-byte runs of neighbouring pixels
// on KH image rows (contiguous along each row). KH, KW, C are template constants: the index
// decode is then two runtime divisions (by Wo and Ho) per 4 entries, not six per entry.
// Same prologue arithmetic as im2col_fwd (float32 add, max, one rounding). The host checks the
// 16-byte alignment of x and cols. 1-D grid of 256 threads.
template <typename TOut, int KH, int KW, int C>
__global__ void im2col_fwd_patch(const float* __restrict__ x, const float* __restrict__ in_bias, int in_relu,
                                 int B, int H, int W, int Ho, int Wo, TOut* __restrict__ cols)
{
    static_assert((KW * C) % 4 == 0, "a run must be whole float4s");
    constexpr int N4 = KW * C / 4;  // float4s per run
    const int total = B * Ho * Wo * KH * N4;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    const int run = t / N4;         // the (output pixel, kh) run
    const int j = t - run * N4;     // its float4
    const int kh = run % KH;
    int r = run / KH;               // the output pixel (b, oh, ow)
    const int ow = r % Wo; r /= Wo;
    const int oh = r % Ho;
    const int b = r / Ho;
    const int ih = oh * KH + kh;
    const float4 in = *reinterpret_cast<const float4*>(x + ((b * H + ih) * W + ow * KW) * C + 4 * j);
    const float a_in[4] = {in.x, in.y, in.z, in.w};
    Pack<TOut, 4> out;
#pragma unroll
    for (int v = 0; v < 4; ++v) {
        float a = a_in[v];
        if (in_bias != nullptr) a += in_bias[(4 * j + v) % C];
        if (in_relu) a = fmaxf(a, 0.0f);
        out.v[v] = from_float<TOut>(a);
    }
    *reinterpret_cast<Pack<TOut, 4>*>(cols + (long long)t * 4) = out;
}

// The adjoint of im2col_fwd, as a gather (no atomics, deterministic): one thread owns V
// consecutive channels of one input pixel (b, ih, iw) and sums the cols gradients of every
// (output pixel, kh, kw) that read it, then applies the prologue's ReLU derivative
// (x + in_bias > 0) and `scale`. The reads of a warp are contiguous channels of one cols row.
template <typename TIn, typename TG, typename TOut, int V>
__global__ void im2col_bwd(const TIn* __restrict__ x, const float* __restrict__ in_bias, int in_relu,
                           const TG* __restrict__ grad_cols,
                           int B, int H, int W, int C, int KH, int KW, int stride, int pad,
                           int Ho, int Wo, float scale, TOut* __restrict__ grad_x)
{
    const int groups = C / V;
    const int total = B * H * W * groups;
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= total) return;
    int r = t / groups;
    const int c0 = (t - r * groups) * V;
    const int iw = r % W; r /= W;
    const int ih = r % H;
    const int b = r / H;
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = 0.0f;
    for (int kh = 0; kh < KH; ++kh) {
        const int th = ih + pad - kh;
        if (th < 0 || th % stride != 0) continue;
        const int oh = th / stride;
        if (oh >= Ho) continue;
        for (int kw = 0; kw < KW; ++kw) {
            const int tw = iw + pad - kw;
            if (tw < 0 || tw % stride != 0) continue;
            const int ow = tw / stride;
            if (ow >= Wo) continue;
            const long long idx = ((((long long)(b * Ho + oh) * Wo + ow) * KH + kh) * KW + kw) * C + c0;
            const Pack<TG, V> g = *reinterpret_cast<const Pack<TG, V>*>(grad_cols + idx);
#pragma unroll
            for (int v = 0; v < V; ++v) acc[v] += to_float(g.v[v]);
        }
    }
    const long long pix = (long long)t * V;  // == ((b * H + ih) * W + iw) * C + c0
    Pack<TOut, V> out;
    if (in_relu) {
        const Pack<TIn, V> in = *reinterpret_cast<const Pack<TIn, V>*>(x + pix);
#pragma unroll
        for (int v = 0; v < V; ++v) {
            float a = to_float(in.v[v]);
            if (in_bias != nullptr) a += in_bias[c0 + v];
            out.v[v] = from_float<TOut>(a > 0.0f ? acc[v] * scale : 0.0f);
        }
    } else {
#pragma unroll
        for (int v = 0; v < V; ++v) out.v[v] = from_float<TOut>(acc[v] * scale);
    }
    *reinterpret_cast<Pack<TOut, V>*>(grad_x + pix) = out;
}

