"""render_faces_backward: the whole render chain's gradient against central differences in float64."""
import numpy as np
import pytest

import fastface
from tests.gradcheck import assert_gradient_matches

RES = (24, 24)
FOCAL = 60.0


@pytest.fixture(scope="module")
def model():
    return fastface.FaceModel.default(level="small").truncated(n_shape=6, n_expression=4, n_albedo=5)


def _params(model, rng, dtype=np.float64, batch=2):
    sh = fastface.uniform_light(batch, dtype=dtype)
    sh += rng.normal(0, 0.1, sh.shape)
    return fastface.FaceParameters(
        shape=rng.normal(0, 1, (batch, model.n_shape)).astype(dtype),
        expression=rng.normal(0, 0.5, (batch, model.n_expression)).astype(dtype),
        albedo=rng.normal(0, 1, (batch, model.n_albedo)).astype(dtype),
        sh=sh.astype(dtype),
        angles=rng.uniform(-0.2, 0.2, (batch, 3)).astype(dtype),
        translation=np.array([[3.0, -2.0, -560.0], [-4.0, 1.0, -600.0]], dtype)[:batch])


def _replace(params, name, value):
    fields = {k: getattr(params, k) for k in ("shape", "expression", "albedo", "sh", "angles", "translation")}
    fields[name] = value
    return fastface.FaceParameters(**fields)


def _loss_weights(rng, model, params, offsets):
    r = fastface.render_faces(model, params, RES, FOCAL, *offsets)
    return rng.normal(0, 1, r.image.shape), rng.normal(0, 1, r.landmarks.shape)


@pytest.mark.parametrize("name", ["shape", "expression", "albedo", "sh", "angles", "translation"])
def test_render_faces_backward_matches_central_differences(model, name, tol):
    rng = np.random.default_rng(1)
    params = _params(model, rng)
    offsets = (rng.normal(0, 0.5, (2, model.n_vertices, 3)), rng.normal(0, 0.02, (2, model.n_vertices, 3)))
    w_image, w_landmarks = _loss_weights(rng, model, params, offsets)

    def f(x):
        r = fastface.render_faces(model, _replace(params, name, x), RES, FOCAL, *offsets)
        return np.concatenate([r.image.reshape(-1), r.landmarks.reshape(-1)])

    r = fastface.render_faces(model, params, RES, FOCAL, *offsets)
    g = fastface.render_faces_backward(model, params, r, RES, FOCAL, grad_image=w_image, grad_landmarks=w_landmarks)
    grad_out = np.concatenate([w_image.reshape(-1), w_landmarks.reshape(-1)])
    assert_gradient_matches(f, getattr(params, name), grad_out, getattr(g.params, name), tol, n_samples=12,
                            rng=rng)


@pytest.mark.parametrize("which", [0, 1])
def test_offset_gradients_are_the_vertex_and_albedo_gradients(model, which, tol):
    rng = np.random.default_rng(2)
    params = _params(model, rng)
    offsets = [rng.normal(0, 0.5, (2, model.n_vertices, 3)), rng.normal(0, 0.02, (2, model.n_vertices, 3))]
    w_image, w_landmarks = _loss_weights(rng, model, params, offsets)

    def f(x):
        o = list(offsets)
        o[which] = x
        r = fastface.render_faces(model, params, RES, FOCAL, *o)
        return np.concatenate([r.image.reshape(-1), r.landmarks.reshape(-1)])

    r = fastface.render_faces(model, params, RES, FOCAL, *offsets)
    g = fastface.render_faces_backward(model, params, r, RES, FOCAL, grad_image=w_image, grad_landmarks=w_landmarks)
    analytic = g.vertices if which == 0 else g.albedo
    # Sample vertices that the image sees (a gradient of exactly zero proves little).
    seen = np.flatnonzero(np.abs(analytic).reshape(-1) > 0)
    idx = rng.choice(seen, 12, replace=False)
    from tests.gradcheck import numerical_gradient
    numeric = numerical_gradient(f, offsets[which], grad_out=np.concatenate([w_image.reshape(-1), w_landmarks.reshape(-1)]),
                                 indices=idx)
    np.testing.assert_allclose(analytic.reshape(-1)[idx], numeric, rtol=1e-5, atol=1e-8)


