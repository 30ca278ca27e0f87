"""Vertex normals + SH shading, forward and backward, on the spherical-cap workload (issue 3).

Each op alone (normals_fwd, normals_bwd, sh_fwd, sh_bwd), the four chained (chain), and the
fused shade_vertices forward + backward doing the same work (fused_chain).

Workload: 64 poses of the 189 x 189 spherical-cap grid (35,721 vertices, 70,688 triangles) in
camera space, per-image albedo (B, V, 3) and SH lighting (B, 9, 3), float32.

Figures: images_per_s from the wall time of one synchronised call (Python overhead included), and
achieved GB/s = minimal bytes / time, where minimal bytes count each input read once and each
output written once (intermediates such as the normals inside the chain are not counted). On the
GPU the GB/s are also measured from CUDA events around a queue of back-to-back calls
(`device_gb_s`: the kernels' throughput whenever the GPU, not Python, is the bottleneck) and set
against the device-to-device copy bandwidth measured in this file (read + write bytes of a
cupy copy), the issue's yardstick: aim for at least half of it.

    python -m pytest bench/bench_shading.py --benchmark-only
"""
import numpy as np
import pytest

import fastface
from bench._gpu_timing import bench_copy_bandwidth, bench_gpu, median_seconds, needs_gpu, record_bandwidth
from fastface.ops.normals import vertex_adjacency, vertex_normals, vertex_normals_backward
from fastface.ops.shading import sh_shade, sh_shade_backward, shade_vertices, shade_vertices_backward

GPU_BATCH = 64
CPU_BATCH = 4
GRID = 189
HALF_FOV_DEG = 12.0  # spherical_cap's default: clip x = x / tan(fov/2), so the camera points come back


def cap_workload(batch, n=GRID):
    """(vertices (B, V, 3) camera space, tri (T, 3)) float32 / int32 of the spherical cap."""
    try:
        from bench.workloads import spherical_cap
    except ImportError:
        spherical_cap = None
    if spherical_cap is not None:
        pos, tri, _ = spherical_cap(n=n, batch=batch)
        f = 1.0 / np.tan(np.radians(HALF_FOV_DEG))
        vertices = np.stack([pos[..., 0] / f, pos[..., 1] / f, -pos[..., 3]], axis=-1)
        return vertices.astype(np.float32), tri
    # The same grid built here (bench/workloads.py absent): the cap at 0.5 m, random small rotations.
    rng = np.random.default_rng(0)
    g = np.linspace(-1.0, 1.0, n)
    gx, gy = np.meshgrid(g, g)
    verts = np.stack([gx, gy, np.sqrt(4.0 - gx**2 - gy**2) - 2.0], -1).reshape(-1, 3) * 0.1
    r, c = np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij")
    v00 = (r * n + c).reshape(-1)
    tri = np.stack([np.stack([v00, v00 + 1, v00 + n + 1], -1), np.stack([v00, v00 + n + 1, v00 + n], -1)], 1)
    from scipy.spatial.transform import Rotation
    rot = Rotation.from_euler("xyz", rng.uniform(-0.2, 0.2, (batch, 3))).as_matrix()
    vertices = verts[None] @ rot.transpose(0, 2, 1)
    vertices[..., 2] -= 0.5
    return vertices.astype(np.float32), tri.reshape(-1, 3).astype(np.int32)


def make_inputs(batch, xp=np):
    vertices, tri = cap_workload(batch)
    rng = np.random.default_rng(1)
    B, V = vertices.shape[:2]
    albedo = rng.uniform(0.2, 0.9, size=(B, V, 3)).astype(np.float32)
    sh = (0.1 * rng.normal(size=(B, 9, 3))).astype(np.float32)
    sh[:, 0] += 1.0 / (np.pi * 0.28209479177387814)
    grad = rng.normal(size=(B, V, 3)).astype(np.float32)
    arrays = {k: xp.asarray(a) for k, a in dict(vertices=vertices, tri=tri, albedo=albedo, sh=sh, grad=grad).items()}
    arrays["adjacency"] = vertex_adjacency(arrays["tri"], V)
    arrays["normals"] = vertex_normals(arrays["vertices"], arrays["tri"], arrays["adjacency"])
    return arrays


