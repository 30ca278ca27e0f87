"""FaceModel: a PCA-style morphable face model (identity, expression, albedo) and its evaluation.

    model = FaceModel.default()                       # fastface's own, generated on the spot
    model = FaceModel.load("model2017-1_bfm_nomouth.h5", landmarks=my_68_indices)
    vertices, albedo = model.evaluate(shape_coeffs, expression_coeffs, albedo_coeffs)
    g_shape, g_expr, g_alb = model.evaluate_backward(grad_vertices, grad_albedo)
    gpu_model = model.to("gpu")                       # cupy arrays; evaluate then runs CUDA kernels

Coefficients are in units of standard deviations, as a PCA model has them:
vertices = mean_shape + sum_k shape_coeffs[k] * shape_std[k] * shape_basis[k]
                      + sum_k expression_coeffs[k] * expression_std[k] * expression_basis[k],
and the same for the albedo. Bases are stored (K, 3V) float32 row-major: row k holds the
displacement (x0, y0, z0, x1, ...) of component k, so one evaluation is one GEMM that reads each
basis once. Shape and expression rows live in one (K_shape + K_expression, 3V) array
(`shape_basis` and `expression_basis` are views of it), so that the vertices come from one pass.
"""
import functools

import numpy as np

from fastface._backend import array_module, cupy_or_none, is_cupy_array
from fastface._checks import check_array, check_finite, check_indices, check_same_batch, describe
from fastface.model.morphable import morphable, morphable_backward

__all__ = ["FaceModel"]

MODEL_PRECISIONS = ("float32", "tf32")  # FaceModel.to(device, precision): its GPU GEMMs (fastface/_gemm.py)


def _host(a):
    return a.get() if is_cupy_array(a) else a


