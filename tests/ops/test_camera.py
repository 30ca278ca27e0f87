"""Camera ops: references, gradients, CPU/GPU parity, bad input."""
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import fastface
from fastface.ops.camera import (
    euler_rotation, euler_rotation_backward, perspective_projection, perspective_projection_backward,
    project_to_pixels, project_to_pixels_backward, rigid_transform, rigid_transform_backward,
)
from tests.conftest import TOLERANCES
from tests.cuda_emulation import build_emulated_library
from tests.gradcheck import assert_gradient_matches

F64 = dict(rtol=TOLERANCES["float64_reference_rtol"], atol=TOLERANCES["float64_reference_atol"])
F32 = dict(atol=TOLERANCES["float32_reference_atol"])

RES = (48, 64)  # (H, W), not square so that a swapped H and W shows


def camera_points(rng, batch=2, n=11, dtype=np.float64):
    """Points in front of the camera (z in [-60, -20]) within a moderate field of view."""
    xy = rng.uniform(-10, 10, size=(batch, n, 2))
    z = rng.uniform(-60, -20, size=(batch, n, 1))
    return np.concatenate([xy, z], axis=-1).astype(dtype)


def pose(rng, batch=2, dtype=np.float64):
    rotation = Rotation.from_euler("xyz", rng.uniform(-0.5, 0.5, size=(batch, 3))).as_matrix()
    return rotation.astype(dtype), rng.normal(size=(batch, 3)).astype(dtype)


# --- euler_rotation ----------------------------------------------------------------------------

def euler_by_matrix_products(angles):
    """R = Rz Ry Rx and <grad_out, dR/d angle> as products of the axis matrices and their derivatives, in
    float64: the array math the kernels replaced, written the slow, obvious way."""
    a = np.asarray(angles, dtype=np.float64)
    c, s = np.cos(a), np.sin(a)
    eye = np.broadcast_to(np.eye(3), a.shape[:1] + (3, 3))

    def axis(k, i, j, derivative=False):
        """Rotation by angle k in the (i, j) plane (or its derivative): [[c, -s], [s, c]] at rows/cols i, j."""
        m = np.zeros_like(eye) if derivative else eye.copy()
        cos, sin = (-s[:, k], c[:, k]) if derivative else (c[:, k], s[:, k])
        m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j] = cos, -sin, sin, cos
        return m

    rx, ry, rz = axis(0, 1, 2), axis(1, 2, 0), axis(2, 0, 1)
    drx, dry, drz = axis(0, 1, 2, True), axis(1, 2, 0, True), axis(2, 0, 1, True)

    def backward(grad_out):
        g = np.asarray(grad_out, dtype=np.float64)
        return np.stack([(g * (rz @ ry @ drx)).sum(axis=(1, 2)), (g * (rz @ dry @ rx)).sum(axis=(1, 2)),
                         (g * (drz @ ry @ rx)).sum(axis=(1, 2))], axis=-1)

    return rz @ ry @ rx, backward


def test_rotation_matches_scipy_extrinsic_xyz(rng):
    angles = rng.uniform(-np.pi, np.pi, size=(5, 3))
    np.testing.assert_allclose(euler_rotation(angles), Rotation.from_euler("xyz", angles).as_matrix(), **F64)


def test_rotation_is_rz_ry_rx_of_pitch_yaw_roll():
    pitch, yaw, roll = 0.3, -0.7, 1.1
    rx = Rotation.from_rotvec([pitch, 0, 0]).as_matrix()
    ry = Rotation.from_rotvec([0, yaw, 0]).as_matrix()
    rz = Rotation.from_rotvec([0, 0, roll]).as_matrix()
    np.testing.assert_allclose(euler_rotation(np.array([pitch, yaw, roll])), rz @ ry @ rx, **F64)