def test_landmarks_are_the_projected_landmark_vertices(model):
    rng = np.random.default_rng(3)
    params = _params(model, rng, np.float32)
    r = fastface.render_faces(model, params, RES, FOCAL)
    expected = fastface.project_to_pixels(r.camera_vertices[:, model.landmarks], FOCAL, RES)
    np.testing.assert_array_equal(r.landmarks, expected)
    assert r.landmarks.shape == (2, 68, 2)


def _base_and_offsets(model, seed):
    """float32 parameters, geometry offsets, and the base level rendered from the parameters."""
    rng = np.random.default_rng(seed)
    params = _params(model, rng, np.float32)
    offsets = rng.normal(0, 1, (2, model.n_vertices, 3)).astype(np.float32)
    return params, offsets, fastface.render_faces(model, params, RES, FOCAL)


def test_offsets_are_added_before_the_pose(model):
    params, offsets, base = _base_and_offsets(model, 4)
    moved = fastface.render_faces(model, params, RES, FOCAL, geometry_offsets=offsets)
    np.testing.assert_allclose(moved.vertices, base.vertices + offsets, rtol=1e-6, atol=1e-5)


def test_bad_offsets_and_gradients_are_refused_by_name(model):
    rng = np.random.default_rng(5)
    params = _params(model, rng, np.float32)
    with pytest.raises(ValueError, match="geometry_offsets"):
        fastface.render_faces(model, params, RES, FOCAL, geometry_offsets=np.zeros((2, 3, 3), np.float32))
    bad = np.zeros((2, model.n_vertices, 3), np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="reflectance_offsets"):
        fastface.render_faces(model, params, RES, FOCAL, reflectance_offsets=bad)
    r = fastface.render_faces(model, params, RES, FOCAL)
    with pytest.raises(ValueError, match="grad_image or grad_landmarks"):
        fastface.render_faces_backward(model, params, r, RES, FOCAL)
    with pytest.raises(ValueError, match="grad_landmarks"):
        fastface.render_faces_backward(model, params, r, RES, FOCAL, grad_landmarks=np.zeros((2, 5, 2), np.float32))


def test_a_level_rendered_from_a_given_evaluation_equals_one_that_evaluates_the_model(model):
    params, offsets, base = _base_and_offsets(model, 6)
    own = fastface.render_faces(model, params, RES, FOCAL, geometry_offsets=offsets)
    given = fastface.render_faces(model, params, RES, FOCAL, geometry_offsets=offsets,
                                  evaluated=(base.vertices, base.albedo))
    for name in ("image", "vertices", "albedo", "landmarks"):
        np.testing.assert_array_equal(getattr(given, name), getattr(own, name))
    # The given evaluation is what is rendered: another one changes the picture.
    moved = fastface.render_faces(model, params, RES, FOCAL, evaluated=(base.vertices + offsets, base.albedo))
    np.testing.assert_array_equal(moved.vertices, base.vertices + offsets)
    with pytest.raises(TypeError, match="evaluated must be a \\(vertices, albedo\\) pair"):
        fastface.render_faces(model, params, RES, FOCAL, evaluated=base.vertices)
    with pytest.raises(ValueError, match="evaluated\\[1\\] \\(albedo\\)"):
        fastface.render_faces(model, params, RES, FOCAL, evaluated=(base.vertices, base.albedo[:, :5]))
    with pytest.raises(TypeError, match="evaluated\\[0\\] \\(vertices\\)"):
        fastface.render_faces(model, params, RES, FOCAL, evaluated=(base.vertices.astype(np.float64), base.albedo))


def test_render_backward_without_the_model_stops_at_the_vertices(model):
    rng = np.random.default_rng(7)
    params = _params(model, rng)
    r = fastface.render_faces(model, params, RES, FOCAL)
    w_image, w_landmarks = _loss_weights(rng, model, params, ())
    whole = fastface.render_faces_backward(model, params, r, RES, FOCAL, grad_image=w_image, grad_landmarks=w_landmarks)
    cut = fastface.render_faces_backward(model, params, r, RES, FOCAL, grad_image=w_image, grad_landmarks=w_landmarks,
                                         model_backward=False)
    assert cut.params.shape is None and cut.params.expression is None and cut.params.albedo is None
    for name in ("sh", "angles", "translation"):
        np.testing.assert_array_equal(getattr(cut.params, name), getattr(whole.params, name))
    np.testing.assert_array_equal(cut.vertices, whole.vertices)
    np.testing.assert_array_equal(cut.albedo, whole.albedo)
    grad_shape, grad_expression, grad_albedo = model.evaluate_backward(cut.vertices, cut.albedo)
    np.testing.assert_array_equal(grad_shape, whole.params.shape)
    np.testing.assert_array_equal(grad_albedo, whole.params.albedo)


