"""global_avg_pool: reference, finite differences, GPU parity, bad input."""
import numpy as np
import pytest

from fastface.nn import global_avg_pool, global_avg_pool_backward
from tests.gradcheck import assert_gradient_matches


@pytest.mark.parametrize("relu", [False, True])
def test_global_avg_pool_matches_mean(rng, relu):
    x = rng.normal(size=(2, 3, 5, 4))
    bias = rng.normal(size=4)
    a = np.maximum(x + bias, 0) if relu else x + bias
    np.testing.assert_allclose(global_avg_pool(x, bias, relu), a.mean(axis=(1, 2)), rtol=1e-14)
    np.testing.assert_allclose(global_avg_pool(x), x.mean(axis=(1, 2)), rtol=1e-14)


@pytest.mark.parametrize("relu", [False, True])
def test_global_avg_pool_backward_matches_finite_differences(rng, tol, relu):
    x = rng.normal(size=(2, 3, 5, 4))
    bias = rng.normal(size=4)
    g = rng.normal(size=(2, 4))
    grad_x = global_avg_pool_backward(x, bias, g, relu)
    assert_gradient_matches(lambda v: global_avg_pool(v, bias, relu), x, g, grad_x, tol)
    assert_gradient_matches(lambda v: global_avg_pool(x, v, relu), bias, g, grad_x.sum(axis=(0, 1, 2)), tol)


def test_gpu_global_avg_pool_matches_cpu(cupy, rng, tol):
    x = rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    g = rng.normal(size=(3, 8)).astype(np.float32)
    for relu in (False, True):
        np.testing.assert_allclose(global_avg_pool(cupy.asarray(x), cupy.asarray(bias), relu).get(),
                                   global_avg_pool(x, bias, relu), rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
        np.testing.assert_allclose(
            global_avg_pool_backward(cupy.asarray(x), cupy.asarray(bias), cupy.asarray(g), relu).get(),
            global_avg_pool_backward(x, bias, g, relu), rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])


def test_global_avg_pool_rejects_bad_input(rng):
    x = rng.normal(size=(2, 3, 3, 4))
    with pytest.raises(ValueError, match="x must have shape"):
        global_avg_pool(x[0])
    with pytest.raises(ValueError, match="in_bias must have shape"):
        global_avg_pool(x, np.zeros(3))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        global_avg_pool_backward(x, None, np.zeros((2, 3)))
