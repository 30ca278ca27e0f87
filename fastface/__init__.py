"""fastface: self-supervised monocular 3D face reconstruction with hand-written kernels."""
from fastface._checks import value_checks

__version__ = "0.1.0"
__all__ = ["value_checks"]
