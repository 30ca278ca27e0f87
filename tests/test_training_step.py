"""fastface/training_step.py: the step recorded in a CUDA graph equals the eager step.

Checked on the CPU with the fake cupy in compute mode (tests/fake_cupy.py), whose graphs behave as a
GPU's: the capture runs nothing, and each replay runs every recorded operation again on the same
memory with the arguments as recorded. A step that read a Python value that changes between steps,
wrote its result somewhere else than the buffers it returned, or read its batch from another array
than the input buffers would make the replayed run differ from the eager one. On a real GPU the
same comparison is `test_gpu_graph_step_equals_eager_step`.
"""
import numpy as np
import pytest

import fastface
from fastface.train import TrainSettings, build
from fastface.training_step import TrainingStep
from tests.fake_cupy import LaunchError, install

SETTINGS = dict(device="gpu", level="small", resolution=16, batch=2, n_geometry=3, n_reflectance=2, widths=(4, 8))


def _batches(xp, n, seed=0, batch=2):
    rng = np.random.default_rng(seed)
    return [(xp.asarray(rng.uniform(0, 1, (batch, 16, 16, 3)).astype(np.float32)),
             xp.asarray(rng.uniform(2, 14, (batch, 68, 2)).astype(np.float32))) for _ in range(n)]


def _run(steps, final, graph, batches, lrs, settings=SETTINGS):
    """The reports and the final weights of len(batches) steps of a fresh model (same seed every time)."""
    autoencoder, objective, optimizers = build(TrainSettings(**settings))
    step = TrainingStep(autoencoder, objective, optimizers, final=final, graph=graph)
    reports = []
    for (images, landmarks), lr in zip(batches, lrs):
        optimizers["encoder"].lr = lr
        optimizers["correctives"].lr = 10 * lr
        reports.append(step(images, landmarks))
    weights = [autoencoder.encoder.flat_params.get(), autoencoder.correctives.flat_params.get()]
    return step, reports, weights


@pytest.mark.parametrize("final", [False, True])
def test_the_graph_step_replays_the_eager_step_exactly(monkeypatch, final):
    install(monkeypatch, compute=True)
    cp = __import__("cupy")
    batches = _batches(cp, 4)
    lrs = [1e-3, 1e-3, 5e-4, 1e-4]  # a schedule: lr lives on the device, the graph must see each change
    eager_step, eager, eager_weights = _run(4, final, False, batches, lrs)
    graph_step, replayed, graph_weights = _run(4, final, True, batches, lrs)
    assert not eager_step.captured and graph_step.captured
    assert graph_step._graph.launches == 3  # the first step ran eagerly (warm-up), the other three replayed
    for a, b in zip(eager, replayed):
        assert a.means == b.means and a.skipped == b.skipped is False
    for a, b in zip(eager_weights, graph_weights):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(eager_weights[0], build(TrainSettings(**SETTINGS))[0].encoder.flat_params.get())


def test_a_non_finite_loss_or_gradient_is_skipped_inside_the_graph(monkeypatch):
    """A NaN landmark makes the loss NaN (the gate stops the step); a NaN pixel outside the face leaves the
    loss finite but the encoder's gradient NaN (Adam's own norm check stops it). Neither changes a weight."""
    install(monkeypatch, compute=True)
    cp = __import__("cupy")
    batches = _batches(cp, 3)
    autoencoder, objective, optimizers = build(TrainSettings(**SETTINGS))
    step = TrainingStep(autoencoder, objective, optimizers, final=True)
    step(*batches[0])
    step(*batches[1])
    assert step.captured
    weights = lambda: [autoencoder.encoder.flat_params.get(), autoencoder.correctives.flat_params.get()]  # noqa: E731
    images, landmarks = batches[2][0].copy(), batches[2][1].copy()
    images[0, 0, 0, 0] = np.nan
    landmarks[1, 30, 0] = np.nan
    for bad_images, bad_landmarks, loss_finite in ((batches[2][0], landmarks, False), (images, batches[2][1], True)):
        before = weights()
        report = step(bad_images, bad_landmarks)
        assert report.skipped and bool(np.isfinite(report.loss)) == loss_finite
        for a, b in zip(before, weights()):
            np.testing.assert_array_equal(a, b)
    assert not step(*batches[2]).skipped  # the next finite batch steps again


@pytest.mark.parametrize("batch", [2, 9])  # 9: above 8, the face model's GEMMs go through cuBLAS
def test_the_captured_step_reads_nothing_back_and_is_recorded_once(monkeypatch, batch):
    """Check-only mode: the capture of both stages succeeds (no host read, no host-to-device copy, no
    synchronisation inside), and later steps are one graph launch plus the batch copies and one read."""
    gpu = install(monkeypatch)
    cp = gpu.cupy
    batches = _batches(cp, 3, batch=batch)
    autoencoder, objective, optimizers = build(TrainSettings(**{**SETTINGS, "batch": batch}))
    for final in (False, True):
        step = TrainingStep(autoencoder, objective, optimizers, final=final)
        step(*batches[0])
        step(*batches[1])
        gpu.device_work.clear()
        step(*batches[2])
        assert step.captured
        assert gpu.device_work == ["copy", "copy", "graph launch", "device-to-host copy"], gpu.device_work


