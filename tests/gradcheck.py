"""Central finite differences in float64, shared by every backward test."""
import numpy as np


def numerical_gradient(f, x, grad_out, eps=1e-6, indices=None):
    """d<f(x), grad_out>/dx by central differences, at `indices` (flat) or at every entry.

    Args:
        f: function of one float64 array returning a float64 array shaped like grad_out.
        x: float64 array (not modified).
        grad_out: float64 array, the weights of the scalar <f(x), grad_out>.
        indices: flat indices of x to perturb; None for all.

    Returns:
        float64 array of the sampled derivatives, in the order of `indices`.
    """
    x = np.array(x, dtype=np.float64, copy=True)
    flat = x.reshape(-1)
    indices = np.arange(flat.size) if indices is None else np.asarray(indices)
    out = np.empty(len(indices))
    for k, i in enumerate(indices):
        saved = flat[i]
        flat[i] = saved + eps
        plus = np.sum(f(x) * grad_out)
        flat[i] = saved - eps
        minus = np.sum(f(x) * grad_out)
        flat[i] = saved
        out[k] = (plus - minus) / (2 * eps)
    return out


def assert_gradient_matches(f, x, grad_out, analytic, tol, n_samples=None, rng=None, eps=1e-6):
    """Asserts that `analytic` (shaped like x) equals the central-difference gradient.

    Samples `n_samples` entries (all if None). Also runs the negative control: the same
    comparison with the analytic gradient's sign flipped must fail, so the check is seen to
    be able to fail.
    """
    analytic = np.asarray(analytic, dtype=np.float64).reshape(-1)
    if n_samples is None or n_samples >= analytic.size:
        indices = np.arange(analytic.size)
    else:
        indices = (rng or np.random.default_rng(0)).choice(analytic.size, n_samples, replace=False)
    numeric = numerical_gradient(f, x, grad_out, eps=eps, indices=indices)
    scale = max(np.abs(numeric).max(), 1e-12)
    err = np.abs(analytic[indices] - numeric).max() / scale
    assert err <= tol["gradcheck_rtol"] * 10 or np.allclose(
        analytic[indices], numeric, rtol=tol["gradcheck_rtol"], atol=tol["gradcheck_atol"]
    ), f"gradient mismatch: max relative error {err:.3e}"
    if np.abs(numeric).max() > 1e-9:  # negative control: a flipped sign must be caught
        flipped_err = np.abs(-analytic[indices] - numeric).max() / scale
        assert flipped_err > tol["gradcheck_rtol"] * 10, "negative control passed: the check cannot fail"