class FaceModel:
    """A morphable face model: mean shape and albedo, three linear bases, topology, landmarks.

    Attributes (numpy arrays, or cupy arrays after `to("gpu")`):
        mean_shape: (V, 3) float32, millimetres.
        mean_albedo: (V, 3) float32, linear RGB in [0, 1].
        triangles: (T, 3) int32, counter-clockwise seen from the front (+z).
        shape_basis, expression_basis, albedo_basis: (K, 3V) float32 (orthonormal rows for the
            default model and the Basel models; not necessarily for others).
        shape_std, expression_std, albedo_std: (K,) float32 standard deviations.
        landmarks: (68,) int32 vertex indices of the iBUG 68 points, or None when unknown.
        symmetry: (V,) int32, the vertex that mirrors each vertex across x = 0, or None.
        expression_names: list of K_expression names, or None.
        name: a short description of where the model came from.

    The topology helpers (`edges`, `adjacency`, `laplacian`) are computed once per triangle array:
    assigning a new array to `triangles` recomputes them, editing the array in place does not.
    """

    def __init__(self, mean_shape, triangles, shape_basis, shape_std, expression_basis=None, expression_std=None,
                 mean_albedo=None, albedo_basis=None, albedo_std=None, landmarks=None, symmetry=None,
                 expression_names=None, name="custom"):
        """Builds a model from numpy arrays, checking their shapes and values.

        Args:
            mean_shape: (V, 3) or (3V,) float, millimetres.
            triangles: (T, 3) integer vertex indices.
            shape_basis: (K_s, 3V) or (K_s, V, 3) float; shape_std: (K_s,) float.
            expression_basis, expression_std: as the shape's, or None for no expressions.
            mean_albedo: (V, 3) or (3V,) float in [0, 1]; None for a uniform grey.
            albedo_basis, albedo_std: as the shape's, or None for no albedo variation.
            landmarks: (68,) integer vertex indices or None. symmetry: (V,) integers or None.
            expression_names: K_e strings or None. name: a description.
        """
        mean_shape = np.asarray(mean_shape)
        v = mean_shape.size // 3
        mean_shape = _as_float32("mean_shape", mean_shape, (v, 3))
        check_finite("mean_shape", mean_shape)
        triangles = _as_int32("triangles", triangles)
        check_array("triangles", triangles, np.int32, ("T", 3))
        check_indices("triangles", triangles, v)
        shape_basis, shape_std = _basis("shape", shape_basis, shape_std, v)
        expression_basis, expression_std = _basis("expression", expression_basis, expression_std, v)
        albedo_basis, albedo_std = _basis("albedo", albedo_basis, albedo_std, v)
        if mean_albedo is None:
            mean_albedo = np.full((v, 3), 0.5, dtype=np.float32)
        mean_albedo = _as_float32("mean_albedo", np.asarray(mean_albedo), (v, 3))
        check_finite("mean_albedo", mean_albedo)
        if landmarks is not None:
            landmarks = _as_int32("landmarks", np.asarray(landmarks).reshape(-1))
            check_array("landmarks", landmarks, np.int32, (68,))
            check_indices("landmarks", landmarks, v)
        if symmetry is not None:
            symmetry = _as_int32("symmetry", np.asarray(symmetry).reshape(-1))
            check_array("symmetry", symmetry, np.int32, (v,))
            check_indices("symmetry", symmetry, v)
        if expression_names is not None:
            expression_names = [str(n) for n in expression_names]
            if len(expression_names) != expression_basis.shape[0]:
                raise ValueError(f"expression_names must name the {expression_basis.shape[0]} expression "
                                 f"components; got {len(expression_names)} names")
        geometry = np.concatenate([shape_basis, expression_basis], axis=0)
        self._set(mean_shape, mean_albedo, triangles, geometry, np.concatenate([shape_std, expression_std]),
                  shape_basis.shape[0], albedo_basis, albedo_std, landmarks, symmetry, expression_names, str(name))

    def _set(self, mean_shape, mean_albedo, triangles, geometry_basis, geometry_std, n_shape, albedo_basis,
             albedo_std, landmarks, symmetry, expression_names, name, precision="float32"):
        self.mean_shape = mean_shape
        self.mean_albedo = mean_albedo
        self.triangles = triangles
        self._geometry_basis = geometry_basis
        self._geometry_std = geometry_std
        self._n_shape = int(n_shape)
        self.albedo_basis = albedo_basis
        self.albedo_std = albedo_std
        self.landmarks = landmarks
        self.symmetry = symmetry
        self.expression_names = list(expression_names) if expression_names is not None else None
        self.name = name
        self.precision = precision  # of the GPU's GEMMs above batch 8 (see `to`)
        # Flat views the kernels read (no copies: the arrays are C-contiguous).
        self._mean_shape_flat = mean_shape.reshape(-1)
        self._mean_albedo_flat = mean_albedo.reshape(-1)
        self._topology_cache = None  # see _topology

    @classmethod
    def _from_arrays(cls, **arrays):
        model = cls.__new__(cls)
        model._set(**arrays)
        return model

    def _arrays(self):
        return dict(mean_shape=self.mean_shape, mean_albedo=self.mean_albedo, triangles=self.triangles,
                    geometry_basis=self._geometry_basis, geometry_std=self._geometry_std, n_shape=self._n_shape,
                    albedo_basis=self.albedo_basis, albedo_std=self.albedo_std, landmarks=self.landmarks,
                    symmetry=self.symmetry, expression_names=self.expression_names, name=self.name,
                    precision=self.precision)

    # ------------------------------------------------------------------------------------------
    # Constructors
    # ------------------------------------------------------------------------------------------

    @classmethod
    def default(cls, level="default"):
        """fastface's own face model, generated deterministically (the same arrays in every process).

        Args:
            level: "default" (about 35,000 vertices, 69,000 triangles) or "small" (about 5,000).

        A metric (millimetre) front face mask, x to the viewer's right, y up, z toward the viewer,
        the vertex centroid at the origin. 80 identity components in order of decreasing std,
        designed ones (face width, length, depth, jaw width, nose, eyes, brows, cheeks, lips, chin)
        among smooth random fields; 64 expression components (`expression_names`: jaw_open, smile,
        lip_pucker, brows_up, brows_down, eyes_closed, ...; then localized random deformations);
        80 albedo components in order of decreasing std (skin tone, lips, brows, cheeks, beard
        shadow, ... and smooth skin-coloured fields). Arrays are cached per level and shared
        read-only.
        """
        from fastface.model.default import EXPRESSION_NAMES, generate  # noqa: PLC0415

        a = generate(level)
        return cls._from_arrays(
            mean_shape=a["mean_shape"], mean_albedo=a["mean_albedo"], triangles=a["triangles"],
            geometry_basis=a["geometry_basis"], geometry_std=a["geometry_std"], n_shape=a["shape_std"].shape[0],
            albedo_basis=a["albedo_basis"], albedo_std=a["albedo_std"], landmarks=a["landmarks"],
            symmetry=a["symmetry"], expression_names=EXPRESSION_NAMES, name=f"fastface default ({level})")

    @classmethod
    def load(cls, path, landmarks=None):
        """Reads a model file, recognising its format by its content (not its extension).

        Formats: fastface's own HDF5 (`save`), Basel Face Model 2017 (.h5), Basel Face Model 2009
        (01_MorphableModel.mat, MATLAB v5 or v7.3), Deep3DFaceRecon's BFM_model_front.mat. Units
        are converted to millimetres and albedo to [0, 1]; triangles are made counter-clockwise
        seen from +z where a file winds them the other way.

        Args:
            path: the file.
            landmarks: optional (68,) vertex indices of the iBUG points (0-based), for formats
                without them (the Basel models); overrides the file's own where it has some.

        Raises:
            FileNotFoundError: no such file. ValueError: not a known format; the message names
            the file and what is missing.
        """
        from fastface.model.loaders import load_model  # noqa: PLC0415

        return load_model(cls, path, landmarks=landmarks)

    def save(self, path):
        """Writes the model in fastface's own HDF5 format (every array; `FaceModel.load` reads it)."""
        from fastface.model.loaders import save_model  # noqa: PLC0415

        save_model(self, path)

    # ------------------------------------------------------------------------------------------
    # Sizes and views
    # ------------------------------------------------------------------------------------------

    @property
    def n_vertices(self):
        return int(self.mean_shape.shape[0])

    @property
    def n_triangles(self):
        return int(self.triangles.shape[0])

    @property
    def n_shape(self):
        return self._n_shape

    @property
    def n_expression(self):
        return int(self._geometry_basis.shape[0]) - self._n_shape

    @property
    def n_albedo(self):
        return int(self.albedo_basis.shape[0])

    @property
    def shape_basis(self):
        return self._geometry_basis[:self._n_shape]

    @property
    def expression_basis(self):
        return self._geometry_basis[self._n_shape:]

    @property
    def shape_std(self):
        return self._geometry_std[:self._n_shape]

    @property
    def expression_std(self):
        return self._geometry_std[self._n_shape:]

    @property
    def device(self):
        """"gpu" when the arrays are cupy arrays, else "cpu"."""
        return "gpu" if is_cupy_array(self.mean_shape) else "cpu"

    def __repr__(self):
        return (f"FaceModel({self.name!r}: {self.n_vertices} vertices, {self.n_triangles} triangles, "
                f"{self.n_shape} shape, {self.n_expression} expression, {self.n_albedo} albedo components, "
                f"on {self.device})")

    # ------------------------------------------------------------------------------------------
    # Copies
    # ------------------------------------------------------------------------------------------

    def to(self, device, precision=None):
        """A copy of the model on "gpu" (cupy arrays) or "cpu" (numpy arrays).

        The copy shares nothing writable with this model; moving to where the model already is
        returns a new FaceModel that shares the (read-only on the CPU) arrays.

        precision: of `evaluate` and `evaluate_backward`'s GEMMs on the GPU above batch 8 (cuBLAS):
        "float32" (the default: float32 products, the CPU's results up to summation order) or "tf32"
        (tensor cores: operands rounded to 10 mantissa bits, float32 sums; vertices off by about 1e-3 of
        their distance from the mean shape, for a training step that wants the speed). None keeps the
        model's; the CPU computes in float32 (or float64) either way.
        """
        precision = self.precision if precision is None else precision
        if precision not in MODEL_PRECISIONS:
            raise ValueError(f"precision must be one of {MODEL_PRECISIONS}; got {precision!r}")
        if device in ("gpu", "cuda"):
            cupy = cupy_or_none()
            if cupy is None:
                raise RuntimeError("model.to('gpu') needs cupy; install fastface[gpu]")
            move = cupy.asarray
        elif device == "cpu":
            move = _host
        else:
            raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")
        arrays = self._arrays()
        for key, value in arrays.items():
            if hasattr(value, "dtype") and hasattr(value, "shape"):
                arrays[key] = move(value)
        arrays["precision"] = precision
        return FaceModel._from_arrays(**arrays)

    def truncated(self, n_shape=None, n_expression=None, n_albedo=None):
        """A copy that keeps the leading n_shape / n_expression / n_albedo components (None: all)."""
        n_shape = self.n_shape if n_shape is None else int(n_shape)
        n_expression = self.n_expression if n_expression is None else int(n_expression)
        n_albedo = self.n_albedo if n_albedo is None else int(n_albedo)
        for name, n, most in (("n_shape", n_shape, self.n_shape), ("n_expression", n_expression, self.n_expression),
                              ("n_albedo", n_albedo, self.n_albedo)):
            if not 0 <= n <= most:
                raise ValueError(f"{name} must be in [0, {most}]; got {n}")
        xp = array_module(("model", self.mean_shape))
        rows = list(range(n_shape)) + list(range(self.n_shape, self.n_shape + n_expression))
        arrays = self._arrays()
        arrays.update(
            geometry_basis=xp.ascontiguousarray(self._geometry_basis[rows]),
            geometry_std=xp.ascontiguousarray(self._geometry_std[rows]), n_shape=n_shape,
            albedo_basis=xp.ascontiguousarray(self.albedo_basis[:n_albedo]),
            albedo_std=xp.ascontiguousarray(self.albedo_std[:n_albedo]),
            expression_names=None if self.expression_names is None else self.expression_names[:n_expression])
        return FaceModel._from_arrays(**arrays)

    # ------------------------------------------------------------------------------------------
    # Topology
    # ------------------------------------------------------------------------------------------

    @property
    def edges(self):
        """(E, 2) int32 numpy array of the mesh's unique edges, each (i, j) with i < j (read-only)."""
        return self._topology()["edges"]

    @property
    def adjacency(self):
        """(V, V) scipy.sparse CSR float32 matrix, 1 where two vertices share an edge (CPU only:
        for cupy, `cupyx.scipy.sparse.csr_matrix(model.adjacency)`). A new copy on each access."""
        return self._topology()["adjacency"].copy()

    def laplacian(self):
        """(V, V) scipy.sparse CSR float32 graph Laplacian D - A of the mesh's edges (a new copy).

        `L @ x` gives, at each vertex, its degree times (itself minus the mean of its neighbours):
        zero for constant fields, the usual smoothness penalty is ||L x||^2 or x^T L x.
        """
        topology = self._topology()
        if topology.get("laplacian") is None:
            topology["laplacian"] = _laplacian(topology["adjacency"])
        return topology["laplacian"].copy()

    def _topology(self):
        """The cached {"edges", "adjacency"} (and "laplacian" once asked for) of the triangles.

        On a GPU model each computation starts with a device-to-host copy of the triangles (a
        synchronisation), so it is done once per triangle array, not on every access. The cache is
        keyed on the identity of `self.triangles` and holds a reference to it (so that its id
        cannot be reused by a new array) and on the vertex count: assigning new triangles, or a
        mean shape of another size, recomputes. The sparse matrices are handed out as copies
        (scipy's are mutable); the edges array is read-only.
        """
        cached = getattr(self, "_topology_cache", None)
        if cached is None or cached["triangles"] is not self.triangles or cached["n_vertices"] != self.n_vertices:
            edges = _edges(self)
            cached = {"triangles": self.triangles, "n_vertices": self.n_vertices, "edges": edges,
                      "adjacency": _adjacency(edges, self.n_vertices)}
            self._topology_cache = cached
        return cached

    # ------------------------------------------------------------------------------------------
    # Evaluation
    # ------------------------------------------------------------------------------------------

    def _check_coefficients(self, shape_coeffs, expression_coeffs, albedo_coeffs):
        given = [("shape_coeffs", shape_coeffs, self.n_shape), ("expression_coeffs", expression_coeffs,
                                                                self.n_expression),
                 ("albedo_coeffs", albedo_coeffs, self.n_albedo)]
        present = [(n, a, k) for n, a, k in given if a is not None]
        if not present:
            raise ValueError("evaluate needs at least one of shape_coeffs, expression_coeffs, albedo_coeffs")
        xp = array_module(*[(n, a) for n, a, _ in present], ("the model's arrays", self.mean_shape))
        if xp is np:
            dtypes = (np.float32, np.float64)
        else:
            dtypes = (np.float32,)
        for n, a, k in present:
            try:
                check_array(n, a, dtypes, ("B", k))
            except TypeError as e:
                if xp is not np and getattr(a, "dtype", None) == np.float64:
                    raise TypeError(f"{n} must be float32 on the GPU (float64 is accepted on the CPU only); "
                                    f"got {describe(a)}") from e
                raise
        first = present[0]
        for n, a, _ in present[1:]:
            if a.dtype != first[1].dtype:
                raise TypeError(f"{n} is {a.dtype} but {first[0]} is {first[1].dtype}; pass one dtype")
        check_same_batch([n for n, _, _ in present], [a for _, a, _ in present])
        for n, a, _ in present:
            check_finite(n, a)
        # A block given as None stays None: evaluate skips its basis rows (see _evaluate_rows).
        return [None if a is None else xp.ascontiguousarray(a) for _, a, _ in given]

    def evaluate(self, shape_coeffs, expression_coeffs, albedo_coeffs):
        """Vertices and albedo of a batch of faces.

        Args:
            shape_coeffs: (B, n_shape) float32 (float64 also on the CPU), in standard deviations.
            expression_coeffs: (B, n_expression), same dtype and device.
            albedo_coeffs: (B, n_albedo), same dtype and device.
            Any of the three may be None (zeros), as long as one is given: its basis rows are then
            skipped, so the result equals that of zero coefficients up to the rounding of a
            summation over fewer terms.

        Returns:
            vertices: (B, V, 3) and albedo: (B, V, 3), of the coefficients' dtype, on their device:
            vertices = mean_shape + (shape_coeffs * shape_std) @ shape_basis
                                  + (expression_coeffs * expression_std) @ expression_basis.
        """
        shape, expression, albedo = self._check_coefficients(shape_coeffs, expression_coeffs, albedo_coeffs)
        first = next(a for a in (shape, expression, albedo) if a is not None)
        batch, empty = first.shape[0], first[:, :0]  # (B, 0): the coefficients of no basis row
        vertices = _evaluate_rows(shape, expression, self._geometry_std, self._geometry_basis, self._n_shape,
                                  self._mean_shape_flat, empty, self.precision)
        colours = _evaluate_rows(albedo, None, self.albedo_std, self.albedo_basis, self.n_albedo,
                                 self._mean_albedo_flat, empty, self.precision)
        return vertices.reshape(batch, self.n_vertices, 3), colours.reshape(batch, self.n_vertices, 3)

    def evaluate_backward(self, grad_vertices, grad_albedo):
        """Gradients of the coefficients from the gradients of `evaluate`'s outputs.

        Args:
            grad_vertices: (B, V, 3) float32 (float64 also on the CPU), or None (zero).
            grad_albedo: (B, V, 3), same dtype and device, or None (zero); one must be given.

        Returns:
            (grad_shape (B, n_shape), grad_expression (B, n_expression), grad_albedo_coeffs
            (B, n_albedo)): grad_shape = (grad_vertices.reshape(B, 3V) @ shape_basis.T) * shape_std.
        """
        present = [(n, a) for n, a in (("grad_vertices", grad_vertices), ("grad_albedo", grad_albedo))
                   if a is not None]
        if not present:
            raise ValueError("evaluate_backward needs grad_vertices or grad_albedo (or both)")
        xp = array_module(*present, ("the model's arrays", self.mean_shape))
        dtypes = (np.float32, np.float64) if xp is np else (np.float32,)
        for n, a in present:
            try:
                check_array(n, a, dtypes, ("B", self.n_vertices, 3))
            except TypeError as e:
                if xp is not np and getattr(a, "dtype", None) == np.float64:
                    raise TypeError(f"{n} must be float32 on the GPU (float64 is accepted on the CPU only); "
                                    f"got {describe(a)}") from e
                raise
        if len(present) == 2:
            if grad_vertices.dtype != grad_albedo.dtype:
                raise TypeError(f"grad_albedo is {grad_albedo.dtype} but grad_vertices is {grad_vertices.dtype}; "
                                f"pass one dtype")
            check_same_batch(["grad_vertices", "grad_albedo"], [grad_vertices, grad_albedo])
        for n, a in present:
            check_finite(n, a)
        batch, dtype = present[0][1].shape[0], present[0][1].dtype
        if grad_vertices is None:
            grad_shape = xp.zeros((batch, self.n_shape), dtype=dtype)
            grad_expression = xp.zeros((batch, self.n_expression), dtype=dtype)
        else:
            flat = xp.ascontiguousarray(grad_vertices).reshape(batch, -1)
            grad_shape, grad_expression = morphable_backward(self._geometry_std, self._geometry_basis, self.n_shape,
                                                             flat, compute=self.precision)
        if grad_albedo is None:
            grad_albedo_coeffs = xp.zeros((batch, self.n_albedo), dtype=dtype)
        else:
            flat = xp.ascontiguousarray(grad_albedo).reshape(batch, -1)
            grad_albedo_coeffs, _ = morphable_backward(self.albedo_std, self.albedo_basis, self.n_albedo, flat,
                                                       compute=self.precision)
        return grad_shape, grad_expression, grad_albedo_coeffs


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def _evaluate_rows(coeff_a, coeff_b, std, basis, n_a, mean, empty, compute):
    """morphable() over the basis rows whose coefficients are given (coeff_a scales rows [0, n_a),
    coeff_b the rest; None: zeros). A block of zeros adds nothing, so its rows are sliced away (a
    contiguous view) rather than multiplied by a (B, K) array zero-filled on every call. With no
    block given the basis has 0 rows and the result is the mean, on both backends (the kernels loop
    over K = 0 rows; the CPU copies the mean)."""
    if coeff_a is not None and coeff_b is not None:
        return morphable(coeff_a, coeff_b, std, basis, mean, compute=compute)
    if coeff_a is not None:
        rows, given = slice(0, n_a), coeff_a
    elif coeff_b is not None:
        rows, given = slice(n_a, basis.shape[0]), coeff_b
    else:
        rows, given = slice(0, 0), empty
    return morphable(given, given[:, :0], std[rows], basis[rows], mean, compute=compute)


