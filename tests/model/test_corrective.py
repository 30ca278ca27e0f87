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


# ---------------------------------------------------------------------------------------------
# The mesh and the regularizers

from fastface.model.corrective import (  # noqa: E402
    CHROMA_EPS, REFLECTANCE_EPS, corrective_mesh, magnitude_loss, magnitude_loss_backward,
    reflectance_constancy_loss, reflectance_constancy_loss_backward, smoothness_loss, smoothness_loss_backward,
    symmetry_loss, symmetry_loss_backward)


def _grid_model(n=5, symmetry="mirror"):
    """A FaceModel on an n x n grid over [-1, 1]^2 (z = 0), two triangles a cell with the diagonal from
    (r, c) to (r + 1, c + 1): every interior vertex has 6 neighbours placed point-symmetrically around it.
    symmetry: "mirror" (column c <-> n - 1 - c), "random" (a map that is not an involution) or None."""
    from bench.workloads import grid_mesh  # noqa: PLC0415

    xy, tri = grid_mesh(n)
    V = n * n
    mean = np.concatenate([xy, np.zeros((V, 1))], axis=1)
    if symmetry == "mirror":
        r, c = np.divmod(np.arange(V), n)
        sym = r * n + (n - 1 - c)
    elif symmetry == "random":
        sym = np.random.default_rng(5).integers(0, V, V)
    else:
        sym = None
    return fastface.FaceModel(mean, tri, np.ones((1, 3 * V)), np.ones(1), symmetry=sym), xy


def _edges_from_triangles(tri):
    edges = set()
    for t in tri:
        for a, b in ((t[0], t[1]), (t[1], t[2]), (t[2], t[0])):
            edges.add((min(a, b), max(a, b)))
    return sorted(edges)


def _neighbour_sets(tri, V):
    nbrs = [set() for _ in range(V)]
    for i, j in _edges_from_triangles(tri):
        nbrs[i].add(j)
        nbrs[j].add(i)
    return nbrs


def test_corrective_mesh_holds_the_models_edges_laplacian_and_inverse_symmetry():
    model, _ = _grid_model(6, symmetry="random")
    mesh = corrective_mesh(model)
    V = model.n_vertices
    assert mesh.n_vertices == V and mesh.n_edges == len(model.edges) and mesh.device == "cpu"
    np.testing.assert_array_equal(mesh.edges, model.edges)
    for name in ("edges", "neighbour_offsets", "neighbours", "symmetry", "mirror_offsets", "mirrored_from"):
        assert getattr(mesh, name).dtype == np.int32 and not getattr(mesh, name).flags.writeable
    laplacian = np.zeros((V, V))
    for v in range(V):
        js = mesh.neighbours[mesh.neighbour_offsets[v]:mesh.neighbour_offsets[v + 1]]
        assert list(js) == sorted(_neighbour_sets(model.triangles, V)[v])
        laplacian[v, v] = len(js)
        laplacian[v, js] -= 1
    np.testing.assert_array_equal(laplacian, model.laplacian().toarray())
    for v in range(V):
        us = mesh.mirrored_from[mesh.mirror_offsets[v]:mesh.mirror_offsets[v + 1]]
        assert list(us) == [u for u in range(V) if model.symmetry[u] == v]


def test_corrective_mesh_is_cached_per_model_and_triangle_array():
    model, _ = _grid_model(4)
    mesh = corrective_mesh(model)
    assert corrective_mesh(model) is mesh
    model.triangles = model.triangles[::-1].copy()
    again = corrective_mesh(model)
    assert again is not mesh and corrective_mesh(model) is again
    model.symmetry = None
    assert corrective_mesh(model).symmetry is None
    with pytest.raises(TypeError, match="model must be a FaceModel"):
        corrective_mesh("model")


def test_corrective_mesh_leaves_the_models_arrays_writeable():
    model, _ = _grid_model(4)
    corrective_mesh(model)
    assert model.symmetry.flags.writeable and model.triangles.flags.writeable


