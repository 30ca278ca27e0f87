"""vertex_normals: reference, gradients, CPU/GPU parity, bad input."""
import numpy as np
import pytest

import fastface
from fastface.ops import normals as normals_module
from fastface.ops.normals import vertex_adjacency, vertex_normals, vertex_normals_backward
from tests.conftest import TOLERANCES
from tests.cuda_emulation import build_emulated_library
from tests.gradcheck import assert_gradient_matches

F64 = dict(rtol=TOLERANCES["float64_reference_rtol"], atol=TOLERANCES["float64_reference_atol"])
F32 = dict(atol=TOLERANCES["float32_reference_atol"])


def grid_mesh(rows, cols, z=-5.0):
    """A flat (rows x cols) grid in the plane z, triangles counter-clockwise seen from +z."""
    ys, xs = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    vertices = np.stack([xs, -ys, np.full_like(xs, z)], axis=-1).reshape(-1, 3)
    tri = []
    for i in range(rows - 1):
        for j in range(cols - 1):
            a, b, c, d = i * cols + j, i * cols + j + 1, (i + 1) * cols + j, (i + 1) * cols + j + 1
            tri += [(a, c, b), (b, c, d)]  # row i+1 lies below row i (y = -row)
    return vertices, np.array(tri, dtype=np.int32)


def random_mesh(rng, batch=2, n_vertices=14, n_tri=20, dtype=np.float64):
    """Random positions and random distinct-index triangles; vertex n_vertices-1 is left unused."""
    tri = np.array([rng.choice(n_vertices - 1, 3, replace=False) for _ in range(n_tri)], dtype=np.int32)
    vertices = rng.normal(size=(batch, n_vertices, 3)).astype(dtype)
    return vertices, tri


def reference_adjacency(tri, n_vertices):
    """(offsets, corners) the obvious way: a stable argsort of the entries keyed by vertex, the
    entries of triangles with an index outside [0, V) keyed V (after every vertex)."""
    valid = ((tri >= 0) & (tri < n_vertices)).all(axis=1)
    key = np.where(valid[:, None], tri, n_vertices).reshape(-1)
    order = np.argsort(key, kind="stable")
    offsets = np.searchsorted(key[order], np.arange(n_vertices + 1)).astype(np.int32)
    face, corner = order // 3, order % 3
    corners = np.stack([tri[face, (corner + 1) % 3], tri[face, (corner + 2) % 3]], axis=1).astype(np.int32)
    return offsets, corners


def adjacency_test_meshes(rng):
    """(name, tri, V): random triangles, some with a repeated index; a fan whose centre has more
    triangles than the insertion sort takes; triangles with indices outside [0, V) (left out,
    more of them than the insertion sort takes, mixed in at random places)."""
    tri = rng.integers(0, 40, size=(120, 3)).astype(np.int32)  # repeats on purpose: (a, a, b) triangles
    n_fan = 70
    fan = np.array([[0, 1 + i, 1 + (i + 1) % n_fan] for i in range(n_fan)], dtype=np.int32)
    fan = fan[rng.permutation(n_fan)]
    bad = rng.integers(-5, 45, size=(150, 3)).astype(np.int32)
    bad[rng.random(150) < 0.3, rng.integers(0, 3)] = 40  # exactly V: out of range too
    return [("random", tri, 40), ("fan", fan, n_fan + 1), ("invalid", bad, 40),
            ("one triangle", np.array([[2, 0, 1]], np.int32), 3)]


def reference_normals(vertices, tri):
    """Slow float64 loop: scatter each face's cross product to its corners, then normalise."""
    vertices = np.asarray(vertices, dtype=np.float64)
    out = np.zeros_like(vertices)
    for b in range(vertices.shape[0]):
        for i0, i1, i2 in tri:
            p0, p1, p2 = vertices[b, i0], vertices[b, i1], vertices[b, i2]
            n = np.cross(p1 - p0, p2 - p0)
            out[b, i0] += n
            out[b, i1] += n
            out[b, i2] += n
    length = np.linalg.norm(out, axis=-1, keepdims=True)
    return np.where(length > 0, out / np.where(length > 0, length, 1), 0.0)


