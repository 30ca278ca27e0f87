"""The multi-level face autoencoder: encoder -> code -> base model + corrective space -> two renderings.

Tewari et al. (CVPR 2018), "Self-supervised Multi-level Face Model Learning for Monocular
Reconstruction at over 250 Hz": one CNN regresses, from one image, the parameters of a morphable
model (identity, expression, albedo), the pose, the SH illumination, and the codes of a corrective
space learned jointly with it. Two levels are rendered from one code:

    base level:  vertices = morphable model;             albedo = morphable model
    final level: vertices = morphable model + D_g z_geo;  albedo = morphable model + D_r z_ref

The pipeline layer: it chains the encoder, the model, the corrective space and the renderer, and owns
nothing numeric of its own. `FaceAutoencoder.forward` runs the chain, `backward` takes the gradients
of the losses with respect to the two renderings (image, landmarks), the parameters and the offsets,
and fills `encoder.grads` and `correctives.grads`. The losses and their weights live in
fastface/objective.py, the loop in fastface/train.py, inference in `Reconstructor`.
"""
import dataclasses

import numpy as np

from fastface._backend import array_module
from fastface._checks import check_array, value_checks
from fastface.render import FaceParameters, render_faces, render_faces_backward

__all__ = ["CodeLayout", "FaceAutoencoder", "AutoencoderOutput"]

# 1 / (pi * Y_0): the SH coefficient gamma_{0,c} under which a colour equals its albedo.
_AMBIENT = 1.0 / (np.pi * 0.28209479177387814)
_PARAMETER_NAMES = ("shape", "expression", "albedo", "sh", "angles", "translation")


