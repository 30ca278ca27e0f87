"""Every GPU branch of fastface runs here on the CPU, and every kernel launch is checked against its C signature.

tests/fake_cupy.py installs a fake cupy on numpy for one test at a time: the ops take their cupy branches,
and each `KernelFile(...)(name)(grid, block, args)` is checked against the kernel's parameter list parsed
from kernels/*.cu (argument count; numpy scalar types against int / long long / float...; array dtypes and
alignment against pointer types; NULL_POINTER, never None, for a null; grid and block limits) and then
recorded instead of run. GEMMs go through a fake cuBLAS that checks cublasGemmEx's arguments and
multiplies with numpy. Nothing here checks a computed value: the kernels do not run. What it catches is a
launch that would fail, or silently pass garbage, on a GPU, on machines that have none.

The scenarios below call every public GPU op and its backward with small valid inputs, with the value
checks on (their check kernels are launched and checked too) and off. The last tests check that every
kernel the library declares was launched by some scenario (or is in NOT_LAUNCHED, with the reason) and
that the fake is gone once its tests end.
"""
import sys

import numpy as np
import pytest

import fastface
from bench.workloads import grid_mesh
from fastface import _backend, _device_checks
from fastface._backend import NULL_POINTER, KernelFile, is_cupy_array
from fastface.model import morphable as morphable_module
from fastface import _gemm
from fastface.nn import conv as conv_module
from tests import fake_cupy
from tests.fake_cupy import LaunchError, install, kernel_signature, misaligned, strided

fake_cupy.import_all_fastface_modules()  # every module declares its KernelFile at import
_rasterize_module = sys.modules["fastface.ops.rasterize"]  # fastface.ops shadows the module with the function
_camera_module = sys.modules["fastface.ops.camera"]

# What the process had before any test here ran, to check that the fake leaves nothing behind.
_REAL = {"cupy": sys.modules.get("cupy"), "cupy_or_none": _backend.cupy_or_none,
         "kernel_call": KernelFile.__dict__["__call__"], "cublas": _gemm._cublas}

# Declared kernels that no scenario launches, each with the reason. Empty: every declared kernel is
# reachable through a public op or a module switch (rasterize._FWD_PREPASS, conv.USE_PATCH_GATHER,
# conv.USE_ROWS_GATHER, Encoder.conv_algorithm), and the scenarios reach each one.
NOT_LAUNCHED = {}

# Scenarios that launch no kernel and call no GEMM by design, with the reason.
NO_LAUNCH = {
    "sample_image_mask": "computed with cupy element-wise operations; it checks no values",
    "relu": "cupy element-wise operations; with the value checks off nothing is launched",
    "value_check_helpers": "with the value checks off the helpers do nothing",
}

# Scenarios whose ops read no values, with the reason (every other one must launch a check kernel).
NO_VALUE_CHECKS = {
    "sample_image_mask": "a mask of the coordinates: NaN is an answer (False), not an error",
    "adam": "a non-finite gradient norm makes the step a no-op on the device (fastface/nn/adam.py)",
    "im2col": "the public gather and its adjoint check shapes and dtypes only (conv2d checks values)",
}


@pytest.fixture
def fake_gpu(monkeypatch):
    return install(monkeypatch)


def _on_gpu(*arrays):
    for a in arrays:
        assert is_cupy_array(a), f"expected a (fake) cupy array from the GPU branch; got {type(a)}"


def _kernels(filename, *names):
    return {(filename, n) for n in names}


def _grid_mesh(n=4):
    """(V, 2) positions in [-0.8, 0.8] and (T, 3) int32 counter-clockwise triangles of an n x n grid."""
    xy, tri = grid_mesh(n)
    return (0.8 * xy).astype(np.float32), tri


def _clip_positions(rng, B):
    xy, tri = _grid_mesh()
    pos = np.zeros((B, len(xy), 4), np.float32)
    pos[..., :2] = xy + rng.uniform(-0.05, 0.05, (B, len(xy), 2))
    pos[..., 2] = rng.uniform(-0.5, 0.5, (B, len(xy)))
    pos[..., 3] = 1.0
    return pos, tri


def _camera_points(rng, B, V=16):
    p = rng.normal(size=(B, V, 3)).astype(np.float32)
    p[..., 2] -= 20.0  # in front of the camera (z < 0), beyond near = 10
    return p


# ---------------------------------------------------------------------------------------------
# Scenarios: each calls GPU ops with fake cupy arrays and returns the (file, kernel) pairs it must launch.

def scenario_rasterize(cp, rng, monkeypatch):
    pos, tri = _clip_positions(rng, 3)
    g_tri = cp.asarray(tri)
    # Batched and unbatched positions, and positions the kernels cannot take as they are (float4 loads).
    for p in (cp.asarray(pos), cp.asarray(pos[0]), misaligned(cp, pos), strided(cp, pos)):
        for cull in (False, True):
            raster = fastface.rasterize(p, g_tri, (8, 12), cull_backfaces=cull)
            _on_gpu(raster.tri_id, raster.bary, raster.depth)
        grad_bary = cp.asarray(rng.normal(size=raster.bary.shape).astype(np.float32))
        _on_gpu(fastface.rasterize_backward(p, g_tri, raster, grad_bary))
    return _kernels("rasterize.cu", "rasterize_fwd", "rasterize_resolve<0>", "rasterize_bwd")


def scenario_rasterize_prepass(cp, rng, monkeypatch):
    """The vertex setup as a pass of its own (rasterize._FWD_PREPASS, for profiling)."""
    pos, tri = _clip_positions(rng, 2)
    with monkeypatch.context() as m:
        m.setattr(_rasterize_module, "_FWD_PREPASS", True)
        raster, out = fastface.rasterize_interpolate(cp.asarray(pos), cp.asarray(tri), (8, 8),
                                                     cp.asarray(rng.uniform(size=(16, 3)).astype(np.float32)))
    _on_gpu(raster.tri_id, out)
    return _kernels("rasterize.cu", "rasterize_setup", "rasterize_fwd_screen", "rasterize_resolve<3>")


def scenario_rasterize_interpolate(cp, rng, monkeypatch):
    pos, tri = _clip_positions(rng, 2)
    g_pos, g_tri = cp.asarray(pos), cp.asarray(tri)
    for C in (1, 2, 3, 4, 5):
        for batched in (False, True):
            attr = rng.uniform(size=(2, 16, C) if batched else (16, C)).astype(np.float32)
            g_attr = cp.asarray(attr) if C < 4 else misaligned(cp, attr)
            raster, out = fastface.rasterize_interpolate(g_pos, g_tri, (8, 10), g_attr)
            _on_gpu(raster.tri_id, out)
            grad_out = cp.asarray(rng.normal(size=out.shape).astype(np.float32))
            grad_pos, grad_attr = fastface.rasterize_interpolate_backward(g_pos, g_tri, g_attr, raster, grad_out)
            _on_gpu(grad_pos, grad_attr)
            assert grad_attr.shape == attr.shape
    return (_kernels("rasterize.cu", "rasterize_fwd", "float4_to_float3")
            | _kernels("rasterize.cu", *(f"rasterize_resolve<{c}>" for c in (1, 2, 3, 4, -1)))
            | _kernels("rasterize.cu", *(f"rasterize_interpolate_bwd<{c}>" for c in (1, 2, 3, 4, -1))))


