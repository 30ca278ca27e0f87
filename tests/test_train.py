"""The multi-level training pipeline: the code layout, the whole step's gradient, checkpoints, faults, resume."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import fastface
from fastface.autoencoder import CodeLayout, FaceAutoencoder
from fastface.checkpoint import load_checkpoint, save_checkpoint
from fastface.model.corrective import CorrectiveSpace
from fastface.nn import Adam, Encoder
from fastface.objective import LossWeights, MultiLevelObjective
from fastface.train import TrainSettings, train
from tests.gradcheck import numerical_gradient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 16


def _tiny(dtype=np.float64, seed=0):
    model = fastface.FaceModel.default(level="small").truncated(n_shape=4, n_expression=3, n_albedo=4)
    layout = CodeLayout(n_shape=4, n_expression=3, n_albedo=4, n_geometry=3, n_reflectance=2,
                        translation=(0.0, 0.0, -600.0))
    encoder = Encoder(n_outputs=layout.size, resolution=RES, widths=(4, 8), stem_width=4, seed=seed,
                      fc_init_scale=0.3, precision="float64" if dtype == np.float64 else "float32")
    correctives = CorrectiveSpace(model.n_vertices, 3, 2, seed=seed, init_std=(0.5, 0.02), dtype=dtype)
    ae = FaceAutoencoder(model, encoder, correctives, layout, (RES, RES), focal=30.0)
    return ae


def _images(rng, batch, dtype):
    return rng.uniform(0.1, 0.9, (batch, RES, RES, 3)).astype(dtype)


def test_an_untrained_encoder_predicts_the_mean_face_frontal_centred_under_ambient_light():
    layout = CodeLayout(translation=(0.0, 0.0, -650.0))
    model = fastface.FaceModel.default(level="small")
    encoder = Encoder(n_outputs=layout.size, resolution=32, widths=(8, 16))
    ae = FaceAutoencoder(model, encoder, CorrectiveSpace(model.n_vertices), layout, (32, 32), 80.0)
    params, z_geo, z_ref = ae.decode(encoder.forward(np.full((2, 32, 32, 3), 0.5, np.float32)))
    for coeffs in (params.shape, params.expression, params.albedo, params.angles, z_geo, z_ref):
        assert np.abs(coeffs).max() < 0.05
    np.testing.assert_allclose(params.translation, [[0, 0, -650.0]] * 2, atol=1.0)
    np.testing.assert_allclose(params.sh, fastface.uniform_light(2), atol=0.03)
    assert layout.size == 257 + 64 + 64


def test_layout_refuses_a_model_or_encoder_of_other_sizes():
    model = fastface.FaceModel.default(level="small")
    layout = CodeLayout(n_shape=80, n_expression=64, n_albedo=80)
    with pytest.raises(ValueError, match="outputs"):
        FaceAutoencoder(model, Encoder(n_outputs=10, resolution=16, widths=(4,)), CorrectiveSpace(model.n_vertices),
                        layout, (16, 16), 30.0)
    with pytest.raises(ValueError, match="truncate"):
        FaceAutoencoder(model.truncated(n_shape=5), Encoder(n_outputs=layout.size, resolution=16, widths=(4,)),
                        CorrectiveSpace(model.n_vertices), layout, (16, 16), 30.0)


def _step_loss(ae, objective, images, landmarks):
    out = ae.forward(images, final=True)
    terms, _ = objective(out, images, landmarks, final=True)
    return sum(float(v.mean()) for v in terms.values())


@pytest.mark.parametrize("which, antialias", [("encoder", False), ("correctives", False), ("encoder", True),
                                             ("correctives", True)])
def test_the_whole_training_step_gradient_matches_central_differences(which, antialias):
    """Encoder -> code -> both levels rendered (with the outline antialiased into the input, or not) -> every
    loss and regularizer, against float64 differences."""
    rng = np.random.default_rng(0)
    ae = _tiny(np.float64)
    ae.antialias = antialias
    # Reflectance constancy is a regularizer of the corrective level: its gradient goes to the
    # reflectance offsets only, the base albedo (in the final albedo and as the chromaticity guide)
    # held constant. The encoder's finite differences would see through that stop-gradient, so the
    # term is checked on the corrective space's weights, which the base albedo does not depend on.
    weights = LossWeights(photometric=1.0, landmarks=5.0, prior_shape=0.1, prior_expression=0.1, prior_albedo=0.1,
                          geometry_smoothness=0.1, geometry_magnitude=0.1, geometry_symmetry=0.1,
                          reflectance_constancy=0.5 if which == "correctives" else 0.0, reflectance_magnitude=0.5,
                          reflectance_symmetry=0.5)
    objective = MultiLevelObjective(ae.model, (RES, RES), weights)
    images = _images(rng, 2, np.float64)
    landmarks = rng.uniform(4, 12, (2, 68, 2))
    out = ae.forward(images, final=True)
    assert (out.base.composited is not None) == (out.final.composited is not None) == antialias
    terms, grads = objective(out, images, landmarks, final=True)
    assert set(terms) == set(fastface.objective.TERM_NAMES) - ({"reflectance_constancy"} if which == "encoder" else set())
    ae.backward(out, grads)
    owner = ae.encoder if which == "encoder" else ae.correctives
    analytic = owner.flat_grads.copy()
    flat = owner.flat_params
    candidates = np.flatnonzero(np.abs(analytic) > 1e-6 * np.abs(analytic).max())
    idx = rng.choice(candidates, 10, replace=False)

    def f(x):
        saved = flat.copy()
        flat[...] = x
        try:
            return np.array([_step_loss(ae, objective, images, landmarks)])
        finally:
            flat[...] = saved

    # The corrective gradients are ~1e-8 (each basis entry moves one vertex of a few pixels): a larger
    # step keeps the differences' rounding (1e-16 / eps of a loss of order 1) far below them.
    numeric = numerical_gradient(f, flat.copy(), np.ones(1), eps=1e-6 if which == "encoder" else 1e-4, indices=idx)
    np.testing.assert_allclose(analytic[idx], numeric, rtol=1e-4, atol=1e-4 * np.abs(numeric).max())
    assert not np.allclose(-analytic[idx], numeric, rtol=1e-4)  # negative control


def test_a_step_evaluates_the_morphable_model_once_forward_and_once_backward(monkeypatch):
    """Both levels share the model's evaluation and its backward (linear: the levels' gradients are added
    first); the step's gradient check above shows the sums are right, this that the GEMMs run once."""
    ae = _tiny(np.float32)
    calls = {"evaluate": 0, "evaluate_backward": 0}
    for name in calls:
        original = getattr(type(ae.model), name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(type(ae.model), name, counted)
    rng = np.random.default_rng(0)
    images = _images(rng, 2, np.float32)
    objective = MultiLevelObjective(ae.model, (RES, RES))
    out = ae.forward(images, final=True)
    _, grads = objective(out, images, rng.uniform(2, RES - 2, (2, 68, 2)).astype(np.float32), final=True)
    ae.backward(out, grads)
    assert calls == {"evaluate": 1, "evaluate_backward": 1}


def test_the_loops_prefetched_draws_give_the_same_batches():
    """train() draws the next batch's faces on the host while the GPU runs a step (_Data.prefetch): the
    batches must be the ones of an uninterrupted, unprefetched run, bit for bit."""
    from fastface.train import _Data  # noqa: PLC0415
    settings = _settings()
    ae = _tiny(np.float32)
    plain, ahead = (_Data(settings, ae.model, 30.0, (0.0, 0.0, -600.0)) for _ in range(2))
    ahead.prefetch(5)  # a draw for another step is not used for step 3
    for step in (3, 4, 5):
        if step > 3:
            ahead.prefetch(step)
        for want, got in zip(plain(step), ahead(step)):
            np.testing.assert_array_equal(got, want)
    assert ahead._drawn is None  # used once, then dropped


def test_checkpoint_round_trip_and_refusals(tmp_path):
    ae = _tiny(np.float32)
    optimizers = {"encoder": Adam(ae.encoder), "correctives": Adam(ae.correctives)}
    ae.encoder.flat_grads[...] = 0.01
    optimizers["encoder"].step()
    path = tmp_path / "checkpoint.h5"
    save_checkpoint(path, 7, {"level": "small"}, ae.encoder, ae.correctives, optimizers)
    ck = load_checkpoint(path)
    assert ck.step == 7 and ck.settings == {"level": "small"}
    np.testing.assert_array_equal(ck.encoder().flat_params, ae.encoder.flat_params)
    np.testing.assert_array_equal(ck.correctives().flat_params, ae.correctives.flat_params)
    fresh = Adam(ae.encoder)
    ck.restore_optimizer("encoder", fresh)
    np.testing.assert_array_equal(fresh.m[0], optimizers["encoder"].m[0])
    assert fresh.steps == 1
    with pytest.raises(ValueError, match="optimizer"):
        ck.restore_optimizer("encoder", Adam(Encoder(n_outputs=3, resolution=16, widths=(4,))))
    import h5py
    with h5py.File(path, "r+") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(ValueError, match="format version 99"):
        load_checkpoint(path)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="junk.h5"):
        load_checkpoint(tmp_path / "junk.h5")
    with pytest.raises(FileNotFoundError, match="nothing.h5"):
        load_checkpoint(tmp_path / "nothing.h5")


