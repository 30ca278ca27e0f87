"""Reading face models users already own, and fastface's own model format.

`FaceModel.load(path)` recognises the format by the file's content, never its extension:

| format | how it is recognised | units in the file |
| --- | --- | --- |
| fastface (`FaceModel.save`) | HDF5, root attribute format = "fastface-face-model" | mm, albedo [0, 1] |
| Basel Face Model 2017 / 2019 (.h5) | HDF5 with /shape/model/{mean, pcaBasis, pcaVariance} and /shape/representer/cells | mm, colour [0, 1] |
| Basel Face Model 2009 (01_MorphableModel.mat) | MATLAB file with shapeMU, shapePC, shapeEV, texMU, texPC, texEV, tl | micrometres, colour 0..255 |
| Deep3DFaceRecon (BFM_model_front.mat) | MATLAB file with meanshape, idBase, exBase, meantex, texBase, tri | decimetres, colour 0..255 |

Layouts, as the files have them:
- BFM 2017: mean (3N,) interleaved x0 y0 z0 x1 ...; pcaBasis (3N, K) with orthonormal columns;
  pcaVariance (K,) variances (std = sqrt); representer/points (3, N); representer/cells (3, T)
  0-based. The expression model is /expression/model/...; its mean (a mean expression offset, on
  the same vertices) is added to the shape mean, as scalismo's combined model does.
- BFM 2009: shapeMU (3N, 1), shapePC (3N, 199), shapeEV (199, 1) standard deviations, texMU,
  texPC, texEV likewise, tl (T, 3) 1-based. MATLAB v7.3 files are HDF5 and store every matrix
  transposed (shapePC (199, 3N), tl (3, T)); both are read.
- Deep3DFaceRecon: meanshape (1, 3N), idBase (3N, 80) and exBase (3N, 64) already multiplied by
  their standard deviations (so std = the column norms and the basis the normalised columns),
  meantex (1, 3N) and texBase (3N, 80) on 0..255, tri (T, 3) 1-based, keypoints (1, 68) 1-based.

Triangles are made counter-clockwise seen from +z (fastface's convention) when a file winds them
the other way: the sum of the triangles' signed areas in the (x, y) plane of the mean shape
decides, which is unambiguous for a face mask that looks down +z.
"""
import os

import numpy as np

from fastface._files import atomic_write

