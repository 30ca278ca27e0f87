"""relu / leaky relu: reference, finite differences, GPU parity, bad input."""
import numpy as np
import pytest

from fastface.nn import relu, relu_backward
from tests.gradcheck import assert_gradient_matches


def _away_from_zero(rng, shape):
    """Values at least 0.05 from the kink, so central differences never straddle it."""
    x = rng.normal(size=shape)
    return np.where(np.abs(x) < 0.05, 0.05 * np.sign(x) + 0.05, x)


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu_matches_definition(rng, slope):
    x = rng.normal(size=(3, 4, 5))
    np.testing.assert_array_equal(relu(x, slope), np.where(x > 0, x, slope * x))


@pytest.mark.parametrize("slope", [0.0, 0.1])
def test_relu_backward_matches_finite_differences(rng, tol, slope):
    x = _away_from_zero(rng, (2, 3, 4))
    g = rng.normal(size=x.shape)
    assert_gradient_matches(lambda v: relu(v, slope), x, g, relu_backward(x, g, slope), tol)


def test_relu_derivative_at_zero_is_the_left_one():
    x = np.zeros(3)
    np.testing.assert_array_equal(relu_backward(x, np.ones(3), 0.2), [0.2, 0.2, 0.2])


def test_gpu_relu_matches_cpu(cupy, rng):
    x = rng.normal(size=(4, 5)).astype(np.float32)
    g = rng.normal(size=(4, 5)).astype(np.float32)
    np.testing.assert_array_equal(relu(cupy.asarray(x), 0.1).get(), relu(x, 0.1))
    np.testing.assert_array_equal(relu_backward(cupy.asarray(x), cupy.asarray(g), 0.1).get(), relu_backward(x, g, 0.1))


def test_relu_rejects_bad_input(rng):
    with pytest.raises(TypeError, match="x must be"):
        relu(np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="negative_slope"):
        relu(np.zeros(3), negative_slope=1.5)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        relu_backward(np.zeros(3), np.zeros(4))
