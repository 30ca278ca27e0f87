"""Inference with a trained multi-level model: images in, parameters, both levels' geometry and albedo out.

    rec = fastface.Reconstructor("run/checkpoint.h5", device="cpu")
    out = rec(images)                    # (B, H, W, 3) float32 RGB in [0, 1], H, W = rec.resolution
    out.vertices_final, out.albedo_final # (B, V, 3) model space, before the pose
    out.render("final").image            # (B, H, W, 3)

The framing a caller must match: the faces the model was trained on were seen through a camera of
focal length `rec.focal` (pixels) at about `rec.translation` (mm, camera space); crop photos so
that the face sits as it does in the synthetic training images (fastface.io.crop_from_landmarks).
"""
import dataclasses

import numpy as np

from fastface._backend import array_module
from fastface._checks import check_array, check_finite, value_checks

__all__ = ["Reconstructor", "Reconstruction"]


@dataclasses.dataclass
class Reconstruction:
    """What `Reconstructor.__call__` returns for a batch."""
    params: object            # FaceParameters (shared pose and light; base-level coefficients)
    z_geo: object             # (B, n_geometry)
    z_ref: object             # (B, n_reflectance)
    vertices_base: object     # (B, V, 3) model space, mm
    vertices_final: object
    albedo_base: object       # (B, V, 3)
    albedo_final: object
    landmarks: object         # (B, 68, 2) pixels of the input (final level), docs/conventions.md
    _reconstructor: object = dataclasses.field(repr=False, default=None)

    def render(self, level="final"):
        """The `Rendering` of one level ("base" or "final") at the input's resolution and framing."""
        from fastface.render import render_faces
        rec = self._reconstructor
        if level == "base":
            return render_faces(rec.model, self.params, rec.resolution, rec.focal)
        if level == "final":
            return render_faces(rec.model, self.params, rec.resolution, rec.focal,
                                geometry_offsets=self.vertices_final - self.vertices_base,
                                reflectance_offsets=self.albedo_final - self.albedo_base)
        raise ValueError(f"level must be 'base' or 'final'; got {level!r}")


class Reconstructor:
    """A trained encoder, corrective space and base model, ready for inference.

    Args:
        checkpoint_path: a checkpoint written by `python -m fastface train`.
        device: "cpu" or "gpu".

    Attributes:
        resolution: (H, W) of the images it takes. model: the base FaceModel. focal: pixels.
        translation: (3,) float the mean camera-space translation (mm) of its training faces.
        layout: the CodeLayout. settings: the training settings.
    """

    def __init__(self, checkpoint_path, device="cpu"):
        from fastface.checkpoint import load_checkpoint
        from fastface.train import TrainSettings, build
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")
        checkpoint = load_checkpoint(checkpoint_path)
        settings = TrainSettings.from_dict(checkpoint.settings)
        settings.device = device
        self.settings = settings
        self._autoencoder, _, _ = build(settings, checkpoint)
        ae = self._autoencoder
        self.model, self.layout = ae.model, ae.layout
        self.resolution, self.focal = ae.resolution, ae.focal
        self.translation = np.asarray(ae.layout.translation, dtype=np.float32)
        self.step = checkpoint.step

    @property
    def device(self):
        return self.model.device

    def __call__(self, images):
        """Reconstructs a batch: (B, H, W, 3) float32 RGB in [0, 1] on the reconstructor's device."""
        xp = array_module(("images", images), ("the reconstructor's model", self.model.mean_shape))
        H, W = self.resolution
        check_array("images", images, np.float32, ("B", H, W, 3))
        check_finite("images", images)
        ae = self._autoencoder
        with value_checks(False):
            code = ae.encoder.forward(xp.ascontiguousarray(images))
            params, z_geo, z_ref = ae.decode(code)
            base_v, base_a = self.model.evaluate(params.shape, params.expression, params.albedo)
            geo, ref = ae.correctives.evaluate(z_geo, z_ref)
            from fastface.ops.camera import euler_rotation, project_to_pixels, rigid_transform
            final_v, final_a = base_v + geo, base_a + ref
            cam = rigid_transform(final_v[:, self.model.landmarks], euler_rotation(params.angles), params.translation)
        landmarks = project_to_pixels(cam, self.focal, self.resolution)
        return Reconstruction(params=params, z_geo=z_geo, z_ref=z_ref, vertices_base=base_v, vertices_final=final_v,
                              albedo_base=base_a, albedo_final=final_a, landmarks=landmarks, _reconstructor=self)
