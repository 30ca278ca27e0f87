"""Adam with bias correction, decoupled weight decay and clipping by global norm.

For every parameter p with gradient g, at step t (1, 2, ...):
    g <- g * min(1, clip_norm / ||G||)       ||G|| the norm of all gradients together (optional)
    m <- beta1 m + (1 - beta1) g
    v <- beta2 v + (1 - beta2) g^2
    p <- p (1 - lr weight_decay) - lr (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
(Kingma & Ba 2015, Algorithm 1; the decay as in AdamW, Loshchilov & Hutter 2019.)
A step whose gradient norm is not finite (an fp16 overflow) changes nothing but the step count.

Speed: the parameters of a network live in one flat buffer with views (`Encoder.flat_params`),
so a step is two launches whatever the number of tensors: `adam_prepare` (per-block partial sums
of g^2, and the step counter) and `adam_update` (every block reduces the partials in the same
order, then updates its share of p, m, v and the float16 shadow weights of the fp16 mode). The
step count, learning rate and norm live on the device, so a whole training step can be captured
in a CUDA graph (`Encoder.capture`).
"""
import numba
import numpy as np

from fastface._backend import KernelFile, array_module, pointer_or_null

__all__ = ["Adam"]

_N_PARTS = 256   # partial sums of g^2 in all; must be <= ADAM_THREADS
_THREADS = 256   # ADAM_THREADS in kernels/nn_adam.cu
_UPDATE_BLOCKS = 1024


# ---------------------------------------------------------------------------------------------
# CPU kernels (Numba twins of kernels/nn_adam.cu, same argument order)
#
# Both run in parallel over FIXED chunks of the flat buffer, so the results do not depend on the
# number of threads: partial sum k always covers the same elements (chunk k of len(partial)
# contiguous chunks; the GPU's block k covers a grid-stride share instead, so the two devices round
# the norm differently, as before), the norm sums the partials in index order, and the update is
# element by element. The elements' arithmetic is the serial loop's, unchanged.
# Two things kept LLVM from vectorising these loops, each enough on its own (measured: 74 ms against
# 18 ms for the update on one loaded core): Python's error model, which checks every division for a
# zero divisor (error_model="numpy" here; no divisor can be zero: 1 - beta^t > 0 for beta < 1,
# sqrt(v) + eps > 0 for eps > 0, and clip_norm / norm only when norm > clip_norm > 0), and an index
# Numba cannot prove non-negative (a loop from a chunk's start), which gets a wraparound select:
# the chunks are 0-based slices instead.
# Measured on 2 shared cores, 4.87 M float32 parameters: 40 ms a step before (serial, scalar, and
# partial sums over every 256th element: 256 strided passes, each loading one 64-byte line in 16,
# so the gradient crossed the memory bus 16 times), 8.7 ms after; bench/RESULTS.md has the figures.

_UPDATE_CHUNK = 1 << 15  # elements per parallel work item of the CPU update (128 KiB of float32)