def scenario_interpolate(cp, rng, monkeypatch):
    pos, tri = _clip_positions(rng, 2)
    g_tri = cp.asarray(tri)
    raster = fastface.rasterize(cp.asarray(pos), g_tri, (6, 7))
    for C in (1, 2, 3, 4, 5):
        for batched in (False, True):
            attr = rng.uniform(size=(2, 16, C) if batched else (16, C)).astype(np.float32)
            attr = strided(cp, attr) if C == 4 else misaligned(cp, attr) if C == 3 else cp.asarray(attr)
            out = fastface.interpolate(attr, raster, g_tri)
            grad_out = cp.asarray(rng.normal(size=out.shape).astype(np.float32))
            grad_attr, grad_bary = fastface.interpolate_backward(attr, raster, g_tri, grad_out)
            _on_gpu(out, grad_attr, grad_bary)
            assert grad_attr.shape == attr.shape
    return (_kernels("interpolate.cu", *(f"interpolate_{d}<{c}>" for d in ("fwd", "bwd") for c in (1, 2, 3, 4, -1)))
            | _kernels("rasterize.cu", "float4_to_float3"))


def scenario_antialias(cp, rng, monkeypatch):
    pos, tri = _clip_positions(rng, 2)
    g_pos, g_tri = cp.asarray(pos), cp.asarray(tri)
    raster = fastface.rasterize(g_pos, g_tri, (9, 11))
    topology = fastface.antialias_topology(g_tri)
    _on_gpu(topology.opposite)
    # Batched and unbatched positions, positions the kernels cannot take as they are (float4 loads),
    # a topology given and built in the call, and 3 or 5 channels.
    for p, t, C in ((g_pos, topology, 3), (misaligned(cp, pos), None, 5), (strided(cp, pos[:1]), topology, 3),
                    (cp.asarray(pos[0]), topology, 1)):
        B = 1 if p.ndim == 2 or p.shape[0] == 1 else 2
        r = raster if B == 2 else fastface.Raster(raster.tri_id[:1], raster.bary[:1], raster.depth[:1])
        color = cp.asarray(rng.uniform(size=(B, 9, 11, C)).astype(np.float32))
        out = fastface.antialias(color, r, p, g_tri, topology=t)
        grad_color, grad_pos = fastface.antialias_backward(color, r, p, g_tri, cp.asarray(
            rng.normal(size=out.shape).astype(np.float32)), topology=t)
        _on_gpu(out, grad_color, grad_pos)
        assert grad_pos.shape == p.shape
        sil = fastface.ops.silhouette_edges(p, g_tri, topology=t)
        _on_gpu(sil)
        assert sil.shape == (B if p.ndim == 3 else 1, tri.shape[0])
    return _kernels("antialias.cu", "antialias_silhouettes", "antialias_silhouette_pixels", "antialias_fwd",
                    "antialias_bwd")


def scenario_many_images(cp, rng, monkeypatch):
    """More images than a grid's y dimension takes (65535): the pixel kernels loop over gridDim.y."""
    B = 70000
    pos = np.zeros((B, 3, 4), np.float32)
    pos[:, :, :2] = [[-1, -1], [3, -1], [-1, 3]]  # one triangle over the 1 x 1 image
    pos[:, :, 3] = 1
    g_pos, g_tri = cp.asarray(pos), cp.asarray(np.array([[0, 1, 2]], np.int32))
    attr = cp.asarray(np.eye(3, dtype=np.float32))
    raster = fastface.rasterize(g_pos, g_tri, (1, 1))
    _on_gpu(fastface.rasterize_backward(g_pos, g_tri, raster, cp.zeros((B, 1, 1, 2), np.float32)))
    grad_out = cp.zeros((B, 1, 1, 3), np.float32)
    raster, out = fastface.rasterize_interpolate(g_pos, g_tri, (1, 1), attr)
    _on_gpu(out, *fastface.rasterize_interpolate_backward(g_pos, g_tri, attr, raster, grad_out))
    _on_gpu(fastface.interpolate(attr, raster, g_tri), *fastface.interpolate_backward(attr, raster, g_tri, grad_out))
    angles = cp.zeros((B, 3), np.float32)
    _on_gpu(fastface.euler_rotation(angles), fastface.euler_rotation_backward(angles, cp.zeros((B, 3, 3), np.float32)))
    points = cp.asarray(np.broadcast_to(np.float32([0, 0, -20]), (B, 1, 3)).copy())
    _on_gpu(fastface.project_to_pixels(points, 100.0, (4, 4)), fastface.perspective_projection(points, 100.0, (4, 4)))
    _on_gpu(fastface.antialias(out, raster, g_pos, g_tri),
            *fastface.antialias_backward(out, raster, g_pos, g_tri, cp.zeros_like(out)))
    return (_kernels("rasterize.cu", "rasterize_fwd", "rasterize_resolve<0>", "rasterize_bwd", "rasterize_resolve<3>",
                     "rasterize_interpolate_bwd<3>")
            | _kernels("interpolate.cu", "interpolate_fwd<3>", "interpolate_bwd<3>")
            | _kernels("antialias.cu", "antialias_silhouette_pixels", "antialias_fwd", "antialias_bwd"))


def scenario_vertex_normals(cp, rng, monkeypatch):
    _, tri = _grid_mesh()
    g_tri = cp.asarray(tri)
    adjacency = fastface.vertex_adjacency(g_tri, 16)
    _on_gpu(adjacency.offsets, adjacency.corners)
    for vertices in (_camera_points(rng, 3), _camera_points(rng, 1)[0]):
        grad_out = strided(cp, rng.normal(size=vertices.shape).astype(np.float32))
        for v, adj in ((cp.asarray(vertices), adjacency), (strided(cp, vertices), None)):  # None: built in the call
            normals = fastface.vertex_normals(v, g_tri, adjacency=adj)
            grad = fastface.vertex_normals_backward(v, g_tri, grad_out, adjacency=adj)
            _on_gpu(normals, grad)
    return _kernels("normals.cu", "vertex_adjacency_count", "vertex_adjacency_scatter", "vertex_adjacency_sort",
                    "vertex_normals_fwd", "vertex_normals_bwd_sum", "vertex_normals_bwd")


def _lighting(cp, rng, B, V, shared_albedo):
    albedo = rng.uniform(size=(V, 3) if shared_albedo else (B, V, 3)).astype(np.float32)
    return cp.asarray(albedo), cp.asarray(rng.normal(size=(B, 9, 3)).astype(np.float32))


