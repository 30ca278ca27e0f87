// The losses of fastface/ops/losses.py: robust photometric (l2,1), weighted landmark distance and
// the quadratic prior, forward and backward. The Numba twins with the same names and argument order
// (plus the sizes here) are in fastface/ops/losses.py; the GPU splits each photometric twin into two
// kernels: photometric_loss_fwd (chunk sums) then photometric_loss_fwd_sum (per image), and
// photometric_loss_bwd_count (mask sums) then photometric_loss_bwd (the gradient).
//
// Every loss gives one value per image, out (B,) float32, and every backward takes grad_out (B,),
// the weight of each image's value. All arrays are C-contiguous float32 (the photometric mask:
// unsigned char for a bool mask, float for weights).
//
// Determinism: no atomics. Every sum is made in an order fixed by the sizes alone: per-thread loops,
// then fixed shuffle trees and fixed shared-memory orders; the number of blocks per image follows from
// the pixel count and the constants below (never from the GPU's SM count), so a result is bit for bit
// the same on every run and every GPU.
//
// Photometric loss: the design, in bytes moved and blocks launched (H200: 132 SMs, ~4.3 TB/s; training:
// B = 64, 224 x 224 = 50,176 pixels, C = 3, bool mask).
// - The forward must read rendered and target (38.5 MB each) and the mask (3.2 MB): ~80 MB, ~19 us at full
//   bandwidth. One block per image (the old design) ran 64 blocks on 132 SMs, each SM with one block
//   (at most 1024 threads, half an SM's 2048) and so half the loads in flight: 36 us. Now pass 1
//   (photometric_loss_fwd) splits each image into fixed chunks of PHOTOMETRIC_CHUNK = 1024 pixels, one
//   block of 256 threads each: 49 blocks an image, 3,136 at B = 64 (every SM full: 5 resident blocks an SM
//   at the quad kernel's 48 registers a thread, ~4.8 waves; 1,280 threads an SM with ~100 bytes of loads
//   in flight each, ~4x what Little's law asks of an SM at 4.3 TB/s and ~0.7 us latency), 49 at B = 1
//   (a block on each of a third of the SMs: a batch of one is 1.2 MB, a few microseconds whatever the
//   shape; smaller chunks would spread it wider but give B = 64 more, shorter blocks and partial sums).
//   Each block writes its (loss, mask) sums as two doubles into a scratch buffer (B x 49 x 16 bytes =
//   50 KB), and pass 2 (photometric_loss_fwd_sum, one warp an image) adds an image's 49 pairs in a fixed
//   order: 50 KB more traffic and one more (launch-bound, ~2 us) kernel.
// - Wide loads: with C = 3 and H * W a multiple of 4 (the training images) a thread takes a quad of 4
//   pixels: three 16-byte loads of each image (48 bytes: 4 pixels of RGB) and one 4-byte (bool) or 16-byte
//   (float) load of the mask; a warp's loads cover 1.5 KB of contiguous memory of each image. A quad whose
//   4 mask values are 0 reads no colours (the background: a third to half of a face crop). Other shapes
//   take one pixel a thread, C scalar loads (coalesced across the warp, the lines shared through L1).
// - The backward reads the same 80 MB and writes the gradient (38.5 MB): ~28 us at full bandwidth. It
//   needs each image's mask sum first. The forward has it, but the public API gives the backward no way
//   to receive it, so the backward counts again, cheaply: photometric_loss_bwd_count reads only the mask
//   (3.2 MB bool, ~1 us) in at most PHOTOMETRIC_MAX_COUNT_BLOCKS = 32 blocks an image of 8,192 pixels
//   each (7 at 224 x 224: 448 blocks at B = 64), writing one double each; then every warp of the gradient
//   pass (photometric_loss_bwd, the forward's chunks and quads) sums its image's <= 32 counts with one
//   load a lane and a shuffle tree (L2-resident, at most 256 bytes an image). The old backward summed the
//   whole image's mask again in every one of its 13 bands (650 KB of re-reads an image, 42 MB at B = 64)
//   before writing anything.

