"""photometric_loss, landmark_loss, prior_loss: references, gradients, masks, CPU/GPU parity, bad input."""
import re

import numba
import numpy as np
import pytest

import fastface
from fastface._backend import read_kernel_source
from fastface.ops import losses as losses_module
from fastface.ops.losses import (PHOTOMETRIC_EPS, landmark_loss, landmark_loss_backward, photometric_loss,
                                 photometric_loss_backward, prior_loss, prior_loss_backward)
from tests.conftest import TOLERANCES
from tests.gradcheck import assert_gradient_matches

F64 = dict(rtol=TOLERANCES["float64_reference_rtol"], atol=TOLERANCES["float64_reference_atol"])
F32 = dict(atol=TOLERANCES["float32_reference_atol"])


# ---------------------------------------------------------------------------------------------
# References, written the slow, obvious way in float64

def reference_photometric(rendered, target, mask, eps=PHOTOMETRIC_EPS):
    B, H, W, _ = rendered.shape
    out = np.zeros(B)
    for b in range(B):
        total, weight = 0.0, 0.0
        for i in range(H):
            for j in range(W):
                m = float(mask[b, i, j])
                d = rendered[b, i, j].astype(np.float64) - target[b, i, j].astype(np.float64)
                total += m * (np.sqrt(d @ d + eps * eps) - eps)
                weight += m
        out[b] = total / max(1.0, weight)
    return out


def reference_landmarks(points, target, weights):
    B, K, _ = points.shape
    w = np.broadcast_to(np.asarray(weights, np.float64), (B, K))
    out = np.zeros(B)
    for b in range(B):
        for k in range(K):
            d = points[b, k].astype(np.float64) - target[b, k].astype(np.float64)
            out[b] += w[b, k] * (d @ d)
    return out / K


def reference_prior(coeffs, weights):
    B, K = coeffs.shape
    w = np.ones(K) if weights is None else np.asarray(weights, np.float64)
    return np.array([sum(w[k] * float(coeffs[b, k]) ** 2 for k in range(K)) for b in range(B)])


def photometric_inputs(rng, batch=3, h=6, w=7, c=3, dtype=np.float64, mask="bool"):
    rendered = rng.uniform(size=(batch, h, w, c)).astype(dtype)
    target = rng.uniform(size=(batch, h, w, c)).astype(dtype)
    if mask == "bool":
        m = rng.uniform(size=(batch, h, w)) < 0.6
    else:
        m = rng.uniform(size=(batch, h, w)).astype(dtype)
        m[rng.uniform(size=m.shape) < 0.3] = 0.0
    return rendered, target, m


def landmark_inputs(rng, batch=3, k=68, dtype=np.float64, per_image=False):
    points = rng.uniform(0, 64, size=(batch, k, 2)).astype(dtype)
    target = (points + rng.normal(scale=3.0, size=points.shape)).astype(dtype)
    weights = rng.uniform(0, 2, size=(batch, k) if per_image else (k,)).astype(dtype)
    return points, target, weights


# ---------------------------------------------------------------------------------------------
# Photometric

@pytest.mark.parametrize("mask", ["bool", "float"])
def test_photometric_matches_the_reference(rng, mask):
    r, t, m = photometric_inputs(rng, mask=mask)
    np.testing.assert_allclose(photometric_loss(r, t, m), reference_photometric(r, t, m), **F64)


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_photometric_float32_matches_the_reference(rng, mask):
    r, t, m = photometric_inputs(rng, dtype=np.float32, mask=mask)
    out = photometric_loss(r, t, m)
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_allclose(out, reference_photometric(r, t, m), **F32)


def test_photometric_images_larger_than_one_band_sum_every_band(rng):
    # 70 x 70 = 4900 pixels: two CPU bands of 4096.
    r, t, m = photometric_inputs(rng, batch=2, h=70, w=70, dtype=np.float32)
    assert 70 * 70 > losses_module._BAND
    np.testing.assert_allclose(photometric_loss(r, t, m), reference_photometric(r, t, m), rtol=1e-5)
    g = photometric_loss_backward(r, t, m, np.ones(2, np.float32))
    assert np.all(g[:, -1][m[:, -1]] != 0)  # the last band's pixels get their gradient too


