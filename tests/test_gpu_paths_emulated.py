"""fastface's GPU branches against its CPU path, for VALUES, on a machine without a GPU.

tests/fake_cupy.py in compute mode (`install(monkeypatch, compute=True)`): the ops take their cupy
branches on fake cupy arrays, every launch is checked against the kernel's C signature, and then the
kernels that tests/emulated_kernels.py can emulate run on the host on the fake arrays' memory (those
here without barrier, shuffle, vote or shared memory, their threads one after another; the others, with
each block's threads together, are compared in tests/test_gpu_paths_emulated_threads.py). So the Python side of the GPU
path (output allocation, the key buffer aliased onto bary, template choice, float4/float2 accumulators,
unbatched and shared inputs, aligned copies, NULL_POINTER focal) and the kernels' own code are compared
with the CPU path on the same numpy inputs. kernels/checks.cu's value checks compute too (its one
barrier is modelled), so the tests run with the value checks on and read them with check_device_errors.

Tolerances (tests/conftest.py): the rasterizer and interpolation forward passes are compared bit for bit,
as tests/ops/test_rasterize.py's host emulation does (both files are compiled with --fmad=false, here
with -ffp-contract=off, and their expressions are written in the Numba twins' order); per-pixel
grad_bary and the im2col gathers too. Sums made by atomics in another order use the scatter tolerances;
other float32 results (the host's sincosf and sqrtf against numpy's and Numba's, sums in another order)
the GPU-vs-CPU ones.

Which kernels run how (asserted against the analysis): THREADS_TOGETHER below, the kernels with barriers,
shuffles or shared memory (sh_shade and shade_vertices, rigid_transform_backward, the morphable model,
Adam), run with each block's threads together; CHECK_ONLY, the implicit-GEMM convolution (inline PTX),
is only checked, not run; `test_a_check_only_launch_is_recorded_and_computes_nothing` pins what a
check-only launch does.

Not checked here: the GPU's scheduling and memory model, its libm, and FMA contraction where
--fmad=false is not given. The `cupy` GPU tests in tests/ops cover those on a real device.
"""
import sys

import numpy as np
import pytest

import fastface
from fastface._backend import KernelFile, is_cupy_array
from bench.workloads import grid_mesh, spherical_cap
from tests import emulated_kernels, fake_cupy
from tests.fake_cupy import (
    assert_all_computed, assert_close, assert_equal, assert_scatter_close, install, misaligned, strided)

fake_cupy.import_all_fastface_modules()
_sampling_module = sys.modules["fastface.ops.sampling"]

# Declared kernels that cannot run one thread after another, by (file, kernel name), with what in
# their code (or in the device functions they call) needs the threads of a block or warp together:
# they run with each block's threads together (tests/test_gpu_paths_emulated_threads.py compares them).
THREADS_TOGETHER = {
    ("camera.cu", "rigid_transform_bwd"): "__shfl_down_sync",  # block reduction of grad_rotation
    ("morphable.cu", "morphable_fwd"): "__syncthreads",        # shared-memory GEMM tiles
    ("morphable.cu", "morphable_bwd"): "__syncthreads",
    ("morphable.cu", "morphable_fwd_gemv"): "__syncthreads",
    ("morphable.cu", "morphable_bwd_gemv"): "__shfl_down_sync",
    ("shading.cu", "sh_shade_fwd"): "__syncthreads",           # SH coefficients staged in shared memory
    ("shading.cu", "sh_shade_bwd"): "__shfl_down_sync",
    ("shading.cu", "shade_vertices_fwd"): "__syncthreads",
    ("shading.cu", "shade_vertices_bwd_sum"): "__shfl_down_sync",
    ("nn_adam.cu", "adam_prepare"): "__syncthreads",           # block reductions of the gradient norm
    ("nn_adam.cu", "adam_update"): "__syncthreads",
    ("losses.cu", "photometric_loss_fwd"): "__syncthreads",        # a chunk's sums: warps, then shared memory
    ("losses.cu", "photometric_loss_fwd_sum"): "__shfl_down_sync",   # one warp adds an image's chunk sums
    ("losses.cu", "photometric_loss_bwd_count"): "__syncthreads",    # the mask sums, as photometric_loss_fwd
    ("losses.cu", "photometric_loss_bwd"): "__shfl_xor_sync",        # each warp adds its image's mask sums
    ("losses.cu", "landmark_loss_fwd"): "__shfl_down_sync",          # one warp per image
    ("losses.cu", "prior_loss_fwd"): "__shfl_down_sync",
    # Chunk sums of the corrective regularizers: a fixed-order warp-shuffle tree, then the warps' totals.
    ("corrective.cu", "smoothness_fwd"): "__syncthreads",
    ("corrective.cu", "magnitude_fwd"): "__syncthreads",
    ("corrective.cu", "reflectance_constancy_fwd"): "__syncthreads",
    ("corrective.cu", "symmetry_fwd"): "__syncthreads",
}
# ... and those that cannot run on the host at all: their launches are checked only.
CHECK_ONLY = {
    ("nn_conv_implicit.cu", "conv_implicit_fwd"): "asm",      # mma.sync and ldmatrix through inline PTX
}
# The value-check kernel: its __syncthreads_or is modelled (tests/emulated_kernels.py).
BARRIER_OR_FOR_THREAD_0 = {("checks.cu", "flag_values_outside")}


@pytest.fixture
def gpu(monkeypatch):
    return install(monkeypatch, compute=True)


def _triangle_soup(rng, B=2, T=30):
    """Overlapping triangles in clip space, w in [0.5, 2], NDC z in (-0.9, 0.9), one dropped (w < 0)."""
    V = 3 * T
    centre = rng.uniform(-0.9, 0.9, size=(B, T, 1, 2))
    ndc = (centre + 0.5 * (rng.uniform(-1.2, 1.2, size=(B, T, 3, 2)) - centre)).reshape(B, V, 2)
    z, w = rng.uniform(-0.9, 0.9, size=(B, V, 1)), rng.uniform(0.5, 2.0, size=(B, V, 1))
    pos = np.concatenate([ndc * w, z * w, w], -1).astype(np.float32)
    pos[1, 7, 3] = -1.0
    return pos, np.arange(V, dtype=np.int32).reshape(T, 3)


