"""conv2d, im2col and their backward: reference, finite differences, GPU parity, bad input."""
import itertools

import numpy as np
import pytest

from fastface.nn import conv2d, conv2d_backward, im2col, im2col_backward
from tests.gradcheck import assert_gradient_matches

# (kernel, stride, padding): the encoder's three kinds, and a 1x1 and an odd-size case.
CONFIGS = [(3, 2, 1), (3, 1, 1), (4, 4, 0), (1, 1, 0), (2, 3, 2)]


def conv_reference(x, w, b, stride, pad):
    """The definition, with loops, in float64."""
    B, H, W, C = x.shape
    KH, KW, _, O = w.shape
    xp = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    Ho, Wo = (H + 2 * pad - KH) // stride + 1, (W + 2 * pad - KW) // stride + 1
    y = np.zeros((B, Ho, Wo, O))
    for bb, oh, ow in itertools.product(range(B), range(Ho), range(Wo)):
        window = xp[bb, oh * stride:oh * stride + KH, ow * stride:ow * stride + KW]
        y[bb, oh, ow] = np.einsum("ijc,ijco->o", window, w) + (0 if b is None else b)
    return y


def im2col_reference(x, bias, relu, k, stride, pad):
    a = np.asarray(x, np.float64) + (0 if bias is None else bias)
    if relu:
        a = np.maximum(a, 0)
    B, H, W, C = x.shape
    ap = np.pad(a, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    Ho, Wo = (H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1
    rows = []
    for bb, oh, ow in itertools.product(range(B), range(Ho), range(Wo)):
        rows.append(ap[bb, oh * stride:oh * stride + k, ow * stride:ow * stride + k].reshape(-1))
    return np.array(rows)


def _inputs(rng, k, B=2, H=7, W=6, C=3, O=5):
    x = rng.normal(size=(B, H, W, C))
    w = rng.normal(size=(k, k, C, O))
    b = rng.normal(size=O)
    return x, w, b


@pytest.mark.parametrize("k,stride,pad", CONFIGS)
def test_conv2d_matches_loop_reference(rng, tol, k, stride, pad):
    x, w, b = _inputs(rng, k)
    y = conv2d(x, w, b, stride, pad)
    np.testing.assert_allclose(y, conv_reference(x, w, b, stride, pad), rtol=1e-12, atol=1e-12)
    y32 = conv2d(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), stride, pad)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, conv_reference(x, w, b, stride, pad), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("relu", [False, True])
def test_im2col_applies_bias_and_relu_before_zero_padding(rng, relu):
    x = rng.normal(size=(2, 5, 4, 3))
    bias = rng.normal(size=3)
    cols = im2col(x, bias, (3, 3), 2, 1, in_relu=relu)
    ref = im2col_reference(x, bias, relu, 3, 2, 1)
    np.testing.assert_allclose(cols, ref, rtol=1e-14, atol=1e-14)
    # the padded border is zero, not relu(0 + bias)
    assert np.all(cols[0, :3 * 3] == 0.0)


@pytest.mark.parametrize("k,stride,pad", CONFIGS)
def test_conv2d_backward_matches_finite_differences(rng, tol, k, stride, pad):
    x, w, b = _inputs(rng, k)
    y = conv2d(x, w, b, stride, pad)
    g = rng.normal(size=y.shape)
    grad_x, grad_w, grad_b = conv2d_backward(x, w, g, stride, pad)
    assert_gradient_matches(lambda v: conv2d(v, w, b, stride, pad), x, g, grad_x, tol, 40, rng)
    assert_gradient_matches(lambda v: conv2d(x, v, b, stride, pad), w, g, grad_w, tol, 40, rng)
    assert_gradient_matches(lambda v: conv2d(x, w, v, stride, pad), b, g, grad_b, tol)


def test_im2col_backward_matches_finite_differences_through_the_prologue(rng, tol):
    x = rng.normal(size=(2, 5, 6, 4))
    bias = rng.normal(size=4)
    cols = im2col(x, bias, (3, 3), 2, 1, in_relu=True)
    g = rng.normal(size=cols.shape)
    grad_x = im2col_backward(x, bias, g, (3, 3), 2, 1, in_relu=True)
    assert_gradient_matches(lambda v: im2col(v, bias, (3, 3), 2, 1, in_relu=True), x, g, grad_x, tol, 60, rng)
    # the gradient of in_bias is the sum of grad_x over B, H, W
    assert_gradient_matches(lambda v: im2col(x, v, (3, 3), 2, 1, in_relu=True), bias, g,
                            grad_x.sum(axis=(0, 1, 2)), tol)


def test_im2col_backward_scale_multiplies_the_gradient(rng):
    x = rng.normal(size=(1, 4, 4, 2))
    g = rng.normal(size=(16, 18))
    one = im2col_backward(x, None, g, (3, 3), 1, 1)
    np.testing.assert_allclose(im2col_backward(x, None, g, (3, 3), 1, 1, scale=0.25), 0.25 * one, rtol=1e-15)


# ---------------------------------------------------------------------------------------------
# GPU against CPU

@pytest.mark.parametrize("k,stride,pad", CONFIGS)
@pytest.mark.parametrize("C", [3, 8])  # 3: one channel per thread; 8: 4-wide float vectors
def test_gpu_conv2d_and_backward_match_cpu(cupy, rng, tol, k, stride, pad, C):
    x, w, b = (a.astype(np.float32) for a in _inputs(rng, k, C=C, O=8))
    y = conv2d(x, w, b, stride, pad)
    g = rng.normal(size=y.shape).astype(np.float32)
    grads = conv2d_backward(x, w, g, stride, pad)
    y_gpu = conv2d(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b), stride, pad)
    grads_gpu = conv2d_backward(cupy.asarray(x), cupy.asarray(w), cupy.asarray(g), stride, pad)
    np.testing.assert_allclose(y_gpu.get(), y, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"] * 10)
    for a_gpu, a in zip(grads_gpu, grads):
        np.testing.assert_allclose(a_gpu.get(), a, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"] * 100)


@pytest.mark.parametrize("C,x_dtype,out_dtype", [
    (3, np.float32, np.float32), (8, np.float32, np.float32), (3, np.float32, np.float16),
    (8, np.float16, np.float16), (6, np.float16, np.float16)])
@pytest.mark.parametrize("relu", [False, True])
def test_gpu_im2col_variants_match_cpu(cupy, rng, tol, C, x_dtype, out_dtype, relu):
    x = rng.normal(size=(2, 7, 5, C)).astype(x_dtype)
    bias = rng.normal(size=C).astype(np.float32)
    ref = im2col(x.astype(np.float32), bias, (3, 3), 2, 1, in_relu=relu)
    got = im2col(cupy.asarray(x), cupy.asarray(bias), (3, 3), 2, 1, in_relu=relu, out_dtype=out_dtype)
    assert got.dtype == out_dtype
    np.testing.assert_allclose(got.get().astype(np.float32), ref.astype(out_dtype).astype(np.float32),
                               rtol=tol["float16_rtol"], atol=tol["gpu_cpu_atol"])
    g = rng.normal(size=ref.shape).astype(np.float32)
    ref_b = im2col_backward(x.astype(np.float32), bias, g, (3, 3), 2, 1, in_relu=relu, scale=0.5)
    got_b = im2col_backward(cupy.asarray(x), cupy.asarray(bias), cupy.asarray(g.astype(out_dtype)), (3, 3), 2, 1,
                            in_relu=relu, scale=0.5, out_dtype=x_dtype)
    rtol = tol["gpu_cpu_rtol"] if out_dtype == np.float32 and x_dtype == np.float32 else 1e-2
    np.testing.assert_allclose(got_b.get().astype(np.float32), ref_b, rtol=rtol, atol=1e-2 if rtol == 1e-2 else 1e-5)


@pytest.mark.parametrize("C,N,stride,H", [(32, 64, 1, 9), (64, 72, 2, 7), (32, 8, 2, 5), (96, 128, 1, 4)])
@pytest.mark.parametrize("relu", [False, True])
def test_gpu_implicit_gemm_conv_matches_im2col_and_gemm(cupy, rng, tol, C, N, stride, H, relu):
    """The tensor-core implicit GEMM against the float32 gather + GEMM on the same float16 data
    (M = B*Ho*Wo is not a multiple of the 128-row tile, N % 64 != 0 in one case)."""
    from fastface._gemm import gemm
    from fastface.nn.conv import _conv_implicit, implicit_gemm_supported

    assert implicit_gemm_supported(np.float16, C, N, True)
    x = rng.normal(size=(3, H, H + 1, C)).astype(np.float16)
    bias = rng.normal(size=C).astype(np.float32)
    w = (rng.normal(size=(3, 3, C, N)) / np.sqrt(9 * C)).astype(np.float16)
    cols = im2col(x.astype(np.float32), bias, (3, 3), stride, 1, in_relu=relu).astype(np.float16)
    ref = cols.astype(np.float32) @ w.reshape(-1, N).astype(np.float32)
    out = cupy.empty(ref.shape, dtype=np.float16)
    _conv_implicit(cupy.asarray(x), cupy.asarray(bias), relu, 3, 3, stride, 1,
                   cupy.asarray(w.reshape(-1, N)), out)
    np.testing.assert_allclose(out.get().astype(np.float32), ref, rtol=tol["float16_rtol"] * 4, atol=2e-3)
    # and cuBLAS on the gathered float16 cols agrees the same way
    out2 = gemm(cupy.asarray(cols), cupy.asarray(w.reshape(-1, N)), cupy.empty(ref.shape, dtype=np.float16))
    np.testing.assert_allclose(out2.get().astype(np.float32), ref, rtol=tol["float16_rtol"] * 4, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# Bad input

def test_conv2d_rejects_bad_input(rng):
    x, w, b = _inputs(rng, 3)
    with pytest.raises(TypeError, match="x must be"):
        conv2d(x.astype(np.int32), w, b)
    with pytest.raises(ValueError, match="weight must have shape"):
        conv2d(x, w[:, :, :2], b)
    with pytest.raises(TypeError, match="weight must be float64"):
        conv2d(x, w.astype(np.float32), b)
    with pytest.raises(ValueError, match="bias must have shape"):
        conv2d(x, w, b[:2])
    with pytest.raises(ValueError, match="stride must be"):
        conv2d(x, w, b, stride=0)
    with pytest.raises(ValueError, match="padding must be"):
        conv2d(x, w, b, padding=-1)
    with pytest.raises(ValueError, match="does not fit"):
        conv2d(x[:, :2, :2], w, b)
    x_nan = x.copy()
    x_nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="x holds 1 NaN"):
        conv2d(x_nan, w, b)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        conv2d_backward(x, w, np.zeros((2, 3, 3, 5)))


def test_im2col_rejects_bad_input(rng):
    x = rng.normal(size=(1, 4, 4, 2))
    with pytest.raises(ValueError, match="in_bias must have shape"):
        im2col(x, np.zeros(3), (3, 3))
    with pytest.raises(TypeError, match="kernel must be"):
        im2col(x, None, 3)
    with pytest.raises(ValueError, match="out must have shape"):
        im2col(x, None, (3, 3), out=np.zeros((4, 4)))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        im2col_backward(x, None, np.zeros((4, 4)), (3, 3))


def test_conv2d_rejects_mixed_devices_and_float64_on_gpu(cupy, rng):
    x, w, b = _inputs(rng, 3)
    with pytest.raises(TypeError, match="numpy array but"):
        conv2d(x, cupy.asarray(w), b)
    with pytest.raises(TypeError, match="float32 only"):
        conv2d(cupy.asarray(x), cupy.asarray(w), cupy.asarray(b))
