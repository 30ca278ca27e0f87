"""FaceModel.load on small files written in each format's real layout, FaceModel.save round trip, errors."""
import h5py
import numpy as np
import pytest
import scipy.io

from fastface.model import FaceModel


@pytest.fixture(scope="module")
def source():
    """A face-shaped model with few components to write into files (mm, albedo in [0, 1])."""
    return FaceModel.default(level="small").truncated(n_shape=4, n_expression=3, n_albedo=2)


def close(a, b, tol):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol["unit_conversion_rtol"],
                               atol=tol["unit_conversion_rtol"] * np.abs(np.asarray(b, np.float64)).max())


def write_bfm2017(path, m, expression_offset):
    """The Basel Face Model 2017 layout: statismo groups, (3N, K) orthonormal columns, variances."""
    with h5py.File(path, "w") as f:
        groups = (("shape", m.mean_shape.reshape(-1) - expression_offset, m.shape_basis, m.shape_std),
                  ("color", m.mean_albedo.reshape(-1), m.albedo_basis, m.albedo_std),
                  ("expression", expression_offset, m.expression_basis, m.expression_std))
        for name, mean, basis, std in groups:
            g = f.create_group(f"{name}/model")
            g["mean"] = mean.astype(np.float32)
            g["pcaBasis"] = basis.T.astype(np.float32)
            g["pcaVariance"] = (std.astype(np.float64) ** 2).astype(np.float32)
            g["noiseVariance"] = np.float32(0.0)
            r = f.create_group(f"{name}/representer")
            r["points"] = m.mean_shape.T.astype(np.float32)
            r["cells"] = m.triangles.T.astype(np.uint32)
        f.create_group("metadata").attrs["description"] = "test file in the BFM 2017 layout"


def bfm2009_arrays(m, triangles=None):
    """01_MorphableModel.mat's variables: micrometres, colour on 0..255, 1-based (T, 3) tl."""
    tri = m.triangles if triangles is None else triangles
    return {"shapeMU": (m.mean_shape.reshape(-1, 1).astype(np.float64) * 1000).astype(np.float32),
            "shapePC": m.shape_basis.T.astype(np.float32),
            "shapeEV": (m.shape_std.reshape(-1, 1).astype(np.float64) * 1000).astype(np.float32),
            "texMU": (m.mean_albedo.reshape(-1, 1).astype(np.float64) * 255).astype(np.float32),
            "texPC": m.albedo_basis.T.astype(np.float32),
            "texEV": (m.albedo_std.reshape(-1, 1).astype(np.float64) * 255).astype(np.float32),
            "tl": (tri + 1).astype(np.float64),
            "segbin": np.zeros((m.n_vertices, 4), np.uint8)}


def write_mat73(path, arrays):
    """A MATLAB v7.3 file: HDF5 after a 512-byte header, every matrix stored transposed."""
    with h5py.File(path, "w", userblock_size=512) as f:
        for k, v in arrays.items():
            f[k] = np.asarray(v).T
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: test HDF5 schema 1.00 .".ljust(116))


def deep3d_arrays(m):
    """BFM_model_front.mat's variables: decimetres, bases scaled by their std, 1-based tri and keypoints."""
    return {"meanshape": (m.mean_shape.reshape(1, -1).astype(np.float64) / 100).astype(np.float32),
            "idBase": (m.shape_basis.T.astype(np.float64) * m.shape_std / 100),
            "exBase": (m.expression_basis.T.astype(np.float64) * m.expression_std / 100).astype(np.float32),
            "meantex": (m.mean_albedo.reshape(1, -1).astype(np.float64) * 255).astype(np.float32),
            "texBase": (m.albedo_basis.T.astype(np.float64) * m.albedo_std * 255),
            "tri": (m.triangles + 1).astype(np.int32),
            "keypoints": (m.landmarks.reshape(1, -1) + 1).astype(np.int64),
            "point_buf": np.ones((m.n_vertices, 8), np.int32),
            "skinmask": np.ones((1, m.n_vertices), np.uint8)}


