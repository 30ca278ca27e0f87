"""Adam: against a plain numpy transcription of the formula, clipping, skipping, GPU parity."""
import numba
import numpy as np
import pytest

from fastface.nn import Adam, Encoder
from fastface.nn import adam as adam_module


def adam_reference(params, grads_per_step, lr, betas, eps, weight_decay, clip_norm):
    """Kingma & Ba's Algorithm 1 with AdamW's decay and clipping by global norm, in float64.

    lr: a number, or one per step (a schedule)."""
    p = {k: np.array(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    b1, b2 = betas
    lrs = list(lr) if np.ndim(lr) else [lr] * len(grads_per_step)
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs, strict=True), start=1):
        norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
        c = min(1.0, clip_norm / norm) if clip_norm else 1.0
        for k in p:
            g = np.asarray(grads[k], np.float64) * c
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g * g
            mhat, vhat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            p[k] = p[k] * (1 - lr * weight_decay) - lr * mhat / (np.sqrt(vhat) + eps)
    return p


@pytest.mark.parametrize("weight_decay,clip_norm", [(0.0, None), (0.1, 0.5)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_adam_on_a_dict_matches_reference(rng, weight_decay, clip_norm, dtype):
    params = {"a": rng.normal(size=(3, 4)).astype(dtype), "b": rng.normal(size=5).astype(dtype)}
    start = {k: v.copy() for k, v in params.items()}
    steps = [{k: rng.normal(size=v.shape).astype(dtype) for k, v in params.items()} for _ in range(5)]
    opt = Adam(params, lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay, clip_norm=clip_norm)
    for grads in steps:
        opt.step(grads)
    ref = adam_reference(start, steps, 0.01, (0.8, 0.95), 1e-6, weight_decay, clip_norm)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for k in params:
        np.testing.assert_allclose(params[k], ref[k], rtol=rtol, atol=rtol)
    assert opt.steps == 5


def test_adam_on_an_encoder_updates_the_flat_buffer_like_the_reference(rng):
    enc = Encoder(3, resolution=8, widths=(4,), stem_width=4, precision="float64")
    start = {k: v.copy() for k, v in enc.params.items()}
    opt = Adam(enc, lr=0.003, weight_decay=0.01, clip_norm=1.0)
    steps = []
    for _ in range(3):
        enc.flat_grads[...] = 0.0
        for k, g in enc.grads.items():
            g[...] = rng.normal(size=g.shape)
        steps.append({k: g.copy() for k, g in enc.grads.items()})
        opt.step()
    ref = adam_reference(start, steps, 0.003, (0.9, 0.999), 1e-8, 0.01, 1.0)
    for k in enc.params:
        np.testing.assert_allclose(enc.params[k], ref[k], rtol=1e-12, atol=1e-14)


def test_adam_skips_a_step_with_non_finite_gradients(rng):
    params = {"a": rng.normal(size=4)}
    before = params["a"].copy()
    opt = Adam(params, lr=0.1)
    opt.step({"a": np.array([1.0, np.inf, 0.0, 0.0])})
    np.testing.assert_array_equal(params["a"], before)
    np.testing.assert_array_equal(opt.m[0], 0.0)


def test_adam_lr_can_change_between_steps(rng):
    params = {"a": np.zeros(3)}
    opt = Adam(params, lr=0.1)
    opt.lr = 0.01
    opt.step({"a": np.ones(3)})
    np.testing.assert_allclose(params["a"], -0.01 * np.ones(3), rtol=1e-6)


def test_adam_lr_changed_between_steps_scales_each_step_like_the_reference(rng):
    params = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=5)}
    start = {k: v.copy() for k, v in params.items()}
    steps = [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(4)]
    schedule = [0.1, 0.01, 0.05, 0.002]
    opt = Adam(params, lr=0.3, weight_decay=0.1, clip_norm=2.0)
    for lr, grads in zip(schedule, steps):
        opt.lr = lr
        assert opt.lr == lr
        opt.step(grads)
    ref = adam_reference(start, steps, schedule, (0.9, 0.999), 1e-8, 0.1, 2.0)
    for k in params:
        np.testing.assert_allclose(params[k], ref[k], rtol=1e-12, atol=1e-14)
    # the schedule mattered: the first lr throughout lands elsewhere
    constant = adam_reference(start, steps, schedule[0], (0.9, 0.999), 1e-8, 0.1, 2.0)
    assert np.abs(params["a"] - constant["a"]).max() > 1e-2


def test_adam_rejects_bad_arguments(rng):
    params = {"a": np.zeros(3)}
    with pytest.raises(ValueError, match="lr"):
        Adam(params, lr=0.0)
    with pytest.raises(ValueError, match="betas"):
        Adam(params, betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="params must be"):
        Adam([np.zeros(3)])
    opt = Adam(params)
    with pytest.raises(ValueError, match="grads must be a dict"):
        opt.step({"b": np.zeros(3)})
    with pytest.raises(ValueError, match="grads\\['a'\\] must be"):
        opt.step({"a": np.zeros(4)})


