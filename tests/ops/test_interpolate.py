"""Tests of fastface.ops.interpolate: reference, gradients, GPU parity, bad input."""
import numpy as np
import pytest

import fastface
from bench.workloads import spherical_cap
from fastface.ops.interpolate import interpolate, interpolate_backward
from fastface.ops.rasterize import Raster, rasterize
from tests.gradcheck import assert_gradient_matches


def reference_interpolate(attr, tri_id, bary, tri):
    """Pixel by pixel in float64."""
    attr = np.asarray(attr, np.float64)
    B, H, W = tri_id.shape
    out = np.zeros((B, H, W, attr.shape[-1]))
    for b in range(B):
        a = attr[b] if attr.ndim == 3 else attr
        for i in range(H):
            for j in range(W):
                t = tri_id[b, i, j]
                if t < 0:
                    continue
                u, v = bary[b, i, j]
                out[b, i, j] = u * a[tri[t, 0]] + v * a[tri[t, 1]] + (1 - u - v) * a[tri[t, 2]]
    return out


@pytest.fixture
def scene(rng):
    pos, tri, colors = spherical_cap(n=9, batch=2, seed=1)
    raster = rasterize(pos, tri, (18, 20))
    return pos, tri, colors, raster


def _raster64(raster):
    return Raster(raster.tri_id, raster.bary.astype(np.float64), raster.depth.astype(np.float64))


# 1. Forward against the reference.

def test_interpolate_matches_reference_for_shared_and_batched_attributes(scene, rng, tol):
    _, tri, colors, raster = scene
    for attr in (colors, rng.uniform(size=(2,) + colors.shape).astype(np.float32), colors[:, :1].copy(),
                 rng.uniform(size=(colors.shape[0], 7)).astype(np.float32)):
        out = interpolate(attr, raster, tri)
        assert out.shape == raster.tri_id.shape + (attr.shape[-1],) and out.dtype == np.float32
        np.testing.assert_allclose(out, reference_interpolate(attr, raster.tri_id, raster.bary, tri),
                                   atol=tol["float32_reference_atol"])
        assert (out[raster.tri_id < 0] == 0).all()


def test_interpolate_reproduces_vertex_values_at_barycentric_corners():
    tri = np.array([[0, 1, 2]], np.int32)
    attr = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, 3.0]], np.float32)
    raster = Raster(np.zeros((1, 1, 3), np.int32),
                    np.array([[[[1, 0], [0, 1], [0, 0]]]], np.float32), np.zeros((1, 1, 3), np.float32))
    np.testing.assert_array_equal(interpolate(attr, raster, tri)[0, 0], attr)


# 2. Backward against central differences (float64).

def test_interpolate_backward_matches_finite_differences(scene, rng, tol):
    _, tri, colors, raster = scene
    raster = _raster64(raster)
    for attr in (colors.astype(np.float64), rng.uniform(size=(2,) + colors.shape)):
        grad_out = rng.standard_normal(raster.tri_id.shape + (attr.shape[-1],))
        grad_attr, grad_bary = interpolate_backward(attr, raster, tri, grad_out)
        assert grad_attr.shape == attr.shape and grad_bary.shape == raster.bary.shape
        assert (grad_bary[raster.tri_id < 0] == 0).all()
        assert_gradient_matches(lambda a: interpolate(a, raster, tri), attr, grad_out, grad_attr, tol,
                                n_samples=50, rng=rng)

        def of_bary(bary):
            return interpolate(attr, Raster(raster.tri_id, bary, raster.depth), tri)

        assert_gradient_matches(of_bary, raster.bary, grad_out, grad_bary, tol, n_samples=50, rng=rng)


# 3. GPU against CPU.

