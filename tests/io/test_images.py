"""read_image: colour order, depth, grey, alpha, EXIF orientation, and bad files named."""
import os
import struct

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from fastface.io import read_image  # noqa: E402
from tests.io.conftest import face_photos  # noqa: E402


def _pattern(h=12, w=20):
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def test_png_colour_order_is_rgb(tmp_path):
    rgb = _pattern()
    path = tmp_path / "a.png"
    cv2.imwrite(str(path), rgb[:, :, ::-1])  # cv2 writes BGR
    out = read_image(path)
    assert out.dtype == np.float32 and out.shape == rgb.shape
    np.testing.assert_array_equal(np.round(out * 255).astype(np.uint8), rgb)


def test_16bit_png_is_scaled_by_65535(tmp_path):
    rng = np.random.default_rng(3)
    rgb16 = rng.integers(0, 65536, size=(9, 7, 3), dtype=np.uint16)
    path = tmp_path / "deep.png"
    cv2.imwrite(str(path), rgb16[:, :, ::-1])
    out = read_image(path)
    np.testing.assert_allclose(out, rgb16.astype(np.float64) / 65535, atol=1e-7)


def test_grey_image_becomes_three_equal_channels(tmp_path):
    grey = _pattern()[:, :, 0]
    path = tmp_path / "g.png"
    cv2.imwrite(str(path), grey)
    out = read_image(path)
    assert out.shape == grey.shape + (3,)
    for c in range(3):
        np.testing.assert_array_equal(np.round(out[:, :, c] * 255), grey)


def test_alpha_channel_is_dropped(tmp_path):
    rgb = _pattern()
    bgra = np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 17, np.uint8)])
    path = tmp_path / "alpha.png"
    cv2.imwrite(str(path), bgra)
    out = read_image(path)
    assert out.shape == rgb.shape
    np.testing.assert_array_equal(np.round(out * 255).astype(np.uint8), rgb)


def _with_exif_orientation(jpeg, orientation):
    """Inserts an APP1 Exif segment holding only the Orientation tag (0x0112) after SOI."""
    ifd = struct.pack("<H", 1) + struct.pack("<HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack("<I", 0)
    tiff = b"II*\x00" + struct.pack("<I", 8) + ifd
    payload = b"Exif\x00\x00" + tiff
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return jpeg[:2] + app1 + jpeg[2:]


def test_exif_orientation_is_applied(tmp_path):
    # A left half black, right half white picture, stored with orientation 6 ("rotate 90 degrees
    # clockwise to display"): the upright image is taller than wide, black on top.
    img = np.zeros((40, 64, 3), np.uint8)
    img[:, 32:] = 255
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_with_exif_orientation(buf.tobytes(), 6))
    out = read_image(path)
    assert out.shape == (64, 40, 3)
    assert out[:20].mean() < 0.1 and out[-20:].mean() > 0.9


def _cut_jpeg(tmp_path):
    pairs = [p for p, _ in face_photos() if p.endswith(".jpg")]
    if pairs:
        data = open(pairs[0], "rb").read()
    else:
        ok, buf = cv2.imencode(".jpg", _pattern(200, 200))
        data = buf.tobytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def test_truncated_jpeg_is_refused_naming_the_file(tmp_path):
    path = _cut_jpeg(tmp_path)
    with pytest.raises(ValueError, match=r"cut\.jpg.*truncated JPEG"):
        read_image(path)


def test_truncated_png_is_refused_naming_the_file(tmp_path):
    ok, buf = cv2.imencode(".png", _pattern(100, 100))
    path = tmp_path / "cut.png"
    path.write_bytes(buf.tobytes()[:-30])
    with pytest.raises(ValueError, match=r"cut\.png.*truncated PNG"):
        read_image(path)


def test_missing_file_is_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.jpg"):
        read_image(tmp_path / "nothere.jpg")


def test_directory_empty_file_and_non_image_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"is a directory"):
        read_image(tmp_path)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.png.*empty"):
        read_image(empty)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n" * 20)
    with pytest.raises(ValueError, match=r"notes\.jpg.*not an image"):
        read_image(text)


def test_every_real_photo_reads(photos):
    for image_path, _ in photos:
        out = read_image(image_path)
        assert out.dtype == np.float32 and out.ndim == 3 and out.shape[2] == 3, image_path
        assert 0 <= out.min() and out.max() <= 1 and out.max() > 0.5, image_path


