"""The forward rendering chain of one face batch: model -> pose -> camera -> shading -> raster.

The pipeline layer: it chains the ops and owns nothing numeric of its own.
Works on numpy (CPU) or cupy (GPU) inputs alike; the model must live on the same device
(`model.to("gpu")`).
"""
import weakref
from dataclasses import dataclass

from fastface._backend import array_module
import numpy as np

from fastface._checks import check_accumulator, check_array, check_finite, value_checks
from fastface.ops.antialias import antialias as antialias_op
from fastface.ops.antialias import antialias_backward, antialias_topology, silhouette_pixels
from fastface.ops.camera import (euler_rotation, euler_rotation_backward, perspective_projection,
                                 perspective_projection_backward, project_to_pixels, project_to_pixels_backward,
                                 rigid_transform, rigid_transform_backward)
from fastface.ops.normals import vertex_adjacency, vertex_normals
from fastface.ops.rasterize import Raster, rasterize_interpolate, rasterize_interpolate_backward
from fastface.ops.shading import sh_shade, shade_vertices_backward

__all__ = ["FaceGradients", "FaceParameters", "Rendering", "render_faces", "render_faces_backward", "uniform_light"]


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
    rotation: object = None   # (B, 3, 3) the pose's rotation matrices
    landmarks: object = None  # (B, 68, 2) pixel coordinates of the model's landmarks, or None
    composited: object = None  # with antialias: the face over the background before the blend
    silhouettes: object = None  # with antialias: silhouette_pixels (found once for forward and backward)


@dataclass(frozen=True)
class FaceGradients:
    """What `render_faces_backward` returns: the gradients of a loss with respect to the inputs."""
    params: FaceParameters  # gradients of every parameter, shaped like them
    vertices: object        # (B, V, 3) gradient of the model-space vertices (base plus offsets)
    albedo: object          # (B, V, 3) gradient of the per-vertex reflectance (base plus offsets)


# The vertex -> triangle lists of each model's mesh, built once per triangle array instead of per call:
# model -> (the triangles it was built from, adjacency). Keyed on the array's identity like
# FaceModel's own topology cache, so assigning new triangles to a model rebuilds it.
_adjacency_of_model = weakref.WeakKeyDictionary()


# Each model's edge -> far vertex table for antialias, built once per triangle array.
_antialias_topology_of_model = weakref.WeakKeyDictionary()


def _antialias_topology(model):
    cached = _antialias_topology_of_model.get(model)
    if cached is None or cached[0] is not model.triangles:
        cached = (model.triangles, antialias_topology(model.triangles))
        _antialias_topology_of_model[model] = cached
    return cached[1]


def _adjacency(model):
    cached = _adjacency_of_model.get(model)
    if cached is None or cached[0] is not model.triangles:
        cached = (model.triangles, vertex_adjacency(model.triangles, model.n_vertices))
        _adjacency_of_model[model] = cached
    return cached[1]


def uniform_light(batch, xp=None, dtype="float32"):
    """(B, 9, 3) SH coefficients under which a surface's colour equals its albedo."""
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


