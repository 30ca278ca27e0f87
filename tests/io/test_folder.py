"""FaceFolder: pairs photos with .pts files, crops to a framing, and names every bad file."""
import os
import shutil

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from fastface.data.folder import FaceFolder, framing_landmarks  # noqa: E402
from fastface.io import read_pts, write_pts  # noqa: E402


def _face_like(tmp_path, stem, rng, size=(120, 100)):
    """A photo with 68 'landmarks' drawn as white dots on black, and its .pts file."""
    h, w = size
    lm = np.stack([rng.uniform(25, w - 25, 68), rng.uniform(25, h - 25, 68)], axis=1).round()
    img = np.zeros((h, w, 3), np.uint8)
    for x, y in lm.astype(int):
        img[y, x] = 255
    cv2.imwrite(str(tmp_path / f"{stem}.png"), img)
    write_pts(tmp_path / f"{stem}.pts", lm)
    return lm


def test_pairs_sorted_and_batches_crops_with_landmarks_in_crop_pixels(tmp_path, rng):
    for stem in ("b", "a", "c"):
        _face_like(tmp_path, stem, rng)
    (tmp_path / "notes.txt").write_text("not a photo")
    folder = FaceFolder(tmp_path, (48, 40))
    assert len(folder) == 3
    assert [os.path.basename(p) for p, _ in folder.items] == ["a.png", "b.png", "c.png"]
    images, landmarks = folder.batch([2, 0])
    assert images.shape == (2, 48, 40, 3) and images.dtype == np.float32
    assert landmarks.shape == (2, 68, 2) and landmarks.dtype == np.float32
    _, lm_c, crop_c = folder.crop(2)
    np.testing.assert_allclose(landmarks[0], lm_c)
    np.testing.assert_allclose(crop_c.invert(lm_c), read_pts(tmp_path / "c.pts"), atol=1e-3)


def test_target_landmarks_framing_puts_the_landmarks_on_the_target(tmp_path, rng):
    lm = _face_like(tmp_path, "a", rng)
    target = (lm - lm.mean(axis=0)) * 0.5 + 32.0  # the same face, half size, centred in 64x64
    folder = FaceFolder(tmp_path, 64, target_landmarks=target)
    _, landmarks = folder.batch([0])
    np.testing.assert_allclose(landmarks[0], target, atol=1e-3)


def test_framing_from_focal_and_translation_uses_the_mean_face(tmp_path, rng):
    from fastface.model import FaceModel
    model = FaceModel.default("small")
    target = framing_landmarks(model, (64, 64), 180.0, (0.0, 0.0, -600.0))
    assert target.shape == (68, 2)
    assert np.all((target > 0) & (target < 63))
    # a frontal face at the optical axis: the landmarks' mean lies near the image centre
    assert np.all(np.abs(target.mean(axis=0) - 31.5) < 12)
    _face_like(tmp_path, "a", rng)
    folder = FaceFolder(tmp_path, 64, framing=(180.0, (0.0, 0.0, -600.0)), model=model)
    np.testing.assert_allclose(folder.target_landmarks, target)


def test_missing_folder_empty_folder_and_file_instead_of_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FaceFolder(tmp_path / "nowhere", 64)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"empty: no photos"):
        FaceFolder(empty, 64)
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"file\.png: not a folder"):
        FaceFolder(f, 64)


def test_photo_without_pts_is_named(tmp_path, rng):
    _face_like(tmp_path, "a", rng)
    os.remove(tmp_path / "a.pts")
    with pytest.raises(ValueError, match=r"without a \.pts file.*a\.png"):
        FaceFolder(tmp_path, 64)


def test_67_point_pts_is_named_when_the_folder_opens(tmp_path, rng):
    _face_like(tmp_path, "a", rng)
    lm = _face_like(tmp_path, "b", rng)
    write_pts(tmp_path / "b.pts", lm[:67])
    with pytest.raises(ValueError, match=r"b\.pts.*expected 68 points; the file has 67"):
        FaceFolder(tmp_path, 64)


def test_unreadable_photos_are_named_in_batch(tmp_path, rng):
    lm = _face_like(tmp_path, "a", rng)
    (tmp_path / "b.jpg").write_text("not a jpeg at all")
    write_pts(tmp_path / "b.pts", lm)
    ok, buf = cv2.imencode(".jpg", np.full((120, 100, 3), 128, np.uint8))
    (tmp_path / "c.jpg").write_bytes(buf.tobytes()[:300])
    write_pts(tmp_path / "c.pts", lm)
    folder = FaceFolder(tmp_path, 32)
    folder.batch([0])
    with pytest.raises(ValueError, match=r"b\.jpg.*not an image"):
        folder.batch([0, 1])
    with pytest.raises(ValueError, match=r"c\.jpg.*truncated JPEG"):
        folder.batch([2])
    with pytest.raises(IndexError, match="out of range"):
        folder.batch([3])


def test_the_real_photos_folder(photos, tmp_path):
    folder = FaceFolder(os.path.dirname(photos[0][0]), 96, scale=1.6)
    assert len(folder) == len(photos)
    images, landmarks = folder.batch(range(len(folder)))
    assert images.shape == (len(photos), 96, 96, 3)
    # bounding-box framing: every landmark inside the crop, their box centred
    assert (landmarks > 0).all() and (landmarks < 95).all()
    centre = (landmarks.min(axis=1) + landmarks.max(axis=1)) / 2
    np.testing.assert_allclose(centre, 47.5, atol=1e-3)


def test_a_copied_real_photo_with_a_pts_of_another_photo_is_named(photos, tmp_path):
    small = min(photos, key=lambda p: os.path.getsize(p[0]))
    shutil.copy(small[0], tmp_path / ("x" + os.path.splitext(small[0])[1]))
    image = cv2.imread(small[0])
    # Another photo's landmarks, moved so that they certainly lie beyond this photo's right edge.
    other = read_pts(next(p for p in photos if p != small)[1])
    other[:, 0] += image.shape[1] + 10 - other[:, 0].min()
    write_pts(tmp_path / "x.pts", other)
    folder = FaceFolder(tmp_path, 32)
    with pytest.raises(ValueError, match=r"x\.pts: the landmarks lie outside"):
        folder.batch([0])