def _field(rng, B, V, dtype=np.float64):
    return rng.normal(size=(B, V, 3)).astype(dtype)


def test_smoothness_matches_the_laplacian_of_the_default_model(rng, tol):
    model = fastface.FaceModel.default(level="small")
    mesh = corrective_mesh(model)
    offsets = _field(rng, 3, model.n_vertices, np.float32)
    L = model.laplacian().astype(np.float64)
    ref = [np.sum((L @ offsets[b].astype(np.float64)) ** 2) / model.n_vertices for b in range(3)]
    out = smoothness_loss(offsets, mesh)
    assert out.dtype == np.float32 and out.shape == (3,)
    np.testing.assert_allclose(out, ref, rtol=tol["gpu_cpu_rtol"])
    out64 = smoothness_loss(offsets.astype(np.float64), mesh)
    np.testing.assert_allclose(out64, ref, rtol=tol["float64_reference_rtol"])


def test_smoothness_of_constant_and_linear_fields():
    model, xy = _grid_model(7)
    mesh = corrective_mesh(model)
    V = model.n_vertices
    constant = np.broadcast_to(np.array([3.0, -1.0, 0.5]), (1, V, 3)).copy()
    assert smoothness_loss(constant, mesh)[0] == 0.0
    linear = np.stack([2 * xy[:, 0] + xy[:, 1], -xy[:, 1], 0.5 * xy[:, 0]], axis=-1)[None]
    nbrs = _neighbour_sets(model.triangles, V)
    per_vertex = np.array([np.sum(sum(linear[0, v] - linear[0, j] for j in nbrs[v]) ** 2) for v in range(V)])
    n = 7
    r, c = np.divmod(np.arange(V), n)
    interior = (r > 0) & (r < n - 1) & (c > 0) & (c < n - 1)
    assert np.all(np.abs(per_vertex[interior]) < 1e-24) and np.all(per_vertex[~interior].sum() > 0)
    np.testing.assert_allclose(smoothness_loss(linear, mesh)[0], per_vertex[~interior].sum() / V, rtol=1e-12)


def test_magnitude_is_the_mean_squared_offset_length(rng, tol):
    offsets = _field(rng, 2, 11)
    ref = [np.mean(np.sum(offsets[b] ** 2, axis=-1)) for b in range(2)]
    np.testing.assert_allclose(magnitude_loss(offsets), ref, rtol=tol["float64_reference_rtol"])
    np.testing.assert_allclose(magnitude_loss(offsets.astype(np.float32)), ref, rtol=tol["gpu_cpu_rtol"])


def _chroma_reference(c):
    c = np.maximum(np.asarray(c, np.float64), 0.0)
    return c / max(c.sum(), CHROMA_EPS)


def _reflectance_reference(albedo, guide, tri, sharpness):
    edges = _edges_from_triangles(tri)
    out = []
    for b in range(albedo.shape[0]):
        g = guide[b] if guide.ndim == 3 else guide
        total = 0.0
        for i, j in edges:
            w = np.exp(-sharpness * np.linalg.norm(_chroma_reference(g[i]) - _chroma_reference(g[j])))
            total += w * np.sqrt(np.sum((albedo[b, i] - albedo[b, j]) ** 2) + REFLECTANCE_EPS ** 2)
        out.append(total / len(edges))
    return np.array(out)


@pytest.mark.parametrize("shared_guide", [False, True])
@pytest.mark.parametrize("sharpness", [0.0, 3.0, 50.0])
def test_reflectance_constancy_matches_a_loop_over_edges(rng, tol, shared_guide, sharpness):
    model, _ = _grid_model(5)
    mesh = corrective_mesh(model)
    albedo = rng.uniform(-0.1, 1.0, size=(2, 25, 3))
    guide = rng.uniform(-0.05, 1.0, size=(25, 3) if shared_guide else (2, 25, 3))
    guide[..., 3, :] = 0.0  # black: chromaticity 0
    ref = _reflectance_reference(albedo, guide, model.triangles, sharpness)
    np.testing.assert_allclose(reflectance_constancy_loss(albedo, guide, mesh, sharpness=sharpness), ref,
                               rtol=tol["float64_reference_rtol"])
    out32 = reflectance_constancy_loss(albedo.astype(np.float32), guide.astype(np.float32), mesh, sharpness)
    np.testing.assert_allclose(out32, ref, rtol=tol["gpu_cpu_rtol"])


