"""Area-weighted unit vertex normals, forward and backward, on a CSR vertex->triangle adjacency.

The normal of vertex v is s_v / |s_v| with s_v = sum over the triangles (i0, i1, i2) around v of
the un-normalised face normal (p_i1 - p_i0) x (p_i2 - p_i0): twice the face's area times its unit
normal, so large faces weigh more. Counter-clockwise triangles seen from the camera give normals
pointing toward the viewer (+z in camera space).

Algorithm (both backends): one worker per (batch, vertex) walks the triangles around its vertex in
a CSR list (`VertexAdjacency`) and sums their face normals itself. Each face normal is computed
three times (once per corner) instead of once with three atomic adds, which buys: no atomics, a
result that does not depend on thread timing (sums in a fixed order), one fused kernel for the
forward, and twins on CPU and GPU that are the same code. The face normal seen from a corner c
with the next and previous corners a, b (counter-clockwise) is (p_a - p_c) x (p_b - p_c): the
same vector from every corner, since the cross product of two edges is invariant under cyclic
rotation of the triangle.

Degenerate vertices: a vertex touched by no triangle, or whose summed normal is exactly zero
(e.g. only degenerate triangles, or faces that cancel), gets the zero vector, and gradients
through it are zero.

Backward: with n = s/|s|, dL/ds = (g - n (n.g)) / |s|. A face's normal adds to its three
vertices' s, so its gradient is G = dL/ds_i0 + dL/ds_i1 + dL/ds_i2, and with
N = (p_a - p_c) x (p_b - p_c) = p_a x p_b + p_c x (p_a - p_b), dL/dp_c = (p_a - p_b) x G.
Two passes: per vertex dL/ds (into a scratch array), then per vertex the gather over its faces.

Adjacency (`vertex_adjacency`): a counting sort of the 3T (triangle, corner) entries keyed by
vertex, in the same four steps on both backends (count, scan, scatter, then each vertex sorts its
own few entries; kernels/normals.cu). On the GPU it replaced a device-wide stable argsort (Thrust,
which makes the host wait and cannot be recorded in a CUDA graph); on the CPU the Numba twins took
1.6-2.3 ms against 7.5-10 ms for the numpy argsort + searchsorted they replaced (the default
model's 68,740 triangles, 2 cores shared with other work).

GPU kernels that staged each block's vertices and a halo of neighbours in shared memory (contiguous
loads) measured slower on an H200 than these direct gathers (64 x 35,721 vertices: forward 62 vs
45 us, backward 168 vs 109 us) and were removed.
"""
import dataclasses

import numba
import numpy as np

from fastface._backend import KernelFile, array_module, grid_1d
from fastface._checks import check_array, check_finite, check_indices

__all__ = ["VertexAdjacency", "vertex_adjacency", "vertex_normals", "vertex_normals_backward"]


@dataclasses.dataclass(frozen=True)
class VertexAdjacency:
    """The triangles around each vertex, as a CSR list; build it with `vertex_adjacency`.

    Attributes:
        offsets: (V + 1,) int32; the entries of vertex v are offsets[v] to offsets[v + 1] - 1.
        corners: (3T, 2) int32; for each (vertex, triangle) entry the triangle's next and previous
            vertex counter-clockwise from v. Entries of a vertex are in triangle order. The rows
            from offsets[V] on hold the entries of left-out triangles, in triangle order; nothing
            reads them.
        n_vertices: V.
        n_triangles: T of the triangle array it was built from.
    """
    offsets: object
    corners: object
    n_vertices: int
    n_triangles: int


