"""Antialias forward + backward throughput on the rasterizer's workload (issue 10).

Workload: `bench.workloads.spherical_cap(n=189)` (35,721 vertices, 70,688 triangles of about one pixel
each, 224 x 224, about 76% of the pixels covered, 3 colour channels), rasterized and interpolated once
outside the timing; the topology (`antialias_topology`) is built once, as a caller with a fixed mesh does,
and forward + backward share one `silhouette_pixels`, as `render_faces` and its backward do.

Issue 10's target: `antialias` forward + backward at batch 64 on the GPU costs at most a third of the
rasterizer's forward + backward (the fused `rasterize_interpolate` + its backward), timed here side by
side on the same arrays. On the CPU (batch 8) the same two rows give the ratio there.

    python -m pytest bench/bench_antialias.py --benchmark-only
"""
import numpy as np
import pytest

import fastface
from bench._gpu_timing import bench_cpu, bench_gpu, needs_gpu, record_throughput
from bench.workloads import spherical_cap
from fastface.ops.antialias import antialias, antialias_backward, antialias_topology, silhouette_pixels
from fastface.ops.rasterize import rasterize_interpolate, rasterize_interpolate_backward

RES = (224, 224)
CPU_BATCH = 8
GPU_BATCH = 64
GRID = 189


def prepare(xp, batch):
    """(pos, tri, colors, raster, image, topology, grad_out) of the workload on the module xp."""
    pos, tri, colors = spherical_cap(n=GRID, batch=batch, xp=xp)
    grad_out = xp.asarray(np.random.default_rng(1).standard_normal((batch,) + RES + (3,)).astype(np.float32))
    with fastface.value_checks(False):
        raster, image = rasterize_interpolate(pos, tri, RES, colors)
    return pos, tri, colors, raster, image, antialias_topology(tri), grad_out


def steps(pos, tri, colors, raster, image, topology, grad_out):
    """The timed work of each benchmark: name -> function of no arguments."""
    def antialias_fwd_bwd():  # as the render chain runs them: the silhouette masks found once for both
        silhouettes = silhouette_pixels(raster, pos, tri, topology)
        antialias(image, raster, pos, tri, silhouettes=silhouettes)
        return antialias_backward(image, raster, pos, tri, grad_out, silhouettes=silhouettes)

    def rasterizer_fwd_bwd():
        r, img = rasterize_interpolate(pos, tri, RES, colors)
        return rasterize_interpolate_backward(pos, tri, colors, r, grad_out)

    return {
        "antialias_fwd": lambda: antialias(image, raster, pos, tri, topology=topology),
        "antialias_fwd_bwd": antialias_fwd_bwd,
        "rasterizer_fwd_bwd_fused": rasterizer_fwd_bwd,
    }


NAMES = ["antialias_fwd", "antialias_fwd_bwd", "rasterizer_fwd_bwd_fused"]


@pytest.fixture(scope="module")
def cpu_cap():
    return prepare(np, CPU_BATCH)


@pytest.mark.parametrize("name", NAMES)
def test_cpu_spherical_cap(benchmark, cpu_cap, name):
    bench_cpu(benchmark, steps(*cpu_cap)[name], f"antialias, spherical cap {GRID}x{GRID} B={CPU_BATCH} 224x224 (CPU)")
    record_throughput(benchmark, CPU_BATCH)


@pytest.fixture(scope="module")
def gpu_cap():
    import cupy
    inputs = prepare(cupy, GPU_BATCH)
    cupy.cuda.Device().synchronize()
    return inputs


@needs_gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_spherical_cap(benchmark, gpu_cap, name):
    device_s = bench_gpu(benchmark, steps(*gpu_cap)[name], f"antialias, spherical cap {GRID}x{GRID} B={GPU_BATCH} "
                                                            f"224x224 (GPU)")
    record_throughput(benchmark, GPU_BATCH, device_us=round(device_s * 1e6, 1))
