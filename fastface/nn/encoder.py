"""The image encoder: a compact CNN that regresses all face parameters from one image.

Architecture (default settings, n_outputs=513, 224x224 input); every convolution is followed by
a ReLU, "3x3/2" is a 3x3 kernel with stride 2 and padding 1, "4x4/4" a patchify stem:

    layer           kernel  in -> out channels   output         params   MFLOP/image
    stem           4x4/4       3 ->   32          56x56           1,568          9.63
    stage1.conv1   3x3/2      32 ->   64          28x28          18,496         28.90
    stage1.conv2   3x3/1      64 ->   64          28x28          36,928         57.80
    stage2.conv1   3x3/2      64 ->  128          14x14          73,856         28.90
    stage2.conv2   3x3/1     128 ->  128          14x14         147,584         57.80
    stage3.conv1   3x3/2     128 ->  256          7x7           295,168         28.90
    stage3.conv2   3x3/1     256 ->  256          7x7           590,080         57.80
    stage4.conv1   3x3/2     256 ->  512          4x4         1,180,160         37.75
    stage4.conv2   3x3/1     512 ->  512          4x4         2,359,808         75.50
    pool           global average               512
    fc             linear    512 ->  513          513           263,169          0.53
    total                                                    4,966,817        383.52

(FLOPs count a multiply-add as 2; biases and ReLUs are not counted. Backward costs about twice the
forward. `Encoder.layer_table()` prints this table for any settings and a test keeps the one
above equal to it.)

Design notes:
- No normalisation layer. The net is nine convolutions deep with no residual paths; He
  initialisation keeps the activations' scale through it, the last layer starts near zero (so an
  untrained encoder predicts the mean face), and Adam adapts the step per parameter. Batch norm
  would cost two more passes over every activation (the convolutions here are memory-bound at
  small batch) and a train/inference switch with running statistics; the learning test shows
  the net trains without it.
- Downsampling is by the stride-2 convolutions; the only pooling is the global average.
- The input is centred inside the stem's gather (it sees x - 0.5), at no cost.
- Each convolution's GEMM writes its output without bias; the consumer's gather (the next
  im2col, or the pooling) adds the bias and applies the ReLU (fastface/nn/conv.py), so bias and
  activation need no pass of their own, forward or backward. The fc bias is the last row of a
  (C+1, n_outputs) matrix whose first C rows are the fc weight, multiplied by pooled features
  with a constant 1 in column C: the bias costs neither a kernel forward nor one backward.
- A forward is, per convolution, one gather kernel and one GEMM (or, with
  conv_algorithm="implicit" in the float16 mode, one implicit-GEMM kernel that never writes the
  gathered cols: kernels/nn_conv_implicit.cu), then the pooling kernel and one GEMM: 20 launches
  at most. A backward is 4 launches per convolution (5 where the forward was implicit: the
  weight gradient needs the cols). Every buffer lives in a workspace made once per batch shape,
  so after the first step nothing is allocated except the outputs (from cupy's pool), and
  `capture` records whole steps in CUDA graphs (at batch 1 the ~20 to 60 launches from Python,
  not the GPU, set the time).
- Value checks (NaN in the input or the incoming gradient) read the data. On the GPU they run as a
  kernel (float32 or float16) and report at a later call (fastface/_device_checks.py), so they do
  not synchronise; each still costs a launch. Hot loops run inside `fastface.value_checks(False)`.
- CPU: NumPy's BLAS for every GEMM and serial Numba gathers (see fastface/nn/conv.py for why
  not parallel ones). Measured on the 2-core machine: forward + backward at 64x64, batch 8, in
  10 to 15 ms.
- Precisions on the GPU: "float32" (exact float32 GEMMs), "tf32" (TF32 tensor cores for the
  GEMMs), "float16" (activations, cols and weights in float16, float32 accumulation in every
  GEMM and kernel, float32 master weights and gradients for Adam; the activation gradients are
  float16 times a static loss scale, undone in the GEMMs' alpha; an overflow makes Adam skip).
  On the CPU the encoder computes in its parameters' dtype (float32, or float64 for gradient
  checks), or float64 when given float64 input.
"""
import dataclasses

import numpy as np

from fastface._backend import array_module, cupy_or_none, is_cupy_array
from fastface._checks import check_array, check_finite, value_checks
from fastface._files import atomic_write
from fastface.cuda_graph import capture
from fastface._gemm import gemm
from fastface.nn.conv import (
    _conv_implicit, _im2col, _im2col_backward, conv_output_size, implicit_gemm_supported,
)
from fastface.nn.pool import _pool_bwd, _pool_fwd

