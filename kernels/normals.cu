// Area-weighted unit vertex normals over a CSR vertex->triangle adjacency; the Numba twins are in
// fastface/ops/normals.py (same names, same argument order, plus B and V here).
//
// Layout: vertices, normals and gradients are (B, V, 3) V32, C-contiguous. offsets is (V + 1)
// int32, corners is (E, 2) int32: for each (vertex, triangle) entry the triangle's next and previous
// vertex counter-clockwise from the vertex. The face normal seen from corner c with next a and
// previous b is (p_a - p_c) x (p_b - p_c), the same vector from each corner of the triangle.
//
// Why one thread per vertex gathering its faces rather than one thread per face scattering with
// atomicAdd: each vertex's sum is made by one thread in a fixed order (deterministic, no atomics),
// the forward is a single kernel (the scatter needs a zeroed buffer, the scatter and a normalise
// pass), and the gathered positions are neighbours in the mesh, so they hit L1/L2. Each face normal
// is recomputed at its three corners: a few FMAs more per vertex, which this memory-bound op hides.
//
// Memory safety: corner indices outside [0, V) are skipped, whatever the host-side checks did.

// A plain struct rather than CUDA's float3, so that nothing depends on the vector-type headers
// (NVRTC, which CuPy uses, and nvcc provide them differently).
struct V3 {
    float x, y, z;
};

__device__ __forceinline__ V3 v3(float x, float y, float z) {
    V3 r;
    r.x = x;
    r.y = y;
    r.z = z;
    return r;
}

__device__ __forceinline__ V3 load_point(const float* __restrict__ p, int i) {
    return v3(p[3 * i], p[3 * i + 1], p[3 * i + 2]);
}

__device__ __forceinline__ V3 cross3(V3 a, V3 b) {
    return v3(a.y * b.z - a.z * b.y, a.z * b.x - a.x * b.z, a.x * b.y - a.y * b.x);
}

__device__ __forceinline__ V3 sub3(V3 a, V3 b) {
    return v3(a.x - b.x, a.y - b.y, a.z - b.z);
}

// The sum of the face normals around vertex v of one batch element (vb points at its (V, 3) block).
__device__ __forceinline__ V3 summed_normal(const float* __restrict__ vb, const int* __restrict__ offsets,
                                                const int* __restrict__ corners, int v, int V) {
    const V3 p = load_point(vb, v);
    V3 s = v3(0.f, 0.f, 0.f);
    const int end = offsets[v + 1];
    for (int e = offsets[v]; e < end; ++e) {
        const int a = corners[2 * e], c = corners[2 * e + 1];
        if ((unsigned)a >= (unsigned)V || (unsigned)c >= (unsigned)V) continue;
        const V3 n = cross3(sub3(load_point(vb, a), p), sub3(load_point(vb, c), p));
        s.x += n.x;
        s.y += n.y;
        s.z += n.z;
    }
    return s;
}

// One thread per (batch, vertex), flat index b * V + v, so that consecutive threads read
// consecutive vertices (coalesced own reads and writes). Writes the unit normal, or zero where the
// summed face normal is zero.
extern "C" __global__ void vertex_normals_fwd(const float* __restrict__ vertices, const int* __restrict__ offsets,
                                              const int* __restrict__ corners, float* __restrict__ normals,
                                              int B, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const long long b = i / V;
    const int v = (int)(i - b * V);
    const V3 s = summed_normal(vertices + b * V * 3, offsets, corners, v, V);
    const float len2 = s.x * s.x + s.y * s.y + s.z * s.z;
    const float inv = len2 > 0.f ? 1.f / sqrtf(len2) : 0.f;
    normals[3 * i] = s.x * inv;
    normals[3 * i + 1] = s.y * inv;
    normals[3 * i + 2] = s.z * inv;
}

