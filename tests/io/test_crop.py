"""Crops: the transform is exact, the pixels land where Crop.apply says, the framing is as documented."""
import math

import numpy as np
import pytest

from fastface.io import Crop, crop_from_box, crop_from_landmarks, read_image, read_pts
from fastface.io.crop import fit_similarity, warp


def _dot_image(h, w, row, col, radius=0):
    img = np.zeros((h, w, 3), np.float32)
    img[row - radius:row + radius + 1, col - radius:col + radius + 1] = 1.0
    return img


def _centroid(crop_image):
    weight = crop_image[:, :, 0].astype(np.float64)
    ys, xs = np.mgrid[:weight.shape[0], :weight.shape[1]]
    total = weight.sum()
    return np.array([(xs * weight).sum() / total, (ys * weight).sum() / total])


def test_apply_then_invert_is_identity(rng):
    crop = Crop(scale=0.37, translation=(12.5, -40.25), size=(64, 48), rotation=0.3)
    p = rng.uniform(-100, 1000, size=(5, 68, 2))
    np.testing.assert_allclose(crop.invert(crop.apply(p)), p, rtol=0, atol=1e-9)
    p32 = p.astype(np.float32)
    assert crop.apply(p32).dtype == np.float32


def test_apply_is_scale_rotation_translation():
    crop = Crop(scale=2.0, translation=(1.0, 3.0), size=(8, 8), rotation=math.pi / 2)
    # R(90 deg) sends x to y: (1, 0) -> (0, 1) -> scaled (0, 2) -> translated (1, 5)
    np.testing.assert_allclose(crop.apply(np.array([[1.0, 0.0]])), [[1.0, 5.0]], atol=1e-12)


def test_a_dot_is_copied_exactly_by_a_whole_pixel_translation():
    row, col = 70, 91
    image = _dot_image(160, 200, row, col, radius=2)
    crop = Crop(scale=1.0, translation=(-50.0, -40.0), size=(72, 80))
    out = warp(image, crop)
    j, i = crop.apply(np.array([[col, row]], np.float64))[0].astype(int)
    assert out[i, j, 0] == 1.0 and out[i - 2:i + 3, j - 2:j + 3].sum() == 75.0 == out.sum()


@pytest.mark.parametrize("scale", [2.5, 1.0, 0.5, 0.23])
def test_a_blob_lands_where_crop_apply_says(scale):
    # A smooth blob (sigma 3 crop pixels) at a sub-pixel photo position: its centroid in the crop
    # must be Crop.apply of its centre. (A one-pixel dot would measure the discretisation of the
    # area average instead.)
    centre = np.array([91.3, 70.6])  # x, y photo pixels
    sigma = 3.0 / scale
    h, w = int(centre[1] + 8 * sigma), int(centre[0] + 8 * sigma)
    ys, xs = np.mgrid[:h, :w]
    blob = np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma ** 2)).astype(np.float32)
    image = np.repeat(blob[:, :, None], 3, axis=2)
    crop = Crop(scale=scale, translation=(40.3 - scale * 91, 35.55 - scale * 70), size=(72, 80))
    out = warp(image, crop)
    expect = crop.apply(centre[None])[0]
    # warpAffine rounds sample positions to 1/32 pixel
    np.testing.assert_allclose(_centroid(out), expect, atol=1 / 32)


def test_downscaling_averages_instead_of_skipping():
    # a one-pixel checkerboard shrunk 4x must come out uniform grey, not aliased
    ys, xs = np.mgrid[:400, :400]
    board = np.repeat(((ys + xs) % 2).astype(np.float32)[:, :, None], 3, axis=2)
    crop = Crop(scale=0.25, translation=(-10.0, -10.0), size=(50, 50))  # inside the board
    out = warp(board, crop)
    assert abs(out.mean() - 0.5) < 0.01 and out.std() < 0.02


def test_crop_from_landmarks_maps_landmarks_exactly_and_frames_the_box(rng):
    image = rng.uniform(0, 1, size=(300, 400, 3)).astype(np.float32)
    lm = rng.uniform([100, 80], [220, 240], size=(68, 2))
    crop_image, crop = crop_from_landmarks(image, lm, (96, 128))
    assert crop_image.shape == (96, 128, 3) and crop_image.dtype == np.float32
    q = crop.apply(lm)
    lo, hi = q.min(axis=0), q.max(axis=0)
    np.testing.assert_allclose((lo + hi) / 2, [(128 - 1) / 2, (96 - 1) / 2], atol=1e-9)
    assert math.isclose(max(hi - lo) * 1.6, 96, rel_tol=1e-9)


