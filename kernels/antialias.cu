// Antialiasing kernels: antialias_silhouettes (per triangle, for silhouette_edges),
// antialias_silhouette_pixels (per pixel, for silhouette_pixels), antialias_fwd and antialias_bwd. The
// Numba twins and the algorithm's description live in fastface/ops/antialias.py. Compiled with
// --fmad=false so that every float expression rounds like the Numba code (they are written in the same
// order). Triangle and vertex indices are tested before any load (the Python checks can be turned off).

// The edge's line L = a' x b', a' = (x, y, w) of vertex a: L . (X, Y, 1) = 0 on the edge's screen line.
struct EdgeLine {
    float x, y, w;
};

__device__ __forceinline__ EdgeLine edge_line(float4 a, float4 b) {
    EdgeLine l;
    l.x = a.y * b.w - a.w * b.y;
    l.y = a.w * b.x - a.x * b.w;
    l.w = a.x * b.y - a.y * b.x;
    return l;
}

__device__ __forceinline__ float line_at_vertex(EdgeLine l, float4 v) {
    return (l.x * v.x + l.y * v.y) + l.w * v.w;
}

// Loads the corners of triangle t into v (indices) and c (clip positions); false when an index is out of
// range (nothing is loaded then).
__device__ __forceinline__ bool load_triangle(const float4* __restrict__ p, const int* __restrict__ tri, int V,
                                              int t, int v[3], float4 c[3]) {
    for (int k = 0; k < 3; ++k) {
        v[k] = tri[3LL * t + k];
        if (v[k] < 0 || v[k] >= V) return false;
    }
    for (int k = 0; k < 3; ++k) c[k] = p[v[k]];
    return true;
}

// The silhouette bits of triangle t (the corners' indices in range, clip positions c): bit k when edge k
// (opposite corner k, from corner k+1 to k+2) is a silhouette edge. t must be drawable (every w > 0) and
// the edge's line must not pass through corner k; then the edge is a silhouette unless a neighbour's far
// vertex d (opposite[t, k]) has w > 0 and lies strictly on the other side of the line (the surface goes
// on across the edge without folding).
__device__ __forceinline__ unsigned int silhouette_bits(const float4* __restrict__ p,
                                                        const int* __restrict__ opposite, int V, int t,
                                                        const float4 c[3]) {
    if (!(c[0].w > 0.0f && c[1].w > 0.0f && c[2].w > 0.0f)) return 0u;
    int d[3];
    for (int k = 0; k < 3; ++k) d[k] = opposite[3LL * t + k];
    unsigned int mask = 0;
    for (int k = 0; k < 3; ++k) {
        const EdgeLine l = edge_line(c[(k + 1) % 3], c[(k + 2) % 3]);
        const float ec = line_at_vertex(l, c[k]);
        if (ec == 0.0f) continue;
        bool folds = true;
        if (d[k] >= 0 && d[k] < V) {
            const float4 q = p[d[k]];
            if (q.w > 0.0f) {
                const float eo = line_at_vertex(l, q);
                folds = ec > 0.0f ? !(eo < 0.0f) : !(eo > 0.0f);
            }
        }
        if (folds) mask |= 1u << k;
    }
    return mask;
}

// One thread per (triangle, image): x over the T triangles, y over the images (a strided loop past 65535).
// sil[b, t] = the silhouette bits of t in image b (0 for an index out of range).
extern "C" __global__ void antialias_silhouettes(const float4* __restrict__ pos, const int* __restrict__ tri,
                                                 const int* __restrict__ opposite, int NB, int V, int T,
                                                 unsigned char* __restrict__ sil) {
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    for (int b = blockIdx.y; b < NB; b += gridDim.y) {
        const float4* p = pos + (long long)b * V;
        int v[3];
        float4 c[3];
        const unsigned int mask = load_triangle(p, tri, V, t, v, c) ? silhouette_bits(p, opposite, V, t, c) : 0u;
        sil[(long long)b * T + t] = (unsigned char)mask;
    }
}

