"""2-D convolution in NHWC as im2col + GEMM, forward and backward, on the CPU and the GPU.

    y[b, oh, ow, :] = sum_{kh, kw, c} a[b, oh*s - p + kh, ow*s - p + kw, c] * weight[kh, kw, c, :] + bias

Layout: images and activations are (B, H, W, C); a weight is (KH, KW, C_in, C_out), so that
reshaped to (KH*KW*C_in, C_out) it is the right operand of one GEMM whose row-major result is the
NHWC output itself (no transposes anywhere, forward or backward).

`im2col` gathers, for every output pixel, its KH*KW*C_in input values into one row of `cols`;
the convolution is then `cols @ weight` (cuBLAS on the GPU, BLAS on the CPU). The gather takes
an optional prologue a = relu?(x + in_bias): the encoder stores each convolution's output without
its bias and lets the next layer's gather add the bias and apply the ReLU, so bias and activation
cost no pass over memory of their own. `im2col_backward` is the adjoint gather (col2im), with the
prologue's ReLU derivative applied; it is also the gradient of the previous layer's
pre-activation, and its sum over pixels is the gradient of `in_bias`.

Backward of y = cols @ W + b (the chain rule, three GEMM-shaped lines):
    grad_W    = cols^T @ grad_y
    grad_b    = sum over rows of grad_y        (ones^T @ grad_y)
    grad_cols = grad_y @ W^T,  grad_x = im2col_backward(grad_cols)

Why im2col and not an implicit GEMM: on the CPU the gather is cheap next to the GEMM, and on the
GPU cuBLAS's GEMMs are the fast part; the fused gather writes each entry of cols once, in the
GEMM's dtype (float16 in the fp16 mode), with 16-byte stores.

The CPU kernels of fastface.nn are serial Numba on purpose (no prange): every one of them sits
between two multithreaded BLAS calls, and on 2 cores the hand-over between Numba's OpenMP team
and OpenBLAS's threads (both spin-wait) cost milliseconds per kernel. Measured, encoder forward +
backward at 64x64, batch 8: 14 ms with serial gathers, 175-800 ms with parallel ones.
"""
import numba
import numpy as np

from fastface._backend import KernelFile, array_module, pointer_or_null
from fastface._checks import check_array, check_finite
from fastface._gemm import gemm

__all__ = ["conv2d", "conv2d_backward", "im2col", "im2col_backward", "conv_output_size"]

_INT32_LIMIT = 2 ** 31 - 1


def conv_output_size(size, kernel, stride, padding):
    """Output length of a convolution along one axis: floor((size + 2p - k) / s) + 1."""
    return (size + 2 * padding - kernel) // stride + 1


# ---------------------------------------------------------------------------------------------
# CPU kernels (Numba twins of kernels/nn_conv.cu, same argument order)

@numba.njit(cache=True)
def im2col_fwd(x, in_bias, in_relu, B, H, W, C, KH, KW, stride, pad, Ho, Wo, cols):
    """One iteration per output row (b, oh) (serial: see the module docstring): writes the cols
    rows of its Wo pixels.

    x: (B*H*W*C,) flat; in_bias: (C,) (zeros when there is no bias); cols: (B*Ho*Wo, KH*KW*C).
    """
    for bo in range(B * Ho):
        b = bo // Ho
        oh = bo % Ho
        for ow in range(Wo):
            row = bo * Wo + ow
            for kh in range(KH):
                ih = oh * stride - pad + kh
                for kw in range(KW):
                    iw = ow * stride - pad + kw
                    col0 = (kh * KW + kw) * C
                    if ih < 0 or ih >= H or iw < 0 or iw >= W:
                        for c in range(C):
                            cols[row, col0 + c] = 0.0
                    else:
                        src = ((b * H + ih) * W + iw) * C
                        for c in range(C):
                            a = x[src + c] + in_bias[c]
                            if in_relu and not a > 0.0:
                                a = 0.0
                            cols[row, col0 + c] = a