def test_bfm2017_loads_in_millimetres_with_variances_as_std(tmp_path, source, tol):
    path = tmp_path / "model2017-1_face12_nomouth.h5"
    offset = np.linspace(-1, 1, 3 * source.n_vertices).astype(np.float32)
    write_bfm2017(path, source, offset)
    m = FaceModel.load(path)
    assert "2017" in m.name and m.landmarks is None and m.symmetry is None
    assert (m.n_shape, m.n_expression, m.n_albedo) == (4, 3, 2)
    close(m.mean_shape, source.mean_shape, tol)  # shape mean + expression mean
    close(m.shape_std, source.shape_std, tol)
    close(m.expression_std, source.expression_std, tol)
    close(m.albedo_std, source.albedo_std, tol)
    assert np.array_equal(m.shape_basis, source.shape_basis)
    assert np.array_equal(m.expression_basis, source.expression_basis)
    assert np.array_equal(m.mean_albedo, source.mean_albedo)
    assert np.array_equal(m.triangles, source.triangles)


def test_bfm2009_mat_loads_micrometres_and_0_255_colour(tmp_path, source, tol):
    path = tmp_path / "01_MorphableModel.mat"
    scipy.io.savemat(path, bfm2009_arrays(source))
    m = FaceModel.load(path, landmarks=source.landmarks)
    assert "2009" in m.name and m.n_expression == 0
    close(m.mean_shape, source.mean_shape, tol)
    close(m.shape_std, source.shape_std, tol)
    close(m.mean_albedo, source.mean_albedo, tol)
    close(m.albedo_std, source.albedo_std, tol)
    assert np.array_equal(m.shape_basis, source.shape_basis)
    assert np.array_equal(m.triangles, source.triangles)  # 1-based in the file
    assert np.array_equal(m.landmarks, source.landmarks)


