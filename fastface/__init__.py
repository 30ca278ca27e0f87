"""fastface: self-supervised monocular 3D face reconstruction with hand-written kernels.

The public names: the differentiable ops (each `op` with its `op_backward`), the face model,
the forward render chain, and the switch for the checks that read data. The encoder and its
optimizer are in `fastface.nn`.
"""
from fastface._checks import value_checks
from fastface.model import IBUG68_GROUPS, IBUG68_MIRROR, FaceModel
from fastface.ops import *  # noqa: F401,F403 - the op pairs, listed in fastface.ops.__all__
from fastface.ops import __all__ as _ops_all
from fastface.render import FaceParameters, Rendering, render_faces, uniform_light

__version__ = "0.1.0"
__all__ = [*_ops_all, "FaceModel", "IBUG68_GROUPS", "IBUG68_MIRROR",
           "FaceParameters", "Rendering", "render_faces", "uniform_light", "value_checks"]
