"""The learned corrective space of the multi-level face model, and the regularizers of its offsets.

Tewari et al., "Self-supervised Multi-level Face Model Learning for Monocular Reconstruction at over
250 Hz" (CVPR 2018): besides the morphable model's coefficients, the encoder regresses two codes,
z_geo and z_ref, that linear decoders learned jointly with the encoder turn into per-vertex offsets:

    geometry_offsets    (B, V, 3) = (z_geo (B, K_g) @ geometry_basis    (K_g, 3V)).reshape(B, V, 3)   mm
    reflectance_offsets (B, V, 3) = (z_ref (B, K_r) @ reflectance_basis (K_r, 3V)).reshape(B, V, 3)   albedo

The final level is the base (morphable model) level plus these offsets. Both bases live in ONE flat
buffer (`flat_params`, with `flat_grads` of the same layout), so `fastface.nn.Adam(space)` updates
them in one fused step, as it does an `Encoder`. Each decoder is one GEMM forward and two backward
(fastface/_gemm.py: numpy BLAS on the CPU, cuBLAS on the GPU, into preallocated outputs).

Defaults (the paper does not publish the sizes of its corrective codes):
- DEFAULT_GEOMETRY = DEFAULT_REFLECTANCE = 64 dimensions. Fewer than the base model's 80 identity
  components and as many as its 64 expressions: the correctives should hold what the base model
  misses (a subject's out-of-span shape and skin detail), not a second copy of it. A smaller code
  regularizes implicitly (a linear code cannot represent every per-image residual, so the photometric
  loss cannot be lowered by painting each image's shading into the albedo), which matters without 3D
  supervision. The cost is linear in K: with the default 35,709-vertex model a basis is 64 x 107,127
  floats (27 MB), the decoder GEMMs and Adam over both bases cost tens of microseconds on an H200.
- DEFAULT_INIT_STD = (1e-2, 1e-4): i.i.d. normal basis entries, geometry in mm per code unit,
  reflectance in albedo units per code unit; the ratio 100 is the ratio of the quantities' scales
  (a face ~100 mm across, albedo in [0, 1]). A basis of zeros would give z no gradient
  (grad_z = grad_offsets @ basis^T) while an untrained encoder's z ~ 0 gives the basis almost none
  (grad_basis = z^T grad_offsets): both would sit at that saddle. With these scales, a code of unit
  size moves a vertex by sqrt(64) * 1e-2 = 0.08 mm and an albedo by 8e-4 (a fifth of an 8-bit level):
  invisible at any render resolution (a 224-pixel face is ~1 mm a pixel), so the final level starts
  equal to the base level, yet z has a gradient from the first step.

A note for training: Adam moves each basis entry by about `lr` per step in the entry's own units, so at
one learning rate the geometry basis (mm) learns ~100 times more slowly, relative to its scale, than the
reflectance basis; scaling z_geo's raw encoder output (or its learning rate) makes up for it.

The regularizers of the offsets (the paper's corrective regularizers), each per image (B,) with its
backward beside it (`op(...)`, `op_backward(..., grad_out)` -> the gradient of the first argument):
- smoothness_loss(offsets, mesh): ||L o||^2 / V, L = D - A the mesh's graph Laplacian (FaceModel.laplacian);
- magnitude_loss(offsets): the mean over vertices of ||o_v||^2;
- reflectance_constancy_loss(albedo, guide_albedo, mesh, sharpness): a chromaticity-weighted l2,1 norm of
  the albedo differences over mesh edges, divided by E (definitions and defaults in its docstring);
- symmetry_loss(offsets, mesh, mirror_x): the mean over v of ||o_v - M o_sym(v)||^2.
Every backward takes a keyword-only `add_to`: a (B, V, 3) buffer the gradient is ADDED into (a training step
sums all the regularizers' gradients of one field into one buffer, with no full-size adds in between).
`corrective_mesh(model)` gathers what they read (edges, CSR neighbour lists, the symmetry map and its
inverse) on the model's device, once per model.

Backends: Numba twins here and kernels/corrective.cu on the GPU, same names and argument order. Forward
passes are two-pass reductions: fixed chunks of FWD_CHUNK vertices (or edges) of each image summed in
double into a (B, chunks) float64 scratch, then each image's chunks added in order (sum_partials);
backward passes gather each vertex's gradient from its neighbours (smoothness through a (B, V, 3) scratch
of L o), and with `add_to=` add it into the caller's buffer. No atomics, so every result is deterministic;
nothing is allocated but the outputs, those scratch buffers (from cupy's pool: fine inside a CUDA graph
capture) and a contiguous copy of a non-contiguous input. No GPU call synchronises with the
host, except the first corrective_mesh of a GPU model (it copies the triangles to the host once): make
the mesh before capturing a CUDA graph, and keep one GPU model (model.to("gpu") makes a new model, whose
mesh is made again).
"""
import dataclasses
import weakref

import numba
import numpy as np

from fastface._accumulate import store3
from fastface._backend import KernelFile, array_module, cupy_or_none, grid_1d, is_cupy_array
from fastface._checks import check_accumulator, check_array, check_finite, check_same_batch, describe
from fastface._gemm import COMPUTE_MODES, gemm

__all__ = ["CorrectiveSpace", "DEFAULT_GEOMETRY", "DEFAULT_REFLECTANCE", "DEFAULT_INIT_STD", "FORMAT_VERSION",
           "CorrectiveMesh", "corrective_mesh", "smoothness_loss", "smoothness_loss_backward", "magnitude_loss",
           "magnitude_loss_backward", "reflectance_constancy_loss", "reflectance_constancy_loss_backward",
           "symmetry_loss", "symmetry_loss_backward", "DEFAULT_SHARPNESS", "REFLECTANCE_EPS", "CHROMA_EPS"]

DEFAULT_GEOMETRY = 64
DEFAULT_REFLECTANCE = 64
DEFAULT_INIT_STD = (1e-2, 1e-4)  # (geometry mm, reflectance albedo) per code unit; see the module docstring
FORMAT_VERSION = 1               # of what `save` writes into an HDF5 group
_KIND = "fastface.CorrectiveSpace"
_ALIGN = 64                      # elements (256 bytes): each basis starts where cuBLAS likes it


def _host(a):
    return a.get() if is_cupy_array(a) else a


def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _where(group):
    """'file.h5:/group' for error messages."""
    filename = getattr(getattr(group, "file", None), "filename", "?")
    return f"{filename}:{getattr(group, 'name', '?')}"


