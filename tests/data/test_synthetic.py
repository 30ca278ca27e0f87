"""Synthetic faces: deterministic per seed, detail outside the base model's span, consistent ground truth."""
import numpy as np
import pytest

import fastface
from fastface import FaceModel
from fastface.data import EVAL_SEEDS, TRAIN_SEEDS, SyntheticBatch, SyntheticFaces, default_framing
from fastface.data import synthetic


@pytest.fixture(scope="module")
def model():
    return FaceModel.default(level="small")


@pytest.fixture(scope="module")
def faces(model):
    return SyntheticFaces(model, resolution=(48, 40))


@pytest.fixture(scope="module")
def batch(faces):
    return faces.batch(TRAIN_SEEDS[:6])


# Across batch compositions the model's GEMM (BLAS) may round the last bit of a vertex differently
# (module docstring): vertices of ~100 mm agree to a few float32 ulps, pixels to 1e-6.
_ACROSS_BATCHES = {"vertices": 1e-4, "detail_vertices": 1e-5, "albedo": 1e-6, "detail_albedo": 1e-6,
                   "landmarks": 1e-4, "images": 1e-5, "coverage": 1e-6, "background": 0.0}


def test_train_and_eval_seeds_are_disjoint_ranges():
    assert len(TRAIN_SEEDS) >= 100_000 and len(EVAL_SEEDS) >= 1_000
    assert set(TRAIN_SEEDS[-1000:]).isdisjoint(EVAL_SEEDS) and max(TRAIN_SEEDS) < min(EVAL_SEEDS)


def test_a_seed_gives_the_same_face_in_any_batch(faces, batch):
    alone = faces.batch([TRAIN_SEEDS[4]])
    mixed = faces.batch([EVAL_SEEDS[0], TRAIN_SEEDS[4], TRAIN_SEEDS[1]])
    for other, index in ((alone, 0), (mixed, 1)):
        for name, atol in _ACROSS_BATCHES.items():
            np.testing.assert_allclose(getattr(other, name)[index], getattr(batch, name)[4], rtol=0, atol=atol,
                                       err_msg=name)
        for name in ("shape", "expression", "albedo", "sh", "angles", "translation"):
            np.testing.assert_array_equal(getattr(other.params, name)[index], getattr(batch.params, name)[4])
        assert (other.mask[index] != batch.mask[4]).mean() < 1e-3
    np.testing.assert_array_equal(mixed.seeds, [EVAL_SEEDS[0], TRAIN_SEEDS[4], TRAIN_SEEDS[1]])


def test_the_same_seeds_give_identical_batches_in_a_new_generator(model, batch):
    again = SyntheticFaces(model, resolution=(48, 40)).batch(TRAIN_SEEDS[:6])
    for name in ("images", "mask", "landmarks", "vertices", "albedo", "detail_vertices", "detail_albedo"):
        np.testing.assert_array_equal(getattr(again, name), getattr(batch, name), err_msg=name)


def test_draws_made_ahead_give_the_same_batch_and_must_match_the_seeds(faces, batch):
    ahead = faces.draw(TRAIN_SEEDS[:6])
    again = faces.batch(TRAIN_SEEDS[:6], draws=ahead)
    for name in ("images", "mask", "landmarks", "vertices", "albedo", "detail_vertices", "detail_albedo"):
        np.testing.assert_array_equal(getattr(again, name), getattr(batch, name), err_msg=name)
    with pytest.raises(ValueError, match="draws must be this SyntheticFaces' draw"):
        faces.batch(TRAIN_SEEDS[1:7], draws=ahead)
    with pytest.raises(ValueError, match="draws must be"):
        faces.batch(TRAIN_SEEDS[:6], draws={"shape": None})


def test_different_seeds_give_different_faces(batch):
    assert np.abs(batch.vertices[0] - batch.vertices[1]).max() > 1.0
    assert np.abs(batch.images[0] - batch.images[1]).mean() > 0.02


