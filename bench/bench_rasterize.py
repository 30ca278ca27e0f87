"""Rasterize + interpolate throughput on the spherical-cap workload (issues 2 and 3).

Workload: `bench.workloads.spherical_cap(n=189)`: 35,721 vertices, 70,688 triangles of about one
pixel each at 224 x 224, random head poses, about 76% of the pixels covered; 3 colour channels.

CPU (issue 2): a batch of 8, against OpenGL through moderngl on a headless EGL context (Mesa
llvmpipe where there is no GPU driver), read back to host memory; the same on the mean face of
`fastface.model.FaceModel.default()`.
GPU (issue 3): a batch of 64 (targets on H100: rasterize 0.10 ms, rasterize + interpolate 0.15 ms,
forward + backward to positions and colours 0.30 ms) and a batch of 1 (wall time of the Python call
0.05 ms), value checks off; optionally nvdiffrast on the same arrays when `nvdiffrast.torch` imports.

Figures: `images_per_s` from the median wall time of one call (synchronised inside the timed call
on the GPU, Python overhead included); on the GPU also `device_us`, from CUDA events around a
queue of back-to-back calls (the kernels' time when the GPU, not Python, is the bottleneck).

    python -m pytest bench/bench_rasterize.py --benchmark-only
"""
import numpy as np
import pytest

import fastface
from bench._gpu_timing import bench_cpu, bench_gpu, needs_gpu, record_throughput
from bench.workloads import OpenGLRasterizer, face_model_poses, spherical_cap
from fastface.ops.interpolate import interpolate, interpolate_backward
from fastface.ops.rasterize import (
    rasterize, rasterize_backward, rasterize_interpolate, rasterize_interpolate_backward,
)

RES = (224, 224)
CPU_BATCH = 8
GPU_BATCH = 64
GRID = 189


def steps(pos, tri, colors, grad_out):
    """The timed work of each benchmark: name -> function of no arguments."""
    def fwd_bwd_fused():
        raster, img = rasterize_interpolate(pos, tri, RES, colors)
        return rasterize_interpolate_backward(pos, tri, colors, raster, grad_out)

    def fwd_bwd_separate():
        raster = rasterize(pos, tri, RES)
        interpolate(colors, raster, tri)
        grad_colors, grad_bary = interpolate_backward(colors, raster, tri, grad_out)
        return rasterize_backward(pos, tri, raster, grad_bary), grad_colors

    return {
        "rasterize": lambda: rasterize(pos, tri, RES),
        "rasterize_interpolate_fused": lambda: rasterize_interpolate(pos, tri, RES, colors),
        "rasterize_then_interpolate": lambda: interpolate(colors, rasterize(pos, tri, RES), tri),
        "fwd_bwd_fused": fwd_bwd_fused,
        "fwd_bwd_separate": fwd_bwd_separate,
    }


# --- CPU ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_cap():
    pos, tri, colors = spherical_cap(n=GRID, batch=CPU_BATCH)
    grad_out = np.random.default_rng(1).standard_normal((CPU_BATCH,) + RES + (3,)).astype(np.float32)
    return pos, tri, colors, grad_out


@pytest.mark.parametrize("name", ["rasterize", "rasterize_then_interpolate", "rasterize_interpolate_fused",
                                  "fwd_bwd_fused", "fwd_bwd_separate"])
def test_cpu_spherical_cap(benchmark, cpu_cap, name):
    bench_cpu(benchmark, steps(*cpu_cap)[name], f"spherical cap {GRID}x{GRID} B={CPU_BATCH} 224x224 (CPU)")
    record_throughput(benchmark, CPU_BATCH)


def _opengl_or_skip(tri, n_vertices):
    try:
        return OpenGLRasterizer(tri, n_vertices, RES)
    except Exception as err:
        pytest.skip(f"moderngl with an EGL context is unavailable: {type(err).__name__}: {err}")


def test_cpu_spherical_cap_opengl(benchmark, cpu_cap):
    pos, tri, colors, _ = cpu_cap
    gl = _opengl_or_skip(tri, pos.shape[1])
    try:
        benchmark.group = f"spherical cap {GRID}x{GRID} B={CPU_BATCH} 224x224 (CPU)"
        gl.render(pos, colors)
        benchmark(gl.render, pos, colors)
        record_throughput(benchmark, CPU_BATCH, renderer=gl.renderer)
    finally:
        gl.release()


@pytest.fixture(scope="module")
def cpu_face():
    try:
        from fastface.model.face_model import FaceModel  # noqa: PLC0415 - written in parallel
        model = FaceModel.default()
    except Exception as err:
        pytest.skip(f"the default face model is unavailable: {type(err).__name__}: {err}")
    return face_model_poses(model, batch=CPU_BATCH)


@pytest.mark.parametrize("name", ["rasterize_interpolate_fused", "rasterize_then_interpolate", "opengl"])
def test_cpu_face_model(benchmark, cpu_face, name):
    pos, tri, colors = cpu_face
    benchmark.group = f"default face model B={CPU_BATCH} 224x224 (CPU)"
    if name == "opengl":
        gl = _opengl_or_skip(tri, pos.shape[1])
        try:
            gl.render(pos, colors)
            benchmark(gl.render, pos, colors)
            record_throughput(benchmark, CPU_BATCH, renderer=gl.renderer)
        finally:
            gl.release()
        return
    fn = steps(pos, tri, colors, None)[name]
    with fastface.value_checks(False):
        fn()
        benchmark(fn)
    record_throughput(benchmark, CPU_BATCH, coverage=round(float((rasterize(pos, tri, RES).tri_id >= 0).mean()), 3))


