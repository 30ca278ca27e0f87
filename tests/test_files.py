"""atomic_write: a write either replaces the target completely or leaves it byte-identical."""
import os
import stat

import numpy as np
import pytest

from fastface._files import atomic_write


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_successful_write_replaces_the_target_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "ckpt.h5"
    _write(target, b"old")
    with atomic_write(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".h5") and tmp != str(target)
        _write(tmp, b"new contents")
        assert _read(target) == b"old"  # the target is untouched until the block has finished
    assert _read(target) == b"new contents"
    assert os.listdir(tmp_path) == ["ckpt.h5"]


def test_write_to_a_new_file_creates_it(tmp_path):
    with atomic_write(str(tmp_path / "new.bin")) as tmp:
        _write(tmp, b"x")
    assert _read(tmp_path / "new.bin") == b"x" and os.listdir(tmp_path) == ["new.bin"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path, error):
    target = tmp_path / "ckpt.h5"
    _write(target, b"old")
    with pytest.raises(type(error)):
        with atomic_write(target) as tmp:
            _write(tmp, b"half")
            raise error
    assert _read(target) == b"old"
    assert os.listdir(tmp_path) == ["ckpt.h5"]


def test_failed_first_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="boom"):
        with atomic_write(tmp_path / "a.h5"):
            raise ValueError("boom")
    assert os.listdir(tmp_path) == []


def test_failed_flush_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    target = tmp_path / "ckpt.h5"
    _write(target, b"old")

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        with atomic_write(target) as tmp:
            _write(tmp, b"new")
    assert _read(target) == b"old" and os.listdir(tmp_path) == ["ckpt.h5"]


def test_missing_directory_raises_naming_the_path(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "ckpt.h5"
    with pytest.raises(FileNotFoundError, match="ckpt.h5.*does not exist"):
        with atomic_write(target):
            pass
    assert not (tmp_path / "no").exists()


def test_directory_as_target_raises(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        with atomic_write(tmp_path):
            pass
    assert os.listdir(tmp_path) == []


def test_suffix_defaults_to_the_targets_and_can_be_given(tmp_path):
    with atomic_write(tmp_path / "face.png") as tmp:
        assert tmp.endswith(".png")
        _write(tmp, b"")
    with atomic_write(tmp_path / "face.png", suffix=".part") as tmp:
        assert tmp.endswith(".part")
        _write(tmp, b"")
    assert os.listdir(tmp_path) == ["face.png"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_replacing_keeps_the_old_files_mode_and_a_new_file_gets_the_usual_mode(tmp_path):
    target = tmp_path / "ckpt.h5"
    _write(target, b"old")
    os.chmod(target, 0o640)
    with atomic_write(target) as tmp:
        _write(tmp, b"new")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640
    umask = os.umask(0)
    os.umask(umask)
    with atomic_write(tmp_path / "fresh.h5") as tmp:
        _write(tmp, b"new")
    assert stat.S_IMODE(os.stat(tmp_path / "fresh.h5").st_mode) == 0o666 & ~umask


def test_demo_png_writer_raises_and_keeps_the_old_image_when_opencv_fails(tmp_path):
    cv2 = pytest.importorskip("cv2")
    from fastface.__main__ import _write_png

    path = tmp_path / "face_0.png"
    image = np.full((4, 4, 3), 200, np.uint8)
    _write_png(cv2, path, image)
    before = _read(path)
    assert np.array_equal(cv2.imread(str(path)), image)

    class FailingCv2:
        @staticmethod
        def imwrite(name, img):
            _write(name, b"partial")
            return False

    with pytest.raises(OSError, match="face_0.png"):
        _write_png(FailingCv2, path, image)
    assert _read(path) == before and os.listdir(tmp_path) == ["face_0.png"]