@numba.njit(cache=True)
def im2col_bwd(x, in_bias, in_relu, grad_cols, B, H, W, C, KH, KW, stride, pad, Ho, Wo, scale, grad_x):
    """One iteration per input row (b, ih): gathers the cols gradients that read each of its
    pixels (a gather, like the CUDA twin, though serial here), then applies the ReLU derivative
    of the prologue."""
    for bi in range(B * H):
        b = bi // H
        ih = bi % H
        acc = np.zeros(C, dtype=grad_x.dtype)
        for iw in range(W):
            acc[:] = 0.0
            for kh in range(KH):
                th = ih + pad - kh
                if th < 0 or th % stride != 0:
                    continue
                oh = th // stride
                if oh >= Ho:
                    continue
                for kw in range(KW):
                    tw = iw + pad - kw
                    if tw < 0 or tw % stride != 0:
                        continue
                    ow = tw // stride
                    if ow >= Wo:
                        continue
                    row = (b * Ho + oh) * Wo + ow
                    col0 = (kh * KW + kw) * C
                    for c in range(C):
                        acc[c] += grad_cols[row, col0 + c]
            pix = ((b * H + ih) * W + iw) * C
            for c in range(C):
                g = acc[c] * scale
                if in_relu and not x[pix + c] + in_bias[c] > 0.0:
                    g = 0.0
                grad_x[pix + c] = g


# ---------------------------------------------------------------------------------------------
# GPU launch helpers

_BLOCK = 256


def _ctype(dtype):
    return {np.dtype(np.float16): "__half", np.dtype(np.float32): "float"}[np.dtype(dtype)]


def _vector_width(C, *dtypes):
    """Channels per thread: one 16-byte vector when C allows it, else 1."""
    if any(np.dtype(d) == np.float16 for d in dtypes):
        return 8 if C % 8 == 0 and all(np.dtype(d) == np.float16 for d in dtypes) else 1
    return 4 if C % 4 == 0 else 1


def _fwd_name(x_dtype, out_dtype, V):
    """The vector kernel for V > 1; the run kernel (one thread per (pixel, kh)) for V == 1."""
    if V == 1:
        return f"im2col_fwd_run<{_ctype(x_dtype)}, {_ctype(out_dtype)}>"
    return f"im2col_fwd<{_ctype(x_dtype)}, {_ctype(out_dtype)}, {V}>"


# The patchify gather (kernels/nn_conv.cu, im2col_fwd_patch): (KH, KW, C) it is compiled for.
_PATCH_SHAPES = ((4, 4, 3),)

# Whether `_im2col` takes im2col_fwd_patch where it applies (see `_patch_name`); False falls back
# to im2col_fwd_run, the generic kernel (for comparisons, and the parity tests).
USE_PATCH_GATHER = True


def _patch_name(out_dtype, KH, KW, C):
    return f"im2col_fwd_patch<{_ctype(out_dtype)}, {KH}, {KW}, {C}>"


def _patch_applies(x, out, KH, KW, stride, padding):
    """Whether the float4 re-layout kernel im2col_fwd_patch can do this gather: a float32 x,
    stride == kernel, no padding, a compiled (KH, KW, C), whole float4 runs and rows, and
    16-byte aligned buffers."""
    C, W = x.shape[3], x.shape[2]
    return (USE_PATCH_GATHER and x.dtype == np.float32 and stride == KH == KW and padding == 0
            and (KH, KW, C) in _PATCH_SHAPES and (KW * C) % 4 == 0 and (W * C) % 4 == 0
            and x.data.ptr % 16 == 0 and out.data.ptr % 16 == 0)


# Whether `_im2col` takes im2col_fwd_rows (grid over output rows, constant-K decode) instead of
# im2col_fwd where it applies (see `_rows_applies`); same bits out, fewer instructions.
USE_ROWS_GATHER = True
_ROWS_KERNELS = (3,)  # K of the K x K kernels im2col_fwd_rows is compiled for


def _rows_name(x_dtype, out_dtype, V, K):
    return f"im2col_fwd_rows<{_ctype(x_dtype)}, {_ctype(out_dtype)}, {V}, {K}>"