@pytest.mark.parametrize("shape", [(1, 1, 1, 3), (1, 65, 67, 3), (3, 33, 31, 3), (3, 9, 10, 2)])
def test_photometric_batches_of_one_and_three_and_odd_sizes_match_the_reference(rng, shape):
    # 65 x 67 = 4355 pixels: two CPU bands, the last partial; one image of three with an empty mask.
    B, H, W, C = shape
    r, t, m = photometric_inputs(rng, batch=B, h=H, w=W, c=C, dtype=np.float32)
    m[-1] = m[-1] if B == 1 else False
    grad_out = rng.normal(size=B).astype(np.float32)
    loss = photometric_loss(r, t, m)
    np.testing.assert_allclose(loss, reference_photometric(r, t, m), rtol=1e-5, atol=1e-7)
    grad = photometric_loss_backward(r, t, m, grad_out)
    if B > 1:
        assert loss[-1] == 0 and not grad[-1].any()
    d = r.astype(np.float64) - t
    norm = np.sqrt((d * d).sum(-1, keepdims=True) + PHOTOMETRIC_EPS ** 2)
    want = (grad_out[:, None, None, None] * m[..., None] * d / norm
            / np.maximum(1.0, m.sum(axis=(1, 2)))[:, None, None, None])
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-9)


def test_gpu_constants_agree_with_the_kernel_source():
    """fastface/ops/losses.py launches with the grid and chunk sizes of kernels/losses.cu's #defines: a Python
    chunk larger than the kernel's would leave pixels unsummed, a different block size break the reductions."""
    source = read_kernel_source("losses.cu")
    defines = {name: int(value) for name, value in re.findall(r"^#define (\w+) (\d+)$", source, re.M)}
    assert defines["PHOTOMETRIC_THREADS"] == losses_module._GPU_THREADS
    assert defines["PHOTOMETRIC_CHUNK"] == losses_module._GPU_CHUNK
    assert defines["PHOTOMETRIC_COUNT_CHUNK"] == losses_module._GPU_COUNT_CHUNK
    assert defines["PHOTOMETRIC_MAX_COUNT_BLOCKS"] == losses_module._GPU_MAX_COUNT_BLOCKS == 32  # a lane each
    assert defines["WARPS_PER_BLOCK"] == losses_module._GPU_WARPS
    # Whole quads of pixels in every chunk, whole warps in every block.
    assert defines["PHOTOMETRIC_CHUNK"] % 4 == 0 and defines["PHOTOMETRIC_COUNT_CHUNK"] % 4 == 0
    assert defines["PHOTOMETRIC_THREADS"] % 32 == 0


def test_photometric_is_the_colour_distance_not_its_square(rng):
    # One pixel with distance d: the loss is sqrt(d^2 + eps^2) - eps, about d - eps; doubling the
    # error doubles the loss (l2,1), it does not quadruple it.
    r = np.zeros((1, 1, 2, 3))
    t = np.zeros((1, 1, 2, 3))
    t[0, 0, 0] = [0.3, 0.4, 0.0]  # distance 0.5
    m = np.array([[[True, False]]])
    eps = PHOTOMETRIC_EPS
    np.testing.assert_allclose(photometric_loss(r, t, m), [np.sqrt(0.25 + eps * eps) - eps], **F64)
    np.testing.assert_allclose(photometric_loss(r, 2 * t, m), [np.sqrt(1.0 + eps * eps) - eps], **F64)
    assert abs(photometric_loss(r, t, m)[0] - 0.5) < eps


def test_photometric_is_normalised_by_the_mask_sum_of_each_image(rng):
    r = np.zeros((2, 4, 4, 3))
    t = np.full((2, 4, 4, 3), 0.2)
    m = np.zeros((2, 4, 4), bool)
    m[0, :1] = True   # 4 pixels
    m[1, :3] = True   # 12 pixels
    per_pixel = np.sqrt(3 * 0.04 + PHOTOMETRIC_EPS ** 2) - PHOTOMETRIC_EPS
    np.testing.assert_allclose(photometric_loss(r, t, m), [per_pixel, per_pixel], **F64)