// Per-pixel kernels run on a 2-D grid: x over the H*W pixels of an image (blocks of 256, so a warp reads
// 32 consecutive tri_id, depth and mask entries), y over images (a strided loop past 65535 images).

// psil[b, i, j] = the silhouette bits of the triangle at the pixel (0 where it is empty): the masks the
// pixel passes read, coalesced, instead of a random lookup of each pair's two triangles.
extern "C" __global__ void antialias_silhouette_pixels(const float4* __restrict__ pos, const int* __restrict__ tri,
                                                       const int* __restrict__ opposite,
                                                       const int* __restrict__ tri_id, int B, int V, int T, int H,
                                                       int W, int pos_batched, unsigned char* __restrict__ psil) {
    const int q = blockIdx.x * blockDim.x + threadIdx.x;
    const int hw = H * W;
    if (q >= hw) return;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const long long k = (long long)b * hw + q;
        const int t = tri_id[k];
        unsigned int mask = 0;
        if (t >= 0 && t < T) {
            const float4* p = pos + (pos_batched ? (long long)b * V : 0LL);
            int v[3];
            float4 c[3];
            if (load_triangle(p, tri, V, t, v, c)) mask = silhouette_bits(p, opposite, V, t, c);
        }
        psil[k] = (unsigned char)mask;
    }
}

// The blend of the pixel pair p0 = (i0, j0), p1 = (i1, j1) (p0 left of or above p1) in image b: dst -1 (no
// blend), 0 (p0 is blended) or 1 (p1); a the weight; sign = da/df; the silhouette edge (va, vb); the edge
// function at the front (ef) and the other (eo) centre, and those centres (Xf, Yf), (Xo, Yo) in NDC.
struct PairBlend {
    int dst, va, vb;
    float a, sign, ef, eo, Xf, Yf, Xo, Yo;
};

__device__ __forceinline__ PairBlend pair_blend(const float4* __restrict__ p, const int* __restrict__ tri,
                                                const unsigned char* __restrict__ psil_b,
                                                const int* __restrict__ tri_id_b, const float* __restrict__ depth_b,
                                                int V, int H, int W, int i0, int j0, int i1, int j1) {
    PairBlend r;
    r.dst = -1;
    // The front triangle is one of the two: when neither pixel's triangle has a silhouette edge (most
    // pairs of a dense mesh), nothing more is read.
    const unsigned int m0 = psil_b[i0 * W + j0];
    const unsigned int m1 = psil_b[i1 * W + j1];
    if (m0 == 0 && m1 == 0) return r;
    const int t0 = tri_id_b[i0 * W + j0];
    const int t1 = tri_id_b[i1 * W + j1];
    if (t0 == t1) return r;
    bool front1;
    if (t1 < 0) {
        front1 = false;
    } else if (t0 < 0) {
        front1 = true;
    } else {
        const float d0 = depth_b[i0 * W + j0];
        const float d1 = depth_b[i1 * W + j1];
        front1 = d1 < d0 || (d1 == d0 && t1 < t0);
    }
    const int t = front1 ? t1 : t0;
    const unsigned int mask = front1 ? m1 : m0;
    if (mask == 0) return r;
    const int fi = front1 ? i1 : i0, fj = front1 ? j1 : j0;
    const int oi = front1 ? i0 : i1, oj = front1 ? j0 : j1;
    r.Xf = (float)(2 * fj + 1 - W) / (float)W;
    r.Yf = (float)(H - 2 * fi - 1) / (float)H;
    r.Xo = (float)(2 * oj + 1 - W) / (float)W;
    r.Yo = (float)(H - 2 * oi - 1) / (float)H;
    int v[3];
    float4 c[3];
    if (!load_triangle(p, tri, V, t, v, c)) return r;
    int best = -1;
    float best_f = 0.0f, best_ef = 0.0f, best_eo = 0.0f;
    for (int k = 0; k < 3; ++k) {
        const EdgeLine l = edge_line(c[(k + 1) % 3], c[(k + 2) % 3]);
        const float ec = line_at_vertex(l, c[k]);
        const float ef = (l.x * r.Xf + l.y * r.Yf) + l.w;
        const float eo = (l.x * r.Xo + l.y * r.Yo) + l.w;
        // Inside is where e has the sign of e at the third vertex (all w > 0 for a drawn triangle).
        const bool crosses = ec > 0.0f ? (ef >= 0.0f && eo < 0.0f) : (ef <= 0.0f && eo > 0.0f);
        if (ec == 0.0f || !crosses) continue;
        const float f = ef / (ef - eo);
        if (best < 0 || f < best_f) {
            best = k;
            best_f = f;
            best_ef = ef;
            best_eo = eo;
        }
    }
    if (best < 0 || ((mask >> best) & 1u) == 0) return r;
    // Selects, not v[(best + 1) % 3]: a run-time index would put v in local memory.
    r.va = best == 0 ? v[1] : (best == 1 ? v[2] : v[0]);
    r.vb = best == 0 ? v[2] : (best == 1 ? v[0] : v[1]);
    r.ef = best_ef;
    r.eo = best_eo;
    if (best_f >= 0.5f) {
        r.a = best_f - 0.5f;
        r.sign = 1.0f;
        r.dst = front1 ? 0 : 1;
    } else {
        r.a = 0.5f - best_f;
        r.sign = -1.0f;
        r.dst = front1 ? 1 : 0;
    }
    return r;
}

