"""Pose and camera: Euler rotations, rigid transforms, perspective projection, pixel projection.

Conventions (docs/conventions.md): camera space is OpenGL's, x right, y up, the camera
looking down -z, so points in front of it have z < 0. Euler angles (B, 3) are (pitch about x,
yaw about y, roll about z) in radians with R = Rz(roll) @ Ry(yaw) @ Rx(pitch), i.e. scipy's
`Rotation.from_euler("xyz", angles)` (extrinsic x, then y, then z). The focal length f is in
pixels, the principal point at the image centre. Pixel coordinates are (x = column, y = row) with
pixel (i, j)'s centre at (x = j, y = i), matching the NDC convention: x = 2 (x_pix + 0.5) / W - 1,
y = 1 - 2 (y_pix + 0.5) / H.

The focal length is not differentiated: the backward functions return gradients of the points
(and of rotation and translation), not of the focal length, which fastface keeps fixed.

Every op has a Numba kernel here and a CUDA twin in kernels/camera.cu (one thread per batch element
for `euler_rotation`, per vertex for the others).
"""
import numba
import numpy as np

from fastface._accumulate import store3
from fastface._backend import NULL_POINTER, KernelFile, array_module, grid_1d, images_on_grid_y
from fastface._checks import (check_accumulator, check_array, check_finite, check_float, check_resolution,
                              check_same_batch, float_dtypes, queue_on_device, value_checks_enabled)

__all__ = [
    "euler_rotation", "euler_rotation_backward",
    "rigid_transform", "rigid_transform_backward",
    "perspective_projection", "perspective_projection_backward",
    "project_to_pixels", "project_to_pixels_backward",
]

_BLOCK = 256
_VERTICES_PER_THREAD = 8   # rigid_transform backward: amortises each block's 12-value reduction
_CHUNK = 1024              # CPU backward: vertices per chunk; partials summed in chunk order


_float_dtypes = float_dtypes  # fastface/_checks.py, shared by the ops
_check_float = check_float


_kernel = KernelFile("camera.cu", (
    "euler_rotation_fwd", "euler_rotation_bwd",
    "rigid_transform_fwd<false>", "rigid_transform_fwd<true>",
    "rigid_transform_bwd<false>", "rigid_transform_bwd<true>",
    "perspective_projection_fwd", "perspective_projection_bwd", "project_to_pixels_fwd", "project_to_pixels_bwd"))


# ---------------------------------------------------------------------------------------------
# Euler rotation

@numba.njit(cache=True)
def _euler_matrix(cp, sp, cy, sy, cr, sr, r):
    """R = Rz(roll) Ry(yaw) Rx(pitch) written out into the (3, 3) array r (kernels/camera.cu's euler_matrix)."""
    r[0, 0] = cr * cy
    r[0, 1] = cr * sy * sp - sr * cp
    r[0, 2] = cr * sy * cp + sr * sp
    r[1, 0] = sr * cy
    r[1, 1] = sr * sy * sp + cr * cp
    r[1, 2] = sr * sy * cp - cr * sp
    r[2, 0] = -sy
    r[2, 1] = cy * sp
    r[2, 2] = cy * cp


# Numba rather than (B, 3, 3) numpy array math on the CPU: the matrix products took ~30 small array
# operations per call (~90 us forward, ~105 us backward at B = 1, against ~7 and ~13 us here), and the
# twin keeps the CPU on the CUDA kernels' formulas. Sequential (no prange): B is a few images of ~40
# flops each, far less than the cost of waking a thread pool.

@numba.njit(cache=True)
def euler_rotation_fwd(angles, rotation):
    """One iteration per batch element: angles (B, 3) (pitch, yaw, roll) -> rotation (B, 3, 3)."""
    for b in range(angles.shape[0]):
        _euler_matrix(np.cos(angles[b, 0]), np.sin(angles[b, 0]), np.cos(angles[b, 1]), np.sin(angles[b, 1]),
                      np.cos(angles[b, 2]), np.sin(angles[b, 2]), rotation[b])


