"""The full multi-level training step, and inference (images -> parameters -> final vertices).

One training step (fastface/training_step.py): encoder forward and backward, the base and the final
level rendered, every loss and regularizer with its backward, both Adam updates, and the report the
loop reads. The batch is made once, outside the timing (the synthetic data's cost is its own row).
On the GPU the step is timed as the training loop runs it, replayed from one CUDA graph, and eagerly
for comparison; inference likewise. Issue #8's targets on the H200: <= 4 ms per step at the
GPU defaults (default model, 224x224, batch 64); inference >= 100,000 images/s at batch 256 and
<= 0.2 ms for one image (Tewari et al. 2018: 4 ms).

    python -m pytest bench/bench_train.py            # CPU rows here, GPU rows where there is one
"""
import numpy as np
import pytest

import fastface
from bench._gpu_timing import needs_gpu, record_throughput
from fastface.train import build, default_settings


def _final_vertices(autoencoder, images):
    """images -> code -> parameters -> final vertices (B, V, 3), without rendering."""
    with fastface.value_checks(False):
        code = autoencoder.encoder.forward(images)
        params, z_geo, z_ref = autoencoder.decode(code)
        vertices, _ = autoencoder.model.evaluate(params.shape, params.expression, None)
        offsets, _ = autoencoder.correctives.evaluate(z_geo, z_ref)
        return vertices + offsets


def _setup(device, graph=None):
    from fastface.data.synthetic import TRAIN_SEEDS, SyntheticFaces
    from fastface.training_step import TrainingStep
    settings = default_settings(device)
    autoencoder, objective, optimizers = build(settings)
    faces = SyntheticFaces(autoencoder.model, resolution=autoencoder.resolution)
    batch = faces.batch([TRAIN_SEEDS[i] for i in range(settings.batch)])
    training_step = TrainingStep(autoencoder, objective, optimizers, final=True, graph=graph)

    def step():  # queued without reading the report back (the loop reads it: one small transfer)
        with fastface.value_checks(False):
            return training_step.launch(batch.images, batch.landmarks)

    return settings, autoencoder, faces, batch, step


def test_cpu_training_step(benchmark):
    settings, _, _, _, step = _setup("cpu")
    benchmark.group = f"multi-level training step, small model, B={settings.batch} {settings.resolution}px (CPU)"
    step()  # compile outside the timing
    benchmark.pedantic(step, rounds=10, warmup_rounds=1)
    record_throughput(benchmark, settings.batch)


def test_cpu_synthetic_batch(benchmark):
    from fastface.data.synthetic import TRAIN_SEEDS
    settings, _, faces, _, _ = _setup("cpu")
    seeds = [TRAIN_SEEDS[i] for i in range(settings.batch)]
    benchmark.group = f"synthetic faces, small model, B={settings.batch} {settings.resolution}px (CPU)"
    faces.batch(seeds)
    benchmark(faces.batch, seeds)
    record_throughput(benchmark, settings.batch)


def test_cpu_adam_step_encoder(benchmark):
    settings, autoencoder, _, _, _ = _setup("cpu")
    optimizer = fastface.nn.Adam(autoencoder.encoder)
    autoencoder.encoder.flat_grads[...] = 1e-3
    benchmark.group = f"Adam step, encoder of {autoencoder.encoder.n_parameters:,} parameters (CPU)"
    optimizer.step()
    benchmark(optimizer.step)


@pytest.mark.parametrize("batch", [1, 8])
def test_cpu_inference(benchmark, batch):
    settings, autoencoder, faces, data, _ = _setup("cpu")
    images = np.ascontiguousarray(np.resize(data.images, (batch,) + data.images.shape[1:]))

    benchmark.group = f"inference images -> final vertices, small model, B={batch} (CPU)"
    _final_vertices(autoencoder, images)
    benchmark(_final_vertices, autoencoder, images)
    record_throughput(benchmark, batch)


@needs_gpu
@pytest.mark.parametrize("graph", [True, False], ids=["graph", "eager"])
def test_gpu_training_step(benchmark, graph):
    import cupy
    settings, _, _, _, step = _setup("gpu", graph=graph)
    benchmark.group = f"multi-level training step, default model, B={settings.batch} {settings.resolution}px (GPU)"

    def synced():
        step()
        cupy.cuda.Device().synchronize()

    synced()
    synced()  # the second call records the graph
    benchmark.pedantic(synced, rounds=30, warmup_rounds=3)
    record_throughput(benchmark, settings.batch)


@needs_gpu
@pytest.mark.parametrize("graph", [True, False], ids=["graph", "eager"])
@pytest.mark.parametrize("batch", [1, 256])
def test_gpu_inference(benchmark, batch, graph):
    import cupy

    from fastface.cuda_graph import capture
    settings, autoencoder, _, data, _ = _setup("gpu")
    images = cupy.ascontiguousarray(cupy.resize(data.images, (batch,) + data.images.shape[1:]))
    run = lambda: _final_vertices(autoencoder, images)  # noqa: E731
    run()  # warm-up: compiles, makes the encoder's workspace for this batch
    if graph:
        run = capture(run, "inference").launch

    def infer():
        out = run()
        cupy.cuda.Device().synchronize()
        return out

    benchmark.group = f"inference images -> final vertices, default model, B={batch} (GPU)"
    infer()
    benchmark(infer)
    record_throughput(benchmark, batch)