def test_normals_match_face_scatter_reference(rng):
    vertices, tri = random_mesh(rng)
    np.testing.assert_allclose(vertex_normals(vertices, tri), reference_normals(vertices, tri), **F64)


def test_float32_normals_match_reference(rng, tol):
    vertices, tri = random_mesh(rng, dtype=np.float32)
    normals = vertex_normals(vertices, tri)
    assert normals.dtype == np.float32
    np.testing.assert_allclose(normals, reference_normals(vertices, tri), **F32)


def test_unused_vertex_gets_zero_normal_and_zero_gradient(rng):
    vertices, tri = random_mesh(rng)
    normals = vertex_normals(vertices, tri)
    np.testing.assert_array_equal(normals[:, -1], 0.0)
    grad = vertex_normals_backward(vertices, tri, rng.normal(size=vertices.shape))
    np.testing.assert_array_equal(grad[:, -1], 0.0)


def test_counter_clockwise_grid_normals_face_the_viewer():
    vertices, tri = grid_mesh(4, 5)
    normals = vertex_normals(vertices, tri)
    np.testing.assert_allclose(normals, np.tile([0.0, 0.0, 1.0], (len(vertices), 1)), **F64)


def test_sphere_normals_point_outward():
    # A UV sphere: rings of latitude, triangles counter-clockwise seen from outside.
    n_lat, n_lon = 12, 16
    theta = np.linspace(0.15, np.pi - 0.15, n_lat)
    phi = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    t, p = np.meshgrid(theta, phi, indexing="ij")
    vertices = np.stack([np.sin(t) * np.cos(p), np.sin(t) * np.sin(p), np.cos(t)], -1).reshape(-1, 3)
    tri = []
    for i in range(n_lat - 1):
        for j in range(n_lon):
            a, b = i * n_lon + j, i * n_lon + (j + 1) % n_lon
            c, d = a + n_lon, b + n_lon
            tri += [(a, c, b), (b, c, d)]
    normals = vertex_normals(vertices, np.array(tri, dtype=np.int32))
    cosine = np.sum(normals * vertices, axis=-1)
    assert cosine.min() > 0.9, cosine.min()


def test_unbatched_input_gives_unbatched_output(rng):
    vertices, tri = random_mesh(rng)
    np.testing.assert_array_equal(vertex_normals(vertices[1], tri), vertex_normals(vertices, tri)[1])
    grad_out = rng.normal(size=vertices.shape)
    np.testing.assert_array_equal(vertex_normals_backward(vertices[1], tri, grad_out[1]),
                                  vertex_normals_backward(vertices, tri, grad_out)[1])


def test_prebuilt_adjacency_gives_the_same_normals(rng):
    vertices, tri = random_mesh(rng)
    adjacency = vertex_adjacency(tri, vertices.shape[1])
    np.testing.assert_array_equal(vertex_normals(vertices, tri, adjacency), vertex_normals(vertices, tri))


def test_adjacency_lists_each_triangle_at_each_corner(rng):
    _, tri = random_mesh(rng)
    adjacency = vertex_adjacency(tri, 14)
    assert adjacency.offsets[-1] == tri.size
    for v in range(14):
        entries = adjacency.corners[adjacency.offsets[v]:adjacency.offsets[v + 1]]
        expected = [(t[(c + 1) % 3], t[(c + 2) % 3]) for t in tri for c in range(3) if t[c] == v]
        np.testing.assert_array_equal(entries.reshape(-1, 2), np.array(expected, dtype=np.int32).reshape(-1, 2))


