"""The corrective space (linear decoders of z_geo, z_ref) and the corrective regularizers.

Forward against float64 references written the obvious way, every backward against central differences
(tests/gradcheck.py, with its negative control), save/load, Adam, bad input, and GPU against CPU where a
GPU is present (the fake-CuPy launch checks and the host emulation live in tests/test_gpu_*.py).
"""
import h5py
import numpy as np
import pytest

import fastface
from fastface.model import corrective
from fastface.model.corrective import DEFAULT_GEOMETRY, DEFAULT_REFLECTANCE, CorrectiveSpace
from tests.gradcheck import assert_gradient_matches


# ---------------------------------------------------------------------------------------------
# CorrectiveSpace

def _codes(rng, space, batch, dtype=None):
    dtype = dtype or space.dtype
    return (rng.normal(size=(batch, space.n_geometry)).astype(dtype),
            rng.normal(size=(batch, space.n_reflectance)).astype(dtype))


def test_defaults_and_layout_share_one_flat_buffer():
    space = CorrectiveSpace(100)
    assert (space.n_geometry, space.n_reflectance) == (DEFAULT_GEOMETRY, DEFAULT_REFLECTANCE)
    assert space.geometry_basis.shape == (DEFAULT_GEOMETRY, 300)
    assert space.reflectance_basis.shape == (DEFAULT_REFLECTANCE, 300)
    assert space.dtype == np.float32 and space.device == "cpu"
    for name in ("geometry_basis", "reflectance_basis"):
        assert np.shares_memory(space.params[name], space.flat_params)
        assert np.shares_memory(space.grads[name], space.flat_grads)
        assert space.params[name].flags.c_contiguous
    assert not np.shares_memory(space.geometry_basis, space.reflectance_basis)
    assert space.flat_params.shape == space.flat_grads.shape
    assert space.n_parameters == (DEFAULT_GEOMETRY + DEFAULT_REFLECTANCE) * 300


def test_initial_bases_are_small_random_and_seeded():
    a, b, c = CorrectiveSpace(200, seed=3), CorrectiveSpace(200, seed=3), CorrectiveSpace(200, seed=4)
    np.testing.assert_array_equal(a.flat_params, b.flat_params)
    assert not np.array_equal(a.flat_params, c.flat_params)
    g_std, r_std = corrective.DEFAULT_INIT_STD
    assert abs(a.geometry_basis.std() / g_std - 1) < 0.05
    assert abs(a.reflectance_basis.std() / r_std - 1) < 0.05
    one = CorrectiveSpace(50, init_std=0.5)
    assert abs(one.geometry_basis.std() - 0.5) < 0.05 and abs(one.reflectance_basis.std() - 0.5) < 0.05


def test_evaluate_matches_a_float64_reference(rng, tol):
    space = CorrectiveSpace(57, 5, 7, seed=1, init_std=(0.3, 0.01))
    z_geo, z_ref = _codes(rng, space, 4)
    geometry, reflectance = space.evaluate(z_geo, z_ref)
    assert geometry.shape == reflectance.shape == (4, 57, 3)
    assert geometry.dtype == reflectance.dtype == np.float32
    for z, basis, out in ((z_geo, space.geometry_basis, geometry), (z_ref, space.reflectance_basis, reflectance)):
        zb, bb = z.astype(np.float64), basis.astype(np.float64)
        ref = np.zeros((4, 57, 3))
        for b in range(4):
            for k in range(z.shape[1]):
                ref[b] += zb[b, k] * bb[k].reshape(57, 3)
        l1 = np.abs(zb) @ np.abs(bb)  # the sum of the terms' magnitudes (the error scale of a float32 sum)
        assert np.all(np.abs(out.reshape(4, -1) - ref.reshape(4, -1)) <= tol["gemm_l1_rtol"] * l1 + 1e-30)


def test_evaluate_accepts_non_contiguous_codes(rng):
    space = CorrectiveSpace(20, 3, 4)
    z_geo, z_ref = _codes(rng, space, 3)
    wide = np.zeros((3, 2 * space.n_geometry), np.float32)
    wide[:, ::2] = z_geo
    a = space.evaluate(wide[:, ::2], z_ref)
    b = space.evaluate(z_geo, z_ref)
    np.testing.assert_array_equal(a[0], b[0])


def test_backward_matches_central_differences_for_codes_and_bases(rng, tol):
    space = CorrectiveSpace(9, 3, 4, seed=2, init_std=1.0, dtype=np.float64)
    z_geo, z_ref = _codes(rng, space, 2)
    grad_g, grad_r = rng.normal(size=(2, 2, 9, 3))
    grad_z_geo, grad_z_ref = space.backward(z_geo, z_ref, grad_g, grad_r)
    basis_grads = {k: v.copy() for k, v in space.grads.items()}

    def both(zg, zr):
        return np.concatenate([a.reshape(-1) for a in space.evaluate(zg, zr)])

    grad_out = np.concatenate([grad_g.reshape(-1), grad_r.reshape(-1)])
    assert_gradient_matches(lambda z: both(z, z_ref), z_geo, grad_out, grad_z_geo, tol)
    assert_gradient_matches(lambda z: both(z_geo, z), z_ref, grad_out, grad_z_ref, tol)
    for name in ("geometry_basis", "reflectance_basis"):
        original = space.params[name].copy()

        def f(basis, name=name):
            space.params[name][...] = basis
            return both(z_geo, z_ref)

        assert_gradient_matches(f, original, grad_out, basis_grads[name], tol)
        space.params[name][...] = original


