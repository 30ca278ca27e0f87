"""Encoder: architecture, reference composition, gradients, learning, save/load, GPU parity."""
import numpy as np
import pytest

import fastface.nn.encoder as encoder_module
from fastface import value_checks
from fastface.nn import Adam, Encoder, conv2d, global_avg_pool, linear, relu
from tests.gradcheck import assert_gradient_matches

SMALL = dict(resolution=16, widths=(4, 8), stem_width=4)


def _images(rng, B, R, dtype=np.float32):
    return rng.random((B, R, R, 3)).astype(dtype)


def reference_forward(enc, x):
    """The encoder written with the public layers, one after the other, in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in enc.params.items()}
    a = np.asarray(x, np.float64) - 0.5
    for L in enc.layers:
        a = relu(conv2d(a, p[f"{L.name}.weight"], p[f"{L.name}.bias"], L.stride, L.padding))
    return linear(global_avg_pool(a), p["fc.weight"], p["fc.bias"])


# ---------------------------------------------------------------------------------------------
# Architecture

def test_layer_table_in_the_module_docstring_matches_the_code():
    table = Encoder(513).layer_table()
    doc = "\n".join(line[4:] for line in encoder_module.__doc__.splitlines() if line.startswith("    "))
    assert table in doc


def test_default_architecture_has_the_reference_size():
    enc = Encoder(513)
    assert enc.n_parameters == 4_966_817
    assert enc.flops_per_image() == 383_517_696  # the 0.38 GFLOP/image net
    assert [L.c_out for L in enc.layers] == [32, 64, 64, 128, 128, 256, 256, 512, 512]
    assert enc.params["stem.weight"].shape == (4, 4, 3, 32)
    assert enc.params["fc.weight"].shape == (512, 513)
    assert sum(v.size for v in enc.params.values()) == enc.n_parameters
    assert set(enc.grads) == set(enc.params)
    assert all(enc.grads[k].shape == v.shape for k, v in enc.params.items())


def test_initialisation_is_he_normal_with_a_small_last_layer():
    enc = Encoder(513, resolution=64)
    for L in enc.layers[3:]:
        w = enc.params[f"{L.name}.weight"]
        assert abs(w.std() / np.sqrt(2.0 / L.k) - 1) < 0.05
        assert np.all(enc.params[f"{L.name}.bias"] == 0)
    assert enc.params["fc.weight"].std() < 1e-4


def test_untrained_encoder_predicts_about_zero(rng):
    enc = Encoder(513, resolution=64)
    y = enc.forward(_images(rng, 2, 64))
    assert y.shape == (2, 513) and y.dtype == np.float32
    assert np.abs(y).max() < 1e-2


def test_same_seed_same_weights_other_seed_other_weights():
    a, b, c = Encoder(7, **SMALL, seed=3), Encoder(7, **SMALL, seed=3), Encoder(7, **SMALL, seed=4)
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
    assert not np.array_equal(a.flat_params, c.flat_params)


# ---------------------------------------------------------------------------------------------
# Forward and backward

@pytest.mark.parametrize("settings", [SMALL, dict(resolution=(24, 16), widths=(8, 8, 16), stem_width=8, patch=2)])
def test_forward_equals_the_public_layers_composed(rng, settings):
    enc = Encoder(6, **settings, fc_init_scale=1.0, precision="float64")
    h, w = enc.settings["resolution"]
    x = rng.random((3, h, w, 3))
    np.testing.assert_allclose(enc.forward(x), reference_forward(enc, x), rtol=1e-12, atol=1e-14)
    enc32 = Encoder(6, **settings, fc_init_scale=1.0)
    np.testing.assert_allclose(enc32.forward(x.astype(np.float32)), reference_forward(enc32, x), rtol=1e-4, atol=1e-5)


def test_encoder_gradients_match_finite_differences(rng, tol):
    enc = Encoder(5, **SMALL, fc_init_scale=1.0, precision="float64")
    x = _images(rng, 2, 16, np.float64)
    g = rng.normal(size=(2, 5))
    enc.forward(x)
    grad_x = enc.backward(g)
    assert_gradient_matches(enc.forward, x, g, grad_x, tol, 30, rng)
    for name, p in enc.params.items():
        analytic = enc.grads[name].copy()

        def f(v, p=p):
            saved = p.copy()
            p[...] = v
            out = enc.forward(x)
            p[...] = saved
            return out

        assert_gradient_matches(f, p.copy(), g, analytic, tol, 12, rng)


def test_backward_overwrites_the_gradients(rng):
    enc = Encoder(5, **SMALL, fc_init_scale=1.0, precision="float64")
    x = _images(rng, 2, 16, np.float64)
    g = rng.normal(size=(2, 5))
    enc.forward(x)
    enc.backward(g)
    first = enc.flat_grads.copy()
    enc.forward(x)
    enc.backward(g, need_grad_x=False)
    np.testing.assert_array_equal(enc.flat_grads, first)


def test_float64_input_is_computed_in_float64(rng):
    enc32 = Encoder(5, **SMALL, fc_init_scale=1.0)
    enc64 = Encoder(5, **SMALL, fc_init_scale=1.0, precision="float64")
    enc64.flat_params[...] = enc32.flat_params  # the same (float32-representable) weights
    x = _images(rng, 2, 16, np.float64)
    y = enc32.forward(x)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, enc64.forward(x), rtol=1e-12)
    g = rng.normal(size=y.shape)
    grad_x = enc32.backward(g)
    assert grad_x.dtype == np.float64
    np.testing.assert_allclose(grad_x, enc64.backward(g), rtol=1e-10, atol=1e-15)
    assert enc32.grads["fc.weight"].dtype == np.float32


def test_encoder_learns_blob_position_and_mean_colour(rng):
    """Trained with Adam on small synthetic images, the loss falls by more than 10x."""
    def batch(gen, B, R=32):
        background = gen.uniform(0.1, 0.9, (B, 1, 1, 3))
        centre = gen.uniform(0.2, 0.8, (B, 2))
        yy, xx = (np.mgrid[0:R, 0:R] + 0.5) / R
        blob = np.exp(-((xx - centre[:, 0, None, None]) ** 2 + (yy - centre[:, 1, None, None]) ** 2) / (2 * 0.15 ** 2))
        img = background * (1 - blob[..., None]) + blob[..., None] * np.array([1.0, 0.9, 0.2])
        target = np.concatenate([img.mean(axis=(1, 2)) - 0.5, centre - 0.5], axis=1)
        return img.astype(np.float32), target.astype(np.float32)

    enc = Encoder(5, resolution=32, widths=(16, 32, 32, 64), stem_width=16, seed=0)
    opt = Adam(enc, lr=1e-3)
    x_eval, t_eval = batch(np.random.default_rng(99), 256)
    loss_before = float(((enc.forward(x_eval) - t_eval) ** 2).mean())
    gen = np.random.default_rng(10)
    for _ in range(300):
        x, t = batch(gen, 32)
        residual = enc.forward(x) - t
        enc.backward(2 * residual / residual.size, need_grad_x=False)
        opt.step()
    loss_after = float(((enc.forward(x_eval) - t_eval) ** 2).mean())
    assert loss_after * 10 < loss_before, (loss_before, loss_after)


# ---------------------------------------------------------------------------------------------
# Save and load

def test_save_load_round_trip(tmp_path, rng):
    enc = Encoder(5, **SMALL, seed=7)
    x = _images(rng, 2, 16)
    path = tmp_path / "enc.h5"
    enc.save(path)
    loaded = Encoder.load(path, n_outputs=5, resolution=16)
    assert loaded.settings == enc.settings
    np.testing.assert_array_equal(loaded.flat_params, enc.flat_params)
    np.testing.assert_array_equal(loaded.forward(x), enc.forward(x))
    other = Encoder(5, **SMALL, seed=8)
    other.load_weights(path)
    np.testing.assert_array_equal(other.flat_params, enc.flat_params)


def _fail_on_second_dataset(monkeypatch):
    """Makes h5py raise in the middle of a save: after one dataset has been written."""
    import h5py

    real = h5py.Group.create_dataset
    calls = []

    def create_dataset(self, *args, **kwargs):
        calls.append(args[0] if args else kwargs.get("name"))
        if len(calls) == 2:
            raise OSError("simulated: no space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", create_dataset)
    return calls


def test_failed_save_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "enc.h5"
    first = Encoder(5, **SMALL, seed=1)
    first.save(path)
    before = path.read_bytes()
    calls = _fail_on_second_dataset(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        Encoder(5, **SMALL, seed=2).save(path)
    assert len(calls) == 2  # the failure came in the middle of the write
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.h5"]
    np.testing.assert_array_equal(Encoder.load(path, n_outputs=5).flat_params, first.flat_params)


def test_save_replaces_an_earlier_file(tmp_path):
    path = tmp_path / "enc.h5"
    Encoder(5, **SMALL, seed=1).save(path)
    second = Encoder(5, **SMALL, seed=2)
    second.save(path)
    np.testing.assert_array_equal(Encoder.load(path, n_outputs=5).flat_params, second.flat_params)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.h5"]


def test_save_into_a_missing_directory_raises_naming_the_path(tmp_path):
    path = tmp_path / "runs" / "enc.h5"
    with pytest.raises(FileNotFoundError, match="enc.h5.*does not exist"):
        Encoder(5, **SMALL).save(path)
    assert not (tmp_path / "runs").exists()


def test_load_names_the_setting_that_differs(tmp_path):
    path = tmp_path / "enc.h5"
    Encoder(5, **SMALL).save(path)
    with pytest.raises(ValueError, match="n_outputs=5, expected n_outputs=6"):
        Encoder.load(path, n_outputs=6)
    with pytest.raises(ValueError, match="widths=\\(4, 8\\), but this encoder has widths=\\(4, 16\\)"):
        Encoder(5, resolution=16, widths=(4, 16), stem_width=4).load_weights(path)
    with pytest.raises(TypeError, match="unknown encoder settings"):
        Encoder.load(path, depth=3)


def test_load_rejects_files_that_are_not_encoders(tmp_path):
    import h5py

    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("a", data=np.zeros(3))
    with pytest.raises(ValueError, match="is not a fastface encoder file"):
        Encoder.load(path)
    text = tmp_path / "text.h5"
    text.write_text("hello")
    with pytest.raises(ValueError, match="is not a readable HDF5 file"):
        Encoder.load(text)


def test_load_rejects_weights_of_the_wrong_shape(tmp_path):
    import h5py

    path = tmp_path / "enc.h5"
    Encoder(5, **SMALL).save(path)
    with h5py.File(path, "a") as f:
        del f["params"]["fc.bias"]
        f["params"].create_dataset("fc.bias", data=np.zeros(4, np.float32))
    with pytest.raises(ValueError, match="fc.bias has shape \\(4,\\)"):
        Encoder.load(path)


# ---------------------------------------------------------------------------------------------
# Bad input

def test_encoder_rejects_bad_settings():
    with pytest.raises(ValueError, match="n_outputs"):
        Encoder(0)
    with pytest.raises(ValueError, match="multiple of patch"):
        Encoder(5, resolution=30)
    with pytest.raises(ValueError, match="precision"):
        Encoder(5, precision="int8")
    with pytest.raises(TypeError, match="widths"):
        Encoder(5, widths="wide")


def test_encoder_rejects_bad_input(rng):
    enc = Encoder(5, **SMALL)
    with pytest.raises(ValueError, match="x must have shape \\(B, 16, 16, 3\\)"):
        enc.forward(_images(rng, 2, 32))
    with pytest.raises(TypeError, match="x must be float32 or float64"):
        enc.forward(_images(rng, 2, 16).astype(np.float16))
    x = _images(rng, 2, 16)
    x[0, 1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="x holds 1 NaN"):
        enc.forward(x)
    with value_checks(False):
        enc.forward(x)  # the check is the only thing that reads values
    with pytest.raises(RuntimeError, match="backward needs a forward"):
        Encoder(5, **SMALL).backward(np.zeros((2, 5), np.float32))
    enc.forward(_images(rng, 2, 16))
    with pytest.raises(ValueError, match="grad_y must have shape"):
        enc.backward(np.zeros((3, 5), np.float32))
    with pytest.raises(TypeError, match="grad_y must be float32"):
        enc.backward(np.zeros((2, 5), np.float64))
    with pytest.raises(RuntimeError, match="capture needs the encoder on the GPU"):
        enc.capture(2)


# ---------------------------------------------------------------------------------------------
# GPU against CPU

def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def _bounds(tol, precision):
    """(forward bound, gradient bound) of a GPU precision against the CPU's float32."""
    if precision == "float32":
        return tol["nn_gpu_cpu_float32_rel"], tol["nn_gpu_cpu_float32_rel"]
    return tol["nn_reduced_precision_forward_rel"], tol["nn_reduced_precision_grad_rel"]


