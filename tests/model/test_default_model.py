"""The generated default face model: determinism, sizes, mesh quality, symmetry, landmarks, bases."""
import hashlib
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fastface.model import IBUG68_GROUPS, IBUG68_MIRROR, FaceModel


def model_hash(model):
    h = hashlib.sha256()
    for a in (model.mean_shape, model.mean_albedo, model.triangles, model.shape_basis, model.shape_std,
              model.expression_basis, model.expression_std, model.albedo_basis, model.albedo_std, model.landmarks,
              model.symmetry):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def small():
    return FaceModel.default(level="small")


@pytest.fixture(scope="module")
def full():
    return FaceModel.default()


def expression(model, name, amount=1.0):
    k = model.expression_names.index(name)
    return (amount * model.expression_std[k] * model.expression_basis[k].astype(np.float64)).reshape(-1, 3)


def test_default_model_is_the_same_twice_and_in_another_process(small):
    again = FaceModel.default(level="small")
    assert model_hash(again) == model_hash(small)
    code = ("from fastface.model import FaceModel; from tests.model.test_default_model import model_hash; "
            "print(model_hash(FaceModel.default(level='small')))")
    repo = pathlib.Path(__file__).resolve().parents[2]
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert other.stdout.strip() == model_hash(small)


def test_default_arrays_are_read_only(small):
    for a in (small.mean_shape, small.triangles, small.shape_basis, small.landmarks):
        assert not a.flags.writeable
    with pytest.raises(ValueError):
        small.mean_shape[0, 0] = 1.0


def test_default_level_has_about_35k_vertices_and_70k_triangles(full):
    assert 33_000 <= full.n_vertices <= 37_000
    assert 66_000 <= full.n_triangles <= 74_000


def test_small_level_has_about_5k_vertices(small):
    assert 4_500 <= small.n_vertices <= 5_500


def test_component_counts_and_expression_names(small):
    assert (small.n_shape, small.n_expression, small.n_albedo) == (80, 64, 80)
    assert len(small.expression_names) == 64
    for name in ("jaw_open", "smile", "lip_pucker", "brows_up", "brows_down", "eyes_closed"):
        assert name in small.expression_names


@pytest.mark.parametrize("level", ["small", "default"])
def test_face_is_metric_and_centred(level, small, full):
    model = small if level == "small" else full
    v = model.mean_shape.astype(np.float64)
    width, height = np.ptp(v[:, 0]), np.ptp(v[:, 1])
    assert 130 <= width <= 150 and 175 <= height <= 200
    assert np.abs(v.mean(axis=0)).max() < 1e-3
    tip = model.landmarks[30]
    assert v[tip, 2] >= np.quantile(v[:, 2], 0.999)  # the nose tip stands out furthest


@pytest.mark.parametrize("level", ["small", "default"])
def test_triangles_wind_counter_clockwise_seen_from_the_front(level, small, full):
    model = small if level == "small" else full
    p = model.mean_shape.astype(np.float64)[model.triangles]
    n = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    assert np.all(n[:, 2] > 0)  # a height field over (x, y): every triangle faces +z
    assert np.all(np.linalg.norm(n, axis=1) > 1e-6)  # no degenerate triangle


def test_each_edge_is_shared_by_at_most_two_triangles(small):
    tri = small.triangles.astype(np.int64)
    e = np.sort(np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]]), axis=1)
    _, counts = np.unique(e, axis=0, return_counts=True)
    assert counts.max() <= 2
    # Oriented edges appear once each: consistent winding across every shared edge.
    directed = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]])
    assert np.unique(directed, axis=0).shape[0] == directed.shape[0]
    used = np.zeros(small.n_vertices, bool)
    used[tri.ravel()] = True
    assert used.all()


def test_symmetry_is_an_involution_that_mirrors_positions_and_colours(small):
    s = small.symmetry
    assert np.array_equal(s[s], np.arange(small.n_vertices))
    mirrored = small.mean_shape[s] * np.array([-1, 1, 1], np.float32)
    assert np.array_equal(mirrored, small.mean_shape)
    assert np.array_equal(small.mean_albedo[s], small.mean_albedo)


def test_mouth_slit_twins_share_positions_in_the_mean_face(small):
    _, first, counts = np.unique(small.mean_shape, axis=0, return_index=True, return_counts=True)
    twins = counts[counts > 1]
    assert twins.size >= 10 and twins.max() == 2  # the lip line's vertices are doubled, nothing else
    doubled = small.mean_shape[first[counts > 1]]
    assert np.ptp(doubled[:, 1]) < 1e-4  # all on one row: the lip line


def test_landmarks_mirror_through_the_symmetry_map(small):
    lm = small.landmarks
    assert np.array_equal(small.symmetry[lm], lm[IBUG68_MIRROR])


