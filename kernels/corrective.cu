// The corrective regularizers of fastface/model/corrective.py (Tewari et al. CVPR 2018), forward and
// backward; the Numba twins are in that module (same names, same argument order; the sizes B, V, E
// at the end are the CUDA side's only extra arguments).
//
// Layout: offsets, albedo and gradients are (B, V, 3) float32, C-contiguous; a guide albedo is
// (B, V, 3), or (V, 3) shared by every image (guide_stride = 0). The mesh (CorrectiveMesh):
//   edges (E, 2) int32, i < j;
//   nbr_offsets (V + 1) int32 and nbrs (2E) int32: the CSR neighbour lists (each vertex's neighbours
//   ascending), so that a vertex's Laplacian is deg(v) o_v - sum_j o_j with deg(v) its list's length;
//   symmetry (V) int32: the mirror vertex of each vertex; mirror_offsets (V + 1) and mirrored_from (V):
//   the CSR of its inverse (the u with symmetry[u] == v), which the backward gathers from.
//
// Forward kernels (*_fwd): one block per image, FWD_THREADS threads striding over its vertices or
// edges, each summing its terms in double in a fixed order, then a shared-memory tree in a fixed
// order: the per-image value is deterministic, needs no atomics and no buffer beyond out (B).
// Why 1024 threads: with one block per image, a batch of 64 fills 64 SMs, and only a full block keeps
// enough loads in flight on each (32 warps; at 35,709 vertices each thread gathers ~35 vertices'
// neighbourhoods). More blocks per image would need a scratch buffer of partial sums and a second pass
// (or atomics, whose order is not fixed). At small batches the H200 is partly idle: a few microseconds.
//
// Backward kernels (*_bwd): one thread per (image, vertex), flat index b * V + v (consecutive threads,
// consecutive vertices: coalesced own reads and writes), each GATHERING its whole gradient from its
// neighbours (no atomics, deterministic, one kernel, no zeroed buffer). The smoothness backward
// recomputes the Laplacian at each neighbour (deg^2 ~ 36 gathers a vertex, all neighbours in L1/L2)
// rather than writing L o to a scratch buffer first.
//
// Memory safety: neighbour and mirror indices outside [0, V) are skipped.

#define FWD_THREADS 1024

struct V3 {
    float x, y, z;
};

__device__ __forceinline__ V3 load3(const float* __restrict__ p, long long i) {
    V3 r;
    r.x = p[3 * i];
    r.y = p[3 * i + 1];
    r.z = p[3 * i + 2];
    return r;
}

__device__ __forceinline__ void store3(float* __restrict__ p, long long i, float x, float y, float z) {
    p[3 * i] = x;
    p[3 * i + 1] = y;
    p[3 * i + 2] = z;
}