// Threads per block of the photometric kernels; pixels per block of the forward's partial sums and of the
// gradient; pixels per block of the backward's mask count, and its cap of blocks per image (one warp
// lane each in the gradient pass). Fixed numbers, not tuned to a GPU: they fix the summation order.
#define PHOTOMETRIC_THREADS 256
#define PHOTOMETRIC_CHUNK 1024
#define PHOTOMETRIC_COUNT_CHUNK 8192
#define PHOTOMETRIC_MAX_COUNT_BLOCKS 32
// Images (one warp each) per block of photometric_loss_fwd_sum, landmark_loss_fwd and prior_loss_fwd.
#define WARPS_PER_BLOCK 8

#define FULL_WARP 0xffffffffu

// Pixels per load of a colour or mask type: float4 colours (with C = 3) and unsigned int (4 bool bytes)
// or float4 (4 float weights) masks load a quad of pixels; float and unsigned char one pixel.
template <typename T> struct PixelsPerLoad { static constexpr int n = 1; };
template <> struct PixelsPerLoad<float4> { static constexpr int n = 4; };
template <> struct PixelsPerLoad<unsigned int> { static constexpr int n = 4; };

// Mask value i of a load, and whether all of a load's values are 0.
__device__ __forceinline__ float mask_value(unsigned char m, int) { return (float)m; }
__device__ __forceinline__ float mask_value(float m, int) { return m; }
__device__ __forceinline__ float mask_value(unsigned int m, int i) { return (float)((m >> (8 * i)) & 0xffu); }
__device__ __forceinline__ float mask_value(float4 m, int i) {
    return i == 0 ? m.x : i == 1 ? m.y : i == 2 ? m.z : m.w;
}
__device__ __forceinline__ bool mask_empty(unsigned char m) { return m == 0; }
__device__ __forceinline__ bool mask_empty(float m) { return m == 0.f; }
__device__ __forceinline__ bool mask_empty(unsigned int m) { return m == 0u; }
__device__ __forceinline__ bool mask_empty(float4 m) { return m.x == 0.f && m.y == 0.f && m.z == 0.f && m.w == 0.f; }

// The sum of x over the warp's 32 lanes by a fixed tree; lane 0 gets it.
template <typename T>
__device__ __forceinline__ T warp_sum(T x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_down_sync(FULL_WARP, x, offset);
    return x;
}

// The sums of a and b over the block's PHOTOMETRIC_THREADS threads, in a fixed order (each warp's tree,
// then the warps in order); thread 0 gets them.
__device__ __forceinline__ void block_sum2(double& a, double& b) {
    __shared__ double s[2 * (PHOTOMETRIC_THREADS / 32)];
    a = warp_sum(a);
    b = warp_sum(b);
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0) {
        s[2 * warp] = a;
        s[2 * warp + 1] = b;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        a = s[0];
        b = s[1];
        for (int w = 1; w < PHOTOMETRIC_THREADS / 32; ++w) {
            a += s[2 * w];
            b += s[2 * w + 1];
        }
    }
}

// The colour differences r - t of a quad of pixels (C = 3): three 16-byte loads of each image.
__device__ __forceinline__ void quad_differences(const float4* __restrict__ r, const float4* __restrict__ t,
                                                 float (&d)[12]) {
    const float4 r0 = r[0], r1 = r[1], r2 = r[2], t0 = t[0], t1 = t[1], t2 = t[2];
    d[0] = r0.x - t0.x; d[1] = r0.y - t0.y; d[2] = r0.z - t0.z; d[3] = r0.w - t0.w;
    d[4] = r1.x - t1.x; d[5] = r1.y - t1.y; d[6] = r1.z - t1.z; d[7] = r1.w - t1.w;
    d[8] = r2.x - t2.x; d[9] = r2.y - t2.y; d[10] = r2.z - t2.z; d[11] = r2.w - t2.w;
}