@numba.njit(cache=True)
def euler_rotation_bwd(angles, grad_out, grad_angles):
    """One iteration per batch element: grad_angles (B, 3) = <grad_out (B, 3, 3), dR/d angle>.

    d/dpitch turns R's columns (1, 2) into (2, -1) (Rx is the right factor), d/droll turns its rows
    (0, 1) into (-1, 0) (Rz is the left factor), and d/dyaw = Rz dRy Rx has the rows cr u, sr u and w,
    with u = (-sy, cy sp, cy cp) and w = (-cy, -sy sp, -sy cp).
    """
    r = np.empty((3, 3), dtype=angles.dtype)
    for b in range(angles.shape[0]):
        cp, sp = np.cos(angles[b, 0]), np.sin(angles[b, 0])
        cy, sy = np.cos(angles[b, 1]), np.sin(angles[b, 1])
        cr, sr = np.cos(angles[b, 2]), np.sin(angles[b, 2])
        _euler_matrix(cp, sp, cy, sy, cr, sr, r)
        g = grad_out[b]
        u0, u1, u2 = -sy, cy * sp, cy * cp
        w0, w1, w2 = -cy, -sy * sp, -sy * cp
        grad_angles[b, 0] = ((g[0, 1] * r[0, 2] - g[0, 2] * r[0, 1]) + (g[1, 1] * r[1, 2] - g[1, 2] * r[1, 1])
                             + (g[2, 1] * r[2, 2] - g[2, 2] * r[2, 1]))
        grad_angles[b, 1] = (((cr * g[0, 0] + sr * g[1, 0]) * u0 + g[2, 0] * w0)
                             + ((cr * g[0, 1] + sr * g[1, 1]) * u1 + g[2, 1] * w1)
                             + ((cr * g[0, 2] + sr * g[1, 2]) * u2 + g[2, 2] * w2))
        grad_angles[b, 2] = ((g[1, 0] * r[0, 0] - g[0, 0] * r[1, 0]) + (g[1, 1] * r[0, 1] - g[0, 1] * r[1, 1])
                             + (g[1, 2] * r[0, 2] - g[0, 2] * r[1, 2]))


def _check_angles(angles):
    xp = array_module(("angles", angles))
    batched = _check_float(xp, "angles", angles, ("B", 3), (3,)) == 0
    check_finite("angles", angles)
    return xp, batched, xp.ascontiguousarray(angles if batched else angles[None])


def euler_rotation(angles):
    """Rotation matrices from Euler angles, R = Rz(roll) @ Ry(yaw) @ Rx(pitch).

    Args:
        angles: (B, 3) or (3,) float32 (float64 also on the CPU) (pitch, yaw, roll) in radians,
            numpy or cupy.

    Returns:
        (B, 3, 3) (or (3, 3)) rotation matrices, the dtype of angles.
    """
    xp, batched, a = _check_angles(angles)
    B = a.shape[0]
    rotation = xp.empty((B, 3, 3), dtype=a.dtype)
    if xp is np:
        euler_rotation_fwd(a, rotation)
    else:
        _kernel("euler_rotation_fwd")(*grid_1d(B, _BLOCK), (a, rotation, np.int32(B)))
    return rotation if batched else rotation[0]


def euler_rotation_backward(angles, grad_out):
    """Gradient of `euler_rotation`.

    Args:
        angles: as for `euler_rotation`.
        grad_out: (B, 3, 3) (or (3, 3)) gradient of the rotation matrices, the dtype of angles.

    Returns:
        grad_angles shaped like angles.
    """
    xp, batched, a = _check_angles(angles)
    array_module(("angles", angles), ("grad_out", grad_out))
    check_array("grad_out", grad_out, angles.dtype, tuple(angles.shape[:-1]) + (3, 3))
    check_finite("grad_out", grad_out)
    g = xp.ascontiguousarray(grad_out if batched else grad_out[None])
    B = a.shape[0]
    grad_angles = xp.empty((B, 3), dtype=a.dtype)
    if xp is np:
        euler_rotation_bwd(a, g, grad_angles)
    else:
        _kernel("euler_rotation_bwd")(*grid_1d(B, _BLOCK), (a, g, grad_angles, np.int32(B)))
    return grad_angles if batched else grad_angles[0]


