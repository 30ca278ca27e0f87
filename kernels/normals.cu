// Area-weighted unit vertex normals over a CSR vertex->triangle adjacency, and (at the end) the
// adjacency's build; the Numba twins are in fastface/ops/normals.py (same names, same argument
// order, plus the sizes B, V, T here).
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
//
// Tried and removed: "staged" kernels that first copied a block's vertices and a 192-vertex halo
// into shared memory with contiguous loads measured slower on an H200 (64 x 35,721 vertices:
// forward 62 vs 45 us, backward 168 vs 109 us).

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

// 1 / |s|, or 0 where s is zero.
__device__ __forceinline__ float inverse_length(V3 s) {
    const float len2 = s.x * s.x + s.y * s.y + s.z * s.z;
    return len2 > 0.f ? 1.f / sqrtf(len2) : 0.f;
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
    const float inv = inverse_length(s);
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
    const float inv = inverse_length(s);
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
// The CSR adjacency itself (vertex_adjacency in fastface/ops/normals.py), built without a sort of
// all entries and without a host synchronisation (a device-wide sort waits for the host, and
// cannot be recorded in a CUDA graph):
//   1. vertex_adjacency_count: counts[k] = the number of (triangle, corner) entries with key k;
//   2. an inclusive scan of counts in place (cupy.cumsum): counts[k] = the end of segment k;
//   3. vertex_adjacency_scatter: each entry takes a slot of its segment with an atomic decrement
//      of that end, which leaves counts[k] = the start of segment k: the offsets;
//   4. vertex_adjacency_sort: one thread per segment puts its entries back in triangle order.
// An entry's key is its corner's vertex, or V for all three entries of a triangle with an index
// outside [0, V): those form a last segment past offsets[V], where nothing reads them. The slots
// the atomics hand out depend on thread timing; step 4 makes the result deterministic and equal
// to the CPU's (a stable order: entry index 3 t + c ascending within each segment).
// Layout: tri (T, 3) int32; counts / offsets (V + 1) int32; corners (3 T, 2) int32, whose first
// column holds the entry index 3 t + c between steps 3 and 4. 3 T < 2^31 (checked by the caller).

// Whether all three indices of a triangle lie in [0, V) (one unsigned compare catches negatives).
__device__ __forceinline__ bool triangle_is_valid(int i0, int i1, int i2, int V) {
    return (unsigned)i0 < (unsigned)V && (unsigned)i1 < (unsigned)V && (unsigned)i2 < (unsigned)V;
}

// Step 1, one thread per triangle. counts must be zeroed by the caller.
extern "C" __global__ void vertex_adjacency_count(const int* __restrict__ tri, int* __restrict__ counts, int T,
                                                  int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T) return;
    const int i0 = tri[3 * i], i1 = tri[3 * i + 1], i2 = tri[3 * i + 2];
    if (triangle_is_valid(i0, i1, i2, V)) {
        atomicAdd(&counts[i0], 1);
        atomicAdd(&counts[i1], 1);
        atomicAdd(&counts[i2], 1);
    } else {
        atomicAdd(&counts[V], 3);
    }
}

// Step 3, one thread per triangle: offsets holds the segment ends on entry and the segment starts
// on exit (every entry of segment k decrements offsets[k] once). Writes entry indices into the
// first column of corners.
extern "C" __global__ void vertex_adjacency_scatter(const int* __restrict__ tri, int* __restrict__ offsets,
                                                    int* __restrict__ corners, int T, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= T) return;
    const int t = (int)i;
    const int i0 = tri[3 * i], i1 = tri[3 * i + 1], i2 = tri[3 * i + 2];
    const bool valid = triangle_is_valid(i0, i1, i2, V);
    const int key[3] = {valid ? i0 : V, valid ? i1 : V, valid ? i2 : V};
#pragma unroll
    for (int c = 0; c < 3; ++c) {
        const int slot = atomicSub(&offsets[key[c]], 1) - 1;
        corners[2 * (long long)slot] = 3 * t + c;
    }
}

// Sorts keys[0], keys[stride], ..., keys[(n - 1) * stride] ascending (distinct values). Insertion
// sort for the few entries of a mesh vertex; heapsort above SMALL_SEGMENT, so that a vertex with
// thousands of triangles (a fan's centre) or the segment of left-out entries costs n log n, not n^2.
constexpr int SMALL_SEGMENT = 32;

__device__ __forceinline__ void sift_down(int* keys, long long stride, long long root, long long n) {
    const int x = keys[root * stride];
    for (;;) {
        long long child = 2 * root + 1;
        if (child >= n) break;
        if (child + 1 < n && keys[(child + 1) * stride] > keys[child * stride]) ++child;
        if (keys[child * stride] <= x) break;
        keys[root * stride] = keys[child * stride];
        root = child;
    }
    keys[root * stride] = x;
}

__device__ __forceinline__ void sort_strided(int* keys, long long stride, long long n) {
    if (n <= SMALL_SEGMENT) {
        for (long long i = 1; i < n; ++i) {
            const int x = keys[i * stride];
            long long j = i - 1;
            for (; j >= 0 && keys[j * stride] > x; --j) keys[(j + 1) * stride] = keys[j * stride];
            keys[(j + 1) * stride] = x;
        }
        return;
    }
    for (long long root = n / 2 - 1; root >= 0; --root) sift_down(keys, stride, root, n);
    for (long long end = n - 1; end > 0; --end) {
        const int top = keys[0];
        keys[0] = keys[end * stride];
        keys[end * stride] = top;
        sift_down(keys, stride, 0, end);
    }
}

// Step 4, one thread per segment: the V vertices, then segment V (the left-out entries, which end
// at 3 T). Sorts the segment's entry indices, then replaces each by the triangle's next and
// previous corners counter-clockwise from the vertex: corners[e] = (tri[t][c + 1], tri[t][c + 2]).
extern "C" __global__ void vertex_adjacency_sort(const int* __restrict__ tri, const int* __restrict__ offsets,
                                                 int* __restrict__ corners, int T, int V) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i > V) return;
    const int begin = offsets[i];
    const int end = i < V ? offsets[i + 1] : 3 * T;
    sort_strided(corners + 2 * (long long)begin, 2, end - begin);
    for (long long e = begin; e < end; ++e) {
        const int entry = corners[2 * e];
        const int t = entry / 3, c = entry - 3 * t;
        const long long row = 3 * (long long)t;
        corners[2 * e] = tri[row + (c + 1) % 3];
        corners[2 * e + 1] = tri[row + (c + 2) % 3];
    }
}
