"""fastface: self-supervised monocular 3D face reconstruction with hand-written kernels.

The public names: the differentiable ops (each `op` with its `op_backward`), the face model,
the forward render chain, and the switch for the checks that read data (with
`check_device_errors`, which waits for the GPU's checks). The encoder and its
optimizer are in `fastface.nn`.
"""
import os

# Numba's OpenMP workers spin-wait after a parallel region by default, and so do OpenBLAS's
# threads: a chain that alternates BLAS (model evaluation) and parallel Numba kernels then loses
# milliseconds per hand-over on small machines. Passive waiting measured render_faces at batch 8
# 59 -> 42-47 ms on 2 cores and left the Numba-only ops unchanged (bench/RESULTS.md). It takes
# effect only if set before the first parallel call; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from fastface._checks import value_checks  # noqa: E402 - after the thread setting above
from fastface._device_checks import check_device_errors  # noqa: E402
from fastface.model import IBUG68_GROUPS, IBUG68_MIRROR, FaceModel  # noqa: E402
from fastface.ops import *  # noqa: E402,F401,F403 - the op pairs, listed in fastface.ops.__all__
from fastface.ops import __all__ as _ops_all  # noqa: E402
from fastface.render import (FaceGradients, FaceParameters, Rendering, render_faces,  # noqa: E402
                             render_faces_backward, uniform_light)
from fastface.reconstructor import Reconstruction, Reconstructor  # noqa: E402
from fastface.fit import FitResult, fit  # noqa: E402,I001 - `fastface.fit` is the function; from-imports reach the module

__version__ = "0.1.0"
__all__ = [*_ops_all, "FaceModel", "IBUG68_GROUPS", "IBUG68_MIRROR",
           "FaceGradients", "FaceParameters", "Rendering", "render_faces", "render_faces_backward", "uniform_light",
           "value_checks", "check_device_errors", "Reconstructor", "Reconstruction", "fit", "FitResult"]