@numba.njit(cache=True, inline="always")
def _sum_of_squares(g):
    """sum of g[i]^2 in float64, by four interleaved accumulators (independent chains of adds, which
    overlap) combined in a fixed order. Indexed from 0 over a slice: an index Numba cannot prove
    non-negative gets a wraparound select that keeps LLVM from vectorising."""
    n = g.shape[0]
    a0, a1, a2, a3 = 0.0, 0.0, 0.0, 0.0
    for j in range(n // 4):
        i = 4 * j
        a0 += g[i] * g[i]
        a1 += g[i + 1] * g[i + 1]
        a2 += g[i + 2] * g[i + 2]
        a3 += g[i + 3] * g[i + 3]
    for i in range(n - n % 4, n):
        a0 += g[i] * g[i]
    return (a0 + a1) + (a2 + a3)


@numba.njit(cache=True, parallel=True)
def adam_prepare(grad, n, partial, step):
    """partial[k] = sum of g^2 over the k-th of len(partial) contiguous chunks of ceil(n / len(partial))
    elements (fixed boundaries); step += 1."""
    n_parts = partial.shape[0]
    chunk = (n + n_parts - 1) // n_parts
    for k in numba.prange(n_parts):
        begin = min(n, k * chunk)
        partial[k] = _sum_of_squares(grad[begin:min(n, begin + chunk)])
    step[0] += 1


@numba.njit(cache=True, error_model="numpy", inline="always")
def _update_chunk(param, grad, m, v, clip, beta1, beta2, lr, eps, bc1, bc2, decay):
    """The update of every element of these slices (indexed from 0: see _sum_of_squares)."""
    for i in range(param.shape[0]):
        g = grad[i] * clip
        mi = beta1 * m[i] + (1.0 - beta1) * g
        vi = beta2 * v[i] + (1.0 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        param[i] = param[i] * decay - lr * (mi / bc1) / (np.sqrt(vi / bc2) + eps)


@numba.njit(cache=True)
def _sum_in_order(a):
    """a.sum(), in a function of its own: inside a parallel=True function Numba turns an array's sum
    into a parallel reduction, whose order (and rounding) would depend on the number of threads."""
    return a.sum()


@numba.njit(cache=True, parallel=True, error_model="numpy")
def adam_update(param, grad, m, v, shadow, n, partial, n_parts, step, hyper):
    """The update of every element, in parallel over chunks of _UPDATE_CHUNK (shadow is unused on the
    CPU: there is no float16 mode)."""
    norm = np.sqrt(_sum_in_order(partial[:n_parts]))
    if not np.isfinite(norm):
        return
    lr, beta1, beta2, eps = hyper[0], hyper[1], hyper[2], hyper[3]
    weight_decay, clip_norm = hyper[4], hyper[5]
    clip = clip_norm / norm if (clip_norm > 0.0 and norm > clip_norm) else 1.0
    t = step[0]
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    decay = 1.0 - lr * weight_decay
    n_chunks = (n + _UPDATE_CHUNK - 1) // _UPDATE_CHUNK
    for c in numba.prange(n_chunks):
        lo, hi = c * _UPDATE_CHUNK, min(n, (c + 1) * _UPDATE_CHUNK)
        _update_chunk(param[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi], clip, beta1, beta2, lr, eps, bc1, bc2, decay)
    _ = shadow


_function = KernelFile("nn_adam.cu", ("adam_prepare", "adam_update"))


class Adam:
    """Adam over a model's parameters, updated in place.

        opt = Adam(encoder, lr=1e-3, weight_decay=1e-4, clip_norm=1.0)
        encoder.forward(x); encoder.backward(grad_y); opt.step()

    Args:
        params: an object with `flat_params` and `flat_grads` (one flat buffer each, such as
            `Encoder`; one fused update), or a dict name -> array of parameters (updated in place;
            one update per array) whose gradients are passed to `step`.
        lr, betas, eps: Adam's hyperparameters.
        weight_decay: decoupled decay rate (AdamW); 0 turns it off.
        clip_norm: clip the gradients to this global L2 norm; None turns it off.

    The state (m, v, step count) lives on the device of the parameters. Move the model first,
    then make the optimizer.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip_norm=None):
        try:
            beta1, beta2 = (float(b) for b in betas)
        except (TypeError, ValueError):
            raise TypeError(f"betas must be a pair of numbers; got {betas!r}") from None
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("clip_norm", clip_norm)):
            if not (isinstance(value, (int, float, np.integer, np.floating)) or (name == "clip_norm" and value is None)):
                raise TypeError(f"{name} must be a number; got {value!r}")
        for name, value, ok in (("lr", lr, 0 < lr < np.inf), ("betas", betas, 0 <= beta1 < 1 and 0 <= beta2 < 1),
                                ("eps", eps, 0 < eps < np.inf), ("weight_decay", weight_decay, 0 <= weight_decay < np.inf),
                                ("clip_norm", clip_norm, clip_norm is None or 0 < clip_norm < np.inf)):
            if not ok:
                raise ValueError(f"{name} is out of range; got {value!r}")
        self._model = None
        if hasattr(params, "flat_params") and hasattr(params, "flat_grads"):
            self._model = params
            self._names = None
            groups = [params.flat_params]
        elif isinstance(params, dict) and params:
            self._names = list(params)
            groups = [params[k] for k in self._names]
        else:
            raise TypeError("params must be a model with flat_params and flat_grads (an Encoder) or a "
                            f"non-empty dict of arrays; got {type(params).__name__}")
        xp = array_module(*[(f"params[{i}]", g) for i, g in enumerate(groups)])
        for i, g in enumerate(groups):
            if not (hasattr(g, "dtype") and hasattr(g, "flags")):
                raise TypeError(f"parameter {i} must be a numpy or cupy array; got {type(g).__name__}")
            if g.dtype not in (np.float32, np.float64) or (xp is not np and g.dtype != np.float32):
                raise TypeError(f"parameter {i} must be float32 (or float64 on the CPU); got {g.dtype}")
            if not g.flags.c_contiguous:
                raise ValueError(f"parameter {i} must be C-contiguous (it is updated in place)")
            if xp is np and not g.flags.writeable:  # cupy arrays have no such flag: always writeable
                raise ValueError(f"parameter {i} must be writeable (it is updated in place)")
        self._xp = xp
        self._params = groups
        self.m = [xp.zeros_like(g) for g in groups]
        self.v = [xp.zeros_like(g) for g in groups]
        dtype = groups[0].dtype
        if len(groups) > _N_PARTS:
            raise ValueError(f"at most {_N_PARTS} parameter arrays; got {len(groups)}")
        # The norm is reduced from at most _N_PARTS partial sums (one block of adam_update).
        self._parts_per_group = _N_PARTS // len(groups)
        self._partial = xp.zeros(_N_PARTS, dtype=dtype)
        self._step = xp.zeros(1, dtype=np.int32)
        self._hyper = np.array([lr, beta1, beta2, eps, weight_decay, clip_norm or 0.0], dtype=dtype)
        # On the CPU the same array (np.asarray does not copy); on the GPU a copy that the kernels read.
        self._hyper_dev = self._hyper if xp is np else xp.asarray(self._hyper)
        self._steps_host = 0

    # -- hyperparameters -------------------------------------------------------------------
    @property
    def lr(self):
        return float(self._hyper[0])

    @lr.setter
    def lr(self, value):
        """Takes effect at the next step, also inside a captured CUDA graph (it is read on the device).

        On the GPU the new value is copied into the existing device array on the current stream
        (the stream graphs replay on), so steps queued before it use the old value and no device
        memory is allocated: a schedule may change lr at every step.
        """
        if not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"lr must be a number; got {value!r}")
        if not 0 < value < np.inf:
            raise ValueError(f"lr must be positive and finite; got {value!r}")
        self._hyper[0] = value
        # A kernel argument would be frozen into a captured graph, so lr stays in device memory.
        # The CPU kernels read self._hyper itself. The source is pageable host memory, which the
        # driver stages before the copy call returns: self._hyper may change right after.
        if self._hyper_dev is not self._hyper:
            self._hyper_dev.set(self._hyper)

    @property
    def steps(self):
        """Steps taken through `step` (graph replays of a captured step are not counted here)."""
        return self._steps_host

    # -- the step --------------------------------------------------------------------------
    def step(self, grads=None, gate=None):
        """One update of every parameter: `prepare(grads)` then `update(gate)`.

        Args:
            grads: None when the optimizer was made from a model (its flat_grads are used),
                else a dict with the same keys, shapes and dtypes as the params dict.
            gate: see `update`.
        """
        self.prepare(grads)
        self.update(gate)

    def prepare(self, grads=None):
        """The first half of a step: the gradient norm's partial sums (`gradient_norm_squares`) and the step
        count. Several optimizers that must skip together (one training step) prepare first, then gate their
        updates on all their norms at once. `grads` as for `step`."""
        if self._model is not None:
            if grads is not None:
                raise ValueError("grads must be None for an optimizer made from a model (it reads "
                                 "model.flat_grads)")
            shadow = getattr(self._model, "_flat_half", None)
            pairs = [(self._model.flat_params, self._model.flat_grads, shadow)]
            if self._model.flat_params is not self._params[0]:
                raise RuntimeError("the model's parameters moved (to() was called) after the optimizer "
                                   "was made; make a new optimizer")
        else:
            if not isinstance(grads, dict) or set(grads) != set(self._names):
                raise ValueError(f"grads must be a dict with the keys {sorted(self._names)}")
            pairs = []
            for name, p in zip(self._names, self._params):
                g = grads[name]
                if not (hasattr(g, "dtype") and hasattr(g, "shape")):
                    raise TypeError(f"grads[{name!r}] must be a {p.dtype} array of shape {tuple(p.shape)}; "
                                    f"got {type(g).__name__}")
                array_module(("params", p), (f"grads[{name!r}]", g))
                if tuple(g.shape) != tuple(p.shape) or g.dtype != p.dtype:
                    raise ValueError(f"grads[{name!r}] must be {p.dtype} {tuple(p.shape)}; got "
                                     f"{g.dtype} {tuple(g.shape)}")
                pairs.append((p, self._xp.ascontiguousarray(g), None))
        per = self._parts_per_group
        # Only the first group's prepare advances the real step counter; the partials of all groups
        # make the global norm.
        for i, (p, g, _) in enumerate(pairs):
            partial, step = self._partial[i * per:(i + 1) * per], self._step if i == 0 else self._scratch_step()
            if self._xp is np:
                adam_prepare(g.reshape(-1), g.size, partial, step)
            else:
                _function("adam_prepare")((per,), (_THREADS,), (g, np.int64(g.size), partial, step))
        self._prepared = pairs

    def update(self, gate=None):
        """The second half of a step (after `prepare`): every parameter updated, unless the norm is not finite.

        Args:
            gate: optional (1,) array on the parameters' device, multiplied into the gradient norm's
                partial sums before the update: 1 lets the step happen, NaN makes it a skipped step
                (no parameter or moment changes). A training step gates on its loss and on every
                optimizer's norm this way (`gate = 0 * (loss + norms) + 1` is NaN exactly when one of
                them is not finite) without reading them on the host, so the decision can be recorded
                in a CUDA graph.
        """
        pairs = getattr(self, "_prepared", None)
        if pairs is None:
            raise RuntimeError("update() needs a prepare() first (or call step())")
        self._prepared = None
        xp = self._xp
        if gate is not None:
            array_module(("params", self._params[0]), ("gate", gate))
            if tuple(gate.shape) != (1,):
                raise ValueError(f"gate must have shape (1,); got {tuple(gate.shape)}")
            xp.multiply(self._partial, gate, out=self._partial)
        n_parts = len(pairs) * self._parts_per_group
        for i, (p, g, shadow) in enumerate(pairs):
            if xp is np:
                adam_update(p.reshape(-1), g.reshape(-1), self.m[i].reshape(-1), self.v[i].reshape(-1),
                            p.reshape(-1), p.size, self._partial, n_parts, self._step, self._hyper)
            else:
                blocks = int(min(_UPDATE_BLOCKS, max(1, (p.size + _THREADS - 1) // _THREADS)))
                _function("adam_update")((blocks,), (_THREADS,), (
                    p, g, self.m[i], self.v[i], pointer_or_null(shadow), np.int64(p.size), self._partial,
                    np.int32(n_parts), self._step, self._hyper_dev))
        self._steps_host += 1
        if self._model is not None and hasattr(self._model, "_adam_wrote_shadow"):
            self._model._adam_wrote_shadow()

    @property
    def gradient_norm_squares(self):
        """(256,) array on the device: the partial sums of g^2 of the last `prepare` (gated by the last
        `update`); their sum is the squared gradient norm, not finite when the step was skipped. Read it
        without a synchronisation to fold the verdict into another transfer (a captured training step does)."""
        return self._partial

    def last_step_was_finite(self):
        """Whether the last `step`'s gradient norm was finite. A step whose norm is not finite changes
        no parameter and no moment (only the step count); this tells a training loop to log it. It reads
        the step's partial sums of g^2 (256 values) instead of the gradients again; on the GPU that is a
        device-to-host copy, so a synchronisation."""
        partial = self._partial if self._xp is np else self._partial.get()
        return bool(np.isfinite(partial.sum()))

    def _scratch_step(self):
        if not hasattr(self, "_scratch"):
            self._scratch = self._xp.zeros(1, dtype=np.int32)
        return self._scratch

    def state_arrays(self):
        """(m list, v list, step) for checkpoints; step is a (1,) int32 array on the device."""
        return self.m, self.v, self._step