_RES = (32, 40)


def _meshes(rng):
    cap_pos, cap_tri, _ = spherical_cap(n=13, batch=2, seed=2)
    return [(cap_pos, cap_tri), _triangle_soup(rng)]


def _assert_rasters_equal(gpu_raster, cpu_raster):
    covered = (cpu_raster.tri_id >= 0).mean()
    assert 0.05 < covered < 0.98, f"a test image should be partly covered; {covered:.2f} is"
    for name in ("tri_id", "bary", "depth"):
        assert_equal(getattr(gpu_raster, name), getattr(cpu_raster, name))


# ---------------------------------------------------------------------------------------------
# What computes

def test_every_declared_kernel_is_emulated_or_listed_as_check_only():
    declared = {(k.filename, e) for k in KernelFile.declared for e in k.kernels}
    listed = set()
    for filename, expression in sorted(declared):
        name = expression.split("<")[0]
        how = emulated_kernels.emulation(filename, expression)
        if (filename, name) in CHECK_ONLY:
            listed.add((filename, name))
            assert not how.runs and CHECK_ONLY[filename, name] in how.reason, (filename, expression, how)
        elif (filename, name) in THREADS_TOGETHER:
            listed.add((filename, name))
            assert how.mode == "threads" and THREADS_TOGETHER[filename, name] in how.reason, (filename, expression,
                                                                                             how)
        elif (filename, name) in BARRIER_OR_FOR_THREAD_0:
            listed.add((filename, name))
            assert how.mode == "barrier_or_thread_0", (filename, expression, how)
        else:
            assert how.mode == "sequential", (filename, expression, how)
    assert listed == set(CHECK_ONLY) | set(THREADS_TOGETHER) | BARRIER_OR_FOR_THREAD_0, \
        "a listed kernel is no longer declared"


_PROBE = r"""
#define REDUCE(x) __shfl_down_sync(0xffffffffu, x, 1)
__device__ float helper(float x) { return REDUCE(x); }
__device__ float outer(float x) { return helper(x) + 1.f; }
__device__ float plain(float x) { return x * 2.f; }
struct Sink { float* p; __device__ void operator()(float v) const { p[0] = outer(v); } };
template <class F, typename T> __device__ T through_a_template(F f, T x) { return helper(x); }
extern "C" __global__ void uses_a_shuffle_in_a_template(float* p) { p[0] = through_a_template(0, p[1]); }
extern "C" __global__ void uses_a_shuffle_three_calls_deep(float* p) { Sink s{p}; s(p[1]); }
extern "C" __global__ void independent_threads(float* p) { p[threadIdx.x] = plain(p[threadIdx.x]); }
extern "C" __global__ void barrier_or_read_by_thread_0(int* p) {
    bool bad = p[threadIdx.x] < 0;
    if (__syncthreads_or(bad) && threadIdx.x == 0) p[0] = 1;
}
extern "C" __global__ void barrier_or_read_by_every_thread(int* p) {
    bool bad = p[threadIdx.x] < 0;
    if (__syncthreads_or(bad)) p[threadIdx.x] = 1;
}
extern "C" __global__ void inline_ptx(float* p) { asm volatile("membar.gl;"); __syncthreads(); }
"""


def test_the_analysis_follows_calls_structs_and_macros(monkeypatch):
    # The probe, as if it were kernels/probe.cu: a shuffle behind a struct, two calls and a macro.
    monkeypatch.setattr(emulated_kernels, "read_kernel_source", lambda filename: _PROBE)
    emulated_kernels.emulation.cache_clear()
    emulated_kernels._definitions.cache_clear()
    try:
        e = lambda name: emulated_kernels.emulation("probe.cu", name)  # noqa: E731
        assert e("uses_a_shuffle_three_calls_deep").mode == "threads" and "__shfl_down_sync" in e(
            "uses_a_shuffle_three_calls_deep").reason
        assert e("uses_a_shuffle_in_a_template").mode == "threads"
        assert e("independent_threads").mode == "sequential"
        assert e("barrier_or_read_by_thread_0").mode == "barrier_or_thread_0"
        assert e("barrier_or_read_by_every_thread").mode == "threads"
        assert not e("inline_ptx").runs and "asm cannot run on the host" in e("inline_ptx").reason
    finally:
        emulated_kernels.emulation.cache_clear()
        emulated_kernels._definitions.cache_clear()


def test_a_check_only_launch_is_recorded_and_computes_nothing(gpu, rng, monkeypatch):
    """A launch of a kernel the analysis leaves check-only (here rigid_transform_bwd, made so): checked,
    recorded in check_only, its outputs left as allocated."""
    cp = gpu.cupy
    real = emulated_kernels.emulation
    monkeypatch.setattr(emulated_kernels, "emulation", lambda filename, expression: emulated_kernels.Emulation(
        None, "made check-only by the test") if expression.startswith("rigid_transform_bwd") else real(
        filename, expression))
    points = cp.asarray(rng.normal(size=(2, 20, 3)).astype(np.float32))
    rotation = cp.asarray(np.tile(np.eye(3, dtype=np.float32), (2, 1, 1)))
    with fastface.value_checks(False):
        grad_points, grad_rotation, _ = fastface.rigid_transform_backward(points, rotation,
                                                                          cp.zeros((2, 3), np.float32), points)
    assert gpu.check_only == [("camera.cu", "rigid_transform_bwd<false>")] and not gpu.computed
    assert np.isnan(grad_points.get()).all() and not grad_rotation.get().any()  # as allocated: empty, zeros


# ---------------------------------------------------------------------------------------------
# Rasterizer and interpolation