def test_target_landmarks_fit_is_exact_for_a_similar_copy(rng):
    target = rng.uniform(20, 100, size=(68, 2))
    s, t = 3.7, np.array([150.0, 90.0])
    photo_lm = (target - t) / s  # the photo's landmarks are a scaled, shifted copy
    image = np.zeros((300, 300, 3), np.float32)
    _, crop = crop_from_landmarks(image, photo_lm, 128, target_landmarks=target)
    np.testing.assert_allclose(crop.apply(photo_lm), target, atol=1e-9)
    assert crop.rotation == 0.0


def test_target_fit_with_rotation_recovers_the_rotation(rng):
    target = rng.uniform(20, 100, size=(68, 2))
    theta = 0.4
    r = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    photo_lm = (target - 5.0) @ r  # target = R^-1 applied... photo = R^T (target - 5)
    s, angle, t = fit_similarity(photo_lm, target, rotation=True)
    assert math.isclose(s, 1.0, rel_tol=1e-12) and math.isclose(angle, theta, rel_tol=1e-12)
    s0, angle0, _ = fit_similarity(photo_lm, target, rotation=False)
    assert angle0 == 0.0


def test_crop_from_box_frames_like_the_landmark_estimate():
    image = np.zeros((400, 400, 3), np.float32)
    _, crop = crop_from_box(image, (100, 120, 200, 220), 64)
    from fastface.io.crop import BOX_CENTRE_DY, BOX_SIZE
    centre = np.array([149.5, 169.5 + BOX_CENTRE_DY * 100])  # pixels 100..199, 120..219
    np.testing.assert_allclose(crop.apply(centre[None]), [[31.5, 31.5]], atol=1e-9)
    assert math.isclose(crop.scale, 64 / (1.6 * BOX_SIZE * 100), rel_tol=1e-12)


def test_bad_arguments_are_named(rng):
    image = np.zeros((50, 50, 3), np.float32)
    lm = rng.uniform(10, 40, size=(68, 2))
    with pytest.raises(ValueError, match="image"):
        crop_from_landmarks(np.zeros((50, 50)), lm, 32)
    with pytest.raises(ValueError, match="landmarks"):
        crop_from_landmarks(image, lm[:, :1], 32)
    with pytest.raises(ValueError, match="target_landmarks"):
        crop_from_landmarks(image, lm, 32, target_landmarks=lm[:60])
    with pytest.raises((ValueError, TypeError), match="resolution"):
        crop_from_landmarks(image, lm, (0, 32))
    with pytest.raises(ValueError, match="box"):
        crop_from_box(image, (10, 10, 5, 20), 32)
    with pytest.raises(ValueError, match="scale"):
        Crop(scale=-1.0, translation=(0, 0), size=(4, 4))


def test_real_photo_crops_hold_their_landmarks(photos, tmp_path):
    for image_path, pts_path in photos:
        image, lm = read_image(image_path), read_pts(pts_path)
        crop_image, crop = crop_from_landmarks(image, lm, 128)
        q = crop.apply(lm)
        assert (q > 0).all() and (q < 127).all(), image_path
        # the crop shows the photo: the crop pixel nearest the nose tip equals the photo there
        nose = q[30]
        back = crop.invert(np.round(nose)[None])[0]
        assert np.all(np.abs(back - lm[30]) <= 0.5 / crop.scale + 1e-9)


def test_rotation_flag_levels_the_eyes(rng):
    lm = rng.uniform(0, 10, size=(68, 2)) + 100
    lm[36:42] += (-30, 0)  # the eye on the image's left
    lm[42:48] += (30, 0)
    a = 0.3
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    tilted = (lm - 100) @ r.T + 150
    image = np.zeros((300, 300, 3), np.float32)
    _, crop = crop_from_landmarks(image, tilted, 64, rotation=True)
    q = crop.apply(tilted)
    assert abs(q[36:42, 1].mean() - q[42:48, 1].mean()) < 1e-9
    assert q[36:42, 0].mean() < q[42:48, 0].mean()
    _, upright = crop_from_landmarks(image, tilted, 64)
    assert upright.rotation == 0.0


@pytest.mark.gpu
def test_apply_and_invert_keep_cupy_points_on_the_device(rng, cupy):
    crop = Crop(scale=0.5, translation=(3.0, -2.0), size=(64, 64), rotation=0.1)
    p = rng.uniform(0, 500, size=(4, 68, 2)).astype(np.float32)
    q = crop.apply(cupy.asarray(p))
    assert isinstance(q, cupy.ndarray) and q.dtype == np.float32
    np.testing.assert_allclose(q.get(), crop.apply(p), rtol=1e-6, atol=1e-4)
    np.testing.assert_allclose(crop.invert(q).get(), p, rtol=1e-6, atol=1e-3)