def vertex_adjacency(tri, n_vertices):
    """Builds the vertex -> triangle CSR list used by `vertex_normals` (once per mesh topology).

    Triangles with any index outside [0, n_vertices) are left out (and raise ValueError while
    value checks are on). Runs on the device of `tri`: a count, a scan and a scatter of the 3T
    (triangle, corner) entries, then a sort of each vertex's few entries into triangle order
    (kernels/normals.cu explains the steps), so the result is deterministic and the same on both
    devices. On the GPU it makes no host synchronisation (value checks on or off; "sync" mode waits
    by design), so it can be recorded in a CUDA graph with the checks off; it allocates its two
    output arrays and cupy.cumsum's small scratch. The ops that take an `adjacency` build one on
    every call when given None: build it here once per topology and pass it (the fast path).

    Args:
        tri: (T, 3) int32 triangle vertex indices, numpy or cupy; 3T < 2^31.
        n_vertices: V, the number of vertices of the mesh.

    Returns:
        `VertexAdjacency` on the device of `tri`.
    """
    xp = array_module(("tri", tri))
    check_array("tri", tri, np.int32, ("T", 3))
    if isinstance(n_vertices, bool) or not isinstance(n_vertices, (int, np.integer)):
        raise TypeError(f"n_vertices must be an integer; got {n_vertices!r}")
    n_vertices = int(n_vertices)
    if not 0 < n_vertices < 2**31 - 1:  # the offsets are int32
        raise ValueError(f"n_vertices must be an integer in [1, {2**31 - 2}]; got {n_vertices}")
    n_triangles = int(tri.shape[0])
    if 3 * n_triangles > 2**31 - 1:  # entry indices 3 t + c and offsets are int32
        raise ValueError(f"tri must have at most {(2**31 - 1) // 3} triangles; got {n_triangles}")
    check_indices("tri", tri, n_vertices)
    tri = xp.ascontiguousarray(tri)
    offsets = xp.zeros(n_vertices + 1, dtype=np.int32)
    corners = xp.empty((3 * n_triangles, 2), dtype=np.int32)
    if xp is np:
        vertex_adjacency_count(tri, offsets)
        np.cumsum(offsets, dtype=np.int32, out=offsets)
        vertex_adjacency_scatter(tri, offsets, corners)
        vertex_adjacency_sort(tri, offsets, corners)
    else:
        _build_adjacency_on_device(xp, tri, offsets, corners, _launch_adjacency_kernel)
    return VertexAdjacency(offsets=offsets, corners=corners, n_vertices=n_vertices, n_triangles=n_triangles)


def _build_adjacency_on_device(xp, tri, offsets, corners, launch):
    """Fills `offsets` (zeroed) and `corners` with the kernels of kernels/normals.cu, in order.

    `launch(name, n_threads, args)` runs one kernel over n_threads threads. It is a parameter so
    that tests/ops/test_normals.py can run this same sequence on the CUDA source compiled for the
    host. The scan is cupy.cumsum in place: its kernels (or CUB's) queue on the stream, and it
    reads nothing back to the host.
    """
    n_triangles, n_vertices = tri.shape[0], offsets.shape[0] - 1
    sizes = (np.int32(n_triangles), np.int32(n_vertices))
    launch("vertex_adjacency_count", n_triangles, (tri, offsets) + sizes)
    xp.cumsum(offsets, dtype=np.int32, out=offsets)  # segment ends
    launch("vertex_adjacency_scatter", n_triangles, (tri, offsets, corners) + sizes)  # -> segment starts
    launch("vertex_adjacency_sort", n_vertices + 1, (tri, offsets, corners) + sizes)


# ---------------------------------------------------------------------------------------------
# CPU kernels (Numba twins of kernels/normals.cu, same argument order)
#
# The parallel loop runs over (batch, block of _BLOCK vertices) pairs, so a single mesh uses every
# core too; arithmetic stays in the input's dtype (float32 on the hot path, like the GPU), and an
# index is range-checked as unsigned (one compare catches negatives too).

_BLOCK = 4096


@numba.njit(cache=True, inline="always")
def _summed_normal(vb, offsets, corners, v):
    """The sum of the face normals around vertex v of one batch element's (V, 3) vertices."""
    V = vb.shape[0]
    px, py, pz = vb[v, 0], vb[v, 1], vb[v, 2]
    sx = sy = sz = vb.dtype.type(0)
    for e in range(offsets[v], offsets[v + 1]):
        a, c = np.uint32(corners[e, 0]), np.uint32(corners[e, 1])
        if a >= V or c >= V:
            continue
        ax, ay, az = vb[a, 0] - px, vb[a, 1] - py, vb[a, 2] - pz
        cx, cy, cz = vb[c, 0] - px, vb[c, 1] - py, vb[c, 2] - pz
        sx += ay * cz - az * cy
        sy += az * cx - ax * cz
        sz += ax * cy - ay * cx
    return sx, sy, sz


@numba.njit(cache=True, inline="always")
def _inverse_length(sx, sy, sz, one):
    """1 / |s|, or 0 where s is zero; `one` carries the dtype to compute in."""
    len2 = sx * sx + sy * sy + sz * sz
    return one / np.sqrt(len2) if len2 > 0 else one - one