def test_reflectance_weights_ignore_brightness_and_constant_albedo_costs_only_eps(rng):
    model, _ = _grid_model(4)
    mesh = corrective_mesh(model)
    albedo = rng.uniform(0, 1, size=(1, 16, 3))
    colour = np.array([0.6, 0.4, 0.3])
    shaded = colour * rng.uniform(0.2, 1.0, size=(16, 1))  # one chromaticity, many brightnesses
    np.testing.assert_allclose(reflectance_constancy_loss(albedo, shaded, mesh),
                               reflectance_constancy_loss(albedo, shaded, mesh, sharpness=0.0), rtol=1e-12)
    constant = np.broadcast_to(colour, (1, 16, 3)).copy()
    np.testing.assert_allclose(reflectance_constancy_loss(constant, shaded, mesh), REFLECTANCE_EPS, rtol=1e-12)
    assert not reflectance_constancy_loss_backward(constant, shaded, mesh, np.ones(1)).any()


def _symmetry_reference(offsets, sym, mirror_x):
    M = np.diag([-1.0 if mirror_x else 1.0, 1.0, 1.0])
    return np.array([np.mean([np.sum((o[v] - M @ o[sym[v]]) ** 2) for v in range(len(sym))]) for o in offsets])


@pytest.mark.parametrize("mirror_x", [True, False])
@pytest.mark.parametrize("symmetry", ["mirror", "random"])
def test_symmetry_matches_a_loop_over_vertices(rng, tol, mirror_x, symmetry):
    model, _ = _grid_model(5, symmetry)
    offsets = _field(rng, 2, 25)
    ref = _symmetry_reference(offsets, model.symmetry, mirror_x)
    np.testing.assert_allclose(symmetry_loss(offsets, corrective_mesh(model), mirror_x), ref,
                               rtol=tol["float64_reference_rtol"])


def test_symmetry_of_a_mirrored_field_is_zero(rng):
    model = fastface.FaceModel.default(level="small")
    mesh = corrective_mesh(model)
    sym = model.symmetry
    half = _field(rng, 2, model.n_vertices, np.float32)
    geometry = half.copy()  # o_v = M o_sym(v): average each pair with its mirror image
    geometry[..., 0] = 0.5 * (half[..., 0] - half[:, sym, 0])
    geometry[..., 1:] = 0.5 * (half[..., 1:] + half[:, sym, 1:])
    assert np.all(symmetry_loss(geometry, mesh, True) < 1e-12)
    assert np.all(symmetry_loss(geometry, mesh, False) > 0.1)
    reflectance = 0.5 * (half + half[:, sym])
    assert np.all(symmetry_loss(reflectance, mesh, False) < 1e-12)
    assert np.all(symmetry_loss(half, mesh, True) > 0.1)


# -- gradients ----------------------------------------------------------------------------------

def _check_regularizer_gradient(tol, rng, loss, backward, x):
    grad_out = rng.normal(size=x.shape[0])
    assert_gradient_matches(loss, x, grad_out, backward(x, grad_out), tol)


def test_smoothness_backward_matches_central_differences(rng, tol):
    model, _ = _grid_model(5, symmetry=None)
    mesh = corrective_mesh(model)
    _check_regularizer_gradient(tol, rng, lambda o: smoothness_loss(o, mesh),
                                lambda o, g: smoothness_loss_backward(o, mesh, g), _field(rng, 2, 25))