__all__ = ["Encoder", "EncoderGraph"]

PRECISIONS = ("float32", "float64", "tf32", "float16")
CONV_ALGORITHMS = ("im2col", "implicit")
_ARCHITECTURE_KEYS = ("n_outputs", "resolution", "widths", "stem_width", "patch")
_FILE_KIND = "fastface.nn.Encoder"
_FILE_VERSION = 1
_ALIGN = 64  # elements: every tensor of the flat buffers starts 256-byte aligned (fp32)


@dataclasses.dataclass(frozen=True)
class ConvSpec:
    """One convolution of the encoder (followed by a ReLU)."""
    name: str
    kernel: int
    stride: int
    padding: int
    c_in: int
    c_out: int
    h_in: int
    w_in: int
    h_out: int
    w_out: int

    @property
    def k(self):
        return self.kernel * self.kernel * self.c_in

    @property
    def flops(self):
        return 2 * self.h_out * self.w_out * self.k * self.c_out


def _settings_tuple(value, name, length=None):
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of positive integers; got {value!r}") from None
    if not out or any(v < 1 for v in out) or (length is not None and len(out) != length):
        raise ValueError(f"{name} must be {'a pair' if length == 2 else 'a sequence'} of positive "
                         f"integers; got {value!r}")
    return out


