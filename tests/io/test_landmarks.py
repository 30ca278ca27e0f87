"""iBUG .pts: the 1-based file convention, round trips, and malformed files named with the line."""
import numpy as np
import pytest

from fastface.io import read_pts, write_pts

HEADER = "version: 1\nn_points: {n}\n{{\n"


def _pts_text(points_1based, n=None):
    n = len(points_1based) if n is None else n
    return HEADER.format(n=n) + "".join(f"{x} {y}\n" for x, y in points_1based) + "}\n"


def test_one_based_file_point_is_the_zero_based_pixel_centre(tmp_path):
    # The top-left pixel's centre is (1, 1) on disk and (0, 0) in memory; (11, 21) on disk is
    # column 10, row 20.
    pts = [(1, 1), (11, 21)] + [(5.5, 7.25)] * 66
    path = tmp_path / "hand.pts"
    path.write_text(_pts_text(pts))
    p = read_pts(path)
    assert p.dtype == np.float32 and p.shape == (68, 2)
    np.testing.assert_array_equal(p[0], [0, 0])
    np.testing.assert_array_equal(p[1], [10, 20])
    np.testing.assert_array_equal(p[2], [4.5, 6.25])


def test_write_pts_writes_the_real_format_one_based(tmp_path):
    points = np.zeros((68, 2), np.float32)
    points[1] = (10, 20)
    path = tmp_path / "out.pts"
    write_pts(path, points)
    lines = path.read_text().splitlines()
    assert lines[:3] == ["version: 1", "n_points: 68", "{"]
    assert lines[3] == "1.000000 1.000000"
    assert lines[4] == "11.000000 21.000000"
    assert lines[-1] == "}" and len(lines) == 68 + 4


def test_round_trip_is_exact_to_six_decimals(tmp_path, rng):
    points = rng.uniform(-5, 900, size=(68, 2)).astype(np.float32)
    path = tmp_path / "rt.pts"
    write_pts(path, points)
    np.testing.assert_allclose(read_pts(path), points, atol=1e-4)


def test_crlf_and_comments_and_other_counts_with_n_points_none(tmp_path):
    path = tmp_path / "five.pts"
    path.write_bytes(_pts_text([(1, 2)] * 5).replace("\n", "\r\n").encode())
    assert read_pts(path, n_points=None).shape == (5, 2)


def test_67_points_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "short.pts"
    path.write_text(_pts_text([(1, 1)] * 67))
    with pytest.raises(ValueError, match=r"short\.pts.*expected 68 points; the file has 67"):
        read_pts(path)


def test_header_count_disagreeing_with_points_is_refused(tmp_path):
    path = tmp_path / "lie.pts"
    path.write_text(_pts_text([(1, 1)] * 67, n=68))
    with pytest.raises(ValueError, match=r"lie\.pts.*declares n_points: 68 but the file has 67"):
        read_pts(path)


def test_garbage_line_is_named_with_its_line_number(tmp_path):
    lines = _pts_text([(1, 1)] * 68).splitlines()
    lines[10] = "12.5 banana"
    path = tmp_path / "bad.pts"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"bad\.pts, line 11: expected two numbers"):
        read_pts(path)


def test_missing_braces_are_refused(tmp_path):
    no_open = tmp_path / "noopen.pts"
    no_open.write_text("version: 1\nn_points: 68\n" + "1 1\n" * 68 + "}\n")
    with pytest.raises(ValueError, match=r"noopen\.pts, line 3: expected a header line"):
        read_pts(no_open)
    no_close = tmp_path / "noclose.pts"
    no_close.write_text(_pts_text([(1, 1)] * 68).replace("}\n", ""))
    with pytest.raises(ValueError, match=r"noclose\.pts, line 71: the file ends without the closing"):
        read_pts(no_close)


def test_binary_and_missing_files(tmp_path):
    binary = tmp_path / "pic.pts"
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x80\x81")
    with pytest.raises(ValueError, match=r"pic\.pts"):
        read_pts(binary)
    with pytest.raises(FileNotFoundError, match=r"gone\.pts"):
        read_pts(tmp_path / "gone.pts")
    empty = tmp_path / "empty.pts"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.pts"):
        read_pts(empty)


def test_write_pts_refuses_bad_points(tmp_path):
    with pytest.raises(ValueError, match="points"):
        write_pts(tmp_path / "x.pts", np.zeros((68, 3)))
    with pytest.raises(ValueError, match="finite"):
        write_pts(tmp_path / "x.pts", np.full((68, 2), np.nan))


def test_every_real_pts_parses_to_68_points_inside_its_photo(photos):
    import cv2
    for image_path, pts_path in photos:
        p = read_pts(pts_path)
        assert p.shape == (68, 2), pts_path
        h, w = cv2.imread(image_path, cv2.IMREAD_UNCHANGED).shape[:2]
        # shared/data/faces/README.md: 0.5 <= x <= W + 0.5 one-based, so -0.5..W-0.5 zero-based
        assert p[:, 0].min() >= -0.5 and p[:, 0].max() <= w - 0.5, pts_path
        assert p[:, 1].min() >= -0.5 and p[:, 1].max() <= h - 0.5, pts_path