// Backward pass 1, one thread per (batch, vertex): recomputes the summed normal s and writes the
// gradient with respect to it, (g - n (n.g)) / |s| (zero where s is zero).
extern "C" __global__ void vertex_normals_bwd_sum(const float* __restrict__ vertices,
                                                  const int* __restrict__ offsets,
                                                  const int* __restrict__ corners,
                                                  const float* __restrict__ grad_out,
                                                  float* __restrict__ grad_sum, int B, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const long long b = i / V;
    const int v = (int)(i - b * V);
    const V3 s = summed_normal(vertices + b * V * 3, offsets, corners, v, V);
    const float len2 = s.x * s.x + s.y * s.y + s.z * s.z;
    const float inv = len2 > 0.f ? 1.f / sqrtf(len2) : 0.f;
    const V3 n = v3(s.x * inv, s.y * inv, s.z * inv);
    const float gx = grad_out[3 * i], gy = grad_out[3 * i + 1], gz = grad_out[3 * i + 2];
    const float ndotg = n.x * gx + n.y * gy + n.z * gz;
    grad_sum[3 * i] = (gx - n.x * ndotg) * inv;
    grad_sum[3 * i + 1] = (gy - n.y * ndotg) * inv;
    grad_sum[3 * i + 2] = (gz - n.z * ndotg) * inv;
}

// Backward pass 2, one thread per (batch, vertex): for each triangle around the vertex, with G the
// sum of the pass-1 gradients at its three corners, adds (p_a - p_b) x G. Every vertex's gradient
// is made by one thread, in triangle order: deterministic, no atomics.
extern "C" __global__ void vertex_normals_bwd(const float* __restrict__ vertices, const int* __restrict__ offsets,
                                              const int* __restrict__ corners, const float* __restrict__ grad_sum,
                                              float* __restrict__ grad_vertices, int B, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const long long b = i / V;
    const int v = (int)(i - b * V);
    const float* vb = vertices + b * V * 3;
    const float* gb = grad_sum + b * V * 3;
    const V3 h = load_point(gb, v);
    V3 r = v3(0.f, 0.f, 0.f);
    const int end = offsets[v + 1];
    for (int e = offsets[v]; e < end; ++e) {
        const int a = corners[2 * e], c = corners[2 * e + 1];
        if ((unsigned)a >= (unsigned)V || (unsigned)c >= (unsigned)V) continue;
        const V3 ga = load_point(gb, a), gc = load_point(gb, c);
        const V3 G = v3(h.x + ga.x + gc.x, h.y + ga.y + gc.y, h.z + ga.z + gc.z);
        const V3 d = cross3(sub3(load_point(vb, a), load_point(vb, c)), G);
        r.x += d.x;
        r.y += d.y;
        r.z += d.z;
    }
    grad_vertices[3 * i] = r.x;
    grad_vertices[3 * i + 1] = r.y;
    grad_vertices[3 * i + 2] = r.z;
}

// ---------------------------------------------------------------------------------------------
// Staged variants (fastface.ops.normals.NORMALS_KERNEL = "staged"): the same per-vertex sums in
// the same order, with the memory traffic reorganised. The kernels above
// issue ~50 load instructions per vertex, most of them 12-byte-strided scalar gathers of the
// neighbours' coordinates: the L1 load pipeline, not DRAM, bounds them. Here a block of
// STAGE_NB threads serves the vertices [v0, v0 + STAGE_NB) of batch element blockIdx.y and first
// copies the positions of [v0 - STAGE_HALO, v0 + STAGE_NB + STAGE_HALO) (clamped to [0, V)) into
// shared memory with coalesced contiguous float loads; neighbours inside that window are read from
// shared memory, the others (far-apart indices in the mesh's ordering) from global memory as
// before, so any topology works. Per-vertex outputs (and own inputs such as grad_out) also go
// through shared memory so that the global accesses are contiguous runs of floats. Corner pairs
// are read as one 8-byte load. Launch: grid (ceil(V / STAGE_NB), B), block STAGE_NB.
constexpr int STAGE_NB = 256;    // vertices (threads) per block
constexpr int STAGE_HALO = 192;  // staged neighbours either side (a 189-wide grid's rows fit)
constexpr int STAGE_WINDOW = STAGE_NB + 2 * STAGE_HALO;