// Pass 1 of the forward. Grid (B * n_chunks,) of PHOTOMETRIC_THREADS threads: block i is chunk
// i % n_chunks of image i / n_chunks (n_chunks = ceil(HW / PHOTOMETRIC_CHUNK); one flat axis, so a batch
// has no 65,535 limit), pixels [chunk * PHOTOMETRIC_CHUNK, +PHOTOMETRIC_CHUNK). Thread t takes the load
// units (a pixel, or a quad when P is float4) t, t + 256, ... of the chunk (consecutive threads,
// consecutive units), sums m * (sqrt(|r - t|^2 + eps^2) - eps) (each pixel's term in float, as the twin)
// and m over its units in double, skipping pixels with m = 0; the block reduces both in a fixed order and
// thread 0 writes partial[2 i] (loss) and partial[2 i + 1] (mask). M, P: the mask and colour load types,
// <unsigned char or float, float> (any C, any HW) or <unsigned int or float4, float4> (C = 3, HW % 4 == 0,
// 16-byte aligned arrays: the caller checks).
template <typename M, typename P>
__global__ void __launch_bounds__(PHOTOMETRIC_THREADS)
photometric_loss_fwd(const P* __restrict__ rendered, const P* __restrict__ target, const M* __restrict__ mask,
                     double* __restrict__ partial, int HW, int C, float eps, int n_chunks) {
    constexpr int N = PixelsPerLoad<P>::n;
    static_assert(PixelsPerLoad<M>::n == N, "mask and colours load the same pixels");
    const long long b = blockIdx.x / n_chunks;
    const int chunk = (int)(blockIdx.x - b * n_chunks);
    const long long units = HW / N;  // per image; colours: C loads of P a unit
    const long long begin = (long long)chunk * (PHOTOMETRIC_CHUNK / N);
    const long long end = begin + PHOTOMETRIC_CHUNK / N < units ? begin + PHOTOMETRIC_CHUNK / N : units;
    const P* rb = rendered + b * units * C;
    const P* tb = target + b * units * C;
    const M* mb = mask + b * units;
    double loss = 0.0, weight = 0.0;
    for (long long u = begin + threadIdx.x; u < end; u += PHOTOMETRIC_THREADS) {
        const M mu = mb[u];
        if (mask_empty(mu)) continue;  // no colour reads outside the mask
        if constexpr (N == 4) {
            float d[12];
            quad_differences(rb + 3 * u, tb + 3 * u, d);
            for (int i = 0; i < 4; ++i) {
                const float m = mask_value(mu, i);
                if (m == 0.f) continue;
                float d2 = d[3 * i] * d[3 * i];
                d2 += d[3 * i + 1] * d[3 * i + 1];
                d2 += d[3 * i + 2] * d[3 * i + 2];
                loss += (double)(m * (sqrtf(d2 + eps * eps) - eps));
                weight += (double)m;
            }
        } else {
            const float m = mask_value(mu, 0);
            float d2 = 0.f;
            for (int c = 0; c < C; ++c) {
                const float d = rb[u * C + c] - tb[u * C + c];
                d2 += d * d;
            }
            loss += (double)(m * (sqrtf(d2 + eps * eps) - eps));
            weight += (double)m;
        }
    }
    block_sum2(loss, weight);
    if (threadIdx.x == 0) {
        partial[2 * (long long)blockIdx.x] = loss;
        partial[2 * (long long)blockIdx.x + 1] = weight;
    }
}

// Pass 2 of the forward. One warp per image, WARPS_PER_BLOCK images a block (grid ceil(B / 8)): lane l adds
// the image's chunk sums l, l + 32, ... in order, a fixed shuffle tree adds the lanes, and lane 0 writes
// out[b] = loss / max(1, mask sum) (in double, rounded once to float, as the twin).
extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
photometric_loss_fwd_sum(const double* __restrict__ partial, float* __restrict__ out, int B, int n_chunks) {
    const long long b = (long long)blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    if (b >= B) return;  // the whole warp
    const int lane = threadIdx.x & 31;
    const double* pb = partial + 2 * b * n_chunks;
    double loss = 0.0, weight = 0.0;
    for (int k = lane; k < n_chunks; k += 32) {
        loss += pb[2 * k];
        weight += pb[2 * k + 1];
    }
    loss = warp_sum(loss);
    weight = warp_sum(weight);
    if (lane == 0) out[b] = (float)(loss / fmax(1.0, weight));
}

