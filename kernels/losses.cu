// The losses of fastface/ops/losses.py: robust photometric (l2,1), weighted landmark distance and
// the quadratic prior, forward and backward. The Numba twins with the same names and argument order
// (plus the sizes here) are in fastface/ops/losses.py.
//
// Every loss gives one value per image, out (B,) float32, and every backward takes grad_out (B,),
// the weight of each image's value. All arrays are C-contiguous float32 (the photometric mask:
// unsigned char for a bool mask, float for weights).
//
// Determinism: no float atomics. Each image's value is summed by one block (photometric: a fixed
// per-thread stride then a fixed shared-memory tree) or one thread (landmarks, prior: in index
// order), so a result never depends on thread timing. No scratch memory: the backward recomputes the
// image's mask sum in every block that needs it (the mask is 1 or 4 bytes a pixel against 36 bytes
// of colours read and written, and its blocks share it through L2).

// Threads per block: the forward gives one block a whole image, so it takes the most threads a block
// can have (more loads in flight per SM); the backward's blocks each take a band of an image.
#define PHOTOMETRIC_FWD_THREADS 1024
#define PHOTOMETRIC_BWD_THREADS 256

// The sum of x[t] over the block's THREADS threads (blockDim.x == THREADS, a power of two), in a
// fixed order: a tree over shared memory. Every thread gets the sum. `s` is the block's shared
// buffer of THREADS floats; the barrier at the end lets the caller reuse it.
template <int THREADS>
__device__ __forceinline__ float block_sum(float x, float* s) {
    s[threadIdx.x] = x;
    __syncthreads();
    for (int w = THREADS / 2; w > 0; w >>= 1) {
        if ((int)threadIdx.x < w) s[threadIdx.x] += s[threadIdx.x + w];
        __syncthreads();
    }
    const float total = s[0];
    __syncthreads();
    return total;
}

// The sum of the mask of one image (n pixels from mb), made by a backward block in a fixed order.
template <typename M>
__device__ __forceinline__ float image_mask_sum(const M* __restrict__ mb, long long n, float* s) {
    float acc = 0.f;
    for (long long p = threadIdx.x; p < n; p += PHOTOMETRIC_BWD_THREADS) acc += (float)mb[p];
    return block_sum<PHOTOMETRIC_BWD_THREADS>(acc, s);
}

// One block of PHOTOMETRIC_FWD_THREADS threads per image (blockIdx.x = b; a grid of B blocks): thread t
// sums mask * (sqrt(|r - t|^2 + eps^2) - eps) and the mask over pixels t, t + 1024, ... (consecutive
// threads read consecutive pixels), then the block reduces both in a fixed order and thread 0 writes
// out[b] = loss / max(1, mask sum). One block per image keeps the reduction in one pass with no
// partial sums in memory; batches of 64 or more images give every SM work.
template <typename M>
__global__ void __launch_bounds__(PHOTOMETRIC_FWD_THREADS)
photometric_loss_fwd(const float* __restrict__ rendered, const float* __restrict__ target,
                     const M* __restrict__ mask, float* __restrict__ out, int B, int HW, int C, float eps) {
    __shared__ float s[PHOTOMETRIC_FWD_THREADS];
    const long long b = blockIdx.x;
    if (b >= B) return;  // uniform over the block
    const float* rb = rendered + b * HW * C;
    const float* tb = target + b * HW * C;
    const M* mb = mask + b * HW;
    float loss = 0.f, weight = 0.f;
    for (long long p = threadIdx.x; p < HW; p += PHOTOMETRIC_FWD_THREADS) {
        const float m = (float)mb[p];
        if (m == 0.f) continue;
        float d2 = 0.f;
        for (int c = 0; c < C; ++c) {
            const float d = rb[p * C + c] - tb[p * C + c];
            d2 += d * d;
        }
        loss += m * (sqrtf(d2 + eps * eps) - eps);
        weight += m;
    }
    loss = block_sum<PHOTOMETRIC_FWD_THREADS>(loss, s);
    weight = block_sum<PHOTOMETRIC_FWD_THREADS>(weight, s);
    if (threadIdx.x == 0) out[b] = loss / fmaxf(1.f, weight);
}