// The fixed-order block sum of one double per thread; thread 0 gets the total.
__device__ __forceinline__ double block_sum(double value) {
    __shared__ double partial[FWD_THREADS];
    partial[threadIdx.x] = value;
    __syncthreads();
    for (int stride = FWD_THREADS / 2; stride > 0; stride >>= 1) {
        if ((int)threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    return partial[0];
}

// (L o)_v = deg(v) o_v - sum of o over v's neighbours, of one image (ob points at its (V, 3) block).
__device__ __forceinline__ V3 laplacian_at(const float* __restrict__ ob, const int* __restrict__ nbr_offsets,
                                           const int* __restrict__ nbrs, int v, int V) {
    const V3 o = load3(ob, v);
    V3 s;
    s.x = 0.f;
    s.y = 0.f;
    s.z = 0.f;
    const int end = nbr_offsets[v + 1];
    for (int e = nbr_offsets[v]; e < end; ++e) {
        const int j = nbrs[e];
        if ((unsigned)j >= (unsigned)V) continue;
        const V3 n = load3(ob, j);
        s.x += o.x - n.x;
        s.y += o.y - n.y;
        s.z += o.z - n.z;
    }
    return s;
}

// ---------------------------------------------------------------------------------------------
// Smoothness: out[b] = sum_v ||(L o)_v||^2 / V.

extern "C" __global__ void __launch_bounds__(FWD_THREADS)
smoothness_fwd(const float* __restrict__ offsets, const int* __restrict__ nbr_offsets, const int* __restrict__ nbrs,
               float* __restrict__ out, int B, int V) {
    const int b = blockIdx.x;
    if (b >= B) return;
    const float* ob = offsets + (long long)b * V * 3;
    double acc = 0.0;
    for (int v = threadIdx.x; v < V; v += FWD_THREADS) {
        const V3 l = laplacian_at(ob, nbr_offsets, nbrs, v, V);
        acc += (double)l.x * l.x + (double)l.y * l.y + (double)l.z * l.z;
    }
    const double total = block_sum(acc);
    if (threadIdx.x == 0) out[b] = (float)(total / V);
}

// grad_v = (2 g_b / V) (L^T L o)_v, and L^T = L: deg(v) (L o)_v - sum_j (L o)_j over v's neighbours j.
extern "C" __global__ void smoothness_bwd(const float* __restrict__ offsets, const int* __restrict__ nbr_offsets,
                                          const int* __restrict__ nbrs, const float* __restrict__ grad_out,
                                          float* __restrict__ grad_offsets, int B, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const long long b = i / V;
    const int v = (int)(i - b * V);
    const float* ob = offsets + b * V * 3;
    const V3 lv = laplacian_at(ob, nbr_offsets, nbrs, v, V);
    float sx = 0.f, sy = 0.f, sz = 0.f;
    const int end = nbr_offsets[v + 1];
    for (int e = nbr_offsets[v]; e < end; ++e) {
        const int j = nbrs[e];
        if ((unsigned)j >= (unsigned)V) continue;
        const V3 lj = laplacian_at(ob, nbr_offsets, nbrs, j, V);
        sx += lv.x - lj.x;
        sy += lv.y - lj.y;
        sz += lv.z - lj.z;
    }
    const float scale = 2.f * grad_out[b] / (float)V;
    store3(grad_offsets, i, scale * sx, scale * sy, scale * sz);
}

// ---------------------------------------------------------------------------------------------
// Magnitude: out[b] = sum_v ||o_v||^2 / V.

extern "C" __global__ void __launch_bounds__(FWD_THREADS)
magnitude_fwd(const float* __restrict__ offsets, float* __restrict__ out, int B, int V) {
    const int b = blockIdx.x;
    if (b >= B) return;
    const float* ob = offsets + (long long)b * V * 3;
    double acc = 0.0;
    for (int k = threadIdx.x; k < 3 * V; k += FWD_THREADS) acc += (double)ob[k] * ob[k];
    const double total = block_sum(acc);
    if (threadIdx.x == 0) out[b] = (float)(total / V);
}

// grad = (2 g_b / V) o; one thread per float (B * V * 3 of them).
extern "C" __global__ void magnitude_bwd(const float* __restrict__ offsets, const float* __restrict__ grad_out,
                                         float* __restrict__ grad_offsets, int B, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V * 3) return;
    const long long b = i / (3LL * V);
    grad_offsets[i] = 2.f * grad_out[b] / (float)V * offsets[i];
}

// ---------------------------------------------------------------------------------------------
// Reflectance constancy: out[b] = sum over edges (i, j) of w_ij sqrt(||a_i - a_j||^2 + eps^2) / E, with
// w_ij = exp(-sharpness ||chroma(guide_i) - chroma(guide_j)||) and chroma(c) = max(c, 0) / max(sum of
// max(c, 0), chroma_eps) (the guide is a constant: no gradient flows to it).

__device__ __forceinline__ V3 chroma(const float* __restrict__ guide, long long i, float chroma_eps) {
    V3 c = load3(guide, i);
    c.x = fmaxf(c.x, 0.f);
    c.y = fmaxf(c.y, 0.f);
    c.z = fmaxf(c.z, 0.f);
    const float inv = 1.f / fmaxf(c.x + c.y + c.z, chroma_eps);
    c.x *= inv;
    c.y *= inv;
    c.z *= inv;
    return c;
}

__device__ __forceinline__ float edge_weight(const float* __restrict__ gb, int i, int j, float sharpness,
                                             float chroma_eps) {
    const V3 ci = chroma(gb, i, chroma_eps), cj = chroma(gb, j, chroma_eps);
    const float dx = ci.x - cj.x, dy = ci.y - cj.y, dz = ci.z - cj.z;
    return expf(-sharpness * sqrtf(dx * dx + dy * dy + dz * dz));
}

extern "C" __global__ void __launch_bounds__(FWD_THREADS)
reflectance_constancy_fwd(const float* __restrict__ albedo, const float* __restrict__ guide,
                          const int* __restrict__ edges, float* __restrict__ out, float sharpness, float eps,
                          float chroma_eps, long long guide_stride, int B, int V, int E) {
    const int b = blockIdx.x;
    if (b >= B) return;
    const float* ab = albedo + (long long)b * V * 3;
    const float* gb = guide + b * guide_stride;
    double acc = 0.0;
    for (int e = threadIdx.x; e < E; e += FWD_THREADS) {
        const int i = edges[2 * e], j = edges[2 * e + 1];
        if ((unsigned)i >= (unsigned)V || (unsigned)j >= (unsigned)V) continue;
        const V3 ai = load3(ab, i), aj = load3(ab, j);
        const float dx = ai.x - aj.x, dy = ai.y - aj.y, dz = ai.z - aj.z;
        const float r = sqrtf(dx * dx + dy * dy + dz * dz + eps * eps);
        acc += (double)(edge_weight(gb, i, j, sharpness, chroma_eps) * r);
    }
    const double total = block_sum(acc);
    if (threadIdx.x == 0) out[b] = (float)(total / E);
}

// grad_v = (g_b / E) sum over v's neighbours j of w_vj (a_v - a_j) / sqrt(||a_v - a_j||^2 + eps^2):
// every edge appears in the lists of both its vertices, so each vertex gathers its own share.
extern "C" __global__ void reflectance_constancy_bwd(const float* __restrict__ albedo, const float* __restrict__ guide,
                                                     const int* __restrict__ nbr_offsets,
                                                     const int* __restrict__ nbrs, const float* __restrict__ grad_out,
                                                     float* __restrict__ grad_albedo, float sharpness, float eps,
                                                     float chroma_eps, long long guide_stride, int B, int V, int E) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const long long b = i / V;
    const int v = (int)(i - b * V);
    const float* ab = albedo + b * V * 3;
    const float* gb = guide + b * guide_stride;
    const V3 av = load3(ab, v);
    float sx = 0.f, sy = 0.f, sz = 0.f;
    const int end = nbr_offsets[v + 1];
    for (int e = nbr_offsets[v]; e < end; ++e) {
        const int j = nbrs[e];
        if ((unsigned)j >= (unsigned)V) continue;
        const V3 aj = load3(ab, j);
        const float dx = av.x - aj.x, dy = av.y - aj.y, dz = av.z - aj.z;
        const float r = sqrtf(dx * dx + dy * dy + dz * dz + eps * eps);
        // The weight of edge (min, max), computed in the forward's argument order.
        const float w = v < j ? edge_weight(gb, v, j, sharpness, chroma_eps) : edge_weight(gb, j, v, sharpness,
                                                                                            chroma_eps);
        const float f = w / r;
        sx += f * dx;
        sy += f * dy;
        sz += f * dz;
    }
    const float scale = grad_out[b] / (float)E;
    store3(grad_albedo, i, scale * sx, scale * sy, scale * sz);
}

