"""sh_shade: reference, gradients, CPU/GPU parity, bad input."""
import math

import numpy as np
import pytest

from fastface.ops.normals import vertex_adjacency, vertex_normals, vertex_normals_backward
from fastface.ops.shading import sh_shade, sh_shade_backward, shade_vertices, shade_vertices_backward
from tests.conftest import TOLERANCES
from tests.gradcheck import assert_gradient_matches
from tests.ops.test_normals import grid_mesh

F64 = dict(rtol=TOLERANCES["float64_reference_rtol"], atol=TOLERANCES["float64_reference_atol"])
F32 = dict(atol=TOLERANCES["float32_reference_atol"])


def reference_shade(normals, albedo, sh):
    """The conventions' SH formula written out term by term in float64, one vertex at a time."""
    normals, albedo, sh = (np.asarray(a, dtype=np.float64) for a in (normals, albedo, sh))
    pi = math.pi
    c0, c1 = 1 / (2 * math.sqrt(pi)), math.sqrt(3) / (2 * math.sqrt(pi))
    c2, c3 = math.sqrt(15) / (2 * math.sqrt(pi)), math.sqrt(5) / (4 * math.sqrt(pi))
    c4 = math.sqrt(15) / (4 * math.sqrt(pi))
    a0, a1, a2 = pi, 2 * pi / 3, pi / 4
    B, V = normals.shape[:2]
    albedo = np.broadcast_to(albedo, (B, V, 3))
    out = np.zeros((B, V, 3))
    for b in range(B):
        for v in range(V):
            x, y, z = normals[b, v]
            Y = [c0, c1 * y, c1 * z, c1 * x, c2 * x * y, c2 * y * z, c3 * (3 * z * z - 1), c2 * x * z,
                 c4 * (x * x - y * y)]
            A = [a0, a1, a1, a1, a2, a2, a2, a2, a2]
            for c in range(3):
                out[b, v, c] = albedo[b, v, c] * sum(sh[b, k, c] * A[k] * Y[k] for k in range(9))
    return out


def make_inputs(rng, batch=2, n_vertices=17, dtype=np.float64, shared_albedo=False):
    normals = rng.normal(size=(batch, n_vertices, 3))
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    albedo = rng.uniform(0.1, 1.0, size=(n_vertices, 3) if shared_albedo else (batch, n_vertices, 3))
    sh = rng.normal(scale=0.3, size=(batch, 9, 3))
    return normals.astype(dtype), albedo.astype(dtype), sh.astype(dtype)


@pytest.mark.parametrize("shared_albedo", [False, True])
def test_colours_match_the_design_formula(rng, shared_albedo):
    normals, albedo, sh = make_inputs(rng, shared_albedo=shared_albedo)
    np.testing.assert_allclose(sh_shade(normals, albedo, sh), reference_shade(normals, albedo, sh),
                               **F64)


def test_float32_colours_match_reference(rng):
    normals, albedo, sh = make_inputs(rng, dtype=np.float32)
    colours = sh_shade(normals, albedo, sh)
    assert colours.dtype == np.float32
    np.testing.assert_allclose(colours, reference_shade(normals, albedo, sh), **F32)


def test_uniform_light_gives_the_albedo(rng):
    normals, albedo, _ = make_inputs(rng)
    sh = np.zeros((2, 9, 3))
    sh[:, 0, :] = 1.0 / (math.pi * 0.28209479177387814)
    np.testing.assert_allclose(sh_shade(normals, albedo, sh), albedo, **F64)
    sh[:, 0, :] = 1.0 / (math.pi * 0.282095)  # the conventions' rounded constant: equal to 1e-6
    np.testing.assert_allclose(sh_shade(normals, albedo, sh), albedo, **F32)


