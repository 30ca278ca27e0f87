"""The forward rendering chain of one face batch: model -> pose -> camera -> shading -> raster.

The pipeline layer: it chains the ops and owns nothing numeric of its own.
Works on numpy (CPU) or cupy (GPU) inputs alike; the model must live on the same device
(`model.to("gpu")`).
"""
import weakref
from dataclasses import dataclass

from fastface._backend import array_module
from fastface._checks import check_finite, value_checks
from fastface.ops.camera import euler_rotation, perspective_projection, rigid_transform
from fastface.ops.normals import vertex_adjacency, vertex_normals
from fastface.ops.rasterize import Raster, rasterize_interpolate
from fastface.ops.shading import sh_shade

__all__ = ["FaceParameters", "Rendering", "render_faces", "uniform_light"]


@dataclass(frozen=True)
class FaceParameters:
    """The per-image parameters of the base level of the face model.

    Attributes:
        shape: (B, n_shape) identity coefficients in standard deviations.
        expression: (B, n_expression) expression coefficients in standard deviations.
        albedo: (B, n_albedo) reflectance coefficients in standard deviations.
        sh: (B, 9, 3) spherical-harmonics illumination (docs/conventions.md).
        angles: (B, 3) Euler angles (pitch, yaw, roll) in radians.
        translation: (B, 3) camera-space translation in the model's units (mm); z < 0 is in front.
    """
    shape: object
    expression: object
    albedo: object
    sh: object
    angles: object
    translation: object


@dataclass(frozen=True)
class Rendering:
    """What `render_faces` produced: the image and every intermediate a loss or a backward needs."""
    image: object          # (B, H, W, 3) float32, black where no face
    mask: object           # (B, H, W) bool, True where a triangle covers the pixel
    raster: Raster
    vertices: object       # (B, V, 3) model-space vertices
    camera_vertices: object  # (B, V, 3) camera-space vertices
    clip: object           # (B, V, 4) clip-space positions
    normals: object        # (B, V, 3) camera-space unit normals
    albedo: object         # (B, V, 3) per-vertex reflectance
    colors: object         # (B, V, 3) shaded per-vertex colours


# The vertex -> triangle lists of each model's mesh, built once per triangle array instead of per call:
# model -> (the triangles it was built from, adjacency). Keyed on the array's identity like
# FaceModel's own topology cache, so assigning new triangles to a model rebuilds it.
_adjacency_of_model = weakref.WeakKeyDictionary()


def _adjacency(model):
    cached = _adjacency_of_model.get(model)
    if cached is None or cached[0] is not model.triangles:
        cached = (model.triangles, vertex_adjacency(model.triangles, model.n_vertices))
        _adjacency_of_model[model] = cached
    return cached[1]


def uniform_light(batch, xp=None, dtype="float32"):
    """(B, 9, 3) SH coefficients under which a surface's colour equals its albedo."""
    import numpy as np
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)):
        raise TypeError(f"batch must be a positive integer; got {batch!r}")
    if batch < 1:
        raise ValueError(f"batch must be a positive integer; got {batch!r}")
    if np.dtype(dtype) not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64; got {np.dtype(dtype)}")
    xp = xp or np
    sh = xp.zeros((batch, 9, 3), dtype=dtype)
    sh[:, 0, :] = 1.0 / (np.pi * 0.28209479177387814)
    return sh


def render_faces(model, params, resolution, focal):
    """Renders a batch of faces of `model` under `params`.

    Args:
        model: a `fastface.FaceModel` on the same device as the parameters.
        params: `FaceParameters`, float32 arrays with a common batch size B.
        resolution: (H, W) of the images.
        focal: focal length in pixels (float).

    Returns:
        `Rendering`.
    """
    array_module(("params.shape", params.shape), ("model.triangles", model.triangles))
    # Value checks where bad numbers can enter: the caller's parameters, the camera-space points
    # (behind the camera, or overflow through the model and pose; perspective_projection checks
    # them) and the shaded colours (overflow through albedo and light). Every other intermediate is
    # an op's output of checked inputs, so its checks are skipped: 9 checks instead of 16, each a
    # kernel launch on the GPU. Shape and dtype checks always run.
    for name in ("shape", "expression", "albedo", "sh", "angles", "translation"):
        value = getattr(params, name)
        if hasattr(value, "dtype"):  # anything else gets the op's TypeError below
            check_finite(f"params.{name}", value)
    with value_checks(False):
        vertices, albedo = model.evaluate(params.shape, params.expression, params.albedo)
        rotation = euler_rotation(params.angles)
        camera_vertices = rigid_transform(vertices, rotation, params.translation)
    clip = perspective_projection(camera_vertices, focal, resolution)
    with value_checks(False):
        normals = vertex_normals(camera_vertices, model.triangles, adjacency=_adjacency(model))
        colors = sh_shade(normals, albedo, params.sh)
    check_finite("colors", colors)
    with value_checks(False):
        raster, image = rasterize_interpolate(clip, model.triangles, resolution, colors)
    return Rendering(image=image, mask=raster.tri_id >= 0, raster=raster, vertices=vertices,
                     camera_vertices=camera_vertices, clip=clip, normals=normals, albedo=albedo,
                     colors=colors)
