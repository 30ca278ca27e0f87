"""FaceModel.evaluate and evaluate_backward: reference, gradients, CPU/GPU parity, bad input, topology."""
import sys

import numpy as np
import pytest

import fastface
from fastface.model import FaceModel
from fastface.model import face_model as face_model_module
from tests.gradcheck import assert_gradient_matches


def random_model(rng, n_vertices=23, n_shape=5, n_expression=4, n_albedo=3):
    """A small model with random (non-orthonormal) bases and a random triangle list."""
    tri = np.array([rng.choice(n_vertices, 3, replace=False) for _ in range(30)])
    return FaceModel(
        mean_shape=rng.normal(size=(n_vertices, 3)), triangles=tri,
        shape_basis=rng.normal(size=(n_shape, 3 * n_vertices)), shape_std=rng.uniform(0.5, 2.0, n_shape),
        expression_basis=rng.normal(size=(n_expression, n_vertices, 3)),
        expression_std=rng.uniform(0.5, 2.0, n_expression),
        mean_albedo=rng.uniform(0, 1, (n_vertices, 3)), albedo_basis=rng.normal(size=(n_albedo, 3 * n_vertices)),
        albedo_std=rng.uniform(0.1, 0.3, n_albedo), expression_names=[f"e{k}" for k in range(n_expression)])


def coefficients(rng, model, batch, dtype=np.float32):
    return (rng.normal(size=(batch, model.n_shape)).astype(dtype),
            rng.normal(size=(batch, model.n_expression)).astype(dtype),
            rng.normal(size=(batch, model.n_albedo)).astype(dtype))


def reference_evaluate(model, shape, expression, albedo):
    """The slow, obvious float64 sum over components, one face at a time."""
    v, out_v, out_a = model.n_vertices, [], []
    for b in range(shape.shape[0]):
        vert = model.mean_shape.astype(np.float64).reshape(-1).copy()
        for k in range(model.n_shape):
            vert += float(shape[b, k]) * float(model.shape_std[k]) * model.shape_basis[k].astype(np.float64)
        for k in range(model.n_expression):
            vert += (float(expression[b, k]) * float(model.expression_std[k])
                     * model.expression_basis[k].astype(np.float64))
        alb = model.mean_albedo.astype(np.float64).reshape(-1).copy()
        for k in range(model.n_albedo):
            alb += float(albedo[b, k]) * float(model.albedo_std[k]) * model.albedo_basis[k].astype(np.float64)
        out_v.append(vert.reshape(v, 3))
        out_a.append(alb.reshape(v, 3))
    return np.stack(out_v), np.stack(out_a)


def l1_scale(model, shape, expression, albedo):
    """Per output, the sum of the magnitudes of the terms summed (the scale of float32 rounding)."""
    geo = np.concatenate([np.abs(shape) * model.shape_std, np.abs(expression) * model.expression_std], axis=1)
    basis = np.abs(np.concatenate([model.shape_basis, model.expression_basis]).astype(np.float64))
    v = (geo @ basis + np.abs(model.mean_shape.reshape(-1))).reshape(-1, model.n_vertices, 3)
    a = ((np.abs(albedo) * model.albedo_std) @ np.abs(model.albedo_basis.astype(np.float64))
         + np.abs(model.mean_albedo.reshape(-1))).reshape(-1, model.n_vertices, 3)
    return v, a


def l1_scale_backward(model, grad_v, grad_a):
    """The same for the backward: sum_j |grad_j basis_kj| std_k per (b, k)."""
    batch = grad_v.shape[0]
    geo = np.abs(np.concatenate([model.shape_basis, model.expression_basis]).astype(np.float64))
    scale = (np.abs(grad_v.reshape(batch, -1)) @ geo.T) * np.concatenate([model.shape_std, model.expression_std])
    scale_a = (np.abs(grad_a.reshape(batch, -1)) @ np.abs(model.albedo_basis.astype(np.float64)).T) * model.albedo_std
    return scale[:, :model.n_shape], scale[:, model.n_shape:], scale_a