def test_directional_band1_light_follows_the_normal(rng):
    # Only the coefficient of Y_2 = c1 z is lit: colour = albedo * A_1 * c1 * n_z.
    normals, albedo, _ = make_inputs(rng)
    sh = np.zeros((2, 9, 3))
    sh[:, 2, :] = 1.0
    expected = albedo * (2 * math.pi / 3) * (math.sqrt(3) / (2 * math.sqrt(math.pi))) * normals[..., 2:3]
    np.testing.assert_allclose(sh_shade(normals, albedo, sh), expected, **F64)


def test_unbatched_input_gives_unbatched_output(rng):
    normals, albedo, sh = make_inputs(rng)
    np.testing.assert_array_equal(sh_shade(normals[1], albedo[1], sh[1]), sh_shade(normals, albedo, sh)[1])
    grad_out = rng.normal(size=normals.shape)
    for single, batch in zip(sh_shade_backward(normals[1], albedo[1], sh[1], grad_out[1]),
                             sh_shade_backward(normals, albedo, sh, grad_out)):
        np.testing.assert_allclose(single, batch[1], **F64)


def test_shared_albedo_gradient_is_the_batch_sum(rng):
    normals, albedo, sh = make_inputs(rng, batch=3, shared_albedo=True)
    grad_out = rng.normal(size=normals.shape)
    _, grad_shared, _ = sh_shade_backward(normals, albedo, sh, grad_out)
    _, grad_batched, _ = sh_shade_backward(normals, np.broadcast_to(albedo, normals.shape).copy(), sh, grad_out)
    assert grad_shared.shape == albedo.shape
    np.testing.assert_allclose(grad_shared, grad_batched.sum(0), **F64)


@pytest.mark.parametrize("shared_albedo", [False, True])
@pytest.mark.parametrize("wrt", [0, 1, 2])
def test_backward_matches_finite_differences(rng, tol, wrt, shared_albedo):
    inputs = list(make_inputs(rng, shared_albedo=shared_albedo))
    grad_out = rng.normal(size=inputs[0].shape)
    analytic = sh_shade_backward(*inputs, grad_out)[wrt]

    def f(x):
        args = list(inputs)
        args[wrt] = x
        return sh_shade(*args)

    assert_gradient_matches(f, inputs[wrt], grad_out, analytic, tol)


def test_grad_sh_sums_over_more_vertices_than_one_chunk(rng, tol):
    # 2500 vertices span three CPU chunks of 1024: the chunk partials must all reach grad_sh.
    normals, albedo, sh = make_inputs(rng, batch=1, n_vertices=2500)
    grad_out = rng.normal(size=normals.shape)
    grad_sh = sh_shade_backward(normals, albedo, sh, grad_out)[2]
    assert_gradient_matches(lambda s: sh_shade(normals, albedo, s), sh, grad_out, grad_sh, tol)


@pytest.mark.parametrize("shared_albedo", [False, True])
def test_gpu_matches_cpu(rng, tol, cupy, shared_albedo):
    # 3000 vertices: several blocks per batch element in the backward's reduction.
    normals, albedo, sh = make_inputs(rng, batch=3, n_vertices=3000, dtype=np.float32, shared_albedo=shared_albedo)
    grad_out = rng.normal(size=normals.shape).astype(np.float32)
    gpu = [cupy.asarray(a) for a in (normals, albedo, sh, grad_out)]
    np.testing.assert_allclose(sh_shade(*gpu[:3]).get(), sh_shade(normals, albedo, sh),
                               rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
    cpu_grads = sh_shade_backward(normals, albedo, sh, grad_out)
    for name, g_gpu, g_cpu in zip(("normals", "albedo", "sh"), sh_shade_backward(*gpu), cpu_grads):
        assert g_gpu.shape == g_cpu.shape and g_gpu.dtype == cupy.float32, name
        # grad_sh sums 3000 float32 terms: compare relative to its size.
        np.testing.assert_allclose(g_gpu.get(), g_cpu, rtol=tol["gpu_cpu_rtol"],
                                   atol=tol["gpu_cpu_rtol"] * np.abs(g_cpu).max(), err_msg=name)


def test_gpu_unbatched(rng, tol, cupy):
    normals, albedo, sh = make_inputs(rng, dtype=np.float32)
    out = sh_shade(cupy.asarray(normals[0]), cupy.asarray(albedo[0]), cupy.asarray(sh[0]))
    np.testing.assert_allclose(out.get(), sh_shade(normals[0], albedo[0], sh[0]), rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])