def test_rotation_is_orthonormal_with_determinant_one(rng):
    r = euler_rotation(rng.uniform(-np.pi, np.pi, size=(6, 3)).astype(np.float32))
    assert r.dtype == np.float32 and r.shape == (6, 3, 3)
    np.testing.assert_allclose(r @ r.transpose(0, 2, 1), np.broadcast_to(np.eye(3), r.shape), **F32)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, **F32)


@pytest.mark.parametrize("batch", [1, 3])
def test_rotation_backward_matches_finite_differences(rng, tol, batch):
    angles = rng.uniform(-np.pi, np.pi, size=(batch, 3))
    grad_out = rng.normal(size=(batch, 3, 3))
    assert_gradient_matches(euler_rotation, angles, grad_out, euler_rotation_backward(angles, grad_out), tol)
    assert euler_rotation_backward(angles[0], grad_out[0]).shape == (3,)


def test_reference_euler_derivatives_match_finite_differences(rng, tol):
    # The matrix-product reference is itself checked, so that the comparison below pins the kernels.
    angles = rng.uniform(-np.pi, np.pi, size=(2, 3))
    grad_out = rng.normal(size=(2, 3, 3))
    assert_gradient_matches(lambda a: euler_by_matrix_products(a)[0], angles, grad_out,
                            euler_by_matrix_products(angles)[1](grad_out), tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("batch", [1, 300])
def test_rotation_kernels_match_the_matrix_products(rng, dtype, batch):
    angles = rng.uniform(-np.pi, np.pi, size=(batch, 3)).astype(dtype)
    grad_out = rng.normal(size=(batch, 3, 3)).astype(dtype)
    rotation, backward = euler_by_matrix_products(angles)
    close = F64 if dtype == np.float64 else F32
    r, grad_angles = euler_rotation(angles), euler_rotation_backward(angles, grad_out)
    assert r.dtype == dtype and grad_angles.dtype == dtype
    np.testing.assert_allclose(r, rotation, **close)
    np.testing.assert_allclose(grad_angles, backward(grad_out), **close)
    # unbatched and non-contiguous inputs take the same path
    np.testing.assert_array_equal(euler_rotation(angles[0]), r[0])
    strided_angles, strided_grad = np.repeat(angles, 2, axis=1)[:, ::2], np.repeat(grad_out, 2, axis=2)[:, :, ::2]
    assert not strided_angles.flags.c_contiguous and not strided_grad.flags.c_contiguous
    np.testing.assert_array_equal(euler_rotation(strided_angles), r)
    np.testing.assert_array_equal(euler_rotation_backward(strided_angles, strided_grad), grad_angles)


# --- rigid_transform ---------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True])
def test_rigid_transform_is_r_p_plus_t(rng, shared):
    points = camera_points(rng)[0] if shared else camera_points(rng)
    rotation, translation = pose(rng)
    batched_points = np.broadcast_to(points, (2,) + points.shape[-2:])
    expected = np.einsum("brj,bvj->bvr", rotation, batched_points) + translation[:, None]
    np.testing.assert_allclose(rigid_transform(points, rotation, translation), expected, **F64)


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("wrt", [0, 1, 2])
def test_rigid_transform_backward_matches_finite_differences(rng, tol, wrt, shared):
    points = camera_points(rng)
    inputs = [points[0] if shared else points, *pose(rng)]
    grad_out = rng.normal(size=(2, points.shape[1], 3))
    analytic = rigid_transform_backward(*inputs, grad_out)[wrt]

    def f(x):
        args = list(inputs)
        args[wrt] = x
        return rigid_transform(*args)

    assert_gradient_matches(f, inputs[wrt], grad_out, analytic, tol)


def test_rigid_transform_backward_sums_over_more_than_one_chunk(rng, tol):
    points = rng.normal(size=(1, 2100, 3))
    rotation, translation = pose(rng, batch=1)
    grad_out = rng.normal(size=points.shape)
    grad_rotation = rigid_transform_backward(points, rotation, translation, grad_out)[1]
    assert_gradient_matches(lambda r: rigid_transform(points, r, translation), rotation, grad_out, grad_rotation, tol)


# --- perspective_projection and project_to_pixels ------------------------------------------------

def test_clip_coordinates_follow_the_opengl_formula(rng):
    points = camera_points(rng)
    f, near, far, (h, w) = 70.0, 5.0, 500.0, RES
    clip = perspective_projection(points, f, RES, near=near, far=far)
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    expected = np.stack([2 * f / w * x, 2 * f / h * y, ((far + near) * z + 2 * far * near) / (near - far), -z], -1)
    np.testing.assert_allclose(clip, expected, **F64)


def test_near_and_far_planes_map_to_ndc_minus_one_and_one():
    clip = perspective_projection(np.array([[0.0, 0.0, -5.0], [0.0, 0.0, -500.0]]), 70.0, RES, near=5.0, far=500.0)
    np.testing.assert_allclose(clip[:, 2] / clip[:, 3], [-1.0, 1.0], **F64)


def test_pixels_agree_with_clip_space_under_the_pixel_centre_convention(rng):
    points = camera_points(rng)
    h, w = RES
    clip = perspective_projection(points, 70.0, RES)
    pix = project_to_pixels(points, 70.0, RES)
    ndc_x = 2 * (pix[..., 0] + 0.5) / w - 1
    ndc_y = 1 - 2 * (pix[..., 1] + 0.5) / h
    np.testing.assert_allclose(ndc_x, clip[..., 0] / clip[..., 3], **F64)
    np.testing.assert_allclose(ndc_y, clip[..., 1] / clip[..., 3], **F64)


def test_optical_axis_hits_the_image_centre_and_up_is_a_smaller_row():
    pix = project_to_pixels(np.array([[0.0, 0.0, -10.0], [0.0, 1.0, -10.0], [1.0, 0.0, -10.0]]), 50.0, RES)
    np.testing.assert_allclose(pix[0], [RES[1] / 2 - 0.5, RES[0] / 2 - 0.5])
    assert pix[1, 1] < pix[0, 1] and pix[2, 0] > pix[0, 0]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_scalar_focal_gives_exactly_what_a_filled_focal_array_gives(rng, dtype):
    # A scalar focal reaches the kernels as a scalar, not as a (B,) array: the results must not move.
    points = camera_points(rng, dtype=dtype)
    focal = np.full(2, 60.0, dtype=dtype)
    grad_clip, grad_pix = rng.normal(size=(2, 11, 4)).astype(dtype), rng.normal(size=(2, 11, 2)).astype(dtype)
    for scalar in (60.0, 60, dtype(60.0)):
        np.testing.assert_array_equal(perspective_projection(points, scalar, RES, near=5.0, far=500.0),
                                      perspective_projection(points, focal, RES, near=5.0, far=500.0))
        np.testing.assert_array_equal(perspective_projection_backward(points, scalar, RES, grad_clip),
                                      perspective_projection_backward(points, focal, RES, grad_clip))
        np.testing.assert_array_equal(project_to_pixels(points, scalar, RES), project_to_pixels(points, focal, RES))
        np.testing.assert_array_equal(project_to_pixels_backward(points, scalar, RES, grad_pix),
                                      project_to_pixels_backward(points, focal, RES, grad_pix))


def test_per_image_focal_equals_scalar_focal_per_image(rng):
    points = camera_points(rng)
    focal = np.array([50.0, 80.0])
    for op in (perspective_projection, project_to_pixels):
        both = op(points, focal, RES)
        for b in range(2):
            np.testing.assert_allclose(both[b], op(points[b], float(focal[b]), RES), **F64)


def test_projection_backwards_match_finite_differences(rng, tol):
    points = camera_points(rng)
    focal = np.array([50.0, 80.0])
    grad_clip = rng.normal(size=(2, 11, 4))
    assert_gradient_matches(lambda p: perspective_projection(p, focal, RES, near=5.0, far=500.0), points, grad_clip,
                            perspective_projection_backward(points, focal, RES, grad_clip, near=5.0, far=500.0), tol)
    grad_pix = rng.normal(size=(2, 11, 2))
    assert_gradient_matches(lambda p: project_to_pixels(p, focal, RES), points, grad_pix,
                            project_to_pixels_backward(points, focal, RES, grad_pix), tol)


@pytest.mark.parametrize("shared", [False, True])
def test_rigid_transform_backward_adds_into_add_to(rng, shared):
    B, V = 3, 40
    points = rng.normal(size=(V, 3) if shared else (B, V, 3))
    rotation = euler_rotation(rng.uniform(-1, 1, (B, 3)))
    translation = rng.normal(size=(B, 3))
    grad_out = rng.normal(size=(B, V, 3))
    want = rigid_transform_backward(points, rotation, translation, grad_out)
    start = rng.normal(size=points.shape)
    acc = start.copy()
    got = rigid_transform_backward(points, rotation, translation, grad_out, add_to=acc)
    assert got[0] is acc
    np.testing.assert_allclose(acc, start + want[0], rtol=1e-13, atol=1e-13)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[2], want[2])
    with pytest.raises(ValueError, match="add_to must have shape"):
        rigid_transform_backward(points, rotation, translation, grad_out, add_to=np.zeros((V + 1, 3)))
    with pytest.raises(ValueError, match="add_to must not share memory with points"):
        rigid_transform_backward(points, rotation, translation, grad_out, add_to=points)