def _rows_applies(B, C, KH, KW, Ho, V):
    """im2col_fwd_rows takes vector gathers (V > 1) of a compiled square kernel whose channel
    groups C / V are a power of two, with Ho and B within the grid's y and z limits."""
    groups = C // V
    return (USE_ROWS_GATHER and V > 1 and KH == KW and KH in _ROWS_KERNELS
            and groups & (groups - 1) == 0 and Ho <= 65535 and B <= 65535)


def _bwd_name(x_dtype, g_dtype, out_dtype, V):
    return f"im2col_bwd<{_ctype(x_dtype)}, {_ctype(g_dtype)}, {_ctype(out_dtype)}, {V}>"


# Every variant the library launches.
_GPU_VARIANTS = tuple(
    [_fwd_name(np.float32, np.float32, 1), _fwd_name(np.float32, np.float32, 4)]
    + [_fwd_name(np.float32, np.float16, 1), _fwd_name(np.float16, np.float16, 1),
       _fwd_name(np.float16, np.float16, 8)]
    + [_patch_name(d, *k) for k in _PATCH_SHAPES for d in (np.float32, np.float16)]
    + [_rows_name(np.float32, np.float32, 4, k) for k in _ROWS_KERNELS]
    + [_rows_name(np.float16, np.float16, 8, k) for k in _ROWS_KERNELS]
    + [_bwd_name(np.float32, np.float32, np.float32, v) for v in (1, 4)]
    + [_bwd_name(np.float32, np.float16, np.float32, 1), _bwd_name(np.float16, np.float16, np.float16, 1),
       _bwd_name(np.float16, np.float16, np.float16, 8)]
)


# All variants are compiled together the first time any is needed.
_function = KernelFile("nn_conv.cu", _GPU_VARIANTS)
_implicit_function = KernelFile("nn_conv_implicit.cu", ("conv_implicit_fwd",))


def _check_int32(*sizes):
    for s in sizes:
        if s > _INT32_LIMIT:
            raise ValueError(f"an im2col buffer of {s} entries exceeds 2^31 - 1 entries; split the batch")


# ---------------------------------------------------------------------------------------------
# The gather and its adjoint

def _geometry(x_shape, kernel, stride, padding):
    B, H, W, C = (int(s) for s in x_shape)
    KH, KW = kernel
    Ho, Wo = conv_output_size(H, KH, stride, padding), conv_output_size(W, KW, stride, padding)
    if Ho < 1 or Wo < 1:
        raise ValueError(f"a {KH}x{KW} kernel with stride {stride} and padding {padding} does not fit "
                         f"a {H}x{W} input")
    return B, H, W, C, KH, KW, Ho, Wo