def test_gpu_rejects_float64(rng, cupy):
    normals, albedo, sh = make_inputs(rng)
    with pytest.raises(TypeError, match="normals.*GPU path is float32"):
        sh_shade(cupy.asarray(normals), cupy.asarray(albedo), cupy.asarray(sh))


# --- shade_vertices: the fused normals + shading ---------------------------------------------------

def make_mesh_inputs(rng, batch=2, dtype=np.float64, shared_albedo=False):
    flat, tri = grid_mesh(5, 6)
    vertices = flat + 0.3 * rng.normal(size=(batch,) + flat.shape)
    V = len(flat)
    albedo = rng.uniform(0.1, 1.0, size=(V, 3) if shared_albedo else (batch, V, 3))
    sh = rng.normal(scale=0.3, size=(batch, 9, 3))
    return vertices.astype(dtype), tri, albedo.astype(dtype), sh.astype(dtype)


@pytest.mark.parametrize("shared_albedo", [False, True])
def test_fused_shading_equals_normals_then_sh_shade(rng, shared_albedo):
    vertices, tri, albedo, sh = make_mesh_inputs(rng, shared_albedo=shared_albedo)
    grad_out = rng.normal(size=vertices.shape)
    normals = vertex_normals(vertices, tri)
    np.testing.assert_allclose(shade_vertices(vertices, tri, albedo, sh), sh_shade(normals, albedo, sh), **F64)
    grad_normals, grad_albedo, grad_sh = sh_shade_backward(normals, albedo, sh, grad_out)
    expected = (vertex_normals_backward(vertices, tri, grad_normals), grad_albedo, grad_sh)
    for got, want in zip(shade_vertices_backward(vertices, tri, albedo, sh, grad_out), expected):
        np.testing.assert_allclose(got, want, **F64)


@pytest.mark.parametrize("wrt", [0, 2, 3])
def test_fused_backward_matches_finite_differences(rng, tol, wrt):
    inputs = list(make_mesh_inputs(rng))
    grad_out = rng.normal(size=inputs[0].shape)
    analytic = shade_vertices_backward(*inputs, grad_out)[{0: 0, 2: 1, 3: 2}[wrt]]

    def f(x):
        args = list(inputs)
        args[wrt] = x
        return shade_vertices(*args)

    assert_gradient_matches(f, inputs[wrt], grad_out, analytic, tol)


@pytest.mark.parametrize("shared_albedo", [False, True])
def test_fused_backward_adds_the_albedo_gradient_into_add_to(rng, shared_albedo):
    vertices, tri, albedo, sh = make_mesh_inputs(rng, shared_albedo=shared_albedo)
    grad_out = rng.normal(size=vertices.shape)
    want = shade_vertices_backward(vertices, tri, albedo, sh, grad_out)
    start = rng.normal(size=albedo.shape)
    acc = start.copy()
    got = shade_vertices_backward(vertices, tri, albedo, sh, grad_out, add_to_albedo=acc)
    assert got[1] is acc
    np.testing.assert_allclose(acc, start + want[1], rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[2], want[2], rtol=1e-13, atol=1e-13)
    with pytest.raises(ValueError, match="add_to_albedo must have shape"):
        shade_vertices_backward(vertices, tri, albedo, sh, grad_out, add_to_albedo=np.zeros((1, 3)))
    with pytest.raises(TypeError, match="add_to_albedo must be float64"):
        shade_vertices_backward(vertices, tri, albedo, sh, grad_out, add_to_albedo=start.astype(np.float32))
    with pytest.raises(ValueError, match="add_to_albedo must not share memory with albedo"):
        shade_vertices_backward(vertices, tri, albedo, sh, grad_out, add_to_albedo=albedo)