@numba.njit(cache=True, parallel=True)
def vertex_normals_fwd(vertices, offsets, corners, normals):
    """Per (batch, vertex): sum the face normals around it, normalise."""
    B, V = vertices.shape[0], vertices.shape[1]
    n_blocks = (V + _BLOCK - 1) // _BLOCK
    for job in numba.prange(B * n_blocks):
        b, block = job // n_blocks, job % n_blocks
        vb, nb = vertices[b], normals[b]
        for v in range(block * _BLOCK, min(V, (block + 1) * _BLOCK)):
            sx, sy, sz = _summed_normal(vb, offsets, corners, v)
            inv = _inverse_length(sx, sy, sz, vb.dtype.type(1))
            nb[v, 0] = sx * inv
            nb[v, 1] = sy * inv
            nb[v, 2] = sz * inv


@numba.njit(cache=True, parallel=True)
def vertex_normals_bwd_sum(vertices, offsets, corners, grad_out, grad_sum):
    """Pass 1, per (batch, vertex): the gradient of the summed normal s, (g - n (n.g)) / |s|."""
    B, V = vertices.shape[0], vertices.shape[1]
    n_blocks = (V + _BLOCK - 1) // _BLOCK
    for job in numba.prange(B * n_blocks):
        b, block = job // n_blocks, job % n_blocks
        vb, gb, hb = vertices[b], grad_out[b], grad_sum[b]
        for v in range(block * _BLOCK, min(V, (block + 1) * _BLOCK)):
            sx, sy, sz = _summed_normal(vb, offsets, corners, v)
            inv = _inverse_length(sx, sy, sz, vb.dtype.type(1))
            nx, ny, nz = sx * inv, sy * inv, sz * inv
            gx, gy, gz = gb[v, 0], gb[v, 1], gb[v, 2]
            ndotg = nx * gx + ny * gy + nz * gz
            hb[v, 0] = (gx - nx * ndotg) * inv
            hb[v, 1] = (gy - ny * ndotg) * inv
            hb[v, 2] = (gz - nz * ndotg) * inv


@numba.njit(cache=True, parallel=True)
def vertex_normals_bwd(vertices, offsets, corners, grad_sum, grad_vertices):
    """Pass 2, per (batch, vertex): sum (p_a - p_b) x G over the triangles around the vertex."""
    B, V = vertices.shape[0], vertices.shape[1]
    n_blocks = (V + _BLOCK - 1) // _BLOCK
    for job in numba.prange(B * n_blocks):
        b, block = job // n_blocks, job % n_blocks
        vb, hb, rb = vertices[b], grad_sum[b], grad_vertices[b]
        for v in range(block * _BLOCK, min(V, (block + 1) * _BLOCK)):
            hx, hy, hz = hb[v, 0], hb[v, 1], hb[v, 2]
            rx = ry = rz = vb.dtype.type(0)
            for e in range(offsets[v], offsets[v + 1]):
                a, c = np.uint32(corners[e, 0]), np.uint32(corners[e, 1])
                if a >= V or c >= V:
                    continue
                gx = hx + hb[a, 0] + hb[c, 0]
                gy = hy + hb[a, 1] + hb[c, 1]
                gz = hz + hb[a, 2] + hb[c, 2]
                dx, dy, dz = vb[a, 0] - vb[c, 0], vb[a, 1] - vb[c, 1], vb[a, 2] - vb[c, 2]
                rx += dy * gz - dz * gy
                ry += dz * gx - dx * gz
                rz += dx * gy - dy * gx
            rb[v, 0] = rx
            rb[v, 1] = ry
            rb[v, 2] = rz


# The adjacency build (kernels/normals.cu's vertex_adjacency_*): the same four steps, run in one
# thread. The scatter walks the triangles backwards: entries take their segment's slots from the
# end, so every segment comes out in order already, and the insertion sort that a vertex's few
# entries get only confirms it (one compare per entry). Timings against the numpy argsort +
# searchsorted this replaced: see the module docstring.

@numba.njit(cache=True)
def _triangle_is_valid(i0, i1, i2, V):
    return 0 <= i0 < V and 0 <= i1 < V and 0 <= i2 < V