def test_bfm2009_matlab_v73_file_loads_the_same(tmp_path, source, tol):
    v5, v73 = tmp_path / "v5.mat", tmp_path / "v73.mat"
    scipy.io.savemat(v5, bfm2009_arrays(source))
    write_mat73(v73, bfm2009_arrays(source))
    a, b = FaceModel.load(v5), FaceModel.load(v73)
    for name in ("mean_shape", "mean_albedo", "triangles", "shape_basis", "shape_std", "albedo_basis", "albedo_std"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_clockwise_triangles_are_made_counter_clockwise_on_load(tmp_path, source):
    path = tmp_path / "cw.mat"
    scipy.io.savemat(path, bfm2009_arrays(source, triangles=source.triangles[:, [0, 2, 1]]))
    assert np.array_equal(FaceModel.load(path).triangles, source.triangles)


def test_deep3dfacerecon_model_loads_with_std_from_column_norms(tmp_path, source, tol):
    path = tmp_path / "BFM_model_front.mat"
    scipy.io.savemat(path, deep3d_arrays(source))
    m = FaceModel.load(path)
    assert "Deep3DFaceRecon" in m.name
    assert np.array_equal(m.landmarks, source.landmarks)  # keypoints are 1-based in the file
    close(m.mean_shape, source.mean_shape, tol)
    close(m.shape_std, source.shape_std, tol)
    close(m.expression_std, source.expression_std, tol)
    close(m.albedo_std, source.albedo_std, tol)
    close(m.shape_basis, source.shape_basis, tol)
    close(m.expression_basis, source.expression_basis, tol)
    close(m.mean_albedo, source.mean_albedo, tol)
    assert np.array_equal(m.triangles, source.triangles)
    rng = np.random.default_rng(0)
    c = [rng.normal(size=(2, k)).astype(np.float32) for k in (4, 3, 2)]
    v_loaded, a_loaded = m.evaluate(*c)
    v_source, a_source = source.evaluate(*c)
    assert np.abs(v_loaded - v_source).max() < 1e-3 and np.abs(a_loaded - a_source).max() < 1e-5


def test_deep3dfacerecon_landmarks_argument_overrides_the_keypoints(tmp_path, source):
    path = tmp_path / "BFM_model_front.mat"
    scipy.io.savemat(path, deep3d_arrays(source))
    assert np.array_equal(FaceModel.load(path, landmarks=np.arange(68)).landmarks, np.arange(68))


def test_save_then_load_gives_back_every_array(tmp_path):
    model = FaceModel.default(level="small")
    path = tmp_path / "face.h5"
    model.save(path)
    back = FaceModel.load(path)
    for name in ("mean_shape", "mean_albedo", "triangles", "shape_basis", "shape_std", "expression_basis",
                 "expression_std", "albedo_basis", "albedo_std", "landmarks", "symmetry"):
        a, b = getattr(back, name), getattr(model, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert back.expression_names == model.expression_names and back.name == model.name
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "fastface-face-model" and f.attrs["version"] == 1


def test_failed_save_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path, source, monkeypatch):
    path = tmp_path / "face.h5"
    source.save(path)
    before = path.read_bytes()
    real = h5py.Group.create_dataset
    calls = []

    def create_dataset(self, *args, **kwargs):
        calls.append(args[0])
        if len(calls) == 3:
            raise OSError("simulated: no space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    with pytest.raises(OSError, match="simulated"):
        source.truncated(n_shape=2).save(path)
    assert len(calls) == 3  # the failure came in the middle of the write
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.h5"]
    assert np.array_equal(FaceModel.load(path).shape_basis, source.shape_basis)


def test_save_replaces_an_earlier_file(tmp_path, source):
    path = tmp_path / "face.h5"
    source.save(path)
    source.truncated(n_shape=2).save(path)
    assert FaceModel.load(path).n_shape == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["face.h5"]


def test_save_into_a_missing_directory_raises_naming_the_path(tmp_path, source):
    path = tmp_path / "models" / "face.h5"
    with pytest.raises(FileNotFoundError, match="face.h5.*does not exist"):
        source.save(path)
    assert not (tmp_path / "models").exists()


def test_save_load_without_optional_arrays(tmp_path, source):
    bare = FaceModel(mean_shape=source.mean_shape, triangles=source.triangles, shape_basis=source.shape_basis,
                     shape_std=source.shape_std)
    bare.save(tmp_path / "bare.h5")
    back = FaceModel.load(tmp_path / "bare.h5")
    assert back.landmarks is None and back.symmetry is None and back.expression_names is None
    assert back.n_expression == 0 and back.n_albedo == 0


def test_formats_are_recognised_by_content_not_extension(tmp_path, source):
    source.save(tmp_path / "looks_like.mat")
    assert FaceModel.load(tmp_path / "looks_like.mat").n_shape == 4
    write_bfm2017(tmp_path / "model.bin", source, np.zeros(3 * source.n_vertices, np.float32))
    assert "2017" in FaceModel.load(tmp_path / "model.bin").name
    scipy.io.savemat(tmp_path / "front.h5", deep3d_arrays(source))
    assert "Deep3DFaceRecon" in FaceModel.load(tmp_path / "front.h5").name


def test_missing_file_raises_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.h5"):
        FaceModel.load(tmp_path / "nope.h5")


def test_unknown_file_raises_naming_the_file_and_the_formats(tmp_path):
    path = tmp_path / "notes.h5"
    path.write_text("hello")
    with pytest.raises(ValueError, match=r"notes\.h5: not an HDF5 or MATLAB file.*Basel Face Model 2017"):
        FaceModel.load(path)


def test_unknown_hdf5_raises_naming_what_is_missing(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["shape/model/mean"] = np.zeros(9, np.float32)
    with pytest.raises(ValueError, match=r"other\.h5.*missing /shape/model/pcaBasis, /shape/model/pcaVariance"):
        FaceModel.load(path)


def test_unknown_mat_raises_naming_what_is_missing(tmp_path, source):
    path = tmp_path / "partial.mat"
    arrays = bfm2009_arrays(source)
    del arrays["texEV"]
    scipy.io.savemat(path, arrays)
    with pytest.raises(ValueError, match=r"partial\.mat.*Basel Face Model 2009.*missing texEV.*Deep3DFaceRecon.*"
                                         r"missing meanshape"):
        FaceModel.load(path)


def test_newer_or_incomplete_fastface_files_raise(tmp_path, source):
    path = tmp_path / "new.h5"
    source.save(path)
    with h5py.File(path, "r+") as f:
        f.attrs["version"] = 99
    with pytest.raises(ValueError, match="version 99 is newer"):
        FaceModel.load(path)
    source.save(path)
    with h5py.File(path, "r+") as f:
        del f["albedo_std"]
    with pytest.raises(ValueError, match="missing albedo_std"):
        FaceModel.load(path)


def test_bad_sizes_in_a_file_raise_naming_the_array(tmp_path, source):
    path = tmp_path / "bad.mat"
    arrays = bfm2009_arrays(source)
    arrays["shapePC"] = arrays["shapePC"][:-3]
    scipy.io.savemat(path, arrays)
    with pytest.raises(ValueError, match="shapePC must have shape"):
        FaceModel.load(path)


def test_load_rejects_a_directory_naming_it(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        FaceModel.load(tmp_path)