def test_outputs_have_the_documented_shapes_and_dtypes(model, batch):
    B, V = 6, model.n_vertices
    assert isinstance(batch, SyntheticBatch)
    expected = {"images": ((B, 48, 40, 3), np.float32), "mask": ((B, 48, 40), np.bool_),
                "coverage": ((B, 48, 40), np.float32), "landmarks": ((B, 68, 2), np.float32),
                "vertices": ((B, V, 3), np.float32), "albedo": ((B, V, 3), np.float32),
                "detail_vertices": ((B, V, 3), np.float32), "detail_albedo": ((B, V, 3), np.float32),
                "background": ((B, 48, 40, 3), np.float32)}
    for name, (shape, dtype) in expected.items():
        a = getattr(batch, name)
        assert a.shape == shape and a.dtype == dtype, (name, a.shape, a.dtype)
    p = batch.params
    assert p.shape.shape == (B, model.n_shape) and p.expression.shape == (B, model.n_expression)
    assert p.albedo.shape == (B, model.n_albedo) and p.sh.shape == (B, 9, 3)
    assert p.angles.shape == (B, 3) and p.translation.shape == (B, 3)
    assert all(getattr(p, n).dtype == np.float32 for n in ("shape", "expression", "albedo", "sh", "angles",
                                                           "translation"))


def test_images_are_finite_in_the_unit_range_and_the_mask_matches_the_coverage(batch):
    assert np.isfinite(batch.images).all()
    assert batch.images.min() >= 0.0 and batch.images.max() <= 1.0
    np.testing.assert_array_equal(batch.mask, batch.coverage >= 0.5)
    assert 0.15 < batch.mask.mean() < 0.7
    # Where no sample touches the face (or the mouth's interior) the image is the background.
    outside = batch.coverage == 0
    far = outside & np.roll(outside, 1, 1) & np.roll(outside, -1, 1) & np.roll(outside, 1, 2) & \
        np.roll(outside, -1, 2)
    np.testing.assert_allclose(batch.images[far], batch.background[far], atol=1e-6)
    # On the face, the image is the face: not the background.
    inside = batch.coverage == 1
    assert np.abs(batch.images[inside] - batch.background[inside]).mean() > 0.05
    # The outline is antialiased: some pixels are partly covered.
    partial = (batch.coverage > 0) & (batch.coverage < 1)
    assert partial.sum() > 0


def test_vertices_and_albedo_are_the_base_model_plus_the_detail(model, batch):
    p = batch.params
    base_vertices, base_albedo = model.evaluate(p.shape, p.expression, p.albedo)
    np.testing.assert_allclose(batch.vertices, base_vertices + batch.detail_vertices, atol=1e-4)
    np.testing.assert_allclose(batch.albedo, base_albedo + batch.detail_albedo, atol=1e-6)


def _rms(a):
    return float(np.sqrt(np.mean(np.sum(np.asarray(a, np.float64) ** 2, axis=-1))))


def test_detail_lies_outside_the_base_models_span_and_is_a_few_millimetres(model, batch):
    geometry = np.concatenate([model.shape_basis, model.expression_basis]).astype(np.float64)
    albedo = model.albedo_basis.astype(np.float64)
    for detail, basis in ((batch.detail_vertices, geometry), (batch.detail_albedo, albedo)):
        d = detail.reshape(len(detail), -1).astype(np.float64)
        coef = np.linalg.lstsq(basis.T, d.T, rcond=None)[0]
        left = d - (basis.T @ coef).T
        ratio = np.linalg.norm(left, axis=1) / np.linalg.norm(d, axis=1)
        assert (ratio > 0.999).all(), ratio  # the base model can express none of it
    rms = [_rms(v) for v in batch.detail_vertices]
    assert 1.0 < np.mean(rms) < 5.0, rms
    albedo_rms = [_rms(a) for a in batch.detail_albedo]
    assert 0.01 < np.mean(albedo_rms) < 0.1, albedo_rms