@pytest.mark.parametrize("cull", [False, True])
def test_rasterize_gpu_path_computes_the_cpu_rasters_bit_for_bit(gpu, rng, cull):
    cp = gpu.cupy
    for pos, tri in _meshes(rng):
        cpu = fastface.rasterize(pos, tri, _RES, cull_backfaces=cull)
        _assert_rasters_equal(fastface.rasterize(cp.asarray(pos), cp.asarray(tri), _RES, cull_backfaces=cull), cpu)
        one = fastface.rasterize(misaligned(cp, pos[1]), cp.asarray(tri), _RES, cull_backfaces=cull)  # unbatched
        for name in ("tri_id", "bary", "depth"):
            assert_equal(getattr(one, name), getattr(cpu, name)[1:])
        assert_all_computed(gpu)


def test_rasterize_prepass_gives_the_same_rasters(gpu, rng, monkeypatch):
    cp = gpu.cupy
    monkeypatch.setattr(sys.modules["fastface.ops.rasterize"], "_FWD_PREPASS", True)
    for pos, tri in _meshes(rng):
        _assert_rasters_equal(fastface.rasterize(cp.asarray(pos), cp.asarray(tri), _RES),
                              fastface.rasterize(pos, tri, _RES))
    assert ("rasterize.cu", "rasterize_fwd_screen") in gpu.computed
    assert_all_computed(gpu)


def _attributes(rng, B, V, C, batched):
    return rng.uniform(-1, 1, size=(B, V, C) if batched else (V, C)).astype(np.float32)


@pytest.mark.parametrize("C", [1, 2, 3, 4, 5])
def test_rasterize_interpolate_gpu_path_matches_the_cpu(gpu, rng, tol, C):
    cp = gpu.cupy
    pos, tri, _ = spherical_cap(n=13, batch=2, seed=4)
    B, V = pos.shape[:2]
    for batched in (True, False):
        attr = _attributes(rng, B, V, C, batched)
        cpu_raster, cpu_out = fastface.rasterize_interpolate(pos, tri, _RES, attr)
        g_attr = misaligned(cp, attr) if C == 4 else strided(cp, attr) if C == 3 else cp.asarray(attr)
        raster, out = fastface.rasterize_interpolate(cp.asarray(pos), cp.asarray(tri), _RES, g_attr)
        _assert_rasters_equal(raster, cpu_raster)
        assert_equal(out, cpu_out)
        # The backward, fused (C = 3, 4: float4 accumulator; 2: float2; 1, 5: scalar atomics).
        grad_out = rng.standard_normal(cpu_out.shape).astype(np.float32)
        cpu_grad_pos, cpu_grad_attr = fastface.rasterize_interpolate_backward(pos, tri, attr, cpu_raster, grad_out)
        grad_pos, grad_attr = fastface.rasterize_interpolate_backward(cp.asarray(pos), cp.asarray(tri), g_attr, raster,
                                                                      cp.asarray(grad_out))
        assert grad_attr.flags.c_contiguous
        assert_scatter_close(grad_pos, cpu_grad_pos, tol)
        assert_scatter_close(grad_attr, cpu_grad_attr, tol)
        assert_all_computed(gpu)
    # Unbatched positions (a batch of one) with per-vertex attributes.
    attr = _attributes(rng, 1, V, C, False)
    cpu_raster, cpu_out = fastface.rasterize_interpolate(pos[0], tri, _RES, attr)
    raster, out = fastface.rasterize_interpolate(cp.asarray(pos[0]), cp.asarray(tri), _RES, cp.asarray(attr))
    _assert_rasters_equal(raster, cpu_raster)
    assert_equal(out, cpu_out)
    grad_out = rng.standard_normal(cpu_out.shape).astype(np.float32)
    want = fastface.rasterize_interpolate_backward(pos[0], tri, attr, cpu_raster, grad_out)
    got = fastface.rasterize_interpolate_backward(cp.asarray(pos[0]), cp.asarray(tri), cp.asarray(attr), raster,
                                                  cp.asarray(grad_out))
    assert got[0].shape == pos[0].shape
    for g, w in zip(got, want):
        assert_scatter_close(g, w, tol)
    assert_all_computed(gpu)


def test_rasterize_backward_gpu_path_matches_the_cpu(gpu, rng, tol):
    cp = gpu.cupy
    for pos, tri in _meshes(rng):
        raster = fastface.rasterize(pos, tri, _RES)
        grad_bary = rng.standard_normal(raster.bary.shape).astype(np.float32)
        graster = fastface.Raster(*(cp.asarray(a) for a in (raster.tri_id, raster.bary, raster.depth)))
        want = fastface.rasterize_backward(pos, tri, raster, grad_bary)
        assert_scatter_close(fastface.rasterize_backward(cp.asarray(pos), cp.asarray(tri), graster,
                                                          strided(cp, grad_bary)), want, tol)
        one = fastface.Raster(*(a[1:] for a in (graster.tri_id, graster.bary, graster.depth)))
        got = fastface.rasterize_backward(cp.asarray(pos[1]), cp.asarray(tri), one, cp.asarray(grad_bary[1:]))
        assert_scatter_close(got, fastface.rasterize_backward(pos[1], tri, fastface.Raster(
            raster.tri_id[1:], raster.bary[1:], raster.depth[1:]), grad_bary[1:]), tol)
        assert_all_computed(gpu)