@dataclasses.dataclass(frozen=True)
class CodeLayout:
    """Where each parameter sits in the encoder's output, and how a raw output becomes its value.

    code = [shape (80) | expression (64) | albedo (80) | sh (27) | angles (3) | translation (3) |
            z_geo (n_geometry) | z_ref (n_reflectance)]: 257 numbers as in the paper, then the
    corrective codes. A parameter is `offset + scale * raw`. The offsets make an untrained encoder
    (raw outputs near 0) predict the mean face, frontal, at the training framing's translation,
    under ambient light that shows the albedo as it is. The scales are each parameter's natural
    range (1 standard deviation for the coefficients, 0.5 rad for the angles, 20 / 20 / 60 mm for
    the translation, 0.5 for the SH coefficients): with Adam, whose weight steps do not depend on
    the gradient's scale, they set how fast each output moves, so that all of them learn at a
    comparable pace. The corrective codes are scaled too: Adam moves every basis entry of the
    corrective space by about its learning rate per step in the entry's own units, millimetres for
    the geometry and albedo for the reflectance; a code scale s makes the offsets learn s times
    faster (geometry_code_scale 30: the geometry basis learns at the pace a face's millimetre detail
    needs; measured in README's training table).
    """
    n_shape: int = 80
    n_expression: int = 64
    n_albedo: int = 80
    n_geometry: int = 64
    n_reflectance: int = 64
    translation: tuple = (0.0, 0.0, -650.0)
    angle_scale: float = 0.5
    translation_scale: tuple = (20.0, 20.0, 60.0)
    sh_scale: float = 0.5
    geometry_code_scale: float = 30.0
    reflectance_code_scale: float = 1.0

    def __post_init__(self):
        for name in ("n_shape", "n_expression", "n_albedo", "n_geometry", "n_reflectance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
        if len(tuple(self.translation)) != 3 or len(tuple(self.translation_scale)) != 3:
            raise ValueError("translation and translation_scale must have 3 entries each")

    @property
    def sizes(self):
        """Name -> number of code entries, in code order."""
        return {"shape": self.n_shape, "expression": self.n_expression, "albedo": self.n_albedo, "sh": 27,
                "angles": 3, "translation": 3, "z_geo": self.n_geometry, "z_ref": self.n_reflectance}

    @property
    def size(self):
        return int(sum(self.sizes.values()))

    @property
    def slices(self):
        out, start = {}, 0
        for name, n in self.sizes.items():
            out[name] = slice(start, start + n)
            start += n
        return out

    def offset_and_scale(self):
        """(offset, scale), each (size,) float64: parameter = offset + scale * raw output."""
        offset, scale = np.zeros(self.size), np.ones(self.size)
        s = self.slices
        sh_offset = np.zeros((9, 3))
        sh_offset[0, :] = _AMBIENT
        offset[s["sh"]] = sh_offset.reshape(-1)
        scale[s["sh"]] = self.sh_scale
        scale[s["angles"]] = self.angle_scale
        offset[s["translation"]] = self.translation
        scale[s["translation"]] = self.translation_scale
        scale[s["z_geo"]] = self.geometry_code_scale
        scale[s["z_ref"]] = self.reflectance_code_scale
        return offset, scale

    def to_dict(self):
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        for k in ("translation", "translation_scale"):
            if k in d:
                d[k] = tuple(float(x) for x in d[k])
        return cls(**d)


@dataclasses.dataclass
class AutoencoderOutput:
    """One forward pass: the code, what it decodes to, and the renderings of both levels."""
    code: object                 # (B, P) raw encoder output
    params: FaceParameters       # base-level parameters (pose and light are shared by both levels)
    z_geo: object                # (B, n_geometry) corrective geometry code
    z_ref: object                # (B, n_reflectance) corrective reflectance code
    geometry_offsets: object     # (B, V, 3) mm, or None when the final level was not asked for
    reflectance_offsets: object  # (B, V, 3), or None
    base: object                 # Rendering of the base level, or None
    final: object                # Rendering of the final level, or None


class FaceAutoencoder:
    """Encoder + morphable model + corrective space + renderer, forward and backward.

    Args:
        model: the base `FaceModel` (its component counts must equal the layout's).
        encoder: `fastface.nn.Encoder` with n_outputs == layout.size, on the model's device.
        correctives: `fastface.model.CorrectiveSpace` with the layout's code sizes, same device.
        layout: `CodeLayout`.
        resolution: (H, W) of the images.
        focal: focal length in pixels of the training framing.
        antialias: render both levels with their outline blended into the input images.
    """

    def __init__(self, model, encoder, correctives, layout, resolution, focal, antialias=False):
        if (model.n_shape, model.n_expression, model.n_albedo) != (layout.n_shape, layout.n_expression,
                                                                    layout.n_albedo):
            raise ValueError(f"the model has {model.n_shape}/{model.n_expression}/{model.n_albedo} shape/expression/"
                             f"albedo components but the layout {layout.n_shape}/{layout.n_expression}/"
                             f"{layout.n_albedo}; truncate the model (model.truncated) or change the layout")
        if encoder.settings["n_outputs"] != layout.size:
            raise ValueError(f"the encoder has {encoder.settings['n_outputs']} outputs; the layout needs {layout.size}")
        if (correctives.n_geometry, correctives.n_reflectance) != (layout.n_geometry, layout.n_reflectance):
            raise ValueError(f"the corrective space has codes of {correctives.n_geometry}/{correctives.n_reflectance}; "
                             f"the layout needs {layout.n_geometry}/{layout.n_reflectance}")
        if correctives.n_vertices != model.n_vertices:
            raise ValueError(f"the corrective space has {correctives.n_vertices} vertices, the model {model.n_vertices}")
        self.model, self.encoder, self.correctives, self.layout = model, encoder, correctives, layout
        self.resolution = tuple(int(r) for r in resolution)
        self.focal = float(focal)
        # Render both levels with the outline blended into the input image (fastface.ops.antialias), so
        # that the silhouette, not only the shading and the landmarks, pulls on the geometry.
        self.antialias = bool(antialias)
        xp = array_module(("model", model.mean_shape))
        offset, scale = layout.offset_and_scale()
        self._offset = xp.asarray(offset.astype(np.float32))
        self._scale = xp.asarray(scale.astype(np.float32))

    @property
    def device(self):
        return self.model.device

    # -- the code -----------------------------------------------------------------------------
    def decode(self, code):
        """(FaceParameters, z_geo, z_ref) from a (B, P) raw code."""
        xp = array_module(("code", code), ("model", self.model.mean_shape))
        check_array("code", code, (np.float32, np.float64) if xp is np else np.float32, ("B", self.layout.size))
        full = self._offset + self._scale * code
        s, B = self.layout.slices, code.shape[0]
        take = lambda name: xp.ascontiguousarray(full[:, s[name]])  # noqa: E731
        params = FaceParameters(shape=take("shape"), expression=take("expression"), albedo=take("albedo"),
                                sh=take("sh").reshape(B, 9, 3), angles=take("angles"),
                                translation=take("translation"))
        return params, take("z_geo"), take("z_ref")

    def decode_backward(self, grad_params, grad_z_geo, grad_z_ref, batch, dtype=np.float32):
        """(B, P) gradient of the raw code from the gradients of what `decode` returned (None: zero)."""
        xp = array_module(("model", self.model.mean_shape))
        grad = xp.zeros((batch, self.layout.size), dtype=dtype)
        s = self.layout.slices
        for name in _PARAMETER_NAMES:
            g = None if grad_params is None else getattr(grad_params, name)
            if g is not None:
                grad[:, s[name]] = g.reshape(batch, -1)
        if grad_z_geo is not None:
            grad[:, s["z_geo"]] = grad_z_geo
        if grad_z_ref is not None:
            grad[:, s["z_ref"]] = grad_z_ref
        grad *= self._scale
        return grad

    # -- forward and backward -----------------------------------------------------------------
    def forward(self, images, final=True, base=True):
        """Encodes `images` and renders the levels asked for.

        Args:
            images: (B, H, W, 3) float32 in [0, 1], on the model's device.
            final: decode the correctives and render the final level.
            base: render the base level.

        Returns:
            `AutoencoderOutput`.
        """
        code = self.encoder.forward(images)
        params, z_geo, z_ref = self.decode(code)
        geometry_offsets = reflectance_offsets = None
        base_render = final_render = None
        outline = dict(antialias=True, background=images) if self.antialias else {}
        if base:
            base_render = render_faces(self.model, params, self.resolution, self.focal, **outline)
        if final:
            geometry_offsets, reflectance_offsets = self.correctives.evaluate(z_geo, z_ref)
            # Both levels share the morphable model's evaluation: the final level adds the offsets to it.
            evaluated = None if base_render is None else (base_render.vertices, base_render.albedo)
            final_render = render_faces(self.model, params, self.resolution, self.focal,
                                        geometry_offsets=geometry_offsets, reflectance_offsets=reflectance_offsets,
                                        evaluated=evaluated, **outline)
        return AutoencoderOutput(code=code, params=params, z_geo=z_geo, z_ref=z_ref,
                                 geometry_offsets=geometry_offsets, reflectance_offsets=reflectance_offsets,
                                 base=base_render, final=final_render)

    def backward(self, out, grads):
        """Backpropagates the losses' gradients to the encoder's and the corrective space's weights.

        Args:
            out: the `AutoencoderOutput` of the forward.
            grads: dict with any of "base_image", "base_landmarks", "final_image", "final_landmarks"
                (gradients of the renderings' image and landmarks), "params" (a FaceParameters of
                gradients added to the decoded parameters' own, fields may be None: the priors),
                "geometry_offsets" and "reflectance_offsets" ((B, V, 3), the regularizers').

        Fills `encoder.grads` and `correctives.grads` (both overwritten); returns the (B, P) code gradient.
        """
        B = out.code.shape[0]
        total = {name: None for name in _PARAMETER_NAMES}

        def add(name, g):
            if g is not None:
                total[name] = g if total[name] is None else total[name] + g

        extra = grads.get("params")
        if extra is not None:
            for name in _PARAMETER_NAMES:
                add(name, getattr(extra, name))
        grad_geometry = grads.get("geometry_offsets")
        grad_reflectance = grads.get("reflectance_offsets")
        # The morphable model is linear and both levels evaluate it on the same coefficients: the
        # levels' vertex and albedo gradients are summed first and go through its GEMMs once. The final
        # level goes first: its gradient is also the offsets'; the base level's is then added into it by
        # the render chain's own kernels (add_to), with no separate pass over the arrays.
        grad_model_vertices = grad_model_albedo = None
        for level, rendering in (("final", out.final), ("base", out.base)):
            gi, gl = grads.get(f"{level}_image"), grads.get(f"{level}_landmarks")
            if gi is None and gl is None:
                continue
            if rendering is None:
                raise ValueError(f"gradients of the {level} level are given but it was not rendered")
            add_to = None if grad_model_vertices is None else (grad_model_vertices, grad_model_albedo)
            g = render_faces_backward(self.model, out.params, rendering, self.resolution, self.focal,
                                      grad_image=gi, grad_landmarks=gl, model_backward=False, add_to=add_to)
            for name in ("sh", "angles", "translation"):
                add(name, getattr(g.params, name))
            if level == "final":  # the offsets enter by addition: their gradient is the vertices'
                # (copies where nothing is added: the base level adds into g's arrays next)
                grad_geometry = g.vertices.copy() if grad_geometry is None else grad_geometry + g.vertices
                grad_reflectance = g.albedo.copy() if grad_reflectance is None else grad_reflectance + g.albedo
            grad_model_vertices, grad_model_albedo = g.vertices, g.albedo
        if grad_model_vertices is not None:
            with value_checks(False):  # the render chain's own outputs from checked gradients
                model_grads = self.model.evaluate_backward(grad_model_vertices, grad_model_albedo)
            for name, g in zip(("shape", "expression", "albedo"), model_grads):
                add(name, g)
        grad_z_geo = grad_z_ref = None
        if out.geometry_offsets is not None:
            grad_z_geo, grad_z_ref = self.correctives.backward(out.z_geo, out.z_ref, grad_geometry, grad_reflectance)
        else:
            self.correctives.flat_grads[...] = 0
        grad_code = self.decode_backward(FaceParameters(**total), grad_z_geo, grad_z_ref, B, out.code.dtype)
        self.encoder.backward(grad_code, need_grad_x=False)
        return grad_code