def test_magnitude_backward_matches_central_differences(rng, tol):
    _check_regularizer_gradient(tol, rng, magnitude_loss, magnitude_loss_backward, _field(rng, 3, 7))


@pytest.mark.parametrize("shared_guide", [False, True])
def test_reflectance_constancy_backward_matches_central_differences(rng, tol, shared_guide):
    model, _ = _grid_model(5, symmetry=None)
    mesh = corrective_mesh(model)
    guide = rng.uniform(0, 1, size=(25, 3) if shared_guide else (2, 25, 3))
    albedo = rng.uniform(0, 1, size=(2, 25, 3))
    albedo[0, 7] = albedo[0, 8] + 1e-4  # an edge inside the eps-rounded kink
    _check_regularizer_gradient(
        tol, rng, lambda a: reflectance_constancy_loss(a, guide, mesh, sharpness=5.0),
        lambda a, g: reflectance_constancy_loss_backward(a, guide, mesh, g, sharpness=5.0), albedo)


@pytest.mark.parametrize("mirror_x", [True, False])
@pytest.mark.parametrize("symmetry", ["mirror", "random"])
def test_symmetry_backward_matches_central_differences(rng, tol, mirror_x, symmetry):
    model, _ = _grid_model(5, symmetry)
    mesh = corrective_mesh(model)
    _check_regularizer_gradient(tol, rng, lambda o: symmetry_loss(o, mesh, mirror_x),
                                lambda o, g: symmetry_loss_backward(o, mesh, g, mirror_x), _field(rng, 2, 25))


def test_float32_backwards_match_float64(rng, tol):
    model = fastface.FaceModel.default(level="small")
    mesh = corrective_mesh(model)
    V = model.n_vertices
    x = rng.uniform(0, 1, size=(2, V, 3))
    guide = np.asarray(model.mean_albedo, np.float64)
    g = np.array([1.0, -0.5])
    calls = [lambda a, g: smoothness_loss_backward(a, mesh, g), magnitude_loss_backward,
             lambda a, g: reflectance_constancy_loss_backward(a, guide.astype(a.dtype), mesh, g),
             lambda a, g: symmetry_loss_backward(a, mesh, g, True)]
    for call in calls:
        ref = call(x, g)
        out = call(x.astype(np.float32), g.astype(np.float32))
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=tol["gpu_cpu_scatter_rtol"],
                                   atol=tol["gpu_cpu_scatter_atol_of_max"] * np.abs(ref).max())


# -- adding into a caller's gradient (add_to=) -------------------------------------------------------

def _backward_calls(model, guide):
    """name -> backward(field, grad_out, **kwargs) of every corrective regularizer on the model's mesh."""
    mesh = corrective_mesh(model)
    return {
        "smoothness": lambda x, g, **kw: smoothness_loss_backward(x, mesh, g, **kw),
        "magnitude": lambda x, g, **kw: magnitude_loss_backward(x, g, **kw),
        "reflectance_constancy": lambda x, g, **kw: reflectance_constancy_loss_backward(
            x, guide.astype(x.dtype), mesh, g, sharpness=5.0, **kw),
        "symmetry_geometry": lambda x, g, **kw: symmetry_loss_backward(x, mesh, g, True, **kw),
        "symmetry_reflectance": lambda x, g, **kw: symmetry_loss_backward(x, mesh, g, False, **kw),
    }


@pytest.mark.parametrize("name", ["smoothness", "magnitude", "reflectance_constancy", "symmetry_geometry",
                                  "symmetry_reflectance"])