// A grid of (B, n_bands) blocks of PHOTOMETRIC_BWD_THREADS threads: blockIdx.x = image, blockIdx.y = band
// of `band` consecutive pixels. Each block first sums its image's mask (the same sum, in the same
// order, in every block of the image), then writes the gradient of its band's pixels:
// grad_out[b] * m * (r - t) / sqrt(|r - t|^2 + eps^2) / max(1, mask sum); zero where m = 0.
template <typename M>
__global__ void __launch_bounds__(PHOTOMETRIC_BWD_THREADS)
photometric_loss_bwd(const float* __restrict__ rendered, const float* __restrict__ target,
                     const M* __restrict__ mask, const float* __restrict__ grad_out,
                     float* __restrict__ grad_rendered, int B, int HW, int C, float eps, int band) {
    __shared__ float s[PHOTOMETRIC_BWD_THREADS];
    const long long b = blockIdx.x;
    if (b >= B) return;  // uniform over the block
    const M* mb = mask + b * HW;
    const float scale = grad_out[b] / fmaxf(1.f, image_mask_sum(mb, HW, s));
    const float* rb = rendered + b * HW * C;
    const float* tb = target + b * HW * C;
    float* gb = grad_rendered + b * HW * C;
    const long long begin = (long long)blockIdx.y * band;
    const long long end = begin + band < HW ? begin + band : HW;
    for (long long p = begin + threadIdx.x; p < end; p += PHOTOMETRIC_BWD_THREADS) {
        const float m = (float)mb[p];
        if (m == 0.f) {  // no colour reads outside the mask (the background is usually half the image)
            for (int c = 0; c < C; ++c) gb[p * C + c] = 0.f;
            continue;
        }
        float d2 = 0.f;
        for (int c = 0; c < C; ++c) {
            const float d = rb[p * C + c] - tb[p * C + c];
            d2 += d * d;
        }
        const float k = scale * m / sqrtf(d2 + eps * eps);
        for (int c = 0; c < C; ++c) gb[p * C + c] = k * (rb[p * C + c] - tb[p * C + c]);
    }
}

// One thread per image: out[b] = sum_k w_k |p_k - t_k|^2 / K, summed in k order. points, target
// (B, K, 2); weights (K,) (w_stride 0) or (B, K) (w_stride K). The work is B x K = 64 x 68: one
// launch of a few threads, whose cost is the launch itself.
extern "C" __global__ void landmark_loss_fwd(const float* __restrict__ points, const float* __restrict__ target,
                                             const float* __restrict__ weights, float* __restrict__ out,
                                             int B, int K, int w_stride) {
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const float* pb = points + b * K * 2;
    const float* tb = target + b * K * 2;
    const float* wb = weights + b * w_stride;
    float acc = 0.f;
    for (int k = 0; k < K; ++k) {
        const float dx = pb[2 * k] - tb[2 * k], dy = pb[2 * k + 1] - tb[2 * k + 1];
        acc += wb[k] * (dx * dx + dy * dy);
    }
    out[b] = acc / (float)K;
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

// One thread per image: out[b] = sum_k w_k c_k^2 in k order; weights (K,) or null for ones.
extern "C" __global__ void prior_loss_fwd(const float* __restrict__ coeffs, const float* __restrict__ weights,
                                          float* __restrict__ out, int B, int K) {
    const long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const float* cb = coeffs + b * K;
    float acc = 0.f;
    for (int k = 0; k < K; ++k) acc += (weights != nullptr ? weights[k] : 1.f) * cb[k] * cb[k];
    out[b] = acc;
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
