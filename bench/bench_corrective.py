"""The corrective space (decoder GEMMs) and the corrective regularizers, forward and backward (issue 8).

Workload: the default model (about 35,000 vertices), the default corrective sizes (64 + 64), float32;
batch 8 on the CPU (the CPU training batch scale), 64 on the GPU (the GPU training default). Each
regularizer is timed as forward + backward together, as a training step calls them.

    python -m pytest bench/bench_corrective.py --benchmark-only
"""
import functools

import numpy as np
import pytest

import fastface
from bench._gpu_timing import bench_gpu, median_seconds, needs_gpu
from fastface.model import CorrectiveSpace, FaceModel
from fastface.model import corrective as c

CPU_BATCH, GPU_BATCH = 8, 64
OPS = ["space_evaluate", "space_backward", "smoothness", "magnitude", "reflectance_constancy", "symmetry"]


@functools.lru_cache(maxsize=None)
def _model(device):
    model = FaceModel.default()
    return model if device == "cpu" else model.to("gpu")


def _call(op, device, xp, batch):
    model = _model(device)
    mesh = c.corrective_mesh(model)
    space = CorrectiveSpace(model.n_vertices).to(device)
    rng = np.random.default_rng(0)
    z_geo = xp.asarray(rng.normal(size=(batch, space.n_geometry)).astype(np.float32))
    z_ref = xp.asarray(rng.normal(size=(batch, space.n_reflectance)).astype(np.float32))
    field = xp.asarray(rng.normal(size=(batch, model.n_vertices, 3)).astype(np.float32))
    guide = xp.asarray(rng.uniform(size=(batch, model.n_vertices, 3)).astype(np.float32))
    g = xp.ones(batch, dtype=np.float32)
    return {
        "space_evaluate": lambda: space.evaluate(z_geo, z_ref),
        "space_backward": lambda: space.backward(z_geo, z_ref, field, field),
        "smoothness": lambda: (c.smoothness_loss(field, mesh), c.smoothness_loss_backward(field, mesh, g)),
        "magnitude": lambda: (c.magnitude_loss(field), c.magnitude_loss_backward(field, g)),
        "reflectance_constancy": lambda: (c.reflectance_constancy_loss(guide, guide, mesh),
                                          c.reflectance_constancy_loss_backward(guide, guide, mesh, g)),
        "symmetry": lambda: (c.symmetry_loss(field, mesh, True), c.symmetry_loss_backward(field, mesh, g, True)),
    }[op]


@pytest.mark.parametrize("op", OPS)
def test_cpu_corrective(benchmark, op):
    fn = _call(op, "cpu", np, CPU_BATCH)
    benchmark.group = f"corrective {op} (CPU, batch {CPU_BATCH})"
    with fastface.value_checks(False):
        benchmark(fn)
    if median_seconds(benchmark) is not None:
        benchmark.extra_info["images_per_s"] = round(CPU_BATCH / median_seconds(benchmark), 1)


@needs_gpu
@pytest.mark.parametrize("op", OPS)
def test_gpu_corrective(benchmark, op):
    import cupy  # noqa: PLC0415

    fn = _call(op, "gpu", cupy, GPU_BATCH)
    bench_gpu(benchmark, fn, f"corrective {op} (GPU, batch {GPU_BATCH})")
    if median_seconds(benchmark) is not None:
        benchmark.extra_info["images_per_s"] = round(GPU_BATCH / median_seconds(benchmark), 1)
