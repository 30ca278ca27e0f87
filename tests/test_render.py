"""render_faces chains the ops exactly as written by hand, on the CPU and on the GPU."""
import dataclasses

import numpy as np
import pytest

import fastface
from fastface import FaceModel, FaceParameters, render_faces, uniform_light


def _parameters(model, batch, rng):
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return FaceParameters(shape=f32(rng.standard_normal((batch, model.n_shape))),
                          expression=f32(rng.standard_normal((batch, model.n_expression)) * 0.5),
                          albedo=f32(rng.standard_normal((batch, model.n_albedo))),
                          sh=uniform_light(batch), angles=f32(rng.uniform(-0.3, 0.3, (batch, 3))),
                          translation=f32(np.tile([0.0, 0.0, -550.0], (batch, 1))))


def test_render_faces_rebuilds_its_adjacency_when_the_model_gets_new_triangles(rng):
    model = FaceModel.default(level="small")
    params = _parameters(model, 1, rng)
    render_faces(model, params, (48, 48), 200.0)  # caches the adjacency of these triangles
    model.triangles = np.ascontiguousarray(model.triangles[:, ::-1])  # every triangle turned over
    rendering = render_faces(model, params, (48, 48), 200.0)
    camera = rendering.camera_vertices
    np.testing.assert_allclose(rendering.normals, fastface.vertex_normals(camera, model.triangles), atol=1e-6,
                               err_msg="normals from the old triangles' adjacency")


def test_render_faces_equals_the_chain_of_ops_written_by_hand(rng):
    model = FaceModel.default(level="small")
    params = _parameters(model, 2, rng)
    rendering = render_faces(model, params, (64, 64), 300.0)
    vertices, albedo = model.evaluate(params.shape, params.expression, params.albedo)
    camera = fastface.rigid_transform(vertices, fastface.euler_rotation(params.angles), params.translation)
    clip = fastface.perspective_projection(camera, 300.0, (64, 64))
    colors = fastface.sh_shade(fastface.vertex_normals(camera, model.triangles), albedo, params.sh)
    raster = fastface.rasterize(clip, model.triangles, (64, 64))
    image = fastface.interpolate(colors, raster, model.triangles)
    np.testing.assert_array_equal(rendering.raster.tri_id, raster.tri_id)
    np.testing.assert_array_equal(rendering.image, image)
    assert rendering.mask.mean() > 0.3, "the face should fill a good part of the image"
    # Under uniform light the colours are the albedo: the image holds albedo values.
    np.testing.assert_allclose(rendering.colors, albedo, rtol=1e-5, atol=1e-6)


def test_render_faces_refuses_parameters_on_another_device_than_the_model(rng, cupy):
    model = FaceModel.default(level="small")
    params = _parameters(model, 1, rng)
    gpu_params = FaceParameters(**{k: cupy.asarray(v) for k, v in vars(params).items()})
    try:
        render_faces(model, gpu_params, (32, 32), 150.0)
    except TypeError as err:
        assert "cupy" in str(err)
    else:
        raise AssertionError("mixing a CPU model with GPU parameters must raise TypeError")


def test_gpu_render_faces_matches_cpu(rng, cupy, tol):
    model = FaceModel.default(level="small")
    params = _parameters(model, 3, rng)
    cpu = render_faces(model, params, (96, 96), 450.0)
    gpu_params = FaceParameters(**{k: cupy.asarray(v) for k, v in vars(params).items()})
    gpu = render_faces(model.to("gpu"), gpu_params, (96, 96), 450.0)
    mismatch = (cupy.asnumpy(gpu.raster.tri_id) != cpu.raster.tri_id).mean()
    assert mismatch <= tol["gpu_cpu_tri_id_mismatch"]
    same = cupy.asnumpy(gpu.raster.tri_id) == cpu.raster.tri_id
    np.testing.assert_allclose(cupy.asnumpy(gpu.image)[same], cpu.image[same],
                               rtol=tol["pipeline_gpu_cpu_rtol"], atol=tol["pipeline_gpu_cpu_atol"])


@pytest.mark.parametrize("batch, exc", [(0, ValueError), (-1, ValueError), (2.5, TypeError), (None, TypeError)])
def test_uniform_light_rejects_bad_batch(batch, exc):
    with pytest.raises(exc, match="batch must be a positive integer"):
        fastface.uniform_light(batch)


def test_uniform_light_rejects_integer_dtype():
    # An integer dtype would truncate the coefficient 1 / (pi Y00) = 3.54 to 3 without a word.
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        fastface.uniform_light(2, dtype="int32")


@pytest.mark.parametrize("field", ["shape", "expression", "albedo", "sh", "angles", "translation"])
def test_render_faces_names_a_non_finite_parameter(rng, field):
    model = FaceModel.default(level="small")
    params = _parameters(model, 2, rng)
    bad = getattr(params, field).copy()
    bad.reshape(-1)[1] = np.nan
    with pytest.raises(ValueError, match=f"params.{field} .*NaN"):
        render_faces(model, dataclasses.replace(params, **{field: bad}), (32, 32), 100.0)


def test_render_faces_refuses_a_face_behind_the_camera_and_an_overflowing_light(rng):
    model = FaceModel.default(level="small")
    params = _parameters(model, 2, rng)
    behind = params.translation.copy()
    behind[1, 2] = 550.0
    with pytest.raises(ValueError, match="behind the camera"):
        render_faces(model, dataclasses.replace(params, translation=behind), (32, 32), 100.0)
    huge_light = np.full_like(params.sh, 3e38)  # finite, but the SH sum overflows float32
    with pytest.raises(ValueError, match="colors .*NaN or infinite"):
        render_faces(model, dataclasses.replace(params, sh=huge_light), (32, 32), 100.0)
    with fastface.value_checks(False):  # off means off
        render_faces(model, dataclasses.replace(params, sh=huge_light), (32, 32), 100.0)
