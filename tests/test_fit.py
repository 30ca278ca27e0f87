"""fastface.fit: recovering known parameters from photos rendered by the model, batching, bad input."""
import sys

import numpy as np
import pytest

from fastface._backend import gpu_available
from fastface.fit import FitResult, FitWeights, default_focal, default_model, default_pose, fit
from fastface.render import FaceParameters, render_faces, uniform_light

RESOLUTION = (128, 128)


def _known_faces(model, batch, seed):
    """Photos rendered at known parameters (moderate identity, expression, pose) on a grey background."""
    rng = np.random.default_rng(seed)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    sh = np.zeros((batch, 9, 3))
    sh[:, 0] = rng.uniform(0.45, 0.7, (batch, 1)) / (np.pi * 0.282095) * 1.6
    sh[:, 1:4] = rng.uniform(-0.3, 0.3, (batch, 3, 1))
    params = FaceParameters(
        shape=f32(rng.standard_normal((batch, model.n_shape)) * 0.6),
        expression=f32(rng.standard_normal((batch, model.n_expression)) * 0.3),
        albedo=f32(rng.standard_normal((batch, model.n_albedo)) * 0.6),
        sh=f32(sh),
        angles=f32(np.stack([rng.uniform(-0.2, 0.2, batch), rng.uniform(-0.4, 0.4, batch),
                             rng.uniform(-0.1, 0.1, batch)], 1)),
        translation=f32(np.stack([rng.uniform(-15, 15, batch), rng.uniform(-15, 15, batch),
                                  rng.uniform(-700, -600, batch)], 1)))
    focal = default_focal(RESOLUTION)
    rendering = render_faces(model, params, RESOLUTION, focal)
    ramp = np.linspace(0, 1, RESOLUTION[1], dtype=np.float32)[None, None, :, None]
    background = np.float32(0.3) + np.float32(0.1) * ramp
    images = np.ascontiguousarray(np.where(rendering.mask[..., None], rendering.image, background), np.float32)
    return images, rendering.landmarks, params, rendering


@pytest.fixture(scope="module")
def model():
    return default_model("cpu")


@pytest.fixture(scope="module")
def known(model):
    return _known_faces(model, 3, seed=7)


@pytest.fixture(scope="module")
def fitted(model, known):
    images, landmarks, _, _ = known
    return fit(images, landmarks, model=model)


def test_fit_recovers_landmarks_pose_and_shape_of_rendered_faces(model, known, fitted, tol):
    images, landmarks, truth, _ = known
    assert isinstance(fitted, FitResult)
    error = np.linalg.norm(fitted.landmarks - landmarks, axis=-1).mean(axis=1)
    assert np.all(error < tol["fit_landmark_px"]), error
    angle_error = np.abs(fitted.params.angles - truth.angles)
    assert np.all(angle_error < tol["fit_angles_rad"]), angle_error
    vertices, _ = model.evaluate(truth.shape, truth.expression, truth.albedo)
    rms = np.sqrt(((fitted.vertices - vertices) ** 2).sum(-1).mean(-1))
    # The mean face is the prior's answer (2-3 mm off here): the fit must be well closer than that.
    rms_mean = np.sqrt(((model.mean_shape[None] - vertices) ** 2).sum(-1).mean(-1))
    assert np.all(rms < tol["fit_vertices_rms_mm"]), rms
    assert np.all(rms < 0.6 * rms_mean), (rms, rms_mean)


def test_fit_photometric_stage_lowers_the_energy_and_matches_the_photo(fitted):
    total, photometric = fitted.losses["total"], fitted.losses["photometric"]
    assert total.shape == (60, 3) and photometric.shape == (60, 3)
    assert np.all(total[-1] < 0.7 * total[0])
    # The rendered face ends within a few grey levels of the photo (robust colour distance).
    assert np.all(photometric[-1] < 0.03), photometric[-1]
    assert fitted.losses["landmark_stage"].shape[1] == 3


def test_fit_result_shapes_and_focal(model, fitted):
    B = 3
    assert fitted.vertices.shape == (B, model.n_vertices, 3) and fitted.vertices.dtype == np.float32
    assert fitted.albedo.shape == (B, model.n_vertices, 3)
    assert fitted.landmarks.shape == (B, 68, 2)
    assert fitted.params.sh.shape == (B, 9, 3)
    assert fitted.focal == default_focal(RESOLUTION) and fitted.resolution == RESOLUTION


def test_fit_of_one_photo_does_not_depend_on_its_batch(model, known, fitted, tol):
    images, landmarks, _, _ = known
    alone = fit(images[1:2], landmarks[1:2], model=model)
    assert np.abs(alone.landmarks[0] - fitted.landmarks[1]).max() < tol["fit_batch_independence_px"]