def render_faces(model, params, resolution, focal, geometry_offsets=None, reflectance_offsets=None, antialias=False,
                 background=None, evaluated=None):
    """Renders a batch of faces of `model` under `params`.

    Args:
        model: a `fastface.FaceModel` on the same device as the parameters.
        params: `FaceParameters`, float32 arrays with a common batch size B.
        resolution: (H, W) of the images.
        focal: focal length in pixels (float).
        geometry_offsets: optional (B, V, 3) model-space offsets (mm) added to the morphable
            model's vertices before the pose: the corrective level of the multi-level model.
        reflectance_offsets: optional (B, V, 3) offsets added to the model's albedo.
        antialias: blend across the face's outline (fastface.antialias, analytic): the image becomes
            a continuous function of the outline's vertices, so a loss on it pulls on the outline
            (render_faces_backward gives those gradients). Off by default: the blend costs about a
            third of the rasterizer's time.
        background: with antialias, the (B, H, W, 3) image the outline blends into (a photo being
            fitted, say); black when None. `image` then shows the face over it.
        evaluated: optional (vertices, albedo), each (B, V, 3), that `model.evaluate` gave for these
            parameters' shape, expression and albedo (a base-level Rendering's `vertices` and `albedo`):
            a second level rendered from the same parameters then skips the model's GEMMs (the
            training step renders both levels: at batch 64 on an H200 the evaluation cost 258 us).

    Returns:
        `Rendering`; its `vertices` and `albedo` include the offsets.
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
    if evaluated is None:
        with value_checks(False):
            vertices, albedo = model.evaluate(params.shape, params.expression, params.albedo)
    else:
        vertices, albedo = _check_evaluated(model, params, evaluated)
    vertices = _add_offsets("geometry_offsets", vertices, geometry_offsets)
    albedo = _add_offsets("reflectance_offsets", albedo, reflectance_offsets)
    with value_checks(False):
        rotation = euler_rotation(params.angles)
        camera_vertices = rigid_transform(vertices, rotation, params.translation)
    clip = perspective_projection(camera_vertices, focal, resolution)
    with value_checks(False):
        normals = vertex_normals(camera_vertices, model.triangles, adjacency=_adjacency(model))
        colors = sh_shade(normals, albedo, params.sh)
    check_finite("colors", colors)
    with value_checks(False):
        raster, image = rasterize_interpolate(clip, model.triangles, resolution, colors)
        composited = silhouettes = None
        mask = raster.tri_id >= 0
        if antialias:
            if background is not None:
                array_module(("background", background), ("the model's arrays", model.mean_shape))
                check_array("background", background, image.dtype, tuple(image.shape))
                check_finite("background", background)
                composited = image + (~mask)[..., None] * background
            else:
                composited = image
            silhouettes = silhouette_pixels(raster, clip, model.triangles, topology=_antialias_topology(model))
            image = antialias_op(composited, raster, clip, model.triangles, silhouettes=silhouettes)
        elif background is not None:
            raise ValueError("background is used with antialias=True only")
        landmarks = None
        if model.landmarks is not None:
            landmarks = project_to_pixels(camera_vertices[:, model.landmarks], focal, resolution)
    return Rendering(image=image, mask=mask, raster=raster, vertices=vertices,
                     camera_vertices=camera_vertices, clip=clip, normals=normals, albedo=albedo,
                     colors=colors, rotation=rotation, landmarks=landmarks, composited=composited,
                     silhouettes=silhouettes)


def _check_evaluated(model, params, evaluated):
    """The (vertices, albedo) pair given as `evaluated`, checked against the model and the parameters."""
    if not isinstance(evaluated, (tuple, list)) or len(evaluated) != 2:
        raise TypeError(f"evaluated must be a (vertices, albedo) pair from model.evaluate; got "
                        f"{type(evaluated).__name__}")
    shape = (params.shape.shape[0], model.n_vertices, 3)
    for name, a in zip(("evaluated[0] (vertices)", "evaluated[1] (albedo)"), evaluated):
        array_module((name, a), ("the model's arrays", model.mean_shape))
        check_array(name, a, params.shape.dtype, shape)
    return evaluated[0], evaluated[1]


def _add_offsets(name, base, offsets):
    """base + offsets, the offsets checked against the base's shape, dtype and device."""
    if offsets is None:
        return base
    array_module((name, offsets), ("the model's arrays", base))
    check_array(name, offsets, base.dtype, tuple(base.shape))
    check_finite(name, offsets)
    return base + offsets