class CorrectiveSpace:
    """Linear decoders from the corrective codes to per-vertex geometry and reflectance offsets.

        space = CorrectiveSpace(model.n_vertices)            # 64 + 64 dimensions
        geometry, reflectance = space.evaluate(z_geo, z_ref)  # (B, V, 3) each
        grad_z_geo, grad_z_ref = space.backward(z_geo, z_ref, grad_geometry, grad_reflectance)
        opt = fastface.nn.Adam(space, lr=1e-3); opt.step()    # reads space.flat_grads

    Args:
        n_vertices: V, the vertex count of the face model the offsets add to.
        n_geometry: K_g, the size of z_geo (DEFAULT_GEOMETRY; see the module docstring).
        n_reflectance: K_r, the size of z_ref (DEFAULT_REFLECTANCE).
        seed: of the random initial bases.
        init_std: the standard deviation of the initial basis entries: a number for both bases, or a
            pair (geometry in mm, reflectance in albedo units) per code unit (DEFAULT_INIT_STD).
        dtype: keyword only; np.float32 (default) or np.float64 (CPU only: for gradient checks).

    Attributes:
        flat_params, flat_grads: (N,) arrays, the one buffer of both bases and of their gradients.
        params, grads: {"geometry_basis": (K_g, 3V), "reflectance_basis": (K_r, 3V)} views of them.
        geometry_basis, reflectance_basis: the views of `params`; row k holds the offsets
            (x0, y0, z0, x1, ...) that one unit of code k adds.
        n_vertices, n_geometry, n_reflectance, device ("cpu" or "gpu"), dtype.
    """

    def __init__(self, n_vertices, n_geometry=DEFAULT_GEOMETRY, n_reflectance=DEFAULT_REFLECTANCE, seed=0,
                 init_std=DEFAULT_INIT_STD, *, dtype=np.float32):
        self.n_vertices = _positive_int("n_vertices", n_vertices)
        self.n_geometry = _positive_int("n_geometry", n_geometry)
        self.n_reflectance = _positive_int("n_reflectance", n_reflectance)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"seed must be an integer; got {seed!r}")
        self.seed = int(seed)
        try:
            stds = (float(init_std),) * 2 if np.ndim(init_std) == 0 else tuple(float(s) for s in init_std)
        except (TypeError, ValueError):
            raise TypeError(f"init_std must be a number or a pair (geometry, reflectance); got {init_std!r}") from None
        if len(stds) != 2 or not all(0.0 <= s < np.inf for s in stds):
            raise ValueError(f"init_std must be a finite number >= 0 or a pair of them; got {init_std!r}")
        self.init_std = stds
        self.precision = "float32"  # of the GPU's GEMMs (see `to`)
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64 (CPU only); got {dtype}")
        n = 3 * self.n_vertices
        geometry_size = self.n_geometry * n
        reflectance_offset = -(-geometry_size // _ALIGN) * _ALIGN
        self._layout = {"geometry_basis": (0, (self.n_geometry, n)),
                        "reflectance_basis": (reflectance_offset, (self.n_reflectance, n))}
        size = -(-(reflectance_offset + self.n_reflectance * n) // _ALIGN) * _ALIGN
        rng = np.random.default_rng(self.seed)
        flat = np.zeros(size, dtype=dtype)
        for (name, (offset, shape)), std in zip(self._layout.items(), self.init_std):
            count = shape[0] * shape[1]
            if std > 0:
                flat[offset:offset + count] = rng.normal(0.0, std, count)
        self._set_buffers(np, flat)

    # -- buffers and devices ---------------------------------------------------------------
    def _set_buffers(self, xp, flat):
        self._xp = xp
        self.flat_params = flat
        self.flat_grads = xp.zeros_like(flat)
        self.params = self._views(flat)
        self.grads = self._views(self.flat_grads)

    def _views(self, flat):
        return {name: flat[offset:offset + shape[0] * shape[1]].reshape(shape)
                for name, (offset, shape) in self._layout.items()}

    @property
    def geometry_basis(self):
        return self.params["geometry_basis"]

    @property
    def reflectance_basis(self):
        return self.params["reflectance_basis"]

    @property
    def dtype(self):
        return self.flat_params.dtype

    @property
    def device(self):
        """"cpu" or "gpu"."""
        return "cpu" if self._xp is np else "gpu"

    @property
    def n_parameters(self):
        return (self.n_geometry + self.n_reflectance) * 3 * self.n_vertices

    def __repr__(self):
        return (f"CorrectiveSpace({self.n_vertices} vertices, {self.n_geometry} geometry and {self.n_reflectance} "
                f"reflectance dimensions, {self.dtype}, on {self.device})")

    def to(self, device, precision=None):
        """Moves the bases to "cpu" (numpy) or "gpu" (cupy); returns self.

        The gradients are reset to zero; an optimizer made before must be made again.
        precision: of the decoders' GEMMs on the GPU, "float32" (the default) or "tf32" (TF32 tensor
        cores, for a training step: on the H200 at batch 64 the three float32 GEMMs of each decoder ran
        as CUDA-core kernels, 136 us forward and backward per decoder); None keeps the space's. The CPU
        computes in the bases' dtype either way.
        """
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")
        precision = self.precision if precision is None else precision
        if precision not in COMPUTE_MODES:
            raise ValueError(f"precision must be one of {COMPUTE_MODES}; got {precision!r}")
        self.precision = precision
        host = _host(self.flat_params)
        if device == "cpu":
            self._set_buffers(np, np.array(host))
            return self
        cupy = cupy_or_none()
        if cupy is None:
            raise RuntimeError("CorrectiveSpace.to('gpu') needs cupy and a CUDA GPU")
        if host.dtype != np.float32:
            raise TypeError(f"a {host.dtype} CorrectiveSpace is CPU only (float64 is for gradient checks)")
        self._set_buffers(cupy, cupy.asarray(host))
        return self

    # -- the decoders ------------------------------------------------------------------------
    def _check_codes(self, z_geo, z_ref, extra=()):
        present = [("z_geo", z_geo), ("z_ref", z_ref)] + [(n, a) for n, a in extra if a is not None]
        xp = array_module(*present, ("the corrective bases", self.flat_params))
        for name, z, k in (("z_geo", z_geo, self.n_geometry), ("z_ref", z_ref, self.n_reflectance)):
            try:
                check_array(name, z, self.dtype, ("B", k))
            except TypeError as e:
                if getattr(z, "dtype", None) in (np.float32, np.float64) and getattr(z, "ndim", 0) == 2:
                    raise TypeError(f"{name} must be {self.dtype} like the corrective bases of this space; got "
                                    f"{describe(z)}") from e
                raise
        for name, g in extra:
            if g is not None:
                check_array(name, g, self.dtype, ("B", self.n_vertices, 3))
        check_same_batch([n for n, _ in present], [a for _, a in present])
        for name, a in present:
            check_finite(name, a)
        return xp

    def _check_out(self, out, shapes, xp):
        """The caller's output pair, checked; None when none was given."""
        if out is None:
            return None
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise TypeError(f"out must be a pair of arrays or None; got {type(out).__name__}")
        for i, (a, shape) in enumerate(zip(out, shapes)):
            array_module((f"out[{i}]", a), ("the corrective bases", self.flat_params))
            check_array(f"out[{i}]", a, self.dtype, shape)
            if not a.flags.c_contiguous:
                raise ValueError(f"out[{i}] must be C-contiguous (the GEMM writes it in place)")
        return tuple(out)

    def evaluate(self, z_geo, z_ref, *, out=None):
        """Per-vertex offsets of a batch of codes.

        Args:
            z_geo: (B, n_geometry) float32 (the space's dtype), numpy or cupy like the bases.
            z_ref: (B, n_reflectance), same dtype and device.
            out: keyword only, optional pair of C-contiguous (B, V, 3) arrays to write the offsets into (a
                training step's workspace: nothing is allocated then, as a CUDA graph capture wants).

        Returns:
            (geometry_offsets (B, V, 3) in mm, reflectance_offsets (B, V, 3) in albedo units), of the space's
            dtype on its device (`out` when given, else new arrays).
        """
        xp = self._check_codes(z_geo, z_ref)
        batch, n = z_geo.shape[0], 3 * self.n_vertices
        out = self._check_out(out, [(batch, self.n_vertices, 3)] * 2, xp)
        results = []
        for i, (z, basis) in enumerate(((z_geo, self.geometry_basis), (z_ref, self.reflectance_basis))):
            offsets = xp.empty((batch, n), dtype=self.dtype) if out is None else out[i].reshape(batch, n)
            gemm(xp.ascontiguousarray(z), basis, offsets, compute=self.precision)
            results.append(offsets.reshape(batch, self.n_vertices, 3) if out is None else out[i])
        return results[0], results[1]

    def backward(self, z_geo, z_ref, grad_geometry, grad_reflectance, *, out=None):
        """Gradients of the codes; OVERWRITES `flat_grads` (`grads`) with the gradients of the bases.

        Args:
            z_geo, z_ref: the codes given to `evaluate`.
            grad_geometry, grad_reflectance: (B, V, 3) gradients of `evaluate`'s outputs, the space's dtype
                and device; either may be None (zero).
            out: keyword only, optional pair of C-contiguous (B, n_geometry), (B, n_reflectance) arrays for
                the code gradients.

        Returns:
            (grad_z_geo (B, n_geometry), grad_z_ref (B, n_reflectance)):
            grad_z = grad_offsets.reshape(B, 3V) @ basis^T; the basis gradient is z^T @ grad_offsets.
        """
        xp = self._check_codes(z_geo, z_ref, (("grad_geometry", grad_geometry),
                                               ("grad_reflectance", grad_reflectance)))
        batch, n = z_geo.shape[0], 3 * self.n_vertices
        given = self._check_out(out, [(batch, self.n_geometry), (batch, self.n_reflectance)], xp)
        out = []
        for i, (z, grad, name) in enumerate(((z_geo, grad_geometry, "geometry_basis"),
                                             (z_ref, grad_reflectance, "reflectance_basis"))):
            grad_z = xp.empty(z.shape, dtype=self.dtype) if given is None else given[i]
            if grad is None:
                grad_z[...] = 0
                self.grads[name][...] = 0
            else:
                flat = xp.ascontiguousarray(grad).reshape(batch, n)
                gemm(flat, self.params[name], grad_z, trans_b=True, compute=self.precision)
                gemm(xp.ascontiguousarray(z), flat, self.grads[name], trans_a=True, compute=self.precision)
            out.append(grad_z)
        return out[0], out[1]

    # -- save and load ---------------------------------------------------------------------
    def save(self, group):
        """Writes the bases and the settings into an h5py group (a File is a group too).

        Datasets "geometry_basis" (K_g, 3V) and "reflectance_basis" (K_r, 3V) float32, and the attributes
        kind, format_version, n_vertices, n_geometry, n_reflectance, seed, init_std. Existing entries of
        those names in the group are replaced.
        """
        group.attrs["kind"] = _KIND
        group.attrs["format_version"] = FORMAT_VERSION
        for key in ("n_vertices", "n_geometry", "n_reflectance", "seed"):
            group.attrs[key] = np.int64(getattr(self, key))
        group.attrs["init_std"] = np.asarray(self.init_std, dtype=np.float64)
        for name, basis in self.params.items():
            if name in group:
                del group[name]
            group.create_dataset(name, data=np.asarray(_host(basis), dtype=np.float32))

    @classmethod
    def load(cls, group, **expected):
        """A CorrectiveSpace (on the CPU, float32) from an h5py group written by `save`.

        Args:
            group: the h5py group (or File).
            expected: sizes the stored space must have (n_vertices=..., n_geometry=..., n_reflectance=...);
                a difference raises ValueError naming the size.

        Raises:
            ValueError: the group holds no corrective space, another format version, or arrays whose
            shapes disagree with its sizes or with `expected`; the message names the file and group.
        """
        where = _where(group)
        known = ("n_vertices", "n_geometry", "n_reflectance")
        unknown = set(expected) - set(known)
        if unknown:
            raise TypeError(f"unknown CorrectiveSpace sizes {sorted(unknown)}; known: {list(known)}")
        kind = group.attrs.get("kind")
        if isinstance(kind, bytes):
            kind = kind.decode()
        if kind != _KIND:
            raise ValueError(f"{where} holds no corrective space (kind={kind!r}, expected {_KIND!r})")
        version = int(group.attrs.get("format_version", -1))
        if version != FORMAT_VERSION:
            raise ValueError(f"{where} holds a corrective space of format version {version}; this fastface reads "
                             f"version {FORMAT_VERSION}")
        sizes = {}
        for key in known + ("seed",):
            if key not in group.attrs:
                raise ValueError(f"{where} lacks the attribute {key!r}")
            sizes[key] = int(group.attrs[key])
        for key, value in expected.items():
            if sizes[key] != value:
                raise ValueError(f"{where} holds a corrective space with {key}={sizes[key]}, expected {key}={value}")
        shapes = {"geometry_basis": (sizes["n_geometry"], 3 * sizes["n_vertices"]),
                  "reflectance_basis": (sizes["n_reflectance"], 3 * sizes["n_vertices"])}
        arrays = {}
        for name, shape in shapes.items():
            if name not in group:
                raise ValueError(f"{where} lacks the dataset {name!r}")
            data = group[name]
            if tuple(data.shape) != shape:
                raise ValueError(f"{where}/{name} has shape {tuple(data.shape)}; its sizes (n_vertices="
                                 f"{sizes['n_vertices']}, n_geometry={sizes['n_geometry']}, n_reflectance="
                                 f"{sizes['n_reflectance']}) need {shape}")
            arrays[name] = np.asarray(data, dtype=np.float32)
            if not np.isfinite(arrays[name]).all():
                raise ValueError(f"{where}/{name} holds NaN or infinite values")
        init_std = tuple(np.asarray(group.attrs.get("init_std", DEFAULT_INIT_STD), dtype=np.float64).reshape(-1))
        space = cls(sizes["n_vertices"], sizes["n_geometry"], sizes["n_reflectance"], seed=sizes["seed"],
                    init_std=0.0)  # no random draw: the stored bases replace it
        space.init_std = init_std if len(init_std) == 2 else DEFAULT_INIT_STD
        for name, a in arrays.items():
            space.params[name][...] = a
        return space


# =============================================================================================
# The mesh data the regularizers read
# =============================================================================================

@dataclasses.dataclass(frozen=True, eq=False)
class CorrectiveMesh:
    """What the corrective regularizers need of a face model's mesh, on the model's device.

    Attributes:
        n_vertices: V. n_edges: E.
        edges: (E, 2) int32 unique mesh edges, i < j (FaceModel.edges).
        neighbour_offsets: (V + 1,) int32 and neighbours: (2E,) int32, the CSR neighbour lists (ascending
            per vertex): the graph Laplacian is (L o)_v = deg(v) o_v - sum over v's neighbours of o_j, the
            rows of FaceModel.laplacian() (D - A).
        symmetry: (V,) int32, the mirror vertex of each vertex (FaceModel.symmetry), or None.
        mirror_offsets: (V + 1,) int32 and mirrored_from: (V,) int32, the CSR of symmetry's inverse (the u
            with symmetry[u] == v, ascending), which the symmetry backward gathers from; None without one.
        device: "cpu" or "gpu".
    """

    n_vertices: int
    n_edges: int
    edges: object
    neighbour_offsets: object
    neighbours: object
    symmetry: object
    mirror_offsets: object
    mirrored_from: object
    device: str


def _csr(rows, cols, n):
    """(offsets (n + 1,), cols sorted by (row, col)) as int32."""
    order = np.lexsort((cols, rows))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n), out=offsets[1:])
    return offsets.astype(np.int32), np.ascontiguousarray(cols[order], dtype=np.int32)