def test_photometric_float_mask_summing_below_one_is_not_scaled_up():
    r, t = np.zeros((1, 1, 2, 3)), np.full((1, 1, 2, 3), 0.5)
    m = np.array([[[0.25, 0.25]]])
    per_pixel = np.sqrt(0.75 + PHOTOMETRIC_EPS ** 2) - PHOTOMETRIC_EPS
    np.testing.assert_allclose(photometric_loss(r, t, m), [0.5 * per_pixel], **F64)


def test_photometric_bool_mask_equals_the_same_mask_as_float_weights(rng):
    r, t, m = photometric_inputs(rng, dtype=np.float32)
    grad_out = rng.normal(size=3).astype(np.float32)
    np.testing.assert_array_equal(photometric_loss(r, t, m), photometric_loss(r, t, m.astype(np.float32)))
    np.testing.assert_array_equal(photometric_loss_backward(r, t, m, grad_out),
                                  photometric_loss_backward(r, t, m.astype(np.float32), grad_out))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_photometric_empty_mask_gives_zero_loss_and_zero_gradient(rng, dtype):
    r, t, m = photometric_inputs(rng, dtype=dtype)
    m[1] = False
    loss = photometric_loss(r, t, m)
    grad = photometric_loss_backward(r, t, m, np.ones(3, dtype))
    assert loss[1] == 0.0 and loss[0] > 0 and np.all(np.isfinite(loss))
    assert np.all(grad[1] == 0.0) and np.all(np.isfinite(grad))
    zero = photometric_loss(r, t, np.zeros_like(m, dtype=dtype))
    np.testing.assert_array_equal(zero, np.zeros(3))


def test_photometric_zero_error_gives_zero_loss_and_zero_gradient(rng):
    r, _, m = photometric_inputs(rng, dtype=np.float32)
    np.testing.assert_array_equal(photometric_loss(r, r, m), np.zeros(3, np.float32))
    np.testing.assert_array_equal(photometric_loss_backward(r, r, m, np.ones(3, np.float32)), np.zeros_like(r))


def test_photometric_gradient_norm_per_pixel_is_at_most_one_over_the_mask_sum(rng):
    r, t, m = photometric_inputs(rng)
    grad = photometric_loss_backward(r, t, m, np.ones(3))
    bound = 1.0 / np.maximum(1.0, m.sum(axis=(1, 2)))
    assert np.all(np.linalg.norm(grad, axis=-1).max(axis=(1, 2)) <= bound * (1 + 1e-12))


@pytest.mark.parametrize("mask", ["bool", "float"])
def test_photometric_backward_matches_finite_differences(rng, tol, mask):
    r, t, m = photometric_inputs(rng, mask=mask)
    grad_out = rng.normal(size=3)
    analytic = photometric_loss_backward(r, t, m, grad_out)
    assert_gradient_matches(lambda x: photometric_loss(x, t, m), r, grad_out, analytic, tol, n_samples=80, rng=rng)


def test_photometric_backward_near_zero_distance_matches_finite_differences(rng, tol):
    # Distances around eps, where the smoothing matters.
    r, _, m = photometric_inputs(rng)
    t = r + rng.normal(scale=PHOTOMETRIC_EPS, size=r.shape)
    grad_out = rng.normal(size=3)
    analytic = photometric_loss_backward(r, t, m, grad_out)
    assert_gradient_matches(lambda x: photometric_loss(x, t, m), r, grad_out, analytic, tol, n_samples=80, rng=rng,
                            eps=1e-8)


def test_photometric_result_does_not_depend_on_the_number_of_threads(rng):
    r, t, m = photometric_inputs(rng, batch=2, h=90, w=100, dtype=np.float32)
    grad_out = np.ones(2, np.float32)
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = photometric_loss(r, t, m), photometric_loss_backward(r, t, m, grad_out)
    finally:
        numba.set_num_threads(threads)
    many = photometric_loss(r, t, m), photometric_loss_backward(r, t, m, grad_out)
    for a, b in zip(one, many):
        np.testing.assert_array_equal(a, b)


def test_photometric_accepts_non_contiguous_inputs(rng):
    r, t, m = photometric_inputs(rng, dtype=np.float32)
    wide = np.zeros(r.shape[:-1] + (6,), np.float32)
    wide[..., ::2] = r
    grad_out = np.ones(3, np.float32)
    np.testing.assert_array_equal(photometric_loss(wide[..., ::2], t, m), photometric_loss(r, t, m))
    np.testing.assert_array_equal(photometric_loss_backward(wide[..., ::2], t, m, grad_out),
                                  photometric_loss_backward(r, t, m, grad_out))