@numba.njit(cache=True)
def vertex_adjacency_count(tri, counts):
    """Step 1: counts[k] += the number of entries with key k (a corner's vertex, or V)."""
    V = counts.shape[0] - 1
    for t in range(tri.shape[0]):
        i0, i1, i2 = tri[t, 0], tri[t, 1], tri[t, 2]
        if _triangle_is_valid(i0, i1, i2, V):
            counts[i0] += 1
            counts[i1] += 1
            counts[i2] += 1
        else:
            counts[V] += 3


@numba.njit(cache=True)
def vertex_adjacency_scatter(tri, offsets, corners):
    """Step 3: offsets holds the segment ends on entry and the starts on exit; corners[:, 0] gets
    the entry indices 3 t + c."""
    V = offsets.shape[0] - 1
    for t in range(tri.shape[0] - 1, -1, -1):
        valid = _triangle_is_valid(tri[t, 0], tri[t, 1], tri[t, 2], V)
        for c in range(2, -1, -1):
            key = tri[t, c] if valid else V
            slot = offsets[key] - 1
            offsets[key] = slot
            corners[slot, 0] = 3 * t + c


_SMALL_SEGMENT = 32  # kernels/normals.cu SMALL_SEGMENT: insertion sort up to this, heapsort above


@numba.njit(cache=True)
def _sift_down(keys, base, root, n):
    x = keys[base + root]
    while True:
        child = 2 * root + 1
        if child >= n:
            break
        if child + 1 < n and keys[base + child + 1] > keys[base + child]:
            child += 1
        if keys[base + child] <= x:
            break
        keys[base + root] = keys[base + child]
        root = child
    keys[base + root] = x