# ---------------------------------------------------------------------------------------------
# CPU kernels (Numba twins of kernels/camera.cu, same argument order)

@numba.njit(cache=True, parallel=True)
def rigid_transform_fwd(points, rotation, translation, out):
    """One iteration per (batch, vertex). points is (B, V, 3), or (1, V, 3) shared by the batch."""
    B, V = out.shape[0], out.shape[1]
    shared = points.shape[0] != B
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        pb = 0 if shared else b
        x, y, z = points[pb, v, 0], points[pb, v, 1], points[pb, v, 2]
        for r in range(3):
            out[b, v, r] = rotation[b, r, 0] * x + rotation[b, r, 1] * y + rotation[b, r, 2] * z + translation[b, r]


@numba.njit(cache=True, parallel=True)
def rigid_transform_bwd(points, rotation, translation, grad_out, grad_points, grad_rotation, grad_translation,
                        accumulate):
    """Chunks of vertices in parallel, batch sequential inside: a chunk owns its vertices' grad_points
    (also when the points are shared by the batch) and its own grad_rotation/grad_translation partial.
    accumulate: add grad_points to what the array holds."""
    B, V = grad_out.shape[0], grad_out.shape[1]
    shared = points.shape[0] != B
    n_chunks = (V + _CHUNK - 1) // _CHUNK
    partial = np.zeros((n_chunks, B, 3, 4))  # [..., :3] rotation, [..., 3] translation
    if shared and not accumulate:
        grad_points[:] = 0.0
    for chunk in numba.prange(n_chunks):
        for b in range(B):
            pb = 0 if shared else b
            for v in range(chunk * _CHUNK, min(V, (chunk + 1) * _CHUNK)):
                g0, g1, g2 = grad_out[b, v, 0], grad_out[b, v, 1], grad_out[b, v, 2]
                for j in range(3):
                    gp = rotation[b, 0, j] * g0 + rotation[b, 1, j] * g1 + rotation[b, 2, j] * g2
                    if shared:
                        grad_points[0, v, j] += gp
                    elif accumulate:
                        grad_points[b, v, j] += gp
                    else:
                        grad_points[b, v, j] = gp
                for r in range(3):
                    g = grad_out[b, v, r]
                    for j in range(3):
                        partial[chunk, b, r, j] += g * points[pb, v, j]
                    partial[chunk, b, r, 3] += g
    for b in range(B):
        for r in range(3):
            for j in range(4):
                s = 0.0
                for chunk in range(n_chunks):
                    s += partial[chunk, b, r, j]
                if j < 3:
                    grad_rotation[b, r, j] = s
                else:
                    grad_translation[b, r] = s


# The projections take the focal as `focal` (B,) and `focal_scalar`, and use the scalar when `focal` is
# empty: the CUDA twins get a null pointer there, so that a scalar focal costs no (B,) array on the GPU.

@numba.njit(cache=True, parallel=True)
def perspective_projection_fwd(points, focal, focal_scalar, out, height, width, near, far):
    """One iteration per (batch, vertex): OpenGL clip coordinates."""
    B, V = points.shape[0], points.shape[1]
    za, zb = (far + near) / (near - far), 2.0 * far * near / (near - far)
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        f = focal[b] if focal.shape[0] != 0 else focal_scalar
        z = points[b, v, 2]
        out[b, v, 0] = (2.0 * f / width) * points[b, v, 0]
        out[b, v, 1] = (2.0 * f / height) * points[b, v, 1]
        out[b, v, 2] = za * z + zb
        out[b, v, 3] = -z


@numba.njit(cache=True, parallel=True)
def perspective_projection_bwd(points, focal, focal_scalar, grad_out, grad_points, height, width, near, far,
                               accumulate):
    B, V = points.shape[0], points.shape[1]
    za = (far + near) / (near - far)
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        f = focal[b] if focal.shape[0] != 0 else focal_scalar
        gx = (2.0 * f / width) * grad_out[b, v, 0]
        gy = (2.0 * f / height) * grad_out[b, v, 1]
        gz = za * grad_out[b, v, 2] - grad_out[b, v, 3]
        store3(grad_points, b, v, gx, gy, gz, accumulate)