def scenario_sh_shade(cp, rng, monkeypatch):
    B, V = 3, 300
    normals = rng.normal(size=(B, V, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    for shared in (True, False):
        albedo, sh = _lighting(cp, rng, B, V, shared)
        n = cp.asarray(normals) if shared else strided(cp, normals)
        colours = fastface.sh_shade(n, albedo, sh)
        grads = fastface.sh_shade_backward(n, albedo, sh, cp.asarray(rng.normal(size=(B, V, 3)).astype(np.float32)))
        _on_gpu(colours, *grads)
    albedo, sh = _lighting(cp, rng, 1, V, True)  # unbatched
    n = cp.asarray(normals[0])
    _on_gpu(fastface.sh_shade(n, albedo, sh[0]),
            *fastface.sh_shade_backward(n, albedo, sh[0], cp.asarray(np.ones((V, 3), np.float32))))
    return _kernels("shading.cu", *(f"sh_shade_{d}<{s}>" for d in ("fwd", "bwd") for s in ("false", "true")))


def scenario_shade_vertices(cp, rng, monkeypatch):
    _, tri = _grid_mesh()
    g_tri = cp.asarray(tri)
    adjacency = fastface.vertex_adjacency(g_tri, 16)
    B = 2
    for shared in (True, False):
        for adj in (adjacency, None):
            v = cp.asarray(_camera_points(rng, B))
            albedo, sh = _lighting(cp, rng, B, 16, shared)
            colours = fastface.shade_vertices(v, g_tri, albedo, sh, adjacency=adj)
            grads = fastface.shade_vertices_backward(v, g_tri, albedo, sh, cp.asarray(np.ones((B, 16, 3), np.float32)),
                                                     adjacency=adj)
            _on_gpu(colours, *grads)
            added = fastface.shade_vertices_backward(v, g_tri, albedo, sh, cp.asarray(np.ones((B, 16, 3), np.float32)),
                                                     adjacency=adj, add_to_albedo=cp.zeros(albedo.shape, np.float32))
            _on_gpu(*added)
    v = cp.asarray(_camera_points(rng, 1)[0])
    albedo, sh = _lighting(cp, rng, 1, 16, True)
    _on_gpu(fastface.shade_vertices(v, g_tri, albedo, sh[0], adjacency=adjacency))
    return (_kernels("shading.cu", *(f"shade_vertices_{d}<{s}>" for d in ("fwd", "bwd_sum") for s in ("false", "true")))
            | _kernels("normals.cu", "vertex_normals_bwd"))


def scenario_euler_rotation(cp, rng, monkeypatch):
    for shape in ((5, 3), (3,)):
        angles = strided(cp, rng.uniform(-1, 1, size=shape).astype(np.float32))
        rotation = fastface.euler_rotation(angles)
        grad = fastface.euler_rotation_backward(angles, cp.asarray(np.ones(shape[:-1] + (3, 3), np.float32)))
        _on_gpu(rotation, grad)
        assert grad.shape == shape
    return _kernels("camera.cu", "euler_rotation_fwd", "euler_rotation_bwd")


def scenario_rigid_transform(cp, rng, monkeypatch):
    B, V = 3, 600  # more than one block of vertices
    rotation = cp.asarray(np.tile(np.eye(3, dtype=np.float32), (B, 1, 1)))
    translation = cp.asarray(rng.normal(size=(B, 3)).astype(np.float32))
    for points in (_camera_points(rng, B, V), _camera_points(rng, 1, V)[0]):  # per image, and shared
        p = strided(cp, points)
        out = fastface.rigid_transform(p, rotation, translation)
        grads = fastface.rigid_transform_backward(p, rotation, translation,
                                                  cp.asarray(rng.normal(size=(B, V, 3)).astype(np.float32)))
        _on_gpu(out, *grads)
        assert grads[0].shape == points.shape
        added = fastface.rigid_transform_backward(p, rotation, translation,
                                                  cp.asarray(rng.normal(size=(B, V, 3)).astype(np.float32)),
                                                  add_to=cp.zeros(points.shape, np.float32))
        _on_gpu(*added)
    return _kernels("camera.cu", *(f"rigid_transform_{d}<{s}>" for d in ("fwd", "bwd") for s in ("false", "true")))


def _projection_scenario(cp, rng, forward, backward, width):
    for points in (_camera_points(rng, 3), _camera_points(rng, 1)[0]):
        p = strided(cp, points) if points.ndim == 3 else cp.asarray(points)
        B = points.shape[0] if points.ndim == 3 else 1
        for focal in (500.0, np.float32(500.0), 400, cp.asarray(np.full(B, 480.0, np.float32))):
            out = forward(p, focal, (24, 32))
            grad_out = cp.asarray(rng.normal(size=points.shape[:-1] + (width,)).astype(np.float32))
            grad = backward(p, focal, (24, 32), grad_out)
            _on_gpu(out, grad)
            assert grad.shape == points.shape


def scenario_perspective_projection(cp, rng, monkeypatch):
    _projection_scenario(cp, rng, fastface.perspective_projection, fastface.perspective_projection_backward, 4)
    return _kernels("camera.cu", "perspective_projection_fwd", "perspective_projection_bwd")


def scenario_project_to_pixels(cp, rng, monkeypatch):
    _projection_scenario(cp, rng, fastface.project_to_pixels, fastface.project_to_pixels_backward, 2)
    return _kernels("camera.cu", "project_to_pixels_fwd", "project_to_pixels_bwd")


def scenario_sample_image(cp, rng, monkeypatch):
    for batched in (True, False):
        image = rng.uniform(size=(2, 9, 11, 3) if batched else (9, 11, 3)).astype(np.float32)
        points = rng.uniform(-1, 12, size=(2, 40, 2) if batched else (40, 2)).astype(np.float32)
        im, pts = (strided(cp, image), strided(cp, points)) if batched else (cp.asarray(image), cp.asarray(points))
        samples = fastface.sample_image(im, pts)
        grad_image, grad_points = fastface.sample_image_backward(
            im, pts, cp.asarray(rng.normal(size=points.shape[:-1] + (3,)).astype(np.float32)))
        _on_gpu(samples, grad_image, grad_points)
    return _kernels("sampling.cu", "sample_image_fwd", "sample_image_bwd")


def scenario_sample_image_mask(cp, rng, monkeypatch):
    mask = fastface.sample_image_mask(cp.asarray(rng.uniform(-1, 12, size=(2, 40, 2)).astype(np.float32)), (9, 11))
    _on_gpu(mask)
    assert mask.dtype == np.bool_ and mask.shape == (2, 40)
    return set()


_CPU_MODEL = {}


def scenario_photometric_loss(cp, rng, monkeypatch):
    """Bool and float masks; one pixel a thread (H * W = 99, or C = 1) and quads of 4 pixels (C = 3, H * W =
    6300: float4 colours, the mask as unsigned int or float4); one chunk and several; contiguous, strided
    and misaligned inputs (copied before float4 loads) and a misaligned `out` (written through a copy)."""
    for shape, C in (((2, 9, 11), 3), ((2, 70, 90), 3), ((1, 4, 6), 1)):
        rendered = rng.uniform(size=shape + (C,)).astype(np.float32)
        target = rng.uniform(size=shape + (C,)).astype(np.float32)
        for mask in (rng.uniform(size=shape) < 0.5, rng.uniform(size=shape).astype(np.float32)):
            r, t, m = strided(cp, rendered), cp.asarray(target), cp.asarray(mask)
            grad_out = cp.asarray(np.ones(shape[0], np.float32))
            loss = fastface.photometric_loss(r, t, m)
            grad = fastface.photometric_loss_backward(r, t, m, grad_out)
            _on_gpu(loss, grad)
            assert loss.shape == (shape[0],) and grad.shape == rendered.shape
            out, grad_buffer = cp.empty(shape[0], np.float32), cp.empty(rendered.shape, np.float32)  # caller's
            assert fastface.photometric_loss(r, t, m, out=out) is out
            assert fastface.photometric_loss_backward(r, t, m, loss, out=grad_buffer) is grad_buffer
            r, t = misaligned(cp, rendered), misaligned(cp, target)
            _on_gpu(fastface.photometric_loss(r, t, m),
                    fastface.photometric_loss_backward(r, t, m, grad_out, out=misaligned(cp, rendered)))
    loads = ("unsigned char, float", "float, float", "unsigned int, float4", "float4, float4")
    return _kernels("losses.cu", "photometric_loss_fwd_sum", *(f"photometric_loss_{d}<{t}>" for d in ("fwd", "bwd")
                                                              for t in loads),
                    *(f"photometric_loss_bwd_count<{t.split(',')[0]}>" for t in loads))


def scenario_landmark_loss(cp, rng, monkeypatch):
    points = rng.uniform(0, 64, size=(3, 68, 2)).astype(np.float32)
    target = rng.uniform(0, 64, size=(3, 68, 2)).astype(np.float32)
    for weights in (np.ones(68, np.float32), rng.uniform(size=(3, 68)).astype(np.float32)):
        p, t, w = strided(cp, points), cp.asarray(target), cp.asarray(weights)
        _on_gpu(fastface.landmark_loss(p, t, w),
                fastface.landmark_loss_backward(p, t, w, cp.asarray(np.ones(3, np.float32)),
                                                out=cp.empty(points.shape, np.float32)))
    return _kernels("losses.cu", "landmark_loss_fwd", "landmark_loss_bwd")


def scenario_prior_loss(cp, rng, monkeypatch):
    coeffs = cp.asarray(rng.normal(size=(3, 80)).astype(np.float32))
    for weights in (None, cp.asarray(rng.uniform(size=80).astype(np.float32))):
        _on_gpu(fastface.prior_loss(coeffs, weights, out=cp.empty(3, np.float32)),
                fastface.prior_loss_backward(coeffs, weights, cp.asarray(np.ones(3, np.float32))))
    return _kernels("losses.cu", "prior_loss_fwd", "prior_loss_bwd")


def _small_model():
    if "small" not in _CPU_MODEL:
        _CPU_MODEL["small"] = fastface.FaceModel.default(level="small")
    return _CPU_MODEL["small"]


def scenario_face_model(cp, rng, monkeypatch):
    model = _small_model().to("gpu")
    _on_gpu(model.mean_shape, model.triangles)
    # The gemv kernels' batch rows 1, 2, 4, 8, then batch 64 through each large-batch path: the 64-row
    # tile, and cuBLAS between the two small kernels.
    for B, path in ((1, "cublas"), (2, "cublas"), (3, "cublas"), (8, "cublas"), (64, "tiled"), (64, "cublas")):
        monkeypatch.setattr(morphable_module, "_LARGE_BATCH_PATH", path)
        shape = strided(cp, rng.normal(size=(B, model.n_shape)).astype(np.float32))
        expression = cp.asarray(rng.normal(size=(B, model.n_expression)).astype(np.float32))
        albedo = cp.asarray(rng.normal(size=(B, model.n_albedo)).astype(np.float32))
        for given in ((shape, expression, albedo), (shape, None, None), (None, expression, None), (None, None, albedo)):
            vertices, colours = model.evaluate(*given)
            _on_gpu(vertices, colours)
        grad = cp.asarray(rng.normal(size=(B, model.n_vertices, 3)).astype(np.float32))
        for grads in ((grad, grad), (grad, None), (None, grad)):
            _on_gpu(*model.evaluate_backward(*grads))
    return _kernels("morphable.cu", "morphable_fwd<8, 8>", "morphable_bwd<8, 8>", "morphable_scale_coefficients",
                    "morphable_split_gradient",
                    *(f"morphable_{d}_gemv<{r}>" for d in ("fwd", "bwd") for r in (1, 2, 4, 8)))


def scenario_face_model_many_components(cp, rng, monkeypatch):
    """A small batch whose coefficient table does not fit the gemv forward's shared memory (K = 600 rows at
    batch 8): the 8-row tiled forward, morphable_fwd<2, 4>."""
    xy, tri = _grid_mesh()
    mean = np.concatenate([xy, np.zeros((16, 1), np.float32)], axis=1)
    basis = rng.normal(size=(600, 48)).astype(np.float32)
    model = fastface.FaceModel(mean, tri, basis, np.ones(600, np.float32)).to("gpu")
    vertices, _ = model.evaluate(cp.asarray(rng.normal(size=(8, 600)).astype(np.float32)), None, None)
    _on_gpu(vertices)
    return _kernels("morphable.cu", "morphable_fwd<2, 4>")


def scenario_render_faces(cp, rng, monkeypatch):
    model = _small_model().to("gpu")
    B = 2
    params = fastface.FaceParameters(
        shape=cp.asarray(rng.normal(size=(B, model.n_shape)).astype(np.float32)),
        expression=cp.asarray(rng.normal(size=(B, model.n_expression)).astype(np.float32)),
        albedo=cp.asarray(rng.normal(size=(B, model.n_albedo)).astype(np.float32)),
        sh=fastface.uniform_light(B, xp=cp),
        angles=cp.asarray(rng.uniform(-0.2, 0.2, size=(B, 3)).astype(np.float32)),
        translation=cp.asarray(np.array([[0, 0, -600]] * B, np.float32)))
    rendering = fastface.render_faces(model, params, (32, 24), 800.0)
    _on_gpu(rendering.image, rendering.mask, rendering.raster.tri_id, rendering.colors)
    return (_kernels("morphable.cu", "morphable_fwd_gemv<2>")
            | _kernels("camera.cu", "euler_rotation_fwd", "rigid_transform_fwd<false>", "perspective_projection_fwd")
            | _kernels("normals.cu", "vertex_normals_fwd") | _kernels("shading.cu", "sh_shade_fwd<false>")
            | _kernels("rasterize.cu", "rasterize_fwd", "rasterize_resolve<3>"))


def scenario_im2col(cp, rng, monkeypatch):
    """The public gather and its adjoint in every dtype combination the GPU takes, with and without in_bias,
    through each of the forward kernels the module switches select."""
    im2col, im2col_backward = fastface.nn.im2col, fastface.nn.im2col_backward

    def run(C, x_dtype, out_dtype, kernel, stride, padding, grad_dtype, grad_x_dtype):
        x = cp.asarray(rng.normal(size=(2, 8, 8, C)).astype(x_dtype))
        for bias in (None, cp.asarray(rng.normal(size=C).astype(np.float32))):
            for relu in (False, True):
                cols = im2col(x, bias, kernel, stride, padding, in_relu=relu, out_dtype=out_dtype)
                grad_cols = cp.asarray(rng.normal(size=cols.shape).astype(grad_dtype))
                grad_x = im2col_backward(x, bias, grad_cols, kernel, stride, padding, in_relu=relu, scale=0.5,
                                         out_dtype=grad_x_dtype)
                _on_gpu(cols, grad_x)
                assert cols.dtype == out_dtype and grad_x.dtype == grad_x_dtype

    f32, f16 = np.float32, np.float16
    for use_patch, use_rows in ((True, True), (False, False)):
        with monkeypatch.context() as m:
            m.setattr(conv_module, "USE_PATCH_GATHER", use_patch)
            m.setattr(conv_module, "USE_ROWS_GATHER", use_rows)
            run(3, f32, f32, (4, 4), 4, 0, f32, f32)   # the patchify stem: patch or run gather
            run(3, f32, f16, (4, 4), 4, 0, f16, f32)   # the fp16 mode's stem
            run(3, f32, f32, (3, 3), 1, 1, f32, f32)   # no vector: run gather, scalar adjoint
            run(8, f32, f32, (3, 3), 2, 1, f32, f32)   # float4: rows or vector gather
            run(16, f16, f16, (3, 3), 1, 1, f16, f16)  # 8 halves: rows or vector gather
            run(3, f16, f16, (3, 3), 1, 1, f16, f16)   # float16 without a vector
            run(8, f32, f32, (2, 2), 2, 0, f16, f32)   # float32 x with float16 gradient cols
    names = ["im2col_fwd_run<float, float>", "im2col_fwd<float, float, 4>", "im2col_fwd_run<float, __half>",
             "im2col_fwd_run<__half, __half>", "im2col_fwd<__half, __half, 8>", "im2col_fwd_patch<float, 4, 4, 3>",
             "im2col_fwd_patch<__half, 4, 4, 3>", "im2col_fwd_rows<float, float, 4, 3>",
             "im2col_fwd_rows<__half, __half, 8, 3>", "im2col_bwd<float, float, float, 1>",
             "im2col_bwd<float, float, float, 4>", "im2col_bwd<float, __half, float, 1>",
             "im2col_bwd<__half, __half, __half, 1>", "im2col_bwd<__half, __half, __half, 8>"]
    return _kernels("nn_conv.cu", *names)


def scenario_conv2d(cp, rng, monkeypatch):
    x = cp.asarray(rng.normal(size=(2, 9, 9, 4)).astype(np.float32))
    weight = cp.asarray(rng.normal(size=(3, 3, 4, 6)).astype(np.float32))
    bias = cp.asarray(rng.normal(size=6).astype(np.float32))
    y = fastface.nn.conv2d(x, weight, bias, stride=2, padding=1)
    grads = fastface.nn.conv2d_backward(x, weight, cp.asarray(rng.normal(size=y.shape).astype(np.float32)), 2, 1)
    _on_gpu(y, *grads)
    return _kernels("nn_conv.cu", "im2col_fwd_rows<float, float, 4, 3>", "im2col_bwd<float, float, float, 4>")


def scenario_global_avg_pool(cp, rng, monkeypatch):
    x = cp.asarray(rng.normal(size=(3, 4, 5, 6)).astype(np.float32))
    for bias in (None, cp.asarray(rng.normal(size=6).astype(np.float32))):
        for relu in (False, True):
            y = fastface.nn.global_avg_pool(x, bias, relu)
            _on_gpu(y, fastface.nn.global_avg_pool_backward(x, bias, cp.asarray(np.ones((3, 6), np.float32)), relu))
    return _kernels("nn_pool.cu", "global_avg_pool_fwd<float, float>", "global_avg_pool_bwd<float, float, float>")


def scenario_linear(cp, rng, monkeypatch):
    x = cp.asarray(rng.normal(size=(4, 7)).astype(np.float32))
    weight = cp.asarray(rng.normal(size=(7, 5)).astype(np.float32))
    y = fastface.nn.linear(x, weight, cp.asarray(np.ones(5, np.float32)))
    _on_gpu(y, *fastface.nn.linear_backward(x, weight, cp.asarray(np.ones((4, 5), np.float32))))
    return set()  # GEMMs only (checked by the fake cuBLAS), and the value checks


def scenario_relu(cp, rng, monkeypatch):
    for dtype in (np.float32, np.float16):
        x = cp.asarray(rng.normal(size=(3, 5)).astype(dtype))
        for slope in (0.0, 0.1):
            y = fastface.nn.relu(x, slope)
            _on_gpu(y, fastface.nn.relu_backward(x, cp.asarray(np.ones((3, 5), dtype)), slope))
    return set()


def scenario_adam(cp, rng, monkeypatch):
    params = {"w": cp.asarray(rng.normal(size=(7, 5)).astype(np.float32)),
              "b": cp.asarray(rng.normal(size=5).astype(np.float32))}
    opt = fastface.nn.Adam(params, lr=1e-3, weight_decay=1e-2, clip_norm=1.0)
    for step in range(2):
        opt.step({k: cp.asarray(rng.normal(size=v.shape).astype(np.float32)) for k, v in params.items()})
        opt.lr = 5e-4  # copied into the device array with ndarray.set
    _on_gpu(*opt.m, *opt.v, opt.state_arrays()[2])
    return _kernels("nn_adam.cu", "adam_prepare", "adam_update")


def _small_encoder(precision, conv_algorithm="im2col"):
    enc = fastface.nn.Encoder(n_outputs=10, resolution=16, widths=(32, 64), stem_width=32, seed=1)
    enc.conv_algorithm = conv_algorithm
    return enc.to("gpu", precision=precision)


def scenario_encoder(cp, rng, monkeypatch):
    x = cp.asarray(rng.uniform(size=(2, 16, 16, 3)).astype(np.float32))
    grad_y = cp.asarray(rng.normal(size=(2, 10)).astype(np.float32))
    for precision, algorithm in (("float32", "im2col"), ("tf32", "im2col"), ("float16", "im2col"),
                                 ("float16", "implicit")):
        enc = _small_encoder(precision, algorithm)
        opt = fastface.nn.Adam(enc, lr=1e-3)
        for need_grad_x in (True, False):
            y = enc.forward(x)
            grad_x = enc.backward(grad_y, need_grad_x=need_grad_x)
            opt.step()
            _on_gpu(y, enc.flat_grads)
            assert (grad_x is not None) == need_grad_x
    return (_kernels("nn_conv.cu", "im2col_fwd_patch<float, 4, 4, 3>", "im2col_fwd_patch<__half, 4, 4, 3>",
                     "im2col_fwd_rows<float, float, 4, 3>", "im2col_fwd_rows<__half, __half, 8, 3>",
                     "im2col_bwd<float, float, float, 4>", "im2col_bwd<float, float, float, 1>",
                     "im2col_bwd<__half, __half, __half, 8>", "im2col_bwd<float, __half, float, 1>")
            | _kernels("nn_conv_implicit.cu", "conv_implicit_fwd")
            | _kernels("nn_pool.cu", *(f"global_avg_pool_{d}" for d in (
                "fwd<float, float>", "fwd<__half, __half>", "bwd<float, float, float>", "bwd<__half, __half, __half>")))
            | _kernels("nn_adam.cu", "adam_prepare", "adam_update"))


def scenario_encoder_graph(cp, rng, monkeypatch):
    """Encoder.capture: the warm-up launches, then the recorded ones (checked once, when recorded)."""
    enc = _small_encoder("float16")
    opt = fastface.nn.Adam(enc, lr=1e-3)
    graph = enc.capture(2, backward=True, optimizer=opt, need_grad_x=True)
    graph.x[...] = cp.asarray(rng.uniform(size=graph.x.shape).astype(np.float32))
    _on_gpu(graph.forward(), graph.backward())
    return _kernels("nn_adam.cu", "adam_prepare", "adam_update") | _kernels("nn_conv.cu",
                                                                            "im2col_bwd<float, __half, float, 1>")


def scenario_value_check_helpers(cp, rng, monkeypatch):
    """fastface._checks on every dtype with a check kernel. No public GPU op takes float64 (each refuses it
    before reading values), so flag_values_outside<double, double> is reached through the helpers only."""
    from fastface import _checks  # noqa: PLC0415

    for dtype in (np.float64, np.float32, np.float16):
        _checks.check_finite("x", cp.asarray(rng.normal(size=(3, 4)).astype(dtype)))
    _checks.check_indices("tri", cp.asarray(np.arange(12, dtype=np.int32).reshape(4, 3)), 12)
    _checks.queue_on_device(cp.asarray(np.ones((5, 3), np.float32))[:, ::2], -1.0, 1.0, "strided {}", 1,
                            offset=1, stride=2, count=3)  # a non-contiguous array is copied first
    return _kernels("checks.cu", *(f"flag_values_outside<{t}>" for t in (
        "double, double", "float, float", "__half, float", "int, int"))) if _checks.value_checks_enabled() else set()


def scenario_corrective_space(cp, rng, monkeypatch):
    """CorrectiveSpace on the GPU: its decoders are cuBLAS GEMMs (checked by the fake cuBLAS), no kernels
    of their own; the value checks of the codes and gradients launch the check kernels."""
    from fastface.model import CorrectiveSpace  # noqa: PLC0415

    space = CorrectiveSpace(16, 3, 5, seed=1).to("gpu")
    _on_gpu(space.flat_params, space.flat_grads, space.geometry_basis)
    z_geo = strided(cp, rng.normal(size=(2, 3)).astype(np.float32))
    z_ref = cp.asarray(rng.normal(size=(2, 5)).astype(np.float32))
    geometry, reflectance = space.evaluate(z_geo, z_ref)
    _on_gpu(geometry, reflectance)
    for grads in ((geometry, reflectance), (None, reflectance), (geometry, None)):
        _on_gpu(*space.backward(z_geo, z_ref, *grads))
    out = (cp.empty((2, 16, 3), np.float32), cp.empty((2, 16, 3), np.float32))
    assert space.evaluate(z_geo, z_ref, out=out)[1] is out[1]
    out_z = (cp.empty((2, 3), np.float32), cp.empty((2, 5), np.float32))
    assert space.backward(z_geo, z_ref, geometry, reflectance, out=out_z)[0] is out_z[0]
    opt = fastface.nn.Adam(space, lr=1e-3)
    opt.step()
    return _kernels("nn_adam.cu", "adam_prepare", "adam_update")


def scenario_corrective_regularizers(cp, rng, monkeypatch):
    """The corrective regularizers and their backwards on a GPU model's mesh, with a per-image and a shared
    guide albedo, both mirror modes, a non-contiguous input (copied before the kernels), every backward
    once more adding into a caller's `out`, and a batch of one (the forwards' two passes at their smallest)."""
    from fastface.model import corrective as c  # noqa: PLC0415

    model = _small_model().to("gpu")
    mesh = c.corrective_mesh(model)
    _on_gpu(mesh.edges, mesh.neighbours, mesh.symmetry, mesh.mirrored_from)
    B, V = 2, model.n_vertices
    offsets = strided(cp, rng.normal(size=(B, V, 3)).astype(np.float32))
    albedo = cp.asarray(rng.uniform(size=(B, V, 3)).astype(np.float32))
    grad_out = cp.asarray(np.array([1.0, -0.5], np.float32))
    out = cp.zeros((B, V, 3), np.float32)
    _on_gpu(c.smoothness_loss(offsets, mesh), c.smoothness_loss_backward(offsets, mesh, grad_out),
            c.magnitude_loss(offsets), c.magnitude_loss_backward(offsets, grad_out))
    assert c.smoothness_loss_backward(offsets, mesh, grad_out, add_to=out) is out
    assert c.magnitude_loss_backward(offsets, grad_out, add_to=out) is out
    for guide in (albedo, model.mean_albedo):
        _on_gpu(c.reflectance_constancy_loss(albedo, guide, mesh, sharpness=20.0),
                c.reflectance_constancy_loss_backward(albedo, guide, mesh, grad_out, sharpness=20.0))
        assert c.reflectance_constancy_loss_backward(albedo, guide, mesh, grad_out, sharpness=20.0, add_to=out) is out
    for mirror_x in (True, False):
        _on_gpu(c.symmetry_loss(offsets, mesh, mirror_x), c.symmetry_loss_backward(offsets, mesh, grad_out, mirror_x))
        assert c.symmetry_loss_backward(offsets, mesh, grad_out, mirror_x, add_to=out) is out
    one = albedo[:1]
    _on_gpu(c.smoothness_loss(one, mesh), c.magnitude_loss(one), c.symmetry_loss(one, mesh, True),
            c.reflectance_constancy_loss(one, model.mean_albedo, mesh))
    return _kernels("corrective.cu", "sum_partials", "smoothness_fwd", "smoothness_laplacian", "smoothness_bwd",
                    "magnitude_fwd", "magnitude_bwd", "reflectance_constancy_fwd", "reflectance_constancy_bwd",
                    "symmetry_fwd", "symmetry_bwd")


SCENARIOS = {name[len("scenario_"):]: f for name, f in dict(globals()).items() if name.startswith("scenario_")}

_LAUNCHED = {}  # scenario -> the (file, kernel) pairs it launched in this session


def _run(name, gpu, monkeypatch, checks):
    gpu.clear()
    with fastface.value_checks(checks):
        expected = SCENARIOS[name](gpu.cupy, np.random.default_rng(7), monkeypatch)
        fastface.check_device_errors()  # reads the fake pinned record: nothing failed (nothing ran)
    _LAUNCHED.setdefault(name, set()).update(gpu.kernels())
    return expected


@pytest.mark.parametrize("checks", [True, False], ids=["checks_on", "checks_off"])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_gpu_branch_launches_match_the_kernel_signatures(scenario, checks, fake_gpu, monkeypatch):
    expected = _run(scenario, fake_gpu, monkeypatch, checks)
    launched = fake_gpu.kernels()
    assert expected <= launched, f"{scenario} did not launch {sorted(expected - launched)}"
    checks_launched = {k for k in launched if k[0] == "checks.cu"}
    if checks and scenario not in NO_VALUE_CHECKS:
        assert checks_launched, f"{scenario}: the value checks queued no check kernel"
    if not checks:
        assert not checks_launched, f"{scenario}: value_checks(False) still launched {sorted(checks_launched)}"
        if scenario not in NO_LAUNCH:
            assert fake_gpu.launches or fake_gpu.gemm_calls, f"{scenario} reached no kernel and no GEMM"


def test_every_declared_kernel_is_launched_by_some_scenario(monkeypatch):
    gpu = None
    for name in SCENARIOS:  # the scenarios this session has not run yet (a -k selection, say)
        if name not in _LAUNCHED:
            gpu = gpu or install(monkeypatch)
            _run(name, gpu, monkeypatch, True)
    launched = set().union(*_LAUNCHED.values())
    declared = {(k.filename, name) for k in KernelFile.declared for name in k.kernels}
    assert not (set(NOT_LAUNCHED) - declared), "NOT_LAUNCHED names a kernel the library no longer declares"
    assert not (set(NOT_LAUNCHED) & launched), "NOT_LAUNCHED names a kernel a scenario launches"
    never = declared - launched - set(NOT_LAUNCHED)
    assert not never, f"declared kernels no scenario launched: {sorted(never)}"


# ---------------------------------------------------------------------------------------------
# The checker must be able to fail: one bad launch of each kind.

def _euler_args(cp, B=4):
    return (cp.asarray(np.zeros((B, 3), np.float32)), cp.empty((B, 9), np.float32), np.int32(B))


@pytest.mark.parametrize("change, message", [
    (lambda cp, a: (a[0], a[1], 4), r"a int takes a int32; got int 4 \(CuPy packs a Python int as 8 bytes\)"),
    (lambda cp, a: (a[0], a[1], np.int64(4)), r"a int takes a int32; got int64"),
    (lambda cp, a: (a[0], a[1], 4.0), r"got float 4.0 \(CuPy packs a Python float as a double\)"),
    (lambda cp, a: (None, a[1], a[2]), r"Python None; CuPy passes it as a garbage pointer \(cupy/cupy#9046\)"),
    (lambda cp, a: (cp.asarray(np.zeros((4, 3))), a[1], a[2]), r"a float\* takes float32 memory; got float64"),
    (lambda cp, a: (np.zeros((4, 3), np.float32), a[1], a[2]), r"needs a cupy array .*numpy\.ndarray"),
    (lambda cp, a: (np.uint64(0), a[1], a[2]), r"needs a cupy array \(or NULL_POINTER\)"),
    (lambda cp, a: (cp.asarray(np.zeros((3, 4), np.float32)).T, a[1], a[2]), r"non-contiguous"),
    (lambda cp, a: a[:2], r"2 arguments for 3 parameters"),
    (lambda cp, a: a + (np.int32(1),), r"4 arguments for 3 parameters"),
    (lambda cp, a: (a[1], a[0], NULL_POINTER), r"argument 2 \(int B\): a int takes a int32; got uint64"),
], ids=["python_int", "int64_for_int", "python_float", "none_for_pointer", "float64_array", "host_array",
        "uint64_for_pointer", "non_contiguous", "too_few", "too_many", "null_for_int"])
def test_the_checker_rejects_a_bad_argument(fake_gpu, change, message):
    launch = _camera_module._kernel("euler_rotation_fwd")
    good = _euler_args(fake_gpu.cupy)
    launch((1,), (256,), good)
    with pytest.raises(LaunchError, match=message):
        launch((1,), (256,), change(fake_gpu.cupy, good))
    assert len(fake_gpu.launches) == 1, "a rejected launch is not recorded"


@pytest.mark.parametrize("grid, block, message", [
    ((1, 65536), (256,), r"grid\[1\] = 65536 is outside \[1, 65535\]"),
    ((1, 1, 70000), (256,), r"grid\[2\] = 70000"),
    ((0,), (256,), r"grid\[0\] = 0"),
    ((np.int64(1),), (256,), r"grid\[0\] must be a Python int; got int64"),
    ([1], (256,), r"grid must be a tuple"),
    ((1,), (2048,), r"block\[0\] = 2048"),
    ((1,), (64, 32), r"2048 threads; at most 1024"),
    ((1,), (1, 1, 65), r"block\[2\] = 65"),
], ids=["grid_y", "grid_z", "grid_zero", "grid_numpy_int", "grid_list", "block_x", "block_threads", "block_z"])
def test_the_checker_rejects_a_bad_launch_shape(fake_gpu, grid, block, message):
    with pytest.raises(LaunchError, match=message):
        _camera_module._kernel("euler_rotation_fwd")(grid, block, _euler_args(fake_gpu.cupy))


def _morphable_args(cp, K=4, N=256, batch=1):
    f = lambda *shape: cp.zeros(shape, np.float32)  # noqa: E731
    return (f(batch, K), f(batch, K), f(K), f(K, N), f(N), f(batch, N), np.int32(batch), np.int32(K),
            np.int32(0), np.int64(N))


def test_the_checker_knows_launch_bounds_and_dynamic_shared_memory(fake_gpu):
    cp = fake_gpu.cupy
    kernel = morphable_module._kernel
    kernel("morphable_fwd<2, 4>")((2, 1, 1), (32, 2, 1), _morphable_args(cp))
    with pytest.raises(LaunchError, match=r"128 threads, more than its __launch_bounds__\(64\)"):
        kernel("morphable_fwd<2, 4>")((2, 1, 1), (32, 4, 1), _morphable_args(cp))
    with pytest.raises(LaunchError, match="shared_mem=64 for a kernel with no extern __shared__"):
        kernel("morphable_fwd<2, 4>")((2, 1, 1), (32, 2, 1), _morphable_args(cp), shared_mem=64)
    kernel("morphable_fwd_gemv<1>")((2, 1, 1), (256, 1, 1), _morphable_args(cp), shared_mem=16)
    with pytest.raises(LaunchError, match=r"shared_mem must be an int in \[0, 49152\]"):
        kernel("morphable_fwd_gemv<1>")((2, 1, 1), (256, 1, 1), _morphable_args(cp), shared_mem=49153)
    with pytest.raises(LaunchError, match="not modelled"):
        kernel("morphable_fwd_gemv<1>")((2, 1, 1), (256, 1, 1), _morphable_args(cp), stream=None)
    with pytest.raises(KeyError, match="'morphable_fwd<4, 4>' is not declared for kernels/morphable.cu"):
        kernel("morphable_fwd<4, 4>")


def test_the_checker_checks_alignment_and_the_one_allowed_alias(fake_gpu):
    cp = fake_gpu.cupy
    B, V, T, H, W = 1, 5, 2, 4, 4
    pos = cp.zeros((B, V, 4), np.float32)
    tri = cp.zeros((T, 3), np.int32)
    bary = cp.empty((B, H, W, 2), np.float32)
    dims = (np.int32(B), np.int32(V), np.int32(T), np.int32(H), np.int32(W), np.int32(0))
    kernel = _rasterize_module._gpu_kernel("rasterize_fwd")
    kernel((1, 1), (128,), (pos, tri) + dims + (bary,))  # float32 (B, H, W, 2) as unsigned long long* zbuf
    kernel((1, 1), (128,), (pos, tri) + dims + (cp.empty((B, H, W), np.uint64),))
    with pytest.raises(LaunchError, match=r"zbuf\): a unsigned long long\* takes uint64 memory; got float32"):
        kernel((1, 1), (128,), (pos, tri) + dims + (cp.empty((B, H, W, 3), np.float32),))
    shifted = cp.zeros(B * V * 4 + 1, np.float32)[1:].reshape(B, V, 4)  # 4-byte aligned only
    with pytest.raises(LaunchError, match=r"float4\* pos\): needs 16-byte aligned memory"):
        kernel((1, 1), (128,), (shifted, tri) + dims + (bary,))
    with pytest.raises(LaunchError, match=r"not whole float4 elements"):
        kernel((1, 1), (128,), (cp.zeros((B, V, 3), np.float32), tri) + dims + (bary,))
    im2col = conv_module._function("im2col_fwd<float, float, 4>")
    x = cp.zeros(2 * 4 * 4 * 4 + 1, np.float32)[1:].reshape(2, 4, 4, 4)
    geometry = tuple(np.int32(v) for v in (2, 4, 4, 4, 3, 3, 1, 1, 4, 4))
    with pytest.raises(LaunchError, match=r"float\* x\): needs 16-byte aligned memory"):
        im2col((2,), (256,), (x, NULL_POINTER, np.int32(0)) + geometry + (cp.empty((32, 36), np.float32),))


def test_the_checker_parses_templates_and_rejects_malformed_names():
    s = kernel_signature("nn_conv.cu", "im2col_bwd<__half, float, __half, 1>")
    assert [repr(p) for p in s.parameters[:4]] == ["__half* x", "float* in_bias", "int in_relu", "float* grad_cols"]
    assert kernel_signature("morphable.cu", "morphable_fwd<8, 8>").launch_bounds == 256
    assert kernel_signature("nn_conv_implicit.cu", "conv_implicit_fwd").launch_bounds == 256
    assert kernel_signature("checks.cu", "flag_values_outside<__half, float>").parameters[4].c_type == "float"
    with pytest.raises(LaunchError, match="needs its template arguments"):
        kernel_signature("rasterize.cu", "rasterize_resolve")
    with pytest.raises(LaunchError, match="not a template"):
        kernel_signature("camera.cu", "euler_rotation_fwd<1>")
    with pytest.raises(LaunchError, match="0 __global__ definitions"):
        kernel_signature("camera.cu", "no_such_kernel")
    with pytest.raises(LaunchError, match="2 template arguments"):
        kernel_signature("camera.cu", "rigid_transform_fwd<true, 1>")


def test_a_python_none_for_an_optional_pointer_is_caught(fake_gpu, monkeypatch):
    """The bug this checker was written for: None where a kernel expects a (null) pointer."""
    monkeypatch.setattr(_camera_module, "NULL_POINTER", None)
    points = fake_gpu.cupy.asarray(_camera_points(np.random.default_rng(0), 2))
    with pytest.raises(LaunchError, match=r"argument 1 \(float\* focal\): Python None"):
        fastface.perspective_projection(points, 500.0, (8, 8))


def _rigid_transform_of_many_images(cp, B):
    rotation = cp.asarray(np.broadcast_to(np.eye(3, dtype=np.float32), (B, 3, 3)).copy())
    return fastface.rigid_transform(cp.asarray(np.zeros((1, 3), np.float32)), rotation, cp.zeros((B, 3), np.float32))


def _sh_shade_of_many_images(cp, B):
    normals = cp.asarray(np.broadcast_to(np.float32([0, 0, 1]), (B, 1, 3)).copy())
    return fastface.sh_shade(normals, cp.asarray(np.ones((1, 3), np.float32)), cp.zeros((B, 9, 3), np.float32))


@pytest.mark.parametrize("op", [_rigid_transform_of_many_images, _sh_shade_of_many_images],
                         ids=["rigid_transform", "sh_shade"])
def test_more_than_65535_images_raise_a_value_error_before_an_invalid_launch(fake_gpu, op):
    # These kernels give each image a row of blocks (b = blockIdx.y, no loop): the op refuses the batch.
    with fastface.value_checks(False), pytest.raises(ValueError, match="at most 65535 images per call"):
        op(fake_gpu.cupy, 65536)
    with fastface.value_checks(False):
        op(fake_gpu.cupy, 65535)


def test_adam_accepts_cupy_parameters(fake_gpu):
    # cupy arrays have no flags.writeable (numpy's read-only check must not touch them)
    fastface.nn.Adam({"w": fake_gpu.cupy.zeros((3, 2), np.float32)})


# ---------------------------------------------------------------------------------------------
# The fake itself

def test_fake_arrays_behave_like_cupy_arrays(fake_gpu):
    cp = fake_gpu.cupy
    a = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert is_cupy_array(a) and is_cupy_array(a + 1) and is_cupy_array(a.sum()) and is_cupy_array(a[:, 1:])
    assert a.data.ptr % 256 == 0 and a.device.id == 0 and a.flags.c_contiguous and not a[:, 1:].flags.c_contiguous
    assert not hasattr(a.flags, "writeable"), "cupy's flags have no writeable"
    host = a.get()
    assert type(host) is np.ndarray and np.array_equal(host, np.arange(6).reshape(2, 3))
    a.set(np.ones((2, 3), np.float32))
    assert float(a.sum()) == 6.0
    with pytest.raises(TypeError, match="float64 array cannot be set to float32"):
        a.set(np.ones((2, 3)))
    with pytest.raises(TypeError, match="numpy array among cupy arrays"):
        a + np.ones(3, np.float32)
    with pytest.raises(TypeError, match="takes a cupy array"):
        cp.ascontiguousarray(np.ones(3))
    with pytest.raises(AttributeError, match="the fake cupy has no 'linalg'"):
        cp.linalg  # noqa: B018
    assert _backend.array_module(("a", a)) is cp


@pytest.mark.parametrize("dtype, out_dtype, compute", [
    (np.float32, np.float32, "float32"), (np.float32, np.float32, "tf32"), (np.float64, np.float64, "float32"),
    (np.float16, np.float32, "float32")])
def test_the_fake_cublas_multiplies_like_numpy(fake_gpu, dtype, out_dtype, compute):
    cp, rng = fake_gpu.cupy, np.random.default_rng(3)
    a, b = rng.normal(size=(5, 4)).astype(dtype), rng.normal(size=(4, 3)).astype(dtype)
    c0 = rng.normal(size=(5, 3)).astype(out_dtype)
    for trans_a, trans_b in ((False, False), (True, False), (False, True), (True, True)):
        ga = cp.asarray(np.ascontiguousarray(a.T) if trans_a else a)
        gb = cp.asarray(np.ascontiguousarray(b.T) if trans_b else b)
        out = cp.asarray(c0)
        _gemm.gemm(ga, gb, out, trans_a=trans_a, trans_b=trans_b, alpha=0.5, beta=2.0, compute=compute)
        want = 0.5 * a.astype(np.float64) @ b.astype(np.float64) + 2.0 * c0
        np.testing.assert_allclose(out.get(), want, rtol=1e-5, atol=1e-5)
    row_slice = cp.asarray(np.zeros((7, 3), out_dtype))[1:6]  # a view: ldc = 3, inside its allocation
    _gemm.gemm(cp.asarray(a), cp.asarray(b), row_slice)
    with pytest.raises(LaunchError, match="lies in no fake cupy allocation"):
        fake_gpu.cupy.cuda.runtime.memsetAsync(row_slice.data.ptr, 0, 10 ** 6, 0)


def test_the_fake_is_gone_after_its_tests():
    """Runs after the tests above (file order): nothing of the fake may reach the tests that follow."""
    assert sys.modules.get("cupy") is _REAL["cupy"]
    assert _backend.cupy_or_none is _REAL["cupy_or_none"] and hasattr(_backend.cupy_or_none, "cache_info")
    for name, module in list(sys.modules.items()):
        if name.startswith("fastface") and hasattr(module, "cupy_or_none"):
            assert module.cupy_or_none is _REAL["cupy_or_none"], f"{name}.cupy_or_none is still patched"
    assert KernelFile.__dict__["__call__"] is _REAL["kernel_call"]
    assert _gemm._cublas is _REAL["cublas"]
    assert _device_checks._record is None or _device_checks._record.address not in fake_cupy.HOST_ADDRESSES
    assert not fake_cupy._allocations, "fake allocations outlived their test"
    assert not hasattr(fake_cupy._Flags, "writeable")