def test_fit_is_deterministic(model, known):
    images, landmarks, _, _ = known
    a = fit(images[:1], landmarks[:1], model=model, iterations=5)
    b = fit(images[:1], landmarks[:1], model=model, iterations=5)
    for name in ("shape", "expression", "albedo", "sh", "angles", "translation"):
        assert np.array_equal(getattr(a.params, name), getattr(b.params, name)), name


def test_fit_without_landmarks_refines_a_rough_pose_photometrically(model, known):
    images, landmarks, truth, _ = known
    angles, translation = default_pose(3, RESOLUTION, default_focal(RESOLUTION), model=model)
    # A start 10 px and a few degrees off, as a detector's box would give.
    init = FaceParameters(shape=None, expression=None, albedo=None, sh=None,
                          angles=truth.angles + np.float32([0.05, -0.05, 0.03]),
                          translation=truth.translation + np.float32([8.0, -6.0, 20.0]))
    start = fit(images, None, model=model, init=init, iterations=0)
    out = fit(images, None, model=model, init=init, iterations=120)
    before = np.linalg.norm(start.landmarks - landmarks, axis=-1).mean(1)
    after = np.linalg.norm(out.landmarks - landmarks, axis=-1).mean(1)
    assert np.all(after < 0.6 * before), (before, after)
    assert "landmark" not in out.losses and "landmark_stage" not in out.losses
    assert angles.shape == (3, 3) and np.all(translation[:, 2] < 0)


def test_fit_with_antialias_recovers_the_rendered_faces_and_pulls_on_the_outline(model, known, tol):
    images, landmarks, truth, _ = known
    out = fit(images, landmarks, model=model, antialias=True)
    error = np.linalg.norm(out.landmarks - landmarks, axis=-1).mean(axis=1)
    assert np.all(error < tol["fit_landmark_px"]), error
    # Without landmarks, from a rough pose: the outline's gradient brings the face closer than
    # the same fit without antialias does.
    init = FaceParameters(shape=None, expression=None, albedo=None, sh=None,
                          angles=truth.angles + np.float32([0.05, -0.05, 0.03]),
                          translation=truth.translation + np.float32([8.0, -6.0, 20.0]))
    plain = fit(images, None, model=model, init=init, iterations=120)
    outlined = fit(images, None, model=model, init=init, iterations=120, antialias=True)
    e_plain = np.linalg.norm(plain.landmarks - landmarks, axis=-1).mean()
    e_outlined = np.linalg.norm(outlined.landmarks - landmarks, axis=-1).mean()
    assert e_outlined < e_plain, (e_outlined, e_plain)


def test_fit_starts_from_init_pose_when_given(model, known):
    images, landmarks, truth, _ = known
    init = FaceParameters(shape=None, expression=None, albedo=None, sh=None, angles=truth.angles,
                          translation=truth.translation)
    out = fit(images, landmarks, model=model, init=init, iterations=0, landmark_iterations=0)
    assert np.array_equal(out.params.angles, truth.angles)
    assert np.array_equal(out.params.translation, truth.translation)


def test_fit_accepts_weights_and_landmark_weights(model, known):
    images, landmarks, _, _ = known
    out = fit(images[:1], landmarks[:1], model=model, iterations=2, weights=FitWeights(landmark=100.0),
              landmark_weights=np.ones(68, np.float32), lr={"sh": 0.02})
    assert np.all(np.isfinite(out.landmarks))