def test_backward_adds_into_add_to(rng, tol, name):
    model, _ = _grid_model(6, symmetry="random")
    backward = _backward_calls(model, rng.uniform(0, 1, size=(2, 36, 3)))[name]
    x = rng.uniform(0, 1, size=(2, 36, 3))
    g = np.array([1.5, -0.5])
    gradient = backward(x, g)
    before = rng.normal(size=x.shape)
    out = before.copy()
    assert backward(x, g, add_to=out) is out
    np.testing.assert_array_equal(out, before + gradient)  # float64: the same additions, bit for bit
    assert backward(x, g, add_to=out) is out  # twice: adds again
    np.testing.assert_allclose(out, before + 2 * gradient, rtol=1e-13, atol=1e-15)
    x32, g32 = x.astype(np.float32), g.astype(np.float32)
    out32 = before.astype(np.float32)
    backward(x32, g32, add_to=out32)
    np.testing.assert_allclose(out32, before.astype(np.float32) + backward(x32, g32), rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])


@pytest.mark.parametrize("name", ["smoothness", "magnitude", "reflectance_constancy", "symmetry_geometry"])
def test_backward_refuses_a_bad_add_to_naming_it(rng, name):
    model, _ = _grid_model(4, symmetry="random")
    guide = rng.uniform(0, 1, size=(16, 3))
    backward = _backward_calls(model, guide)[name]
    x = rng.uniform(0, 1, size=(2, 16, 3)).astype(np.float32)
    g = np.ones(2, np.float32)
    with pytest.raises(ValueError, match=r"add_to must have shape \(2, 16, 3\)"):
        backward(x, g, add_to=np.zeros((2, 15, 3), np.float32))
    with pytest.raises(TypeError, match="add_to must be float32"):
        backward(x, g, add_to=np.zeros((2, 16, 3)))
    with pytest.raises(ValueError, match="add_to must be C-contiguous"):
        backward(x, g, add_to=np.zeros((2, 3, 16), np.float32).transpose(0, 2, 1))
    with pytest.raises(TypeError, match="add_to must be a numpy array like"):
        backward(x, g, add_to=[[0.0] * 3] * 16)
    field = "albedo" if name == "reflectance_constancy" else "offsets"
    with pytest.raises(ValueError, match=f"add_to must not share memory with {field}"):
        backward(x, g, add_to=x)
    wide = np.zeros((2, 16, 6), np.float32)
    wide[..., ::2] = x
    with pytest.raises(ValueError, match=f"add_to must not share memory with {field}"):  # within a strided view's bytes
        backward(wide[..., ::2], g, add_to=wide.reshape(-1)[48:144].reshape(2, 16, 3))
    flat = np.zeros(2 * 16 * 3, np.float32)
    with pytest.raises(ValueError, match="add_to must not share memory with grad_out"):
        backward(x, flat[-2:], add_to=flat.reshape(2, 16, 3))
    with pytest.raises(TypeError, match="grad_out must be float32"):  # the arguments are checked before add_to
        backward(x, np.ones(2), add_to=np.zeros((2, 16, 3), np.float32))


# -- forwards over several chunks ---------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 3])
def test_forwards_spanning_several_chunks_match_float64_sums(rng, tol, batch):
    """The forwards sum fixed chunks of FWD_CHUNK vertices (or edges) and then the chunks (both backends):
    a model whose V and E span several chunks, with a partial last one, against a sum of every term at once."""
    model, _ = _grid_model(70, symmetry="random")  # V = 4,900 (3 chunks), E = 14,421 (8 chunks)
    mesh = corrective_mesh(model)
    V, E = model.n_vertices, mesh.n_edges
    assert corrective._chunks(V) == 3 and corrective._chunks(E) == 8 and V % corrective.FWD_CHUNK and E % \
        corrective.FWD_CHUNK
    x = rng.normal(size=(batch, V, 3))
    guide = rng.uniform(0, 1, size=(batch, V, 3))
    L = model.laplacian().astype(np.float64)
    sym = model.symmetry
    M = np.array([-1.0, 1.0, 1.0])
    i, j = mesh.edges[:, 0], mesh.edges[:, 1]
    chroma = np.maximum(guide, 0.0) / np.maximum(np.maximum(guide, 0.0).sum(-1, keepdims=True), CHROMA_EPS)
    refs = {
        "smoothness": (smoothness_loss(x, mesh), [np.sum((L @ x[b]) ** 2) / V for b in range(batch)]),
        "magnitude": (magnitude_loss(x), np.sum(x ** 2, axis=(1, 2)) / V),
        "symmetry": (symmetry_loss(x, mesh, True), np.sum((x - M * x[:, sym]) ** 2, axis=(1, 2)) / V),
        "reflectance": (reflectance_constancy_loss(x, guide, mesh, sharpness=3.0),
                        np.sum(np.exp(-3.0 * np.linalg.norm(chroma[:, i] - chroma[:, j], axis=-1))
                               * np.sqrt(np.sum((x[:, i] - x[:, j]) ** 2, -1) + REFLECTANCE_EPS ** 2), 1) / E),
    }
    for name, (got, want) in refs.items():
        assert got.shape == (batch,), name
        np.testing.assert_allclose(got, want, rtol=tol["float64_reference_rtol"], err_msg=name)
    x32 = x.astype(np.float32)
    np.testing.assert_allclose(smoothness_loss(x32, mesh), refs["smoothness"][1], rtol=tol["gpu_cpu_rtol"])


