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