struct __align__(8) Corners {
    int a, c;
};

// Copies floats [3 w0, 3 w1) of src into dst (contiguous, coalesced). Every thread must call it.
__device__ __forceinline__ void stage_floats(const float* __restrict__ src, int w0, int w1, float* dst) {
    const float* s = src + 3LL * w0;
    const int count = 3 * (w1 - w0);
    for (int i = threadIdx.x; i < count; i += blockDim.x) dst[i] = s[i];
}

// Point a of one batch element: from the staged window [w0, w1) when inside it, else global.
__device__ __forceinline__ V3 fetch_point(const float* win, const float* __restrict__ g, int w0, int w1, int a) {
    if (a >= w0 && a < w1) {
        const float* q = win + 3 * (a - w0);
        return v3(q[0], q[1], q[2]);
    }
    return load_point(g, a);
}

__device__ __forceinline__ V3 summed_normal_staged(const float* win, const float* __restrict__ vb, int w0, int w1,
                                                   const int* __restrict__ offsets, const int* __restrict__ corners,
                                                   int v, int V) {
    const V3 p = fetch_point(win, vb, w0, w1, v);
    V3 s = v3(0.f, 0.f, 0.f);
    const Corners* pairs = reinterpret_cast<const Corners*>(corners);
    const int end = offsets[v + 1];
    for (int e = offsets[v]; e < end; ++e) {
        const Corners ac = pairs[e];
        if ((unsigned)ac.a >= (unsigned)V || (unsigned)ac.c >= (unsigned)V) continue;
        const V3 n = cross3(sub3(fetch_point(win, vb, w0, w1, ac.a), p), sub3(fetch_point(win, vb, w0, w1, ac.c), p));
        s.x += n.x;
        s.y += n.y;
        s.z += n.z;
    }
    return s;
}

// Writes the block's staged outputs out_s[0, 3 * count) to dst[3 v0, ...) contiguously.
__device__ __forceinline__ void store_floats(const float* out_s, float* __restrict__ dst, int count) {
    for (int i = threadIdx.x; i < 3 * count; i += blockDim.x) dst[i] = out_s[i];
}

extern "C" __global__ void __launch_bounds__(STAGE_NB) vertex_normals_fwd_staged(
    const float* __restrict__ vertices, const int* __restrict__ offsets, const int* __restrict__ corners,
    float* __restrict__ normals, int B, int V) {
    __shared__ float win[3 * STAGE_WINDOW];
    __shared__ float out_s[3 * STAGE_NB];
    const int b = blockIdx.y, v0 = blockIdx.x * STAGE_NB, v = v0 + threadIdx.x;
    if (b >= B || v0 >= V) return;  // uniform per block
    const int w0 = max(0, v0 - STAGE_HALO), w1 = min(V, v0 + STAGE_NB + STAGE_HALO);
    const float* vb = vertices + (long long)b * V * 3;
    stage_floats(vb, w0, w1, win);
    __syncthreads();
    if (v < V) {
        const V3 s = summed_normal_staged(win, vb, w0, w1, offsets, corners, v, V);
        const float len2 = s.x * s.x + s.y * s.y + s.z * s.z;
        const float inv = len2 > 0.f ? 1.f / sqrtf(len2) : 0.f;
        out_s[3 * threadIdx.x] = s.x * inv;
        out_s[3 * threadIdx.x + 1] = s.y * inv;
        out_s[3 * threadIdx.x + 2] = s.z * inv;
    }
    __syncthreads();
    store_floats(out_s, normals + ((long long)b * V + v0) * 3, min(STAGE_NB, V - v0));
}