@pytest.mark.parametrize("chunks_and_extra", [(1, 0), (2, 0), (2, 1), (3, -1)])
def test_magnitude_at_chunk_boundaries_counts_every_vertex_once(rng, tol, chunks_and_extra):
    chunks, extra = chunks_and_extra
    V = chunks * corrective.FWD_CHUNK + extra
    x = rng.normal(size=(2, V, 3))
    np.testing.assert_allclose(magnitude_loss(x), np.sum(x ** 2, axis=(1, 2)) / V, rtol=tol["float64_reference_rtol"])
    ones = np.ones((1, V, 3))
    assert magnitude_loss(ones)[0] == 3.0  # each vertex once: neither dropped nor counted twice


# -- bad input ----------------------------------------------------------------------------------

def test_regularizers_name_bad_arguments(rng):
    model, _ = _grid_model(4)
    mesh = corrective_mesh(model)
    o = _field(rng, 2, 16, np.float32)
    g = np.ones(2, np.float32)
    with pytest.raises(TypeError, match="mesh must be a CorrectiveMesh"):
        smoothness_loss(o, model)
    with pytest.raises(ValueError, match=r"offsets must have shape \(B, 16, 3\)"):
        smoothness_loss(o[:, :15], mesh)
    with pytest.raises(TypeError, match="offsets must be float32 or float64"):
        magnitude_loss(o.astype(np.float16))
    with pytest.raises(ValueError, match=r"grad_out must have shape \(2\)"):
        smoothness_loss_backward(o, mesh, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="grad_out must be float32"):
        magnitude_loss_backward(o, np.ones(2))
    bad = o.copy()
    bad[1, 3, 2] = np.inf
    with pytest.raises(ValueError, match="offsets holds 1 NaN or infinite"):
        symmetry_loss(bad, mesh, True)
    with pytest.raises(TypeError, match="mirror_x must be True"):
        symmetry_loss(o, mesh, 1)
    with pytest.raises(ValueError, match="no symmetry map"):
        symmetry_loss(o, corrective_mesh(_grid_model(4, symmetry=None)[0]), True)
    with pytest.raises(ValueError, match="sharpness must be finite and >= 0"):
        reflectance_constancy_loss(o, o, mesh, sharpness=-1.0)
    with pytest.raises(TypeError, match="sharpness must be a number"):
        reflectance_constancy_loss(o, o, mesh, sharpness="sharp")
    with pytest.raises(ValueError, match=r"guide_albedo must have shape \(B, 16, 3\) or \(16, 3\)"):
        reflectance_constancy_loss(o, o[0, :8], mesh)
    with pytest.raises(ValueError, match="batch sizes differ"):
        reflectance_constancy_loss_backward(o, o[:1], mesh, g)
    with pytest.raises(TypeError, match="guide_albedo must be float32"):
        reflectance_constancy_loss(o, o.astype(np.float64), mesh)