@pytest.mark.parametrize("C", [1, 2, 3, 4, 5])
def test_interpolate_gpu_path_matches_the_cpu(gpu, rng, tol, C):
    cp = gpu.cupy
    pos, tri = _triangle_soup(rng)
    B, V = pos.shape[:2]
    raster = fastface.rasterize(pos, tri, _RES)
    graster = fastface.Raster(*(cp.asarray(a) for a in (raster.tri_id, raster.bary, raster.depth)))
    for batched in (True, False):
        attr = _attributes(rng, B, V, C, batched)
        g_attr = strided(cp, attr) if C == 4 else misaligned(cp, attr) if C == 3 else cp.asarray(attr)
        assert_equal(fastface.interpolate(g_attr, graster, cp.asarray(tri)), fastface.interpolate(attr, raster, tri))
        grad_out = rng.standard_normal((B,) + _RES + (C,)).astype(np.float32)
        cpu_grad_attr, cpu_grad_bary = fastface.interpolate_backward(attr, raster, tri, grad_out)
        grad_attr, grad_bary = fastface.interpolate_backward(g_attr, graster, cp.asarray(tri), cp.asarray(grad_out))
        assert_scatter_close(grad_attr, cpu_grad_attr, tol)
        assert_equal(grad_bary, cpu_grad_bary)  # per pixel, same arithmetic: bit for bit
        assert_all_computed(gpu)


def test_more_images_than_grid_rows_are_all_computed(gpu, rng, tol):
    """B > 65535: the per-pixel kernels take grid rows 0..65534 and loop over the rest (b += gridDim.y)."""
    cp = gpu.cupy
    B = 65537
    pos = np.zeros((B, 3, 4), np.float32)
    pos[:, :, :2] = np.array([[-1, -1], [1, -1], [-1, 1]]) + rng.uniform(-0.6, 0.6, (B, 3, 2))
    pos[:, :, 3] = 1
    tri = np.array([[0, 1, 2]], np.int32)
    attr = rng.uniform(size=(B, 3, 3)).astype(np.float32)
    cpu_raster, cpu_out = fastface.rasterize_interpolate(pos, tri, (1, 2), attr)
    raster, out = fastface.rasterize_interpolate(cp.asarray(pos), cp.asarray(tri), (1, 2), cp.asarray(attr))
    assert max(grid[1] for _, _, grid, _ in gpu.launches if len(grid) > 1) == 65535
    _assert_rasters_equal(raster, cpu_raster)  # which checks that the images are partly covered
    assert_equal(out, cpu_out)
    grad_out = rng.standard_normal(cpu_out.shape).astype(np.float32)
    for got, want in zip(fastface.rasterize_interpolate_backward(cp.asarray(pos), cp.asarray(tri), cp.asarray(attr),
                                                                 raster, cp.asarray(grad_out)),
                         fastface.rasterize_interpolate_backward(pos, tri, attr, cpu_raster, grad_out)):
        assert_scatter_close(got, want, tol)
    assert_all_computed(gpu)


@pytest.mark.parametrize("prepass", [False, True])
def test_rasterize_gpu_path_matches_the_cpu_on_the_issue_10_cases(gpu, rng, monkeypatch, prepass):
    """Bit for bit, the fixed-point coverage, the clipper and the float64 barycentrics (with the vertex
    setup inline, and as a pass of its own whose triangle pass reads the clip positions for the clipper)."""
    from tests.ops.test_rasterize import issue_10_cases  # noqa: PLC0415

    cp = gpu.cupy
    monkeypatch.setattr(sys.modules["fastface.ops.rasterize"], "_FWD_PREPASS", prepass)
    for name, pos, tri, res in issue_10_cases(rng):
        for cull in (False, True):
            cpu = fastface.rasterize(pos, tri, res, cull_backfaces=cull)
            got = fastface.rasterize(cp.asarray(pos), cp.asarray(tri), res, cull_backfaces=cull)
            if not cull:
                assert (cpu.tri_id >= 0).any(), name
            for field in ("tri_id", "bary", "depth"):
                assert_equal(getattr(got, field), getattr(cpu, field))
    assert ("rasterize.cu", "rasterize_fwd_screen" if prepass else "rasterize_fwd") in gpu.computed
    assert_all_computed(gpu)


# ---------------------------------------------------------------------------------------------
# Antialiasing

def test_antialias_gpu_path_matches_the_cpu(gpu, rng, tol):
    """Forward and grad_color are per-pixel gathers in the Numba twin's arithmetic: bit for bit; grad_pos is
    summed with atomics in another order."""
    cp = gpu.cupy
    for pos, tri in _meshes(rng):
        raster = fastface.rasterize(pos, tri, _RES)
        graster = fastface.Raster(*(cp.asarray(a) for a in (raster.tri_id, raster.bary, raster.depth)))
        g_tri = cp.asarray(tri)
        topology = fastface.antialias_topology(g_tri)
        assert_equal(topology.opposite, fastface.antialias_topology(tri).opposite)
        color = rng.uniform(size=raster.tri_id.shape + (3,)).astype(np.float32)
        want = fastface.antialias(color, raster, pos, tri)
        assert (want != color).any(), "a test image should have silhouettes to blend"
        assert_equal(fastface.antialias(misaligned(cp, color), graster, cp.asarray(pos), g_tri, topology=topology),
                     want)
        grad_out = rng.standard_normal(color.shape).astype(np.float32)
        want_color, want_pos = fastface.antialias_backward(color, raster, pos, tri, grad_out)
        got_color, got_pos = fastface.antialias_backward(cp.asarray(color), graster, strided(cp, pos), g_tri,
                                                         cp.asarray(grad_out), topology=topology)
        assert_equal(got_color, want_color)
        assert_scatter_close(got_pos, want_pos, tol)
        assert_equal(fastface.ops.silhouette_edges(cp.asarray(pos), g_tri, topology),
                     fastface.ops.silhouette_edges(pos, tri))
        assert_equal(fastface.ops.silhouette_pixels(graster, cp.asarray(pos), g_tri, topology),
                     fastface.ops.silhouette_pixels(raster, pos, tri))
        # Unbatched positions (one image), 5 channels: the run-time channel count.
        one = fastface.Raster(*(a[1:] for a in (raster.tri_id, raster.bary, raster.depth)))
        g_one = fastface.Raster(*(a[1:] for a in (graster.tri_id, graster.bary, graster.depth)))
        color5 = rng.uniform(size=(1,) + _RES + (5,)).astype(np.float32)
        assert_equal(fastface.antialias(cp.asarray(color5), g_one, cp.asarray(pos[1]), g_tri),
                     fastface.antialias(color5, one, pos[1], tri))
        grad5 = rng.standard_normal(color5.shape).astype(np.float32)
        want_color, want_pos = fastface.antialias_backward(color5, one, pos[1], tri, grad5)
        got_color, got_pos = fastface.antialias_backward(cp.asarray(color5), g_one, cp.asarray(pos[1]), g_tri,
                                                         cp.asarray(grad5))
        assert_equal(got_color, want_color)
        assert_scatter_close(got_pos, want_pos, tol)
    # Neighbours that are degenerate (far vertex exactly on the edge's line) or behind the camera.
    from tests.ops.test_antialias import degenerate_and_hidden_neighbours  # noqa: PLC0415
    pos, tri = degenerate_and_hidden_neighbours()
    assert_equal(fastface.ops.silhouette_edges(cp.asarray(pos), cp.asarray(tri)),
                 fastface.ops.silhouette_edges(pos, tri))
    assert_all_computed(gpu, "antialias_silhouettes", "antialias_silhouette_pixels", "antialias_fwd", "antialias_bwd")