def _compare_gpu(cupy, rng, precision, settings, B, tol, conv_algorithm="im2col"):
    cpu = Encoder(7, **settings, fc_init_scale=1.0)
    gpu = Encoder(7, **settings, fc_init_scale=1.0, conv_algorithm=conv_algorithm).to("gpu", precision=precision)
    R = settings["resolution"]
    x = _images(rng, B, R)
    g = rng.normal(size=(B, 7)).astype(np.float32)
    y = cpu.forward(x)
    gx = cpu.backward(g)
    y_gpu = gpu.forward(cupy.asarray(x))
    gx_gpu = gpu.backward(cupy.asarray(g))
    assert y_gpu.dtype == np.float32 and gx_gpu.dtype == np.float32
    forward_bound, grad_bound = _bounds(tol, precision)
    assert _rel(y_gpu.get(), y) <= forward_bound, ("y", _rel(y_gpu.get(), y))
    assert _rel(gx_gpu.get(), gx) <= grad_bound, ("grad_x", _rel(gx_gpu.get(), gx))
    for k in cpu.grads:
        assert _rel(gpu.grads[k].get(), cpu.grads[k]) <= grad_bound, (k, _rel(gpu.grads[k].get(), cpu.grads[k]))


# widths multiples of 8 take the vector paths of the kernels; the odd ones take the scalar paths
GPU_SETTINGS = [dict(resolution=32, widths=(8, 16, 16, 32), stem_width=8),
                dict(resolution=32, widths=(6, 10), stem_width=5)]