def test_adjacency_equals_the_stable_argsort_reference(rng):
    for name, tri, n_vertices in adjacency_test_meshes(rng):
        expected = reference_adjacency(tri, n_vertices)
        with fastface.value_checks(False):
            adjacency = vertex_adjacency(tri, n_vertices)
        assert adjacency.offsets.dtype == np.int32 and adjacency.corners.dtype == np.int32, name
        np.testing.assert_array_equal(adjacency.offsets, expected[0], err_msg=name)
        np.testing.assert_array_equal(adjacency.corners, expected[1], err_msg=name)


def test_adjacency_of_the_face_model_equals_the_reference():
    model = fastface.FaceModel.default(level="small")
    adjacency = vertex_adjacency(model.triangles, model.n_vertices)
    offsets, corners = reference_adjacency(model.triangles, model.n_vertices)
    np.testing.assert_array_equal(adjacency.offsets, offsets)
    np.testing.assert_array_equal(adjacency.corners, corners)


@pytest.mark.parametrize("n", [0, 1, 2, 31, 32, 33, 64, 257])  # both sides of the insertion sort's limit
def test_segment_sort_sorts_any_order(rng, n):
    keys = np.full(n + 7, -1, dtype=np.int32)
    values = rng.permutation(10 * n + 1)[:n].astype(np.int32)
    keys[3:3 + n] = values
    normals_module._sort_segment(keys, 3, n)
    np.testing.assert_array_equal(keys[3:3 + n], np.sort(values))
    assert (keys[:3] == -1).all() and (keys[3 + n:] == -1).all()  # nothing outside the segment moved


