"""The corrective space and regularizers' GPU paths against their CPU path, for VALUES, without a GPU.

tests/fake_cupy.py in compute mode: the cupy branches of fastface/model/corrective.py run on fake cupy
arrays, every launch is checked against its signature in kernels/corrective.cu, and the kernels run on the
host (tests/emulated_kernels.py): the backward kernels and sum_partials one thread after another, the
forwards' first passes (a warp-shuffle tree and a barrier per chunk, listed in
tests/test_gpu_paths_emulated.py's THREADS_TOGETHER) with each block's threads together. The small model's
V = 5,046 and E = 14,862 span 3 and 8 chunks of FWD_CHUNK, so the two-pass sums are checked across chunks,
at batch 3 and 1. The decoders' GEMMs go through the fake cuBLAS.

Tolerances (tests/conftest.py): the per-image sums are made in double on both sides, in another order:
the GPU-vs-CPU ones; the per-vertex gathers are the same float32 arithmetic in the same order, up to the
host's libm (expf, sqrtf), the CPU twin's float64 scale factors and its float64 Laplacian scratch (the
GPU's is float32, the values its gather reads): the GPU-vs-CPU ones too, with `add_to=` as well.
"""
import numpy as np
import pytest

import fastface
from fastface.model import corrective as c
from tests import fake_cupy
from tests.fake_cupy import assert_all_computed, assert_close, install, strided
from tests.model.test_corrective import _grid_model

fake_cupy.import_all_fastface_modules()


@pytest.fixture
def gpu(monkeypatch):
    return install(monkeypatch, compute=True)


def _models():
    return [fastface.FaceModel.default(level="small"), _grid_model(9, symmetry="random")[0]]


def _backward_pairs(c, cp, gpu_mesh, mesh, guide):
    """(name, GPU backward, CPU backward): field, grad_out, **kwargs -> gradient."""
    return [
        ("smoothness", lambda x, g, **kw: c.smoothness_loss_backward(x, gpu_mesh, g, **kw),
         lambda x, g, **kw: c.smoothness_loss_backward(x, mesh, g, **kw)),
        ("magnitude", c.magnitude_loss_backward, c.magnitude_loss_backward),
        ("reflectance_constancy",
         lambda x, g, **kw: c.reflectance_constancy_loss_backward(x, cp.asarray(guide), gpu_mesh, g, **kw),
         lambda x, g, **kw: c.reflectance_constancy_loss_backward(x, guide, mesh, g, **kw)),
        ("symmetry", lambda x, g, **kw: c.symmetry_loss_backward(x, gpu_mesh, g, True, **kw),
         lambda x, g, **kw: c.symmetry_loss_backward(x, mesh, g, True, **kw)),
    ]


@pytest.mark.parametrize("which, B", [(0, 3), (0, 1), (1, 3)], ids=["small_model", "small_model_batch_1",
                                                                   "grid_random_symmetry"])
def test_regularizers_gpu_paths_match_the_cpu(gpu, rng, tol, which, B):
    cp = gpu.cupy
    model = _models()[which]
    mesh, gpu_mesh = c.corrective_mesh(model), c.corrective_mesh(model.to("gpu"))
    V = model.n_vertices
    offsets = rng.normal(size=(B, V, 3)).astype(np.float32)
    albedo = rng.uniform(-0.05, 1.0, size=(B, V, 3)).astype(np.float32)
    guides = [rng.uniform(0.0, 1.0, size=(B, V, 3)).astype(np.float32), np.asarray(model.mean_albedo)]
    grad_out = np.array([1.0, -0.5, 2.0][:B], np.float32)
    g_offsets, g_albedo, g_grad = strided(cp, offsets), cp.asarray(albedo), cp.asarray(grad_out)

    assert_close(c.smoothness_loss(g_offsets, gpu_mesh), c.smoothness_loss(offsets, mesh), tol)
    assert_close(c.smoothness_loss_backward(g_offsets, gpu_mesh, g_grad),
                 c.smoothness_loss_backward(offsets, mesh, grad_out), tol)
    assert_close(c.magnitude_loss(g_offsets), c.magnitude_loss(offsets), tol)
    assert_close(c.magnitude_loss_backward(g_offsets, g_grad), c.magnitude_loss_backward(offsets, grad_out), tol)
    assert_all_computed(gpu, "smoothness_fwd", "sum_partials", "smoothness_laplacian", "smoothness_bwd",
                        "magnitude_fwd", "magnitude_bwd")
    for guide in guides:
        for sharpness in (0.0, c.DEFAULT_SHARPNESS):
            assert_close(c.reflectance_constancy_loss(g_albedo, cp.asarray(guide), gpu_mesh, sharpness),
                         c.reflectance_constancy_loss(albedo, guide, mesh, sharpness), tol)
            assert_close(c.reflectance_constancy_loss_backward(g_albedo, cp.asarray(guide), gpu_mesh, g_grad,
                                                               sharpness),
                         c.reflectance_constancy_loss_backward(albedo, guide, mesh, grad_out, sharpness), tol)
    assert_all_computed(gpu, "reflectance_constancy_fwd", "reflectance_constancy_bwd")
    for mirror_x in (True, False):
        assert_close(c.symmetry_loss(g_offsets, gpu_mesh, mirror_x), c.symmetry_loss(offsets, mesh, mirror_x), tol)
        assert_close(c.symmetry_loss_backward(g_offsets, gpu_mesh, g_grad, mirror_x),
                     c.symmetry_loss_backward(offsets, mesh, grad_out, mirror_x), tol)
    assert_all_computed(gpu, "symmetry_fwd", "symmetry_bwd")


