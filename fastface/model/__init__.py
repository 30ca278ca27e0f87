"""Face models: fastface's own generated default model, loaders for Basel models, evaluation."""
from fastface.model.face_model import FaceModel
from fastface.model.corrective import CorrectiveSpace
from fastface.model.corrective import (
    CorrectiveMesh, corrective_mesh, magnitude_loss, magnitude_loss_backward, reflectance_constancy_loss,
    reflectance_constancy_loss_backward, smoothness_loss, smoothness_loss_backward, symmetry_loss,
    symmetry_loss_backward)
from fastface.model.landmarks import IBUG68_GROUPS, IBUG68_MIRROR

__all__ = ["FaceModel", "IBUG68_GROUPS", "IBUG68_MIRROR"]
__all__ += ["CorrectiveSpace"]
__all__ += ["CorrectiveMesh", "corrective_mesh", "smoothness_loss", "smoothness_loss_backward", "magnitude_loss",
            "magnitude_loss_backward", "reflectance_constancy_loss", "reflectance_constancy_loss_backward",
            "symmetry_loss", "symmetry_loss_backward"]