# ---------------------------------------------------------------------------------------------
# Landmarks

@pytest.mark.parametrize("per_image", [False, True])
def test_landmarks_match_the_reference(rng, per_image):
    p, t, w = landmark_inputs(rng, per_image=per_image)
    np.testing.assert_allclose(landmark_loss(p, t, w), reference_landmarks(p, t, w), **F64)
    p32, t32, w32 = (a.astype(np.float32) for a in (p, t, w))
    out = landmark_loss(p32, t32, w32)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference_landmarks(p32, t32, w32), rtol=1e-5)


def test_landmarks_shared_weights_equal_the_same_weights_per_image(rng):
    p, t, w = landmark_inputs(rng, dtype=np.float32)
    grad_out = rng.normal(size=3).astype(np.float32)
    per_image = np.ascontiguousarray(np.broadcast_to(w, (3, 68)))
    np.testing.assert_array_equal(landmark_loss(p, t, w), landmark_loss(p, t, per_image))
    np.testing.assert_array_equal(landmark_loss_backward(p, t, w, grad_out),
                                  landmark_loss_backward(p, t, per_image, grad_out))


def test_landmarks_zero_weights_give_zero(rng):
    p, t, w = landmark_inputs(rng)
    np.testing.assert_array_equal(landmark_loss(p, t, 0 * w), np.zeros(3))
    np.testing.assert_array_equal(landmark_loss_backward(p, t, 0 * w, np.ones(3)), np.zeros_like(p))


@pytest.mark.parametrize("per_image", [False, True])
def test_landmarks_backward_matches_finite_differences(rng, tol, per_image):
    p, t, w = landmark_inputs(rng, k=10, per_image=per_image)
    grad_out = rng.normal(size=3)
    analytic = landmark_loss_backward(p, t, w, grad_out)
    assert_gradient_matches(lambda x: landmark_loss(x, t, w), p, grad_out, analytic, tol)


# ---------------------------------------------------------------------------------------------
# Prior

@pytest.mark.parametrize("weighted", [False, True])
def test_prior_matches_the_reference(rng, weighted):
    c = rng.normal(size=(4, 80))
    w = rng.uniform(0, 2, size=80) if weighted else None
    np.testing.assert_allclose(prior_loss(c, w), reference_prior(c, w), **F64)
    out = prior_loss(c.astype(np.float32), None if w is None else w.astype(np.float32))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, reference_prior(c, w), rtol=1e-5)


@pytest.mark.parametrize("weighted", [False, True])
def test_prior_backward_matches_finite_differences(rng, tol, weighted):
    c = rng.normal(size=(3, 12))
    w = rng.uniform(0, 2, size=12) if weighted else None
    grad_out = rng.normal(size=3)
    analytic = prior_loss_backward(c, w, grad_out)
    assert_gradient_matches(lambda x: prior_loss(x, w), c, grad_out, analytic, tol)


def test_losses_are_exported_from_fastface():
    for name in ("photometric_loss", "photometric_loss_backward", "landmark_loss", "landmark_loss_backward",
                 "prior_loss", "prior_loss_backward", "PHOTOMETRIC_EPS"):
        assert getattr(fastface, name) is getattr(losses_module, name)
        assert name in fastface.__all__


# ---------------------------------------------------------------------------------------------
# Bad input

def _photometric_bad(rng):
    return photometric_inputs(rng, dtype=np.float32)