@pytest.mark.parametrize("batched", [True, False])
def test_projection_backward_adds_into_add_to(rng, batched):
    points = camera_points(rng) if batched else camera_points(rng)[0]
    grad_clip = rng.normal(size=points.shape[:-1] + (4,))
    start = rng.normal(size=points.shape)
    acc = start.copy()
    returned = perspective_projection_backward(points, 60.0, RES, grad_clip, add_to=acc)
    assert returned is acc
    np.testing.assert_allclose(acc, start + perspective_projection_backward(points, 60.0, RES, grad_clip),
                               rtol=1e-14, atol=1e-14)
    with pytest.raises(ValueError, match="add_to"):
        perspective_projection_backward(points, 60.0, RES, grad_clip, add_to=np.zeros((3, 3)))
    with pytest.raises(TypeError, match="add_to"):
        perspective_projection_backward(points, 60.0, RES, grad_clip, add_to=start.astype(np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        perspective_projection_backward(points, 60.0, RES, grad_clip,
                                        add_to=np.zeros(points.shape[::-1]).T)
    with pytest.raises(ValueError, match="add_to must not share memory with points"):
        perspective_projection_backward(points, 60.0, RES, grad_clip, add_to=points)


def test_unbatched_projection_shapes(rng):
    points = camera_points(rng)[0]
    assert perspective_projection(points, 60.0, RES).shape == (11, 4)
    assert project_to_pixels(points, 60.0, RES).shape == (11, 2)
    assert project_to_pixels_backward(points, 60.0, RES, np.ones((11, 2))).shape == (11, 3)
    assert perspective_projection_backward(points, 60.0, RES, np.ones((11, 4))).shape == (11, 3)


def test_points_behind_the_camera_raise_unless_value_checks_are_off(rng):
    points = camera_points(rng)
    points[1, 3, 2] = 0.0
    for op in (perspective_projection, project_to_pixels):
        with pytest.raises(ValueError, match="points holds 1 vertices behind the camera"):
            op(points, 60.0, RES)
    with fastface.value_checks(False):
        assert perspective_projection(points, 60.0, RES)[1, 3, 3] == 0.0


# --- GPU against CPU ------------------------------------------------------------------------------

@pytest.mark.parametrize("shared", [False, True])
def test_gpu_rigid_transform_matches_cpu(rng, tol, cupy, shared):
    points = camera_points(rng, batch=3, n=3000, dtype=np.float32)
    points = points[0] if shared else points
    rotation, translation = pose(rng, batch=3, dtype=np.float32)
    grad_out = rng.normal(size=(3, 3000, 3)).astype(np.float32)
    gpu = [cupy.asarray(a) for a in (points, rotation, translation, grad_out)]
    np.testing.assert_allclose(rigid_transform(*gpu[:3]).get(), rigid_transform(points, rotation, translation),
                               rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_rtol"] * 60)
    for name, g_gpu, g_cpu in zip(("points", "rotation", "translation"), rigid_transform_backward(*gpu),
                                  rigid_transform_backward(points, rotation, translation, grad_out)):
        assert g_gpu.shape == g_cpu.shape, name
        # the rotation and translation gradients sum 3000 float32 terms: relative to their size
        np.testing.assert_allclose(g_gpu.get(), g_cpu, rtol=tol["gpu_cpu_rtol"],
                                   atol=tol["gpu_cpu_rtol"] * np.abs(g_cpu).max(), err_msg=name)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("focal_kind", ["array", "scalar"])
def test_gpu_projections_match_cpu(rng, tol, cupy, focal_kind, batch):
    points = camera_points(rng, batch=batch, n=500, dtype=np.float32)
    focal = np.array([50, 60, 70][:batch], dtype=np.float32) if focal_kind == "array" else 60.0
    grad_clip = rng.normal(size=(batch, 500, 4)).astype(np.float32)
    grad_pix = rng.normal(size=(batch, 500, 2)).astype(np.float32)
    p_gpu = cupy.asarray(points)
    f_gpu = cupy.asarray(focal) if focal_kind == "array" else focal
    pairs = {
        "perspective_projection": (perspective_projection(p_gpu, f_gpu, RES, near=5.0, far=500.0),
                                   perspective_projection(points, focal, RES, near=5.0, far=500.0)),
        "perspective_projection_backward": (
            perspective_projection_backward(p_gpu, f_gpu, RES, cupy.asarray(grad_clip), near=5.0, far=500.0),
            perspective_projection_backward(points, focal, RES, grad_clip, near=5.0, far=500.0)),
        "project_to_pixels": (project_to_pixels(p_gpu, f_gpu, RES), project_to_pixels(points, focal, RES)),
        "project_to_pixels_backward": (project_to_pixels_backward(p_gpu, f_gpu, RES, cupy.asarray(grad_pix)),
                                       project_to_pixels_backward(points, focal, RES, grad_pix)),
        "unbatched project_to_pixels": (project_to_pixels(p_gpu[0], f_gpu if focal_kind == "scalar" else f_gpu[0:1],
                                                          RES),
                                        project_to_pixels(points[0], focal if focal_kind == "scalar" else focal[0:1],
                                                          RES)),
    }
    for name, (g, c) in pairs.items():
        assert g.shape == c.shape, name
        np.testing.assert_allclose(g.get(), c, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_rtol"] * np.abs(c).max(),
                                   err_msg=name)


def test_gpu_scalar_focal_gives_exactly_what_a_filled_focal_array_gives(rng, cupy):
    # The scalar reaches the kernels with a null focal pointer; the arithmetic is the same, so the bits are.
    points = cupy.asarray(camera_points(rng, batch=2, n=300, dtype=np.float32))
    focal = cupy.full(2, 60.0, dtype=cupy.float32)
    grad_clip = cupy.asarray(rng.normal(size=(2, 300, 4)).astype(np.float32))
    grad_pix = cupy.asarray(rng.normal(size=(2, 300, 2)).astype(np.float32))
    for name, op in {
        "perspective_projection": lambda f: perspective_projection(points, f, RES),
        "perspective_projection_backward": lambda f: perspective_projection_backward(points, f, RES, grad_clip),
        "project_to_pixels": lambda f: project_to_pixels(points, f, RES),
        "project_to_pixels_backward": lambda f: project_to_pixels_backward(points, f, RES, grad_pix),
    }.items():
        np.testing.assert_array_equal(op(60.0).get(), op(focal).get(), err_msg=name)


@pytest.mark.parametrize("batch", [1, 4, 300])  # 300: more than one block of threads
def test_gpu_euler_rotation_matches_cpu(rng, tol, cupy, batch):
    angles = rng.uniform(-3, 3, size=(batch, 3)).astype(np.float32)
    grad_out = rng.normal(size=(batch, 3, 3)).astype(np.float32)
    a_gpu, g_gpu = cupy.asarray(angles), cupy.asarray(grad_out)
    rotation = euler_rotation(a_gpu)
    assert rotation.shape == (batch, 3, 3) and rotation.dtype == np.float32
    np.testing.assert_allclose(rotation.get(), euler_rotation(angles), rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])
    grad_angles = euler_rotation_backward(a_gpu, g_gpu)
    assert grad_angles.shape == (batch, 3) and grad_angles.dtype == np.float32
    np.testing.assert_allclose(grad_angles.get(), euler_rotation_backward(angles, grad_out), rtol=tol["gpu_cpu_rtol"],
                               **F32)
    # unbatched, and non-contiguous (strided) inputs
    np.testing.assert_allclose(euler_rotation(a_gpu[-1]).get(), euler_rotation(angles[-1]), rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])
    np.testing.assert_allclose(euler_rotation_backward(a_gpu[-1], g_gpu[-1]).get(),
                               euler_rotation_backward(angles[-1], grad_out[-1]), rtol=tol["gpu_cpu_rtol"], **F32)
    a_strided = cupy.asarray(np.repeat(angles, 2, axis=1))[:, ::2]
    g_strided = cupy.asarray(np.repeat(grad_out, 2, axis=2))[:, :, ::2]
    assert not a_strided.flags.c_contiguous and not g_strided.flags.c_contiguous
    np.testing.assert_allclose(euler_rotation(a_strided).get(), euler_rotation(angles), rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])
    np.testing.assert_allclose(euler_rotation_backward(a_strided, g_strided).get(),
                               euler_rotation_backward(angles, grad_out), rtol=tol["gpu_cpu_rtol"], **F32)