@pytest.mark.parametrize("settings", GPU_SETTINGS)
def test_gpu_float32_forward_and_backward_match_cpu(cupy, rng, tol, settings):
    _compare_gpu(cupy, rng, "float32", settings, 3, tol)


@pytest.mark.parametrize("precision", ["tf32", "float16"])
@pytest.mark.parametrize("settings", GPU_SETTINGS)
def test_gpu_tf32_and_float16_keep_the_accuracy(cupy, rng, tol, precision, settings):
    _compare_gpu(cupy, rng, precision, settings, 3, tol)


@pytest.mark.parametrize("settings", [GPU_SETTINGS[0], dict(resolution=32, widths=(32, 64), stem_width=32)])
def test_gpu_float16_implicit_gemm_keeps_the_accuracy(cupy, rng, tol, settings):
    _compare_gpu(cupy, rng, "float16", settings, 3, tol, conv_algorithm="implicit")


@pytest.mark.parametrize("precision,algorithm", [("float32", "im2col"), ("tf32", "im2col"), ("float16", "im2col"),
                                                 ("float16", "implicit")])
def test_gpu_default_architecture_at_224_matches_cpu(cupy, rng, tol, precision, algorithm):
    """The full-size net: the accuracy of the TF32 and float16 modes where it is used."""
    _compare_gpu(cupy, rng, precision, dict(resolution=224), 2, tol, conv_algorithm=algorithm)


