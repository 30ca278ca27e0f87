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
// Forward (*_fwd, then sum_partials): a deterministic two-pass reduction. Pass 1, a 1-D grid of
// B * chunks blocks of FWD_THREADS threads, block k = b * chunks + c: the block sums the terms of
// image b's chunk c, the FWD_CHUNK vertices (or edges) [c * FWD_CHUNK, (c + 1) * FWD_CHUNK), each
// thread in double over a fixed stride, then a fixed-order warp-shuffle tree and a fixed-order sum of
// the warps' totals, into partial[k] (a (B, chunks) float64 scratch the Python side allocates).
// Pass 2, sum_partials: one thread per image adds its chunks' partials in chunk order and writes
// out[b] = (float)(sum / n), n = V or E. Every sum has a fixed order and FWD_CHUNK is a constant (not
// derived from the GPU), so the result is the same bits run to run, and no atomics are needed.
// Why: with one 1024-thread block per image, a batch of 64 filled 64 of the H200's 132 SMs, each
// block a long latency-bound gather loop (Nsight Compute, batch 64, V = 34,737, E = 103,477, device
// microseconds: reflectance_constancy_fwd 137.9, smoothness_fwd 47.5, symmetry_fwd 16.8,
// magnitude_fwd 11.3). With FWD_CHUNK = 2048 and 256 threads (8 vertices or edges a thread; 24 floats
// in magnitude_fwd), batch 64 launches 1,088 blocks over the vertices and 3,264 over the edges, and
// batch 1 still 17 and 51 (grid.x, no 65,535 limit on the batch).
//
// Backward (*_bwd): one thread per (image, vertex), flat index b * V + v (consecutive threads,
// consecutive vertices: coalesced own reads and writes), each GATHERING its whole gradient from its
// neighbours: no atomics, deterministic, no zeroed buffer. `accumulate` (0 or 1) makes each thread ADD
// its gradient into grad (grad[i] += value) instead of writing it, so that the caller sums several
// regularizers' gradients into one buffer without a full-size add each (six such adds at batch 64 cost
// 204 us). The smoothness backward is two kernels: smoothness_laplacian writes (L o)_v of every vertex
// into a (B, V, 3) float32 scratch (the float32 values the gather used to recompute), then
// smoothness_bwd gathers (L^T L o)_v = deg(v) (L o)_v - sum_j (L o)_j from it: deg + 1 reads a vertex
// instead of recomputing the Laplacian at every neighbour (deg^2 ~ 36 gathers; 117.6 us at batch 64).
//
// Memory safety: neighbour and mirror indices outside [0, V) are skipped.

#define FWD_THREADS 256
#define FWD_CHUNK 2048

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

// Writes (accumulate == 0) or adds (accumulate != 0) one vertex's gradient.
__device__ __forceinline__ void put3(float* __restrict__ p, long long i, float x, float y, float z, int accumulate) {
    if (accumulate) {
        x += p[3 * i];
        y += p[3 * i + 1];
        z += p[3 * i + 2];
    }
    p[3 * i] = x;
    p[3 * i + 1] = y;
    p[3 * i + 2] = z;
}

// Pass 1's block: image b and its chunk [begin, end) of n vertices or edges, from the flat block index.
struct Chunk {
    long long block;  // b * chunks + c: where the partial goes
    long long b;
    int begin, end;
};

__device__ __forceinline__ Chunk chunk_of_block(int n) {
    const int chunks = (n + FWD_CHUNK - 1) / FWD_CHUNK;
    Chunk k;
    k.block = blockIdx.x;
    k.b = k.block / chunks;
    const int c = (int)(k.block - k.b * chunks);
    k.begin = c * FWD_CHUNK;
    k.end = min(k.begin + FWD_CHUNK, n);
    return k;
}

// The fixed-order sum of one double per thread of a FWD_THREADS block: a shuffle tree in each warp,
// then thread 0 adds the warps' totals in warp order. Only thread 0's result is the block's total.
// Every thread of the block must call it.
__device__ __forceinline__ double block_sum(double value) {
    __shared__ double warp_total[FWD_THREADS / 32];
    for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
    if ((threadIdx.x & 31) == 0) warp_total[threadIdx.x >> 5] = value;
    __syncthreads();
    double total = 0.0;
    if (threadIdx.x == 0) {
        for (int w = 0; w < FWD_THREADS / 32; ++w) total += warp_total[w];
    }
    return total;
}