def test_vertex_adjacency_rejects_more_triangles_than_int32_entries_hold():
    huge = np.broadcast_to(np.zeros((1, 3), np.int32), ((2**31 - 1) // 3 + 1, 3))  # no memory behind it
    with pytest.raises(ValueError, match="tri must have at most"):
        vertex_adjacency(huge, 3)


def test_out_of_range_triangles_are_skipped_when_checks_are_off(rng):
    vertices, tri = random_mesh(rng)
    bad = np.concatenate([tri, [[0, 1, 99]]]).astype(np.int32)
    with fastface.value_checks(False):
        np.testing.assert_array_equal(vertex_normals(vertices, bad), vertex_normals(vertices, tri))


def test_backward_matches_finite_differences(rng, tol):
    vertices, tri = random_mesh(rng)
    grad_out = rng.normal(size=vertices.shape)
    analytic = vertex_normals_backward(vertices, tri, grad_out)
    assert_gradient_matches(lambda v: vertex_normals(v, tri), vertices, grad_out, analytic, tol)


def test_backward_on_grid_matches_finite_differences(rng, tol):
    vertices, tri = grid_mesh(4, 4)
    vertices = vertices + 0.2 * rng.normal(size=vertices.shape)
    grad_out = rng.normal(size=vertices.shape)
    analytic = vertex_normals_backward(vertices, tri, grad_out)
    assert_gradient_matches(lambda v: vertex_normals(v, tri), vertices, grad_out, analytic, tol)


def test_gpu_matches_cpu(rng, tol, cupy):
    # A bumpy grid rather than random triangles: no vertex whose face normals nearly cancel, where
    # float32 rounding would be amplified by 1 / |s| and the comparison would test conditioning.
    flat, tri = grid_mesh(15, 14)
    vertices = (flat + 0.2 * rng.normal(size=(3,) + flat.shape)).astype(np.float32)
    grad_out = rng.normal(size=vertices.shape).astype(np.float32)
    adjacency = vertex_adjacency(cupy.asarray(tri), len(flat))
    n_gpu = vertex_normals(cupy.asarray(vertices), cupy.asarray(tri), adjacency)
    g_gpu = vertex_normals_backward(cupy.asarray(vertices), cupy.asarray(tri), cupy.asarray(grad_out), adjacency)
    assert n_gpu.dtype == cupy.float32 and g_gpu.dtype == cupy.float32
    np.testing.assert_allclose(n_gpu.get(), vertex_normals(vertices, tri), rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])
    g_cpu = vertex_normals_backward(vertices, tri, grad_out)
    np.testing.assert_allclose(g_gpu.get(), g_cpu, rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"] * np.abs(g_cpu).max())


@pytest.mark.parametrize("mesh", ["grid", "scattered"])
def test_gpu_matches_cpu_on_local_and_scattered_vertex_orders(rng, tol, cupy, mesh):
    # grid: 40 x 70 vertices, neighbours 70 apart, a partial last block; scattered: the same grid
    # with its vertices renumbered at random, so that neighbours lie far apart in memory.
    flat, tri = grid_mesh(40, 70)
    if mesh == "scattered":
        perm = rng.permutation(len(flat))
        flat, tri = flat[np.argsort(perm)], perm[tri].astype(np.int32)
    vertices = (flat + 0.2 * rng.normal(size=(2,) + flat.shape)).astype(np.float32)
    grad_out = rng.normal(size=vertices.shape).astype(np.float32)
    adjacency = vertex_adjacency(cupy.asarray(tri), len(flat))
    n_gpu = vertex_normals(cupy.asarray(vertices), cupy.asarray(tri), adjacency)
    g_gpu = vertex_normals_backward(cupy.asarray(vertices), cupy.asarray(tri), cupy.asarray(grad_out), adjacency)
    np.testing.assert_allclose(n_gpu.get(), vertex_normals(vertices, tri), rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])
    g_cpu = vertex_normals_backward(vertices, tri, grad_out)
    np.testing.assert_allclose(g_gpu.get(), g_cpu, rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"] * np.abs(g_cpu).max())


def test_gpu_adjacency_equals_cpu_adjacency(rng, cupy):
    _, tri = random_mesh(rng, n_vertices=50, n_tri=80)
    meshes = [("random_mesh", tri, 50)] + adjacency_test_meshes(rng)
    for name, tri, n_vertices in meshes:
        with fastface.value_checks(False):  # the "invalid" mesh would raise otherwise
            cpu, gpu = vertex_adjacency(tri, n_vertices), vertex_adjacency(cupy.asarray(tri), n_vertices)
        assert gpu.offsets.dtype == np.int32 and gpu.corners.dtype == np.int32, name
        np.testing.assert_array_equal(gpu.offsets.get(), cpu.offsets, err_msg=name)
        np.testing.assert_array_equal(gpu.corners.get(), cpu.corners, err_msg=name)


@pytest.mark.parametrize("level", ["small", "default"])
def test_gpu_adjacency_of_the_face_model_equals_cpu(cupy, level):
    model = fastface.FaceModel.default(level=level)
    cpu = vertex_adjacency(model.triangles, model.n_vertices)
    for _ in range(2):  # the atomics hand out other slots each time; the result must not change
        gpu = vertex_adjacency(cupy.asarray(model.triangles), model.n_vertices)
        np.testing.assert_array_equal(gpu.offsets.get(), cpu.offsets)
        np.testing.assert_array_equal(gpu.corners.get(), cpu.corners)


def test_gpu_adjacency_records_in_a_cuda_graph_and_replays(rng, cupy):
    # A host synchronisation (the Thrust sort this build replaced made one) fails a capture.
    _, tri = random_mesh(rng, n_vertices=300, n_tri=600)
    expected = vertex_adjacency(tri, 300)
    tri_gpu = cupy.asarray(tri)
    cupy.cuda.Stream.null.synchronize()  # the non-blocking stream below does not wait for the copy
    stream = cupy.cuda.Stream(non_blocking=True)
    with fastface.value_checks(False), stream:
        vertex_adjacency(tri_gpu, 300)  # warm-up outside the capture: compiles the kernels
        stream.begin_capture()
        try:
            adjacency = vertex_adjacency(tri_gpu, 300)
        finally:
            graph = stream.end_capture()
        adjacency.offsets.fill(-1)  # the replay must write them again
        adjacency.corners.fill(-1)
        graph.launch(stream)
    stream.synchronize()
    np.testing.assert_array_equal(adjacency.offsets.get(), expected.offsets)
    np.testing.assert_array_equal(adjacency.corners.get(), expected.corners)


def test_gpu_normals_are_deterministic(rng, cupy):
    vertices, tri = random_mesh(rng, batch=2, n_vertices=300, n_tri=600, dtype=np.float32)
    v, t = cupy.asarray(vertices), cupy.asarray(tri)
    g = cupy.asarray(rng.normal(size=vertices.shape).astype(np.float32))
    assert cupy.array_equal(vertex_normals_backward(v, t, g), vertex_normals_backward(v, t, g))


def test_gpu_unbatched_and_unused_vertex(rng, cupy):
    vertices, tri = random_mesh(rng, dtype=np.float32)
    n = vertex_normals(cupy.asarray(vertices[0]), cupy.asarray(tri))
    assert n.shape == (14, 3)
    np.testing.assert_array_equal(n[-1].get(), 0.0)


def test_gpu_rejects_float64(cupy):
    vertices, tri = grid_mesh(3, 3)
    with pytest.raises(TypeError, match="vertices.*GPU path is float32"):
        vertex_normals(cupy.asarray(vertices), cupy.asarray(tri))


@pytest.mark.parametrize("make_bad, exc, pattern", [
    (lambda v, t: (v.astype(np.int32), t), TypeError, "vertices"),
    (lambda v, t: (v[..., :2], t), ValueError, "vertices"),
    (lambda v, t: (v, t.astype(np.int64)), TypeError, "tri"),
    (lambda v, t: (v, t[:, :2]), ValueError, "tri"),
    (lambda v, t: (v, t + 100), ValueError, "tri"),
    (lambda v, t: (v, t - 1), ValueError, "tri"),
    (lambda v, t: (np.where(v > 1, np.nan, v), t), ValueError, "vertices"),
    (lambda v, t: ([[0.0, 0.0, 0.0]], t), TypeError, "vertices"),
])
def test_bad_input_raises_naming_the_argument(rng, make_bad, exc, pattern):
    vertices, tri = random_mesh(rng)
    with pytest.raises(exc, match=pattern):
        vertex_normals(*make_bad(vertices, tri))


def test_bad_grad_out_and_adjacency_raise(rng):
    vertices, tri = random_mesh(rng)
    with pytest.raises(ValueError, match="grad_out"):
        vertex_normals_backward(vertices, tri, np.zeros((2, 14, 2)))
    with pytest.raises(ValueError, match="adjacency"):
        vertex_normals(vertices, tri, vertex_adjacency(tri, 20))
    with pytest.raises(TypeError, match="adjacency"):
        vertex_normals(vertices, tri, adjacency=tri)


# --- bad input found by the boundary audit ------------------------------------------------------

def test_vertex_normals_backward_rejects_missing_grad_out(rng):
    vertices, tri = random_mesh(rng)
    with pytest.raises(TypeError, match="grad_out must be a numpy or cupy array"):
        vertex_normals_backward(vertices, tri, None)


@pytest.mark.parametrize("n_vertices, exc", [
    (None, TypeError), ("14", TypeError), (13.5, TypeError), (True, TypeError), (2**40, ValueError), (0, ValueError),
])
def test_vertex_adjacency_rejects_bad_n_vertices(rng, n_vertices, exc):
    _, tri = random_mesh(rng)
    with pytest.raises(exc, match="n_vertices must be"):
        vertex_adjacency(tri, n_vertices)


def test_vertex_normals_rejects_malformed_adjacency(rng):
    # A hand-made VertexAdjacency whose arrays are too short would be read out of bounds.
    vertices, tri = random_mesh(rng)
    good = vertex_adjacency(tri, 14)
    short = fastface.VertexAdjacency(offsets=good.offsets, corners=good.corners[:2], n_vertices=14, n_triangles=20)
    with pytest.raises(ValueError, match="adjacency.corners must have shape"):
        vertex_normals(vertices, tri, short)
    wide = fastface.VertexAdjacency(offsets=good.offsets.astype(np.int64), corners=good.corners, n_vertices=14,
                                    n_triangles=20)
    with pytest.raises(TypeError, match="adjacency.offsets must be int32"):
        vertex_normals_backward(vertices, tri, vertices, wide)


# --- the CUDA adjacency kernels, emulated on the host -------------------------------------------
# kernels/normals.cu compiled as C++ with a small shim (blockIdx & co. as globals, atomics as
# plain read-modify-writes) and launched by the library's own sequence (_build_adjacency_on_device)
# with the threads of each launch run one by one in a random order: the slots the atomics hand out
# change from run to run, as on a GPU, and the result must still equal the reference exactly.
# This catches a logic slip in the kernels on machines without a GPU; the GPU tests above check
# the real thing.

_EMU_SHIM = r"""
#include <cmath>
#include <math.h>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct dim3 { unsigned int x, y, z; };
static dim3 blockIdx, blockDim, threadIdx;
inline int atomicAdd(int* p, int v) { const int o = *p; *p = o + v; return o; }
inline int atomicSub(int* p, int v) { const int o = *p; *p = o - v; return o; }
#include "normals.cu"
static void set_thread(long long flat) {
    blockDim = {256u, 1u, 1u};
    blockIdx = {(unsigned int)(flat / 256), 0u, 0u};
    threadIdx = {(unsigned int)(flat % 256), 0u, 0u};
}
extern "C" {
void emu_vertex_adjacency_count(const long long* order, long long n, const int* tri, int* counts, int T, int V) {
    for (long long i = 0; i < n; ++i) { set_thread(order[i]); vertex_adjacency_count(tri, counts, T, V); }
}
void emu_vertex_adjacency_scatter(const long long* order, long long n, const int* tri, int* offsets, int* corners,
                                  int T, int V) {
    for (long long i = 0; i < n; ++i) { set_thread(order[i]); vertex_adjacency_scatter(tri, offsets, corners, T, V); }
}
void emu_vertex_adjacency_sort(const long long* order, long long n, const int* tri, const int* offsets, int* corners,
                               int T, int V) {
    for (long long i = 0; i < n; ++i) { set_thread(order[i]); vertex_adjacency_sort(tri, offsets, corners, T, V); }
}
}
"""


@pytest.fixture(scope="module")
def cuda_emulated(tmp_path_factory):
    return build_emulated_library(tmp_path_factory.mktemp("normals_emulated"), _EMU_SHIM, ("-Wall", "-Werror"))


def emulated_launcher(lib, rng):
    """A `launch(name, n_threads, args)` for _build_adjacency_on_device that runs the emulated
    kernel over grid_1d's threads (whole blocks of 256) in a random order."""
    import ctypes

    def launch(name, n_threads, args):
        (n_blocks,), (block,) = normals_module.grid_1d(n_threads)
        order = rng.permutation(n_blocks * block).astype(np.int64)
        c_args = [a.ctypes.data_as(ctypes.c_void_p) if isinstance(a, np.ndarray) else ctypes.c_int(int(a))
                  for a in args]
        getattr(lib, "emu_" + name)(order.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(order.size), *c_args)
    return launch


def test_cuda_adjacency_kernels_emulated_on_the_host_match_the_reference(cuda_emulated, rng):
    model = fastface.FaceModel.default(level="small")
    meshes = adjacency_test_meshes(rng) + [("face model", model.triangles, model.n_vertices)]
    for name, tri, n_vertices in meshes:
        expected = reference_adjacency(tri, n_vertices)
        for _ in range(3):  # another thread order each time
            offsets = np.zeros(n_vertices + 1, np.int32)
            corners = np.full((3 * tri.shape[0], 2), -7, np.int32)
            normals_module._build_adjacency_on_device(np, np.ascontiguousarray(tri), offsets, corners,
                                                      emulated_launcher(cuda_emulated, rng))
            np.testing.assert_array_equal(offsets, expected[0], err_msg=name)
            np.testing.assert_array_equal(corners, expected[1], err_msg=name)