// Pass 1 of the backward: the mask sums. Grid (B * n_count,) of PHOTOMETRIC_THREADS threads, n_count =
// min(PHOTOMETRIC_MAX_COUNT_BLOCKS, ceil(HW / PHOTOMETRIC_COUNT_CHUNK)): block i of image b = i / n_count,
// j = i % n_count, strides over the image's mask load units j * 256 + t, + n_count * 256, ... (coalesced;
// unrolled by 4 so that several loads are in flight), sums them in double (exact for a bool mask) and the
// block's fixed-order reduction gives thread 0 the sum it writes to count[i].
template <typename M>
__global__ void __launch_bounds__(PHOTOMETRIC_THREADS)
photometric_loss_bwd_count(const M* __restrict__ mask, double* __restrict__ count, int HW, int n_count) {
    constexpr int N = PixelsPerLoad<M>::n;
    const long long b = blockIdx.x / n_count;
    const int j = (int)(blockIdx.x - b * n_count);
    const long long units = HW / N;
    const M* mb = mask + b * units;
    double acc = 0.0, unused = 0.0;
#pragma unroll 4
    for (long long u = (long long)j * PHOTOMETRIC_THREADS + threadIdx.x; u < units;
         u += (long long)n_count * PHOTOMETRIC_THREADS) {
        const M mu = mb[u];
        for (int i = 0; i < N; ++i) acc += (double)mask_value(mu, i);
    }
    block_sum2(acc, unused);
    if (threadIdx.x == 0) count[blockIdx.x] = acc;
}

// Pass 2 of the backward. The forward's grid, chunks, units and load types. First every warp adds its
// image's n_count mask sums (lane k loads sum k; an xor butterfly gives every lane, every warp and every
// block of the image the same bits, since a + b == b + a), then thread t writes the gradient of its units:
// grad_out[b] * m * (r - t) / sqrt(|r - t|^2 + eps^2) / max(1, mask sum); zero where m = 0.
template <typename M, typename P>
__global__ void __launch_bounds__(PHOTOMETRIC_THREADS)
photometric_loss_bwd(const P* __restrict__ rendered, const P* __restrict__ target, const M* __restrict__ mask,
                     const double* __restrict__ count, const float* __restrict__ grad_out,
                     P* __restrict__ grad_rendered, int HW, int C, float eps, int n_chunks, int n_count) {
    constexpr int N = PixelsPerLoad<P>::n;
    static_assert(PixelsPerLoad<M>::n == N, "mask and colours load the same pixels");
    const long long b = blockIdx.x / n_chunks;
    const int chunk = (int)(blockIdx.x - b * n_chunks);
    const int lane = threadIdx.x & 31;
    double weight = lane < n_count ? count[b * n_count + lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1) weight += __shfl_xor_sync(FULL_WARP, weight, offset);
    const float scale = (float)((double)grad_out[b] / fmax(1.0, weight));
    const long long units = HW / N;
    const long long begin = (long long)chunk * (PHOTOMETRIC_CHUNK / N);
    const long long end = begin + PHOTOMETRIC_CHUNK / N < units ? begin + PHOTOMETRIC_CHUNK / N : units;
    const P* rb = rendered + b * units * C;
    const P* tb = target + b * units * C;
    P* gb = grad_rendered + b * units * C;
    const M* mb = mask + b * units;
    for (long long u = begin + threadIdx.x; u < end; u += PHOTOMETRIC_THREADS) {
        const M mu = mb[u];
        if constexpr (N == 4) {
            float g[12];
            if (mask_empty(mu)) {  // no colour reads outside the mask
                for (int i = 0; i < 12; ++i) g[i] = 0.f;
            } else {
                quad_differences(rb + 3 * u, tb + 3 * u, g);
                for (int i = 0; i < 4; ++i) {
                    const float m = mask_value(mu, i);
                    float d2 = g[3 * i] * g[3 * i];
                    d2 += g[3 * i + 1] * g[3 * i + 1];
                    d2 += g[3 * i + 2] * g[3 * i + 2];
                    const float k = scale * m / sqrtf(d2 + eps * eps);
                    for (int c = 0; c < 3; ++c) g[3 * i + c] = m == 0.f ? 0.f : k * g[3 * i + c];
                }
            }
            gb[3 * u] = make_float4(g[0], g[1], g[2], g[3]);
            gb[3 * u + 1] = make_float4(g[4], g[5], g[6], g[7]);
            gb[3 * u + 2] = make_float4(g[8], g[9], g[10], g[11]);
        } else {
            const float m = mask_value(mu, 0);
            if (m == 0.f) {
                for (int c = 0; c < C; ++c) gb[u * C + c] = 0.f;
                continue;
            }
            float d2 = 0.f;
            for (int c = 0; c < C; ++c) {
                const float d = rb[u * C + c] - tb[u * C + c];
                d2 += d * d;
            }
            const float k = scale * m / sqrtf(d2 + eps * eps);
            for (int c = 0; c < C; ++c) gb[u * C + c] = k * (rb[u * C + c] - tb[u * C + c]);
        }
    }
}