@pytest.mark.parametrize("make_bad, exc, pattern", [
    (lambda r, t, m: (r[0], t, m), ValueError, "rendered must have shape"),
    (lambda r, t, m: (r.astype(np.int32), t, m), TypeError, "rendered"),
    (lambda r, t, m: (r, t[:, :-1], m), ValueError, "target"),
    (lambda r, t, m: (r, t.astype(np.float64), m), TypeError, "target"),
    (lambda r, t, m: (r, t, m[..., :-1]), ValueError, "mask"),
    (lambda r, t, m: (r, t, m.astype(np.int32)), TypeError, "mask"),
    (lambda r, t, m: (r, t, m.astype(np.float64)), TypeError, "mask"),
    (lambda r, t, m: (r, t, m * 2.0 - 0.5), TypeError, "mask"),
    (lambda r, t, m: (r, t, (m * np.float32(2)).astype(np.float32)), ValueError, r"mask holds values .* \[0, 1\]"),
    (lambda r, t, m: (r, t, np.where(m, np.float32(np.nan), np.float32(0))), ValueError, "mask holds"),
    (lambda r, t, m: (r * np.float32(np.nan), t, m), ValueError, "rendered holds"),
    (lambda r, t, m: (r, t * np.float32(np.inf), m), ValueError, "target holds"),
    (lambda r, t, m: (r, t, None), TypeError, "mask"),
])
def test_photometric_bad_input_raises_naming_the_argument(rng, make_bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        photometric_loss(*make_bad(*_photometric_bad(rng)))


@pytest.mark.parametrize("grad_out, exc", [
    (None, TypeError), (np.ones(2, np.float32), ValueError), (np.ones(3, np.float64), TypeError),
    (np.array([1, np.nan, 1], np.float32), ValueError)])
def test_photometric_backward_bad_grad_out_raises(rng, grad_out, exc):
    with pytest.raises(exc, match="grad_out"):
        photometric_loss_backward(*_photometric_bad(rng), grad_out)


@pytest.mark.parametrize("make_bad, exc, pattern", [
    (lambda p, t, w: (p[0], t, w), ValueError, "points"),
    (lambda p, t, w: (p[..., :1], t, w), ValueError, "points"),
    (lambda p, t, w: (p, t[:2], w), ValueError, "target"),
    (lambda p, t, w: (p, t, w[:-1]), ValueError, "weights"),
    (lambda p, t, w: (p, t, w[None].repeat(2, 0)), ValueError, "weights"),
    (lambda p, t, w: (p, t, w.astype(np.float32)), TypeError, "weights"),
    (lambda p, t, w: (p, t, -w), ValueError, "weights holds values that are not finite and >= 0"),
    (lambda p, t, w: (p, t, w * np.inf), ValueError, "weights holds"),
    (lambda p, t, w: (p * np.nan, t, w), ValueError, "points holds"),
    (lambda p, t, w: (p, t * np.nan, w), ValueError, "target holds"),
    (lambda p, t, w: (p, t, None), TypeError, "weights"),
])
def test_landmarks_bad_input_raises_naming_the_argument(rng, make_bad, exc, pattern):
    with pytest.raises(exc, match=pattern):
        landmark_loss(*make_bad(*landmark_inputs(rng)))


def test_landmarks_backward_bad_grad_out_raises(rng):
    with pytest.raises(ValueError, match="grad_out"):
        landmark_loss_backward(*landmark_inputs(rng), np.ones(4))


@pytest.mark.parametrize("coeffs, weights, exc, pattern", [
    (np.zeros(5), None, ValueError, "coeffs"),
    (np.zeros((2, 5), np.int64), None, TypeError, "coeffs"),
    (np.zeros((2, 5)), np.ones(4), ValueError, "weights"),
    (np.zeros((2, 5)), np.ones(5, np.float32), TypeError, "weights"),
    (np.zeros((2, 5)), -np.ones(5), ValueError, "weights holds"),
    (np.full((2, 5), np.nan), None, ValueError, "coeffs holds"),
])
def test_prior_bad_input_raises_naming_the_argument(coeffs, weights, exc, pattern):
    with pytest.raises(exc, match=pattern):
        prior_loss(coeffs, weights)


def test_prior_backward_bad_grad_out_raises():
    with pytest.raises(ValueError, match="grad_out"):
        prior_loss_backward(np.zeros((2, 5)), None, np.ones((2, 1)))


def _all_calls(rng, dtype=np.float32):
    """(function, args, output shape) for every loss and backward, on small inputs."""
    r, t, m = photometric_inputs(rng, dtype=dtype)
    p, lt, w = landmark_inputs(rng, dtype=dtype)
    c = rng.normal(size=(3, 8)).astype(dtype)
    g = np.ones(3, dtype)
    return [(photometric_loss, (r, t, m), (3,)), (photometric_loss_backward, (r, t, m, g), r.shape),
            (landmark_loss, (p, lt, w), (3,)), (landmark_loss_backward, (p, lt, w, g), p.shape),
            (prior_loss, (c, None), (3,)), (prior_loss_backward, (c, None, g), c.shape)]


def test_every_loss_writes_into_a_given_out_buffer(rng):
    for fn, args, shape in _all_calls(rng):
        out = np.full(shape, np.nan, np.float32)
        assert fn(*args, out=out) is out, fn.__name__
        np.testing.assert_array_equal(out, fn(*args), err_msg=fn.__name__)


@pytest.mark.parametrize("make_bad, exc, pattern", [
    (lambda shape: np.zeros(shape, np.float64), TypeError, "out must be float32"),
    (lambda shape: np.zeros((1,) + shape, np.float32), ValueError, "out must have shape"),
    (lambda shape: np.zeros(shape + (2,), np.float32)[..., 0], ValueError, "out must be C-contiguous"),
    (lambda shape: [0.0] * shape[0], TypeError, "out must be a numpy array like the inputs"),
])
def test_a_bad_out_buffer_raises_naming_it(rng, make_bad, exc, pattern):
    for fn, args, shape in _all_calls(rng):
        with pytest.raises(exc, match=pattern):
            fn(*args, out=make_bad(shape))


def test_value_checks_off_skip_the_data_checks(rng):
    r, t, m = _photometric_bad(rng)
    with fastface.value_checks(False):
        out = photometric_loss(r, t, (m * np.float32(2)).astype(np.float32))
    assert np.all(np.isfinite(out))


# ---------------------------------------------------------------------------------------------
# GPU against CPU (real GPU; tests/test_gpu_paths_emulated*.py compare the host emulation)

# (B, H, W, C): quads of pixels (C = 3, H * W % 4 == 0) over 12 chunks and two mask-count blocks; one pixel a
# thread (odd H * W; C = 2); a batch of one; 1.2 MB images as in training.
_GPU_SHAPES = [(5, 100, 120, 3), (3, 37, 41, 3), (3, 9, 10, 2), (1, 224, 224, 3)]


@pytest.mark.parametrize("mask", ["bool", "float"])
@pytest.mark.parametrize("shape", _GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_photometric_gpu_matches_cpu(rng, tol, cupy, mask, shape):
    B, H, W, C = shape
    r, t, m = photometric_inputs(rng, batch=B, h=H, w=W, c=C, dtype=np.float32, mask=mask)
    if B > 1:
        m[1] = 0
    grad_out = rng.normal(size=B).astype(np.float32)
    gpu = [cupy.asarray(a) for a in (r, t, m, grad_out)]
    loss = photometric_loss(*gpu[:3])
    assert loss.dtype == cupy.float32 and loss.shape == (B,)
    np.testing.assert_allclose(loss.get(), photometric_loss(r, t, m), rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])
    grad = photometric_loss_backward(*gpu)
    np.testing.assert_allclose(grad.get(), photometric_loss_backward(r, t, m, grad_out), rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])
    if B > 1:
        assert loss.get()[1] == 0 and np.all(grad.get()[1] == 0)
    # Deterministic: no atomics and a fixed chunking, so a second run gives the same bits; so do inputs and an
    # `out` at addresses 4 bytes past a 16-byte boundary (copied before the float4 loads).
    np.testing.assert_array_equal(photometric_loss(*gpu[:3]).get(), loss.get())
    np.testing.assert_array_equal(photometric_loss_backward(*gpu).get(), grad.get())
    shifted = [cupy.empty(a.size + 1, a.dtype)[1:].reshape(a.shape) for a in (gpu[0], gpu[1], gpu[0])]
    shifted[0][...], shifted[1][...] = gpu[0], gpu[1]
    np.testing.assert_array_equal(photometric_loss(shifted[0], shifted[1], gpu[2]).get(), loss.get())
    photometric_loss_backward(shifted[0], shifted[1], gpu[2], gpu[3], out=shifted[2])
    np.testing.assert_array_equal(shifted[2].get(), grad.get())