__all__ = ["load_model", "save_model", "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "fastface-face-model"
FORMAT_VERSION = 1

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

_BFM2017_NEEDS = ("shape/model/mean", "shape/model/pcaBasis", "shape/model/pcaVariance", "shape/representer/cells",
                  "color/model/mean")
_BFM2009_NEEDS = ("shapeMU", "shapePC", "shapeEV", "texMU", "texPC", "texEV", "tl")
_DEEP3D_NEEDS = ("meanshape", "idBase", "exBase", "meantex", "texBase", "tri")
_FASTFACE_ARRAYS = ("mean_shape", "mean_albedo", "triangles", "shape_basis", "shape_std", "expression_basis",
                    "expression_std", "albedo_basis", "albedo_std")

_SUPPORTED = ("fastface's own .h5 (FaceModel.save), a Basel Face Model 2017/2019 .h5, a Basel Face Model 2009 "
              "01_MorphableModel.mat, or Deep3DFaceRecon's BFM_model_front.mat")


def _file_kind(path):
    """'hdf5', 'mat5' or None, from the first bytes (HDF5 may sit after a 512-byte user block)."""
    with open(path, "rb") as f:
        head = f.read(2048)
    for offset in (0, 512, 1024):
        if head[offset:offset + 8] == _HDF5_SIGNATURE:
            return "hdf5", head
    if head[:10] == b"MATLAB 5.0":
        return "mat5", head
    return None, head


def load_model(cls, path, landmarks=None):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no face model file at {path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path!r} is a directory; FaceModel.load takes a model file ({_SUPPORTED})")
    kind, head = _file_kind(path)
    if kind == "hdf5":
        return _load_hdf5(cls, path, landmarks)
    if kind == "mat5":
        return _load_mat5(cls, path, landmarks)
    what = "an empty file" if not head else f"starts with {head[:16]!r}"
    raise ValueError(f"{path}: not an HDF5 or MATLAB file ({what}); FaceModel.load reads {_SUPPORTED}")


# ----------------------------------------------------------------------------------------------
# Format dispatch
# ----------------------------------------------------------------------------------------------

def _missing(names, has):
    return [n for n in names if not has(n)]


def _load_hdf5(cls, path, landmarks):
    import h5py  # noqa: PLC0415

    with h5py.File(path, "r") as f:
        if f.attrs.get("format") in (FORMAT_NAME, FORMAT_NAME.encode()):
            return _read_fastface(cls, f, path, landmarks)

        def has(name):
            return name in f

        miss_2017 = _missing(_BFM2017_NEEDS, has)
        if not miss_2017:
            return _read_bfm2017(cls, f, path, landmarks)
        miss_2009 = _missing(_BFM2009_NEEDS, has)
        if not miss_2009:  # a MATLAB v7.3 file
            return _read_bfm2009(cls, {k: np.asarray(f[k]).T for k in _BFM2009_NEEDS}, path, landmarks)
        miss_d3d = _missing(_DEEP3D_NEEDS, has)
        if not miss_d3d:
            keys = list(_DEEP3D_NEEDS) + [k for k in ("keypoints",) if k in f]
            return _read_deep3d(cls, {k: np.asarray(f[k]).T for k in keys}, path, landmarks)
        top = sorted(f.keys())
    raise ValueError(
        f"{path}: an HDF5 file that is no face model FaceModel.load knows (top-level entries: {top}). "
        f"Not fastface's own (no root attribute format={FORMAT_NAME!r}); not a Basel Face Model 2017 "
        f"(missing {', '.join('/' + m for m in miss_2017)}); not a MATLAB v7.3 Basel Face Model 2009 "
        f"(missing {', '.join(miss_2009)}); not a MATLAB v7.3 Deep3DFaceRecon model (missing {', '.join(miss_d3d)})")


def _load_mat5(cls, path, landmarks):
    import scipy.io  # noqa: PLC0415

    names = {name for name, _, _ in scipy.io.whosmat(path)}

    def has(name):
        return name in names

    miss_2009 = _missing(_BFM2009_NEEDS, has)
    if not miss_2009:
        return _read_bfm2009(cls, scipy.io.loadmat(path, variable_names=_BFM2009_NEEDS), path, landmarks)
    miss_d3d = _missing(_DEEP3D_NEEDS, has)
    if not miss_d3d:
        keys = list(_DEEP3D_NEEDS) + [k for k in ("keypoints",) if k in names]
        return _read_deep3d(cls, scipy.io.loadmat(path, variable_names=keys), path, landmarks)
    raise ValueError(
        f"{path}: a MATLAB file that is no face model FaceModel.load knows (variables: {sorted(names)}). "
        f"Not a Basel Face Model 2009 01_MorphableModel.mat (missing {', '.join(miss_2009)}); not a "
        f"Deep3DFaceRecon BFM_model_front.mat (missing {', '.join(miss_d3d)})")


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------

def _ccw_from_front(triangles, mean_shape):
    """Triangles with columns 1 and 2 swapped if, summed over the mesh, they wind clockwise seen from +z."""
    p = mean_shape[triangles].astype(np.float64)
    signed = (p[:, 1, 0] - p[:, 0, 0]) * (p[:, 2, 1] - p[:, 0, 1]) - (p[:, 2, 0] - p[:, 0, 0]) * (p[:, 1, 1] - p[:, 0, 1])
    if signed.sum() < 0:
        return triangles[:, [0, 2, 1]]
    return triangles


def _columns_to_rows(basis_columns, name, path, n):
    """(3N, K) column basis -> (K, 3N) float32 rows, checking the size."""
    b = np.asarray(basis_columns)
    if b.ndim != 2 or b.shape[0] != n:
        raise ValueError(f"{path}: {name} must have shape ({n}, K); got {b.shape}")
    return np.ascontiguousarray(b.T, dtype=np.float32)


def _landmarks_or(landmarks, fallback):
    return np.asarray(landmarks).reshape(-1) if landmarks is not None else fallback


def _read_bfm2017(cls, f, path, landmarks):
    mean = np.asarray(f["shape/model/mean"], dtype=np.float64).reshape(-1)
    n = mean.size
    v = n // 3
    cells = np.asarray(f["shape/representer/cells"])
    if cells.ndim != 2 or 3 not in cells.shape:
        raise ValueError(f"{path}: /shape/representer/cells must have shape (3, T); got {cells.shape}")
    triangles = np.asarray(cells.T if cells.shape[0] == 3 else cells, dtype=np.int64)  # (3, T) in the file

    def pca(group):
        basis = _columns_to_rows(f[f"{group}/model/pcaBasis"], f"/{group}/model/pcaBasis", path, n)
        std = np.sqrt(np.clip(np.asarray(f[f"{group}/model/pcaVariance"], dtype=np.float64).reshape(-1), 0, None))
        if std.size != basis.shape[0]:
            raise ValueError(f"{path}: /{group}/model/pcaVariance has {std.size} entries for "
                             f"{basis.shape[0]} basis columns")
        return basis, std

    shape_basis, shape_std = pca("shape")
    colour_mean = np.asarray(f["color/model/mean"], dtype=np.float64).reshape(-1)
    if colour_mean.size != n:
        raise ValueError(f"{path}: /color/model/mean has {colour_mean.size} values for {v} vertices")
    albedo_basis, albedo_std = pca("color") if "color/model/pcaBasis" in f else (None, None)
    expression_basis = expression_std = None
    if "expression/model/pcaBasis" in f:
        expression_basis, expression_std = pca("expression")
        if "expression/model/mean" in f:
            mean = mean + np.asarray(f["expression/model/mean"], dtype=np.float64).reshape(-1)
    mean_shape = mean.reshape(v, 3)
    return cls(mean_shape=mean_shape, triangles=_ccw_from_front(triangles, mean_shape), shape_basis=shape_basis,
               shape_std=shape_std, expression_basis=expression_basis, expression_std=expression_std,
               mean_albedo=colour_mean.reshape(v, 3), albedo_basis=albedo_basis, albedo_std=albedo_std,
               landmarks=_landmarks_or(landmarks, None), name=f"Basel Face Model 2017 ({os.path.basename(path)})")


def _read_bfm2009(cls, m, path, landmarks):
    um_to_mm = 1e-3  # BFM 2009 is in micrometres
    mean = np.asarray(m["shapeMU"], dtype=np.float64).reshape(-1) * um_to_mm
    n = mean.size
    v = n // 3
    tl = np.asarray(m["tl"])
    if tl.ndim != 2 or 3 not in tl.shape:
        raise ValueError(f"{path}: tl must have shape (T, 3); got {tl.shape}")
    triangles = (tl if tl.shape[1] == 3 else tl.T).astype(np.int64) - 1  # 1-based in the file
    shape_basis = _columns_to_rows(m["shapePC"], "shapePC", path, n)
    shape_std = np.asarray(m["shapeEV"], dtype=np.float64).reshape(-1) * um_to_mm
    albedo_basis = _columns_to_rows(m["texPC"], "texPC", path, n)
    albedo_std = np.asarray(m["texEV"], dtype=np.float64).reshape(-1) / 255.0
    mean_albedo = np.asarray(m["texMU"], dtype=np.float64).reshape(v, 3) / 255.0
    mean_shape = mean.reshape(v, 3)
    return cls(mean_shape=mean_shape, triangles=_ccw_from_front(triangles, mean_shape), shape_basis=shape_basis,
               shape_std=shape_std, mean_albedo=mean_albedo, albedo_basis=albedo_basis, albedo_std=albedo_std,
               landmarks=_landmarks_or(landmarks, None), name=f"Basel Face Model 2009 ({os.path.basename(path)})")


def _normalised_columns(base, name, path, n, scale):
    """A basis whose columns carry their standard deviations -> (rows (K, n) unit norm, std (K,))."""
    b = np.asarray(base, dtype=np.float64)
    if b.ndim != 2 or b.shape[0] != n:
        raise ValueError(f"{path}: {name} must have shape ({n}, K); got {b.shape}")
    std = np.linalg.norm(b, axis=0)
    safe = np.where(std > 0, std, 1.0)
    return np.ascontiguousarray((b / safe).T, dtype=np.float32), std * scale


def _read_deep3d(cls, m, path, landmarks):
    dm_to_mm = 100.0  # Deep3DFaceRecon divides BFM 2009's micrometres by 1e5: decimetres
    mean = np.asarray(m["meanshape"], dtype=np.float64).reshape(-1) * dm_to_mm
    n = mean.size
    v = n // 3
    tri = np.asarray(m["tri"])
    if tri.ndim != 2 or 3 not in tri.shape:
        raise ValueError(f"{path}: tri must have shape (T, 3); got {tri.shape}")
    triangles = (tri if tri.shape[1] == 3 else tri.T).astype(np.int64) - 1  # 1-based in the file
    shape_basis, shape_std = _normalised_columns(m["idBase"], "idBase", path, n, dm_to_mm)
    expression_basis, expression_std = _normalised_columns(m["exBase"], "exBase", path, n, dm_to_mm)
    albedo_basis, albedo_std = _normalised_columns(m["texBase"], "texBase", path, n, 1.0 / 255.0)
    mean_albedo = np.asarray(m["meantex"], dtype=np.float64).reshape(v, 3) / 255.0
    keypoints = None
    if "keypoints" in m:
        keypoints = np.asarray(m["keypoints"]).reshape(-1).astype(np.int64) - 1  # 1-based in the file
    mean_shape = mean.reshape(v, 3)
    return cls(mean_shape=mean_shape, triangles=_ccw_from_front(triangles, mean_shape), shape_basis=shape_basis,
               shape_std=shape_std, expression_basis=expression_basis, expression_std=expression_std,
               mean_albedo=mean_albedo, albedo_basis=albedo_basis, albedo_std=albedo_std,
               landmarks=_landmarks_or(landmarks, keypoints),
               name=f"Deep3DFaceRecon BFM ({os.path.basename(path)})")


# ----------------------------------------------------------------------------------------------
# fastface's own format
# ----------------------------------------------------------------------------------------------

def save_model(model, path):
    """Writes every array of `model` to an HDF5 file at `path` (see the module docstring).

    Atomic (fastface._files.atomic_write): a save that fails leaves an earlier file at `path` as it was."""
    import h5py  # noqa: PLC0415

    from fastface.model.face_model import _host  # noqa: PLC0415

    path = os.fspath(path)
    with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = FORMAT_NAME
        f.attrs["version"] = FORMAT_VERSION
        f.attrs["name"] = model.name
        f.attrs["units"] = "millimetres; albedo linear RGB in [0, 1]"
        for key in _FASTFACE_ARRAYS:
            f.create_dataset(key, data=np.ascontiguousarray(_host(getattr(model, key))))
        for key in ("landmarks", "symmetry"):
            value = getattr(model, key)
            if value is not None:
                f.create_dataset(key, data=_host(value))
        if model.expression_names is not None:
            f.create_dataset("expression_names", data=np.array(model.expression_names, dtype=object),
                             dtype=h5py.string_dtype())


def _read_fastface(cls, f, path, landmarks):
    version = int(f.attrs.get("version", -1))
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: fastface model format version {version} is newer than this fastface reads "
                         f"({FORMAT_VERSION}); update fastface")
    missing = [k for k in _FASTFACE_ARRAYS if k not in f]
    if missing:
        raise ValueError(f"{path}: fastface model file is missing {', '.join(missing)}")
    a = {k: np.asarray(f[k]) for k in _FASTFACE_ARRAYS}
    names = None
    if "expression_names" in f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f["expression_names"][()]]
    name = f.attrs.get("name", "fastface model")
    name = name.decode() if isinstance(name, bytes) else str(name)
    return cls(**a, landmarks=_landmarks_or(landmarks, np.asarray(f["landmarks"]) if "landmarks" in f else None),
               symmetry=np.asarray(f["symmetry"]) if "symmetry" in f else None, expression_names=names, name=name)