class Encoder:
    """The compact CNN of the module docstring, with hand-written forward and backward.

        enc = Encoder(n_outputs=513)                     # on the CPU, float32
        enc.to("gpu", precision="float16")               # or "float32", "tf32"
        y = enc.forward(x)                               # x (B, 224, 224, 3) in [0, 1]
        grad_x = enc.backward(grad_y)                    # fills enc.grads
        opt = Adam(enc, lr=1e-3); opt.step()

    Args:
        n_outputs: length of the output code.
        resolution: input size, an int (square) or (H, W); both must be multiples of `patch`.
        seed: seed of the initialisation (numpy's default_rng).
        widths: channels of the four (or any number of) stages; each stage is a 3x3/2 and a
            3x3/1 convolution.
        stem_width: channels of the patchify stem.
        patch: kernel and stride of the stem.
        fc_init_scale: the last layer's weights start at N(0, (fc_init_scale^2) / fan_in), so
            an untrained encoder outputs about 0 (the mean face).
        precision: "float32" (default), "float64" (CPU only; for gradient checks), "tf32" or
            "float16" (GPU modes; on the CPU they compute in float32).
        loss_scale: the float16 mode's static gradient scale (default 1024); 1 elsewhere.
        conv_algorithm: "im2col" (gather + cuBLAS GEMM everywhere) or "implicit" (in the float16
            mode on the GPU, the convolutions with C_in % 32 == 0 run as one implicit-GEMM
            tensor-core kernel that never writes cols; a backward then rebuilds the cols it
            needs). Settable on the instance at any time.

    Attributes:
        params: dict name -> array, views of `flat_params` ("stem.weight" (4, 4, 3, 32), ...);
            convolution weights are (KH, KW, C_in, C_out), fc.weight (C_in, n_outputs).
        grads: dict with the same keys and shapes, views of `flat_grads`, overwritten by backward.
        settings: the architecture's settings (saved with the weights and checked on load).

    In the float16 mode the GEMMs read float16 copies of the weights, which Adam refreshes with
    every step; after changing `params` by hand, call `sync_half()`.
    """

    def __init__(self, n_outputs, resolution=224, seed=0, widths=(64, 128, 256, 512), stem_width=32,
                 patch=4, fc_init_scale=1e-3, precision="float32", loss_scale=None, conv_algorithm="im2col"):
        if isinstance(n_outputs, bool) or not isinstance(n_outputs, (int, np.integer)) or n_outputs < 1:
            raise ValueError(f"n_outputs must be a positive integer; got {n_outputs!r}")
        if isinstance(resolution, (int, np.integer)):
            resolution = (int(resolution), int(resolution))
        resolution = _settings_tuple(resolution, "resolution", 2)
        widths = _settings_tuple(widths, "widths")
        stem_width, patch = int(stem_width), int(patch)
        if stem_width < 1 or patch < 1:
            raise ValueError(f"stem_width and patch must be positive; got {stem_width}, {patch}")
        if resolution[0] % patch or resolution[1] % patch:
            raise ValueError(f"resolution must be a multiple of patch={patch}; got {resolution}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
        if conv_algorithm not in CONV_ALGORITHMS:
            raise ValueError(f"conv_algorithm must be one of {CONV_ALGORITHMS}; got {conv_algorithm!r}")
        self.conv_algorithm = conv_algorithm
        if not fc_init_scale >= 0:
            raise ValueError(f"fc_init_scale must be >= 0; got {fc_init_scale!r}")
        self.settings = {"n_outputs": int(n_outputs), "resolution": resolution, "widths": widths,
                         "stem_width": stem_width, "patch": patch}
        self.seed, self.fc_init_scale = int(seed), float(fc_init_scale)
        self.precision = precision
        self.loss_scale = float(loss_scale) if loss_scale is not None else None
        if self.loss_scale is not None and not self.loss_scale > 0:
            raise ValueError(f"loss_scale must be positive; got {loss_scale!r}")
        self.layers = self._build_layers()
        self._layout = self._build_layout()
        flat = self._initial_params(np.float64 if precision == "float64" else np.float32)
        self._set_buffers(np, flat)

    # -- architecture -----------------------------------------------------------------------
    def _build_layers(self):
        s = self.settings
        h, w = s["resolution"]
        p = s["patch"]
        layers = [ConvSpec("stem", p, p, 0, 3, s["stem_width"], h, w, h // p, w // p)]
        c, h, w = s["stem_width"], h // p, w // p
        for i, width in enumerate(s["widths"], start=1):
            for j, stride in ((1, 2), (2, 1)):
                ho, wo = conv_output_size(h, 3, stride, 1), conv_output_size(w, 3, stride, 1)
                layers.append(ConvSpec(f"stage{i}.conv{j}", 3, stride, 1, c, width, h, w, ho, wo))
                c, h, w = width, ho, wo
        return layers

    def _build_layout(self):
        """name -> (offset, shape) in the flat buffers; fc.bias directly follows fc.weight."""
        layout, offset = {}, 0

        def put(name, shape, align=True):
            nonlocal offset
            if align:
                offset = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
            layout[name] = (offset, shape)
            offset += int(np.prod(shape))

        for L in self.layers:
            put(f"{L.name}.weight", (L.kernel, L.kernel, L.c_in, L.c_out))
            put(f"{L.name}.bias", (L.c_out,))
        c, n = self.layers[-1].c_out, self.settings["n_outputs"]
        put("fc.weight", (c, n))
        put("fc.bias", (n,), align=False)
        self._flat_size = (offset + _ALIGN - 1) // _ALIGN * _ALIGN
        return layout

    def _initial_params(self, dtype):
        """He-normal convolutions (std sqrt(2 / fan_in)), zero biases, a small last layer."""
        rng = np.random.default_rng(self.seed)
        flat = np.zeros(self._flat_size, dtype=dtype)
        for L in self.layers:
            off, shape = self._layout[f"{L.name}.weight"]
            flat[off:off + int(np.prod(shape))] = rng.normal(0.0, np.sqrt(2.0 / L.k), int(np.prod(shape)))
        off, shape = self._layout["fc.weight"]
        flat[off:off + int(np.prod(shape))] = rng.normal(
            0.0, self.fc_init_scale / np.sqrt(shape[0]), int(np.prod(shape)))
        return flat

    @property
    def n_parameters(self):
        """Number of trainable scalars."""
        return int(sum(np.prod(shape) for _, shape in self._layout.values()))

    def flops_per_image(self):
        """Forward FLOPs of one image (a multiply-add counts 2; biases and ReLUs not counted)."""
        c, n = self.layers[-1].c_out, self.settings["n_outputs"]
        return int(sum(L.flops for L in self.layers) + 2 * c * n)

    def layer_table(self):
        """The module docstring's table, computed for these settings."""
        lines = [f"{'layer':<14} {'kernel':>7}  {'in -> out channels':<20} {'output':<11} "
                 f"{'params':>9}  {'MFLOP/image':>12}"]
        for L in self.layers:
            size = f"{L.h_out}x{L.w_out}"
            params = L.k * L.c_out + L.c_out
            lines.append(f"{L.name:<14} {L.kernel}x{L.kernel}/{L.stride:<3} {L.c_in:>5} -> {L.c_out:>4}"
                         f"{'':<9} {size:<11} {params:>9,}  {L.flops / 1e6:>12.2f}")
        c, n = self.layers[-1].c_out, self.settings["n_outputs"]
        lines.append(f"{'pool':<14} global average{'':<14} {c:<11}")
        lines.append(f"{'fc':<14} {'linear':<7} {c:>5} -> {n:>4}{'':<9} {n:<11} {c * n + n:>9,}  "
                     f"{2 * c * n / 1e6:>12.2f}")
        lines.append(f"{'total':<14} {'':<41} {self.n_parameters:>9,}  {self.flops_per_image() / 1e6:>12.2f}")
        return "\n".join(line.rstrip() for line in lines)

    # -- buffers and devices ---------------------------------------------------------------
    def _set_buffers(self, xp, flat):
        self._xp = xp
        self.flat_params = flat
        self.flat_grads = xp.zeros_like(flat)
        self.params = self._views(flat)
        self.grads = self._views(self.flat_grads)
        half = xp is not np and self.precision == "float16"
        self._flat_half = xp.empty(flat.size, dtype=np.float16) if half else None
        self._half_fresh = False
        self._workspaces = {}
        self._held_workspaces = set()
        self._saved = None
        self._input_bias = {}

    def _views(self, flat):
        return {name: flat[off:off + int(np.prod(shape))].reshape(shape)
                for name, (off, shape) in self._layout.items()}

    @property
    def device(self):
        """"cpu" or "gpu"."""
        return "cpu" if self._xp is np else "gpu"

    def to(self, device, precision=None):
        """Moves the parameters to "cpu" or "gpu" (and sets the precision); returns self.

        The gradients are reset to zero and an optimizer made before must be made again.
        """
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")
        precision = precision or self.precision
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
        if device == "gpu" and precision == "float64":
            raise ValueError("precision 'float64' is CPU only; use 'float32', 'tf32' or 'float16' on the GPU")
        dtype = np.float64 if precision == "float64" else np.float32
        flat = self.flat_params
        host = flat.get() if is_cupy_array(flat) else flat
        self.precision = precision
        if device == "cpu":
            self._set_buffers(np, np.array(host, dtype=dtype))
        else:
            cupy = cupy_or_none()
            if cupy is None:
                raise RuntimeError("to('gpu') needs cupy and a CUDA GPU")
            self._set_buffers(cupy, cupy.asarray(host.astype(dtype)))
        return self

    def _effective_loss_scale(self):
        if self._flat_half is None:
            return 1.0
        return self.loss_scale if self.loss_scale is not None else 1024.0

    def _adam_wrote_shadow(self):
        """Adam calls this after writing the float16 shadow weights along with the master ones."""
        self._half_fresh = True

    def sync_half(self):
        """Refreshes the float16 weights from the float32 ones (after changing params by hand)."""
        if self._flat_half is not None:
            self._flat_half[...] = self.flat_params
            self._half_fresh = True

    def _compute_dtype(self, x):
        if self._xp is np:
            return np.result_type(x.dtype, self.flat_params.dtype)
        return np.dtype(np.float32)

    def _gemm_dtype(self, compute):
        return np.dtype(np.float16) if self._flat_half is not None else np.dtype(compute)

    def _gemm_compute(self):
        return "tf32" if (self.precision == "tf32" and self._xp is not np) else "float32"

    def _stem_bias(self, dtype):
        """The constant -0.5 of every input channel, applied by the stem's gather."""
        key = np.dtype(dtype)
        if key not in self._input_bias:
            self._input_bias[key] = self._xp.full(3, -0.5, dtype=dtype)
        return self._input_bias[key]

    def _weights(self, compute):
        """(list of (K, C_out) conv weights, (C+1, n_outputs) fc [weight; bias], list of biases)
        in the dtypes the kernels take: GEMM operands in the GEMM dtype, biases in float32 on
        the GPU and in the compute dtype on the CPU."""
        src = self.flat_params
        if self._flat_half is not None:
            if not self._half_fresh:
                self.sync_half()
            src = self._flat_half
        elif src.dtype != compute:
            src = src.astype(compute)
        bias_src = self.flat_params if self._xp is not np else (
            self.flat_params if self.flat_params.dtype == compute else src)
        weights, biases = [], []
        for L in self.layers:
            off, _ = self._layout[f"{L.name}.weight"]
            weights.append(src[off:off + L.k * L.c_out].reshape(L.k, L.c_out))
            boff, _ = self._layout[f"{L.name}.bias"]
            biases.append(bias_src[boff:boff + L.c_out])
        off, (c, n) = self._layout["fc.weight"]
        fc = src[off:off + (c + 1) * n].reshape(c + 1, n)
        return weights, fc, biases

    def _workspace(self, B, compute):
        key = (B, np.dtype(compute))
        ws = self._workspaces.get(key)
        if ws is None:
            ws = _Workspace(self._xp, self.layers, B, self._gemm_dtype(compute), np.dtype(compute),
                            self.settings["n_outputs"])
            # One shape at a time: a new batch size frees the old, unless a CUDA graph recorded it
            # (hold_workspaces): its replays keep writing there, so the memory must never go to another array.
            held = {k: w for k, w in self._workspaces.items() if k in self._held_workspaces}
            self._workspaces = {**held, key: ws}
        return ws

    def hold_workspaces(self):
        """Keeps the workspaces made so far (those of the last batch size) for the encoder's lifetime.

        A CUDA graph that recorded a forward or backward reads and writes them at every replay; were
        they freed when another batch size comes (the default), their memory could go to another
        array, which the replays would then overwrite. Called by every capture of the encoder."""
        self._held_workspaces.update(self._workspaces)

    # -- forward and backward ------------------------------------------------------------
    def _check_input(self, x):
        xp = array_module(("x", x), ("params", self.flat_params))
        h, w = self.settings["resolution"]
        dtypes = (np.float32, np.float64) if xp is np else (np.float32,)
        try:
            check_array("x", x, dtypes, ("B", h, w, 3))
        except TypeError as e:
            raise TypeError(f"{e}{'' if xp is np else ' (the GPU path is float32 only)'}") from None
        check_finite("x", x)
        return xp

    def forward(self, x, out=None):
        """Predicts the code of every image.

        Args:
            x: (B, H, W, 3) images in [0, 1], on the encoder's device; float32 (float64 too on
                the CPU, computed in float64).
            out: optional (B, n_outputs) buffer for the result.

        Returns:
            (B, n_outputs): float32, or float64 on the CPU when x or the params are float64.
        """
        xp = self._check_input(x)
        x = xp.ascontiguousarray(x)
        compute = self._compute_dtype(x)
        B = x.shape[0]
        n = self.settings["n_outputs"]
        if out is None:
            out = xp.empty((B, n), dtype=compute)
        else:
            check_array("out", out, compute, (B, n))
        ws = self._workspace(B, compute)
        weights, fc, biases = self._weights(compute)
        mode = self._gemm_compute()
        a, a_bias, a_relu = x.astype(compute, copy=False), self._stem_bias(
            compute if xp is np else np.float32), False
        implicit = []
        for i, L in enumerate(self.layers):
            use = self.conv_algorithm == "implicit" and implicit_gemm_supported(a.dtype, L.c_in, L.c_out, xp is not np)
            if use:
                _conv_implicit(a, a_bias, a_relu, L.kernel, L.kernel, L.stride, L.padding, weights[i], ws.z[i])
            else:
                _im2col(xp, a, a_bias, a_relu, L.kernel, L.kernel, L.stride, L.padding, ws.cols[i])
                gemm(ws.cols[i], weights[i], ws.z[i], compute=mode)
            implicit.append(use)
            a, a_bias, a_relu = ws.z[i].reshape(B, L.h_out, L.w_out, L.c_out), biases[i], True
        _pool_fwd(xp, a, a_bias, True, ws.feat)
        gemm(ws.feat, fc, out, compute=mode)
        self._saved = (ws, x.astype(compute, copy=False), weights, fc, biases, compute, implicit)
        return out

    def _layer_input(self, i, ws, x, biases):
        """(a, in_bias, in_relu) of layer i's gather: the image for the stem, else the previous
        layer's stored output with its bias and ReLU."""
        if i == 0:
            return x, self._stem_bias(x.dtype if self._xp is np else np.float32), False
        P = self.layers[i - 1]
        return ws.z[i - 1].reshape(x.shape[0], P.h_out, P.w_out, P.c_out), biases[i - 1], True

    def backward(self, grad_y, need_grad_x=True, out=None):
        """Backpropagates the gradient of the output of the last `forward`.

        Overwrites `grads` (and `flat_grads`) with the gradients of every parameter.

        Args:
            grad_y: (B, n_outputs), the gradient of the loss with respect to the output, in the
                output's dtype.
            need_grad_x: compute the gradient of the input (training does not need it).
            out: optional (B, H, W, 3) buffer for grad_x.

        Returns:
            (B, H, W, 3) gradient of x, or None when need_grad_x is False.
        """
        if self._saved is None:
            raise RuntimeError("backward needs a forward first")
        ws, x, weights, fc, biases, compute, implicit = self._saved
        xp = self._xp
        B, n = x.shape[0], self.settings["n_outputs"]
        array_module(("grad_y", grad_y), ("params", self.flat_params))
        check_array("grad_y", grad_y, compute, (B, n))
        check_finite("grad_y", grad_y)
        scale = self._effective_loss_scale()
        mode = self._gemm_compute()
        if ws.gy.dtype == grad_y.dtype and scale == 1.0:
            ws.gy[...] = grad_y
        else:
            xp.multiply(grad_y, grad_y.dtype.type(scale), out=ws.gy)  # rounds to float16
        inv = 1.0 / scale
        c = self.layers[-1].c_out
        off, _ = self._layout["fc.weight"]
        grad_fc = self.flat_grads[off:off + (c + 1) * n].reshape(c + 1, n)
        gemm(ws.feat, ws.gy, grad_fc, trans_a=True, alpha=inv, compute=mode)
        gemm(ws.gy, fc, ws.gfeat, trans_b=True, compute=mode)
        last = self.layers[-1]
        dz = ws.dz(len(self.layers) - 1)
        _pool_bwd(xp, ws.z[-1].reshape(B, last.h_out, last.w_out, last.c_out), biases[-1], True,
                  ws.gfeat, 1.0, dz.reshape(B, last.h_out, last.w_out, last.c_out))
        grad_x = None
        for i in range(len(self.layers) - 1, -1, -1):
            L = self.layers[i]
            M = B * L.h_out * L.w_out
            woff, _ = self._layout[f"{L.name}.weight"]
            boff, _ = self._layout[f"{L.name}.bias"]
            if implicit[i]:  # the forward never wrote this layer's cols
                a, a_bias, a_relu = self._layer_input(i, ws, x, biases)
                _im2col(xp, a, a_bias, a_relu, L.kernel, L.kernel, L.stride, L.padding, ws.cols[i])
            gemm(ws.cols[i], dz, self.flat_grads[woff:woff + L.k * L.c_out].reshape(L.k, L.c_out),
                 trans_a=True, alpha=inv, compute=mode)
            gemm(ws.ones[:, :M], dz, self.flat_grads[boff:boff + L.c_out].reshape(1, L.c_out),
                 alpha=inv, compute=mode)
            if i == 0 and not need_grad_x:
                break
            gcols = ws.gcols[:M * L.k].reshape(M, L.k)
            gemm(dz, weights[i], gcols, trans_b=True, compute=mode)
            a, a_bias, a_relu = self._layer_input(i, ws, x, biases)
            if i > 0:
                dz = ws.dz(i - 1)
                _im2col_backward(xp, a, a_bias, a_relu, gcols, L.kernel, L.kernel, L.stride, L.padding, 1.0,
                                 dz.reshape(a.shape))
            else:
                if out is None:
                    out = xp.empty(x.shape, dtype=compute)
                else:
                    check_array("out", out, compute, tuple(x.shape))
                grad_x = _im2col_backward(xp, a, a_bias, a_relu, gcols, L.kernel, L.kernel, L.stride, L.padding,
                                          inv, out)
        return grad_x

    __call__ = forward

    # -- CUDA graphs -------------------------------------------------------------------------
    def capture(self, batch_size, backward=False, optimizer=None, need_grad_x=False):
        """Records the forward (and the backward and an Adam step) of one batch size in CUDA graphs.

        Replaying a graph costs one launch instead of ~20 (forward) or ~60 (a training step),
        which is what decides the speed at small batch. The graphs read and write fixed buffers:
        fill `graph.x` (and `graph.grad_y`) in place, replay, read `graph.y` (and `graph.grad_x`).
        The parameters are read in place, so Adam's updates are seen; parameters changed by hand
        in the float16 mode need `sync_half()`. Only on the GPU. The GEMMs are recorded through
        cuBLAS called directly (fastface/_gemm.py); if recording fails, the capture is ended
        before the error propagates, so the GPU stays usable.

        Args:
            batch_size: B of every replay.
            backward: also record a backward from `graph.grad_y` (replayed by `graph.backward()`).
            optimizer: an `Adam` made from this encoder, recorded after the backward.
            need_grad_x: the backward also writes `graph.grad_x`.

        Returns:
            EncoderGraph.
        """
        if self._xp is np:
            raise RuntimeError("capture needs the encoder on the GPU (enc.to('gpu'))")
        if optimizer is not None and not backward:
            raise ValueError("an optimizer step is recorded after a backward; pass backward=True")
        if optimizer is not None and getattr(optimizer, "_model", None) is not self:
            raise ValueError("optimizer must be an Adam made from this encoder")
        return EncoderGraph(self, int(batch_size), bool(backward), optimizer, bool(need_grad_x))

    # -- save and load -----------------------------------------------------------------------
    def save(self, path):
        """Writes the weights and the architecture's settings to an HDF5 file.

        Atomic (fastface._files.atomic_write): a save that fails leaves an earlier file at `path` as it was."""
        import h5py  # noqa: PLC0415 - only needed here

        with atomic_write(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["kind"] = _FILE_KIND
            f.attrs["format_version"] = _FILE_VERSION
            g = f.create_group("settings")
            for k, v in self.settings.items():
                g.attrs[k] = np.asarray(v, dtype=np.int64)
            f.attrs["seed"] = self.seed
            f.attrs["fc_init_scale"] = self.fc_init_scale
            f.attrs["precision"] = self.precision
            p = f.create_group("params")
            for name, a in self.params.items():
                p.create_dataset(name, data=a.get() if is_cupy_array(a) else a)

    @staticmethod
    def _read(path):
        import h5py  # noqa: PLC0415

        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise ValueError(f"{path} is not a readable HDF5 file: {e}") from None
        with f:
            if f.attrs.get("kind") != _FILE_KIND or "settings" not in f or "params" not in f:
                raise ValueError(f"{path} is not a fastface encoder file (no kind={_FILE_KIND!r} attribute)")
            version = int(f.attrs.get("format_version", -1))
            if version != _FILE_VERSION:
                raise ValueError(f"{path} has encoder format version {version}; this fastface reads {_FILE_VERSION}")
            settings = {}
            for k in _ARCHITECTURE_KEYS:
                if k not in f["settings"].attrs:
                    raise ValueError(f"{path} lacks the setting {k!r}")
                v = np.asarray(f["settings"].attrs[k])
                settings[k] = tuple(int(a) for a in v) if v.ndim else int(v)
            extra = {"seed": int(f.attrs.get("seed", 0)),
                     "fc_init_scale": float(f.attrs.get("fc_init_scale", 1e-3))}
            params = {k: np.asarray(f["params"][k]) for k in f["params"]}
        return settings, extra, params

    @staticmethod
    def _normalise(settings):
        out = dict(settings)
        if "resolution" in out and isinstance(out["resolution"], (int, np.integer)):
            out["resolution"] = (int(out["resolution"]),) * 2
        for k in ("resolution", "widths"):
            if k in out:
                out[k] = tuple(int(v) for v in out[k])
        return out

    @classmethod
    def load(cls, path, precision="float32", **expected):
        """Builds an encoder from an HDF5 file written by `save` (on the CPU).

        Args:
            path: the file.
            precision: as for the constructor.
            expected: architecture settings the file must have (for example n_outputs=513);
                a difference raises ValueError naming the setting.
        """
        settings, extra, params = cls._read(path)
        unknown = set(expected) - set(_ARCHITECTURE_KEYS)
        if unknown:
            raise TypeError(f"unknown encoder settings {sorted(unknown)}; known: {list(_ARCHITECTURE_KEYS)}")
        want = cls._normalise(expected)
        for k, v in want.items():
            if settings[k] != v:
                raise ValueError(f"{path} holds an encoder with {k}={settings[k]}, expected {k}={v}")
        enc = cls(seed=extra["seed"], fc_init_scale=extra["fc_init_scale"], precision=precision, **settings)
        enc._copy_params(path, params)
        return enc

    def load_weights(self, path):
        """Reads weights saved by `save` into this encoder; its settings must equal the file's."""
        settings, _, params = self._read(path)
        for k in _ARCHITECTURE_KEYS:
            if settings[k] != self.settings[k]:
                raise ValueError(f"{path} holds an encoder with {k}={settings[k]}, but this encoder has "
                                 f"{k}={self.settings[k]}")
        self._copy_params(path, params)
        return self

    def _copy_params(self, path, params):
        if set(params) != set(self.params):
            missing, extra = set(self.params) - set(params), set(params) - set(self.params)
            raise ValueError(f"{path} does not match the architecture: missing {sorted(missing)}, "
                             f"unexpected {sorted(extra)}")
        for name, a in params.items():
            if a.shape != self.params[name].shape:
                raise ValueError(f"{path}: {name} has shape {a.shape}, the architecture needs "
                                 f"{self.params[name].shape}")
        for name, a in params.items():
            self.params[name][...] = self._xp.asarray(a, dtype=self.flat_params.dtype)
        self._half_fresh = False


class _Workspace:
    """Every buffer of a forward and backward at one batch size, made once.

    cols[i] (M_i, K_i) and z[i] (M_i, C_i) in the GEMM dtype are kept from the forward for the
    backward; the backward uses one gcols buffer (the largest M_i K_i) and two alternating
    activation-gradient buffers.
    """

    def __init__(self, xp, layers, B, gemm_dtype, compute, n_outputs):
        self.cols = [xp.empty((B * L.h_out * L.w_out, L.k), dtype=gemm_dtype) for L in layers]
        self.z = [xp.empty((B * L.h_out * L.w_out, L.c_out), dtype=gemm_dtype) for L in layers]
        c = layers[-1].c_out
        self.feat = xp.zeros((B, c + 1), dtype=gemm_dtype)
        self.feat[:, c] = 1  # the constant input that carries the fc bias
        self.gfeat = xp.empty((B, c + 1), dtype=gemm_dtype)
        self.gy = xp.empty((B, n_outputs), dtype=gemm_dtype)
        max_m = max(B * L.h_out * L.w_out for L in layers)
        self.ones = xp.ones((1, max_m), dtype=gemm_dtype)
        self.gcols = xp.empty(max(B * L.h_out * L.w_out * L.k for L in layers), dtype=gemm_dtype)
        size = max(B * L.h_out * L.w_out * L.c_out for L in layers)
        self._dz = [xp.empty(size, dtype=gemm_dtype), xp.empty(size, dtype=gemm_dtype)]
        self._shapes = [(B * L.h_out * L.w_out, L.c_out) for L in layers]

    def dz(self, i):
        """The gradient of layer i's output (before its bias and ReLU), (M_i, C_i)."""
        m, c = self._shapes[i]
        return self._dz[i % 2][:m * c].reshape(m, c)


class EncoderGraph:
    """Forward (and backward + Adam) of one batch size recorded in CUDA graphs; see Encoder.capture.

    Attributes:
        x: (B, H, W, 3) float32 input buffer. y: (B, n_outputs) float32 output buffer.
        grad_y: (B, n_outputs) float32 buffer read by the backward. grad_x: (B, H, W, 3) or None.
    """

    def __init__(self, enc, B, backward, optimizer, need_grad_x):
        cupy = cupy_or_none()
        h, w = enc.settings["resolution"]
        n = enc.settings["n_outputs"]
        self.encoder, self.optimizer = enc, optimizer
        self.x = cupy.zeros((B, h, w, 3), dtype=np.float32)
        self.y = cupy.zeros((B, n), dtype=np.float32)
        self.grad_y = cupy.zeros((B, n), dtype=np.float32)
        self.grad_x = cupy.zeros((B, h, w, 3), dtype=np.float32) if (backward and need_grad_x) else None
        self._need_grad_x = need_grad_x
        # Warm up outside the capture: compiles the kernels, makes the workspace, lets cuBLAS
        # choose its kernels, refreshes the float16 weights (a capture must not allocate).
        enc.forward(self.x, out=self.y)
        if backward:
            enc.backward(self.grad_y, need_grad_x=need_grad_x, out=self.grad_x)
        if optimizer is not None:
            from fastface.nn.adam import _function as adam_function  # noqa: PLC0415
            adam_function("adam_prepare")  # compiled and looked up outside the capture
            adam_function("adam_update")
        self._backward = None

        def train_step():
            enc.backward(self.grad_y, need_grad_x=need_grad_x, out=self.grad_x)
            if optimizer is not None:
                optimizer.step()

        self._forward = capture(lambda: enc.forward(self.x, out=self.y), "the encoder's forward")
        if backward:
            self._backward = capture(train_step, "the encoder's backward")
        enc.hold_workspaces()  # the graphs replay into the workspace they recorded

    def forward(self):
        """Replays the forward on the current stream: reads x, writes y."""
        self._forward.launch()
        return self.y

    def backward(self):
        """Replays the backward (and the Adam step): reads grad_y, writes the grads (and grad_x)."""
        if self._backward is None:
            raise RuntimeError("this graph was captured without backward=True")
        self._backward.launch()
        return self.grad_x

    def step(self):
        """forward() then backward()."""
        self.forward()
        return self.backward()