# ---------------------------------------------------------------------------------------------
# Normals, camera, sampling

def _grid_mesh(rng, n=6, B=2):
    """B copies of an n x n grid over [-0.5, 0.5]^2 with random heights in +-0.2, and its triangles."""
    xy, tri = grid_mesh(n)
    vertices = np.concatenate([np.broadcast_to(0.5 * xy, (B, n * n, 2)), rng.uniform(-0.2, 0.2, (B, n * n, 1))], -1)
    return vertices.astype(np.float32), tri


def test_vertex_adjacency_and_normals_gpu_paths_match_the_cpu(gpu, rng, tol):
    cp = gpu.cupy
    vertices, tri = _grid_mesh(rng)
    V = vertices.shape[1]
    tri = np.concatenate([tri, [[0, 0, 1]], tri[:3]]).astype(np.int32)  # a degenerate and repeated triangles
    adjacency = fastface.vertex_adjacency(tri, V)
    g_adjacency = fastface.vertex_adjacency(cp.asarray(tri), V)
    assert_equal(g_adjacency.offsets, adjacency.offsets)
    assert_equal(g_adjacency.corners, adjacency.corners)
    assert_all_computed(gpu)
    grad_out = rng.standard_normal(vertices.shape).astype(np.float32)
    for v, g, adj in ((vertices, grad_out, g_adjacency), (vertices[0], grad_out[0], None)):  # None: built in the call
        want = fastface.vertex_normals(v, tri)
        assert_close(fastface.vertex_normals(strided(cp, v), cp.asarray(tri), adjacency=adj), want, tol)
        want = fastface.vertex_normals_backward(v, tri, g)
        assert_close(fastface.vertex_normals_backward(cp.asarray(v), cp.asarray(tri), cp.asarray(g), adjacency=adj),
                      want, tol)
        assert_all_computed(gpu)


def test_euler_rotation_gpu_path_matches_the_cpu(gpu, rng, tol):
    cp = gpu.cupy
    for shape in ((5, 3), (3,)):
        angles = rng.uniform(-1, 1, size=shape).astype(np.float32)
        grad_out = rng.standard_normal(shape[:-1] + (3, 3)).astype(np.float32)
        assert_close(fastface.euler_rotation(strided(cp, angles)), fastface.euler_rotation(angles), tol)
        assert_close(fastface.euler_rotation_backward(cp.asarray(angles), cp.asarray(grad_out)),
                      fastface.euler_rotation_backward(angles, grad_out), tol)
        assert_all_computed(gpu)


def _camera_points(rng, shape):
    p = rng.normal(size=shape).astype(np.float32)
    p[..., 2] -= 20.0  # in front of the camera, beyond near = 10
    return p


def test_rigid_transform_gpu_path_matches_the_cpu(gpu, rng, tol):
    cp = gpu.cupy
    B, V = 3, 300  # more than one block of vertices
    rotation = fastface.euler_rotation(rng.uniform(-1, 1, (B, 3)).astype(np.float32))
    translation = rng.normal(size=(B, 3)).astype(np.float32)
    for points in (_camera_points(rng, (B, V, 3)), _camera_points(rng, (V, 3))):  # per image, and shared
        want = fastface.rigid_transform(points, rotation, translation)
        assert_close(fastface.rigid_transform(strided(cp, points), cp.asarray(rotation), cp.asarray(translation)),
                      want, tol)
        assert_all_computed(gpu)


@pytest.mark.parametrize("op", ["perspective_projection", "project_to_pixels"])
def test_projections_gpu_paths_match_the_cpu(gpu, rng, tol, op):
    cp = gpu.cupy
    forward, backward = getattr(fastface, op), getattr(fastface, op + "_backward")
    width = 4 if op == "perspective_projection" else 2
    for points in (_camera_points(rng, (3, 16, 3)), _camera_points(rng, (16, 3))):
        B = points.shape[0] if points.ndim == 3 else 1
        focal_array = rng.uniform(400, 600, B).astype(np.float32)
        for focal, g_focal in ((500.0, 500.0), (np.float32(450.0), np.float32(450.0)), (400, 400),
                               (focal_array, cp.asarray(focal_array))):
            g_points = strided(cp, points) if points.ndim == 3 else cp.asarray(points)
            assert_close(forward(g_points, g_focal, (24, 32)), forward(points, focal, (24, 32)), tol)
            grad_out = rng.standard_normal(points.shape[:-1] + (width,)).astype(np.float32)
            assert_close(backward(g_points, g_focal, (24, 32), cp.asarray(grad_out)),
                          backward(points, focal, (24, 32), grad_out), tol)
            if op == "perspective_projection":  # add_to: the gradient added into the caller's array
                start = rng.standard_normal(points.shape).astype(np.float32)
                g_start = cp.asarray(start)
                returned = backward(g_points, g_focal, (24, 32), cp.asarray(grad_out), add_to=g_start)
                assert returned is g_start
                assert_close(g_start, backward(points, focal, (24, 32), grad_out, add_to=start), tol)
            assert_all_computed(gpu)