// Pass 2 of every forward: out[b] = (sum over c of partial[b, c], in chunk order) / n; one thread per image.
extern "C" __global__ void sum_partials(const double* __restrict__ partial, float* __restrict__ out, int B,
                                        int chunks, int n) {
    const int b = blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= B) return;
    const double* p = partial + (long long)b * chunks;
    double total = 0.0;
    for (int c = 0; c < chunks; ++c) total += p[c];
    out[b] = (float)(total / n);
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
               double* __restrict__ partial, int B, int V) {
    const Chunk k = chunk_of_block(V);
    if (k.b >= B) return;  // the whole block (a grid of exactly B * chunks blocks never takes it)
    const float* ob = offsets + k.b * V * 3;
    double acc = 0.0;
    for (int v = k.begin + (int)threadIdx.x; v < k.end; v += FWD_THREADS) {
        const V3 l = laplacian_at(ob, nbr_offsets, nbrs, v, V);
        acc += (double)l.x * l.x + (double)l.y * l.y + (double)l.z * l.z;
    }
    const double total = block_sum(acc);
    if (threadIdx.x == 0) partial[k.block] = total;
}

// The backward's first pass: lap[b, v] = (L o)_v, one thread per (image, vertex).
extern "C" __global__ void smoothness_laplacian(const float* __restrict__ offsets, const int* __restrict__ nbr_offsets,
                                                const int* __restrict__ nbrs, float* __restrict__ lap, int B, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const long long b = i / V;
    const int v = (int)(i - b * V);
    const V3 l = laplacian_at(offsets + b * V * 3, nbr_offsets, nbrs, v, V);
    put3(lap, i, l.x, l.y, l.z, 0);
}

// grad_v = (2 g_b / V) (L^T L o)_v, and L^T = L: deg(v) (L o)_v - sum_j (L o)_j over v's neighbours j,
// read from smoothness_laplacian's lap.
extern "C" __global__ void smoothness_bwd(const float* __restrict__ lap, const int* __restrict__ nbr_offsets,
                                          const int* __restrict__ nbrs, const float* __restrict__ grad_out,
                                          float* __restrict__ grad_offsets, int accumulate, int B, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const long long b = i / V;
    const int v = (int)(i - b * V);
    const float* lb = lap + b * V * 3;
    const V3 lv = load3(lb, v);
    float sx = 0.f, sy = 0.f, sz = 0.f;
    const int end = nbr_offsets[v + 1];
    for (int e = nbr_offsets[v]; e < end; ++e) {
        const int j = nbrs[e];
        if ((unsigned)j >= (unsigned)V) continue;
        const V3 lj = load3(lb, j);
        sx += lv.x - lj.x;
        sy += lv.y - lj.y;
        sz += lv.z - lj.z;
    }
    const float scale = 2.f * grad_out[b] / (float)V;
    put3(grad_offsets, i, scale * sx, scale * sy, scale * sz, accumulate);
}

// ---------------------------------------------------------------------------------------------
// Magnitude: out[b] = sum_v ||o_v||^2 / V.

extern "C" __global__ void __launch_bounds__(FWD_THREADS)
magnitude_fwd(const float* __restrict__ offsets, double* __restrict__ partial, int B, int V) {
    const Chunk k = chunk_of_block(V);
    if (k.b >= B) return;
    const float* ob = offsets + k.b * V * 3;
    double acc = 0.0;  // the chunk's 3 * FWD_CHUNK floats, consecutive threads on consecutive floats
    for (int f = 3 * k.begin + (int)threadIdx.x; f < 3 * k.end; f += FWD_THREADS) acc += (double)ob[f] * ob[f];
    const double total = block_sum(acc);
    if (threadIdx.x == 0) partial[k.block] = total;
}

// grad = (2 g_b / V) o; one thread per float (B * V * 3 of them).
extern "C" __global__ void magnitude_bwd(const float* __restrict__ offsets, const float* __restrict__ grad_out,
                                         float* __restrict__ grad_offsets, int accumulate, int B, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V * 3) return;
    const long long b = i / (3LL * V);
    const float g = 2.f * grad_out[b] / (float)V * offsets[i];
    grad_offsets[i] = accumulate ? grad_offsets[i] + g : g;
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
    const float inv = 1.f / fmaxf(c.x + c.y + c.z, chroma_eps);  // one reciprocal, three products
    c.x *= inv;
    c.y *= inv;
    c.z *= inv;
    return c;
}

// The weight of edge (i, j), i < j. sharpness == 0 (every weight 1) skips the guide: a uniform branch.
__device__ __forceinline__ float edge_weight(const float* __restrict__ gb, int i, int j, float sharpness,
                                             float chroma_eps) {
    if (sharpness == 0.f) return 1.f;
    const V3 ci = chroma(gb, i, chroma_eps), cj = chroma(gb, j, chroma_eps);
    const float dx = ci.x - cj.x, dy = ci.y - cj.y, dz = ci.z - cj.z;
    return expf(-sharpness * sqrtf(dx * dx + dy * dy + dz * dz));
}

