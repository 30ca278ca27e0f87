"""Meshes: OBJ and PLY written in the real formats (checked against files written by hand) and read back."""
import struct

import numpy as np
import pytest

from fastface.io import load_obj, save_obj, save_ply

VERTICES = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1.5]], np.float32)
TRIANGLES = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
COLORS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.5, 0.25, 1]], np.float32)


def _lines(path):
    return [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]


def test_save_obj_writes_one_based_faces_and_colour_extension(tmp_path):
    path = tmp_path / "m.obj"
    save_obj(path, VERTICES, TRIANGLES, COLORS)
    assert _lines(path) == [
        "v 0.000000 0.000000 0.000000 1.000000 0.000000 0.000000",
        "v 1.000000 0.000000 0.000000 0.000000 1.000000 0.000000",
        "v 0.000000 1.000000 0.000000 0.000000 0.000000 1.000000",
        "v 0.000000 0.000000 1.500000 0.500000 0.250000 1.000000",
        "f 1 2 3",
        "f 1 3 4",
    ]
    save_obj(path, VERTICES, TRIANGLES)
    assert _lines(path)[0] == "v 0.000000 0.000000 0.000000"


def test_obj_round_trip(tmp_path, rng):
    v = rng.normal(size=(50, 3)).astype(np.float32) * 80
    t = rng.integers(0, 50, size=(90, 3)).astype(np.int32)
    c = rng.uniform(0, 1, size=(50, 3)).astype(np.float32)
    path = tmp_path / "rt.obj"
    save_obj(path, v, t, c)
    v2, t2, c2 = load_obj(path)
    np.testing.assert_allclose(v2, v, atol=1e-5)
    np.testing.assert_array_equal(t2, t)
    np.testing.assert_allclose(c2, c, atol=1e-6)
    save_obj(path, v, t)
    assert load_obj(path)[2] is None


def test_load_obj_reads_the_forms_of_a_hand_written_file(tmp_path):
    text = """# a quad and a triangle, with texture coordinates and normals
mtllib none.mtl
o thing
v 0 0 0
v 1 0 0
v 1 1 0
v 0 1 0
vt 0 0
vt 1 0
vt 1 1
vn 0 0 1
g quad
usemtl skin
s off
f 1/1/1 2/2/1 3/3/1 4/1/1
v 2 2 2
f -1//1 -4//1 -3//1
f 1/1 3/3 5/2
l 1 2
"""
    path = tmp_path / "hand.obj"
    path.write_text(text)
    v, t, c = load_obj(path)
    assert v.shape == (5, 3) and c is None
    np.testing.assert_array_equal(t, [[0, 1, 2], [0, 2, 3], [4, 1, 2], [0, 2, 4]])


def test_load_obj_bad_lines_are_named(tmp_path):
    path = tmp_path / "bad.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 7\n")
    with pytest.raises(ValueError, match=r"bad\.obj, line 4: vertex index 7 out of range"):
        load_obj(path)
    path.write_text("v 0 0 zero\n")
    with pytest.raises(ValueError, match=r"bad\.obj, line 1: expected 'v x y z'"):
        load_obj(path)
    path.write_text("f 1 2\n")
    with pytest.raises(ValueError, match=r"bad\.obj, line 1: a face needs at least 3"):
        load_obj(path)
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match=r"bad\.obj: no vertices"):
        load_obj(path)
    with pytest.raises(FileNotFoundError, match=r"none\.obj"):
        load_obj(tmp_path / "none.obj")


def _split_ply(data):
    end = data.index(b"end_header\n") + len(b"end_header\n")
    return data[:end].decode("ascii").splitlines(), data[end:]


def test_save_ply_binary_matches_bytes_written_by_hand(tmp_path):
    path = tmp_path / "m.ply"
    save_ply(path, VERTICES, TRIANGLES, COLORS, binary=True)
    header, body = _split_ply(path.read_bytes())
    assert [h for h in header if not h.startswith("comment")] == [
        "ply", "format binary_little_endian 1.0", "element vertex 4",
        "property float x", "property float y", "property float z",
        "property uchar red", "property uchar green", "property uchar blue",
        "element face 2", "property list uchar int vertex_indices", "end_header"]
    expect = b""
    for (x, y, z), (r, g, b) in zip(VERTICES, [(255, 0, 0), (0, 255, 0), (0, 0, 255), (128, 64, 255)]):
        expect += struct.pack("<fffBBB", x, y, z, r, g, b)
    for a, b, c in TRIANGLES:
        expect += struct.pack("<Biii", 3, a, b, c)
    assert body == expect