def test_gpu_euler_rotation_rejects_float64_naming_angles(cupy):
    with pytest.raises(TypeError, match="angles .*the GPU path is float32 only"):
        euler_rotation(cupy.zeros((2, 3), dtype=cupy.float64))


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, exc, pattern", [
    (lambda p, r, t: euler_rotation(np.zeros((2, 4))), ValueError, "angles"),
    (lambda p, r, t: euler_rotation(np.zeros((2, 3), dtype=np.int32)), TypeError, "angles"),
    (lambda p, r, t: euler_rotation(np.full((2, 3), np.nan)), ValueError, "angles"),
    (lambda p, r, t: euler_rotation_backward(np.zeros((2, 3)), np.zeros((2, 3))), ValueError, "grad_out"),
    (lambda p, r, t: rigid_transform(p[..., :2], r, t), ValueError, "points"),
    (lambda p, r, t: rigid_transform(p, r[:, :2], t), ValueError, "rotation"),
    (lambda p, r, t: rigid_transform(p, r.astype(np.float32), t), TypeError, "rotation"),
    (lambda p, r, t: rigid_transform(p, r, t[:1]), ValueError, "batch sizes differ"),
    (lambda p, r, t: rigid_transform(p, r, t * np.inf), ValueError, "translation"),
    (lambda p, r, t: rigid_transform_backward(p, r, t, np.zeros((2, 11, 4))), ValueError, "grad_out"),
    (lambda p, r, t: perspective_projection(p, 60.0, (48,)), TypeError, "resolution"),
    (lambda p, r, t: perspective_projection(p, 60.0, (0, 64)), ValueError, "resolution"),
    (lambda p, r, t: perspective_projection(p, -1.0, RES), ValueError, "focal"),
    (lambda p, r, t: perspective_projection(p, np.ones(3), RES), ValueError, "focal"),
    (lambda p, r, t: perspective_projection(p, np.ones(2, dtype=np.float32), RES), TypeError, "focal"),
    (lambda p, r, t: perspective_projection(p, 60.0, RES, near=10.0, far=5.0), ValueError, "near and far"),
    (lambda p, r, t: project_to_pixels(p.astype(np.int64), 60.0, RES), TypeError, "points"),
    (lambda p, r, t: project_to_pixels_backward(p, 60.0, RES, np.zeros((2, 11, 3))), ValueError, "grad_out"),
])
def test_bad_input_raises_naming_the_argument(rng, call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call(camera_points(rng), *pose(rng))


# --- bad input found by the boundary audit ------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda p, r, t: rigid_transform_backward(p, r, t, None),
    lambda p, r, t: perspective_projection_backward(p, 500.0, RES, None),
    lambda p, r, t: project_to_pixels_backward(p, 500.0, RES, None),
])
def test_camera_backward_rejects_missing_grad_out(rng, call):
    rotation, translation = pose(rng)
    with pytest.raises(TypeError, match="grad_out must be a numpy or cupy array"):
        call(camera_points(rng), rotation, translation)


