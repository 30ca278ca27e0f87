"""Per-image fitting (fastface.fit) and the reconstruct command's work per photo.

Workloads:
- CPU, one photo at the defaults: the "small" default model (5,046 vertices), 128x128 crop,
  150 landmark steps + 60 photometric steps, BLAS and Numba on one thread (as `reconstruct` runs it). The
  issue's bound: at most 2 s of CPU per photo on the 2-core machine.
- CPU, the whole `reconstruct` of one 320x320 photo with landmarks (read, crop, fit, mesh files,
  overlay, JSON), the same defaults.
- GPU, batched: 64 photos at 224x224 with the full default model (34,737 vertices), the same
  steps; the issue asks for at least 20x the CPU's photos per second.

    python -m pytest bench/bench_fit.py            # CPU rows here, the GPU row where there is one
"""
import time

import numpy as np
import pytest

from bench._gpu_timing import needs_gpu
from fastface.fit import default_focal, default_model, fit
from fastface.model import FaceModel
from fastface.render import FaceParameters, render_faces


def _photos(model, batch, size, seed=0, xp=np):
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    sh = np.zeros((batch, 9, 3))
    sh[:, 0] = 0.9 / (np.pi * 0.282095)
    params = FaceParameters(
        shape=f32(rng.standard_normal((batch, model.n_shape)) * 0.6),
        expression=f32(rng.standard_normal((batch, model.n_expression)) * 0.3),
        albedo=f32(rng.standard_normal((batch, model.n_albedo)) * 0.6), sh=f32(sh),
        angles=f32(rng.uniform(-0.25, 0.25, (batch, 3))),
        translation=f32(np.tile([0.0, 0.0, -650.0], (batch, 1))))
    host_model = model if model.device == "cpu" else model.to("cpu")
    rendering = render_faces(host_model, params, (size, size), default_focal((size, size)))
    images = np.where(rendering.mask[..., None], rendering.image, np.float32(0.3)).astype(np.float32)
    return xp.asarray(images), xp.asarray(rendering.landmarks)


def _record(benchmark, batch, **extra):
    benchmark.extra_info.update(extra)
    if benchmark.stats is not None:
        median = benchmark.stats["median"]
        benchmark.extra_info["s_per_photo"] = round(median / batch, 4)
        benchmark.extra_info["images_per_s"] = round(batch / median, 2)


def test_cpu_fit_one_photo_at_the_defaults(benchmark):
    from fastface.reconstruct import _one_thread
    model = default_model("cpu")
    images, landmarks = _photos(model, 1, 128)
    benchmark.group = "fit, one photo, small model, 128x128, 150 + 60 steps (CPU)"
    cpu = []

    def once():
        start = time.process_time()
        result = fit(images, landmarks, model=model)
        cpu.append(time.process_time() - start)  # CPU time of every thread: what the issue bounds
        return result

    with _one_thread():
        fit(images, landmarks, model=model, iterations=2, landmark_iterations=2)  # compile outside the timing
        result = benchmark.pedantic(once, rounds=5, iterations=1)
    _record(benchmark, 1, cpu_seconds_per_photo=round(float(np.median(cpu)), 3),
            landmark_px=round(float(np.linalg.norm(result.landmarks - landmarks, axis=-1).mean()), 3))


def test_cpu_reconstruct_one_photo(benchmark, tmp_path):
    import cv2

    from fastface.io import write_pts
    from fastface.reconstruct import Settings, reconstruct_photo
    model = default_model("cpu")
    images, landmarks = _photos(model, 1, 320, seed=1)
    cv2.imwrite(str(tmp_path / "face.png"), (images[0][..., ::-1] * 255 + 0.5).astype(np.uint8))
    write_pts(tmp_path / "face.pts", landmarks[0])
    out = tmp_path / "out"
    out.mkdir()
    settings = Settings(out=str(out))
    times = []

    def once():
        for p in out.iterdir():
            p.unlink()
        result = reconstruct_photo(tmp_path / "face.png", tmp_path / "face.pts", settings)
        assert result["status"] == "done", result
        times.append(result["seconds"])

    once()  # the model and the kernels load outside the timing
    benchmark.group = "reconstruct, one 320x320 photo with landmarks, all five outputs (CPU)"
    benchmark.pedantic(once, rounds=5, iterations=1)
    cpu_seconds = float(np.median(times[1:]))
    _record(benchmark, 1, cpu_seconds_per_photo=round(cpu_seconds, 3))
    assert cpu_seconds < 2.0, f"issue 9's bound is 2 s of CPU per photo; measured {cpu_seconds:.2f} s"


@needs_gpu
@pytest.mark.parametrize("batch", [64])
def test_gpu_fit_batched(benchmark, batch):
    import cupy
    model = FaceModel.default().to("gpu")
    images, landmarks = _photos(model, batch, 224, xp=cupy)
    benchmark.group = f"fit, {batch} photos at once, default model, 224x224, 150 + 60 steps (GPU)"

    def run():
        result = fit(images, landmarks, model=model, device="gpu")
        cupy.cuda.get_current_stream().synchronize()
        return result

    run()
    result = benchmark.pedantic(run, rounds=3, iterations=1)
    error = cupy.linalg.norm(result.landmarks - landmarks, axis=-1).mean()
    _record(benchmark, batch, landmark_px=round(float(error), 3))
