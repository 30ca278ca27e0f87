"""The specialised gather kernels of kernels/nn_conv.cu against the generic ones and the CPU.

im2col_fwd_patch (the stem's float4 re-layout, stride == kernel, no padding) replaces
im2col_fwd_run where it applies (fastface.nn.conv.USE_PATCH_GATHER). Its index arithmetic is
emulated here in numpy, thread by thread, so that it is checked without a GPU; the GPU tests
compare it bit for bit with the generic kernel and with the CPU gather (the prologue is one
float32 add and one rounding on both).
"""
import numpy as np
import pytest

from fastface.nn import im2col
from fastface.nn import conv as conv_module


def emulate_im2col_fwd_patch(x, in_bias, in_relu, KH, KW, out_dtype):
    """kernels/nn_conv.cu im2col_fwd_patch, every thread at once: the same decode of t."""
    B, H, W, C = x.shape
    assert (KW * C) % 4 == 0 and (W * C) % 4 == 0
    Ho, Wo = H // KH, W // KW
    N4 = KW * C // 4
    total = B * Ho * Wo * KH * N4
    t = np.arange(total, dtype=np.int64)
    run = t // N4
    j = t - run * N4
    kh = run % KH
    r = run // KH
    ow = r % Wo
    r = r // Wo
    oh = r % Ho
    b = r // Ho
    ih = oh * KH + kh
    src = ((b * H + ih) * W + ow * KW) * C + 4 * j
    assert src.max() + 4 <= x.size and np.all(src % 4 == 0)  # in range, float4-aligned
    flat = x.reshape(-1)
    cols = np.full(total * 4, np.nan, dtype=out_dtype)
    for v in range(4):
        a = flat[src + v].astype(np.float32)
        if in_bias is not None:
            a = a + in_bias[(4 * j + v) % C]
        if in_relu:
            a = np.maximum(a, np.float32(0))
        cols[t * 4 + v] = a.astype(out_dtype)
    return cols.reshape(B * Ho * Wo, KH * KW * C)


# W * C must be a multiple of 4 (float4 rows); H = 9, 11 leave rows the stem does not read.
@pytest.mark.parametrize("shape", [(1, 8, 8, 3), (2, 12, 16, 3), (3, 9, 20, 3), (2, 11, 28, 3), (1, 224, 224, 3)])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("relu", [False, True])
def test_patch_gather_emulation_matches_cpu_im2col(rng, shape, out_dtype, relu):
    x = rng.normal(size=shape).astype(np.float32)
    C = shape[3]
    bias = np.full(C, -0.5, np.float32) if not relu else rng.normal(size=C).astype(np.float32)
    got = emulate_im2col_fwd_patch(x, bias, relu, 4, 4, out_dtype)
    ref = im2col(x, bias, (4, 4), 4, 0, in_relu=relu).astype(out_dtype)
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


def _gpu_gather(cupy, x, bias, relu, k, stride, pad, out_dtype, use_patch):
    old = conv_module.USE_PATCH_GATHER
    conv_module.USE_PATCH_GATHER = use_patch
    try:
        got = im2col(cupy.asarray(x), None if bias is None else cupy.asarray(bias), (k, k), stride, pad,
                     in_relu=relu, out_dtype=out_dtype)
        return got.get()
    finally:
        conv_module.USE_PATCH_GATHER = old


@pytest.mark.parametrize("shape", [(1, 224, 224, 3), (2, 8, 8, 3), (3, 9, 20, 3), (5, 16, 12, 3)])
@pytest.mark.parametrize("out_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bias_kind,relu", [("stem", False), ("none", False), ("random", True)])
def test_gpu_patch_gather_matches_generic_kernel_and_cpu_bit_for_bit(cupy, rng, shape, out_dtype, bias_kind, relu):
    x = rng.uniform(size=shape).astype(np.float32)
    bias = {"stem": np.full(3, -0.5, np.float32), "none": None,
            "random": rng.normal(size=3).astype(np.float32)}[bias_kind]
    x_gpu = cupy.asarray(x)
    assert conv_module._patch_applies(x_gpu, cupy.empty(16, out_dtype), 4, 4, 4, 0)
    new = _gpu_gather(cupy, x, bias, relu, 4, 4, 0, out_dtype, True)
    old = _gpu_gather(cupy, x, bias, relu, 4, 4, 0, out_dtype, False)
    ref = im2col(x, bias, (4, 4), 4, 0, in_relu=relu).astype(out_dtype)
    assert new.dtype == out_dtype and new.shape == ref.shape
    np.testing.assert_array_equal(new, old)
    np.testing.assert_array_equal(new, ref)


def test_gpu_patch_gather_falls_back_on_unaligned_input(cupy, rng):
    """A view that starts 4 bytes into its buffer is not float4-aligned: the generic kernel runs."""
    x = rng.uniform(size=(2 * 8 * 8 * 3 + 1,)).astype(np.float32)
    x_gpu = cupy.asarray(x)[1:].reshape(2, 8, 8, 3)
    assert not conv_module._patch_applies(x_gpu, cupy.empty(16, np.float16), 4, 4, 4, 0)
    got = im2col(x_gpu, None, (4, 4), 4, 0, out_dtype=np.float16).get()
    np.testing.assert_array_equal(got, im2col(x[1:].reshape(2, 8, 8, 3), None, (4, 4), 4, 0).astype(np.float16))


