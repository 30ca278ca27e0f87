"""vertex_normals: reference, gradients, CPU/GPU parity, bad input."""
import numpy as np
import pytest

import fastface
from fastface.ops.normals import vertex_adjacency, vertex_normals, vertex_normals_backward
from tests.conftest import TOLERANCES
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
    cpu, gpu = vertex_adjacency(tri, 50), vertex_adjacency(cupy.asarray(tri), 50)
    np.testing.assert_array_equal(gpu.offsets.get(), cpu.offsets)
    np.testing.assert_array_equal(gpu.corners.get(), cpu.corners)


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
