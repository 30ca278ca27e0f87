// Bilinear image sampling at pixel coordinates (x = column, y = row, integers at pixel centres),
// taps clamped to the border; the Numba twins are in fastface/ops/sampling.py (same names, same
// argument order, plus the sizes here). image and grad_image are (B, H, W, C) float32, points and
// grad_points (B, N, 2), samples and grad_out (B, N, C); all C-contiguous.
//
// Both kernels run one thread per (batch, point), flat index b * N + n, looping over the C
// channels: consecutive threads read consecutive points (coalesced), and the four taps of
// neighbouring points usually share cache lines.

// One axis of the bilinear blend: the two taps, clamped to [0, size - 1], and the weight of the
// second. The coordinate is first clamped to [-1, size] (NaN to -1) so the integer conversion is
// safe for any value; within that range clamping the taps gives the same blend as for the raw
// coordinate, and a zero derivative outside [0, size - 1].
__device__ __forceinline__ void axis_taps(float x, int size, int& i0, int& i1, float& t) {
    if (!(x >= -1.f)) x = -1.f;
    if (x > (float)size) x = (float)size;
    const float x0 = floorf(x);
    t = x - x0;
    i0 = (int)x0;
    i1 = i0 + 1;
    i0 = i0 < 0 ? 0 : (i0 > size - 1 ? size - 1 : i0);
    i1 = i1 < 0 ? 0 : (i1 > size - 1 ? size - 1 : i1);
}

extern "C" __global__ void sample_image_fwd(const float* __restrict__ image, const float* __restrict__ points,
                                            float* __restrict__ out, int B, int H, int W, int C, int N) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * N) return;
    const long long b = i / N;
    int j0, j1, i0, i1;
    float tx, ty;
    axis_taps(points[2 * i], W, j0, j1, tx);
    axis_taps(points[2 * i + 1], H, i0, i1, ty);
    const float* im = image + b * H * W * C;
    const long long r0 = (long long)i0 * W, r1 = (long long)i1 * W;
    for (int c = 0; c < C; ++c) {
        const float top = (1.f - tx) * im[(r0 + j0) * C + c] + tx * im[(r0 + j1) * C + c];
        const float bottom = (1.f - tx) * im[(r1 + j0) * C + c] + tx * im[(r1 + j1) * C + c];
        out[i * C + c] = (1.f - ty) * top + ty * bottom;
    }
}

// grad_points from the blend's derivative in the point's cell; grad_image by atomicAdd of the four
// weights times grad_out into the zeroed output (points may share pixels).
extern "C" __global__ void sample_image_bwd(const float* __restrict__ image, const float* __restrict__ points,
                                            const float* __restrict__ grad_out, float* __restrict__ grad_image,
                                            float* __restrict__ grad_points, int B, int H, int W, int C, int N) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * N) return;
    const long long b = i / N;
    int j0, j1, i0, i1;
    float tx, ty;
    axis_taps(points[2 * i], W, j0, j1, tx);
    axis_taps(points[2 * i + 1], H, i0, i1, ty);
    const long long base = b * H * W * C;
    const float* im = image + base;
    float* gim = grad_image + base;
    const long long r0 = (long long)i0 * W, r1 = (long long)i1 * W;
    const float w00 = (1.f - ty) * (1.f - tx), w01 = (1.f - ty) * tx, w10 = ty * (1.f - tx), w11 = ty * tx;
    float gx = 0.f, gy = 0.f;
    for (int c = 0; c < C; ++c) {
        const float g = grad_out[i * C + c];
        const float v00 = im[(r0 + j0) * C + c], v01 = im[(r0 + j1) * C + c];
        const float v10 = im[(r1 + j0) * C + c], v11 = im[(r1 + j1) * C + c];
        gx += g * ((1.f - ty) * (v01 - v00) + ty * (v11 - v10));
        gy += g * ((1.f - tx) * (v10 - v00) + tx * (v11 - v01));
        atomicAdd(gim + (r0 + j0) * C + c, w00 * g);
        atomicAdd(gim + (r0 + j1) * C + c, w01 * g);
        atomicAdd(gim + (r1 + j0) * C + c, w10 * g);
        atomicAdd(gim + (r1 + j1) * C + c, w11 * g);
    }
    grad_points[2 * i] = gx;
    grad_points[2 * i + 1] = gy;
}