def _sampling_inputs(rng, batched):
    image = rng.uniform(size=(2, 9, 11, 3) if batched else (9, 11, 3)).astype(np.float32)
    points = rng.uniform(-1, 12, size=(2, 40, 2) if batched else (40, 2)).astype(np.float32)
    points[..., :5, :] = np.round(points[..., :5, :])  # integer coordinates: one-sided derivatives
    return image, points


def test_sample_image_gpu_path_matches_the_cpu(gpu, rng, tol):
    cp = gpu.cupy
    for batched in (True, False):
        image, points = _sampling_inputs(rng, batched)
        im, pts = (strided(cp, image), strided(cp, points)) if batched else (cp.asarray(image), cp.asarray(points))
        assert_close(fastface.sample_image(im, pts), fastface.sample_image(image, points), tol)
        grad_out = rng.standard_normal(points.shape[:-1] + (3,)).astype(np.float32)
        cpu_grad_image, cpu_grad_points = fastface.sample_image_backward(image, points, grad_out)
        grad_image, grad_points = fastface.sample_image_backward(im, pts, cp.asarray(grad_out))
        assert_scatter_close(grad_image, cpu_grad_image, tol)
        assert_close(grad_points, cpu_grad_points, tol)
        assert_all_computed(gpu)


@pytest.mark.parametrize("per_image", [False, True])
def test_landmark_and_prior_loss_gpu_paths_match_the_cpu(gpu, rng, tol, per_image):
    cp = gpu.cupy
    points = rng.uniform(0, 64, size=(3, 68, 2)).astype(np.float32)
    target = (points + rng.normal(scale=3.0, size=points.shape)).astype(np.float32)
    weights = rng.uniform(0, 2, size=(3, 68) if per_image else (68,)).astype(np.float32)
    grad_out = rng.normal(size=3).astype(np.float32)
    g = [cp.asarray(a) for a in (points, target, weights, grad_out)]
    assert_close(fastface.landmark_loss(strided(cp, points), *g[1:3]), fastface.landmark_loss(points, target, weights),
                 tol)
    assert_close(fastface.landmark_loss_backward(*g), fastface.landmark_loss_backward(points, target, weights, grad_out),
                 tol)
    coeffs = rng.normal(size=(3, 80)).astype(np.float32)
    for w in (None, rng.uniform(0, 2, size=80).astype(np.float32)):
        gw = None if w is None else cp.asarray(w)
        assert_close(fastface.prior_loss(cp.asarray(coeffs), gw), fastface.prior_loss(coeffs, w), tol)
        assert_close(fastface.prior_loss_backward(cp.asarray(coeffs), gw, g[3]),
                     fastface.prior_loss_backward(coeffs, w, grad_out), tol)
    assert_all_computed(gpu, "landmark_loss_fwd", "landmark_loss_bwd", "prior_loss_fwd", "prior_loss_bwd")


@pytest.mark.parametrize("B, K", [(11, 68), (8, 5), (1, 100)])
def test_landmark_and_prior_loss_one_warp_per_image_cover_every_image_and_point(gpu, rng, tol, B, K):
    # 11 images: two blocks of 8 warps, the second with 5 warps past the batch; K = 5 leaves 27 lanes idle,
    # K = 100 gives lanes 4 points.
    cp = gpu.cupy
    points = rng.uniform(0, 64, size=(B, K, 2)).astype(np.float32)
    target = (points + rng.normal(scale=3.0, size=points.shape)).astype(np.float32)
    weights = rng.uniform(0, 2, size=(B, K)).astype(np.float32)
    assert_close(fastface.landmark_loss(*(cp.asarray(a) for a in (points, target, weights))),
                 fastface.landmark_loss(points, target, weights), tol)
    coeffs = rng.normal(size=(B, K)).astype(np.float32)
    assert_close(fastface.prior_loss(cp.asarray(coeffs)), fastface.prior_loss(coeffs), tol)
    assert_all_computed(gpu, "landmark_loss_fwd", "prior_loss_fwd")