@pytest.fixture(scope="module")
def small():
    return FaceModel.default(level="small")


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

def test_evaluate_matches_the_float64_reference(small, rng, tol):
    shape, expression, albedo = coefficients(rng, small, 3)
    vertices, colours = small.evaluate(shape, expression, albedo)
    assert vertices.shape == (3, small.n_vertices, 3) and vertices.dtype == np.float32
    ref_v, ref_a = reference_evaluate(small, shape, expression, albedo)
    scale_v, scale_a = l1_scale(small, shape, expression, albedo)
    assert np.all(np.abs(vertices - ref_v) <= tol["gemm_l1_rtol"] * scale_v)
    assert np.all(np.abs(colours - ref_a) <= tol["gemm_l1_rtol"] * scale_a)


def test_evaluate_in_float64_on_the_cpu_is_exact_to_float64(rng):
    model = random_model(rng)
    shape, expression, albedo = coefficients(rng, model, 4, np.float64)
    vertices, colours = model.evaluate(shape, expression, albedo)
    assert vertices.dtype == np.float64
    ref_v, ref_a = reference_evaluate(model, shape, expression, albedo)
    np.testing.assert_allclose(vertices, ref_v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(colours, ref_a, rtol=1e-12, atol=1e-12)


def test_zero_coefficients_give_the_mean(small):
    z = np.zeros((2, 80), np.float32)
    vertices, colours = small.evaluate(z, np.zeros((2, 64), np.float32), z)
    assert np.array_equal(vertices[1], small.mean_shape) and np.array_equal(colours[0], small.mean_albedo)


def test_none_coefficients_count_as_zeros(rng, tol):
    model = random_model(rng)
    shape, expression, albedo = coefficients(rng, model, 2)
    zeros_e, zeros_a = np.zeros_like(expression), np.zeros_like(albedo)
    v1, a1 = model.evaluate(shape, None, None)
    v2, a2 = model.evaluate(shape, zeros_e, zeros_a)
    # None skips the expression rows: a sum over fewer terms, which may round differently.
    scale_v, _ = l1_scale(model, shape, zeros_e, zeros_a)
    assert np.all(np.abs(v1 - v2) <= tol["gemm_l1_rtol"] * scale_v)
    assert np.array_equal(a1, a2) and np.array_equal(a1[0], model.mean_albedo)


@pytest.mark.parametrize("given", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, False, True), (True, True, True)])
def test_none_blocks_skip_their_basis_rows_instead_of_multiplying_zeros(rng, tol, monkeypatch, given):
    model = random_model(rng)
    blocks = [c if g else None for c, g in zip(coefficients(rng, model, 3, np.float64), given)]
    calls = []
    real = face_model_module.morphable

    def recording(coeff_a, coeff_b, std, basis, mean, compute):
        calls.append((coeff_a.shape, coeff_b.shape, basis.shape[0], std.shape[0]))
        return real(coeff_a, coeff_b, std, basis, mean, compute=compute)

    monkeypatch.setattr(face_model_module, "morphable", recording)
    vertices, colours = model.evaluate(*blocks)
    # The coefficients passed are the given blocks only, each with its own basis rows.
    widths = [b.shape[1] if b is not None else 0 for b in blocks]
    assert [c[0][1] + c[1][1] for c in calls] == [widths[0] + widths[1], widths[2]]
    assert [c[2] for c in calls] == [c[3] for c in calls] == [widths[0] + widths[1], widths[2]]
    zeros = [np.zeros((3, k)) for k in (model.n_shape, model.n_expression, model.n_albedo)]
    ref_v, ref_a = reference_evaluate(model, *[b if b is not None else z for b, z in zip(blocks, zeros)])
    np.testing.assert_allclose(vertices, ref_v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(colours, ref_a, rtol=1e-12, atol=1e-12)


def test_model_without_expressions_takes_empty_expression_coefficients(rng):
    full = random_model(rng)
    model = full.truncated(n_expression=0)
    shape, _, albedo = coefficients(rng, model, 2)
    v, _ = model.evaluate(shape, np.zeros((2, 0), np.float32), albedo)
    v_ref, _ = full.evaluate(shape, np.zeros((2, full.n_expression), np.float32), albedo)
    assert np.allclose(v, v_ref, atol=1e-5)
    assert model.evaluate_backward(np.ones_like(v), None)[1].shape == (2, 0)


def test_truncated_keeps_the_leading_components(small, rng):
    model = small.truncated(n_shape=10, n_expression=5, n_albedo=7)
    assert (model.n_shape, model.n_expression, model.n_albedo) == (10, 5, 7)
    assert model.expression_names == small.expression_names[:5]
    shape, expression, albedo = coefficients(rng, model, 2)
    padded = [np.pad(c, ((0, 0), (0, n - c.shape[1]))) for c, n in ((shape, 80), (expression, 64), (albedo, 80))]
    v, a = model.evaluate(shape, expression, albedo)
    v_full, a_full = small.evaluate(*padded)
    assert np.allclose(v, v_full, atol=1e-4) and np.allclose(a, a_full, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

def test_evaluate_backward_matches_central_differences(rng, tol):
    model = random_model(rng)
    shape, expression, albedo = coefficients(rng, model, 2, np.float64)
    grad_v = rng.normal(size=(2, model.n_vertices, 3))
    grad_a = rng.normal(size=(2, model.n_vertices, 3))
    g_shape, g_expr, g_alb = model.evaluate_backward(grad_v, grad_a)
    assert g_shape.dtype == np.float64
    assert_gradient_matches(lambda s: model.evaluate(s, expression, albedo)[0], shape, grad_v, g_shape, tol)
    assert_gradient_matches(lambda e: model.evaluate(shape, e, albedo)[0], expression, grad_v, g_expr, tol)
    assert_gradient_matches(lambda a: model.evaluate(shape, expression, a)[1], albedo, grad_a, g_alb, tol)


def test_evaluate_backward_on_the_default_model_matches_central_differences(small, rng, tol):
    shape, expression, albedo = coefficients(rng, small, 1, np.float64)
    grad_v = rng.normal(size=(1, small.n_vertices, 3))
    g_shape, g_expr, _ = small.evaluate_backward(grad_v, None)
    assert_gradient_matches(lambda s: small.evaluate(s, expression, albedo)[0], shape, grad_v, g_shape, tol,
                            n_samples=6, rng=rng)
    assert_gradient_matches(lambda e: small.evaluate(shape, e, albedo)[0], expression, grad_v, g_expr, tol,
                            n_samples=6, rng=rng)


def test_evaluate_backward_with_a_missing_gradient_gives_zeros(rng):
    model = random_model(rng)
    grad = rng.normal(size=(3, model.n_vertices, 3)).astype(np.float32)
    g_shape, g_expr, g_alb = model.evaluate_backward(None, grad)
    assert not g_shape.any() and not g_expr.any() and g_alb.any()
    g_shape, g_expr, g_alb = model.evaluate_backward(grad, None)
    assert g_shape.any() and g_expr.any() and not g_alb.any()
    assert g_alb.shape == (3, model.n_albedo) and g_alb.dtype == np.float32


# ----------------------------------------------------------------------------------------------
# GPU against CPU
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("batch", [1, 5, 9, 70])  # both kernel tiles; 70 > 64 loops over batch tiles
def test_gpu_evaluate_matches_cpu(cupy, small, rng, tol, batch):
    gpu = small.to("gpu")
    assert gpu.device == "gpu"
    shape, expression, albedo = coefficients(rng, small, batch)
    v_cpu, a_cpu = small.evaluate(shape, expression, albedo)
    v_gpu, a_gpu = gpu.evaluate(cupy.asarray(shape), cupy.asarray(expression), cupy.asarray(albedo))
    scale_v, scale_a = l1_scale(small, shape, expression, albedo)
    assert np.all(np.abs(v_gpu.get() - v_cpu) <= tol["gemm_l1_rtol"] * scale_v)
    assert np.all(np.abs(a_gpu.get() - a_cpu) <= tol["gemm_l1_rtol"] * scale_a)


@pytest.mark.parametrize("batch", [1, 5, 9, 70])
def test_gpu_evaluate_backward_matches_cpu(cupy, small, rng, tol, batch):
    gpu = small.to("gpu")
    grad_v = rng.normal(size=(batch, small.n_vertices, 3)).astype(np.float32)
    grad_a = rng.normal(size=(batch, small.n_vertices, 3)).astype(np.float32)
    cpu_grads = small.evaluate_backward(grad_v, grad_a)
    gpu_grads = gpu.evaluate_backward(cupy.asarray(grad_v), cupy.asarray(grad_a))
    for c, g, s in zip(cpu_grads, gpu_grads, l1_scale_backward(small, grad_v, grad_a)):
        assert g.shape == c.shape and g.dtype == np.float32
        assert np.all(np.abs(g.get() - c) <= tol["gemm_l1_rtol"] * s)


def assert_gpu_matches_cpu(cupy, tol, model, batch, rng):
    """Forward and backward of `model` on the GPU against the CPU, within float32 GEMM rounding."""
    gpu = model.to("gpu")
    shape, expression, albedo = coefficients(rng, model, batch)
    v_cpu, a_cpu = model.evaluate(shape, expression, albedo)
    v_gpu, a_gpu = gpu.evaluate(*(cupy.asarray(c) for c in (shape, expression, albedo)))
    scale_v, scale_a = l1_scale(model, shape, expression, albedo)
    assert np.all(np.abs(v_gpu.get() - v_cpu) <= tol["gemm_l1_rtol"] * scale_v)
    assert np.all(np.abs(a_gpu.get() - a_cpu) <= tol["gemm_l1_rtol"] * scale_a)
    grads = gpu.evaluate_backward(cupy.asarray(v_cpu), cupy.asarray(a_cpu))
    for g, c, s in zip(grads, model.evaluate_backward(v_cpu, a_cpu), l1_scale_backward(model, v_cpu, a_cpu)):
        assert np.all(np.abs(g.get() - c) <= tol["gemm_l1_rtol"] * s)


def test_gpu_model_with_odd_sizes_matches_cpu(cupy, rng, tol):
    # 23 vertices (69 columns, not a multiple of 4), 5 + 4 rows: every edge of every tile.
    assert_gpu_matches_cpu(cupy, tol, random_model(rng), 3, rng)


@pytest.mark.parametrize("batch", [1, 2, 3, 4, 7, 8])
def test_gpu_small_batch_kernels_match_cpu(cupy, rng, tol, batch):
    # Every morphable_*_gemv<RM> instantiation on a model whose 75 rows split unevenly over the 8
    # forward slices and whose 603 columns end inside a block.
    assert_gpu_matches_cpu(cupy, tol, random_model(rng, n_vertices=201, n_shape=41, n_expression=34, n_albedo=9),
                           batch, rng)


@pytest.mark.parametrize("batch", [1, 5])
def test_gpu_small_batch_with_many_rows_uses_the_tiled_forward(cupy, rng, tol, batch):
    # 530 geometry rows: at batch 5 (8 gemv rows) the coefficient table outgrows the gemv forward's
    # shared memory and the tiled <2, 4> forward serves it; at batch 1 the gemv forward still does.
    assert_gpu_matches_cpu(cupy, tol, random_model(rng, n_vertices=50, n_shape=300, n_expression=230, n_albedo=9),
                           batch, rng)


@pytest.mark.parametrize("path", ["cublas", "tiled"])
@pytest.mark.parametrize("batch", [9, 64, 70])
def test_gpu_large_batch_kernels_match_cpu(cupy, rng, tol, monkeypatch, batch, path):
    # Each large-batch path: cuBLAS between the two small kernels, and the tiled <8, 8> kernels: 75
    # geometry rows (4 full 16-row steps and a partial one), 603 columns (a partial 128-column block),
    # batch tiles of 64.
    monkeypatch.setattr(sys.modules["fastface.model.morphable"], "_LARGE_BATCH_PATH", path)
    assert_gpu_matches_cpu(cupy, tol, random_model(rng, n_vertices=201, n_shape=41, n_expression=34, n_albedo=9),
                           batch, rng)


@pytest.mark.parametrize("batch", [1, 9])  # the gemv and the tiled forward
@pytest.mark.parametrize("given", [(True, False, False), (False, True, False), (False, False, True)])
def test_gpu_evaluate_with_none_blocks_matches_cpu(cupy, rng, tol, batch, given):
    # None blocks slice the basis (a view with an offset: expression only) or leave it with 0 rows
    # (the geometry when only albedo is given, the albedo when it is None): the kernels' K = 0 path.
    model = random_model(rng, n_vertices=201, n_shape=41, n_expression=34, n_albedo=9)
    blocks = [c if g else None for c, g in zip(coefficients(rng, model, batch), given)]
    v_cpu, a_cpu = model.evaluate(*blocks)
    v_gpu, a_gpu = model.to("gpu").evaluate(*[None if b is None else cupy.asarray(b) for b in blocks])
    zeros = [np.zeros((batch, k), np.float32) for k in (model.n_shape, model.n_expression, model.n_albedo)]
    scale_v, scale_a = l1_scale(model, *[b if b is not None else z for b, z in zip(blocks, zeros)])
    assert np.all(np.abs(v_gpu.get() - v_cpu) <= tol["gemm_l1_rtol"] * scale_v)
    assert np.all(np.abs(a_gpu.get() - a_cpu) <= tol["gemm_l1_rtol"] * scale_a)
    if not given[0] and not given[1]:
        assert np.array_equal(v_gpu.get(), np.broadcast_to(model.mean_shape, v_cpu.shape))
    if not given[2]:
        assert np.array_equal(a_gpu.get(), np.broadcast_to(model.mean_albedo, a_cpu.shape))


def test_to_gpu_and_back_keeps_every_array(cupy, small):
    back = small.to("gpu").to("cpu")
    for name in ("mean_shape", "mean_albedo", "triangles", "shape_basis", "expression_std", "albedo_basis",
                 "landmarks", "symmetry"):
        assert np.array_equal(getattr(back, name), getattr(small, name))
    assert back.expression_names == small.expression_names


def test_gpu_rejects_float64_and_numpy_coefficients(cupy, small, rng):
    gpu = small.to("gpu")
    shape, expression, albedo = coefficients(rng, small, 2, np.float64)
    with pytest.raises(TypeError, match="shape_coeffs must be float32 on the GPU"):
        gpu.evaluate(cupy.asarray(shape), cupy.asarray(expression), cupy.asarray(albedo))
    with pytest.raises(TypeError, match="cupy"):
        gpu.evaluate(shape.astype(np.float32), expression.astype(np.float32), albedo.astype(np.float32))
    with pytest.raises(TypeError, match="cupy"):
        small.evaluate(cupy.asarray(shape, dtype=np.float32), None, None)


# ----------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------

def test_bad_coefficients_raise_naming_the_argument(rng):
    model = random_model(rng)
    shape, expression, albedo = coefficients(rng, model, 2)
    with pytest.raises(ValueError, match="shape_coeffs must have shape"):
        model.evaluate(shape[:, :3], expression, albedo)
    with pytest.raises(ValueError, match="albedo_coeffs must have shape"):
        model.evaluate(shape, expression, albedo[0])
    with pytest.raises(TypeError, match="expression_coeffs must be float32 or float64"):
        model.evaluate(shape, expression.astype(np.int32), albedo)
    with pytest.raises(TypeError, match="expression_coeffs must be"):
        model.evaluate(shape, list(expression), albedo)
    with pytest.raises(TypeError, match="albedo_coeffs is float64 but shape_coeffs is float32"):
        model.evaluate(shape, expression, albedo.astype(np.float64))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model.evaluate(shape, expression[:1], albedo)
    bad = shape.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="shape_coeffs holds 1 NaN"):
        model.evaluate(bad, expression, albedo)
    with pytest.raises(ValueError, match="at least one"):
        model.evaluate(None, None, None)


def test_bad_gradients_raise_naming_the_argument(rng):
    model = random_model(rng)
    g = np.zeros((2, model.n_vertices, 3), np.float32)
    with pytest.raises(ValueError, match="grad_vertices must have shape"):
        model.evaluate_backward(g[:, :-1], None)
    with pytest.raises(TypeError, match="grad_albedo is float64 but grad_vertices is float32"):
        model.evaluate_backward(g, g.astype(np.float64))
    with pytest.raises(ValueError, match="batch sizes differ"):
        model.evaluate_backward(g, g[:1])
    with pytest.raises(ValueError, match="grad_vertices or grad_albedo"):
        model.evaluate_backward(None, None)
    g[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="grad_albedo holds 1 NaN or infinite"):
        model.evaluate_backward(None, g)


def test_value_checks_can_be_turned_off(rng):
    model = random_model(rng)
    shape, expression, albedo = coefficients(rng, model, 1)
    shape[0, 0] = np.nan
    with fastface.value_checks(False):
        vertices, _ = model.evaluate(shape, expression, albedo)
    assert np.isnan(vertices).any()


def test_constructor_checks_its_arrays(rng):
    v = 10
    good = dict(mean_shape=np.zeros((v, 3)), triangles=np.array([[0, 1, 2]]), shape_basis=np.zeros((2, 3 * v)),
                shape_std=np.ones(2))
    FaceModel(**good)
    with pytest.raises(ValueError, match="triangles holds vertex indices"):
        FaceModel(**{**good, "triangles": np.array([[0, 1, v]])})
    with pytest.raises(ValueError, match="shape_basis must have shape"):
        FaceModel(**{**good, "shape_basis": np.zeros((2, 3 * v + 1))})
    with pytest.raises(ValueError, match="shape_std must have shape"):
        FaceModel(**{**good, "shape_std": np.ones(3)})
    with pytest.raises(ValueError, match="expression_names must name the 1"):
        FaceModel(**good, expression_basis=np.zeros((1, 3 * v)), expression_std=np.ones(1),
                  expression_names=["a", "b"])
    with pytest.raises(ValueError, match="landmarks must have shape"):
        FaceModel(**good, landmarks=np.arange(5))
    with pytest.raises(ValueError, match="mean_shape holds 1 NaN"):
        FaceModel(**{**good, "mean_shape": np.pad(np.zeros(3 * v - 1), (0, 1), constant_values=np.nan)})
    with pytest.raises(ValueError, match="device must be"):
        FaceModel(**good).to("tpu")


def test_truncated_rejects_more_components_than_the_model_has(rng):
    with pytest.raises(ValueError, match="n_shape must be in"):
        random_model(rng).truncated(n_shape=6)


# ----------------------------------------------------------------------------------------------
# Topology helpers
# ----------------------------------------------------------------------------------------------

def test_laplacian_is_symmetric_with_zero_row_sums(small):
    lap = small.laplacian()
    assert lap.shape == (small.n_vertices, small.n_vertices)
    assert abs(lap - lap.T).max() == 0
    assert np.abs(np.asarray(lap.sum(axis=1))).max() == 0
    assert np.abs(lap @ np.ones(small.n_vertices)).max() == 0
    e = small.edges
    assert small.adjacency.nnz == 2 * e.shape[0]
    # a grid: interior vertices have six neighbours
    degree = np.bincount(e.reshape(-1), minlength=small.n_vertices)
    assert np.median(degree) == 6


def uncached_topology(triangles, n_vertices):
    """Edges, adjacency and Laplacian the slow, obvious way, from scratch."""
    import scipy.sparse

    tri = np.asarray(triangles, dtype=np.int64)
    pairs = {tuple(sorted((int(t[i]), int(t[(i + 1) % 3])))) for t in tri for i in range(3)}
    edges = np.array(sorted(pairs), dtype=np.int32)
    dense = np.zeros((n_vertices, n_vertices), np.float32)
    dense[edges[:, 0], edges[:, 1]] = dense[edges[:, 1], edges[:, 0]] = 1
    laplacian = np.diag(dense.sum(axis=1)) - dense
    return edges, scipy.sparse.csr_matrix(dense), laplacian


def assert_topology_equals_uncached(model, triangles):
    edges, adjacency, laplacian = uncached_topology(triangles, model.n_vertices)
    np.testing.assert_array_equal(model.edges, edges)
    a = model.adjacency
    assert a.dtype == np.float32 and a.shape == adjacency.shape and (a != adjacency).nnz == 0
    np.testing.assert_array_equal(model.laplacian().toarray(), laplacian)


def test_topology_is_computed_once_per_triangle_array(rng, monkeypatch):
    model = random_model(rng)
    calls = []
    real = face_model_module._host
    monkeypatch.setattr(face_model_module, "_host", lambda a: calls.append(1) or real(a))
    for _ in range(3):
        assert_topology_equals_uncached(model, model.triangles)
    assert len(calls) == 1  # on a GPU model, each call is a device-to-host copy and a synchronisation


def test_reassigned_triangles_are_not_served_from_the_cache(rng):
    model = random_model(rng)
    assert_topology_equals_uncached(model, model.triangles)
    other = np.array([rng.choice(model.n_vertices, 3, replace=False) for _ in range(12)], dtype=np.int32)
    model.triangles = other
    assert_topology_equals_uncached(model, other)


def test_cached_sparse_matrices_are_handed_out_as_copies(rng):
    model = random_model(rng)
    a, lap = model.adjacency, model.laplacian()
    a.data[:] = 7
    lap.data[:] = 7
    assert_topology_equals_uncached(model, model.triangles)
    with pytest.raises(ValueError):
        model.edges[0, 0] = 1  # read-only


def test_gpu_topology_is_copied_to_the_host_once(cupy, rng, monkeypatch):
    model = random_model(rng).to("gpu")
    calls = []
    real = face_model_module._host
    monkeypatch.setattr(face_model_module, "_host", lambda a: calls.append(1) or real(a))
    for _ in range(3):
        assert_topology_equals_uncached(model, model.triangles.get())
    assert len(calls) == 1


def test_the_large_batch_path_is_the_one_measured_faster(monkeypatch):
    """Above batch 8 on the GPU (bench/RESULTS.md, GPU run 7): float32 forward tiled, float32 backward and
    every TF32 GEMM through cuBLAS; _LARGE_BATCH_PATH forces one path both ways (the tests of each path)."""
    module = sys.modules["fastface.model.morphable"]
    assert module._LARGE_BATCH_PATH is None
    choice = {(c, b): module._use_cublas(c, backward=b) for c in ("float32", "tf32") for b in (False, True)}
    assert choice == {("float32", False): False, ("float32", True): True, ("tf32", False): True, ("tf32", True): True}
    for path in ("tiled", "cublas"):
        monkeypatch.setattr(module, "_LARGE_BATCH_PATH", path)
        assert {module._use_cublas(c, backward=b) for c in ("float32", "tf32") for b in (False, True)} == {
            path == "cublas"}
