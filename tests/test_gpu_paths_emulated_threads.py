"""fastface's GPU paths whose kernels need a block's threads together, against the CPU path, for VALUES.

tests/emulated_kernels.py runs these kernels in its "threads" mode: each CUDA thread of a block is a fiber
on the host, switched at __syncthreads* (a block barrier that threads returning from the kernel drop out
of), at warp shuffles and votes (an exchange between the live lanes of a warp: reading a lane that has
returned, does not exist or is not in the mask fails the launch) and nowhere else; __shared__ memory is
static storage (blocks run one after another, even ones in thread order, odd ones in reverse order); a
deadlock fails the launch at once. So sh_shade / shade_vertices (kernels/shading.cu), the morphable model
(kernels/morphable.cu: FaceModel.evaluate / evaluate_backward, hence render_faces),
rigid_transform_backward (kernels/camera.cu) and Adam (kernels/nn_adam.cu) are compared with the CPU
path here, on a machine without a GPU (tests/test_gpu_paths_emulated.py does the same for the kernels
whose threads run one after another). The first tests check the emulation itself on probe kernels.

Tolerances (tests/conftest.py): per-vertex results of the same arithmetic in another order (host libm,
no FMA contraction) the GPU-vs-CPU ones; sums made by block reductions and atomics (grad_sh, a shared
albedo's gradient, grad_rotation, grad_translation, shared grad_points, grad_vertices of the fused
shading) the scatter ones; the morphable GEMMs against BLAS `gemm_l1_rtol` of the sum of the terms'
magnitudes; render_faces the pipeline ones; the encoder the nn ones.

Not checked here: the GPU's scheduling (fibers interleave only at barriers, shuffles and votes, so races
between other accesses, such as atomics against plain loads, do not show), its memory model, its libm.
"""
import types

import numpy as np
import pytest

import fastface
from bench.workloads import grid_mesh
from fastface.nn import Adam
from tests import emulated_kernels, fake_cupy
from tests.fake_cupy import assert_all_computed, assert_close, assert_scatter_close, install, strided

fake_cupy.import_all_fastface_modules()


@pytest.fixture
def gpu(monkeypatch):
    return install(monkeypatch, compute=True)