def test_gpu_training_step_matches_cpu(cupy, rng, tol):
    settings = GPU_SETTINGS[0]
    cpu = Encoder(7, **settings)
    gpu = Encoder(7, **settings).to("gpu")
    # eps = 1 makes the update about lr * m (linear in the gradient): with a small eps, Adam
    # turns a gradient that is ~0 into a step of +-lr whose sign rounding decides
    opt_cpu, opt_gpu = Adam(cpu, lr=1e-3, eps=1.0), Adam(gpu, lr=1e-3, eps=1.0)
    for _ in range(2):
        x = _images(rng, 4, 32)
        g = rng.normal(size=(4, 7)).astype(np.float32)
        cpu.forward(x)
        cpu.backward(g, need_grad_x=False)
        opt_cpu.step()
        gpu.forward(cupy.asarray(x))
        gpu.backward(cupy.asarray(g), need_grad_x=False)
        opt_gpu.step()
    assert _rel(gpu.flat_params.get(), cpu.flat_params) <= tol["nn_gpu_cpu_float32_rel"]


@pytest.mark.parametrize("precision,algorithm", [("float32", "im2col"), ("float16", "im2col"),
                                                 ("float16", "implicit")])
def test_gpu_graph_replays_equal_eager_calls(cupy, rng, precision, algorithm):
    settings = dict(resolution=32, widths=(32, 64), stem_width=16)
    eager = Encoder(7, **settings, fc_init_scale=1.0, conv_algorithm=algorithm).to("gpu", precision=precision)
    graphed = Encoder(7, **settings, fc_init_scale=1.0, conv_algorithm=algorithm).to("gpu", precision=precision)
    opt_eager, opt_graphed = Adam(eager, lr=1e-3), Adam(graphed, lr=1e-3)
    graph = graphed.capture(4, backward=True, optimizer=opt_graphed, need_grad_x=True)
    # the capture's warm-up ran a forward and backward but no optimizer step
    np.testing.assert_array_equal(graphed.flat_params.get(), eager.flat_params.get())
    for _ in range(2):
        x = cupy.asarray(_images(rng, 4, 32))
        g = cupy.asarray(rng.normal(size=(4, 7)).astype(np.float32))
        y = eager.forward(x)
        gx = eager.backward(g, need_grad_x=True)
        opt_eager.step()
        graph.x[...] = x
        graph.grad_y[...] = g
        graph.step()
        # the same kernels on the same data: equal up to cuBLAS's choice of algorithm (and
        # float16 roundings that follow from it)
        bound = 1e-6 if precision == "float32" else 1e-2
        assert _rel(graph.y.get(), y.get()) <= bound
        assert _rel(graph.grad_x.get(), gx.get()) <= (1e-6 if precision == "float32" else 0.15)
        assert _rel(graphed.flat_params.get(), eager.flat_params.get()) <= bound


