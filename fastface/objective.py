"""The self-supervised training objective of the multi-level model: every loss term, weighted, with its gradient.

Tewari et al. (CVPR 2018), Sec. 5: the same data terms at the base and the final level (robust
photometric alignment over the rendered face, sparse landmark alignment), statistical priors on the
morphable model's coefficients, and regularizers that keep the learned corrective space plausible:
geometric smoothness (mesh Laplacian of the offsets), small offsets, left/right symmetry, and
reflectance constancy between neighbours of similar base chromaticity with a sparsity-inducing norm.

The pipeline layer: it calls the loss ops (fastface/ops/losses.py) and the corrective regularizers
(fastface/model/corrective.py) and sums them; each term is a batch mean of per-image values.
"""
import dataclasses

import numpy as np

from fastface._backend import array_module
from fastface.model.corrective import (corrective_mesh, magnitude_loss, magnitude_loss_backward,
                                       reflectance_constancy_loss, reflectance_constancy_loss_backward,
                                       smoothness_loss, smoothness_loss_backward, symmetry_loss,
                                       symmetry_loss_backward)
from fastface.ops.losses import (landmark_loss, landmark_loss_backward, photometric_loss, photometric_loss_backward,
                                 prior_loss, prior_loss_backward)
from fastface.render import FaceParameters

__all__ = ["LossWeights", "MultiLevelObjective", "TERM_NAMES", "landmark_point_weights"]