def test_save_ply_ascii_matches_a_file_written_by_hand(tmp_path):
    path = tmp_path / "a.ply"
    save_ply(path, VERTICES, TRIANGLES, COLORS, binary=False)
    header, body = _split_ply(path.read_bytes())
    assert "format ascii 1.0" in header
    assert body.decode("ascii").splitlines() == [
        "0 0 0 255 0 0", "1 0 0 0 255 0", "0 1 0 0 0 255", "0 0 1.5 128 64 255",
        "3 0 1 2", "3 0 2 3"]


def _read_ply_binary(data):
    header, body = _split_ply(data)
    nv = int(next(h for h in header if h.startswith("element vertex")).split()[-1])
    nf = int(next(h for h in header if h.startswith("element face")).split()[-1])
    coloured = "property uchar red" in header
    fields = [("xyz", "<f4", (3,))] + ([("rgb", "u1", (3,))] if coloured else [])
    vt = np.dtype(fields)
    verts = np.frombuffer(body, vt, count=nv)
    faces = np.frombuffer(body, np.dtype([("n", "u1"), ("idx", "<i4", (3,))]), count=nf, offset=nv * vt.itemsize)
    assert (faces["n"] == 3).all() and len(body) == nv * vt.itemsize + nf * 13
    return verts["xyz"], faces["idx"], (verts["rgb"] if coloured else None)


def test_ply_binary_round_trip_without_and_with_colours(tmp_path, rng):
    v = rng.normal(size=(30, 3)).astype(np.float32)
    t = rng.integers(0, 30, size=(40, 3)).astype(np.int32)
    path = tmp_path / "rt.ply"
    save_ply(path, v, t)
    v2, t2, c2 = _read_ply_binary(path.read_bytes())
    np.testing.assert_array_equal(v2, v)
    np.testing.assert_array_equal(t2, t)
    assert c2 is None
    c = rng.integers(0, 256, size=(30, 3)).astype(np.uint8)
    save_ply(path, v, t, c)
    np.testing.assert_array_equal(_read_ply_binary(path.read_bytes())[2], c)


def test_bad_meshes_are_named(tmp_path):
    with pytest.raises(ValueError, match="vertices"):
        save_obj(tmp_path / "x.obj", VERTICES[:, :2], TRIANGLES)
    with pytest.raises(ValueError, match="triangles"):
        save_ply(tmp_path / "x.ply", VERTICES, TRIANGLES + 3)
    with pytest.raises(ValueError, match="triangles"):
        save_ply(tmp_path / "x.ply", VERTICES, TRIANGLES.astype(np.float32))
    with pytest.raises(ValueError, match="colors"):
        save_obj(tmp_path / "x.obj", VERTICES, TRIANGLES, COLORS[:2])
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "keep.obj"
    save_obj(path, VERTICES, TRIANGLES)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        save_obj(path, np.full((4, 3), np.nan), TRIANGLES)
    assert path.read_bytes() == before


def test_bulk_and_line_by_line_readers_agree(tmp_path, rng):
    # save_obj's output takes the bulk path; a comment-free polygon file the general one
    v = rng.normal(size=(20, 3)).astype(np.float32)
    t = rng.integers(0, 20, size=(30, 3)).astype(np.int32)
    path = tmp_path / "bulk.obj"
    save_obj(path, v, t)
    bulk = load_obj(path)
    general = tmp_path / "general.obj"
    general.write_text(path.read_text() + "f 1/1 2/2 3/3\n")  # one v/vt face forces the general path
    slow = load_obj(general)
    np.testing.assert_array_equal(bulk[0], slow[0])
    np.testing.assert_array_equal(bulk[1], slow[1][:-1])
    np.testing.assert_array_equal(slow[1][-1], [0, 1, 2])
    path.write_text(path.read_text() + "f 1 2 99\n")  # out of range: named by the general path
    with pytest.raises(ValueError, match=r"bulk\.obj, line \d+: vertex index 99 out of range"):
        load_obj(path)