@numba.njit(cache=True, parallel=True)
def project_to_pixels_fwd(points, focal, focal_scalar, out, height, width):
    """One iteration per (batch, vertex): x_pix = f x / -z + W/2 - 0.5, y_pix = -f y / -z + H/2 - 0.5."""
    B, V = points.shape[0], points.shape[1]
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        s = (focal[b] if focal.shape[0] != 0 else focal_scalar) / -points[b, v, 2]
        out[b, v, 0] = s * points[b, v, 0] + 0.5 * width - 0.5
        out[b, v, 1] = -s * points[b, v, 1] + 0.5 * height - 0.5


@numba.njit(cache=True, parallel=True)
def project_to_pixels_bwd(points, focal, focal_scalar, grad_out, grad_points, height, width):
    """With s = f / -z: d x_pix = s dx + s x / -z dz, d y_pix = -s dy - s y / -z dz."""
    B, V = points.shape[0], points.shape[1]
    for i in numba.prange(B * V):
        b, v = i // V, i % V
        inv_w = 1.0 / -points[b, v, 2]
        s = (focal[b] if focal.shape[0] != 0 else focal_scalar) * inv_w
        gx, gy = grad_out[b, v, 0], grad_out[b, v, 1]
        grad_points[b, v, 0] = s * gx
        grad_points[b, v, 1] = -s * gy
        grad_points[b, v, 2] = s * inv_w * (points[b, v, 0] * gx - points[b, v, 1] * gy)


# ---------------------------------------------------------------------------------------------
# Dispatch

