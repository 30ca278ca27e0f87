"""The corrective space and regularizers' GPU paths against their CPU path, for VALUES, without a GPU.

tests/fake_cupy.py in compute mode: the cupy branches of fastface/model/corrective.py run on fake cupy
arrays, every launch is checked against its signature in kernels/corrective.cu, and the kernels run on the
host (tests/emulated_kernels.py): the backward kernels one thread after another, the forward kernels (a
shared-memory tree per image, listed in tests/test_gpu_paths_emulated.py's THREADS_TOGETHER) with each
block's threads together. The decoders' GEMMs go through the fake cuBLAS.

Tolerances (tests/conftest.py): the per-image sums are made in double on both sides, in another order:
the GPU-vs-CPU ones; the per-vertex gathers are the same float32 arithmetic in the same order, up to the
host's libm (expf, sqrtf) and the CPU twin's float64 scale factors: the GPU-vs-CPU ones too.
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


@pytest.mark.parametrize("which", [0, 1], ids=["small_model", "grid_random_symmetry"])
def test_regularizers_gpu_paths_match_the_cpu(gpu, rng, tol, which):
    cp = gpu.cupy
    model = _models()[which]
    mesh, gpu_mesh = c.corrective_mesh(model), c.corrective_mesh(model.to("gpu"))
    B, V = 3, model.n_vertices
    offsets = rng.normal(size=(B, V, 3)).astype(np.float32)
    albedo = rng.uniform(-0.05, 1.0, size=(B, V, 3)).astype(np.float32)
    guides = [rng.uniform(0.0, 1.0, size=(B, V, 3)).astype(np.float32), np.asarray(model.mean_albedo)]
    grad_out = np.array([1.0, -0.5, 2.0], np.float32)
    g_offsets, g_albedo, g_grad = strided(cp, offsets), cp.asarray(albedo), cp.asarray(grad_out)

    assert_close(c.smoothness_loss(g_offsets, gpu_mesh), c.smoothness_loss(offsets, mesh), tol)
    assert_close(c.smoothness_loss_backward(g_offsets, gpu_mesh, g_grad),
                 c.smoothness_loss_backward(offsets, mesh, grad_out), tol)
    assert_close(c.magnitude_loss(g_offsets), c.magnitude_loss(offsets), tol)
    assert_close(c.magnitude_loss_backward(g_offsets, g_grad), c.magnitude_loss_backward(offsets, grad_out), tol)
    assert_all_computed(gpu, "smoothness_fwd", "smoothness_bwd", "magnitude_fwd", "magnitude_bwd")
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

    m = re.search(r"#define FWD_THREADS (\d+)", read_kernel_source("corrective.cu"))
    assert int(m.group(1)) == c.FWD_THREADS