def _build_mesh(edges, n_vertices, symmetry):
    edges = np.ascontiguousarray(edges, dtype=np.int32)
    e = edges.astype(np.int64)
    neighbour_offsets, neighbours = _csr(np.concatenate([e[:, 0], e[:, 1]]), np.concatenate([e[:, 1], e[:, 0]]),
                                         n_vertices)
    mirror_offsets = mirrored_from = None
    if symmetry is not None:
        symmetry = np.array(symmetry, dtype=np.int32)  # a copy: the mesh's arrays are made read-only
        mirror_offsets, mirrored_from = _csr(symmetry.astype(np.int64), np.arange(n_vertices, dtype=np.int64),
                                             n_vertices)
    return dict(n_vertices=int(n_vertices), n_edges=int(edges.shape[0]), edges=edges,
                neighbour_offsets=neighbour_offsets, neighbours=neighbours, symmetry=symmetry,
                mirror_offsets=mirror_offsets, mirrored_from=mirrored_from)


_MESHES = weakref.WeakKeyDictionary()  # model -> (triangles, symmetry, n_vertices, CorrectiveMesh)


def corrective_mesh(model):
    """The CorrectiveMesh of a FaceModel, on the model's device.

    Computed once per model and triangle array (a GPU model's first call copies its triangles and
    symmetry to the host: one synchronisation) and cached: assigning new `triangles` or `symmetry` to the
    model makes a new one; editing those arrays in place does not.
    """
    from fastface.model.face_model import FaceModel  # noqa: PLC0415 - face_model does not import this module

    if not isinstance(model, FaceModel):
        raise TypeError(f"model must be a FaceModel; got {type(model).__name__}")
    cached = _MESHES.get(model)
    if (cached is not None and cached[0] is model.triangles and cached[1] is model.symmetry
            and cached[2] == model.n_vertices):
        return cached[3]
    arrays = _build_mesh(model.edges, model.n_vertices,
                         None if model.symmetry is None else _host(model.symmetry))
    device = model.device
    if device == "gpu":
        cupy = cupy_or_none()
        arrays = {k: cupy.asarray(v) if isinstance(v, np.ndarray) else v for k, v in arrays.items()}
    else:
        for v in arrays.values():
            if isinstance(v, np.ndarray):
                v.setflags(write=False)
    mesh = CorrectiveMesh(device=device, **arrays)
    _MESHES[model] = (model.triangles, model.symmetry, model.n_vertices, mesh)
    return mesh


