"""Face models: fastface's own generated default model, loaders for Basel models, evaluation."""
from fastface.model.face_model import FaceModel
from fastface.model.corrective import CorrectiveSpace
from fastface.model.landmarks import IBUG68_GROUPS, IBUG68_MIRROR

__all__ = ["FaceModel", "IBUG68_GROUPS", "IBUG68_MIRROR"]
__all__ += ["CorrectiveSpace"]