# -- GPU against CPU (a real GPU; tests/test_gpu_paths_emulated_corrective.py does it on the host) ---------

def test_regularizers_gpu_match_cpu(cupy, rng, tol):
    model = fastface.FaceModel.default(level="small")
    mesh, gpu_mesh = corrective_mesh(model), corrective_mesh(model.to("gpu"))
    B, V = 4, model.n_vertices
    offsets = rng.normal(size=(B, V, 3)).astype(np.float32)
    albedo = rng.uniform(0.0, 1.0, size=(B, V, 3)).astype(np.float32)
    guide = np.asarray(model.mean_albedo)
    grad_out = rng.normal(size=B).astype(np.float32)
    g = cupy.asarray
    pairs = [
        (smoothness_loss(g(offsets), gpu_mesh), smoothness_loss(offsets, mesh)),
        (smoothness_loss_backward(g(offsets), gpu_mesh, g(grad_out)),
         smoothness_loss_backward(offsets, mesh, grad_out)),
        (magnitude_loss(g(offsets)), magnitude_loss(offsets)),
        (magnitude_loss_backward(g(offsets), g(grad_out)), magnitude_loss_backward(offsets, grad_out)),
        (reflectance_constancy_loss(g(albedo), g(guide), gpu_mesh), reflectance_constancy_loss(albedo, guide, mesh)),
        (reflectance_constancy_loss_backward(g(albedo), g(albedo), gpu_mesh, g(grad_out)),
         reflectance_constancy_loss_backward(albedo, albedo, mesh, grad_out)),
        (symmetry_loss(g(offsets), gpu_mesh, True), symmetry_loss(offsets, mesh, True)),
        (symmetry_loss_backward(g(offsets), gpu_mesh, g(grad_out), False),
         symmetry_loss_backward(offsets, mesh, grad_out, False)),
    ]
    for got, want in pairs:
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_allclose(got.get(), want, rtol=tol["gpu_cpu_scatter_rtol"],
                                   atol=tol["gpu_cpu_scatter_atol_of_max"] * np.abs(want).max())
    # Deterministic: a second call gives the same bits (fixed chunks, fixed-order sums, no atomics).
    np.testing.assert_array_equal(smoothness_loss(g(offsets), gpu_mesh).get(), pairs[0][0].get())
    np.testing.assert_array_equal(magnitude_loss(g(offsets)).get(), pairs[2][0].get())
    np.testing.assert_array_equal(reflectance_constancy_loss(g(albedo), g(guide), gpu_mesh).get(), pairs[4][0].get())
    np.testing.assert_array_equal(symmetry_loss(g(offsets), gpu_mesh, True).get(), pairs[6][0].get())
    # add_to=: every backward adds into one buffer.
    before = rng.normal(size=(B, V, 3)).astype(np.float32)
    out = g(before)
    smoothness_loss_backward(g(offsets), gpu_mesh, g(grad_out), add_to=out)
    magnitude_loss_backward(g(offsets), g(grad_out), add_to=out)
    reflectance_constancy_loss_backward(g(albedo), g(albedo), gpu_mesh, g(grad_out), add_to=out)
    assert symmetry_loss_backward(g(offsets), gpu_mesh, g(grad_out), False, add_to=out) is out
    want = before + sum(pairs[i][1] for i in (1, 3, 5, 7))
    np.testing.assert_allclose(out.get(), want, rtol=tol["gpu_cpu_scatter_rtol"],
                               atol=tol["gpu_cpu_scatter_atol_of_max"] * np.abs(want).max())


