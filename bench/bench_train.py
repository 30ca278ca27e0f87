"""The full multi-level training step, and inference (images -> parameters -> final vertices).

One training step: encoder forward and backward, the base and the final level rendered, every loss
and regularizer with its backward, both Adam updates. The batch is made once, outside the timing
(the synthetic data's cost is its own row). Issue #8's targets on the H200: <= 4 ms per step at the
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


def _setup(device):
    from fastface.data.synthetic import TRAIN_SEEDS, SyntheticFaces
    settings = default_settings(device)
    autoencoder, objective, optimizers = build(settings)
    faces = SyntheticFaces(autoencoder.model, resolution=autoencoder.resolution)
    batch = faces.batch([TRAIN_SEEDS[i] for i in range(settings.batch)])

    def step():
        with fastface.value_checks(False):
            out = autoencoder.forward(batch.images, final=True)
            _, grads = objective(out, batch.images, batch.landmarks, final=True)
            autoencoder.backward(out, grads)
            optimizers["encoder"].step()
            optimizers["correctives"].step()

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
def test_gpu_training_step(benchmark):
    import cupy
    settings, _, _, _, step = _setup("gpu")
    benchmark.group = f"multi-level training step, default model, B={settings.batch} {settings.resolution}px (GPU)"

    def synced():
        step()
        cupy.cuda.Device().synchronize()

    synced()
    benchmark.pedantic(synced, rounds=20, warmup_rounds=2)
    record_throughput(benchmark, settings.batch)


@needs_gpu
@pytest.mark.parametrize("batch", [1, 256])
def test_gpu_inference(benchmark, batch):
    import cupy
    settings, autoencoder, _, data, _ = _setup("gpu")
    images = cupy.ascontiguousarray(cupy.resize(data.images, (batch,) + data.images.shape[1:]))

    def infer():
        out = _final_vertices(autoencoder, images)
        cupy.cuda.Device().synchronize()
        return out

    benchmark.group = f"inference images -> final vertices, default model, B={batch} (GPU)"
    infer()
    benchmark(infer)
    record_throughput(benchmark, batch)