// ---------------------------------------------------------------------------------------------
// Symmetry: out[b] = sum_v ||o_v - M o_s(v)||^2 / V, s the symmetry map, M = diag(-1, 1, 1) when
// mirror_x (geometry offsets mirror across x = 0), else the identity (reflectance).

__device__ __forceinline__ V3 symmetry_residual(const float* __restrict__ ob, const int* __restrict__ symmetry,
                                                int v, int V, float mx) {
    V3 d = load3(ob, v);
    const int s = symmetry[v];
    if ((unsigned)s < (unsigned)V) {
        const V3 o = load3(ob, s);
        d.x -= mx * o.x;
        d.y -= o.y;
        d.z -= o.z;
    }
    return d;
}

extern "C" __global__ void __launch_bounds__(FWD_THREADS)
symmetry_fwd(const float* __restrict__ offsets, const int* __restrict__ symmetry, float* __restrict__ out,
             int mirror_x, int B, int V) {
    const int b = blockIdx.x;
    if (b >= B) return;
    const float* ob = offsets + (long long)b * V * 3;
    const float mx = mirror_x ? -1.f : 1.f;
    double acc = 0.0;
    for (int v = threadIdx.x; v < V; v += FWD_THREADS) {
        const V3 d = symmetry_residual(ob, symmetry, v, V, mx);
        acc += (double)d.x * d.x + (double)d.y * d.y + (double)d.z * d.z;
    }
    const double total = block_sum(acc);
    if (threadIdx.x == 0) out[b] = (float)(total / V);
}

// grad_v = (2 g_b / V) (d_v - sum over the u with s(u) = v of M d_u), d_u = o_u - M o_s(u).
extern "C" __global__ void symmetry_bwd(const float* __restrict__ offsets, const int* __restrict__ symmetry,
                                        const int* __restrict__ mirror_offsets, const int* __restrict__ mirrored_from,
                                        const float* __restrict__ grad_out, float* __restrict__ grad_offsets,
                                        int mirror_x, int B, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const long long b = i / V;
    const int v = (int)(i - b * V);
    const float* ob = offsets + b * V * 3;
    const float mx = mirror_x ? -1.f : 1.f;
    V3 g = symmetry_residual(ob, symmetry, v, V, mx);
    const int end = mirror_offsets[v + 1];
    for (int e = mirror_offsets[v]; e < end; ++e) {
        const int u = mirrored_from[e];
        if ((unsigned)u >= (unsigned)V) continue;
        const V3 d = symmetry_residual(ob, symmetry, u, V, mx);
        g.x -= mx * d.x;
        g.y -= d.y;
        g.z -= d.z;
    }
    const float scale = 2.f * grad_out[b] / (float)V;
    store3(grad_offsets, i, scale * g.x, scale * g.y, scale * g.z);
}