def rigid_transform(points, rotation, translation):
    """R p + t for every point.

    Args:
        points: (B, V, 3), or (V, 3) shared by the batch; float32 (float64 also on the CPU).
        rotation: (B, 3, 3), the dtype of points.
        translation: (B, 3), the dtype of points.

    Returns:
        (B, V, 3) transformed points.
    """
    xp, p3, r, t, _ = _prepare_rigid(points, rotation, translation)
    B, V = r.shape[0], p3.shape[1]
    out = xp.empty((B, V, 3), dtype=p3.dtype)
    if xp is np:
        rigid_transform_fwd(p3, r, t, out)
    else:
        shared = "true" if p3.shape[0] != B else "false"
        _kernel(f"rigid_transform_fwd<{shared}>")(
            ((V + _BLOCK - 1) // _BLOCK, images_on_grid_y(B, "rigid_transform")), (_BLOCK,),
            (p3, r, t, out, np.int32(B), np.int32(V)))
    return out


def rigid_transform_backward(points, rotation, translation, grad_out, *, add_to=None):
    """Gradients of `rigid_transform`.

    Args:
        points, rotation, translation: as for `rigid_transform`.
        grad_out: (B, V, 3) gradient of the transformed points.
        add_to: keyword only, optional C-contiguous array shaped and typed like points, on their device:
            grad_points is added into it in place (and it is returned as grad_points). The training step
            adds one level's vertex gradient to the other's this way, without a pass over a third array.

    Returns:
        (grad_points, grad_rotation, grad_translation) shaped like the inputs (grad_points summed
        over the batch when the points are shared). On the GPU the sums over vertices are made per
        block and added with one atomicAdd per block and entry: their last bits depend on the
        order the blocks finish in.
    """
    xp, p3, r, t, g = _prepare_rigid(points, rotation, translation, grad_out, backward=True)
    B, V = r.shape[0], p3.shape[1]
    shared = p3.shape[0] != B
    accumulate = add_to is not None
    if accumulate:
        reads = (("points", points), ("grad_out", grad_out))
        grad_points = check_accumulator("add_to", add_to, points, xp, reads).reshape(p3.shape)
    if xp is np:
        if not accumulate:
            grad_points = np.empty_like(p3)
        grad_rotation, grad_translation = np.empty_like(r), np.empty_like(t)
        rigid_transform_bwd(p3, r, t, g, grad_points, grad_rotation, grad_translation, accumulate)
    else:
        if not accumulate:
            grad_points = xp.zeros_like(p3) if shared else xp.empty_like(p3)
        grad_rotation, grad_translation = xp.zeros_like(r), xp.zeros_like(t)
        blocks = max(1, (V + _BLOCK * _VERTICES_PER_THREAD - 1) // (_BLOCK * _VERTICES_PER_THREAD))
        _kernel(f"rigid_transform_bwd<{'true' if shared else 'false'}>")(
            (blocks, images_on_grid_y(B, "rigid_transform_backward")), (_BLOCK,),
            (p3, r, t, g, grad_points, grad_rotation, grad_translation, np.int32(B), np.int32(V),
             np.int32(accumulate)))
    if accumulate:
        return add_to, grad_rotation, grad_translation
    return (grad_points[0] if points.ndim == 2 else grad_points), grad_rotation, grad_translation


def _prepare_rigid(points, rotation, translation, grad_out=None, backward=False):
    xp = array_module(("points", points), ("rotation", rotation), ("translation", translation),
                      ("grad_out", grad_out))
    points_batched = _check_float(xp, "points", points, ("B", "V", 3), ("V", 3)) == 0
    dtype = points.dtype
    check_array("rotation", rotation, dtype, ("B", 3, 3))
    check_array("translation", translation, dtype, ("B", 3))
    check_same_batch(("rotation", "translation") + (("points",) if points_batched else ()),
                     (rotation, translation) + ((points,) if points_batched else ()))
    if backward:  # a None grad_out fails here with a TypeError naming it
        check_array("grad_out", grad_out, dtype, (rotation.shape[0], points.shape[-2], 3))
        check_finite("grad_out", grad_out)
    for name, a in (("points", points), ("rotation", rotation), ("translation", translation)):
        check_finite(name, a)
    c = xp.ascontiguousarray
    p3 = c(points if points_batched else points[None])
    return xp, p3, c(rotation), c(translation), (c(grad_out) if backward else None)


def _check_near_far(near, far):
    """near and far as floats with 0 < near < far < inf."""
    try:
        near_f, far_f = float(near), float(far)
    except (TypeError, ValueError):
        raise TypeError(f"near and far must be numbers; got near={near!r}, far={far!r}") from None
    if not (0 < near_f < far_f < np.inf):
        raise ValueError(f"near and far must satisfy 0 < near < far < inf; got near={near_f}, far={far_f}")
    return near_f, far_f


# What the kernels get for "no per-image focal": an empty array on the CPU, a null pointer on the GPU
# (fastface._backend.NULL_POINTER; not None, see there).
_NO_FOCAL_ARRAY = {np.dtype(t): np.empty(0, dtype=t) for t in (np.float32, np.float64)}


def _prepare_camera(points, focal, resolution, grad_out=None, grad_width=None, near=None, far=None):
    """Checks the inputs of the projections.

    Returns (xp, batched, points (B, V, 3), focal_args, H, W, grad, near, far). focal_args is the kernels'
    (focal, focal_scalar) pair: the (B,) array and a zero, or no array (empty on the CPU, a null
    pointer on the GPU) and the scalar in the dtype of the points, so a scalar focal allocates nothing.
    """
    focal_is_array = not isinstance(focal, (int, float, np.generic))
    if focal_is_array and not (hasattr(focal, "dtype") and hasattr(focal, "shape")):
        raise TypeError(f"focal must be a positive number of pixels or a (B,) array of them; got "
                        f"{type(focal).__name__}")
    xp = array_module(("points", points), ("focal", focal if focal_is_array else None), ("grad_out", grad_out))
    batched = _check_float(xp, "points", points, ("B", "V", 3), ("V", 3)) == 0
    dtype = points.dtype
    p3 = xp.ascontiguousarray(points if batched else points[None])
    B = p3.shape[0]
    height, width = check_resolution("resolution", resolution)
    if focal_is_array:
        check_array("focal", focal, dtype, (B,))
        _check_focal_values(focal)
        focal_args = (xp.ascontiguousarray(focal), dtype.type(0))
    else:
        f_value = float(focal)
        # The bound keeps the value finite once cast to the working dtype (1e300 is inf in float32).
        if not (0 < f_value <= _POSITIVE_RANGE[dtype][1]):
            raise ValueError(f"focal must be a positive finite number of pixels (as {np.dtype(dtype)}); "
                             f"got {focal!r}")
        focal_args = (_NO_FOCAL_ARRAY[dtype] if xp is np else NULL_POINTER, dtype.type(f_value))
    g = None
    if grad_width is not None:  # a backward: a None grad_out fails here with a TypeError naming it
        check_array("grad_out", grad_out, dtype, tuple(points.shape[:-1]) + (grad_width,))
        check_finite("grad_out", grad_out)
        g = xp.ascontiguousarray(grad_out if batched else grad_out[None])
    check_finite("points", points)
    _check_in_front(p3)
    return xp, batched, p3, focal_args, height, width, g, near, far


# dtype -> (the smallest positive value, the largest finite value) as Python floats: the bounds of the
# positive-focal and in-front checks, looked up per call rather than computed by numpy each time.
_POSITIVE_RANGE = {np.dtype(t): (float(np.nextafter(t(0), t(1))), float(np.finfo(t).max))
                   for t in (np.float32, np.float64)}


def _check_focal_values(focal):
    if not value_checks_enabled():
        return
    tiny, largest = _POSITIVE_RANGE[focal.dtype]
    # The smallest positive float as the lower bound: x >= it means x > 0, and NaN fails it.
    if queue_on_device(focal, tiny, largest,
                       "focal {} holds values that are not positive finite numbers of pixels", focal.shape):
        return
    check_finite("focal", focal)
    if not bool((focal > 0).all()):
        raise ValueError("focal must be positive (pixels)")


def _check_in_front(p3):
    """Raises ValueError when a point of p3 (B, V, 3), contiguous, is at or behind the camera (z >= 0)."""
    if not value_checks_enabled():
        return
    tiny, largest = _POSITIVE_RANGE[p3.dtype]
    # z is every third value from offset 2; z <= -(smallest positive float) means z < 0.
    if queue_on_device(p3, -largest, -tiny,
                       "points {} holds vertices behind the camera (z >= 0); the camera looks down -z, so "
                       "visible points need z < 0", p3.shape, offset=2, stride=3, count=p3.size // 3):
        return
    n_behind = int((p3[..., 2] >= 0).sum())
    if n_behind:
        raise ValueError(f"points holds {n_behind} vertices behind the camera (z >= 0); the camera "
                         f"looks down -z, so visible points need z < 0")


def perspective_projection(points, focal, resolution, near=10.0, far=10000.0):
    """OpenGL clip coordinates of camera-space points.

    x_c = (2f/W) x, y_c = (2f/H) y, z_c = ((far + near) z + 2 far near) / (near - far), w = -z.

    Args:
        points: (B, V, 3) or (V, 3) camera-space points, float32 (float64 also on the CPU); all
            in front of the camera (z < 0), else ValueError (a value check).
        focal: focal length in pixels: a float, or a (B,) array of the dtype of points.
        resolution: (H, W) of the image.
        near, far: the depth range mapped to NDC z in [-1, 1], in the units of the points.

    Returns:
        (B, V, 4) (or (V, 4)) clip-space positions.
    """
    near, far = _check_near_far(near, far)
    xp, batched, p3, focal_args, height, width, _, near, far = _prepare_camera(
        points, focal, resolution, near=near, far=far)
    B, V = p3.shape[0], p3.shape[1]
    out = xp.empty((B, V, 4), dtype=p3.dtype)
    if xp is np:
        perspective_projection_fwd(p3, *focal_args, out, height, width, near, far)
    else:
        _kernel("perspective_projection_fwd")(
            *grid_1d(B * V), (p3, *focal_args, out, np.int32(B), np.int32(V), np.int32(height), np.int32(width),
                              np.float32(near), np.float32(far)))
    return out if batched else out[0]


def perspective_projection_backward(points, focal, resolution, grad_out, near=10.0, far=10000.0, *, add_to=None):
    """Gradient of `perspective_projection` with respect to the points (focal is not differentiated).

    Args:
        points, focal, resolution, near, far: as for `perspective_projection`.
        grad_out: (B, V, 4) (or (V, 4)) gradient of the clip positions.
        add_to: keyword only, optional C-contiguous array shaped and typed like points, on their device: the
            gradient is added into it in place and it is returned (the render chain adds the projection's
            gradient to the shading's this way, without a pass over a third array).

    Returns:
        grad_points shaped like points (`add_to` when given).
    """
    near, far = _check_near_far(near, far)
    xp, batched, p3, focal_args, height, width, g, near, far = _prepare_camera(
        points, focal, resolution, grad_out, 4, near=near, far=far)
    B, V = p3.shape[0], p3.shape[1]
    if add_to is None:
        grad_points = xp.empty_like(p3)
    else:
        reads = (("points", points), ("grad_out", grad_out))
        grad_points = check_accumulator("add_to", add_to, points, xp, reads).reshape(p3.shape)
    accumulate = np.int32(add_to is not None)
    if xp is np:
        perspective_projection_bwd(p3, *focal_args, g, grad_points, height, width, near, far, bool(accumulate))
    else:
        _kernel("perspective_projection_bwd")(
            *grid_1d(B * V), (p3, *focal_args, g, grad_points, np.int32(B), np.int32(V), np.int32(height),
                              np.int32(width), np.float32(near), np.float32(far), accumulate))
    if add_to is not None:
        return add_to
    return grad_points if batched else grad_points[0]


def project_to_pixels(points, focal, resolution):
    """Pixel coordinates (x = column, y = row) of camera-space points; pixel (i, j)'s centre is (j, i).

    x_pix = f x / -z + W/2 - 0.5, y_pix = -f y / -z + H/2 - 0.5: the pixel-centre convention of
    The pixel convention of docs/conventions.md applied to `perspective_projection`'s NDC.

    Args:
        points: (B, V, 3) or (V, 3) camera-space points, float32 (float64 also on the CPU), z < 0.
        focal: focal length in pixels: a float, or a (B,) array of the dtype of points.
        resolution: (H, W) of the image.

    Returns:
        (B, V, 2) (or (V, 2)) pixel coordinates.
    """
    xp, batched, p3, focal_args, height, width, _, _, _ = _prepare_camera(points, focal, resolution)
    B, V = p3.shape[0], p3.shape[1]
    out = xp.empty((B, V, 2), dtype=p3.dtype)
    if xp is np:
        project_to_pixels_fwd(p3, *focal_args, out, height, width)
    else:
        _kernel("project_to_pixels_fwd")(
            *grid_1d(B * V), (p3, *focal_args, out, np.int32(B), np.int32(V), np.int32(height), np.int32(width)))
    return out if batched else out[0]


def project_to_pixels_backward(points, focal, resolution, grad_out):
    """Gradient of `project_to_pixels` with respect to the points (focal is not differentiated).

    Args:
        points, focal, resolution: as for `project_to_pixels`.
        grad_out: (B, V, 2) (or (V, 2)) gradient of the pixel coordinates.

    Returns:
        grad_points shaped like points.
    """
    xp, batched, p3, focal_args, height, width, g, _, _ = _prepare_camera(points, focal, resolution, grad_out, 2)
    B, V = p3.shape[0], p3.shape[1]
    grad_points = xp.empty_like(p3)
    if xp is np:
        project_to_pixels_bwd(p3, *focal_args, g, grad_points, height, width)
    else:
        _kernel("project_to_pixels_bwd")(
            *grid_1d(B * V), (p3, *focal_args, g, grad_points, np.int32(B), np.int32(V), np.int32(height),
                              np.int32(width)))
    return grad_points if batched else grad_points[0]