def test_einstein_is_grey_on_disk_and_read_as_three_equal_channels(photos):
    path = [p for p, _ in photos if os.path.basename(p) == "einstein.jpg"]
    if not path:
        pytest.skip("einstein.jpg is not among the photos")
    raw = cv2.imread(path[0], cv2.IMREAD_UNCHANGED)
    assert raw.ndim == 2
    out = read_image(path[0])
    assert out.shape == raw.shape + (3,)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])


@pytest.mark.parametrize("params", [[], [cv2.IMWRITE_JPEG_PROGRESSIVE, 1], [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]],
                         ids=["baseline", "progressive", "restart-markers"])
def test_jpeg_kinds_read_whole_and_refused_at_every_cut(tmp_path, params):
    img = _pattern(64, 80)
    ok, buf = cv2.imencode(".jpg", img, params)
    data = buf.tobytes()
    path = tmp_path / "kind.jpg"
    path.write_bytes(data)
    assert read_image(path).shape == (64, 80, 3)
    for cut in (len(data) - 1, len(data) - 2, len(data) * 3 // 4, len(data) // 3, 40):
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"kind\.jpg.*truncated JPEG"):
            read_image(path)


def test_jpeg_with_data_after_its_end_marker_reads(tmp_path):
    # Motion photos append a whole video after the JPEG's end-of-image marker.
    rgb = _pattern(30, 40)
    ok, jpeg = cv2.imencode(".jpg", rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])
    path = tmp_path / "motion.jpg"
    path.write_bytes(jpeg.tobytes() + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 400)
    plain = tmp_path / "plain.jpg"
    plain.write_bytes(jpeg.tobytes())
    np.testing.assert_array_equal(read_image(path), read_image(plain))


def test_unicode_file_name(tmp_path):
    rgb = _pattern()
    path = tmp_path / "visage_é_顔.png"
    cv2.imencode(".png", rgb[:, :, ::-1])[1].tofile(str(path))
    np.testing.assert_array_equal(np.round(read_image(path) * 255).astype(np.uint8), rgb)


def test_write_image_round_trips_png_8_and_16_bit(tmp_path, rng):
    from fastface.io import write_image
    rgb = rng.integers(0, 256, size=(10, 12, 3)).astype(np.float32) / 255
    write_image(tmp_path / "a.png", rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), rgb)
    deep = rng.integers(0, 65536, size=(10, 12, 3)).astype(np.float64) / 65535
    write_image(tmp_path / "d.png", deep, bits=16)
    np.testing.assert_allclose(read_image(tmp_path / "d.png"), deep, atol=1e-7)
    write_image(tmp_path / "g.jpg", np.full((8, 8), 0.5, np.float32))
    assert abs(read_image(tmp_path / "g.jpg").mean() - 0.5) < 0.01


def test_write_image_bad_arguments_are_named(tmp_path):
    from fastface.io import write_image
    with pytest.raises(ValueError, match=r"x\.gif"):
        write_image(tmp_path / "x.gif", np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="image"):
        write_image(tmp_path / "x.png", np.zeros((4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="16-bit"):
        write_image(tmp_path / "x.jpg", np.zeros((4, 4, 3), np.float32), bits=16)
    assert not list(tmp_path.iterdir())


def test_16bit_grey_and_rgba_and_float_tiff(tmp_path):
    g16 = (np.arange(20 * 30).reshape(20, 30) * 100).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), g16)
    out = read_image(tmp_path / "g16.png")
    np.testing.assert_allclose(out, np.repeat((g16 / 65535)[:, :, None], 3, axis=2), atol=1e-7)
    bgra = np.dstack([g16 // 3, g16 // 2, g16, np.full_like(g16, 7)])
    cv2.imwrite(str(tmp_path / "rgba16.png"), bgra)
    np.testing.assert_allclose(read_image(tmp_path / "rgba16.png")[:, :, 2], (g16 // 3) / 65535, atol=1e-7)
    hdr = np.dstack([g16 / 65535.0 * 1.5] * 3).astype(np.float32)
    cv2.imwrite(str(tmp_path / "f.tiff"), hdr)
    np.testing.assert_allclose(read_image(tmp_path / "f.tiff"), np.clip(hdr, 0, 1))