@numba.njit(cache=True)
def _sort_segment(keys, base, n):
    """Sorts keys[base], ..., keys[base + n - 1] ascending in place (distinct values), as
    kernels/normals.cu's sort_strided does."""
    if n <= _SMALL_SEGMENT:
        for i in range(1, n):
            x = keys[base + i]
            j = i - 1
            while j >= 0 and keys[base + j] > x:
                keys[base + j + 1] = keys[base + j]
                j -= 1
            keys[base + j + 1] = x
        return
    for root in range(n // 2 - 1, -1, -1):
        _sift_down(keys, base, root, n)
    for end in range(n - 1, 0, -1):
        top = keys[base]
        keys[base] = keys[base + end]
        keys[base + end] = top
        _sift_down(keys, base, 0, end)


@numba.njit(cache=True)
def vertex_adjacency_sort(tri, offsets, corners):
    """Step 4, per segment (the V vertices, then the left-out entries): sort the entry indices,
    then replace each by its triangle's next and previous corners."""
    V = offsets.shape[0] - 1
    entries, flat_tri = corners[:, 0], tri.reshape(-1)
    for k in range(V + 1):
        begin = offsets[k]
        end = offsets[k + 1] if k < V else corners.shape[0]
        _sort_segment(entries, begin, end - begin)
        for e in range(begin, end):
            # Unsigned: a plain division by 3 (Python's floor division of signed integers costs a
            # fix-up that made this loop 2-3x slower).
            entry = np.uint32(entries[e])
            first = entry // np.uint32(3) * np.uint32(3)  # 3 t
            c = entry - first
            corners[e, 0] = flat_tri[first + (c + 1 if c < 2 else 0)]
            corners[e, 1] = flat_tri[first + (c + 2 if c < 1 else c - 1)]


# ---------------------------------------------------------------------------------------------
# Dispatch

_KERNELS = KernelFile("normals.cu", ("vertex_normals_fwd", "vertex_normals_bwd_sum", "vertex_normals_bwd",
                                     "vertex_adjacency_count", "vertex_adjacency_scatter", "vertex_adjacency_sort"))


def _launch_adjacency_kernel(name, n_threads, args):
    _KERNELS(name)(*grid_1d(n_threads), args)


def _launch(name, B, V, args):
    """Launches vertex_normals_<name> over the B * V (batch, vertex) pairs."""
    _KERNELS("vertex_normals_" + name)(*grid_1d(B * V), args + (np.int32(B), np.int32(V)))


def _prepare(vertices, tri, adjacency, grad_out=None, backward=False):
    """Checks the inputs; returns (xp, batched vertices (B,V,3), adjacency, batched grad_out)."""
    if adjacency is not None and not isinstance(adjacency, VertexAdjacency):
        raise TypeError(f"adjacency must be a VertexAdjacency from vertex_adjacency(); got "
                        f"{type(adjacency).__name__}")
    xp = array_module(("vertices", vertices), ("tri", tri), ("grad_out", grad_out),
                      ("adjacency.offsets", None if adjacency is None else adjacency.offsets),
                      ("adjacency.corners", None if adjacency is None else adjacency.corners))
    dtypes = (np.float32, np.float64) if xp is np else (np.float32,)
    try:
        batched = check_array("vertices", vertices, dtypes, ("B", "V", 3), ("V", 3)) == 0
    except TypeError as e:
        raise TypeError(f"{e}{'' if xp is np else ' (the GPU path is float32 only)'}") from None
    check_array("tri", tri, np.int32, ("T", 3))
    n_vertices = vertices.shape[-2]
    if backward:  # a None grad_out fails here with a TypeError naming it
        check_array("grad_out", grad_out, vertices.dtype, tuple(vertices.shape))
        check_finite("grad_out", grad_out)
    check_finite("vertices", vertices)
    if adjacency is None:
        adjacency = vertex_adjacency(tri, n_vertices)
    elif adjacency.n_vertices != n_vertices or adjacency.n_triangles != tri.shape[0]:
        raise ValueError(f"adjacency was built for {adjacency.n_vertices} vertices and "
                         f"{adjacency.n_triangles} triangles; vertices has {n_vertices} and tri "
                         f"{tri.shape[0]}")
    else:
        # The kernels index corners through offsets without bounds checks: a hand-made adjacency
        # must at least have the arrays' shapes that vertex_adjacency gives (metadata only).
        check_array("adjacency.offsets", adjacency.offsets, np.int32, (n_vertices + 1,))
        check_array("adjacency.corners", adjacency.corners, np.int32, (3 * tri.shape[0], 2))
    v3 = xp.ascontiguousarray(vertices if batched else vertices[None])
    g3 = xp.ascontiguousarray(grad_out if batched else grad_out[None]) if backward else None
    return xp, batched, v3, adjacency, g3


def vertex_normals(vertices, tri, adjacency=None):
    """Area-weighted unit vertex normals.

    Args:
        vertices: (B, V, 3) or (V, 3) float32 (float64 also on the CPU), numpy or cupy.
        tri: (T, 3) int32 triangle vertex indices, counter-clockwise seen from the front.
        adjacency: optional `vertex_adjacency(tri, V)`. Pass it when the topology is fixed (the
            fast path): built here otherwise, on every call (a counting sort of the 3T entries:
            a few small kernels and two arrays).
            With an adjacency, tri's indices are not checked again (they were when it was built).

    Returns:
        Unit normals shaped and typed like `vertices`; zero vectors at vertices touched by no
        triangle or whose summed face normal is exactly zero.
    """
    xp, batched, v3, adjacency, _ = _prepare(vertices, tri, adjacency)
    normals = xp.empty_like(v3)
    if xp is np:
        vertex_normals_fwd(v3, adjacency.offsets, adjacency.corners, normals)
    else:
        _launch("fwd", v3.shape[0], v3.shape[1], (v3, adjacency.offsets, adjacency.corners, normals))
    return normals if batched else normals[0]


def vertex_normals_backward(vertices, tri, grad_out, adjacency=None):
    """Gradient of `vertex_normals` with respect to the vertices.

    Args:
        vertices, tri, adjacency: as for `vertex_normals`.
        grad_out: gradient of the normals, shaped and typed like `vertices`.

    Returns:
        grad_vertices, shaped and typed like `vertices`.
    """
    xp, batched, v3, adjacency, g3 = _prepare(vertices, tri, adjacency, grad_out, backward=True)
    grad_sum = xp.empty_like(v3)  # scratch: the gradient of the summed (un-normalised) normals
    grad_vertices = xp.empty_like(v3)
    if xp is np:
        vertex_normals_bwd_sum(v3, adjacency.offsets, adjacency.corners, g3, grad_sum)
        vertex_normals_bwd(v3, adjacency.offsets, adjacency.corners, grad_sum, grad_vertices)
    else:
        B, V = v3.shape[0], v3.shape[1]
        _launch("bwd_sum", B, V, (v3, adjacency.offsets, adjacency.corners, g3, grad_sum))
        _launch("bwd", B, V, (v3, adjacency.offsets, adjacency.corners, grad_sum, grad_vertices))
    return grad_vertices if batched else grad_vertices[0]

