"""sample_image: reference, gradients, CPU/GPU parity, bad input."""
import numpy as np
import pytest
from scipy.ndimage import map_coordinates

import fastface
from fastface.ops.sampling import sample_image, sample_image_backward, sample_image_mask
from tests.conftest import TOLERANCES
from tests.gradcheck import assert_gradient_matches

F64 = dict(rtol=TOLERANCES["float64_reference_rtol"], atol=TOLERANCES["float64_reference_atol"])
F32 = dict(atol=TOLERANCES["float32_reference_atol"])


def reference_sample(image, points):
    """scipy's linear interpolation with edge replication, one channel at a time (rows = y)."""
    B, _, _, C = image.shape
    out = np.empty(points.shape[:2] + (C,))
    for b in range(B):
        for c in range(C):
            out[b, :, c] = map_coordinates(image[b, :, :, c].astype(np.float64),
                                           [points[b, :, 1], points[b, :, 0]], order=1, mode="nearest")
    return out


def make_inputs(rng, batch=2, h=7, w=9, c=3, n=25, dtype=np.float64, margin=0.0):
    image = rng.uniform(size=(batch, h, w, c)).astype(dtype)
    x = rng.uniform(-margin, w - 1 + margin, size=(batch, n))
    y = rng.uniform(-margin, h - 1 + margin, size=(batch, n))
    return image, np.stack([x, y], axis=-1).astype(dtype)


def test_integer_coordinates_hit_pixel_centres(rng):
    image, _ = make_inputs(rng)
    i, j = np.meshgrid(np.arange(7), np.arange(9), indexing="ij")
    points = np.broadcast_to(np.stack([j.ravel(), i.ravel()], -1).astype(np.float64), (2, 63, 2))
    np.testing.assert_array_equal(sample_image(image, points), image.reshape(2, 63, 3))


def test_samples_match_scipy_linear_interpolation(rng):
    image, points = make_inputs(rng, margin=3.0)
    np.testing.assert_allclose(sample_image(image, points), reference_sample(image, points), **F64)


def test_float32_samples_match_reference(rng):
    image, points = make_inputs(rng, dtype=np.float32, margin=2.0)
    out = sample_image(image, points)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference_sample(image, points), **F32)


def test_points_outside_read_the_border(rng):
    image, _ = make_inputs(rng, batch=1)
    points = np.array([[[-5.0, 2.0], [20.0, 3.0], [4.0, -0.7], [1e30, -1e30], [-np.inf, 2.5]]])
    out = sample_image(image, points[:, :4])
    np.testing.assert_array_equal(out[0, 0], image[0, 2, 0])
    np.testing.assert_array_equal(out[0, 1], image[0, 3, 8])
    np.testing.assert_array_equal(out[0, 2], image[0, 0, 4])
    np.testing.assert_array_equal(out[0, 3], image[0, 0, 8])
    with fastface.value_checks(False):  # infinite coordinates are rejected while checks are on
        np.testing.assert_allclose(sample_image(image, points)[0, 4], 0.5 * (image[0, 2, 0] + image[0, 3, 0]))


def test_gradient_with_respect_to_points_outside_is_zero_and_border_gets_image_gradient(rng):
    image, _ = make_inputs(rng, batch=1)
    points = np.array([[[-2.5, 3.0], [4.5, 9.25]]])
    grad_image, grad_points = sample_image_backward(image, points, np.ones((1, 2, 3)))
    assert grad_points[0, 0, 0] == 0.0 and grad_points[0, 1, 1] == 0.0
    assert grad_points[0, 1, 0] != 0.0
    np.testing.assert_allclose(grad_image[0, 3, 0], 1.0)
    np.testing.assert_allclose(grad_image[0, 6, 4], 0.5)
    np.testing.assert_allclose(grad_image.sum(), 6.0)


def test_gradient_at_integer_coordinate_is_one_sided_from_the_right(rng):
    image, _ = make_inputs(rng, batch=1)
    _, grad_points = sample_image_backward(image, np.array([[[3.0, 2.0]]]), np.ones((1, 1, 3)))
    np.testing.assert_allclose(grad_points[0, 0], [(image[0, 2, 4] - image[0, 2, 3]).sum(),
                                                   (image[0, 3, 3] - image[0, 2, 3]).sum()])


def test_mask_marks_points_that_needed_no_clamping():
    points = np.array([[0.0, 0.0], [8.0, 6.0], [-0.01, 3.0], [8.01, 3.0], [3.0, 6.5], [np.nan, 1.0]])
    np.testing.assert_array_equal(sample_image_mask(points, (7, 9)), [True, True, False, False, False, False])