// Pair d of pixel (i, j) in the gather order left, right, up, down; false when it leaves the image.
// first: (i, j) is the pair's p0.
__device__ __forceinline__ bool pair_of(int d, int i, int j, int H, int W, int& i0, int& j0, int& i1, int& j1,
                                        bool& first) {
    i0 = i;
    j0 = j;
    i1 = i;
    j1 = j;
    first = (d & 1) != 0;
    if (d == 0) j0 = j - 1;
    if (d == 1) j1 = j + 1;
    if (d == 2) i0 = i - 1;
    if (d == 3) i1 = i + 1;
    return j0 >= 0 && j1 < W && i0 >= 0 && i1 < H;
}

// Launched like antialias_silhouette_pixels. Each pixel gathers its own blends from its four pairs: it
// writes only itself, with no atomics.
extern "C" __global__ void antialias_fwd(const float* __restrict__ color, const int* __restrict__ tri_id,
                                         const float* __restrict__ depth, const float4* __restrict__ pos,
                                         const int* __restrict__ tri, const unsigned char* __restrict__ psil, int B,
                                         int V, int H, int W, int C, int pos_batched, float* __restrict__ out) {
    const int q = blockIdx.x * blockDim.x + threadIdx.x;
    const int hw = H * W;
    if (q >= hw) return;
    const int i = q / W;
    const int j = q - i * W;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const long long base = (long long)b * hw;
        const float4* p = pos + (pos_batched ? (long long)b * V : 0LL);
        const float* cb = color + base * C;
        float* o = out + (base + q) * C;
        for (int c = 0; c < C; ++c) o[c] = cb[(long long)q * C + c];
        for (int d = 0; d < 4; ++d) {
            int i0, j0, i1, j1;
            bool first;
            if (!pair_of(d, i, j, H, W, i0, j0, i1, j1, first)) continue;
            const PairBlend r = pair_blend(p, tri, psil + base, tri_id + base, depth + base, V, H, W, i0, j0, i1, j1);
            if (r.dst < 0 || (r.dst == 0) != first) continue;
            const long long s = first ? (long long)i1 * W + j1 : (long long)i0 * W + j0;
            for (int c = 0; c < C; ++c) o[c] += r.a * (cb[s * C + c] - cb[(long long)q * C + c]);
        }
    }
}