def _gemm_close(got, want, magnitude, tol):
    """A float32 sum over K terms against BLAS: within gemm_l1_rtol of sum_k |term_k| (`magnitude`)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, got.dtype, want.shape, want.dtype)
    assert np.abs(want).max() > 0
    error = np.abs(got.get().astype(np.float64) - want)
    worst = np.max(error - tol["gemm_l1_rtol"] * magnitude)
    assert worst <= 0, f"off by up to {error.max():.3g} (allowed {tol['gemm_l1_rtol']:.0e} of sum |terms|)"


# ---------------------------------------------------------------------------------------------
# The emulation itself, on probe kernels

_PROBE = r"""
// Block sum through warp shuffles and shared memory (blocks of whole warps).
extern "C" __global__ void block_sum(const float* x, float* out, int n) {
    __shared__ float warp_sums[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float s = i < n ? x[i] : 0.f;
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_down_sync(0xffffffffu, s, offset);
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int w = 0; w < ((int)blockDim.x + 31) / 32; ++w) t += warp_sums[w];
        out[blockIdx.x] = t;
    }
}
// Votes and the block-wide predicates.
extern "C" __global__ void votes(const int* p, int* out) {
    const int v = p[threadIdx.x];
    const unsigned ballot = __ballot_sync(0xffffffffu, v);
    const int count = __syncthreads_count(v), all = __syncthreads_and(v), any = __syncthreads_or(v);
    if (threadIdx.x == 0) { out[0] = (int)ballot; out[1] = count; out[2] = all; out[3] = any; }
    out[4 + threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 1);
}
// Threads that return early drop out of later barriers (as on current GPUs).
extern "C" __global__ void early_exit(int* out) {
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if (t >= 40) return;
    __syncthreads();
    out[t] += 1;
}
// Half a warp at a full-warp shuffle, the other half at the block barrier: a deadlock.
extern "C" __global__ void divergent_barrier(int* out) {
    int v = threadIdx.x;
    if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
    else __syncthreads();
    out[threadIdx.x] = v;
}
// A shuffle reading a lane that has returned.
extern "C" __global__ void reads_a_returned_lane(float* out) {
    if (threadIdx.x >= 16) return;
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 8);
}
extern "C" __global__ void atomic_count(float* out) { atomicAdd(out, 1.0f); }
"""
_PROBE_KERNELS = ("block_sum", "votes", "early_exit", "divergent_barrier", "reads_a_returned_lane", "atomic_count")


@pytest.fixture
def probe(monkeypatch):
    """kernels/probe_threads.cu as _PROBE, and a launcher of its kernels on numpy arrays."""
    for module in (emulated_kernels, fake_cupy):
        monkeypatch.setattr(module, "read_kernel_source", lambda filename: _PROBE)
    caches = (emulated_kernels.emulation, emulated_kernels._definitions, fake_cupy.kernel_signature,
              fake_cupy._parsed_source)
    for cache in caches:
        cache.cache_clear()
    kernel_file = types.SimpleNamespace(filename="probe_threads.cu", options=(), kernels=_PROBE_KERNELS)

    def run(name, grid, block, *args):
        emulated_kernels.launch(kernel_file, name, grid, block, args)

    run.library = lambda: emulated_kernels.library("probe_threads.cu", (), _PROBE_KERNELS)
    yield run
    for cache in caches:
        cache.cache_clear()


def test_probe_kernels_run_with_their_threads_together(probe, rng):
    assert emulated_kernels.emulation("probe_threads.cu", "block_sum").mode == "threads"
    x = rng.normal(size=1000).astype(np.float32)
    for threads in (32, 96, 256, 1024):
        blocks = (x.size + threads - 1) // threads
        out = np.full(blocks, np.nan, np.float32)
        probe("block_sum", (blocks,), (threads,), x, out, np.int32(x.size))
        want = np.add.reduceat(x.astype(np.float64), np.arange(0, x.size, threads))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    p = (rng.uniform(size=64) < 0.5).astype(np.int32)
    out = np.full(68, -7, np.int32)
    probe("votes", (1,), (64,), p, out)
    assert out[0] == np.int32(np.uint32(sum(int(v) << i for i, v in enumerate(p[:32]))))
    assert out[1:4].tolist() == [p.sum(), int(p.all()), int(p.any())]
    np.testing.assert_array_equal(out[4:], p.reshape(-1, 2)[:, ::-1].reshape(-1))
    out = np.zeros(64, np.int32)
    probe("early_exit", (2, 1, 1), (8, 4, 2), out)  # two blocks of a 3-D block shape
    assert out.tolist() == [2] * 40 + [0] * 24
    total = np.zeros(1, np.float32)
    probe("atomic_count", (50,), (256,), total)  # 12,800 float atomics, exact in float32
    assert total[0] == 50 * 256


def test_probe_deadlock_and_undefined_reads_fail_the_launch(probe):
    with pytest.raises(fake_cupy.LaunchError, match=r"a deadlock in block \(0, 0, 0\): of 64 live threads, 16 wait "
                                                    r"in __shfl_xor_sync, 48 wait in __syncthreads, none can go on"):
        probe("divergent_barrier", (1,), (64,), np.zeros(64, np.int32))
    with pytest.raises(fake_cupy.LaunchError, match=r"__shfl_down_sync: reads lane 16, which has returned"):
        probe("reads_a_returned_lane", (1,), (32,), np.zeros(32, np.float32))
    # A partial warp: lanes 20..31 do not exist, and lane 4 reads lane 20.
    with pytest.raises(fake_cupy.LaunchError, match=r"reads lane 20, which has returned or does not exist"):
        probe("block_sum", (1,), (20,), np.ones(20, np.float32), np.zeros(1, np.float32), np.int32(20))
    out = np.zeros(64, np.int32)
    probe("early_exit", (1,), (64,), out)  # the library still works after a failed launch
    assert out.sum() == 40


# ---------------------------------------------------------------------------------------------
# Shading

def _unit_normals(rng, shape):
    n = rng.normal(size=shape)
    return (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)


def _lighting(rng, B):
    sh = rng.normal(scale=0.3, size=(B, 9, 3)).astype(np.float32)
    sh[:, 0] += 0.8
    return sh


@pytest.mark.parametrize("shared_albedo", [False, True])
def test_sh_shade_gpu_path_matches_the_cpu(gpu, rng, tol, shared_albedo):
    cp = gpu.cupy
    B, V = 2, 700  # several blocks of 256 vertices, the last one partial
    normals = _unit_normals(rng, (B, V, 3))
    albedo = rng.uniform(0.2, 0.9, size=(V, 3) if shared_albedo else (B, V, 3)).astype(np.float32)
    sh = _lighting(rng, B)
    grad_out = rng.normal(size=(B, V, 3)).astype(np.float32)
    assert_close(fastface.sh_shade(strided(cp, normals), cp.asarray(albedo), cp.asarray(sh)),
           fastface.sh_shade(normals, albedo, sh), tol)
    got = fastface.sh_shade_backward(cp.asarray(normals), cp.asarray(albedo), cp.asarray(sh), cp.asarray(grad_out))
    want = fastface.sh_shade_backward(normals, albedo, sh, grad_out)
    assert_close(got[0], want[0], tol)
    (assert_scatter_close if shared_albedo else assert_close)(got[1], want[1], tol)
    assert_scatter_close(got[2], want[2], tol)
    assert_all_computed(gpu, "sh_shade_fwd", "sh_shade_bwd")
    # Unbatched.
    got = fastface.sh_shade_backward(cp.asarray(normals[1]), cp.asarray(albedo if shared_albedo else albedo[1]),
                                     cp.asarray(sh[1]), cp.asarray(grad_out[1]))
    want = fastface.sh_shade_backward(normals[1], albedo if shared_albedo else albedo[1], sh[1], grad_out[1])
    assert_close(got[0], want[0], tol)
    assert_scatter_close(got[1], want[1], tol)
    assert_scatter_close(got[2], want[2], tol)
    assert_all_computed(gpu, "sh_shade_bwd")


def _bumpy_grid(rng, n=20, B=2):
    """B copies of an n x n grid over [-0.5, 0.5]^2 with random heights in +-0.1, and its triangles."""
    xy, tri = grid_mesh(n)
    vertices = np.concatenate([np.broadcast_to(0.5 * xy, (B, n * n, 2)), rng.uniform(-0.1, 0.1, (B, n * n, 1))], -1)
    return vertices.astype(np.float32), tri


@pytest.mark.parametrize("shared_albedo", [False, True])
def test_shade_vertices_gpu_path_matches_the_cpu(gpu, rng, tol, shared_albedo):
    cp = gpu.cupy
    vertices, tri = _bumpy_grid(rng)
    B, V = vertices.shape[:2]
    albedo = rng.uniform(0.2, 0.9, size=(V, 3) if shared_albedo else (B, V, 3)).astype(np.float32)
    sh = _lighting(rng, B)
    grad_out = rng.normal(size=(B, V, 3)).astype(np.float32)
    g = [cp.asarray(a) for a in (vertices, tri, albedo, sh, grad_out)]
    assert_close(fastface.shade_vertices(*g[:4]), fastface.shade_vertices(vertices, tri, albedo, sh), tol)
    got = fastface.shade_vertices_backward(*g)
    want = fastface.shade_vertices_backward(vertices, tri, albedo, sh, grad_out)
    # grad_vertices sums each vertex's ring of face terms (~1e2 relative to the result where they cancel).
    assert_scatter_close(got[0], want[0], tol)
    (assert_scatter_close if shared_albedo else assert_close)(got[1], want[1], tol)
    assert_scatter_close(got[2], want[2], tol)
    # add_to_albedo: grad_albedo added into the caller's array (accumulate = 1 in the kernel).
    start = rng.normal(size=albedo.shape).astype(np.float32)
    g_start = cp.asarray(start)
    assert fastface.shade_vertices_backward(*g, add_to_albedo=g_start)[1] is g_start
    want_added = fastface.shade_vertices_backward(vertices, tri, albedo, sh, grad_out, add_to_albedo=start.copy())[1]
    (assert_scatter_close if shared_albedo else assert_close)(g_start, want_added, tol)
    assert_all_computed(gpu, "shade_vertices_fwd", "shade_vertices_bwd_sum", "vertex_normals_bwd")


# ---------------------------------------------------------------------------------------------
# Camera

@pytest.mark.parametrize("shared_points", [False, True])
def test_rigid_transform_backward_gpu_path_matches_the_cpu(gpu, rng, tol, shared_points):
    cp = gpu.cupy
    B, V = 3, 2500  # grid-stride loops over more vertices than one block's 256 threads, several blocks
    rotation = fastface.euler_rotation(rng.uniform(-1, 1, (B, 3)).astype(np.float32))
    translation = rng.normal(size=(B, 3)).astype(np.float32)
    points = rng.normal(size=(V, 3) if shared_points else (B, V, 3)).astype(np.float32)
    grad_out = rng.normal(size=(B, V, 3)).astype(np.float32)
    got = fastface.rigid_transform_backward(cp.asarray(points), cp.asarray(rotation), cp.asarray(translation),
                                            cp.asarray(grad_out))
    want = fastface.rigid_transform_backward(points, rotation, translation, grad_out)
    (assert_scatter_close if shared_points else assert_close)(got[0], want[0], tol)
    assert_scatter_close(got[1], want[1], tol)
    assert_scatter_close(got[2], want[2], tol)
    # add_to: grad_points added into the caller's array (accumulate = 1; atomics into it when shared).
    start = rng.normal(size=points.shape).astype(np.float32)
    g_start = cp.asarray(start)
    added = fastface.rigid_transform_backward(cp.asarray(points), cp.asarray(rotation), cp.asarray(translation),
                                              cp.asarray(grad_out), add_to=g_start)
    assert added[0] is g_start
    want_added = fastface.rigid_transform_backward(points, rotation, translation, grad_out, add_to=start.copy())
    (assert_scatter_close if shared_points else assert_close)(g_start, want_added[0], tol)
    assert_scatter_close(added[1], want[1], tol)
    assert_all_computed(gpu, "rigid_transform_bwd")


# ---------------------------------------------------------------------------------------------
# The morphable model

def _small_model(rng, V=60, n_shape=5, n_expression=3, n_albedo=4):
    mean = rng.uniform(-50, 50, (V, 3)).astype(np.float32)
    tri = np.array([(i, i + 1, i + 2) for i in range(V - 2)], np.int32)

    def basis(k):
        return rng.normal(size=(k, 3 * V)).astype(np.float32) if k else None

    def std(k):
        return rng.uniform(0.5, 3, k).astype(np.float32) if k else None

    return fastface.FaceModel(mean, tri, basis(n_shape), std(n_shape), basis(n_expression), std(n_expression),
                              rng.uniform(0.2, 0.8, (V, 3)).astype(np.float32), basis(n_albedo), std(n_albedo))


def _magnitude(model, coeffs, grads):
    """sum_k |term_k| of every output of evaluate (vertices, albedo) and evaluate_backward (the three)."""
    def forward(blocks, std, basis, mean):
        scaled = np.concatenate([np.abs(c) for c in blocks], 1) * std
        return np.abs(mean).reshape(1, -1) + scaled @ np.abs(basis)

    V = model.n_vertices
    shape, expression, albedo = coeffs
    B = next(c.shape[0] for c in coeffs if c is not None)
    shape = np.zeros((B, model.n_shape), np.float32) if shape is None else shape
    expression = np.zeros((B, model.n_expression), np.float32) if expression is None else expression
    albedo = np.zeros((B, model.n_albedo), np.float32) if albedo is None else albedo
    geometry = np.concatenate([model.shape_basis, model.expression_basis]).reshape(-1, 3 * V)
    albedo_basis = model.albedo_basis.reshape(-1, 3 * V)
    geometry_std = np.concatenate([model.shape_std, model.expression_std])
    vertices = forward([shape, expression], geometry_std, geometry, model.mean_shape).reshape(B, V, 3)
    colours = forward([albedo], model.albedo_std, albedo_basis, model.mean_albedo).reshape(B, V, 3)
    grad_v, grad_a = (np.abs(g.reshape(B, -1)) for g in grads)
    backward_geometry = (grad_v @ np.abs(geometry).T) * geometry_std
    backward_albedo = (grad_a @ np.abs(albedo_basis).T) * model.albedo_std
    return (vertices, colours, backward_geometry[:, :model.n_shape], backward_geometry[:, model.n_shape:],
            backward_albedo)


_CUBLAS_PATH = ("morphable_scale_coefficients", "morphable_split_gradient")


@pytest.mark.parametrize("B, sizes, large_batch_path, kernels", [
    (1, (5, 3, 4), "cublas", ("morphable_fwd_gemv", "morphable_bwd_gemv")),
    (3, (5, 0, 4), "cublas", ("morphable_fwd_gemv", "morphable_bwd_gemv")),   # no expressions (K = 0 block)
    (5, (520, 12, 4), "cublas", ("morphable_fwd", "morphable_bwd_gemv")),     # coefficients beyond gemv's shared memory
    (9, (5, 3, 4), "tiled", ("morphable_fwd", "morphable_bwd")),
    (70, (20, 7, 0), "tiled", ("morphable_fwd", "morphable_bwd")),           # two 64-row batch tiles; no albedo basis
    (9, (5, 3, 4), "cublas", _CUBLAS_PATH),
    (70, (20, 7, 0), "cublas", _CUBLAS_PATH),                                # no albedo basis: K = 0, no GEMM
    (64, (0, 7, 4), "cublas", _CUBLAS_PATH),                                 # no shape rows: the first block empty
])
def test_face_model_evaluate_gpu_path_matches_the_cpu(gpu, rng, tol, monkeypatch, B, sizes, large_batch_path, kernels):
    from fastface.model import morphable as morphable_module  # noqa: PLC0415
    monkeypatch.setattr(morphable_module, "_LARGE_BATCH_PATH", large_batch_path)
    cp = gpu.cupy
    model = _small_model(rng, 60, *sizes)
    gmodel = model.to("gpu")
    coeff_sets = [tuple(rng.normal(size=(B, k)).astype(np.float32) for k in sizes)]
    coeff_sets.append((None, coeff_sets[0][1], coeff_sets[0][2]))  # a None block: its rows skipped
    grads = (rng.normal(size=(B, 60, 3)).astype(np.float32), rng.normal(size=(B, 60, 3)).astype(np.float32))
    for coeffs in coeff_sets:
        if all(c is None or c.size == 0 for c in coeffs[:2]) and coeffs[2].size == 0:
            continue
        magnitude = _magnitude(model, coeffs, grads)
        got = gmodel.evaluate(*(None if c is None else cp.asarray(c) for c in coeffs))
        want = model.evaluate(*coeffs)
        for g, w, m in zip(got, want, magnitude[:2]):
            _gemm_close(g, w, m, tol)
    got = gmodel.evaluate_backward(cp.asarray(grads[0]), cp.asarray(grads[1]))
    want = model.evaluate_backward(*grads)
    for g, w, m in zip(got, want, magnitude[2:]):
        if w.size:
            _gemm_close(g, w, m, tol)
        else:
            assert g.shape == w.shape
    # grad_albedo None: the albedo coefficients' gradient is zeros, the others as before.
    got = gmodel.evaluate_backward(cp.asarray(grads[0]), None)
    for g, w, m in zip(got[:2], want[:2], magnitude[2:4]):
        if w.size:
            _gemm_close(g, w, m, tol)
    assert got[2].shape == want[2].shape and not got[2].get().any()
    assert_all_computed(gpu, *kernels)


def test_render_faces_gpu_path_matches_the_cpu(gpu, rng, tol):
    cp = gpu.cupy
    n = 12
    ys, xs = np.mgrid[0:n, 0:n]
    tri = []
    for i in range(n - 1):
        for j in range(n - 1):
            a = i * n + j
            tri += [(a, a + n + 1, a + 1), (a, a + n, a + n + 1)]
    V = n * n
    mean = np.stack([(xs.ravel() / (n - 1) - 0.5) * 100, (ys.ravel() / (n - 1) - 0.5) * 120,
                     20 * np.cos(xs.ravel() / (n - 1) * 2 - 1)], 1).astype(np.float32)
    model = fastface.FaceModel(mean, np.array(tri, np.int32), rng.normal(size=(4, 3 * V)).astype(np.float32),
                               np.ones(4, np.float32), rng.normal(size=(2, 3 * V)).astype(np.float32),
                               np.ones(2, np.float32), np.full((V, 3), 0.5, np.float32),
                               rng.normal(scale=0.05, size=(3, 3 * V)).astype(np.float32), np.ones(3, np.float32))
    B = 2
    params = fastface.FaceParameters(
        shape=rng.normal(size=(B, 4)).astype(np.float32), expression=rng.normal(size=(B, 2)).astype(np.float32),
        albedo=rng.normal(size=(B, 3)).astype(np.float32), sh=_lighting(rng, B),
        angles=rng.uniform(-0.2, 0.2, (B, 3)).astype(np.float32),
        translation=np.array([[0, 0, -600]] * B, np.float32))
    gparams = fastface.FaceParameters(*(cp.asarray(getattr(params, f)) for f in
                                        ("shape", "expression", "albedo", "sh", "angles", "translation")))
    want = fastface.render_faces(model, params, (24, 20), 70.0)
    got = fastface.render_faces(model.to("gpu"), gparams, (24, 20), 70.0)
    covered = want.mask.mean()
    assert 0.1 < covered < 0.95, covered
    mismatched = (got.raster.tri_id.get() != want.raster.tri_id).mean()
    assert mismatched <= tol["gpu_cpu_tri_id_mismatch"] * max(1, want.mask.sum()) / want.mask.size + 1e-12
    same = got.raster.tri_id.get() == want.raster.tri_id
    np.testing.assert_allclose(got.image.get()[same], want.image[same], rtol=tol["pipeline_gpu_cpu_rtol"],
                               atol=tol["pipeline_gpu_cpu_atol"])
    assert_all_computed(gpu, "morphable_fwd_gemv", "sh_shade_fwd", "rasterize_resolve")


# ---------------------------------------------------------------------------------------------
# Adam and the encoder

def test_adam_on_a_dict_gpu_path_matches_the_cpu(gpu, rng, tol):
    cp = gpu.cupy
    params = {"a": rng.normal(size=(30, 40)).astype(np.float32), "b": rng.normal(size=300).astype(np.float32)}
    gparams = {k: cp.asarray(v) for k, v in params.items()}
    cpu = Adam(params, lr=0.01, weight_decay=0.01, clip_norm=5.0)
    opt = Adam(gparams, lr=0.01, weight_decay=0.01, clip_norm=5.0)
    for _ in range(3):
        grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        cpu.step(grads)
        opt.step({k: cp.asarray(g) for k, g in grads.items()})
    for k in params:
        assert_close(gparams[k], params[k], tol)
    for got, want in zip(opt.m + opt.v, cpu.m + cpu.v):
        assert_close(got, want, tol)
    assert opt.state_arrays()[2].get()[0] == 3
    assert_all_computed(gpu, "adam_prepare", "adam_update")


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_photometric_loss_gpu_path_matches_the_cpu(gpu, rng, tol, mask_kind):
    # 3 images of 50 x 90 = 4500 pixels (5 chunks of 1024, the last partial), one with an empty mask.
    cp = gpu.cupy
    shape = (3, 50, 90)
    rendered = rng.uniform(size=shape + (3,)).astype(np.float32)
    target = rng.uniform(size=shape + (3,)).astype(np.float32)
    mask = rng.uniform(size=shape) < 0.6 if mask_kind == "bool" else rng.uniform(size=shape).astype(np.float32)
    mask[1] = 0
    grad_out = rng.normal(size=3).astype(np.float32)
    g = [cp.asarray(a) for a in (rendered, target, mask, grad_out)]
    loss = fastface.photometric_loss(strided(cp, rendered), *g[1:3])
    assert_close(loss, fastface.photometric_loss(rendered, target, mask), tol)
    grad = fastface.photometric_loss_backward(*g, out=cp.empty(shape + (3,), np.float32))  # a caller's buffer
    assert_close(grad, fastface.photometric_loss_backward(rendered, target, mask, grad_out), tol)
    assert loss.get()[1] == 0 and np.all(grad.get()[1] == 0)
    assert_all_computed(gpu, "photometric_loss_fwd", "photometric_loss_bwd")


def test_encoder_forward_backward_and_adam_gpu_path_match_the_cpu(gpu, rng, tol):
    cp = gpu.cupy
    settings = dict(resolution=16, widths=(8, 16), stem_width=8)
    cpu = fastface.nn.Encoder(3, **settings)
    enc = fastface.nn.Encoder(3, **settings).to("gpu")
    x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    grad_y = rng.normal(size=(2, 3)).astype(np.float32)

    def rel(got, want):
        return np.linalg.norm(got.get() - want) / np.linalg.norm(want)

    assert rel(enc.forward(cp.asarray(x)), cpu.forward(x)) < tol["nn_gpu_cpu_float32_rel"]
    enc.backward(cp.asarray(grad_y))
    cpu.backward(grad_y)
    assert rel(enc.flat_grads, cpu.flat_grads) < tol["nn_gpu_cpu_float32_rel"]
    opt_cpu, opt = Adam(cpu, lr=0.01, clip_norm=0.5), Adam(enc, lr=0.01, clip_norm=0.5)
    opt_cpu.step()
    opt.step()
    assert rel(enc.flat_params, cpu.flat_params) < tol["nn_gpu_cpu_float32_rel"]
    assert gpu.gemm_calls
    assert_all_computed(gpu, "adam_prepare", "adam_update")