# --- GPU ------------------------------------------------------------------------------------------

def _gpu_inputs(batch):
    import cupy
    pos, tri, colors = spherical_cap(n=GRID, batch=batch, xp=cupy)
    grad_out = cupy.asarray(np.random.default_rng(1).standard_normal((batch,) + RES + (3,)).astype(np.float32))
    cupy.cuda.Device().synchronize()
    return pos, tri, colors, grad_out


@pytest.fixture(scope="module")
def gpu_cap():
    return _gpu_inputs(GPU_BATCH)


@pytest.fixture(scope="module")
def gpu_cap_one():
    pos, tri, colors, grad_out = _gpu_inputs(1)
    return pos[0], tri, colors, grad_out  # (V, 4): the batch-of-one path


TARGET_MS = {"rasterize": 0.10, "rasterize_interpolate_fused": 0.15, "rasterize_then_interpolate": 0.15,
             "fwd_bwd_fused": 0.30, "fwd_bwd_separate": 0.30}


def _bench_gpu(benchmark, fn, batch, group, target_ms):
    device_s = bench_gpu(benchmark, fn, group)
    record_throughput(benchmark, batch, device_us=round(device_s * 1e6, 1), device_images_per_s=round(batch / device_s, 1),
            target_ms=target_ms)


@needs_gpu
@pytest.mark.parametrize("name", list(TARGET_MS))
def test_gpu_spherical_cap(benchmark, gpu_cap, name):
    _bench_gpu(benchmark, steps(*gpu_cap)[name], GPU_BATCH,
               f"spherical cap {GRID}x{GRID} B={GPU_BATCH} 224x224 (GPU)", TARGET_MS[name])


@needs_gpu
@pytest.mark.parametrize("name", ["rasterize_interpolate_fused", "rasterize"])
def test_gpu_spherical_cap_batch_of_one(benchmark, gpu_cap_one, name):
    pos, tri, colors, grad_out = gpu_cap_one
    _bench_gpu(benchmark, steps(pos, tri, colors, grad_out[:1])[name], 1,
               f"spherical cap {GRID}x{GRID} B=1 224x224 (GPU, wall time of the call)", 0.05)


@needs_gpu
@pytest.mark.parametrize("batch", [1, GPU_BATCH])
def test_gpu_fused_with_value_checks_on(benchmark, gpu_cap, gpu_cap_one, batch):
    """The default (deferred) value checks' cost: three check kernels (pos, tri, attr) per call, and
    no host synchronisation. Compare with the rows above, which run with the checks off."""
    pos, tri, colors, _ = gpu_cap_one if batch == 1 else gpu_cap
    device_s = bench_gpu(benchmark, lambda: rasterize_interpolate(pos, tri, RES, colors),
                         f"rasterize + interpolate fused, value checks on (GPU, B={batch})", value_checks=True)
    fastface.check_device_errors()
    record_throughput(benchmark, batch, device_us=round(device_s * 1e6, 1), value_checks="deferred")


def _nvdiffrast_or_skip():
    try:
        import nvdiffrast.torch as dr  # noqa: PLC0415 - optional comparison, never a dependency
        import torch  # noqa: PLC0415
        return dr, torch, dr.RasterizeCudaContext()
    except Exception as err:
        pytest.skip(f"nvdiffrast is unavailable: {type(err).__name__}: {err}")


@needs_gpu
@pytest.mark.parametrize("name", ["rasterize", "rasterize_interpolate", "fwd_bwd"])
def test_gpu_spherical_cap_nvdiffrast(benchmark, gpu_cap, name):
    """nvdiffrast on the same arrays (shared through DLPack), for a side-by-side figure."""
    import cupy
    dr, torch, glctx = _nvdiffrast_or_skip()
    pos_c, tri_c, colors_c, grad_c = gpu_cap
    pos = torch.from_dlpack(pos_c).contiguous()
    tri = torch.from_dlpack(tri_c).contiguous()
    colors = torch.from_dlpack(colors_c)[None].contiguous()
    grad = torch.from_dlpack(grad_c)

    def fn():
        if name == "rasterize":
            return dr.rasterize(glctx, pos, tri, RES)
        if name == "rasterize_interpolate":
            rast, _ = dr.rasterize(glctx, pos, tri, RES)
            return dr.interpolate(colors, rast, tri)
        p = pos.detach().requires_grad_(True)
        c = colors.detach().requires_grad_(True)
        rast, _ = dr.rasterize(glctx, p, tri, RES, grad_db=False)
        img, _ = dr.interpolate(c, rast, tri)
        img.backward(grad)
        return p.grad, c.grad

    def timed():
        fn()
        torch.cuda.synchronize()

    benchmark.group = f"spherical cap {GRID}x{GRID} B={GPU_BATCH} 224x224 (GPU)"
    timed()
    benchmark(timed)
    cupy.cuda.Device().synchronize()
    record_throughput(benchmark, GPU_BATCH, anchor="nvdiffrast")