def _settings(**kw):
    base = dict(level="small", resolution=24, batch=2, steps=12, checkpoint_every=4, preview_every=0,
                n_geometry=4, n_reflectance=4, widths=(4, 8), base_fraction=0.25)
    base.update(kw)
    return TrainSettings(**base)


def test_a_non_finite_step_is_skipped_and_leaves_the_weights_untouched(tmp_path, monkeypatch):
    from fastface import objective as objective_module
    real = objective_module.MultiLevelObjective.__call__
    calls = {"n": 0}

    def poisoned(self, out, images, landmarks, final=True):
        terms, grads = real(self, out, images, landmarks, final)
        calls["n"] += 1
        if calls["n"] == 3:
            terms["photometric_base"] = terms["photometric_base"] * np.nan
        return terms, grads

    monkeypatch.setattr(objective_module.MultiLevelObjective, "__call__", poisoned)
    changed = {}  # objective call -> for each Adam update then, whether it changed the weights or moments
    real_update = Adam.update

    def update(self, gate=None):
        before = [self._params[0].copy(), self.m[0].copy(), self.v[0].copy()]
        result = real_update(self, gate)
        after = [self._params[0], self.m[0], self.v[0]]
        changed.setdefault(calls["n"], []).append(any(not np.array_equal(a, b) for a, b in zip(before, after)))
        return result

    monkeypatch.setattr(Adam, "update", update)
    train(_settings(steps=4, checkpoint_every=4), tmp_path, progress=False)
    # The poisoned step is gated on the device (no weight, no moment changes); the others update.
    assert changed[3] and not any(changed[3]) and all(changed[2]) and all(changed[4])
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[3].split(",")[-1] == "1"  # step 3 is logged as skipped