def test_unbatched_input_gives_unbatched_output(rng):
    image, points = make_inputs(rng)
    np.testing.assert_array_equal(sample_image(image[1], points[1]), sample_image(image, points)[1])
    grad_out = rng.normal(size=(2, 25, 3))
    for single, batch in zip(sample_image_backward(image[1], points[1], grad_out[1]),
                             sample_image_backward(image, points, grad_out)):
        np.testing.assert_array_equal(single, batch[1])


@pytest.mark.parametrize("wrt", [0, 1])
def test_backward_matches_finite_differences(rng, tol, wrt):
    # Points inside and outside the image; random coordinates are never within eps of an integer.
    image, points = make_inputs(rng, margin=1.5)
    grad_out = rng.normal(size=(2, 25, 3))
    inputs = [image, points]
    analytic = sample_image_backward(image, points, grad_out)[wrt]

    def f(x):
        args = list(inputs)
        args[wrt] = x
        return sample_image(*args)

    assert_gradient_matches(f, inputs[wrt], grad_out, analytic, tol, n_samples=80, rng=rng)


def test_gpu_matches_cpu(rng, tol, cupy):
    image, points = make_inputs(rng, batch=3, h=40, w=50, c=3, n=2000, dtype=np.float32, margin=2.0)
    grad_out = rng.normal(size=(3, 2000, 3)).astype(np.float32)
    gpu = [cupy.asarray(a) for a in (image, points, grad_out)]
    np.testing.assert_allclose(sample_image(*gpu[:2]).get(), sample_image(image, points),
                               rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
    for name, g_gpu, g_cpu in zip(("image", "points"), sample_image_backward(*gpu),
                                  sample_image_backward(image, points, grad_out)):
        assert g_gpu.shape == g_cpu.shape and g_gpu.dtype == cupy.float32, name
        np.testing.assert_allclose(g_gpu.get(), g_cpu, rtol=tol["gpu_cpu_rtol"],
                                   atol=tol["gpu_cpu_rtol"] * np.abs(g_cpu).max(), err_msg=name)
    mask = sample_image_mask(gpu[1], (40, 50))
    np.testing.assert_array_equal(mask.get(), sample_image_mask(points, (40, 50)))


def test_gpu_is_memory_safe_for_wild_coordinates_without_checks(rng, cupy):
    image, _ = make_inputs(rng, batch=1, dtype=np.float32)
    points = cupy.asarray(np.array([[[np.nan, 1.0], [1e30, -1e30], [np.inf, -np.inf]]], dtype=np.float32))
    with fastface.value_checks(False):
        out = sample_image(cupy.asarray(image), points)
        sample_image_backward(cupy.asarray(image), points, cupy.ones((1, 3, 3), dtype=cupy.float32))
    np.testing.assert_array_equal(out[0, 1].get(), image[0, 0, 8])


@pytest.mark.parametrize("make_bad, exc, pattern", [
    (lambda im, p: (im[..., 0, :], p), ValueError, "points"),
    (lambda im, p: (im[0, 0], p), ValueError, "image"),
    (lambda im, p: (im.astype(np.int32), p), TypeError, "image"),
    (lambda im, p: (im, p.astype(np.float32)), TypeError, "points"),
    (lambda im, p: (im, p[..., :1]), ValueError, "points"),
    (lambda im, p: (im, p[:1]), ValueError, "points"),
    (lambda im, p: (im, p[0]), ValueError, "points"),
    (lambda im, p: (im * np.nan, p), ValueError, "image holds"),
    (lambda im, p: (im, p * np.inf), ValueError, "points holds"),
])
def test_bad_input_raises_naming_the_argument(rng, make_bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        sample_image(*make_bad(*make_inputs(rng)))


def test_bad_grad_out_and_resolution_raise(rng):
    image, points = make_inputs(rng)
    with pytest.raises(ValueError, match="grad_out"):
        sample_image_backward(image, points, np.zeros((2, 25, 4)))
    with pytest.raises(ValueError, match="resolution"):
        sample_image_mask(points, (0, 3))


# --- bad input found by the boundary audit ------------------------------------------------------

def test_sample_image_backward_rejects_missing_grad_out(rng):
    with pytest.raises(TypeError, match="grad_out must be a numpy or cupy array"):
        sample_image_backward(*make_inputs(rng), None)