def _im2col(xp, x, in_bias, in_relu, KH, KW, stride, padding, out):
    """The gather into `out` with no checks (the encoder's hot path; see `im2col`)."""
    B, H, W, C = x.shape
    Ho, Wo = conv_output_size(H, KH, stride, padding), conv_output_size(W, KW, stride, padding)
    if xp is np:
        bias = in_bias if in_bias is not None else np.zeros(C, dtype=x.dtype)
        im2col_fwd(x.reshape(-1), bias, bool(in_relu), B, H, W, C, KH, KW, stride, padding, Ho, Wo, out)
        return out
    _check_int32(out.size, x.size)
    if _patch_applies(x, out, KH, KW, stride, padding):
        n = out.size // 4  # threads: one float4 of one (pixel, kh) run each
        _function(_patch_name(out.dtype, KH, KW, C))(
            ((n + _BLOCK - 1) // _BLOCK,), (_BLOCK,),
            (x, pointer_or_null(in_bias), np.int32(bool(in_relu)), np.int32(B), np.int32(H), np.int32(W),
             np.int32(Ho), np.int32(Wo), out))
        return out
    V = _vector_width(C, x.dtype, out.dtype)
    if _rows_applies(B, C, KH, KW, Ho, V):
        gshift = (C // V).bit_length() - 1
        row_len = (Wo * KH * KW) << gshift  # threads per output row (b, oh)
        _function(_rows_name(x.dtype, out.dtype, V, KH))(
            ((row_len + _BLOCK - 1) // _BLOCK, Ho, B), (_BLOCK,),
            (x, pointer_or_null(in_bias), np.int32(bool(in_relu)), np.int32(H), np.int32(W), np.int32(C),
             np.int32(gshift), np.int32(stride), np.int32(padding), np.int32(Ho), np.int32(Wo), out))
        return out
    kern = _function(_fwd_name(x.dtype, out.dtype, V))
    n = out.size // V if V > 1 else B * Ho * Wo * KH  # threads: vectors, or (pixel, kh) runs
    kern(((n + _BLOCK - 1) // _BLOCK,), (_BLOCK,),
         (x, pointer_or_null(in_bias), np.int32(bool(in_relu)), np.int32(B), np.int32(H), np.int32(W), np.int32(C),
          np.int32(KH), np.int32(KW), np.int32(stride), np.int32(padding), np.int32(Ho), np.int32(Wo), out))
    return out


def _im2col_backward(xp, x, in_bias, in_relu, grad_out, KH, KW, stride, padding, scale, out):
    """The adjoint gather into `out` with no checks (see `im2col_backward`)."""
    B, H, W, C = x.shape
    Ho, Wo = conv_output_size(H, KH, stride, padding), conv_output_size(W, KW, stride, padding)
    if xp is np:
        bias = in_bias if in_bias is not None else np.zeros(C, dtype=out.dtype)
        im2col_bwd(x.reshape(-1), bias, bool(in_relu), grad_out, B, H, W, C, KH, KW, stride, padding,
                   Ho, Wo, out.dtype.type(scale), out.reshape(-1))
        return out
    _check_int32(grad_out.size, out.size)
    V = _vector_width(C, x.dtype, grad_out.dtype, out.dtype)
    kern = _function(_bwd_name(x.dtype, grad_out.dtype, out.dtype, V))
    n = out.size // V
    kern(((n + _BLOCK - 1) // _BLOCK,), (_BLOCK,),
         (x, pointer_or_null(in_bias), np.int32(bool(in_relu)), grad_out, np.int32(B), np.int32(H), np.int32(W),
          np.int32(C), np.int32(KH), np.int32(KW), np.int32(stride), np.int32(padding), np.int32(Ho), np.int32(Wo),
          np.float32(scale), out))
    return out


def implicit_gemm_supported(x_dtype, C, N, on_gpu):
    """Whether `_conv_implicit` takes this convolution (GPU, float16, C % 32 == 0, N % 8 == 0)."""
    return bool(on_gpu) and np.dtype(x_dtype) == np.float16 and C % 32 == 0 and N % 8 == 0


def _conv_implicit(x, in_bias, in_relu, KH, KW, stride, padding, weight2d, out):
    """out (M, N) float16 = im2col(relu?(x + in_bias)) @ weight2d without the cols buffer.

    The float16 mode's forward on tensor cores (kernels/nn_conv_implicit.cu); the same result
    as `_im2col` followed by `gemm` up to the order of the float32 accumulation. No checks
    (the encoder's hot path; `implicit_gemm_supported` says which convolutions it takes).
    """
    B, H, W, C = x.shape
    N = weight2d.shape[1]
    Ho, Wo = conv_output_size(H, KH, stride, padding), conv_output_size(W, KW, stride, padding)
    M = B * Ho * Wo
    _check_int32(M * N, x.size, weight2d.size)
    kern = _implicit_function("conv_implicit_fwd")
    kern(((M + 127) // 128, (N + 63) // 64), (256,),
         (x, pointer_or_null(in_bias), np.int32(bool(in_relu)), weight2d, np.int32(B), np.int32(H), np.int32(W),
          np.int32(C), np.int32(KH), np.int32(KW), np.int32(stride), np.int32(padding), np.int32(Ho), np.int32(Wo),
          np.int32(N), out))
    return out


def _check_gather(xp, x, in_bias, kernel, stride, padding):
    dtypes = (np.float32, np.float64) if xp is np else (np.float32, np.float16)
    check_array("x", x, dtypes, ("B", "H", "W", "C"))
    if in_bias is not None:
        check_array("in_bias", in_bias, x.dtype if xp is np else np.float32, (x.shape[3],))
    if not x.flags.c_contiguous:
        raise ValueError("x must be C-contiguous")
    try:
        KH, KW = (int(k) for k in kernel)
    except (TypeError, ValueError):
        raise TypeError(f"kernel must be a pair (KH, KW) of positive integers; got {kernel!r}") from None
    if KH < 1 or KW < 1:
        raise ValueError(f"kernel must be a pair (KH, KW) of positive integers; got {kernel!r}")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}")
    return _geometry(x.shape, (KH, KW), stride, padding)


def im2col(x, in_bias=None, kernel=(3, 3), stride=1, padding=0, in_relu=False, out=None, out_dtype=None):
    """The patches of every output pixel, one row each, after the prologue relu?(x + in_bias).

    Args:
        x: (B, H, W, C), C-contiguous; float32 or float64 on the CPU, float32 or float16 on the GPU.
        in_bias: (C,) or None, added to x before the ReLU; float32 on the GPU, x's dtype on the CPU.
        kernel: (KH, KW). stride, padding: ints (the same along both axes).
        in_relu: apply max(., 0) after the bias.
        out: optional (B*Ho*Wo, KH*KW*C) buffer to write into.
        out_dtype: dtype of the result when `out` is None (default x's dtype; float16 on the GPU
            makes the GEMM operand of the fp16 mode directly).

    Returns:
        (B*Ho*Wo, KH*KW*C) cols, columns ordered (kh, kw, c).
    """
    xp = array_module(("x", x), ("in_bias", in_bias), ("out", out))
    B, H, W, C, KH, KW, Ho, Wo = _check_gather(xp, x, in_bias, kernel, stride, padding)
    shape = (B * Ho * Wo, KH * KW * C)
    if out is None:
        out = xp.empty(shape, dtype=out_dtype or x.dtype)
    check_array("out", out, (x.dtype,) if xp is np else (np.float32, np.float16), shape)
    if xp is not np and _fwd_name(x.dtype, out.dtype, 1) not in _GPU_VARIANTS:
        raise TypeError(f"on the GPU, im2col of {x.dtype} x writes float16 only; got out {out.dtype}")
    return _im2col(xp, x, in_bias, in_relu, KH, KW, stride, padding, out)


def im2col_backward(x, in_bias, grad_out, kernel=(3, 3), stride=1, padding=0, in_relu=False,
                    scale=1.0, out=None, out_dtype=None):
    """The adjoint of `im2col`: the gradient of x (through the prologue) from that of cols.

    Args:
        x, in_bias, kernel, stride, padding, in_relu: as given to `im2col` (x is read only for
            the ReLU derivative, x + in_bias > 0).
        grad_out: (B*Ho*Wo, KH*KW*C), the gradient of cols.
        scale: multiplies the result (the encoder undoes its fp16 loss scale with it).
        out: optional (B, H, W, C) buffer; out_dtype: its dtype when out is None (default grad_out's).

    Returns:
        (B, H, W, C) gradient of x; its sum over B, H, W is the gradient of in_bias.
    """
    xp = array_module(("x", x), ("in_bias", in_bias), ("grad_out", grad_out), ("out", out))
    B, H, W, C, KH, KW, Ho, Wo = _check_gather(xp, x, in_bias, kernel, stride, padding)
    check_array("grad_out", grad_out, (x.dtype,) if xp is np else (np.float32, np.float16),
                (B * Ho * Wo, KH * KW * C))
    if out is None:
        out = xp.empty((B, H, W, C), dtype=out_dtype or grad_out.dtype)
    check_array("out", out, (x.dtype,) if xp is np else (np.float32, np.float16), (B, H, W, C))
    if xp is not np and _bwd_name(x.dtype, grad_out.dtype, out.dtype, 1) not in _GPU_VARIANTS:
        raise TypeError(f"on the GPU, im2col_backward takes (x, grad_out, out) dtypes (float32, float32, "
                        f"float32), (float32, float16, float32) or (float16, float16, float16); got "
                        f"({x.dtype}, {grad_out.dtype}, {out.dtype})")
    return _im2col_backward(xp, x, in_bias, in_relu, grad_out, KH, KW, stride, padding, scale, out)


# ---------------------------------------------------------------------------------------------
# The public layer

def _check_conv(x, weight, bias, grad_out, stride, padding):
    xp = array_module(("x", x), ("weight", weight), ("bias", bias), ("grad_out", grad_out))
    gpu_note = "" if xp is np else " (the GPU path is float32 only)"
    dtypes = (np.float32, np.float64) if xp is np else (np.float32,)
    try:
        check_array("x", x, dtypes, ("B", "H", "W", "C"))
        check_array("weight", weight, x.dtype, ("KH", "KW", x.shape[3], "C_out"))
        if bias is not None:
            check_array("bias", bias, x.dtype, (weight.shape[3],))
    except TypeError as e:
        raise TypeError(f"{e}{gpu_note}") from None
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}")
    B, H, W, C, KH, KW, Ho, Wo = _geometry(x.shape, weight.shape[:2], stride, padding)
    if grad_out is not None:
        check_array("grad_out", grad_out, x.dtype, (B, Ho, Wo, weight.shape[3]))
        check_finite("grad_out", grad_out)
    check_finite("x", x)
    check_finite("weight", weight)
    return xp, (B, H, W, C, KH, KW, Ho, Wo)


def conv2d(x, weight, bias=None, stride=1, padding=0):
    """2-D convolution (cross-correlation, as in every deep-learning library), NHWC.

    Args:
        x: (B, H, W, C_in) float32 (float64 too on the CPU), numpy or cupy.
        weight: (KH, KW, C_in, C_out), x's dtype.
        bias: (C_out,) or None.
        stride, padding: ints, the same along both axes; padding is zeros.

    Returns:
        (B, Ho, Wo, C_out), Ho = (H + 2 padding - KH) // stride + 1.
    """
    xp, (B, H, W, C, KH, KW, Ho, Wo) = _check_conv(x, weight, bias, None, stride, padding)
    x = xp.ascontiguousarray(x)
    cols = im2col(x, None, (KH, KW), stride, padding)
    n_out = weight.shape[3]
    y = xp.empty((B * Ho * Wo, n_out), dtype=x.dtype)
    gemm(cols, xp.ascontiguousarray(weight).reshape(KH * KW * C, n_out), y)
    if bias is not None:
        y += bias
    return y.reshape(B, Ho, Wo, n_out)


def conv2d_backward(x, weight, grad_out, stride=1, padding=0):
    """Gradients of `conv2d` (with a bias or without: the bias gradient does not depend on it).

    Args:
        x, weight, stride, padding: as given to `conv2d`.
        grad_out: (B, Ho, Wo, C_out), the gradient of the output.

    Returns:
        (grad_x (B, H, W, C_in), grad_weight (KH, KW, C_in, C_out), grad_bias (C_out,)).
    """
    xp, (B, H, W, C, KH, KW, Ho, Wo) = _check_conv(x, weight, None, grad_out, stride, padding)
    x = xp.ascontiguousarray(x)
    n_out = weight.shape[3]
    g = xp.ascontiguousarray(grad_out).reshape(B * Ho * Wo, n_out)
    cols = im2col(x, None, (KH, KW), stride, padding)
    w2 = xp.ascontiguousarray(weight).reshape(KH * KW * C, n_out)
    grad_weight = gemm(cols, g, xp.empty((KH * KW * C, n_out), dtype=x.dtype), trans_a=True)
    grad_bias = gemm(xp.ones((1, g.shape[0]), dtype=x.dtype), g, xp.empty((1, n_out), dtype=x.dtype))
    grad_cols = gemm(g, w2, xp.empty_like(cols), trans_b=True)
    grad_x = im2col_backward(x, None, grad_cols, (KH, KW), stride, padding)
    return grad_x, grad_weight.reshape(weight.shape), grad_bias.reshape(n_out)