// One warp per image, WARPS_PER_BLOCK images a block (grid ceil(B / 8)): lane l sums
// w_k |p_k - t_k|^2 over k = l, l + 32, ... (coalesced loads: a warp reads 256 contiguous bytes of points
// and of target), a fixed shuffle tree adds the lanes and lane 0 writes out[b] = sum / K. points, target
// (B, K, 2); weights (K,) (w_stride 0) or (B, K) (w_stride K). Why not one thread per image (as before, 13.6 us
// for 64 x 68 points): that was one block of 64 threads, 2 warps on one SM; each thread read its own image,
// 544 bytes from its neighbour's (a warp's load touched 32 lines), and its loop over a run-time K, not
// unrolled, waited a full memory round trip in each of its 68 iterations (68 x ~0.2 us). A warp per image
// reads its points in coalesced lines and has at most ceil(K / 32) = 3 iterations a lane: the launch's cost.
extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
landmark_loss_fwd(const float* __restrict__ points, const float* __restrict__ target,
                  const float* __restrict__ weights, float* __restrict__ out, int B, int K, int w_stride) {
    const long long b = (long long)blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    if (b >= B) return;  // the whole warp
    const int lane = threadIdx.x & 31;
    const float* pb = points + b * K * 2;
    const float* tb = target + b * K * 2;
    const float* wb = weights + b * w_stride;
    float acc = 0.f;
    for (int k = lane; k < K; k += 32) {
        const float dx = pb[2 * k] - tb[2 * k], dy = pb[2 * k + 1] - tb[2 * k + 1];
        acc += wb[k] * (dx * dx + dy * dy);
    }
    acc = warp_sum(acc);
    if (lane == 0) out[b] = acc / (float)K;
}

// One thread per (image, point), flat index b * K + k: grad_points = grad_out[b] * 2 w_k (p - t) / K.
extern "C" __global__ void landmark_loss_bwd(const float* __restrict__ points, const float* __restrict__ target,
                                             const float* __restrict__ weights, const float* __restrict__ grad_out,
                                             float* __restrict__ grad_points, int B, int K, int w_stride) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * K) return;
    const long long b = i / K;
    const int k = (int)(i - b * K);
    const float s = 2.f * grad_out[b] * weights[b * w_stride + k] / (float)K;
    grad_points[2 * i] = s * (points[2 * i] - target[2 * i]);
    grad_points[2 * i + 1] = s * (points[2 * i + 1] - target[2 * i + 1]);
}

// One warp per image, as landmark_loss_fwd (and for the same reason: K = 80, 6 us as one thread an image):
// lane l sums w_k c_k^2 over k = l, l + 32, ..., a fixed shuffle tree adds the lanes, lane 0 writes out[b].
// weights (K,) or null for ones.
extern "C" __global__ void __launch_bounds__(WARPS_PER_BLOCK * 32)
prior_loss_fwd(const float* __restrict__ coeffs, const float* __restrict__ weights, float* __restrict__ out,
               int B, int K) {
    const long long b = (long long)blockIdx.x * WARPS_PER_BLOCK + (threadIdx.x >> 5);
    if (b >= B) return;  // the whole warp
    const int lane = threadIdx.x & 31;
    const float* cb = coeffs + b * K;
    float acc = 0.f;
    for (int k = lane; k < K; k += 32) acc += (weights != nullptr ? weights[k] : 1.f) * cb[k] * cb[k];
    acc = warp_sum(acc);
    if (lane == 0) out[b] = acc;
}

// One thread per (image, coefficient), flat index b * K + k: grad_coeffs = 2 grad_out[b] w_k c_k.
extern "C" __global__ void prior_loss_bwd(const float* __restrict__ coeffs, const float* __restrict__ weights,
                                          const float* __restrict__ grad_out, float* __restrict__ grad_coeffs,
                                          int B, int K) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * K) return;
    const long long b = i / K;
    const int k = (int)(i - b * K);
    grad_coeffs[i] = 2.f * grad_out[b] * (weights != nullptr ? weights[k] : 1.f) * coeffs[i];
}