def test_fit_with_fixed_offsets_includes_them_in_the_result(model, known):
    images, landmarks, _, _ = known
    rng = np.random.default_rng(5)
    geometry = rng.normal(0, 0.5, (1, model.n_vertices, 3)).astype(np.float32)
    reflectance = rng.normal(0, 0.02, (1, model.n_vertices, 3)).astype(np.float32)
    out = fit(images[:1], landmarks[:1], model=model, iterations=3, geometry_offsets=geometry,
              reflectance_offsets=reflectance)
    base_vertices, base_albedo = model.evaluate(out.params.shape, out.params.expression, out.params.albedo)
    np.testing.assert_allclose(out.vertices - base_vertices, geometry, atol=1e-4)
    np.testing.assert_allclose(out.albedo - base_albedo, reflectance, atol=1e-5)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(images=np.zeros((1, 64, 64), np.float32)), ValueError, "images"),
    (dict(images=np.zeros((1, 64, 64, 3), np.float64)), TypeError, "images"),
    (dict(images=[[0.0]]), TypeError, "images"),
    (dict(landmarks=np.zeros((1, 67, 2), np.float32)), ValueError, "landmarks"),
    (dict(landmarks=np.full((1, 68, 2), np.nan, np.float32)), ValueError, "landmarks"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(iterations=-1), ValueError, "iterations"),
    (dict(focal=-3.0), ValueError, "focal"),
    (dict(model="bfm"), TypeError, "model"),
    (dict(weights={"landmark": 1}), TypeError, "weights"),
    (dict(landmark_weights=np.ones(67)), ValueError, "landmark_weights"),
    (dict(lr={"speed": 1.0}), ValueError, "lr"),
    (dict(geometry_offsets=np.zeros((1, 5, 3), np.float32)), ValueError, "geometry_offsets"),
])
def test_fit_rejects_bad_input_naming_the_argument(kwargs, error, words):
    args = dict(images=np.full((1, 64, 64, 3), 0.5, np.float32), landmarks=None)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        fit(args.pop("images"), args.pop("landmarks"), iterations=args.pop("iterations", 1), **args)


def test_fit_gpu_path_computes_the_cpu_result_in_host_emulation(monkeypatch, tol):
    """fit on tests/fake_cupy.py in compute mode: the CUDA kernels run on the host (emulated), so
    the GPU branch's numbers are compared with the CPU's on one small rendered face."""
    from fastface.model import FaceModel
    from tests.fake_cupy import install
    model = FaceModel.default("small")
    size = (48, 48)
    truth = FaceParameters(shape=np.zeros((1, model.n_shape), np.float32),
                           expression=np.zeros((1, model.n_expression), np.float32),
                           albedo=np.zeros((1, model.n_albedo), np.float32),
                           sh=uniform_light(1),
                           angles=np.float32([[0.1, -0.2, 0.05]]), translation=np.float32([[3.0, -2.0, -640.0]]))
    rendering = render_faces(model, truth, size, default_focal(size))
    images = np.where(rendering.mask[..., None], rendering.image, np.float32(0.3)).astype(np.float32)
    landmarks = rendering.landmarks + np.float32(0.7)  # off by a little, so that the steps move
    cpu = fit(images, landmarks, model=model, iterations=2, landmark_iterations=2)
    install(monkeypatch, compute=True)
    cp = sys.modules["cupy"]
    gpu = fit(cp.asarray(images), cp.asarray(landmarks), model=model, device="gpu", iterations=2,
              landmark_iterations=2)
    assert np.abs(gpu.landmarks.get() - cpu.landmarks).max() < tol["fit_gpu_emulated_px"]
    for name in ("angles", "translation", "sh", "shape"):
        np.testing.assert_allclose(getattr(gpu.params, name).get(), getattr(cpu.params, name), atol=1e-3,
                                   err_msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_available(), reason="needs cupy and a CUDA GPU")
def test_fit_on_gpu_matches_cpu(model, known):
    import cupy
    images, landmarks, _, _ = known
    cpu = fit(images, landmarks, model=model, iterations=30)
    gpu = fit(cupy.asarray(images), cupy.asarray(landmarks), model=model, device="gpu", iterations=30)
    # Adam amplifies float32 reordering over the steps: the fits agree to a fraction of a pixel.
    assert np.abs(cupy.asnumpy(gpu.landmarks) - cpu.landmarks).max() < 0.25


def test_fit_gpu_path_launches_valid_kernels_on_the_fake_gpu(monkeypatch):
    """The GPU branch of fit on tests/fake_cupy.py (check-only: every kernel launch is checked
    against its C signature, nothing is computed): arrays stay on the device, the cupy API it
    uses exists, and the results come back as (fake) cupy arrays of the right shapes."""
    from fastface._backend import is_cupy_array
    from fastface.model import FaceModel
    from tests.fake_cupy import install
    fake = install(monkeypatch)
    cp = sys.modules["cupy"]
    model = FaceModel.default("small")
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    landmarks = np.stack([rng.uniform(8, 24, (68, 2))] * 2).astype(np.float32)
    with np.errstate(all="ignore"):  # check-only kernels leave garbage (NaN) in their outputs
        out = fit(cp.asarray(images), cp.asarray(landmarks), model=model, device="gpu", iterations=2,
                  landmark_iterations=2)
    assert is_cupy_array(out.vertices) and is_cupy_array(out.params.shape) and is_cupy_array(out.landmarks)
    assert out.vertices.shape == (2, model.n_vertices, 3) and out.landmarks.shape == (2, 68, 2)
    assert fake.launches, "fit on the GPU launched no kernel"