@pytest.mark.parametrize("near, far", [(None, 100.0), (1.0, None), ("a", 100.0)])
def test_perspective_projection_rejects_non_numeric_near_far(rng, near, far):
    with pytest.raises(TypeError, match="near and far must be numbers"):
        perspective_projection(camera_points(rng), 500.0, RES, near=near, far=far)
    with pytest.raises(TypeError, match="near and far must be numbers"):
        perspective_projection_backward(camera_points(rng), 500.0, RES, np.zeros((2, 11, 4)), near=near, far=far)


def test_projection_rejects_focal_that_overflows_the_dtype(rng):
    # 1e300 is finite as a Python float but inf in float32: it must not become inf in the output.
    with pytest.raises(ValueError, match="focal must be a positive finite number"):
        project_to_pixels(camera_points(rng, dtype=np.float32), 1e300, RES)


@pytest.mark.parametrize("focal", [None, "500", [500.0, 500.0]])
def test_projection_rejects_focal_that_is_no_number_or_array(rng, focal):
    with pytest.raises(TypeError, match="focal must be a positive number of pixels or a \\(B,\\) array"):
        perspective_projection(camera_points(rng), focal, RES)


def test_projection_rejects_infinite_resolution(rng):
    with pytest.raises(TypeError, match="resolution must be a pair"):
        project_to_pixels(camera_points(rng), 500.0, (float("inf"), 64))


