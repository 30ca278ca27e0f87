"""The training step, synthetic data and inference take their GPU paths, checked on the CPU with the fake cupy.

Every kernel launch of a whole multi-level step (encoder, both levels rendered, every loss and
regularizer, their backwards, both Adam updates) is checked against its CUDA signature
(tests/fake_cupy.py), and nothing is read back to the host inside the step. The values are compared
on a real GPU by the `gpu` tests of each op and by tests/test_train.py::test_gpu_step_equals_cpu_step.
"""
import numpy as np
import pytest

import fastface
from fastface._backend import is_cupy_array
from fastface.train import TrainSettings, build
from tests.fake_cupy import install

SETTINGS = dict(device="gpu", level="small", resolution=16, batch=2, n_geometry=3, n_reflectance=2, widths=(4, 8))


def test_a_training_step_launches_valid_kernels_and_reads_nothing_back(monkeypatch):
    gpu = install(monkeypatch)
    cp = gpu.cupy
    autoencoder, objective, optimizers = build(TrainSettings(**SETTINGS))
    rng = np.random.default_rng(0)
    images = cp.asarray(rng.uniform(0, 1, (2, 16, 16, 3)).astype(np.float32))
    landmarks = cp.asarray(rng.uniform(2, 14, (2, 68, 2)).astype(np.float32))

    def step():
        out = autoencoder.forward(images, final=True)
        terms, grads = objective(out, images, landmarks, final=True)
        autoencoder.backward(out, grads)
        for opt in optimizers.values():
            opt.step()
        return out, terms

    with fastface.value_checks(False):
        step()  # the first step builds per-model caches (adjacency, landmark bookkeeping) on the host
        gpu.device_work.clear()
        out, terms = step()
    assert "device-to-host copy" not in gpu.device_work
    for a in (out.base.image, out.final.image, autoencoder.encoder.flat_grads, autoencoder.correctives.flat_grads,
              *terms.values()):
        assert is_cupy_array(a)
    assert set(terms) == set(fastface.objective.TERM_NAMES)


def test_synthetic_faces_and_inference_run_on_the_gpu_model(monkeypatch, tmp_path):
    from fastface.checkpoint import save_checkpoint
    from fastface.data.synthetic import TRAIN_SEEDS, SyntheticFaces
    settings = TrainSettings(**{**SETTINGS, "device": "cpu"})
    autoencoder, _, optimizers = build(settings)
    path = tmp_path / "checkpoint.h5"
    save_checkpoint(path, 0, settings.to_dict(), autoencoder.encoder, autoencoder.correctives, optimizers)
    gpu = install(monkeypatch)
    rec = fastface.Reconstructor(path, device="gpu")
    batch = SyntheticFaces(rec.model, resolution=rec.resolution).batch([TRAIN_SEEDS[0], TRAIN_SEEDS[1]])
    assert is_cupy_array(batch.images) and is_cupy_array(batch.landmarks)
    out = rec(gpu.cupy.asarray(np.full((2, 16, 16, 3), 0.5, np.float32)))
    assert is_cupy_array(out.vertices_final) and out.vertices_final.shape == (2, rec.model.n_vertices, 3)
    with pytest.raises(TypeError, match="images"):
        rec(np.zeros((2, 16, 16, 3), np.float32))


def test_the_training_loop_runs_on_the_gpu_path(monkeypatch, tmp_path):
    """train() with device="gpu": data, step, the one read-back of the terms, Adam's finiteness, checkpoints."""
    install(monkeypatch)
    from fastface.checkpoint import load_checkpoint
    from fastface.train import train
    settings = TrainSettings(**{**SETTINGS, "steps": 2, "checkpoint_every": 2, "preview_every": 2, "base_fraction": 0.5})
    path = train(settings, tmp_path, progress=False)
    assert load_checkpoint(path).step == 2
    assert (tmp_path / "preview_000002.png").exists()
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 3


def test_the_training_loop_replays_each_stage_from_a_cuda_graph(monkeypatch, tmp_path):
    """Three steps per stage: the first eager, then recorded and replayed (a preview at another batch size in
    between); the loop reads one report per step and nothing else."""
    gpu = install(monkeypatch)
    from fastface.checkpoint import load_checkpoint
    from fastface.train import train
    settings = TrainSettings(**{**SETTINGS, "steps": 6, "checkpoint_every": 3, "preview_every": 2, "base_fraction": 0.5})
    path = train(settings, tmp_path, progress=False)
    assert load_checkpoint(path).step == 6
    assert gpu.device_work.count("graph launch") == 4  # steps 2, 3 (base) and 5, 6 (both levels)
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 7


@pytest.mark.parametrize("precision, expected", [(None, "tf32"), ("tf32", "tf32"), ("float16", "tf32"),
                                                 ("float32", "float32")])
def test_the_face_model_and_correctives_gemms_follow_the_runs_precision(monkeypatch, precision, expected):
    """A GPU run's face model and corrective space do their cuBLAS GEMMs in TF32 unless it asks for float32."""
    import sys  # noqa: PLC0415
    gpu = install(monkeypatch)
    cp = gpu.cupy
    computes = []
    for name in ("fastface.model.morphable", "fastface.model.corrective"):
        module = sys.modules[name]

        def spy(*args, _real=module.gemm, _name=name, **kwargs):
            computes.append((_name, kwargs.get("compute", "float32")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, "gemm", spy)
    autoencoder, _, _ = build(TrainSettings(**{**SETTINGS, "precision": precision}))
    model, correctives = autoencoder.model, autoencoder.correctives
    assert model.precision == expected and correctives.precision == expected
    B, rng = 9, np.random.default_rng(0)  # above batch 8: the face model's GEMMs go to cuBLAS

    def normal(*shape):
        return cp.asarray(rng.normal(size=shape).astype(np.float32))

    with fastface.value_checks(False):
        model.evaluate(normal(B, model.n_shape), normal(B, model.n_expression), normal(B, model.n_albedo))
        model.evaluate_backward(normal(B, model.n_vertices, 3), normal(B, model.n_vertices, 3))
        z_geo, z_ref = normal(B, correctives.n_geometry), normal(B, correctives.n_reflectance)
        correctives.evaluate(z_geo, z_ref)
        correctives.backward(z_geo, z_ref, normal(B, model.n_vertices, 3), normal(B, model.n_vertices, 3))
    assert {name for name, _ in computes} == {"fastface.model.morphable", "fastface.model.corrective"}
    assert {compute for _, compute in computes} == {expected}
    with pytest.raises(ValueError, match="precision must be one of"):
        model.to("gpu", precision="float16")
    with pytest.raises(ValueError, match="precision must be one of"):
        correctives.to("gpu", precision="fp8")
    assert model.to("cpu").precision == expected  # kept by a copy unless given
    # The synthetic data is rendered in float32 whatever the run's precision, from the same arrays.
    from fastface.train import _Data  # noqa: PLC0415
    data = _Data(TrainSettings(**{**SETTINGS, "precision": precision}), model, 30.0, (0.0, 0.0, -600.0))
    assert data.faces.model.precision == "float32" and data.faces.model.mean_shape is model.mean_shape