def minimal_bytes(name, a):
    """Each input read once, each output written once, in bytes."""
    bv3 = a["vertices"].nbytes            # one (B, V, 3) float32 array
    tri, sh = a["tri"].nbytes, a["sh"].nbytes
    return {
        "normals_fwd": bv3 + tri + bv3,                   # vertices, tri -> normals
        "normals_bwd": 2 * bv3 + tri + bv3,               # vertices, tri, grad -> grad_vertices
        "sh_fwd": 2 * bv3 + sh + bv3,                     # normals, albedo, sh -> colours
        "sh_bwd": 3 * bv3 + sh + 2 * bv3 + sh,            # normals, albedo, sh, grad -> grads
        "chain": 3 * bv3 + tri + sh + 3 * bv3 + sh,       # vertices, tri, albedo, sh, grad -> colours, grads
        "fused_chain": 3 * bv3 + tri + sh + 3 * bv3 + sh,  # the same work through shade_vertices
    }[name]


def step(name, a):
    """The timed work of each benchmark, value checks off (they synchronise on the GPU)."""
    v, t, adj, n, al, sh, g = (a[k] for k in ("vertices", "tri", "adjacency", "normals", "albedo", "sh", "grad"))
    if name == "normals_fwd":
        return lambda: vertex_normals(v, t, adj)
    if name == "normals_bwd":
        return lambda: vertex_normals_backward(v, t, g, adj)
    if name == "sh_fwd":
        return lambda: sh_shade(n, al, sh)
    if name == "sh_bwd":
        return lambda: sh_shade_backward(n, al, sh, g)

    if name == "fused_chain":
        return lambda: (shade_vertices(v, t, al, sh, adj), shade_vertices_backward(v, t, al, sh, g, adj))

    def chain():
        normals = vertex_normals(v, t, adj)
        colours = sh_shade(normals, al, sh)
        grad_normals, grad_albedo, grad_sh = sh_shade_backward(normals, al, sh, g)
        return colours, vertex_normals_backward(v, t, grad_normals, adj), grad_albedo, grad_sh
    return chain


# chain: the four ops one after the other (16 (B, V, 3) arrays through memory); fused_chain:
# shade_vertices + its backward (11 arrays; the minimal traffic is 6).
NAMES = ["normals_fwd", "normals_bwd", "sh_fwd", "sh_bwd", "chain", "fused_chain"]


# --- GPU ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_arrays():
    import cupy
    arrays = make_inputs(GPU_BATCH, cupy)
    cupy.cuda.Device().synchronize()
    return arrays


@needs_gpu
def test_gpu_copy_bandwidth(benchmark):
    bench_copy_bandwidth(benchmark)


@needs_gpu
@pytest.mark.parametrize("name", NAMES)
def test_gpu_normals_and_sh(benchmark, gpu_arrays, name):
    device_s = bench_gpu(benchmark, step(name, gpu_arrays), f"spherical cap {GPU_BATCH}x35721 normals+SH (GPU)")
    if median_seconds(benchmark) is None:
        return
    benchmark.extra_info["images_per_s"] = round(GPU_BATCH / median_seconds(benchmark), 1)
    record_bandwidth(benchmark, minimal_bytes(name, gpu_arrays), device_s)


# --- CPU ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cpu_arrays():
    return make_inputs(CPU_BATCH)


def test_cpu_copy_bandwidth(benchmark):
    a = np.ones(1 << 26, dtype=np.float32)
    b = np.empty_like(a)
    benchmark.group = "host copy (256 MiB)"
    benchmark(np.copyto, b, a)
    if median_seconds(benchmark) is not None:
        benchmark.extra_info["copy_gb_s"] = round(2 * a.nbytes / median_seconds(benchmark) / 1e9, 2)


@pytest.mark.parametrize("name", NAMES)
def test_cpu_normals_and_sh(benchmark, cpu_arrays, name):
    fn = step(name, cpu_arrays)
    benchmark.group = f"spherical cap {CPU_BATCH}x35721 normals+SH (CPU)"
    with fastface.value_checks(False):
        fn()  # compile / load the Numba cache outside the timing
        benchmark(fn)
    seconds = median_seconds(benchmark)
    if seconds is None:
        return
    benchmark.extra_info["images_per_s"] = round(CPU_BATCH / seconds, 1)
    benchmark.extra_info["gb_s"] = round(minimal_bytes(name, cpu_arrays) / seconds / 1e9, 2)