@pytest.mark.parametrize("per_image", [False, True])
@pytest.mark.parametrize("batch", [3, 70])
def test_landmarks_and_prior_gpu_match_cpu(rng, tol, cupy, per_image, batch):
    # 70 images: 9 blocks of 8 warps, the last with 2 images.
    p, t, w = landmark_inputs(rng, batch=batch, dtype=np.float32, per_image=per_image)
    grad_out = rng.normal(size=batch).astype(np.float32)
    g = [cupy.asarray(a) for a in (p, t, w, grad_out)]
    close = dict(rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
    np.testing.assert_allclose(landmark_loss(*g[:3]).get(), landmark_loss(p, t, w), **close)
    np.testing.assert_allclose(landmark_loss_backward(*g).get(), landmark_loss_backward(p, t, w, grad_out), **close)
    c = rng.normal(size=(batch, 80)).astype(np.float32)
    pw = rng.uniform(0, 2, size=80).astype(np.float32)
    for weights in (None, pw):
        gw = None if weights is None else cupy.asarray(weights)
        np.testing.assert_allclose(prior_loss(cupy.asarray(c), gw).get(), prior_loss(c, weights), **close)
        np.testing.assert_allclose(prior_loss_backward(cupy.asarray(c), gw, g[3]).get(),
                                   prior_loss_backward(c, weights, grad_out), **close)


def test_gpu_losses_record_in_a_cuda_graph_with_out_buffers(rng, tol, cupy):
    """With value checks off and buffers passed as `out`, the losses neither wait for the GPU nor allocate
    outputs (the photometric passes take their scratch from cupy's pool, which the warm-up call filled):
    recorded once in a CUDA graph, replays follow new inputs written into the same arrays."""
    r, t, m = photometric_inputs(rng, batch=4, h=64, w=64, dtype=np.float32)
    p, lt, w = landmark_inputs(rng, batch=4, dtype=np.float32)
    c = rng.normal(size=(4, 80)).astype(np.float32)
    host = dict(r=r, t=t, m=m, p=p, lt=lt, w=w, c=c, g=np.ones(4, np.float32))
    dev = {k: cupy.asarray(v) for k, v in host.items()}
    outs = {"photo": cupy.empty(4, cupy.float32), "photo_grad": cupy.empty_like(dev["r"]),
            "lm": cupy.empty(4, cupy.float32), "lm_grad": cupy.empty_like(dev["p"]),
            "prior": cupy.empty(4, cupy.float32), "prior_grad": cupy.empty_like(dev["c"])}

    def step(a):
        photometric_loss(a["r"], a["t"], a["m"], out=outs["photo"])
        photometric_loss_backward(a["r"], a["t"], a["m"], a["g"], out=outs["photo_grad"])
        landmark_loss(a["p"], a["lt"], a["w"], out=outs["lm"])
        landmark_loss_backward(a["p"], a["lt"], a["w"], a["g"], out=outs["lm_grad"])
        prior_loss(a["c"], out=outs["prior"])
        prior_loss_backward(a["c"], None, a["g"], out=outs["prior_grad"])

    with fastface.value_checks(False):
        step(dev)  # compiles the kernels outside the capture
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            stream.begin_capture()
            try:
                step(dev)
            finally:
                graph = stream.end_capture()
    new = dict(host, r=rng.uniform(size=r.shape).astype(np.float32), c=rng.normal(size=c.shape).astype(np.float32))
    for k in ("r", "c"):
        dev[k][...] = cupy.asarray(new[k])
    graph.launch(stream)
    stream.synchronize()
    close = dict(rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
    np.testing.assert_allclose(outs["photo"].get(), photometric_loss(new["r"], t, m), **close)
    np.testing.assert_allclose(outs["photo_grad"].get(), photometric_loss_backward(new["r"], t, m, new["g"]), **close)
    np.testing.assert_allclose(outs["prior"].get(), prior_loss(new["c"]), **close)
    np.testing.assert_allclose(outs["prior_grad"].get(), prior_loss_backward(new["c"], None, new["g"]), **close)
    np.testing.assert_allclose(outs["lm"].get(), landmark_loss(p, lt, w), **close)


def test_gpu_losses_reject_float64_and_mixed_devices(rng, cupy):
    r, t, m = photometric_inputs(rng)
    with pytest.raises(TypeError, match="float32 only"):
        photometric_loss(cupy.asarray(r), cupy.asarray(t), cupy.asarray(m))
    with pytest.raises(TypeError, match="numpy array but"):
        photometric_loss(cupy.asarray(r.astype(np.float32)), t.astype(np.float32), m)