def test_evaluate_and_backward_write_into_given_outputs(rng):
    space = CorrectiveSpace(10, 3, 4)
    z_geo, z_ref = _codes(rng, space, 2)
    want = space.evaluate(z_geo, z_ref)
    out = (np.empty((2, 10, 3), np.float32), np.empty((2, 10, 3), np.float32))
    got = space.evaluate(z_geo, z_ref, out=out)
    assert got[0] is out[0] and got[1] is out[1]
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
    want_z = space.backward(z_geo, z_ref, want[0], want[1])
    out_z = (np.empty((2, 3), np.float32), np.empty((2, 4), np.float32))
    got_z = space.backward(z_geo, z_ref, want[0], None, out=out_z)
    assert got_z[0] is out_z[0] and got_z[1] is out_z[1]
    np.testing.assert_array_equal(got_z[0], want_z[0])
    assert not got_z[1].any()
    with pytest.raises(ValueError, match=r"out\[1\] must have shape \(2, 10, 3\)"):
        space.evaluate(z_geo, z_ref, out=(out[0], out[1][:, :9]))
    with pytest.raises(ValueError, match=r"out\[0\] must be C-contiguous"):
        space.evaluate(z_geo, z_ref, out=(np.empty((2, 3, 10), np.float32).transpose(0, 2, 1), out[1]))
    with pytest.raises(TypeError, match="out must be a pair"):
        space.backward(z_geo, z_ref, None, None, out=out_z[0])


def test_regularizers_of_decoded_offsets_backpropagate_to_the_codes(rng, tol):
    """The chain a training step runs: codes -> decoders -> every regularizer, back to the codes."""
    model, _ = _grid_model(5, symmetry="random")
    mesh = corrective_mesh(model)
    space = CorrectiveSpace(25, 3, 4, seed=1, init_std=0.5, dtype=np.float64)
    z_geo, z_ref = _codes(rng, space, 2)
    base_albedo = rng.uniform(0.2, 0.8, size=(2, 25, 3))
    weights = rng.uniform(0.5, 2.0, size=2)

    def loss(zg, zr):
        geometry, reflectance = space.evaluate(zg, zr)
        albedo = base_albedo + reflectance
        return (smoothness_loss(geometry, mesh) + 0.5 * magnitude_loss(geometry)
                + symmetry_loss(geometry, mesh, True)
                + reflectance_constancy_loss(albedo, base_albedo, mesh, sharpness=4.0)
                + magnitude_loss(reflectance) + symmetry_loss(reflectance, mesh, False))

    geometry, reflectance = space.evaluate(z_geo, z_ref)
    albedo = base_albedo + reflectance
    grad_geometry = (smoothness_loss_backward(geometry, mesh, weights)
                     + magnitude_loss_backward(geometry, 0.5 * weights)
                     + symmetry_loss_backward(geometry, mesh, weights, True))
    grad_reflectance = (reflectance_constancy_loss_backward(albedo, base_albedo, mesh, weights, sharpness=4.0)
                        + magnitude_loss_backward(reflectance, weights)
                        + symmetry_loss_backward(reflectance, mesh, weights, False))
    grad_z_geo, grad_z_ref = space.backward(z_geo, z_ref, grad_geometry, grad_reflectance)
    assert_gradient_matches(lambda z: loss(z, z_ref), z_geo, weights, grad_z_geo, tol)
    assert_gradient_matches(lambda z: loss(z_geo, z), z_ref, weights, grad_z_ref, tol)


def test_to_gpu_refuses_float64_and_a_missing_cupy(monkeypatch):
    from tests.fake_cupy import install  # noqa: PLC0415

    with monkeypatch.context() as m:
        m.setattr(corrective, "cupy_or_none", lambda: None)
        with pytest.raises(RuntimeError, match="needs cupy"):
            CorrectiveSpace(5, 2, 2).to("gpu")
    install(monkeypatch)
    with pytest.raises(TypeError, match="CPU only"):
        CorrectiveSpace(5, 2, 2, dtype=np.float64).to("gpu")
    space = CorrectiveSpace(5, 2, 2).to("gpu")
    assert space.device == "gpu" and space.to("cpu").device == "cpu"