def test_gpu_interpolate_and_backward_match_cpu(cupy, rng, tol):
    pos, tri, colors = spherical_cap(n=41, batch=3, seed=8)
    raster = rasterize(pos, tri, (48, 52))
    graster = Raster(*(cupy.asarray(a) for a in (raster.tri_id, raster.bary, raster.depth)))
    # C = 3 (float4 accumulator, copied out), 3 per image, 6 (runtime C, scalar atomics), 4 per image
    # (float4 atomics into the output itself).
    for attr in (colors, rng.uniform(size=(3,) + colors.shape).astype(np.float32),
                 rng.uniform(size=(colors.shape[0], 6)).astype(np.float32),
                 rng.uniform(size=(3, colors.shape[0], 4)).astype(np.float32)):
        out = interpolate(attr, raster, tri)
        gout = interpolate(cupy.asarray(attr), graster, cupy.asarray(tri))
        np.testing.assert_allclose(gout.get(), out, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
        grad_out = rng.standard_normal(out.shape).astype(np.float32)
        ga, gb = interpolate_backward(attr, raster, tri, grad_out)
        with fastface.value_checks(False):
            gga, ggb = interpolate_backward(cupy.asarray(attr), graster, cupy.asarray(tri), cupy.asarray(grad_out))
        assert gga.shape == attr.shape and gga.flags.c_contiguous
        np.testing.assert_allclose(ggb.get(), gb, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
        # grad_attr sums many pixels with atomics in another order.
        np.testing.assert_allclose(gga.get(), ga, rtol=tol["gpu_cpu_scatter_rtol"],
                                   atol=tol["gpu_cpu_scatter_atol_of_max"] * np.abs(ga).max())


# 4. Bad input.

def test_bad_inputs_raise_naming_the_argument(scene):
    _, tri, colors, raster = scene
    with pytest.raises(TypeError, match="attr must"):
        interpolate(colors.astype(np.float64), raster, tri)
    with pytest.raises(ValueError, match="attr must have shape"):
        interpolate(colors[:, 0], raster, tri)
    with pytest.raises(ValueError, match="batch sizes differ"):
        interpolate(np.stack([colors] * 3), raster, tri)
    with pytest.raises(ValueError, match="tri holds vertex indices"):
        interpolate(colors[:10], raster, tri)
    with pytest.raises(TypeError, match="raster must be a Raster"):
        interpolate(colors, raster.tri_id, tri)
    with pytest.raises(TypeError, match="raster.tri_id must be int32"):
        interpolate(colors, Raster(raster.tri_id.astype(np.int64), raster.bary, raster.depth), tri)
    with pytest.raises(ValueError, match="raster.tri_id holds triangle ids"):
        interpolate(colors, raster, tri[:4])
    with pytest.raises(ValueError, match="grad_out must have shape"):
        interpolate_backward(colors, raster, tri, np.zeros(raster.tri_id.shape + (2,), np.float32))
    bad = colors.copy()
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="attr holds 1 NaN or infinite"):
        interpolate(bad, raster, tri)


@pytest.mark.parametrize("n_bands", [2, 3, 5])
def test_row_band_sums_of_the_backward_equal_whole_images(rng, monkeypatch, n_bands):
    # With fewer images than CPU threads interpolate_backward splits each image into row bands with
    # accumulators of their own (per image for per-image attributes) that the caller sums. On a
    # two-core machine a batch of 2 or more never splits, so the band count is forced here.
    import sys  # noqa: PLC0415

    module = sys.modules["fastface.ops.interpolate"]
    pos, tri, colors = spherical_cap(n=9, batch=3, seed=2)
    raster = _raster64(rasterize(pos, tri, (15, 17)))
    grad_out = rng.standard_normal((3, 15, 17, 3))
    for attr in (rng.uniform(size=(3,) + colors.shape), colors.astype(np.float64)):
        monkeypatch.setattr(module, "_n_bands", lambda B, H: 1)
        want_attr, want_bary = interpolate_backward(attr, raster, tri, grad_out)
        monkeypatch.setattr(module, "_n_bands", lambda B, H: n_bands)
        grad_attr, grad_bary = interpolate_backward(attr, raster, tri, grad_out)
        assert grad_attr.shape == attr.shape
        np.testing.assert_allclose(grad_attr, want_attr, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(grad_bary, want_bary)