# The columns of the training log, in order.
TERM_NAMES = ("photometric_base", "photometric_final", "landmarks_base", "landmarks_final", "prior_shape",
              "prior_expression", "prior_albedo", "geometry_smoothness", "geometry_magnitude", "geometry_symmetry",
              "reflectance_constancy", "reflectance_magnitude", "reflectance_symmetry")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The weight of every term (0 turns it off). Chosen on the synthetic training data (README).

    The landmark term is in units of the image height: its per-image value (pixels squared) is
    divided by H^2 before the weight applies, so the weights mean the same at every resolution.
    """
    photometric: float = 1.0
    landmarks: float = 60.0
    prior_shape: float = 2e-3
    prior_expression: float = 4e-3
    prior_albedo: float = 2e-3
    geometry_smoothness: float = 2e-3
    geometry_magnitude: float = 1e-4
    geometry_symmetry: float = 1e-3
    reflectance_constancy: float = 0.05
    reflectance_magnitude: float = 0.05
    reflectance_symmetry: float = 0.2

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: float(v) for k, v in d.items() if k in known})


# Pixels of an image per pixel of its face at the default framing: the weight of a photometric term
# averaged over the whole image (antialiased into it) instead of over the face's pixels. fastface.fit
# uses it too (chosen there on the annotated photos).
OUTLINE_PHOTOMETRIC_SCALE = 2.5


def landmark_point_weights():
    """(68,) float32 per-point weights: the jaw line (0-16) half, since on photos its points slide
    along the outline; the eyes, nose and mouth full."""
    w = np.ones(68, np.float32)
    w[:17] = 0.5
    return w


class MultiLevelObjective:
    """Evaluates every term on one forward's output and returns the gradients `FaceAutoencoder.backward` takes.

    Args:
        model: the base FaceModel (its mesh and symmetry feed the regularizers).
        resolution: (H, W) of the images.
        weights: `LossWeights`.
    """

    def __init__(self, model, resolution, weights=None):
        self.model = model
        self.resolution = tuple(int(r) for r in resolution)
        self.weights = weights or LossWeights()
        self.mesh = corrective_mesh(model)
        self._xp = array_module(("model", model.mean_shape))
        self._point_weights = {}  # dtype -> (68,) weights on the model's device
        self._inverse_height2 = 1.0 / float(self.resolution[0]) ** 2
        self._weight_vectors = {}  # (weight / B, B, dtype) -> (B,) per-image weights on the model's device
        self._whole_image_masks = {}  # (B, H, W) -> all-true mask: the antialiased photometric term's

    def __call__(self, out, images, target_landmarks, final=True):
        """Loss terms and gradients of one batch.

        Args:
            out: `AutoencoderOutput` (out.final may be None: base level only, the first stage).
            images: (B, H, W, 3) the input images. target_landmarks: (B, 68, 2) pixels, or None.
            final: include the final level's terms and the corrective regularizers.

        Returns:
            (terms, grads): terms maps TERM_NAMES (those computed) to (B,) per-image weighted values
            (their batch means sum to the loss); grads is the dict `FaceAutoencoder.backward` takes.
        """
        w = self.weights
        B = images.shape[0]
        terms, grads = {}, {}
        scale = 1.0 / B
        xp = array_module(("images", images))

        def weight_vector(weight):
            # Made once per (weight, batch, dtype) and kept: each is a kernel launch on the GPU, 13 of
            # them a step (22 us at batch 64 on an H200, where the kernels are short).
            key = (float(weight) * scale, B, np.dtype(images.dtype))
            vector = self._weight_vectors.get(key)
            if vector is None:
                vector = self._weight_vectors[key] = xp.full(B, key[0], dtype=images.dtype)
            return vector

        point_weights = self._point_weights.get(np.dtype(images.dtype))
        if point_weights is None:
            point_weights = self._xp.asarray(landmark_point_weights().astype(images.dtype))
            self._point_weights[np.dtype(images.dtype)] = point_weights
        levels = [("base", out.base)] + ([("final", out.final)] if final and out.final is not None else [])
        for level, r in levels:
            if w.photometric:
                mask, weight = r.mask, w.photometric
                if r.composited is not None:
                    # Antialiased into the input: the blend at the outline lies outside the face's pixels, so
                    # the term covers the whole image (zero where the input shows through), scaled by the
                    # image's pixels per face pixel at the training framing to keep its weight.
                    mask = self._whole_image_masks.get(r.mask.shape)
                    if mask is None:  # made once per shape and kept, like the weight vectors
                        mask = self._whole_image_masks[r.mask.shape] = xp.ones(r.mask.shape, dtype=bool)
                    weight = weight * OUTLINE_PHOTOMETRIC_SCALE
                terms[f"photometric_{level}"] = weight * photometric_loss(r.image, images, mask)
                grads[f"{level}_image"] = photometric_loss_backward(r.image, images, mask, weight_vector(weight))
            if w.landmarks and target_landmarks is not None:
                lw = w.landmarks * self._inverse_height2
                terms[f"landmarks_{level}"] = lw * landmark_loss(r.landmarks, target_landmarks, point_weights)
                grads[f"{level}_landmarks"] = landmark_loss_backward(r.landmarks, target_landmarks, point_weights,
                                                                     weight_vector(lw))
        prior_grads = {}
        for name in ("shape", "expression", "albedo"):
            weight = getattr(w, f"prior_{name}")
            if weight:
                coeffs = getattr(out.params, name)
                terms[f"prior_{name}"] = weight * prior_loss(coeffs)
                prior_grads[name] = prior_loss_backward(coeffs, None, weight_vector(weight))
        grads["params"] = FaceParameters(shape=prior_grads.get("shape"), expression=prior_grads.get("expression"),
                                         albedo=prior_grads.get("albedo"), sh=None, angles=None, translation=None)
        if final and out.final is not None:
            geo, ref = out.geometry_offsets, out.reflectance_offsets
            # Reflectance constancy on the final albedo, weighted by the base albedo's chromaticity:
            # neighbours of one material keep one reflectance, edges between materials (lips, brows)
            # may stay. Its gradient goes to the offsets only (a regularizer of the corrective level).
            final_albedo = out.final.albedo
            guide = out.base.albedo if out.base is not None else final_albedo - ref
            mesh = self.mesh
            # (term, the offsets it regularizes, forward, backward given the per-image weights and the
            # gradient so far, which it adds into: one buffer per field, no full-size adds in between)
            regularizers = (
                ("geometry_smoothness", "geometry", lambda: smoothness_loss(geo, mesh),
                 lambda g, acc: smoothness_loss_backward(geo, mesh, g, add_to=acc)),
                ("geometry_magnitude", "geometry", lambda: magnitude_loss(geo),
                 lambda g, acc: magnitude_loss_backward(geo, g, add_to=acc)),
                ("geometry_symmetry", "geometry", lambda: symmetry_loss(geo, mesh, True),
                 lambda g, acc: symmetry_loss_backward(geo, mesh, g, True, add_to=acc)),
                ("reflectance_constancy", "reflectance", lambda: reflectance_constancy_loss(final_albedo, guide, mesh),
                 lambda g, acc: reflectance_constancy_loss_backward(final_albedo, guide, mesh, g, add_to=acc)),
                ("reflectance_magnitude", "reflectance", lambda: magnitude_loss(ref),
                 lambda g, acc: magnitude_loss_backward(ref, g, add_to=acc)),
                ("reflectance_symmetry", "reflectance", lambda: symmetry_loss(ref, mesh, False),
                 lambda g, acc: symmetry_loss_backward(ref, mesh, g, False, add_to=acc)),
            )
            offset_grads = {"geometry": None, "reflectance": None}
            for name, target, forward, backward in regularizers:
                weight = getattr(w, name)
                if weight:
                    terms[name] = weight * forward()
                    offset_grads[target] = backward(weight_vector(weight), offset_grads[target])
            grads["geometry_offsets"] = (xp.zeros_like(geo) if offset_grads["geometry"] is None
                                         else offset_grads["geometry"])
            grads["reflectance_offsets"] = (xp.zeros_like(ref) if offset_grads["reflectance"] is None
                                            else offset_grads["reflectance"])
        return terms, grads