def render_faces_backward(model, params, rendering, resolution, focal, grad_image=None, grad_landmarks=None,
                          model_backward=True, add_to=None):
    """Gradients of a loss through `render_faces`, from its image and its landmarks back to the inputs.

    The chain of `render_faces` walked in reverse: interpolation and rasterization (coverage held
    fixed), projection, the fused normals + SH shading, landmark projection, the pose, and the
    morphable model.

    Args:
        model, params, resolution, focal: as given to `render_faces`.
        rendering: the `Rendering` it returned.
        grad_image: (B, H, W, 3) gradient of the loss with respect to `rendering.image`, or None.
        grad_landmarks: (B, 68, 2) gradient with respect to `rendering.landmarks`, or None.
        model_backward: False stops before the morphable model: `params.shape`, `.expression` and
            `.albedo` are None, and the caller passes `vertices` and `albedo` to
            `model.evaluate_backward` itself (the training step adds both levels' gradients first and
            runs the model's GEMMs once: they are linear).
        add_to: with model_backward=False, an optional (vertices, albedo) pair of C-contiguous (B, V, 3)
            arrays that the model-space vertex and albedo gradients are added into, in the kernels that
            make them (returned as `vertices` and `albedo`): the training step sums its two levels so.

    Returns:
        `FaceGradients`. The gradient of the offsets given to `render_faces` equals
        `vertices` (geometry) and `albedo` (reflectance): they enter by addition.
    """
    if grad_image is None and grad_landmarks is None:
        raise ValueError("render_faces_backward needs grad_image or grad_landmarks (or both)")
    r = rendering
    xp = array_module(("rendering.camera_vertices", r.camera_vertices), ("grad_image", grad_image),
                      ("grad_landmarks", grad_landmarks))
    B, V = r.camera_vertices.shape[0], r.camera_vertices.shape[1]
    if grad_image is not None:
        check_array("grad_image", grad_image, r.image.dtype, tuple(r.image.shape))
        check_finite("grad_image", grad_image)
    if grad_landmarks is not None:
        if r.landmarks is None:
            raise ValueError("grad_landmarks is given but the model has no landmarks")
        check_array("grad_landmarks", grad_landmarks, r.landmarks.dtype, tuple(r.landmarks.shape))
        check_finite("grad_landmarks", grad_landmarks)
    dtype = r.camera_vertices.dtype
    add_vertices = add_albedo = None
    if add_to is not None:
        if model_backward:
            raise ValueError("add_to needs model_backward=False (the model's backward would see the sum)")
        if not isinstance(add_to, (tuple, list)) or len(add_to) != 2:
            raise TypeError(f"add_to must be a (vertices, albedo) pair of arrays; got {type(add_to).__name__}")
        add_vertices, add_albedo = add_to
        check_accumulator("add_to[0] (vertices)", add_vertices, r.vertices, xp)
        check_accumulator("add_to[1] (albedo)", add_albedo, r.albedo, xp)
    with value_checks(False):
        if grad_image is not None:
            grad_clip_blend = None
            if r.composited is not None:  # antialiased: through the blend, then to the face's pixels
                grad_image, grad_clip_blend = antialias_backward(r.composited, r.raster, r.clip, model.triangles,
                                                                 grad_image, topology=_antialias_topology(model),
                                                                 silhouettes=r.silhouettes)
                grad_image = grad_image * r.mask[..., None]
            grad_clip, grad_colors = rasterize_interpolate_backward(r.clip, model.triangles, r.colors, r.raster,
                                                                    grad_image)
            if grad_clip_blend is not None:
                grad_clip += grad_clip_blend
            grad_camera, grad_albedo, grad_sh = shade_vertices_backward(
                r.camera_vertices, model.triangles, r.albedo, params.sh, grad_colors, adjacency=_adjacency(model),
                add_to_albedo=add_albedo)
            # The projection's gradient added into the shading's in its own kernel (no third array).
            perspective_projection_backward(r.camera_vertices, focal, resolution, grad_clip, add_to=grad_camera)
        else:
            grad_camera = xp.zeros((B, V, 3), dtype=dtype)
            if add_albedo is None:
                grad_albedo = xp.zeros((B, V, 3), dtype=dtype)
            else:  # nothing to add: the albedo does not reach the landmarks
                grad_albedo = add_albedo
            grad_sh = xp.zeros((B, 9, 3), dtype=dtype)
        if grad_landmarks is not None:
            index = model.landmarks
            grad_points = project_to_pixels_backward(r.camera_vertices[:, index], focal, resolution, grad_landmarks)
            _scatter_add_rows(xp, grad_camera, index, grad_points, model)
        grad_vertices, grad_rotation, grad_translation = rigid_transform_backward(
            r.vertices, r.rotation, params.translation, grad_camera, add_to=add_vertices)
        grad_angles = euler_rotation_backward(params.angles, grad_rotation)
        grad_shape = grad_expression = grad_albedo_coeffs = None
        if model_backward:
            grad_shape, grad_expression, grad_albedo_coeffs = model.evaluate_backward(grad_vertices, grad_albedo)
    grads = FaceParameters(shape=grad_shape, expression=grad_expression, albedo=grad_albedo_coeffs, sh=grad_sh,
                           angles=grad_angles, translation=grad_translation)
    return FaceGradients(params=grads, vertices=grad_vertices, albedo=grad_albedo)


# Whether each model's landmark indices are distinct (then a fancy-indexed += adds every row once);
# checked once per landmark array, on the host.
_landmarks_distinct = weakref.WeakKeyDictionary()


def _scatter_add_rows(xp, target, index, rows, model):
    """target[:, index] += rows, adding repeated indices as many times as they occur."""
    cached = _landmarks_distinct.get(model)
    if cached is None or cached[0] is not index:
        host = index.get() if hasattr(index, "get") else index
        cached = (index, len(np.unique(host)) == len(host))
        _landmarks_distinct[model] = cached
    if cached[1]:
        target[:, index] += rows
    else:
        for k in range(rows.shape[1]):  # rare: a model whose landmark list repeats a vertex
            target[:, index[k]] += rows[:, k]