# The euler and projection kernels of kernels/camera.cu, compiled for the host (tests/cuda_emulation.py)
# and fed the argument tuples camera.py builds for the GPU, null focal pointer included. The other
# kernels of the file are compiled too (barriers and shuffles stubbed) but not run here.
_EMU_SHIM = r"""
#include <cmath>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
struct dim3 { unsigned x, y, z; };
static dim3 blockIdx, blockDim, threadIdx, gridDim;
inline void __syncthreads() {}
inline float __shfl_down_sync(unsigned, float v, int) { return v; }
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
#include "camera.cu"
template <class F> void launch(long long n, F f) {
    blockDim = {256, 1, 1}; gridDim = {unsigned((n + 255) / 256), 1, 1};
    for (unsigned bx = 0; bx < gridDim.x; ++bx) for (unsigned tx = 0; tx < 256; ++tx) {
        blockIdx = {bx, 0, 0}; threadIdx = {tx, 0, 0}; f();
    }
}
extern "C" {
void emu_euler(const float* angles, const float* grad_out, float* rotation, float* grad_angles, int B) {
    launch(B, [&] { euler_rotation_fwd(angles, rotation, B); });
    launch(B, [&] { euler_rotation_bwd(angles, grad_out, grad_angles, B); });
}
void emu_projections(const float* points, const float* focal, float focal_scalar, const float* grad_clip,
                     const float* grad_pix, float* clip, float* pix, float* grad_points_clip, float* grad_points_pix,
                     int B, int V, int H, int W, float near, float far) {
    launch((long long)B * V, [&] { perspective_projection_fwd(points, focal, focal_scalar, clip, B, V, H, W, near, far); });
    launch((long long)B * V, [&] { perspective_projection_bwd(points, focal, focal_scalar, grad_clip, grad_points_clip, B, V, H, W, near, far, 0); });
    launch((long long)B * V, [&] { project_to_pixels_fwd(points, focal, focal_scalar, pix, B, V, H, W); });
    launch((long long)B * V, [&] { project_to_pixels_bwd(points, focal, focal_scalar, grad_pix, grad_points_pix, B, V, H, W); });
}
}
"""