# =============================================================================================
# The regularizers: Numba twins of kernels/corrective.cu (same names and argument order)
# =============================================================================================

FWD_THREADS = 256          # FWD_THREADS in kernels/corrective.cu: the threads of a forward pass-1 block
FWD_CHUNK = 2048           # FWD_CHUNK there: the vertices (or edges) one pass-1 block sums (a constant: the
                           # order of every sum, so the result's bits, must not depend on the GPU)
REFLECTANCE_EPS = 1e-3     # smoothing of the l2,1 norm at 0, albedo units (see reflectance_constancy_loss)
CHROMA_EPS = 1e-3          # the smallest brightness a chromaticity divides by
DEFAULT_SHARPNESS = 50.0   # of the chromaticity weights (see reflectance_constancy_loss)


def _chunks(n):
    """The pass-1 chunks of n vertices or edges: the forwards' partial sums are (B, _chunks(n)) float64."""
    return -(-n // FWD_CHUNK)


@numba.njit(cache=True, inline="always")
def _chunk(k, n_chunks, n):
    """Image b and the range [begin, end) of the k-th chunk (k = b * n_chunks + c) of n items."""
    b, c = k // n_chunks, k % n_chunks
    begin = c * FWD_CHUNK
    return b, begin, min(begin + FWD_CHUNK, n)


@numba.njit(cache=True, parallel=True)
def sum_partials(partial, out, n):
    """Pass 2 of every forward: out[b] = (sum of partial[b, :] in chunk order) / n."""
    for b in numba.prange(partial.shape[0]):
        total = 0.0
        for c in range(partial.shape[1]):
            total += partial[b, c]
        out[b] = total / n


@numba.njit(cache=True, inline="always")
def _laplacian_at(ob, nbr_offsets, nbrs, v):
    V = ob.shape[0]
    sx = sy = sz = ob[v, 0] * 0
    for e in range(nbr_offsets[v], nbr_offsets[v + 1]):
        j = nbrs[e]
        if j < 0 or j >= V:
            continue
        sx += ob[v, 0] - ob[j, 0]
        sy += ob[v, 1] - ob[j, 1]
        sz += ob[v, 2] - ob[j, 2]
    return sx, sy, sz


@numba.njit(cache=True, parallel=True)
def smoothness_fwd(offsets, nbr_offsets, nbrs, partial):
    B, V = offsets.shape[0], offsets.shape[1]
    n_chunks = partial.shape[1]
    for k in numba.prange(B * n_chunks):
        b, begin, end = _chunk(k, n_chunks, V)
        acc = 0.0
        for v in range(begin, end):
            lx, ly, lz = _laplacian_at(offsets[b], nbr_offsets, nbrs, v)
            acc += np.float64(lx) * lx + np.float64(ly) * ly + np.float64(lz) * lz
        partial[b, k - b * n_chunks] = acc


@numba.njit(cache=True, parallel=True)
def smoothness_laplacian(offsets, nbr_offsets, nbrs, lap):
    """lap[b, v] = (L o)_v. The CPU's lap is float64 (what _laplacian_at returns: its sums promote to
    float64), the GPU's float32 (the float32 sums its kernel makes)."""
    B, V = offsets.shape[0], offsets.shape[1]
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        lap[b, v, 0], lap[b, v, 1], lap[b, v, 2] = _laplacian_at(offsets[b], nbr_offsets, nbrs, v)


@numba.njit(cache=True, parallel=True)
def smoothness_bwd(lap, nbr_offsets, nbrs, grad_out, grad_offsets, accumulate):
    B, V = lap.shape[0], lap.shape[1]
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        lb = lap[b]
        lx, ly, lz = lb[v, 0], lb[v, 1], lb[v, 2]
        sx = sy = sz = lx * 0
        for e in range(nbr_offsets[v], nbr_offsets[v + 1]):
            j = nbrs[e]
            if j < 0 or j >= V:
                continue
            sx += lx - lb[j, 0]
            sy += ly - lb[j, 1]
            sz += lz - lb[j, 2]
        scale = 2.0 * grad_out[b] / V
        store3(grad_offsets, b, v, scale * sx, scale * sy, scale * sz, accumulate)


@numba.njit(cache=True, parallel=True)
def magnitude_fwd(offsets, partial):
    B, V = offsets.shape[0], offsets.shape[1]
    n_chunks = partial.shape[1]
    for k in numba.prange(B * n_chunks):
        b, begin, end = _chunk(k, n_chunks, V)
        acc = 0.0
        for v in range(begin, end):
            for c in range(3):
                acc += np.float64(offsets[b, v, c]) * offsets[b, v, c]
        partial[b, k - b * n_chunks] = acc


@numba.njit(cache=True, parallel=True)
def magnitude_bwd(offsets, grad_out, grad_offsets, accumulate):
    B, V = offsets.shape[0], offsets.shape[1]
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        scale = 2.0 * grad_out[b] / V
        store3(grad_offsets, b, v, scale * offsets[b, v, 0], scale * offsets[b, v, 1], scale * offsets[b, v, 2],
             accumulate)


@numba.njit(cache=True, inline="always")
def _chroma(gb, i, chroma_eps):
    r, g, b = max(gb[i, 0], 0.0), max(gb[i, 1], 0.0), max(gb[i, 2], 0.0)
    inv = 1.0 / max(r + g + b, chroma_eps)
    return r * inv, g * inv, b * inv


@numba.njit(cache=True, parallel=True)
def _chroma_table(guide, chroma_eps):
    """(G, V, 3) float64: _chroma of every vertex of every guide image. The CUDA kernels compute a
    vertex's chromaticity again for each of its edges; the CPU computes each once (the same floats:
    _chroma returns float64 from float32 inputs) and reads them per edge."""
    G, V = guide.shape[0], guide.shape[1]
    table = np.empty((G, V, 3), np.float64)
    for i in numba.prange(G * V):
        g, v = i // V, i % V
        table[g, v, 0], table[g, v, 1], table[g, v, 2] = _chroma(guide[g], v, chroma_eps)
    return table


@numba.njit(cache=True, inline="always")
def _edge_weight(cb, i, j, sharpness):
    """The chromaticity weight of edge (i, j) from one image's _chroma_table cb."""
    dx, dy, dz = cb[i, 0] - cb[j, 0], cb[i, 1] - cb[j, 1], cb[i, 2] - cb[j, 2]
    return np.exp(-sharpness * np.sqrt(dx * dx + dy * dy + dz * dz))


@numba.njit(cache=True, parallel=True)
def reflectance_constancy_fwd(albedo, guide, edges, partial, sharpness, eps, chroma_eps):
    """guide: (B, V, 3), or (1, V, 3) shared by every image."""
    B, V, E = albedo.shape[0], albedo.shape[1], edges.shape[0]
    n_chunks = partial.shape[1]
    guide_step = 1 if guide.shape[0] > 1 else 0
    chroma = _chroma_table(guide, chroma_eps)
    for k in numba.prange(B * n_chunks):
        b, begin, end = _chunk(k, n_chunks, E)
        ab, cb = albedo[b], chroma[b * guide_step]
        acc = 0.0
        for e in range(begin, end):
            i, j = edges[e, 0], edges[e, 1]
            if i < 0 or i >= V or j < 0 or j >= V:
                continue
            dx, dy, dz = ab[i, 0] - ab[j, 0], ab[i, 1] - ab[j, 1], ab[i, 2] - ab[j, 2]
            r = np.sqrt(dx * dx + dy * dy + dz * dz + eps * eps)
            acc += _edge_weight(cb, i, j, sharpness) * r
        partial[b, k - b * n_chunks] = acc


@numba.njit(cache=True, parallel=True)
def reflectance_constancy_bwd(albedo, guide, nbr_offsets, nbrs, grad_out, grad_albedo, accumulate, sharpness, eps,
                              chroma_eps):
    B, V = albedo.shape[0], albedo.shape[1]
    E = nbrs.shape[0] // 2
    guide_step = 1 if guide.shape[0] > 1 else 0
    chroma = _chroma_table(guide, chroma_eps)
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        ab, cb = albedo[b], chroma[b * guide_step]
        sx = sy = sz = 0.0
        for e in range(nbr_offsets[v], nbr_offsets[v + 1]):
            j = nbrs[e]
            if j < 0 or j >= V:
                continue
            dx, dy, dz = ab[v, 0] - ab[j, 0], ab[v, 1] - ab[j, 1], ab[v, 2] - ab[j, 2]
            r = np.sqrt(dx * dx + dy * dy + dz * dz + eps * eps)
            w = _edge_weight(cb, min(v, j), max(v, j), sharpness)
            f = w / r
            sx += f * dx
            sy += f * dy
            sz += f * dz
        scale = grad_out[b] / E
        store3(grad_albedo, b, v, scale * sx, scale * sy, scale * sz, accumulate)


@numba.njit(cache=True, inline="always")
def _symmetry_residual(ob, symmetry, v, mx):
    V = ob.shape[0]
    dx, dy, dz = ob[v, 0], ob[v, 1], ob[v, 2]
    s = symmetry[v]
    if 0 <= s < V:
        dx -= mx * ob[s, 0]
        dy -= ob[s, 1]
        dz -= ob[s, 2]
    return dx, dy, dz


@numba.njit(cache=True, parallel=True)
def symmetry_fwd(offsets, symmetry, partial, mirror_x):
    B, V = offsets.shape[0], offsets.shape[1]
    n_chunks = partial.shape[1]
    mx = -1.0 if mirror_x else 1.0
    for k in numba.prange(B * n_chunks):
        b, begin, end = _chunk(k, n_chunks, V)
        acc = 0.0
        for v in range(begin, end):
            dx, dy, dz = _symmetry_residual(offsets[b], symmetry, v, mx)
            acc += np.float64(dx) * dx + np.float64(dy) * dy + np.float64(dz) * dz
        partial[b, k - b * n_chunks] = acc


@numba.njit(cache=True, parallel=True)
def symmetry_bwd(offsets, symmetry, mirror_offsets, mirrored_from, grad_out, grad_offsets, accumulate, mirror_x):
    B, V = offsets.shape[0], offsets.shape[1]
    mx = -1.0 if mirror_x else 1.0
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        ob = offsets[b]
        gx, gy, gz = _symmetry_residual(ob, symmetry, v, mx)
        for e in range(mirror_offsets[v], mirror_offsets[v + 1]):
            u = mirrored_from[e]
            if u < 0 or u >= V:
                continue
            dx, dy, dz = _symmetry_residual(ob, symmetry, u, mx)
            gx -= mx * dx
            gy -= dy
            gz -= dz
        scale = 2.0 * grad_out[b] / V
        store3(grad_offsets, b, v, scale * gx, scale * gy, scale * gz, accumulate)


_KERNELS = KernelFile("corrective.cu", (
    "sum_partials", "smoothness_fwd", "smoothness_laplacian", "smoothness_bwd", "magnitude_fwd", "magnitude_bwd",
    "reflectance_constancy_fwd", "reflectance_constancy_bwd", "symmetry_fwd", "symmetry_bwd"))


# =============================================================================================
# The public pairs
# =============================================================================================

def _check_field(name, a, mesh=None, needs_mesh=True):
    """xp after checking a (B, V, 3) float field (float32; float64 too on the CPU) against the mesh."""
    if needs_mesh and not isinstance(mesh, CorrectiveMesh):
        raise TypeError(f"mesh must be a CorrectiveMesh (from corrective_mesh(model)); got {type(mesh).__name__}")
    xp = array_module((name, a), ("mesh", None if mesh is None else mesh.edges))
    dtypes = (np.float32, np.float64) if xp is np else (np.float32,)
    v = mesh.n_vertices if mesh is not None else "V"
    try:
        check_array(name, a, dtypes, ("B", v, 3))
    except TypeError as e:
        if xp is not np and getattr(a, "dtype", None) == np.float64:
            raise TypeError(f"{name} must be float32 on the GPU (float64 is accepted on the CPU only); got "
                            f"{describe(a)}") from e
        raise
    check_finite(name, a)
    return xp


def _check_grad_out(grad_out, field, xp):
    array_module(("grad_out", grad_out), ("the first argument", field))
    check_array("grad_out", grad_out, field.dtype, (field.shape[0],))
    check_finite("grad_out", grad_out)
    return xp.ascontiguousarray(grad_out)


def _contiguous(xp, a):
    return xp.ascontiguousarray(a)


def _gradient_output(xp, add_to, field, inputs):
    """(the array the backward writes, accumulate): a new (B, V, 3) array, or the caller's `add_to` checked
    (check_accumulator: device, dtype, shape, C-contiguous, no memory shared with an input), which the
    kernels add into. field: the (checked) field the gradient is of; inputs: (name, array) pairs the kernels
    read, the field's first (the arrays as the caller passed them, before any contiguous copy)."""
    if add_to is None:
        return xp.empty(field.shape, dtype=field.dtype), False
    return check_accumulator("add_to", add_to, field, xp, reads=inputs), True


def _per_image_mean(xp, name, twin, args, tail, B, n, dtype):
    """The two-pass forward: `name`'s chunk sums into a (B, chunks) float64 scratch, then sum_partials.
    args: the kernel's arguments before the partial sums, tail those after them (the backend's own)."""
    partial = xp.empty((B, _chunks(n)), dtype=np.float64)
    out = xp.empty(B, dtype=dtype)
    if xp is np:
        twin(*args, partial, *tail)
        sum_partials(partial, out, n)
    else:
        _KERNELS(name)((B * partial.shape[1],), (FWD_THREADS,), (*args, partial, *tail))
        _KERNELS("sum_partials")(*grid_1d(B), (partial, out, np.int32(B), np.int32(partial.shape[1]), np.int32(n)))
    return out


def _launch_bwd(name, n_threads, args):
    _KERNELS(name)(*grid_1d(n_threads), args)


def smoothness_loss(offsets, mesh):
    """Per-image smoothness of an offset field: ||L offsets||^2 / V, L the mesh's graph Laplacian (D - A).

    Args:
        offsets: (B, V, 3) float32 (float64 also on the CPU), numpy or cupy like the mesh.
        mesh: corrective_mesh(model).

    Returns:
        (B,) of offsets' dtype: sum over vertices and channels of (deg(v) o_v - sum_j o_j)^2, divided by V.
        Zero for a constant field; for a linear field, zero at every vertex whose neighbours are
        placed symmetrically around it.
    """
    xp = _check_field("offsets", offsets, mesh)
    offsets = _contiguous(xp, offsets)
    B, V = offsets.shape[0], offsets.shape[1]
    return _per_image_mean(xp, "smoothness_fwd", smoothness_fwd, (offsets, mesh.neighbour_offsets, mesh.neighbours),
                           () if xp is np else (np.int32(B), np.int32(V)), B, V, offsets.dtype)


def smoothness_loss_backward(offsets, mesh, grad_out, *, add_to=None):
    """Gradient of sum_b grad_out[b] smoothness_loss(offsets)[b]: (2 grad_out[b] / V) L^T L offsets.

    Args: as smoothness_loss; grad_out (B,) of offsets' dtype; add_to: keyword only, optional C-contiguous
    (B, V, 3) array of offsets' dtype and device that the gradient is ADDED into (not overwritten).
    Returns (B, V, 3): a new array, or `add_to`. Uses a (B, V, 3) scratch of (L offsets) (float32 on the GPU).
    """
    xp = _check_field("offsets", offsets, mesh)
    checked_grad_out = _check_grad_out(grad_out, offsets, xp)
    grad, accumulate = _gradient_output(xp, add_to, offsets, (("offsets", offsets), ("grad_out", grad_out)))
    offsets = _contiguous(xp, offsets)
    B, V = offsets.shape[0], offsets.shape[1]
    lap = xp.empty(offsets.shape, dtype=np.float64 if xp is np else np.float32)
    if xp is np:
        smoothness_laplacian(offsets, mesh.neighbour_offsets, mesh.neighbours, lap)
        smoothness_bwd(lap, mesh.neighbour_offsets, mesh.neighbours, checked_grad_out, grad, accumulate)
    else:
        _launch_bwd("smoothness_laplacian", B * V, (offsets, mesh.neighbour_offsets, mesh.neighbours, lap,
                                                    np.int32(B), np.int32(V)))
        _launch_bwd("smoothness_bwd", B * V, (lap, mesh.neighbour_offsets, mesh.neighbours, checked_grad_out, grad,
                                              np.int32(accumulate), np.int32(B), np.int32(V)))
    return grad


def magnitude_loss(offsets):
    """Per-image magnitude of an offset field: the mean over vertices of ||o_v||^2.

    Args:
        offsets: (B, V, 3) float32 (float64 also on the CPU), numpy or cupy.

    Returns:
        (B,) of offsets' dtype.
    """
    xp = _check_field("offsets", offsets, needs_mesh=False)
    offsets = _contiguous(xp, offsets)
    B, V = offsets.shape[0], offsets.shape[1]
    return _per_image_mean(xp, "magnitude_fwd", magnitude_fwd, (offsets,),
                           () if xp is np else (np.int32(B), np.int32(V)), B, V, offsets.dtype)


def magnitude_loss_backward(offsets, grad_out, *, add_to=None):
    """Gradient of sum_b grad_out[b] magnitude_loss(offsets)[b]: (2 grad_out[b] / V) offsets. (B, V, 3): a new
    array, or `add_to` (keyword only, as in smoothness_loss_backward) with the gradient added into it."""
    xp = _check_field("offsets", offsets, needs_mesh=False)
    checked_grad_out = _check_grad_out(grad_out, offsets, xp)
    grad, accumulate = _gradient_output(xp, add_to, offsets, (("offsets", offsets), ("grad_out", grad_out)))
    offsets = _contiguous(xp, offsets)
    B, V = offsets.shape[0], offsets.shape[1]
    if xp is np:
        magnitude_bwd(offsets, checked_grad_out, grad, accumulate)
    else:
        _launch_bwd("magnitude_bwd", B * V * 3, (offsets, checked_grad_out, grad, np.int32(accumulate), np.int32(B),
                                                 np.int32(V)))
    return grad


def _check_sharpness(sharpness):
    if isinstance(sharpness, bool) or not isinstance(sharpness, (int, float, np.integer, np.floating)):
        raise TypeError(f"sharpness must be a number; got {sharpness!r}")
    if not 0.0 <= float(sharpness) < np.inf:
        raise ValueError(f"sharpness must be finite and >= 0; got {sharpness!r}")
    return float(sharpness)


def _check_guide(guide_albedo, albedo, mesh, xp):
    array_module(("guide_albedo", guide_albedo), ("albedo", albedo))
    which = check_array("guide_albedo", guide_albedo, albedo.dtype, ("B", mesh.n_vertices, 3), (mesh.n_vertices, 3))
    if which == 0:
        check_same_batch(["albedo", "guide_albedo"], [albedo, guide_albedo])
    check_finite("guide_albedo", guide_albedo)
    guide = _contiguous(xp, guide_albedo)
    return guide if which == 0 else guide.reshape(1, mesh.n_vertices, 3)


def _reflectance_args(albedo, guide_albedo, mesh, sharpness):
    if mesh is not None and isinstance(mesh, CorrectiveMesh) and mesh.n_edges == 0:
        raise ValueError("mesh has no edges: reflectance constancy is a sum over edges")
    xp = _check_field("albedo", albedo, mesh)
    sharpness = _check_sharpness(sharpness)
    guide = _check_guide(guide_albedo, albedo, mesh, xp)
    return xp, _contiguous(xp, albedo), guide, sharpness


def reflectance_constancy_loss(albedo, guide_albedo, mesh, sharpness=DEFAULT_SHARPNESS):
    """Per-image local reflectance constancy: a chromaticity-weighted, sparsity-inducing l2,1 norm over edges.

        loss[b] = (1 / E) sum over mesh edges (i, j) of w_ij sqrt(||a_i - a_j||^2 + REFLECTANCE_EPS^2)
        w_ij = exp(-sharpness ||chroma(guide_i) - chroma(guide_j)||)
        chroma(c) = max(c, 0) / max(max(r, 0) + max(g, 0) + max(b, 0), CHROMA_EPS)

    (Tewari et al. 2018, the local reflectance constancy of the final albedo, weighted by the chromaticity
    similarity of the base albedo.) The norm of each edge's colour DIFFERENCE, not its square, is the
    sparsity-inducing l2,1 norm: it drives most differences to exactly (nearly) zero and lets a few
    edges (skin to lips, brows, blemishes) differ a lot, where a square would blur everything a little.
    REFLECTANCE_EPS = 1e-3 (albedo units, a quarter of an 8-bit level, below what an image can show)
    rounds the norm's kink at 0 so that the gradient is continuous; the constant w_ij * eps it adds to an
    edge of equal colours has no gradient.
    The chromaticity (r, g, b) / (r + g + b) is the colour without its brightness, so shading baked into
    the guide does not split regions; negative albedo (a morphable model can produce it) is clamped to 0
    and CHROMA_EPS = 1e-3 keeps black from dividing by zero (black has chromaticity 0).
    DEFAULT_SHARPNESS = 50: on fastface's default model (mean albedo and random albedos of its prior),
    the chromaticity differences across edges have a median of ~1e-3 and a 90th percentile of ~4e-3
    (skin next to skin: weights 0.95 and 0.83), and a 99th percentile of ~0.07 to a largest ~0.15 (skin
    next to lips or brows: weights 0.03 to 5e-4), so edges inside a region are smoothed and region
    boundaries left free.

    Args:
        albedo: (B, V, 3) float32 (float64 also on the CPU), the final albedo (base + reflectance offsets).
        guide_albedo: (B, V, 3) or (V, 3), albedo's dtype and device: the base albedo the weights come
            from; a constant (no gradient flows to it).
        mesh: corrective_mesh(model).
        sharpness: the weights' sharpness, >= 0 (0: every weight 1).

    Returns:
        (B,) of albedo's dtype.
    """
    xp, albedo, guide, sharpness = _reflectance_args(albedo, guide_albedo, mesh, sharpness)
    B, V, E = albedo.shape[0], albedo.shape[1], mesh.n_edges
    if xp is np:
        tail = (sharpness, REFLECTANCE_EPS, CHROMA_EPS)
    else:
        tail = (np.float32(sharpness), np.float32(REFLECTANCE_EPS), np.float32(CHROMA_EPS),
                np.int64(0 if guide.shape[0] == 1 else 3 * V), np.int32(B), np.int32(V), np.int32(E))
    return _per_image_mean(xp, "reflectance_constancy_fwd", reflectance_constancy_fwd, (albedo, guide, mesh.edges),
                           tail, B, E, albedo.dtype)


def reflectance_constancy_loss_backward(albedo, guide_albedo, mesh, grad_out, sharpness=DEFAULT_SHARPNESS, *,
                                        add_to=None):
    """Gradient of sum_b grad_out[b] reflectance_constancy_loss(...)[b] with respect to albedo (B, V, 3):
    (grad_out[b] / E) sum over v's neighbours j of w_vj (a_v - a_j) / sqrt(||a_v - a_j||^2 + eps^2).
    The guide is a constant: no gradient is returned for it. A new array, or `add_to` (keyword only, as in
    smoothness_loss_backward) with the gradient added into it."""
    original = (("albedo", albedo), ("guide_albedo", guide_albedo), ("grad_out", grad_out))
    xp, albedo, guide, sharpness = _reflectance_args(albedo, guide_albedo, mesh, sharpness)
    grad_out = _check_grad_out(grad_out, albedo, xp)
    grad, accumulate = _gradient_output(xp, add_to, albedo, original)
    B, V, E = albedo.shape[0], albedo.shape[1], mesh.n_edges
    if xp is np:
        reflectance_constancy_bwd(albedo, guide, mesh.neighbour_offsets, mesh.neighbours, grad_out, grad, accumulate,
                                  sharpness, REFLECTANCE_EPS, CHROMA_EPS)
    else:
        _launch_bwd("reflectance_constancy_bwd", B * V, (
            albedo, guide, mesh.neighbour_offsets, mesh.neighbours, grad_out, grad, np.int32(accumulate),
            np.float32(sharpness), np.float32(REFLECTANCE_EPS), np.float32(CHROMA_EPS),
            np.int64(0 if guide.shape[0] == 1 else 3 * V), np.int32(B), np.int32(V), np.int32(E)))
    return grad


def _check_symmetry(mesh, mirror_x):
    if isinstance(mesh, CorrectiveMesh) and mesh.symmetry is None:
        raise ValueError("mesh has no symmetry map (the model's symmetry is None): symmetry_loss needs one")
    if not isinstance(mirror_x, (bool, np.bool_)):
        raise TypeError(f"mirror_x must be True (geometry: mirror x) or False (reflectance); got {mirror_x!r}")
    return bool(mirror_x)


def symmetry_loss(offsets, mesh, mirror_x):
    """Per-image left/right symmetry of an offset field: the mean over v of ||o_v - M o_sym(v)||^2.

    Args:
        offsets: (B, V, 3) float32 (float64 also on the CPU), numpy or cupy like the mesh.
        mesh: corrective_mesh(model) of a model with a symmetry map.
        mirror_x: True for geometry offsets (M = diag(-1, 1, 1): the mirror image of an offset across the
            plane x = 0 negates its x), False for reflectance offsets (M = identity).

    Returns:
        (B,) of offsets' dtype; zero for a field that is its own mirror image.
    """
    xp = _check_field("offsets", offsets, mesh)
    mirror_x = _check_symmetry(mesh, mirror_x)
    offsets = _contiguous(xp, offsets)
    B, V = offsets.shape[0], offsets.shape[1]
    return _per_image_mean(xp, "symmetry_fwd", symmetry_fwd, (offsets, mesh.symmetry),
                           (mirror_x,) if xp is np else (np.int32(mirror_x), np.int32(B), np.int32(V)), B, V,
                           offsets.dtype)


def symmetry_loss_backward(offsets, mesh, grad_out, mirror_x, *, add_to=None):
    """Gradient of sum_b grad_out[b] symmetry_loss(offsets, mesh, mirror_x)[b] (B, V, 3):
    (2 grad_out[b] / V) (d_v - sum over the u with sym(u) = v of M d_u), d_u = o_u - M o_sym(u). A new
    array, or `add_to` (keyword only, as in smoothness_loss_backward) with the gradient added into it."""
    xp = _check_field("offsets", offsets, mesh)
    mirror_x = _check_symmetry(mesh, mirror_x)
    checked_grad_out = _check_grad_out(grad_out, offsets, xp)
    grad, accumulate = _gradient_output(xp, add_to, offsets, (("offsets", offsets), ("grad_out", grad_out)))
    offsets = _contiguous(xp, offsets)
    B, V = offsets.shape[0], offsets.shape[1]
    if xp is np:
        symmetry_bwd(offsets, mesh.symmetry, mesh.mirror_offsets, mesh.mirrored_from, checked_grad_out, grad,
                     accumulate, mirror_x)
    else:
        _launch_bwd("symmetry_bwd", B * V, (offsets, mesh.symmetry, mesh.mirror_offsets, mesh.mirrored_from,
                                            checked_grad_out, grad, np.int32(accumulate), np.int32(mirror_x),
                                            np.int32(B), np.int32(V)))
    return grad