@pytest.mark.parametrize("failure", ["raises", "illegal_during_capture"])
def test_gpu_failed_capture_leaves_the_stream_usable(cupy, rng, tol, monkeypatch, failure):
    """A capture that fails (an error inside the recorded step, or an operation that a capture
    forbids, which invalidates it) raises, ends the capture, and the GPU keeps working."""
    settings = dict(resolution=32, widths=(8, 16), stem_width=8)
    enc = Encoder(7, **settings).to("gpu")
    real_pool = encoder_module._pool_fwd
    calls = []

    def failing_pool(*args):
        calls.append(1)
        if len(calls) == 2:  # the first call is the warm-up, the second is being captured
            if failure == "raises":
                raise RuntimeError("injected failure")
            cupy.cuda.get_current_stream().synchronize()  # forbidden while capturing
        return real_pool(*args)

    monkeypatch.setattr(encoder_module, "_pool_fwd", failing_pool)
    with pytest.raises(Exception) as info:
        enc.capture(2)
    if failure == "raises":
        assert "injected failure" in str(info.value)
    monkeypatch.setattr(encoder_module, "_pool_fwd", real_pool)
    assert not cupy.cuda.get_current_stream().is_capturing()
    x = _images(rng, 2, 32)
    y = enc.forward(cupy.asarray(x))
    cupy.cuda.Device().synchronize()  # failed with cudaErrorStreamCaptureUnsupported before the fix
    assert _rel(y.get(), Encoder(7, **settings).forward(x)) <= tol["nn_gpu_cpu_float32_rel"]
    graph = enc.capture(2)  # and a capture after the failed one works
    graph.x[...] = cupy.asarray(x)
    assert _rel(graph.forward().get(), y.get()) <= 1e-6


def test_gpu_move_round_trip_keeps_the_weights(cupy):
    enc = Encoder(5, **SMALL)
    before = enc.flat_params.copy()
    enc.to("gpu")
    assert enc.device == "gpu" and enc.params["fc.bias"].__class__.__module__.startswith("cupy")
    enc.to("cpu")
    np.testing.assert_array_equal(enc.flat_params, before)


def test_gpu_encoder_rejects_host_arrays_and_float64(cupy, rng):
    enc = Encoder(5, **SMALL).to("gpu")
    with pytest.raises(TypeError, match="numpy array but"):
        enc.forward(_images(rng, 2, 16))
    with pytest.raises(TypeError, match="float32 only"):
        enc.forward(cupy.asarray(_images(rng, 2, 16, np.float64)))
    with pytest.raises(ValueError, match="CPU only"):
        enc.to("gpu", precision="float64")