def test_gpu_adam_matches_cpu(cupy, rng, tol):
    cpu = Encoder(3, resolution=16, widths=(8, 16), stem_width=8)
    gpu = Encoder(3, resolution=16, widths=(8, 16), stem_width=8).to("gpu")
    opt_cpu = Adam(cpu, lr=0.01, weight_decay=0.01, clip_norm=0.5)
    opt_gpu = Adam(gpu, lr=0.01, weight_decay=0.01, clip_norm=0.5)
    for _ in range(3):
        g = rng.normal(size=cpu.flat_grads.shape).astype(np.float32)
        cpu.flat_grads[...] = g
        gpu.flat_grads[...] = cupy.asarray(g)
        opt_cpu.step()
        opt_gpu.step()
    np.testing.assert_allclose(gpu.flat_params.get(), cpu.flat_params, rtol=tol["gpu_cpu_rtol"] * 10,
                               atol=tol["gpu_cpu_atol"])
    np.testing.assert_allclose(opt_gpu.m[0].get(), opt_cpu.m[0], rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])


def test_gpu_adam_lr_changed_between_steps_matches_reference(cupy, rng):
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    start = {k: v.copy() for k, v in params.items()}
    steps = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(4)]
    schedule = [0.1, 0.01, 0.05, 0.002]
    gpu_params = {k: cupy.asarray(v) for k, v in params.items()}
    opt = Adam(gpu_params, lr=0.3, clip_norm=0.5)
    for lr, grads in zip(schedule, steps):
        opt.lr = lr
        opt.step({k: cupy.asarray(g) for k, g in grads.items()})
    ref = adam_reference(start, steps, schedule, (0.9, 0.999), 1e-8, 0.0, 0.5)
    for k in params:
        np.testing.assert_allclose(gpu_params[k].get(), ref[k], rtol=1e-5, atol=1e-6)


def test_gpu_adam_lr_change_reaches_a_captured_step(cupy, rng):
    """lr is read from device memory, so a graph captured once follows a schedule set between replays."""
    settings = dict(resolution=16, widths=(8,), stem_width=8)
    eager, graphed = Encoder(3, **settings).to("gpu"), Encoder(3, **settings).to("gpu")
    # eps=1: the update is smooth in g, so GEMM rounding differences stay at rounding level
    opt_eager, opt_graphed = Adam(eager, lr=1e-3, eps=1.0), Adam(graphed, lr=1e-3, eps=1.0)
    graph = graphed.capture(2, backward=True, optimizer=opt_graphed)
    for lr in (1e-2, 1e-4):
        x = cupy.asarray(rng.uniform(size=(2, 16, 16, 3)).astype(np.float32))
        g = cupy.asarray(rng.normal(size=(2, 3)).astype(np.float32))
        opt_eager.lr = opt_graphed.lr = lr
        eager.forward(x)
        eager.backward(g, need_grad_x=False)
        opt_eager.step()
        graph.x[...] = x
        graph.grad_y[...] = g
        graph.step()
    # the same kernels on the same data, up to cuBLAS's choice of algorithm; a graph that kept
    # the lr of its capture (1e-3) would be off by most of both updates
    np.testing.assert_allclose(graphed.flat_params.get(), eager.flat_params.get(), rtol=1e-5, atol=1e-6)


def test_gpu_adam_writes_the_float16_shadow_weights(cupy, rng):
    enc = Encoder(3, resolution=16, widths=(8,), stem_width=8, precision="float16").to("gpu")
    opt = Adam(enc, lr=0.01)
    enc.flat_grads[...] = cupy.asarray(rng.normal(size=enc.flat_grads.shape).astype(np.float32))
    opt.step()
    np.testing.assert_array_equal(enc._flat_half.get(), enc.flat_params.get().astype(np.float16))