def test_render_backward_adds_the_vertex_and_albedo_gradients_into_add_to(model):
    rng = np.random.default_rng(8)
    params = _params(model, rng)
    r = fastface.render_faces(model, params, RES, FOCAL)
    w_image, w_landmarks = _loss_weights(rng, model, params, ())
    for gi, gl in ((w_image, w_landmarks), (None, w_landmarks)):  # the landmark-only path adds no albedo term
        alone = fastface.render_faces_backward(model, params, r, RES, FOCAL, grad_image=gi, grad_landmarks=gl,
                                               model_backward=False)
        start = (rng.normal(size=r.vertices.shape), rng.normal(size=r.albedo.shape))
        acc = (start[0].copy(), start[1].copy())
        added = fastface.render_faces_backward(model, params, r, RES, FOCAL, grad_image=gi, grad_landmarks=gl,
                                               model_backward=False, add_to=acc)
        assert added.vertices is acc[0] and added.albedo is acc[1]
        np.testing.assert_allclose(acc[0], start[0] + alone.vertices, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(acc[1], start[1] + alone.albedo, rtol=1e-12, atol=1e-12)
        for name in ("sh", "angles", "translation"):
            np.testing.assert_allclose(getattr(added.params, name), getattr(alone.params, name), rtol=1e-12)
    with pytest.raises(ValueError, match="add_to needs model_backward=False"):
        fastface.render_faces_backward(model, params, r, RES, FOCAL, grad_image=w_image, add_to=acc)
    with pytest.raises(ValueError, match=r"add_to\[1\] \(albedo\) must have shape"):
        fastface.render_faces_backward(model, params, r, RES, FOCAL, grad_image=w_image, model_backward=False,
                                       add_to=(acc[0], acc[1][:1]))


@pytest.mark.parametrize("name", ["shape", "angles", "translation"])
def test_antialiased_render_backward_matches_central_differences_at_the_outline(model, name, tol):
    """With antialias the outline's pixels depend on the geometry: their gradient reaches the pose and shape."""
    rng = np.random.default_rng(6)
    params = _params(model, rng)
    background = rng.uniform(0, 1, (2,) + RES + (3,))
    w_image = rng.normal(0, 1, (2,) + RES + (3,))

    def f(x):
        r = fastface.render_faces(model, _replace(params, name, x), RES, FOCAL, antialias=True, background=background)
        return r.image

    r = fastface.render_faces(model, params, RES, FOCAL, antialias=True, background=background)
    g = fastface.render_faces_backward(model, params, r, RES, FOCAL, grad_image=w_image)
    assert_gradient_matches(f, getattr(params, name), w_image, getattr(g.params, name), tol, n_samples=8, rng=rng)


def test_antialias_changes_only_the_outline_and_background_needs_it(model):
    rng = np.random.default_rng(7)
    params = _params(model, rng, np.float32)
    background = rng.uniform(0, 1, (2,) + RES + (3,)).astype(np.float32)
    plain = fastface.render_faces(model, params, RES, FOCAL)
    blended = fastface.render_faces(model, params, RES, FOCAL, antialias=True, background=background)
    over = np.where(plain.mask[..., None], plain.image, background)
    changed = np.abs(blended.image - over).max(-1) > 1e-6
    assert changed.any()
    # Every changed pixel is next to a pixel of the other side of the outline.
    inside = plain.mask
    edge = np.zeros_like(inside)
    edge[:, 1:] |= inside[:, 1:] != inside[:, :-1]
    edge[:, :-1] |= inside[:, 1:] != inside[:, :-1]
    edge[:, :, 1:] |= inside[:, :, 1:] != inside[:, :, :-1]
    edge[:, :, :-1] |= inside[:, :, 1:] != inside[:, :, :-1]
    assert not (changed & ~edge).any()
    with pytest.raises(ValueError, match="antialias"):
        fastface.render_faces(model, params, RES, FOCAL, background=background)