def _photometric_inputs(rng, shape, mask_kind):
    """(rendered, target, mask, grad_out) of shape (B, H, W, C), one image's mask empty when B > 1."""
    rendered = rng.uniform(size=shape).astype(np.float32)
    target = rng.uniform(size=shape).astype(np.float32)
    mask = rng.uniform(size=shape[:3]) < 0.6 if mask_kind == "bool" else rng.uniform(size=shape[:3]).astype(np.float32)
    mask[0, :, : shape[2] // 3] = 0  # whole quads outside the mask (no colour reads), and partly covered ones
    if shape[0] > 1:
        mask[1] = 0
    return rendered, target, mask, rng.normal(size=shape[0]).astype(np.float32)


# (B, H, W, C) -> the load path. 40 x 60 = 2400 pixels: three chunks of 1024 (the last partial), quads; 37 x 41 =
# 1517 (odd): two chunks, one pixel a thread; C = 2: one pixel a thread; 3 x 5: a single partial chunk;
# 96 x 100 = 9600: ten chunks and two mask-count blocks of 8192.
_PHOTOMETRIC_SHAPES = [((1, 40, 60, 3), "quads"), ((3, 37, 41, 3), "pixels"), ((3, 8, 10, 2), "pixels"),
                       ((1, 3, 5, 3), "pixels"), ((3, 96, 100, 3), "quads")]


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("shape, path", _PHOTOMETRIC_SHAPES, ids=lambda v: "x".join(map(str, v)) if isinstance(
    v, tuple) else v)
def test_photometric_loss_gpu_path_matches_the_cpu_over_chunks_and_load_paths(gpu, rng, tol, shape, path, mask_kind):
    cp = gpu.cupy
    rendered, target, mask, grad_out = _photometric_inputs(rng, shape, mask_kind)
    g = [cp.asarray(a) for a in (rendered, target, mask, grad_out)]
    loss = fastface.photometric_loss(*g[:3])
    grad = fastface.photometric_loss_backward(*g)
    assert_close(loss, fastface.photometric_loss(rendered, target, mask), tol)
    assert_close(grad, fastface.photometric_loss_backward(rendered, target, mask, grad_out), tol)
    if shape[0] > 1:
        assert loss.get()[1] == 0 and not grad.get()[1].any()  # the empty mask: 0, and a zero gradient
    assert not grad.get()[0][~mask[0].astype(bool)].any()  # zero outside the mask, also inside partly covered quads
    quads = "float4" if path == "quads" else "float>"
    launched = [name for f, name, *_ in gpu.launches if f == "losses.cu" and name.startswith("photometric_loss_fwd<")]
    assert launched and all(quads in name for name in launched), launched
    assert_all_computed(gpu, "photometric_loss_fwd", "photometric_loss_fwd_sum", "photometric_loss_bwd_count",
                        "photometric_loss_bwd")
    # Misaligned inputs and out are copied to aligned memory: the same kernels, the same bits.
    r, t = misaligned(cp, rendered), misaligned(cp, target)
    assert_equal(fastface.photometric_loss(r, t, g[2]), loss.get())
    out = misaligned(cp, np.zeros(shape, np.float32))
    assert fastface.photometric_loss_backward(r, t, g[2], g[3], out=out) is out
    assert_equal(out, grad.get())
    assert_all_computed(gpu)


@pytest.mark.parametrize("shape", [(2, 6, 10, 3), (2, 5, 7, 3)], ids=["quads", "pixels"])
def test_photometric_loss_never_reads_colours_outside_the_mask_into_its_values(gpu, rng, tol, shape):
    # NaN colours where the mask is 0 (value checks off), inside quads the mask partly covers: as on the CPU,
    # a finite loss and a zero gradient there.
    cp = gpu.cupy
    rendered, target, mask, grad_out = _photometric_inputs(rng, shape, "bool")
    mask[0, :, -1] = False
    rendered[0, :, -1] = np.nan
    with fastface.value_checks(False):
        want = fastface.photometric_loss(rendered, target, mask), fastface.photometric_loss_backward(
            rendered, target, mask, grad_out)
        g = [cp.asarray(a) for a in (rendered, target, mask, grad_out)]
        got = fastface.photometric_loss(*g[:3]), fastface.photometric_loss_backward(*g)
    assert np.isfinite(want[0]).all() and np.isfinite(want[1]).all()
    assert_close(got[0], want[0], tol)
    assert_close(got[1], want[1], tol)
    assert_all_computed(gpu)


def test_photometric_loss_over_32_mask_count_blocks_caps_them_and_sums_every_pixel(gpu, rng, tol):
    # 1 x 520 x 512 = 266,240 pixels: 33 mask-count chunks of 8192, capped at 32 blocks striding over the image.
    cp = gpu.cupy
    losses_module = sys.modules["fastface.ops.losses"]
    shape = (1, 520, 512, 3)
    assert -(-520 * 512 // losses_module._GPU_COUNT_CHUNK) > losses_module._GPU_MAX_COUNT_BLOCKS
    rendered, target, mask, grad_out = _photometric_inputs(rng, shape, "bool")
    g = [cp.asarray(a) for a in (rendered, target, mask, grad_out)]
    assert_close(fastface.photometric_loss(*g[:3]), fastface.photometric_loss(rendered, target, mask), tol)
    assert_close(fastface.photometric_loss_backward(*g),
                 fastface.photometric_loss_backward(rendered, target, mask, grad_out), tol)
    assert ("losses.cu", "photometric_loss_bwd_count<unsigned int>", (32,), (256,)) in gpu.launches
    assert_all_computed(gpu)


def test_photometric_loss_with_too_few_chunks_for_the_kernel_is_caught(gpu, rng, tol, monkeypatch):
    """The negative control: a Python chunk twice the kernel's launches half the blocks, and the pixels of the
    missing chunks go unsummed."""
    cp = gpu.cupy
    monkeypatch.setattr(sys.modules["fastface.ops.losses"], "_GPU_CHUNK", 2048)
    rendered, target, mask, _ = _photometric_inputs(rng, (1, 40, 60, 3), "bool")
    got = fastface.photometric_loss(*(cp.asarray(a) for a in (rendered, target, mask)))
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_close(got, fastface.photometric_loss(rendered, target, mask), tol)


def test_a_launch_the_signature_check_accepts_but_that_swaps_two_ints_is_caught(gpu, rng, tol, monkeypatch):
    """The negative control: H and W swapped in the launch are both np.int32, so only values show it."""
    cp = gpu.cupy
    real = _sampling_module._kernel

    def swapped(name):
        launcher = real(name)
        return lambda grid, block, args: launcher(grid, block, args[:4] + (args[5], args[4]) + args[6:])

    image, points = _sampling_inputs(rng, True)
    want = fastface.sample_image(image, points)
    monkeypatch.setattr(_sampling_module, "_kernel", swapped)
    got = fastface.sample_image(cp.asarray(image), cp.asarray(points))
    assert ("sampling.cu", "sample_image_fwd") in gpu.computed
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_close(got, want, tol)


def test_value_checks_computed_on_the_fake_gpu_find_bad_values(gpu, rng):
    cp = gpu.cupy
    pos, tri, _ = spherical_cap(n=5, batch=2, seed=1)
    bad = pos.copy()
    bad[1, 3, 0] = np.nan
    # The check kernels ran at their launch, so the failure surfaces at the op's next check (on a GPU:
    # there, or at a later call) or, at the latest, at check_device_errors.
    with pytest.raises(ValueError, match=r"pos float32 \(2, 25, 4\) holds NaN"):
        fastface.rasterize(cp.asarray(bad), cp.asarray(tri), (8, 8))
        fastface.check_device_errors()
    assert ("checks.cu", "flag_values_outside<float, float>") in gpu.computed
    fastface.rasterize(cp.asarray(pos), cp.asarray(tri), (8, 8))
    fastface.check_device_errors()  # good input: nothing
    with pytest.raises(ValueError, match=r"tri int32 \(32, 3\) holds vertex indices outside the valid range \[0, 24\]"):
        fastface.rasterize(cp.asarray(pos), cp.asarray(tri + 1), (8, 8))  # the index check (int32) on the device
        fastface.check_device_errors()
    assert ("checks.cu", "flag_values_outside<int, int>") in gpu.computed


# ---------------------------------------------------------------------------------------------
# fastface.nn's gathers and pooling (the GEMMs go through the fake cuBLAS, which multiplies)

def test_conv2d_gpu_path_matches_the_cpu(gpu, rng, tol):
    cp = gpu.cupy
    x = rng.normal(size=(2, 9, 9, 4)).astype(np.float32)
    weight = rng.normal(size=(3, 3, 4, 6)).astype(np.float32)
    bias = rng.normal(size=6).astype(np.float32)
    grad_y = rng.normal(size=(2, 5, 5, 6)).astype(np.float32)

    def rel(got, want):
        return np.linalg.norm(got.get() - want) / np.linalg.norm(want)

    y = fastface.nn.conv2d(cp.asarray(x), cp.asarray(weight), cp.asarray(bias), stride=2, padding=1)
    assert rel(y, fastface.nn.conv2d(x, weight, bias, stride=2, padding=1)) < tol["nn_gpu_cpu_float32_rel"]
    got = fastface.nn.conv2d_backward(cp.asarray(x), cp.asarray(weight), cp.asarray(grad_y), 2, 1)
    for g, w in zip(got, fastface.nn.conv2d_backward(x, weight, grad_y, 2, 1)):
        assert rel(g, w) < tol["nn_gpu_cpu_float32_rel"]
    assert gpu.gemm_calls
    assert_all_computed(gpu)


@pytest.mark.parametrize("C, kernel, stride, padding", [(3, (4, 4), 4, 0), (3, (3, 3), 1, 1), (8, (3, 3), 2, 1),
                                                        (16, (3, 3), 1, 1)])
@pytest.mark.parametrize("switches", [(True, True), (False, False)], ids=["patch_rows", "generic"])
def test_im2col_gpu_path_matches_the_cpu(gpu, rng, tol, monkeypatch, C, kernel, stride, padding, switches):
    cp = gpu.cupy
    conv = sys.modules["fastface.nn.conv"]
    monkeypatch.setattr(conv, "USE_PATCH_GATHER", switches[0])
    monkeypatch.setattr(conv, "USE_ROWS_GATHER", switches[1])
    x = rng.normal(size=(2, 8, 8, C)).astype(np.float32)
    bias = rng.normal(size=C).astype(np.float32)
    for relu in (False, True):
        cols = fastface.nn.im2col(x, bias, kernel, stride, padding, in_relu=relu)
        assert_equal(fastface.nn.im2col(cp.asarray(x), cp.asarray(bias), kernel, stride, padding, in_relu=relu), cols)
        # float16 out: the same float32 value rounded once.
        assert_equal(fastface.nn.im2col(cp.asarray(x), cp.asarray(bias), kernel, stride, padding, in_relu=relu,
                                         out_dtype=np.float16), cols.astype(np.float16))
        grad_cols = rng.normal(size=cols.shape).astype(np.float32)
        want = fastface.nn.im2col_backward(x, bias, grad_cols, kernel, stride, padding, in_relu=relu, scale=0.5)
        assert_close(fastface.nn.im2col_backward(cp.asarray(x), cp.asarray(bias), cp.asarray(grad_cols), kernel,
                                                  stride, padding, in_relu=relu, scale=0.5), want, tol)
        # float16 x and gradients: compared with the CPU on the same (widened) values, within a float16 ulp.
        x16, g16 = x.astype(np.float16), grad_cols.astype(np.float16)
        cols16 = fastface.nn.im2col(x16.astype(np.float32), bias, kernel, stride, padding, in_relu=relu)
        assert_equal(fastface.nn.im2col(cp.asarray(x16), cp.asarray(bias), kernel, stride, padding, in_relu=relu),
                      cols16.astype(np.float16))
        want16 = fastface.nn.im2col_backward(x16.astype(np.float32), bias, g16.astype(np.float32), kernel, stride,
                                             padding, in_relu=relu, scale=0.5)
        got16 = fastface.nn.im2col_backward(cp.asarray(x16), cp.asarray(bias), cp.asarray(g16), kernel, stride,
                                            padding, in_relu=relu, scale=0.5)
        assert got16.dtype == np.float16
        np.testing.assert_allclose(got16.get().astype(np.float32), want16, rtol=tol["float16_rtol"], atol=1e-6)
        assert_all_computed(gpu)


def test_global_avg_pool_gpu_path_matches_the_cpu(gpu, rng, tol):
    cp = gpu.cupy
    x = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    grad_out = rng.normal(size=(3, 6)).astype(np.float32)
    for bias in (None, rng.normal(size=6).astype(np.float32)):
        g_bias = None if bias is None else cp.asarray(bias)
        for relu in (False, True):
            assert_close(fastface.nn.global_avg_pool(cp.asarray(x), g_bias, relu),
                          fastface.nn.global_avg_pool(x, bias, relu), tol)
            assert_close(fastface.nn.global_avg_pool_backward(cp.asarray(x), g_bias, cp.asarray(grad_out), relu),
                          fastface.nn.global_avg_pool_backward(x, bias, grad_out, relu), tol)
            assert_all_computed(gpu)


def test_compute_mode_is_gone_after_its_tests():
    """Runs last (file order): the red zones and the fake end with each test."""
    assert getattr(sys.modules.get("cupy"), "__doc__", None) != "fake cupy (tests/fake_cupy.py)"
    assert fake_cupy._guard_allocations is False and not fake_cupy._guards and not fake_cupy._allocations