def test_backwards_add_into_add_to_on_the_gpu_path(gpu, rng, tol):
    """add_to= on the GPU path: every backward adds into the caller's buffer (accumulate = 1 in the kernels), so
    one buffer gathers the sum of all of them, as a training step does."""
    cp = gpu.cupy
    model = _grid_model(9, symmetry="random")[0]
    mesh, gpu_mesh = c.corrective_mesh(model), c.corrective_mesh(model.to("gpu"))
    B, V = 2, model.n_vertices
    x = rng.uniform(0, 1, size=(B, V, 3)).astype(np.float32)
    guide = rng.uniform(0, 1, size=(B, V, 3)).astype(np.float32)
    grad_out = np.array([1.5, -0.5], np.float32)
    before = rng.normal(size=(B, V, 3)).astype(np.float32)
    total_out = cp.asarray(before)
    total = before.copy()
    for name, on_gpu, on_cpu in _backward_pairs(c, cp, gpu_mesh, mesh, guide):
        out = cp.asarray(before)
        assert on_gpu(cp.asarray(x), cp.asarray(grad_out), add_to=out) is out, name
        want = before + on_cpu(x, grad_out)
        assert_close(out, want, tol)
        assert on_gpu(cp.asarray(x), cp.asarray(grad_out), add_to=total_out) is total_out
        total += on_cpu(x, grad_out)
    assert_close(total_out, total, tol)
    for name, on_gpu, _ in _backward_pairs(c, cp, gpu_mesh, mesh, guide):
        with pytest.raises(TypeError, match="add_to must be a cupy array like"):
            on_gpu(cp.asarray(x), cp.asarray(grad_out), add_to=before.copy())
        g_x = cp.asarray(x)
        with pytest.raises(ValueError, match="add_to must not share memory with"):
            on_gpu(g_x, cp.asarray(grad_out), add_to=g_x)
        with pytest.raises(ValueError, match="add_to must be C-contiguous"):
            on_gpu(g_x, cp.asarray(grad_out), add_to=strided(cp, before))


def test_forwards_are_the_same_bits_run_to_run(gpu, rng):
    cp = gpu.cupy
    model = fastface.FaceModel.default(level="small").to("gpu")
    gpu_mesh = c.corrective_mesh(model)
    x = cp.asarray(rng.uniform(0, 1, size=(2, model.n_vertices, 3)).astype(np.float32))
    for loss in (lambda: c.smoothness_loss(x, gpu_mesh), lambda: c.magnitude_loss(x),
                 lambda: c.symmetry_loss(x, gpu_mesh, True),
                 lambda: c.reflectance_constancy_loss(x, model.mean_albedo, gpu_mesh)):
        first = loss().get()
        assert np.all(np.isfinite(first)) and np.all(first > 0)  # every partial written (empty() is NaN garbage)
        fake_cupy.assert_equal(loss(), first)


def test_corrective_mesh_of_a_gpu_model_holds_the_cpu_meshs_arrays(gpu):
    model = fastface.FaceModel.default(level="small")
    mesh, gpu_mesh = c.corrective_mesh(model), c.corrective_mesh(model.to("gpu"))
    assert gpu_mesh.device == "gpu" and mesh.device == "cpu"
    for name in ("edges", "neighbour_offsets", "neighbours", "symmetry", "mirror_offsets", "mirrored_from"):
        fake_cupy.assert_equal(getattr(gpu_mesh, name), getattr(mesh, name))


def test_mixing_a_cpu_mesh_with_gpu_offsets_is_refused(gpu, rng):
    model = fastface.FaceModel.default(level="small")
    offsets = gpu.cupy.asarray(rng.normal(size=(1, model.n_vertices, 3)).astype(np.float32))
    with pytest.raises(TypeError, match="numpy array but offsets is a cupy array"):
        c.smoothness_loss(offsets, c.corrective_mesh(model))
    with pytest.raises(TypeError, match="float32 on the GPU"):
        c.magnitude_loss(offsets.astype(np.float64))


def test_the_block_size_matches_the_kernels():
    import re  # noqa: PLC0415

    from fastface._backend import read_kernel_source  # noqa: PLC0415

    source = read_kernel_source("corrective.cu")
    assert int(re.search(r"#define FWD_THREADS (\d+)", source).group(1)) == c.FWD_THREADS == 256
    assert int(re.search(r"#define FWD_CHUNK (\d+)", source).group(1)) == c.FWD_CHUNK == 2048
    # batch 64 of the default model (V = 34,737, E = 103,477) fills the GPU: hundreds of blocks each pass 1
    assert 64 * c._chunks(34737) == 1088 and 64 * c._chunks(103477) == 3264 and c._chunks(34737) == 17