def test_the_detail_moves_the_landmarks_and_the_outline(model):
    with_detail = SyntheticFaces(model, resolution=(96, 96)).batch(TRAIN_SEEDS[:4])
    without = SyntheticFaces(model, resolution=(96, 96), detail=False).batch(TRAIN_SEEDS[:4])
    for name in ("shape", "expression", "albedo", "sh", "angles", "translation"):
        np.testing.assert_array_equal(getattr(with_detail.params, name), getattr(without.params, name))
    assert not without.detail_vertices.any() and not without.detail_albedo.any()
    shift = np.linalg.norm(with_detail.landmarks - without.landmarks, axis=-1)
    assert shift.mean() > 0.3, shift.mean()  # pixels, at 96 x 96
    assert (with_detail.mask != without.mask).mean() > 0.002
    doubled = SyntheticFaces(model, resolution=(96, 96), detail_scale=2.0).batch(TRAIN_SEEDS[:4])
    np.testing.assert_allclose(doubled.detail_vertices, 2 * with_detail.detail_vertices, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(doubled.detail_albedo, 2 * with_detail.detail_albedo, rtol=1e-5, atol=1e-6)


def test_landmarks_are_the_projected_ground_truth_landmark_vertices(model, faces, batch):
    p = batch.params
    angles = p.angles.astype(np.float64)
    H, W = faces.resolution
    for b in range(len(angles)):
        pitch, yaw, roll = angles[b]
        rx = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
        ry = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
        rz = np.array([[np.cos(roll), -np.sin(roll), 0], [np.sin(roll), np.cos(roll), 0], [0, 0, 1]])
        cam = batch.vertices[b, model.landmarks].astype(np.float64) @ (rz @ ry @ rx).T + p.translation[b]
        x = faces.focal * cam[:, 0] / -cam[:, 2] + W / 2 - 0.5
        y = -faces.focal * cam[:, 1] / -cam[:, 2] + H / 2 - 0.5
        np.testing.assert_allclose(batch.landmarks[b], np.stack([x, y], 1), atol=2e-3)
    assert (batch.landmarks[..., 0] > 0).all() and (batch.landmarks[..., 0] < W - 1).all()
    assert (batch.landmarks[..., 1] > 0).all() and (batch.landmarks[..., 1] < H - 1).all()


def test_default_framing_fills_about_80_percent_of_the_height(model):
    focal, translation = default_framing((64, 48))
    assert focal == pytest.approx(2.81 * 64, rel=1e-3)
    np.testing.assert_array_equal(translation, np.float32([0.0, 2.5, -650.0]))
    p = model.mean_shape.astype(np.float64) + translation
    y = -focal * p[:, 1] / -p[:, 2] + 32 - 0.5
    assert 0.78 < (y.max() - y.min()) / 64 < 0.82 and abs((y.max() + y.min()) / 2 - 31.5) < 0.5
    # Twice as far: twice the focal, the same framing.
    assert default_framing((64, 48), -1300.0)[0] == pytest.approx(2 * focal)
    faces = SyntheticFaces(model, resolution=(64, 48))
    assert faces.focal == focal and np.array_equal(faces.translation, translation)
    assert faces.framing[0] == focal and faces.framing[1] is faces.translation
    rows = SyntheticFaces(model, resolution=(64, 64)).batch(TRAIN_SEEDS[:16]).mask.any(axis=2)
    heights = [np.ptp(np.flatnonzero(r)) + 1 for r in rows]
    assert 0.65 < np.mean(heights) / 64 < 0.9, heights


def test_faces_vary_in_pose_lighting_and_background(batch):
    p = batch.params
    assert np.ptp(p.angles[:, 1]) > 0.3 and np.abs(p.angles[:, 1]).max() <= 0.6
    assert np.abs(p.angles[:, 0]).max() <= 0.25 and np.abs(p.angles[:, 2]).max() <= 0.15
    assert np.ptp(p.sh[:, 1:4, 0], axis=0).max() > 0.05  # the light comes from different directions
    means = batch.background.mean(axis=(1, 2))
    assert np.ptp(means, axis=0).max() > 0.2
    # Not a constant colour: every background has texture at the pixel scale.
    fine = np.abs(np.diff(batch.background, axis=2)).mean(axis=(1, 2, 3))
    assert (fine > 1e-3).all() and np.ptp(batch.background, axis=(1, 2)).min() > 0.05


def test_the_mouths_interior_is_dark_and_outside_the_mask(model):
    faces = SyntheticFaces(model, resolution=(128, 128))
    assert faces._mouth_loop is not None and len(faces._mouth_loop) > 10
    # A frontal face with the jaw wide open: the pixels between the lips are dark and not in the mask.
    jaw = model.expression_names.index("jaw_open")
    draw = faces._draw_batch

    def open_mouth(seeds):
        d = draw(seeds)
        d["expression"][:] = 0.0
        d["expression"][:, jaw] = 3.0
        d["angles"][:] = 0.0
        return d

    faces._draw_batch = open_mouth
    b = faces.batch([1, 2])
    for k in range(2):
        lips = b.landmarks[k, [62, 66]]
        x, y0, y1 = int(round(lips[:, 0].mean())), int(np.ceil(lips[0, 1])), int(np.floor(lips[1, 1]))
        assert y1 - y0 >= 4, (y0, y1)
        column = slice(y0 + 1, y1 - 1)
        assert not b.mask[k, column, x].any()
        assert b.images[k, column, x].max() < 0.2
        assert (b.coverage[k, column, x] == 0).all()


@pytest.mark.parametrize("seeds, exc, text", [
    ([-1], ValueError, "non-negative"), ([1.5], TypeError, "integers"), ([], ValueError, "at least one"),
    (3, TypeError, "sequence"), (None, TypeError, "sequence"), ([True], TypeError, "integers")])
def test_bad_seeds_are_refused_naming_the_argument(faces, seeds, exc, text):
    with pytest.raises(exc, match="seeds") as err:
        faces.batch(seeds)
    assert text in str(err.value)


def test_bad_constructor_arguments_are_refused(model):
    with pytest.raises(ValueError, match="resolution"):
        SyntheticFaces(model, resolution=(0, 64))
    with pytest.raises(TypeError, match="resolution"):
        SyntheticFaces(model, resolution=64)
    with pytest.raises(ValueError, match="focal"):
        SyntheticFaces(model, focal=-3.0)
    with pytest.raises(ValueError, match="translation_z"):
        SyntheticFaces(model, translation_z=100.0)
    with pytest.raises(ValueError, match="supersample"):
        SyntheticFaces(model, supersample=0)
    with pytest.raises(ValueError, match="detail_scale"):
        SyntheticFaces(model, detail_scale=-1.0)
    bare = model.truncated()
    bare.landmarks = None
    with pytest.raises(ValueError, match="landmarks"):
        SyntheticFaces(bare)


def test_the_detail_dictionaries_are_built_once_per_model_and_seed(model, faces):
    again = SyntheticFaces(model, resolution=(32, 32))
    assert again.detail_geometry_basis is not None
    assert synthetic._detail_of(model, 0) is synthetic._detail_of(model, 0)
    other = SyntheticFaces(model, resolution=(48, 40), seed=1)
    assert not np.allclose(other.detail_geometry_basis, faces.detail_geometry_basis)
    kinds = set(faces.detail_geometry_kinds) | set(faces.detail_albedo_kinds)
    assert {"held_back", "bump", "nasolabial", "forehead", "mole", "freckles", "blotch"} <= kinds


def test_gpu_synthetic_faces_match_the_cpu(model, cupy, tol):
    cpu = SyntheticFaces(model, resolution=(64, 64)).batch(TRAIN_SEEDS[:4])
    gpu = SyntheticFaces(model.to("gpu"), resolution=(64, 64)).batch(TRAIN_SEEDS[:4])
    assert isinstance(gpu.images, cupy.ndarray) and isinstance(gpu.params.shape, cupy.ndarray)
    for name in ("vertices", "detail_vertices"):
        np.testing.assert_allclose(cupy.asnumpy(getattr(gpu, name)), getattr(cpu, name), atol=2e-3, err_msg=name)
    for name in ("albedo", "detail_albedo", "background"):
        np.testing.assert_allclose(cupy.asnumpy(getattr(gpu, name)), getattr(cpu, name), atol=1e-5, err_msg=name)
    np.testing.assert_allclose(cupy.asnumpy(gpu.landmarks), cpu.landmarks, atol=2e-3)
    mask = cupy.asnumpy(gpu.mask)
    assert (mask != cpu.mask).mean() < 2e-3
    same = (cupy.asnumpy(gpu.coverage) == cpu.coverage)
    np.testing.assert_allclose(cupy.asnumpy(gpu.images)[same], cpu.images[same], atol=1e-3)


def _tiny_face_model(rng):
    """A small face-like model that the emulated GPU kernels render quickly: a 17 x 19 grid over the
    default model's face box, a dome for z, a two-cell hole for the mouth, the default model's
    landmark positions snapped to the grid (the inner lips onto the hole's rim), mirror symmetry."""
    nx, ny = 17, 19
    xs, ys = np.linspace(-70.0, 70.0, nx), np.linspace(-92.0, 95.0, ny)
    gx, gy = np.meshgrid(xs, ys)
    z = 40.0 * np.sqrt(np.clip(1.0 - (gx / 90.0) ** 2 - (gy / 120.0) ** 2, 0.0, None))
    mean = np.stack([gx.ravel(), gy.ravel(), z.ravel()], axis=1)
    V = len(mean)
    mouth_row, mouth_cols = int(np.argmin(np.abs(ys + 45.0))), (7, 8)  # the cells left of and right of x = 0
    tri = []
    for i in range(ny - 1):
        for j in range(nx - 1):
            if i == mouth_row and j in mouth_cols:
                continue
            a = i * nx + j
            tri += [(a, a + 1, a + nx + 1), (a, a + nx + 1, a + nx)]
    symmetry = (np.arange(V) // nx) * nx + (nx - 1 - np.arange(V) % nx)
    default = FaceModel.default(level="small")
    target = default.mean_shape[default.landmarks, :2]
    landmarks = np.argmin(np.linalg.norm(mean[None, :, :2] - target[:, None, :], axis=2), axis=1)
    rim_top, rim_bottom = (mouth_row + 1) * nx + np.arange(7, 10), mouth_row * nx + np.arange(7, 10)
    landmarks[[60, 61, 62, 63, 64]] = [rim_top[0], rim_top[0], rim_top[1], rim_top[2], rim_top[2]]
    landmarks[[65, 66, 67]] = [rim_bottom[2], rim_bottom[1], rim_bottom[0]]
    basis = lambda k, s: (rng.standard_normal((k, 3 * V)) * s).astype(np.float32)  # noqa: E731
    return FaceModel(mean, np.array(tri, np.int32), basis(4, 0.05), np.ones(4, np.float32), basis(2, 0.05),
                     np.ones(2, np.float32), np.full((V, 3), 0.6, np.float32), basis(3, 0.003),
                     np.ones(3, np.float32), landmarks=landmarks, symmetry=symmetry)


def test_gpu_path_matches_the_cpu_in_emulation(monkeypatch, rng, tol):
    from tests.fake_cupy import assert_all_computed, install  # noqa: PLC0415

    model = _tiny_face_model(rng)
    want = SyntheticFaces(model, resolution=(20, 16)).batch([3, 8])
    assert want.mask.mean() > 0.3
    gpu = install(monkeypatch, compute=True)
    faces = SyntheticFaces(model.to("gpu"), resolution=(20, 16))
    assert faces._mouth_loop is not None
    got = faces.batch([3, 8])
    for name in ("images", "coverage", "landmarks", "vertices", "albedo", "detail_vertices", "detail_albedo",
                 "background"):
        a = getattr(got, name)
        assert type(a).__module__.startswith("cupy"), name
        np.testing.assert_allclose(a.get(), getattr(want, name), rtol=tol["pipeline_gpu_cpu_rtol"],
                                   atol=tol["pipeline_gpu_cpu_atol"], err_msg=name)
    np.testing.assert_array_equal(got.mask.get(), want.mask)
    for name in ("shape", "expression", "albedo", "sh", "angles", "translation"):
        np.testing.assert_array_equal(getattr(got.params, name).get(), getattr(want.params, name))
    assert_all_computed(gpu, "morphable_fwd_gemv", "sh_shade_fwd", "rasterize_resolve", "project_to_pixels_fwd")


def test_batched_lighting_equals_directional_sh_and_is_lit_from_the_front():
    rng = np.random.default_rng(3)
    direction = rng.normal(size=(4, 3))
    tint, ambient_tint = rng.uniform(0.9, 1.1, (4, 3)), rng.uniform(0.9, 1.1, (4, 3))
    intensity, ambient = rng.uniform(0.3, 0.9, 4), rng.uniform(0.3, 0.6, 4)
    got = synthetic._directional_sh_batch(direction, intensity, ambient, tint, ambient_tint)
    for b in range(4):
        np.testing.assert_allclose(got[b], synthetic.directional_sh(direction[b], intensity[b], ambient[b], tint[b],
                                                                    ambient_tint[b]), rtol=1e-12)
    # Ambient 1, no directional light: colour = albedo (docs/conventions.md).
    np.testing.assert_allclose(synthetic.directional_sh((0, 0, 1), 0.0, 1.0), fastface.uniform_light(1)[0],
                               rtol=1e-5)


def test_a_model_without_expressions_or_albedo_basis_and_no_supersampling(model):
    bare = model.truncated(n_shape=10, n_expression=0, n_albedo=0)
    bare.symmetry = None
    faces = SyntheticFaces(bare, resolution=(32, 32), supersample=1)
    b = faces.batch([0, 1])
    assert b.params.expression.shape == (2, 0) and b.params.albedo.shape == (2, 0)
    assert np.isfinite(b.images).all() and 0.15 < b.mask.mean() < 0.7
    assert set(np.unique(b.coverage)) <= {0.0, 1.0}  # one sample per pixel: no partial coverage
    assert np.abs(b.detail_albedo).max() > 0  # reflectance detail even without an albedo basis


def test_the_held_back_geometry_is_smooth_and_not_gathered_on_the_outline(model, faces):
    held = np.asarray(faces.detail_geometry_basis[:synthetic.N_HELD_BACK_GEOMETRY], np.float64)
    fields = held.reshape(len(held), model.n_vertices, 3)
    laplacian = model.laplacian().astype(np.float64)
    # |L f| / |f|: the model's own identity rows measure 0.15, its expression rows 0.31; the plain
    # projection of smooth fields out of the span measured 0.56.
    roughness = [np.linalg.norm(laplacian @ f) / np.linalg.norm(f) for f in fields]
    assert np.mean(roughness) < 0.35 and max(roughness) < 0.5, roughness
    # Three in four mirror-symmetric, the fourth antisymmetric (the corrective space is regularised
    # toward symmetry; faces are mostly symmetric).
    mirrored = synthetic._mirror(fields, model.symmetry, True)
    sign = np.where(np.arange(len(fields)) % 4 == 3, -1.0, 1.0)[:, None, None]
    np.testing.assert_allclose(mirrored, sign * fields, atol=1e-6 * np.abs(fields).max())
    size = np.linalg.norm(fields, axis=2)
    assert (size.max(axis=1) / np.sqrt((size ** 2).mean(axis=1))).max() < 5.0
    near = synthetic._outline_distance(model.mean_shape.astype(np.float64), model.triangles) < 8.0
    share = (size[:, near] ** 2).sum(axis=1) / (size ** 2).sum(axis=1)
    assert share.mean() < 2 * near.mean(), (share.mean(), near.mean())  # no more than twice its area's share


def test_the_detail_dictionaries_rebuild_bit_for_bit(model, faces):
    rebuilt = synthetic._build_detail(model, 0)
    np.testing.assert_array_equal(rebuilt.geometry, faces.detail_geometry_basis)
    np.testing.assert_array_equal(rebuilt.albedo, faces.detail_albedo_basis)
    assert rebuilt.geometry_kinds == faces.detail_geometry_kinds


def test_the_population_offset_is_in_every_face_and_outside_the_span(model):
    with_population = SyntheticFaces(model, resolution=(32, 32)).batch(TRAIN_SEEDS[:3])
    without = SyntheticFaces(model, resolution=(32, 32), population=False).batch(TRAIN_SEEDS[:3])
    offset = with_population.detail_vertices - without.detail_vertices
    np.testing.assert_allclose(offset, np.broadcast_to(offset[:1], offset.shape), atol=1e-4)
    rms = np.sqrt((offset[0].astype(np.float64) ** 2).sum(-1).mean())
    assert abs(rms - synthetic.POPULATION_GEOMETRY_RMS) < 1e-3 * synthetic.POPULATION_GEOMETRY_RMS
    basis = np.concatenate([model.shape_basis, model.expression_basis]).astype(np.float64)
    q, _ = np.linalg.qr(basis.T)
    flat = offset[0].reshape(-1).astype(np.float64)
    assert np.linalg.norm(q.T @ flat) < 1e-3 * np.linalg.norm(flat)
    albedo_offset = with_population.detail_albedo - without.detail_albedo
    assert np.sqrt((albedo_offset[0] ** 2).sum(-1).mean()) == pytest.approx(synthetic.POPULATION_ALBEDO_RMS, rel=1e-3)