def test_backward_overwrites_the_gradients_and_takes_none_as_zero(rng):
    space = CorrectiveSpace(8, 2, 3, dtype=np.float64)
    z_geo, z_ref = _codes(rng, space, 2)
    g = rng.normal(size=(2, 8, 3))
    space.backward(z_geo, z_ref, g, g)
    first = space.flat_grads.copy()
    space.backward(z_geo, z_ref, g, g)
    np.testing.assert_array_equal(space.flat_grads, first)  # overwritten, not accumulated
    grad_z_geo, grad_z_ref = space.backward(z_geo, z_ref, None, g)
    assert not grad_z_geo.any() and not space.grads["geometry_basis"].any()
    np.testing.assert_array_equal(space.grads["reflectance_basis"], first[space._layout["reflectance_basis"][0]:][
        :space.reflectance_basis.size].reshape(space.reflectance_basis.shape))
    grad_z_geo, grad_z_ref = space.backward(z_geo, z_ref, None, None)
    assert not grad_z_geo.any() and not grad_z_ref.any() and not space.flat_grads.any()


def test_adam_over_a_corrective_space_takes_a_step(rng):
    space = CorrectiveSpace(30, 4, 5, init_std=1.0)  # entries far above the step: the loss must fall
    opt = fastface.nn.Adam(space, lr=1e-2)
    before = space.flat_params.copy()
    z_geo, z_ref = _codes(rng, space, 3)
    geometry, reflectance = space.evaluate(z_geo, z_ref)
    space.backward(z_geo, z_ref, geometry, reflectance)  # the gradient of 0.5 ||offsets||^2
    opt.step()
    moved = space.flat_params - before
    n_g, n_r = space.geometry_basis.size, space.reflectance_basis.size
    offset_r = space._layout["reflectance_basis"][0]
    assert np.all(np.abs(moved[:n_g]) > 0) and np.all(np.abs(moved[offset_r:offset_r + n_r]) > 0)
    # The first Adam step moves each entry by lr against the sign of its gradient.
    np.testing.assert_allclose(moved[:n_g], -1e-2 * np.sign(space.flat_grads[:n_g]), rtol=1e-3)
    after = space.evaluate(z_geo, z_ref)
    assert np.sum(after[0] ** 2) + np.sum(after[1] ** 2) < np.sum(geometry ** 2) + np.sum(reflectance ** 2)


def test_save_and_load_roundtrip(tmp_path, rng):
    space = CorrectiveSpace(40, 3, 6, seed=5, init_std=(0.2, 0.02))
    with h5py.File(tmp_path / "c.h5", "w") as f:
        space.save(f.create_group("correctives"))
        space.save(f["correctives"])  # saving again over the same group replaces the datasets
    with h5py.File(tmp_path / "c.h5", "r") as f:
        loaded = CorrectiveSpace.load(f["correctives"], n_vertices=40, n_geometry=3)
    np.testing.assert_array_equal(loaded.flat_params, space.flat_params)
    assert (loaded.n_vertices, loaded.n_geometry, loaded.n_reflectance, loaded.seed) == (40, 3, 6, 5)
    assert loaded.init_std == (0.2, 0.02)
    z = _codes(rng, space, 2)
    np.testing.assert_array_equal(loaded.evaluate(*z)[0], space.evaluate(*z)[0])


def _saved(tmp_path, **changes):
    path = tmp_path / "c.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("correctives")
        CorrectiveSpace(10, 2, 3).save(g)
        for key, value in changes.items():
            if key in ("geometry_basis", "reflectance_basis"):
                del g[key]
                g.create_dataset(key, data=value)
            else:
                g.attrs[key] = value
    return path


@pytest.mark.parametrize("changes, expected, message", [
    ({"format_version": 2}, {}, "format version 2"),
    ({"kind": "something else"}, {}, "holds no corrective space"),
    ({"n_vertices": 11}, {}, "reflectance_basis has shape|geometry_basis has shape"),
    ({"geometry_basis": np.zeros((2, 33), np.float32)}, {}, "geometry_basis has shape"),
    ({"reflectance_basis": np.full((3, 30), np.nan, np.float32)}, {}, "NaN"),
    ({}, {"n_geometry": 4}, "n_geometry=2, expected n_geometry=4"),
    ({}, {"n_vertices": 12}, "n_vertices=10, expected n_vertices=12"),
])
def test_load_refuses_other_versions_and_shapes_naming_the_group(tmp_path, changes, expected, message):
    path = _saved(tmp_path, **changes)
    with h5py.File(path, "r") as f, pytest.raises(ValueError, match=message) as info:
        CorrectiveSpace.load(f["correctives"], **expected)
    assert "c.h5" in str(info.value) and "/correctives" in str(info.value)