// dL/df = gt -> the x, y, w gradients of the edge's vertices (fastface/ops/antialias.py derives them).
__device__ __forceinline__ void scatter_edge_grad(const float4* __restrict__ p, const PairBlend& r, float gt,
                                                  float4* __restrict__ grad_pos) {
    const float den = r.ef - r.eo;
    const float den2 = den * den;
    const float gef = gt * (-r.eo) / den2;
    const float geo = gt * r.ef / den2;
    const float qx = gef * r.Xf + geo * r.Xo;
    const float qy = gef * r.Yf + geo * r.Yo;
    const float qw = gef * 1.0f + geo * 1.0f;
    const float4 a = p[r.va];
    const float4 b = p[r.vb];
    float* ga = &grad_pos[r.va].x;
    float* gb = &grad_pos[r.vb].x;
    atomicAdd(ga + 0, b.y * qw - b.w * qy);
    atomicAdd(ga + 1, b.w * qx - b.x * qw);
    atomicAdd(ga + 3, b.x * qy - b.y * qx);
    atomicAdd(gb + 0, qy * a.w - qw * a.y);
    atomicAdd(gb + 1, qw * a.x - qx * a.w);
    atomicAdd(gb + 3, qx * a.y - qy * a.x);
}

// One thread per pixel, launched like antialias_fwd: grad_color is gathered per pixel in the forward's
// order (no atomics); each pair's position gradient is added once, by its left or upper pixel, with
// atomics into grad_pos (a cupy.zeros buffer shaped like pos).
extern "C" __global__ void antialias_bwd(const float* __restrict__ color, const int* __restrict__ tri_id,
                                         const float* __restrict__ depth, const float4* __restrict__ pos,
                                         const int* __restrict__ tri, const unsigned char* __restrict__ psil,
                                         const float* __restrict__ grad_out, int B, int V, int H, int W, int C,
                                         int pos_batched, float* __restrict__ grad_color,
                                         float4* __restrict__ grad_pos) {
    const int q = blockIdx.x * blockDim.x + threadIdx.x;
    const int hw = H * W;
    if (q >= hw) return;
    const int i = q / W;
    const int j = q - i * W;
    for (int b = blockIdx.y; b < B; b += gridDim.y) {
        const long long base = (long long)b * hw;
        const long long pb = pos_batched ? (long long)b * V : 0LL;
        const float4* p = pos + pb;
        const float* cb = color + base * C;
        const float* gob = grad_out + base * C;
        float* gc = grad_color + (base + q) * C;
        for (int c = 0; c < C; ++c) gc[c] = gob[(long long)q * C + c];
        for (int d = 0; d < 4; ++d) {
            int i0, j0, i1, j1;
            bool first;
            if (!pair_of(d, i, j, H, W, i0, j0, i1, j1, first)) continue;
            const PairBlend r = pair_blend(p, tri, psil + base, tri_id + base, depth + base, V, H, W, i0, j0, i1, j1);
            if (r.dst < 0) continue;
            const long long dp = r.dst == 0 ? (long long)i0 * W + j0 : (long long)i1 * W + j1;
            const long long sp = r.dst == 0 ? (long long)i1 * W + j1 : (long long)i0 * W + j0;
            if (dp == q) {
                for (int c = 0; c < C; ++c) gc[c] -= r.a * gob[(long long)q * C + c];
            } else {
                for (int c = 0; c < C; ++c) gc[c] += r.a * gob[dp * C + c];
            }
            if (first) {
                float ga = 0.0f;
                for (int c = 0; c < C; ++c) ga += gob[dp * C + c] * (cb[sp * C + c] - cb[dp * C + c]);
                if (ga != 0.0f) scatter_edge_grad(p, r, r.sign * ga, grad_pos + pb);
            }
        }
    }
}