# ---------------------------------------------------------------------------------------------
# im2col_fwd_rows: the vector gather of K x K kernels over a (row blocks, Ho, B) grid

def emulate_im2col_fwd_rows(x, in_bias, in_relu, K, stride, pad, V, out_dtype, block=256):
    """kernels/nn_conv.cu im2col_fwd_rows over its whole launch grid, as `_im2col` launches it."""
    B, H, W, C = x.shape
    Ho, Wo = (H + 2 * pad - K) // stride + 1, (W + 2 * pad - K) // stride + 1
    gshift = (C // V).bit_length() - 1
    assert (1 << gshift) * V == C
    row_len = (Wo * K * K) << gshift
    n_blocks = (row_len + block - 1) // block
    cols = np.full(B * Ho * Wo * K * K * C, np.nan, dtype=out_dtype)
    written = np.zeros(cols.size, dtype=np.int64)
    flat = x.reshape(-1)
    t = np.arange(n_blocks * block)
    t = t[t < row_len]
    c0 = (t & ((1 << gshift) - 1)) * V
    q = t >> gshift
    tap = q % (K * K)
    ow = q // (K * K)
    kh = tap // K
    kw = tap - kh * K
    for b in range(B):           # blockIdx.z
        for oh in range(Ho):     # blockIdx.y
            ih = oh * stride - pad + kh
            iw = ow * stride - pad + kw
            inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            dst0 = (b * Ho + oh) * row_len * V + t * V
            for v in range(V):
                src = np.where(inside, ((b * H + ih) * W + iw) * C + c0 + v, 0)
                a = flat[src].astype(np.float32)
                if in_bias is not None:
                    a = a + in_bias[c0 + v]
                if in_relu:
                    a = np.maximum(a, np.float32(0))
                cols[dst0 + v] = np.where(inside, a, np.float32(0)).astype(out_dtype)
                np.add.at(written, dst0 + v, 1)
    assert np.all(written == 1)  # every entry written exactly once
    return cols.reshape(B * Ho * Wo, K * K * C)


ROWS_CASES = [  # (B, H, W, C, stride): batch 1, odd sizes, C = 8, 32, 64, strides 1 and 2
    (1, 5, 5, 8, 1), (2, 7, 9, 8, 2), (1, 9, 6, 32, 1), (3, 7, 7, 32, 2), (2, 4, 5, 64, 2), (1, 3, 3, 64, 1)]


@pytest.mark.parametrize("B,H,W,C,stride", ROWS_CASES)
@pytest.mark.parametrize("relu", [False, True])
def test_rows_gather_emulation_matches_cpu_im2col(rng, B, H, W, C, stride, relu):
    x = rng.normal(size=(B, H, W, C)).astype(np.float16)
    bias = rng.normal(size=C).astype(np.float32)
    got = emulate_im2col_fwd_rows(x, bias, relu, 3, stride, 1, 8, np.float16)
    ref = im2col(x.astype(np.float32), bias, (3, 3), stride, 1, in_relu=relu).astype(np.float16)
    np.testing.assert_array_equal(got, ref)
    x32 = x.astype(np.float32)
    got32 = emulate_im2col_fwd_rows(x32, None, relu, 3, stride, 1, 4, np.float32)
    np.testing.assert_array_equal(got32, im2col(x32, None, (3, 3), stride, 1, in_relu=relu))


def _gpu_gather_rows(cupy, x, bias, relu, stride, out_dtype, use_rows):
    old = conv_module.USE_ROWS_GATHER
    conv_module.USE_ROWS_GATHER = use_rows
    try:
        return im2col(cupy.asarray(x), None if bias is None else cupy.asarray(bias), (3, 3), stride, 1,
                      in_relu=relu, out_dtype=out_dtype).get()
    finally:
        conv_module.USE_ROWS_GATHER = old


@pytest.mark.parametrize("B,H,W,C,stride", ROWS_CASES + [(4, 56, 56, 32, 2), (2, 28, 28, 64, 1), (2, 4, 4, 512, 1)])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("with_bias,relu", [(True, True), (False, False), (True, False)])
def test_gpu_rows_gather_matches_generic_kernel_and_cpu_bit_for_bit(cupy, rng, B, H, W, C, stride, dtype,
                                                                    with_bias, relu):
    x = rng.normal(size=(B, H, W, C)).astype(dtype)
    bias = rng.normal(size=C).astype(np.float32) if with_bias else None
    V = 8 if dtype == np.float16 else 4
    Ho = (H + 2 - 3) // stride + 1
    assert conv_module._rows_applies(B, C, 3, 3, Ho, V)
    new = _gpu_gather_rows(cupy, x, bias, relu, stride, dtype, True)
    old = _gpu_gather_rows(cupy, x, bias, relu, stride, dtype, False)
    ref = im2col(x.astype(np.float32), bias, (3, 3), stride, 1, in_relu=relu).astype(dtype)
    assert new.dtype == dtype and new.shape == ref.shape
    np.testing.assert_array_equal(new, old)
    np.testing.assert_array_equal(new, ref)