def test_load_of_a_group_without_a_space_names_it(tmp_path):
    with h5py.File(tmp_path / "c.h5", "w") as f:
        with pytest.raises(ValueError, match=r"c\.h5:/empty holds no corrective space"):
            CorrectiveSpace.load(f.create_group("empty"))
        with pytest.raises(TypeError, match="unknown CorrectiveSpace sizes"):
            CorrectiveSpace.load(f["empty"], n_vertexes=3)


def test_to_cpu_keeps_values_and_resets_gradients(rng):
    space = CorrectiveSpace(12, 2, 2)
    z = _codes(rng, space, 1)
    space.backward(*z, *space.evaluate(*z))
    values = space.flat_params.copy()
    assert space.to("cpu") is space
    np.testing.assert_array_equal(space.flat_params, values)
    assert not space.flat_grads.any()
    with pytest.raises(ValueError, match="device must be 'cpu' or 'gpu'"):
        space.to("tpu")


@pytest.mark.parametrize("args, kwargs, error, message", [
    ((0,), {}, ValueError, "n_vertices must be an integer >= 1"),
    ((10, 0), {}, ValueError, "n_geometry must be an integer >= 1"),
    ((10, 4, 2.5), {}, ValueError, "n_reflectance must be an integer >= 1"),
    ((10,), {"init_std": -1.0}, ValueError, "init_std must be"),
    ((10,), {"init_std": (1.0, 2.0, 3.0)}, ValueError, "init_std must be"),
    ((10,), {"init_std": "big"}, TypeError, "init_std must be"),
    ((10,), {"seed": 1.5}, TypeError, "seed must be an integer"),
    ((10,), {"dtype": np.float16}, TypeError, "dtype must be float32 or float64"),
])
def test_bad_constructor_arguments_are_named(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        CorrectiveSpace(*args, **kwargs)


def test_bad_codes_and_gradients_are_named(rng):
    space = CorrectiveSpace(10, 3, 4)
    z_geo, z_ref = _codes(rng, space, 2)
    with pytest.raises(ValueError, match=r"z_geo must have shape \(B, 3\); got float32 \(2, 4\)"):
        space.evaluate(z_ref, z_ref)
    with pytest.raises(TypeError, match="z_ref must be float32 like the corrective bases"):
        space.evaluate(z_geo, z_ref.astype(np.float64))
    with pytest.raises(ValueError, match="batch sizes differ"):
        space.evaluate(z_geo, z_ref[:1])
    bad = z_geo.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="z_geo holds 1 NaN"):
        space.evaluate(bad, z_ref)
    with pytest.raises(TypeError, match="z_geo must be a numpy or cupy array"):
        space.evaluate([[0.0] * 3], z_ref)
    with pytest.raises(ValueError, match=r"grad_reflectance must have shape \(B, 10, 3\)"):
        space.backward(z_geo, z_ref, None, np.zeros((2, 9, 3), np.float32))
    with pytest.raises(ValueError, match="batch sizes differ"):
        space.backward(z_geo, z_ref, np.zeros((3, 10, 3), np.float32), None)


def _space_gpu_cpu(cp, rng):
    space = CorrectiveSpace(33, 4, 6, seed=3, init_std=(0.5, 0.05))
    z_geo, z_ref = _codes(rng, space, 3)
    g_geo, g_ref = rng.normal(size=(2, 3, 33, 3)).astype(np.float32)
    cpu_out = space.evaluate(z_geo, z_ref)
    cpu_grad_z = space.backward(z_geo, z_ref, g_geo, g_ref)
    cpu_grads = space.flat_grads.copy()
    space.to("gpu")
    assert space.device == "gpu"
    gpu_out = space.evaluate(cp.asarray(z_geo), cp.asarray(z_ref))
    gpu_grad_z = space.backward(cp.asarray(z_geo), cp.asarray(z_ref), cp.asarray(g_geo), cp.asarray(g_ref))
    pairs = list(zip(gpu_out, cpu_out)) + list(zip(gpu_grad_z, cpu_grad_z)) + [(space.flat_grads, cpu_grads)]
    space.to("cpu")
    return pairs


def test_space_gpu_path_on_the_emulated_gpu_matches_the_cpu(monkeypatch, rng, tol):
    """The GPU branch (cupy arrays, cuBLAS through the fake cuBLAS of tests/fake_cupy.py) against the CPU."""
    from tests.fake_cupy import install  # noqa: PLC0415

    gpu = install(monkeypatch, compute=True)
    for a, b in _space_gpu_cpu(gpu.cupy, rng):
        np.testing.assert_allclose(a.get(), b, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])


def test_space_gpu_matches_cpu(cupy, rng, tol):
    for a, b in _space_gpu_cpu(cupy, rng):
        np.testing.assert_allclose(a.get(), b, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
