"""The learned corrective space of the multi-level face model, and the regularizers of its offsets.

Tewari et al., "Self-supervised Multi-level Face Model Learning for Monocular Reconstruction at over
250 Hz" (CVPR 2018): besides the morphable model's coefficients, the encoder regresses two codes,
z_geo and z_ref, that linear decoders learned jointly with the encoder turn into per-vertex offsets:

    geometry_offsets    (B, V, 3) = (z_geo (B, K_g) @ geometry_basis    (K_g, 3V)).reshape(B, V, 3)   mm
    reflectance_offsets (B, V, 3) = (z_ref (B, K_r) @ reflectance_basis (K_r, 3V)).reshape(B, V, 3)   albedo

The final level is the base (morphable model) level plus these offsets. Both bases live in ONE flat
buffer (`flat_params`, with `flat_grads` of the same layout), so `fastface.nn.Adam(space)` updates
them in one fused step, as it does an `Encoder`. Each decoder is one GEMM forward and two backward
(fastface/nn/_gemm.py: numpy BLAS on the CPU, cuBLAS on the GPU, into preallocated outputs).

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
"""
import numpy as np

from fastface._backend import array_module, cupy_or_none, is_cupy_array
from fastface._checks import check_array, check_finite, check_same_batch, describe
from fastface.nn._gemm import gemm

__all__ = ["CorrectiveSpace", "DEFAULT_GEOMETRY", "DEFAULT_REFLECTANCE", "DEFAULT_INIT_STD", "FORMAT_VERSION"]

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

    def to(self, device):
        """Moves the bases to "cpu" (numpy) or "gpu" (cupy); returns self.

        The gradients are reset to zero; an optimizer made before must be made again.
        """
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")
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

    def evaluate(self, z_geo, z_ref):
        """Per-vertex offsets of a batch of codes.

        Args:
            z_geo: (B, n_geometry) float32 (the space's dtype), numpy or cupy like the bases.
            z_ref: (B, n_reflectance), same dtype and device.

        Returns:
            (geometry_offsets (B, V, 3) in mm, reflectance_offsets (B, V, 3) in albedo units), new arrays
            of the space's dtype on its device.
        """
        xp = self._check_codes(z_geo, z_ref)
        batch, n = z_geo.shape[0], 3 * self.n_vertices
        out = []
        for z, basis in ((z_geo, self.geometry_basis), (z_ref, self.reflectance_basis)):
            offsets = xp.empty((batch, n), dtype=self.dtype)
            gemm(xp.ascontiguousarray(z), basis, offsets)
            out.append(offsets.reshape(batch, self.n_vertices, 3))
        return out[0], out[1]

    def backward(self, z_geo, z_ref, grad_geometry, grad_reflectance):
        """Gradients of the codes; OVERWRITES `flat_grads` (`grads`) with the gradients of the bases.

        Args:
            z_geo, z_ref: the codes given to `evaluate`.
            grad_geometry, grad_reflectance: (B, V, 3) gradients of `evaluate`'s outputs, the space's dtype
                and device; either may be None (zero).

        Returns:
            (grad_z_geo (B, n_geometry), grad_z_ref (B, n_reflectance)):
            grad_z = grad_offsets.reshape(B, 3V) @ basis^T; the basis gradient is z^T @ grad_offsets.
        """
        xp = self._check_codes(z_geo, z_ref, (("grad_geometry", grad_geometry),
                                               ("grad_reflectance", grad_reflectance)))
        batch, n = z_geo.shape[0], 3 * self.n_vertices
        out = []
        for z, grad, name in ((z_geo, grad_geometry, "geometry_basis"),
                              (z_ref, grad_reflectance, "reflectance_basis")):
            grad_z = xp.empty(z.shape, dtype=self.dtype)
            if grad is None:
                grad_z[...] = 0
                self.grads[name][...] = 0
            else:
                flat = xp.ascontiguousarray(grad).reshape(batch, n)
                gemm(flat, self.params[name], grad_z, trans_b=True)
                gemm(xp.ascontiguousarray(z), flat, self.grads[name], trans_a=True)
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