extern "C" __global__ void __launch_bounds__(FWD_THREADS)
reflectance_constancy_fwd(const float* __restrict__ albedo, const float* __restrict__ guide,
                          const int* __restrict__ edges, double* __restrict__ partial, float sharpness, float eps,
                          float chroma_eps, long long guide_stride, int B, int V, int E) {
    const Chunk k = chunk_of_block(E);
    if (k.b >= B) return;
    const float* ab = albedo + k.b * V * 3;
    const float* gb = guide + k.b * guide_stride;
    const float eps2 = eps * eps;
    double acc = 0.0;
    for (int e = k.begin + (int)threadIdx.x; e < k.end; e += FWD_THREADS) {
        const int i = edges[2 * e], j = edges[2 * e + 1];
        if ((unsigned)i >= (unsigned)V || (unsigned)j >= (unsigned)V) continue;
        const V3 ai = load3(ab, i), aj = load3(ab, j);
        const float dx = ai.x - aj.x, dy = ai.y - aj.y, dz = ai.z - aj.z;
        const float r = sqrtf(dx * dx + dy * dy + dz * dz + eps2);
        acc += (double)(edge_weight(gb, i, j, sharpness, chroma_eps) * r);
    }
    const double total = block_sum(acc);
    if (threadIdx.x == 0) partial[k.block] = total;
}

// grad_v = (g_b / E) sum over v's neighbours j of w_vj (a_v - a_j) / sqrt(||a_v - a_j||^2 + eps^2):
// every edge appears in the lists of both its vertices, so each vertex gathers its own share.
extern "C" __global__ void reflectance_constancy_bwd(const float* __restrict__ albedo, const float* __restrict__ guide,
                                                     const int* __restrict__ nbr_offsets,
                                                     const int* __restrict__ nbrs, const float* __restrict__ grad_out,
                                                     float* __restrict__ grad_albedo, int accumulate, float sharpness,
                                                     float eps, float chroma_eps, long long guide_stride, int B, int V,
                                                     int E) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)B * V) return;
    const long long b = i / V;
    const int v = (int)(i - b * V);
    const float* ab = albedo + b * V * 3;
    const float* gb = guide + b * guide_stride;
    const V3 av = load3(ab, v);
    const float eps2 = eps * eps;
    float sx = 0.f, sy = 0.f, sz = 0.f;
    const int end = nbr_offsets[v + 1];
    for (int e = nbr_offsets[v]; e < end; ++e) {
        const int j = nbrs[e];
        if ((unsigned)j >= (unsigned)V) continue;
        const V3 aj = load3(ab, j);
        const float dx = av.x - aj.x, dy = av.y - aj.y, dz = av.z - aj.z;
        const float r = sqrtf(dx * dx + dy * dy + dz * dz + eps2);
        // The weight of edge (min, max), computed in the forward's argument order.
        const float w = v < j ? edge_weight(gb, v, j, sharpness, chroma_eps) : edge_weight(gb, j, v, sharpness,
                                                                                            chroma_eps);
        const float f = w / r;
        sx += f * dx;
        sy += f * dy;
        sz += f * dz;
    }
    const float scale = grad_out[b] / (float)E;
    put3(grad_albedo, i, scale * sx, scale * sy, scale * sz, accumulate);
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
symmetry_fwd(const float* __restrict__ offsets, const int* __restrict__ symmetry, double* __restrict__ partial,
             int mirror_x, int B, int V) {
    const Chunk k = chunk_of_block(V);
    if (k.b >= B) return;
    const float* ob = offsets + k.b * V * 3;
    const float mx = mirror_x ? -1.f : 1.f;
    double acc = 0.0;
    for (int v = k.begin + (int)threadIdx.x; v < k.end; v += FWD_THREADS) {
        const V3 d = symmetry_residual(ob, symmetry, v, V, mx);
        acc += (double)d.x * d.x + (double)d.y * d.y + (double)d.z * d.z;
    }
    const double total = block_sum(acc);
    if (threadIdx.x == 0) partial[k.block] = total;
}

// grad_v = (2 g_b / V) (d_v - sum over the u with s(u) = v of M d_u), d_u = o_u - M o_s(u).
extern "C" __global__ void symmetry_bwd(const float* __restrict__ offsets, const int* __restrict__ symmetry,
                                        const int* __restrict__ mirror_offsets, const int* __restrict__ mirrored_from,
                                        const float* __restrict__ grad_out, float* __restrict__ grad_offsets,
                                        int accumulate, int mirror_x, int B, int V) {
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
    put3(grad_offsets, i, scale * g.x, scale * g.y, scale * g.z, accumulate);
}