def test_gpu_adam_on_a_dict_matches_reference(cupy, rng):
    params = {"a": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=5).astype(np.float32)}
    start = {k: v.copy() for k, v in params.items()}
    steps = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(3)]
    gpu_params = {k: cupy.asarray(v) for k, v in params.items()}
    opt = Adam(gpu_params, lr=0.01, clip_norm=0.5)
    for grads in steps:
        opt.step({k: cupy.asarray(g) for k, g in grads.items()})
    ref = adam_reference(start, steps, 0.01, (0.9, 0.999), 1e-8, 0.0, 0.5)
    for k in params:
        np.testing.assert_allclose(gpu_params[k].get(), ref[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, exc, pattern", [
    (dict(lr=None), TypeError, "lr must be a number"),
    (dict(lr=float("inf")), ValueError, "lr is out of range"),
    (dict(eps="1e-8"), TypeError, "eps must be a number"),
    (dict(betas=(0.9,)), TypeError, "betas must be a pair"),
    (dict(betas=None), TypeError, "betas must be a pair"),
])
def test_adam_rejects_non_numeric_or_infinite_hyperparameters(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        Adam({"a": np.zeros(3)}, **kwargs)


def test_adam_rejects_parameters_and_grads_that_are_no_writeable_arrays():
    with pytest.raises(TypeError, match="parameter 0 must be a numpy or cupy array"):
        Adam({"a": [0.0, 1.0]})
    frozen = np.zeros(3)
    frozen.setflags(write=False)
    with pytest.raises(ValueError, match="parameter 0 must be writeable"):
        Adam({"a": frozen})
    opt = Adam({"a": np.zeros(3)})
    for bad in (None, [0.0, 0.0, 0.0]):
        with pytest.raises(TypeError, match="grads\\['a'\\] must be a float64 array"):
            opt.step({"a": bad})
    for bad in (None, "0.1", float("nan"), float("inf")):
        with pytest.raises((TypeError, ValueError), match="lr must be"):
            opt.lr = bad


# --- the parallel CPU twins (fixed chunks: results independent of the number of threads) ----------

@numba.njit
def _serial_update(param, grad, m, v, norm, hyper, t):
    """The serial loop the parallel adam_update replaced, element arithmetic written out the same way."""
    lr, beta1, beta2, eps = hyper[0], hyper[1], hyper[2], hyper[3]
    weight_decay, clip_norm = hyper[4], hyper[5]
    clip = clip_norm / norm if (clip_norm > 0.0 and norm > clip_norm) else 1.0
    bc1 = 1.0 - beta1 ** t
    bc2 = 1.0 - beta2 ** t
    decay = 1.0 - lr * weight_decay
    for i in range(param.shape[0]):
        g = grad[i] * clip
        mi = beta1 * m[i] + (1.0 - beta1) * g
        vi = beta2 * v[i] + (1.0 - beta2) * g * g
        m[i] = mi
        v[i] = vi
        param[i] = param[i] * decay - lr * (mi / bc1) / (np.sqrt(vi / bc2) + eps)


def _cpu_state(rng, n, dtype=np.float32):
    return (rng.normal(size=n).astype(dtype), rng.normal(size=n).astype(dtype),
            (0.1 * rng.normal(size=n)).astype(dtype), rng.uniform(0, 0.1, size=n).astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_partial_sums_cover_fixed_contiguous_chunks(rng, dtype):
    n = 1000 * 256 + 77  # chunks of 1001, the last one shorter
    grad = rng.normal(size=n).astype(dtype)
    partial, step = np.zeros(256, dtype), np.zeros(1, np.int32)
    adam_module.adam_prepare(grad, n, partial, step)
    chunk = -(-n // 256)
    want = [np.sum(grad[k * chunk:(k + 1) * chunk].astype(np.float64) ** 2) for k in range(256)]
    np.testing.assert_allclose(partial, np.array(want).astype(dtype), rtol=1e-6 if dtype == np.float32 else 1e-13)
    assert step[0] == 1
    few = np.full(256, 7, dtype)  # fewer elements than partials: one each, then empty sums
    adam_module.adam_prepare(np.ones(3, dtype), 3, few, step)
    np.testing.assert_array_equal(few, np.r_[np.ones(3), np.zeros(253)].astype(dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_update_equals_the_serial_loop_bit_for_bit(rng, dtype):
    n = 3 * adam_module._UPDATE_CHUNK + 17  # several chunks and a short last one
    param, grad, m, v = _cpu_state(rng, n, dtype)
    hyper = np.array([1e-2, 0.9, 0.999, 1e-8, 1e-2, 0.5], dtype)
    partial = np.zeros(256, dtype)
    step = np.array([2], np.int32)  # adam_prepare makes it 3
    adam_module.adam_prepare(grad, n, partial, step)
    norm = np.sqrt(dtype(adam_module._sum_in_order(partial)))  # the partials in index order, as the kernel
    want = [a.copy() for a in (param, grad, m, v)]
    _serial_update(want[0], want[1], want[2], want[3], norm, hyper, 3)
    adam_module.adam_update(param, grad, m, v, param, n, partial, 256, step, hyper)
    for got, expected in zip((param, m, v), (want[0], want[2], want[3])):
        np.testing.assert_array_equal(got, expected)


def test_cpu_step_does_not_depend_on_the_number_of_threads(rng):
    n = 5 * adam_module._UPDATE_CHUNK + 3
    results = []
    threads = numba.get_num_threads()
    for count in sorted({1, threads}):
        params = {"a": _cpu_state(np.random.default_rng(5), n)[0]}
        opt = Adam(params, lr=1e-2, weight_decay=1e-3, clip_norm=10.0)
        try:
            numba.set_num_threads(count)
            for k in range(3):
                opt.step({"a": np.random.default_rng(k).normal(size=n).astype(np.float32)})
        finally:
            numba.set_num_threads(threads)
        results.append((params["a"], opt.m[0], opt.v[0], opt._partial.copy()))
    for a, b in zip(results[0], results[-1]):
        np.testing.assert_array_equal(a, b)