def test_a_host_read_inside_a_capture_is_refused_and_ends_the_capture(monkeypatch):
    from fastface.cuda_graph import capture
    gpu = install(monkeypatch)
    x = gpu.cupy.zeros(3, np.float32)
    with pytest.raises(LaunchError, match="device-to-host copy"):
        capture(lambda: x.get(), "a read")
    graph = capture(lambda: gpu.cupy.multiply(x, 2, out=x))  # the stream was not left capturing
    assert graph.launches == 0


def test_a_capture_runs_nothing_and_each_launch_runs_it_again(monkeypatch):
    from fastface.cuda_graph import capture
    gpu = install(monkeypatch, compute=True)
    cp = gpu.cupy
    x = cp.zeros(3, np.float32)
    step = cp.ones(3, np.float32)
    graph = capture(lambda: x.__iadd__(step))  # x += step
    np.testing.assert_array_equal(x.get(), 0)
    graph.launch()
    graph.launch()
    np.testing.assert_array_equal(x.get(), 2)
    step[...] = 5  # a replay reads the memory as it is then
    graph.launch()
    np.testing.assert_array_equal(x.get(), 7)


def test_the_reconstructor_graph_replays_the_eager_inference(monkeypatch, tmp_path):
    from fastface.checkpoint import save_checkpoint
    settings = TrainSettings(**{**SETTINGS, "device": "cpu"})
    autoencoder, _, optimizers = build(settings)
    rng = np.random.default_rng(3)
    autoencoder.encoder.flat_params[...] += rng.normal(0, 1e-3, autoencoder.encoder.flat_params.shape).astype(np.float32)
    autoencoder.correctives.flat_params[...] = rng.normal(0, 1e-2, autoencoder.correctives.flat_params.shape)
    path = tmp_path / "checkpoint.h5"
    save_checkpoint(path, 0, settings.to_dict(), autoencoder.encoder, autoencoder.correctives, optimizers)
    gpu = install(monkeypatch, compute=True)
    rec = fastface.Reconstructor(path, device="gpu")
    graph = rec.capture(1)
    for seed in (0, 1):
        image = gpu.cupy.asarray(np.random.default_rng(seed).uniform(0, 1, (1, 16, 16, 3)).astype(np.float32))
        want = rec(image)
        got = graph(image)
        for name in ("vertices_base", "vertices_final", "albedo_final", "landmarks", "z_geo"):
            np.testing.assert_array_equal(getattr(got, name).get(), getattr(want, name).get(), err_msg=name)
    assert graph._graph.launches == 2
    with pytest.raises(ValueError, match="images"):
        graph(gpu.cupy.zeros((2, 16, 16, 3), np.float32))


def _synthetic_batches(xp, n, resolution):
    from fastface.data.synthetic import TRAIN_SEEDS, SyntheticFaces
    faces = SyntheticFaces(fastface.FaceModel.default(level="small"), resolution=(resolution, resolution))
    out = []
    for i in range(n):
        data = faces.batch([TRAIN_SEEDS[4 * i + k] for k in range(4)])
        out.append((xp.asarray(data.images), xp.asarray(data.landmarks)))
    return out


@pytest.mark.parametrize("final", [False, True])
def test_gpu_graph_step_equals_eager_step(cupy, final):
    """On a GPU: four steps replayed from a CUDA graph against four eager steps of a twin model (same
    batches, same lr schedule). The rasterizer's backward sums with atomics, in an order that varies
    from run to run, so the two agree to rounding, not bit for bit."""
    settings = {**SETTINGS, "resolution": 32, "batch": 4}
    batches = _synthetic_batches(cupy, 4, 32)
    lrs = [1e-3, 1e-3, 5e-4, 1e-4]
    eager_step, eager, eager_weights = _run(4, final, False, batches, lrs, settings)
    graph_step, replayed, graph_weights = _run(4, final, True, batches, lrs, settings)
    assert graph_step.captured and graph_step._graph.launches == 3
    for a, b in zip(eager, replayed):
        assert a.skipped == b.skipped is False
        for k in a.means:
            np.testing.assert_allclose(b.means[k], a.means[k], rtol=1e-3, atol=1e-9, err_msg=k)
    initial, _, _ = build(TrainSettings(**settings))
    for a, b, w0, trained in zip(eager_weights, graph_weights,
                                 (initial.encoder.flat_params.get(), initial.correctives.flat_params.get()),
                                 (True, final)):
        if not trained:  # the base stage leaves the corrective space alone
            np.testing.assert_array_equal(a, w0)
            np.testing.assert_array_equal(b, w0)
            continue
        # Adam moves a weight whose gradient is rounding noise by up to lr a step either way: compare the
        # whole update, not each weight.
        assert np.linalg.norm(b - a) < 0.05 * np.linalg.norm(a - w0)


def test_a_graph_keeps_the_encoder_workspace_it_recorded(monkeypatch):
    """The encoder frees its workspace when another batch size comes; the one a graph recorded must stay (the
    replays write into it), or its memory could go to another array (a preview's, at batch 4)."""
    gpu = install(monkeypatch)
    batches = _batches(gpu.cupy, 2)
    autoencoder, objective, optimizers = build(TrainSettings(**SETTINGS))
    step = TrainingStep(autoencoder, objective, optimizers, final=True)
    step(*batches[0])
    step(*batches[1])
    recorded = dict(autoencoder.encoder._workspaces)
    assert step.captured and len(recorded) == 1
    autoencoder.forward(batches[0][0][:1], final=True)  # another batch size, as a preview
    for key, workspace in recorded.items():
        assert autoencoder.encoder._workspaces.get(key) is workspace
    assert len(autoencoder.encoder._workspaces) == 2
