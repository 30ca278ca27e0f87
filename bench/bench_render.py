"""The whole forward render chain of fastface.render_faces, and the rasterizer on the face model.

Workload: the default face model (34,737 vertices, 68,740 triangles), random identity, expression,
pose and light, 224x224: model evaluation, rotation, projection, normals, SH shading, rasterize and
interpolate, i.e. everything between the encoder's output and the loss. This is the renderer half
of the method's 250 Hz (Tewari et al. 2018 report the whole network, encoder included).

    python -m pytest bench/bench_render.py            # CPU rows here, GPU rows where there is one
"""
import numpy as np
import pytest

import fastface
from fastface import FaceModel, FaceParameters, render_faces, uniform_light
from fastface._backend import gpu_available
from fastface.ops.rasterize import rasterize_interpolate

RESOLUTION = (224, 224)
FOCAL = 1100.0  # pixels: the face fills most of a 224 x 224 image at 55 cm
needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs cupy and a CUDA GPU")


def face_parameters(model, batch, xp=np, seed=0):
    rng = np.random.default_rng(seed)
    f32 = lambda a: xp.asarray(np.asarray(a, np.float32))  # noqa: E731
    return FaceParameters(
        shape=f32(rng.standard_normal((batch, model.n_shape))),
        expression=f32(rng.standard_normal((batch, model.n_expression)) * 0.5),
        albedo=f32(rng.standard_normal((batch, model.n_albedo))),
        sh=uniform_light(batch, xp=xp),
        angles=f32(rng.uniform(-0.3, 0.3, (batch, 3))),
        translation=f32(np.tile([0.0, 0.0, -550.0], (batch, 1))))


def _record(benchmark, batch, **extra):
    benchmark.extra_info.update(extra)
    if benchmark.stats is not None:
        benchmark.extra_info["ms"] = round(benchmark.stats["median"] * 1e3, 4)
        benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats["median"], 1)


@pytest.mark.parametrize("batch", [8])
def test_cpu_render_faces(benchmark, batch):
    model = FaceModel.default()
    params = face_parameters(model, batch)
    benchmark.group = f"render_faces, default face model, B={batch} 224x224 (CPU)"
    with fastface.value_checks(False):
        render_faces(model, params, RESOLUTION, FOCAL)  # compile outside the timing
        rendering = benchmark(render_faces, model, params, RESOLUTION, FOCAL)
    _record(benchmark, batch, coverage=round(float(rendering.mask.mean()), 3))


@needs_gpu
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_gpu_render_faces(benchmark, batch):
    import cupy
    model = FaceModel.default().to("gpu")
    params = face_parameters(model, batch, xp=cupy)
    benchmark.group = f"render_faces, default face model, B={batch} 224x224 (GPU)"

    def run():
        rendering = render_faces(model, params, RESOLUTION, FOCAL)
        cupy.cuda.get_current_stream().synchronize()
        return rendering

    with fastface.value_checks(False):
        run()
        rendering = benchmark(run)
    _record(benchmark, batch, coverage=round(float(rendering.mask.mean()), 3))


@needs_gpu
@pytest.mark.parametrize("batch", [1, 64])
def test_gpu_face_model_rasterize_interpolate(benchmark, batch):
    import cupy
    model = FaceModel.default().to("gpu")
    params = face_parameters(model, batch, xp=cupy)
    with fastface.value_checks(False):
        rendering = render_faces(model, params, RESOLUTION, FOCAL)
    clip, tri, colors = rendering.clip, model.triangles, rendering.colors
    benchmark.group = f"rasterize + interpolate, default face model, B={batch} 224x224 (GPU)"

    def run():
        out = rasterize_interpolate(clip, tri, RESOLUTION, colors)
        cupy.cuda.get_current_stream().synchronize()
        return out

    with fastface.value_checks(False):
        run()
        benchmark(run)
    _record(benchmark, batch)