def test_fused_unbatched_and_prebuilt_adjacency(rng):
    vertices, tri, albedo, sh = make_mesh_inputs(rng)
    adjacency = vertex_adjacency(tri, vertices.shape[1])
    np.testing.assert_array_equal(shade_vertices(vertices[1], tri, albedo[1], sh[1], adjacency),
                                  shade_vertices(vertices, tri, albedo, sh)[1])
    grad_out = rng.normal(size=vertices.shape)
    for single, batch in zip(shade_vertices_backward(vertices[1], tri, albedo[1], sh[1], grad_out[1], adjacency),
                             shade_vertices_backward(vertices, tri, albedo, sh, grad_out)):
        np.testing.assert_allclose(single, batch[1], **F64)


@pytest.mark.parametrize("shared_albedo", [False, True])
def test_gpu_fused_matches_cpu(rng, tol, cupy, shared_albedo):
    flat, tri = grid_mesh(40, 60)  # 2400 vertices: several blocks per batch element
    vertices = (flat + 0.2 * rng.normal(size=(3,) + flat.shape)).astype(np.float32)
    V = len(flat)
    albedo = rng.uniform(0.1, 1.0, size=(V, 3) if shared_albedo else (3, V, 3)).astype(np.float32)
    sh = rng.normal(scale=0.3, size=(3, 9, 3)).astype(np.float32)
    grad_out = rng.normal(size=vertices.shape).astype(np.float32)
    gpu = [cupy.asarray(a) for a in (vertices, tri, albedo, sh, grad_out)]
    adjacency = vertex_adjacency(gpu[1], V)
    np.testing.assert_allclose(shade_vertices(*gpu[:4], adjacency).get(), shade_vertices(vertices, tri, albedo, sh),
                               rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
    cpu_grads = shade_vertices_backward(vertices, tri, albedo, sh, grad_out)
    for name, g_gpu, g_cpu in zip(("vertices", "albedo", "sh"), shade_vertices_backward(*gpu, adjacency), cpu_grads):
        assert g_gpu.shape == g_cpu.shape and g_gpu.dtype == cupy.float32, name
        np.testing.assert_allclose(g_gpu.get(), g_cpu, rtol=tol["gpu_cpu_rtol"],
                                   atol=tol["gpu_cpu_rtol"] * np.abs(g_cpu).max(), err_msg=name)


@pytest.mark.parametrize("shared_albedo", [False, True])
@pytest.mark.parametrize("mesh", ["grid", "scattered"])
def test_gpu_matches_cpu_on_local_and_scattered_vertex_orders(rng, tol, cupy, shared_albedo, mesh):
    # Plain and fused: 45 x 70 vertices make 13 blocks of 256 (the last partial, several per
    # backward block); "scattered" renumbers the vertices at random so that the fused kernels'
    # neighbours lie far apart in memory.
    flat, tri = grid_mesh(45, 70)
    if mesh == "scattered":
        perm = rng.permutation(len(flat))
        flat, tri = flat[np.argsort(perm)], perm[tri].astype(np.int32)
    vertices = (flat + 0.2 * rng.normal(size=(2,) + flat.shape)).astype(np.float32)
    V = len(flat)
    albedo = rng.uniform(0.1, 1.0, size=(V, 3) if shared_albedo else (2, V, 3)).astype(np.float32)
    sh = rng.normal(scale=0.3, size=(2, 9, 3)).astype(np.float32)
    grad_out = rng.normal(size=vertices.shape).astype(np.float32)
    normals = vertex_normals(vertices, tri)
    gpu = [cupy.asarray(a) for a in (vertices, tri, albedo, sh, grad_out, normals)]
    adjacency = vertex_adjacency(gpu[1], V)
    close = dict(rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
    np.testing.assert_allclose(sh_shade(gpu[5], gpu[2], gpu[3]).get(), sh_shade(normals, albedo, sh), **close)
    np.testing.assert_allclose(shade_vertices(*gpu[:4], adjacency).get(), shade_vertices(vertices, tri, albedo, sh),
                               **close)
    pairs = [(sh_shade_backward(*(gpu[i] for i in (5, 2, 3, 4))), sh_shade_backward(normals, albedo, sh, grad_out)),
             (shade_vertices_backward(*gpu[:5], adjacency),
              shade_vertices_backward(vertices, tri, albedo, sh, grad_out))]
    for gpu_grads, cpu_grads in pairs:
        for name, g_gpu, g_cpu in zip(("positions", "albedo", "sh"), gpu_grads, cpu_grads):
            assert g_gpu.shape == g_cpu.shape and g_gpu.dtype == cupy.float32, name
            np.testing.assert_allclose(g_gpu.get(), g_cpu, rtol=tol["gpu_cpu_rtol"],
                                       atol=tol["gpu_cpu_rtol"] * np.abs(g_cpu).max(), err_msg=name)


def test_fused_bad_input_raises_naming_the_argument(rng):
    vertices, tri, albedo, sh = make_mesh_inputs(rng)
    with pytest.raises(ValueError, match="albedo"):
        shade_vertices(vertices, tri, albedo[:, :3], sh)
    with pytest.raises(ValueError, match="sh"):
        shade_vertices(vertices, tri, albedo, sh[:1])
    with pytest.raises(ValueError, match="tri"):
        shade_vertices(vertices, tri + 100, albedo, sh)
    with pytest.raises(TypeError, match="vertices"):
        shade_vertices(vertices.astype(np.int32), tri, albedo, sh)


@pytest.mark.parametrize("make_bad, exc, pattern", [
    (lambda n, a, s: (n[..., :2], a, s), ValueError, "normals"),
    (lambda n, a, s: (n.astype(np.int64), a, s), TypeError, "normals"),
    (lambda n, a, s: (n, a.astype(np.float32), s), TypeError, "albedo"),
    (lambda n, a, s: (n, a[:, :5], s), ValueError, "albedo"),
    (lambda n, a, s: (n, a[:1], s), ValueError, "albedo"),
    (lambda n, a, s: (n, a, s[:, :4]), ValueError, "sh"),
    (lambda n, a, s: (n, a, s[:1]), ValueError, "batch sizes differ: normals has 2, sh has 1"),
    (lambda n, a, s: (n[0], a[0], s), ValueError, "sh"),
    (lambda n, a, s: (n, a, np.full_like(s, np.inf)), ValueError, "sh holds"),
    (lambda n, a, s: (n, np.where(a > 0.5, np.nan, a), s), ValueError, "albedo holds"),
])
def test_bad_input_raises_naming_the_argument(rng, make_bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sh_shade(*make_bad(*make_inputs(rng)))


def test_bad_grad_out_raises(rng):
    normals, albedo, sh = make_inputs(rng)
    with pytest.raises(ValueError, match="grad_out"):
        sh_shade_backward(normals, albedo, sh, np.zeros((2, 17, 4)))


# --- bad input found by the boundary audit ------------------------------------------------------

def test_sh_shade_backward_rejects_missing_grad_out(rng):
    with pytest.raises(TypeError, match="grad_out must be a numpy or cupy array"):
        sh_shade_backward(*make_inputs(rng), None)


def test_shade_vertices_backward_rejects_missing_grad_out(rng):
    vertices, tri, albedo, sh = make_mesh_inputs(rng)
    with pytest.raises(TypeError, match="grad_out must be a numpy or cupy array"):
        shade_vertices_backward(vertices, tri, albedo, sh, None)