def test_train_refuses_to_overwrite_a_run_without_resume(tmp_path):
    train(_settings(steps=2), tmp_path, progress=False)
    with pytest.raises(FileExistsError, match="--resume"):
        train(_settings(steps=2), tmp_path, progress=False)


def _weights(path):
    ck = load_checkpoint(path)
    return ck.step, ck.encoder_params, ck.correctives().flat_params, ck.optimizers["encoder"]["m"]


def test_kill_9_then_resume_loses_no_checkpoint_and_continues_exactly(tmp_path):
    settings = _settings(steps=24, checkpoint_every=4)
    straight = tmp_path / "straight"
    train(settings, straight, progress=False)
    killed = tmp_path / "killed"
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from fastface.train import TrainSettings, train; "
            f"train(TrainSettings(**{dataclasses.asdict(settings)!r}), {str(killed)!r}, progress=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpt = killed / "checkpoint.h5"
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if ckpt.exists() and load_checkpoint(ckpt).step >= 8:
                break
            if proc.poll() is not None:
                pytest.fail(f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    step_at_kill = load_checkpoint(ckpt).step  # readable: the kill cannot have left half a file
    assert 8 <= step_at_kill < 24
    assert not [p for p in os.listdir(killed) if p.startswith(".") or p.endswith(".tmp")], os.listdir(killed)
    train(settings, killed, resume=True, progress=False)
    a, b = _weights(straight / "checkpoint.h5"), _weights(ckpt)
    assert a[0] == b[0] == 24
    for x, y in zip(a[1:], b[1:]):
        np.testing.assert_array_equal(x, y)
    steps = [int(r.split(",")[0]) for r in (killed / "log.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 25))


def test_train_then_evaluate_gives_finite_numbers_for_both_levels(tmp_path):
    from fastface.evaluate import evaluate
    path = train(_settings(steps=6, preview_every=6), tmp_path, progress=False)
    assert (tmp_path / "preview_000006.png").exists()
    result = evaluate(path, n=4, progress=False)
    for key in ("geometric_error_mm_base", "geometric_error_mm_final", "photometric_error_base",
                "photometric_error_final", "landmark_error_px_base", "landmark_error_px_final"):
        assert np.isfinite(result[key]) and result[key] >= 0
    rec = fastface.Reconstructor(path)
    out = rec(np.full((1, 24, 24, 3), 0.5, np.float32))
    assert out.vertices_final.shape == (1, rec.model.n_vertices, 3)
    assert out.landmarks.shape == (1, 68, 2)
    assert out.render("final").image.shape == (1, 24, 24, 3)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_gpu_step_equals_cpu_step(cupy):
    """One multi-level step on the GPU against the same step on the CPU: every term, both weight gradients."""
    from fastface.data.synthetic import TRAIN_SEEDS, SyntheticFaces
    from fastface.objective import MultiLevelObjective
    from fastface.train import build
    settings = _settings(resolution=32, batch=4, precision="float32")  # the same arithmetic as the CPU's
    results = {}
    for device in ("cpu", "gpu"):
        settings.device = device
        ae, objective, _ = build(settings)
        faces = SyntheticFaces(fastface.FaceModel.default(level="small"), resolution=(32, 32))
        data = faces.batch([TRAIN_SEEDS[i] for i in range(4)])
        xp = np if device == "cpu" else cupy
        images, landmarks = xp.asarray(data.images), xp.asarray(data.landmarks)
        with fastface.value_checks("sync"):
            out = ae.forward(images, final=True)
            terms, grads = objective(out, images, landmarks, final=True)
            ae.backward(out, grads)
        host = lambda a: a.get() if hasattr(a, "get") else a  # noqa: E731
        results[device] = ({k: host(v) for k, v in terms.items()}, host(ae.encoder.flat_grads),
                           host(ae.correctives.flat_grads), host(out.final.image))
        assert isinstance(objective, MultiLevelObjective)
    (terms_c, enc_c, cor_c, img_c), (terms_g, enc_g, cor_g, img_g) = results["cpu"], results["gpu"]
    for k in terms_c:
        np.testing.assert_allclose(terms_g[k], terms_c[k], rtol=2e-3, atol=1e-7, err_msg=k)
    assert _rel(img_g, img_c) < 1e-3
    assert _rel(enc_g, enc_c) < 2e-2
    assert _rel(cor_g, cor_c) < 2e-2


def test_ctrl_c_writes_a_checkpoint_at_the_step_reached_and_exits_130(tmp_path):
    """The command line's Ctrl-C (SIGINT): the run stops with a checkpoint of the last finished step."""
    out = tmp_path / "run"
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); from fastface import train as t; "
            f"t.DEFAULTS['cpu'].update(resolution=24, batch=2, steps=100000, checkpoint_every=100000, "
            f"preview_every=0); sys.exit(t.run(t.add_parser(__import__('argparse').ArgumentParser()"
            f".add_subparsers()).parse_args(['--out', {str(out)!r}, '--no-progress'])))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    log = out / "log.csv"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) > 5):
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    steps = [int(r.split(",")[0]) for r in log.read_text().splitlines()[1:]]
    assert load_checkpoint(out / "checkpoint.h5").step == steps[-1] >= 5


def test_a_non_finite_gradient_is_skipped_logged_and_changes_no_weight(tmp_path, monkeypatch):
    from fastface import autoencoder as autoencoder_module
    real = autoencoder_module.FaceAutoencoder.backward
    calls, weights = {"n": 0}, {}

    def poisoned(self, out, grads):
        code_grad = real(self, out, grads)
        calls["n"] += 1
        weights[calls["n"]] = self.encoder.flat_params.copy()
        if calls["n"] == 2:
            self.encoder.flat_grads[7] = np.inf
        return code_grad

    monkeypatch.setattr(autoencoder_module.FaceAutoencoder, "backward", poisoned)
    train(_settings(steps=3, checkpoint_every=3, base_fraction=1.0), tmp_path, progress=False)
    np.testing.assert_array_equal(weights[2], weights[3])  # step 2 changed nothing
    assert not np.array_equal(weights[1], weights[2])        # a finite step does change them
    skipped = [r.split(",")[-1] for r in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    assert skipped == ["0", "1", "0"]


@pytest.mark.parametrize("flags, message", [
    (["--precision", "float16"], "--precision applies to --device gpu"),
    (["--resolution", "30"], "--resolution must be a multiple of 4"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--data", "/nonexistent/photos"], "no such folder"),
])
def test_train_command_line_refuses_bad_flags_before_doing_anything(tmp_path, flags, message):
    from fastface.__main__ import main
    with pytest.raises(SystemExit, match=message):
        main(["train", "--device", "cpu", "--out", str(tmp_path / "run"), *flags])
    assert not (tmp_path / "run").exists()
