"""linear: reference, finite differences, GPU parity, bad input."""
import numpy as np
import pytest

from fastface.nn import linear, linear_backward
from tests.gradcheck import assert_gradient_matches


def test_linear_matches_definition(rng):
    x, w, b = rng.normal(size=(3, 5)), rng.normal(size=(5, 4)), rng.normal(size=4)
    ref = np.array([[sum(x[i, k] * w[k, j] for k in range(5)) + b[j] for j in range(4)] for i in range(3)])
    np.testing.assert_allclose(linear(x, w, b), ref, rtol=1e-13)


def test_linear_backward_matches_finite_differences(rng, tol):
    x, w, b = rng.normal(size=(3, 5)), rng.normal(size=(5, 4)), rng.normal(size=4)
    g = rng.normal(size=(3, 4))
    gx, gw, gb = linear_backward(x, w, g)
    assert_gradient_matches(lambda v: linear(v, w, b), x, g, gx, tol)
    assert_gradient_matches(lambda v: linear(x, v, b), w, g, gw, tol)
    assert_gradient_matches(lambda v: linear(x, w, v), b, g, gb, tol)


def test_gpu_linear_matches_cpu(cupy, rng, tol):
    x, w, b, g = (rng.normal(size=s).astype(np.float32) for s in ((6, 33), (33, 17), (17,), (6, 17)))
    np.testing.assert_allclose(linear(*map(cupy.asarray, (x, w, b))).get(), linear(x, w, b),
                               rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"] * 10)
    for got, ref in zip(linear_backward(*map(cupy.asarray, (x, w, g))), linear_backward(x, w, g)):
        np.testing.assert_allclose(got.get(), ref, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"] * 10)


def test_linear_rejects_bad_input(rng):
    x, w = rng.normal(size=(3, 5)), rng.normal(size=(5, 4))
    with pytest.raises(ValueError, match="weight must have shape"):
        linear(x, w[:4])
    with pytest.raises(ValueError, match="bias must have shape"):
        linear(x, w, np.zeros(3))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        linear_backward(x, w, np.zeros((3, 3)))