@pytest.mark.parametrize("level", ["small", "default"])
def test_landmarks_sit_in_their_anatomical_order(level, small, full):
    model = small if level == "small" else full
    p = model.mean_shape.astype(np.float64)[model.landmarks]
    x, y = p[:, 0], p[:, 1]
    jaw = list(IBUG68_GROUPS["jaw"])
    assert np.all(np.diff(x[jaw]) >= 0) and x[0] < x[8] < x[16]  # image left to image right
    assert np.all(np.diff(y[0:9]) < 0) and np.all(np.diff(y[8:17]) > 0)  # down to the chin, then up
    assert x[36] < x[39] < x[42] < x[45]  # eye corners, left to right
    assert min(y[17:27]) > max(y[36:48])  # brows above the eyes
    assert np.all(np.diff(y[27:31]) < 0)  # the nose bridge runs down to the tip
    assert p[30, 2] == p[:, 2].max()  # the nose tip is the landmark furthest forward
    assert max(y[48:68]) < min(y[31:36])  # mouth below the nose
    assert y[51] > y[62] >= y[66] > y[57]  # upper lip over lower lip
    assert x[48] < x[51] < x[54] and x[60] < x[62] < x[64]
    assert y[37] > y[41] and y[44] > y[46]  # upper lids over lower lids


def test_bases_are_orthonormal_and_std_decreases(small):
    for basis in (small.shape_basis, small.expression_basis, small.albedo_basis):
        b = basis.astype(np.float64)
        assert np.abs(b @ b.T - np.eye(len(b))).max() < 1e-4
    for std in (small.shape_std, small.albedo_std):
        assert np.all(np.diff(std) < 0)
    assert np.all(small.expression_std > 0)


def test_one_std_of_identity_is_a_plausible_change(small):
    rms = np.sqrt(np.sum(small.shape_std[:, None] ** 2 * small.shape_basis.astype(np.float64) ** 2, axis=1)
                  / small.n_vertices)
    assert 1.0 < rms[0] < 8.0  # millimetres per vertex, RMS
    assert rms[-1] < rms[0] / 5


def test_jaw_open_moves_chin_and_lower_lip_but_not_forehead(small):
    d = expression(small, "jaw_open")
    lm = small.landmarks
    y = small.mean_shape[:, 1]
    assert d[lm[8], 1] < -5 and d[lm[57], 1] < -5 and d[lm[66], 1] < -5  # chin and lower lip go down
    assert np.abs(d[y > 40]).max() < 0.05  # forehead and brows stay
    assert abs(d[lm[62], 1]) < 0.5 * abs(d[lm[66], 1])  # the mouth opens: the lower lip leaves the upper
    assert np.abs(d[lm[36]]).max() < 0.05


def test_smile_raises_the_mouth_corners(small):
    d = expression(small, "smile")
    lm = small.landmarks
    assert d[lm[48], 1] > 1 and d[lm[54], 1] > 1
    assert d[lm[54], 0] > 0 > d[lm[48], 0]  # and pulls them apart
    assert np.abs(d[small.mean_shape[:, 1] > 45]).max() < 0.05


def test_eyes_closed_brings_the_upper_lids_onto_the_lower_lids(small):
    d = expression(small, "eyes_closed")
    p = small.mean_shape.astype(np.float64)[small.landmarks] + d[small.landmarks]
    assert abs(p[37, 1] - p[41, 1]) < 1.5 and abs(p[44, 1] - p[46, 1]) < 1.5
    assert np.abs(d[small.mean_shape[:, 1] < 0]).max() < 0.05  # nothing below the cheeks moves


def test_brows_up_moves_brows_not_chin(small):
    d = expression(small, "brows_up")
    lm = small.landmarks
    assert d[lm[19], 1] > 2 and d[lm[24], 1] > 2
    assert np.abs(d[small.mean_shape[:, 1] < -20]).max() < 0.05


def test_asymmetric_expressions_are_mirror_antisymmetric(small):
    s = small.symmetry
    flip = np.array([-1, 1, 1])
    d = expression(small, "smile_asymmetric")
    assert np.allclose(d[s] * flip, -d, atol=1e-3)
    d = expression(small, "smile")
    assert np.allclose(d[s] * flip, d, atol=1e-3)


def test_mean_albedo_is_skin_with_redder_lips_and_darker_brows(small):
    a = small.mean_albedo.astype(np.float64)
    lm = small.landmarks
    cheek = a[np.argmin(np.hypot(small.mean_shape[:, 0] - 45, small.mean_shape[:, 1] + 20))]
    assert cheek[0] > cheek[1] > cheek[2] and 0.5 < cheek[0] < 0.95  # a skin tone
    lower_lip = small.mean_shape[lm[57]] + np.array([0, 4, 0], np.float32)  # inside the lower lip
    lip = a[np.argmin(np.linalg.norm(small.mean_shape[:, :2] - lower_lip[:2], axis=1))]
    assert lip[0] / lip[1] > cheek[0] / cheek[1]  # redder
    brow = a[lm[19]]
    assert brow.sum() < 0.7 * cheek.sum()  # darker
    assert np.all((a >= 0) & (a <= 1))