extern "C" __global__ void __launch_bounds__(STAGE_NB) vertex_normals_bwd_sum_staged(
    const float* __restrict__ vertices, const int* __restrict__ offsets, const int* __restrict__ corners,
    const float* __restrict__ grad_out, float* __restrict__ grad_sum, int B, int V) {
    __shared__ float win[3 * STAGE_WINDOW];
    __shared__ float io_s[3 * STAGE_NB];  // grad_out in, grad_sum out (each thread its own 3 floats)
    const int b = blockIdx.y, v0 = blockIdx.x * STAGE_NB, v = v0 + threadIdx.x;
    if (b >= B || v0 >= V) return;
    const int w0 = max(0, v0 - STAGE_HALO), w1 = min(V, v0 + STAGE_NB + STAGE_HALO);
    const int count = min(STAGE_NB, V - v0);
    const float* vb = vertices + (long long)b * V * 3;
    stage_floats(vb, w0, w1, win);
    stage_floats(grad_out + (long long)b * V * 3, v0, v0 + count, io_s);
    __syncthreads();
    if (v < V) {
        const V3 s = summed_normal_staged(win, vb, w0, w1, offsets, corners, v, V);
        const float len2 = s.x * s.x + s.y * s.y + s.z * s.z;
        const float inv = len2 > 0.f ? 1.f / sqrtf(len2) : 0.f;
        const V3 n = v3(s.x * inv, s.y * inv, s.z * inv);
        float* g = io_s + 3 * threadIdx.x;
        const float gx = g[0], gy = g[1], gz = g[2];
        const float ndotg = n.x * gx + n.y * gy + n.z * gz;
        g[0] = (gx - n.x * ndotg) * inv;
        g[1] = (gy - n.y * ndotg) * inv;
        g[2] = (gz - n.z * ndotg) * inv;
    }
    __syncthreads();
    store_floats(io_s, grad_sum + ((long long)b * V + v0) * 3, count);
}

extern "C" __global__ void __launch_bounds__(STAGE_NB) vertex_normals_bwd_staged(
    const float* __restrict__ vertices, const int* __restrict__ offsets, const int* __restrict__ corners,
    const float* __restrict__ grad_sum, float* __restrict__ grad_vertices, int B, int V) {
    __shared__ float win[3 * STAGE_WINDOW];
    __shared__ float gwin[3 * STAGE_WINDOW];
    __shared__ float out_s[3 * STAGE_NB];
    const int b = blockIdx.y, v0 = blockIdx.x * STAGE_NB, v = v0 + threadIdx.x;
    if (b >= B || v0 >= V) return;
    const int w0 = max(0, v0 - STAGE_HALO), w1 = min(V, v0 + STAGE_NB + STAGE_HALO);
    const float* vb = vertices + (long long)b * V * 3;
    const float* gb = grad_sum + (long long)b * V * 3;
    stage_floats(vb, w0, w1, win);
    stage_floats(gb, w0, w1, gwin);
    __syncthreads();
    if (v < V) {
        const V3 h = fetch_point(gwin, gb, w0, w1, v);
        V3 r = v3(0.f, 0.f, 0.f);
        const Corners* pairs = reinterpret_cast<const Corners*>(corners);
        const int end = offsets[v + 1];
        for (int e = offsets[v]; e < end; ++e) {
            const Corners ac = pairs[e];
            if ((unsigned)ac.a >= (unsigned)V || (unsigned)ac.c >= (unsigned)V) continue;
            const V3 ga = fetch_point(gwin, gb, w0, w1, ac.a), gc = fetch_point(gwin, gb, w0, w1, ac.c);
            const V3 G = v3(h.x + ga.x + gc.x, h.y + ga.y + gc.y, h.z + ga.z + gc.z);
            const V3 d = cross3(sub3(fetch_point(win, vb, w0, w1, ac.a), fetch_point(win, vb, w0, w1, ac.c)), G);
            r.x += d.x;
            r.y += d.y;
            r.z += d.z;
        }
        out_s[3 * threadIdx.x] = r.x;
        out_s[3 * threadIdx.x + 1] = r.y;
        out_s[3 * threadIdx.x + 2] = r.z;
    }
    __syncthreads();
    store_floats(out_s, grad_vertices + ((long long)b * V + v0) * 3, min(STAGE_NB, V - v0));
}