@pytest.fixture(scope="module")
def camera_emulated(tmp_path_factory):
    import ctypes
    lib = build_emulated_library(tmp_path_factory.mktemp("camera_emulated"), _EMU_SHIM, ("-Wno-unused-function",))
    lib.emu_euler.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int]
    lib.emu_projections.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_float] + [ctypes.c_void_p] * 6 + \
        [ctypes.c_int] * 4 + [ctypes.c_float] * 2
    return lib


def test_euler_kernels_emulated_on_the_host_match_the_cpu(camera_emulated, rng, tol):
    B = 300
    angles = rng.uniform(-0.4, 0.4, (B, 3)).astype(np.float32)
    grad_out = rng.standard_normal((B, 3, 3)).astype(np.float32)
    rotation, grad_angles = np.empty((B, 3, 3), np.float32), np.empty((B, 3), np.float32)
    camera_emulated.emu_euler(angles.ctypes.data, grad_out.ctypes.data, rotation.ctypes.data, grad_angles.ctypes.data, B)
    np.testing.assert_allclose(rotation, euler_rotation(angles), rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
    np.testing.assert_allclose(grad_angles, euler_rotation_backward(angles, grad_out), rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])


@pytest.mark.parametrize("focal_kind", ["array", "scalar"])
def test_projection_kernels_emulated_on_the_host_match_the_cpu(camera_emulated, rng, tol, focal_kind):
    import fastface.ops.camera as camera
    B, V, H, W = 3, 50, 40, 60
    points = np.concatenate([rng.uniform(-1, 1, (B, V, 2)), rng.uniform(-30, -15, (B, V, 1))], -1).astype(np.float32)
    focal = np.array([150.0, 180.0, 210.0], np.float32) if focal_kind == "array" else 170.0
    grad_clip = rng.standard_normal((B, V, 4)).astype(np.float32)
    grad_pix = rng.standard_normal((B, V, 2)).astype(np.float32)
    clip, pix = np.empty((B, V, 4), np.float32), np.empty((B, V, 2), np.float32)
    g_clip, g_pix = np.empty_like(points), np.empty_like(points)
    _, _, _, focal_args, _, _, _, _, _ = camera._prepare_camera(points, focal, (H, W))
    # The GPU path's pair: the array's pointer, or the null pointer camera.py passes for a scalar.
    focal_pointer = focal_args[0].ctypes.data if focal_kind == "array" else int(camera.NULL_POINTER)
    camera_emulated.emu_projections(points.ctypes.data, focal_pointer, float(focal_args[1]), grad_clip.ctypes.data,
                                    grad_pix.ctypes.data, clip.ctypes.data, pix.ctypes.data, g_clip.ctypes.data,
                                    g_pix.ctypes.data, B, V, H, W, 10.0, 10000.0)
    close = {"rtol": tol["gpu_cpu_rtol"], "atol": tol["gpu_cpu_atol"]}
    np.testing.assert_allclose(clip, perspective_projection(points, focal, (H, W)), **close)
    np.testing.assert_allclose(pix, project_to_pixels(points, focal, (H, W)), **close)
    np.testing.assert_allclose(g_clip, perspective_projection_backward(points, focal, (H, W), grad_clip), **close)
    np.testing.assert_allclose(g_pix, project_to_pixels_backward(points, focal, (H, W), grad_pix), **close)