def _as_float32(name, a, shape):
    a = np.asarray(a)
    if a.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a float array; got {describe(a)}")
    if a.size != int(np.prod(shape)):
        raise ValueError(f"{name} must have shape {shape} (or the same values flat); got {describe(a)}")
    return np.ascontiguousarray(a.reshape(shape), dtype=np.float32)


def _as_int32(name, a):
    a = np.asarray(a)
    if a.dtype.kind not in "iu":
        if a.dtype.kind == "f" and a.size and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise TypeError(f"{name} must hold integers; got {describe(a)}")
    return np.ascontiguousarray(a, dtype=np.int32)


def _basis(name, basis, std, v):
    if basis is None:
        if std is not None and np.asarray(std).size:
            raise ValueError(f"{name}_std is given but {name}_basis is None")
        return np.zeros((0, 3 * v), dtype=np.float32), np.zeros(0, dtype=np.float32)
    basis = np.asarray(basis)
    if basis.ndim == 3:
        basis = basis.reshape(basis.shape[0], -1)
    if basis.ndim != 2 or basis.shape[1] != 3 * v:
        raise ValueError(f"{name}_basis must have shape (K, {3 * v}) or (K, {v}, 3); got {describe(basis)}")
    basis = _as_float32(f"{name}_basis", basis, basis.shape)
    if std is None:
        raise ValueError(f"{name}_std is required with {name}_basis")
    std = _as_float32(f"{name}_std", np.asarray(std).reshape(-1), (basis.shape[0],))
    check_finite(f"{name}_basis", basis)
    check_finite(f"{name}_std", std)
    return basis, std


@functools.lru_cache(maxsize=8)
def _edges_of(triangles_bytes, n_triangles):
    tri = np.frombuffer(triangles_bytes, dtype=np.int32).reshape(n_triangles, 3).astype(np.int64)
    e = np.concatenate([tri[:, [0, 1]], tri[:, [1, 2]], tri[:, [2, 0]]], axis=0)
    e.sort(axis=1)
    e = np.unique(e, axis=0)
    e = e.astype(np.int32)
    e.setflags(write=False)
    return e


def _edges(model):
    tri = np.ascontiguousarray(_host(model.triangles))
    return _edges_of(tri.tobytes(), tri.shape[0])


def _adjacency(e, v):
    import scipy.sparse  # noqa: PLC0415

    rows = np.concatenate([e[:, 0], e[:, 1]])
    cols = np.concatenate([e[:, 1], e[:, 0]])
    data = np.ones(rows.size, dtype=np.float32)
    return scipy.sparse.csr_matrix((data, (rows, cols)), shape=(v, v))


def _laplacian(a):
    import scipy.sparse  # noqa: PLC0415

    degree = np.asarray(a.sum(axis=1)).reshape(-1).astype(np.float32)
    return (scipy.sparse.diags(degree, format="csr") - a).tocsr()
