"""Per-image fitting of the face model to photos: analysis by synthesis.

    result = fastface.fit(images, landmarks)          # images (B, H, W, 3), landmarks (B, 68, 2)
    result.params, result.vertices, result.albedo, result.landmarks

The classical alternative to a trained encoder: the parameters themselves (identity, expression,
albedo, SH light, pose) are the variables, and the loss compares a rendering of the model with the
photo. The pipeline layer: it chains the ops and the renderer and owns nothing numeric of its own.

Per image, the energy is

    E = w_photo * photometric(render, photo, face mask)         (robust l2,1 colour distance)
      + w_land  * landmark(projected model landmarks, given)    (pixels / image width, squared)
      + w_shape |shape|^2 + w_expr |expression|^2 + w_albedo |albedo|^2    (Gaussian priors, in
        standard deviations)

minimised in three stages, each batched over the images (on the GPU all at once):
1. Pose in closed form from the 68 landmarks: OpenCV's solvePnP of the model's 68 landmark
   vertices (mean shape) against the given points with the known focal (or the pose of `init`).
2. Landmarks only: pose, identity and expression by Adam on the landmark and prior terms. It
   evaluates the 68 landmark vertices only (a (B, K) x (K, 204) product), so it costs next to
   nothing and brings the geometry close before the first rendering.
3. Analysis by synthesis: SH light in closed form (linear least squares of the photo against the
   rendered albedo under the nine SH basis functions), then Adam on all parameters with the full
   energy, each step a render and its backward.

Images are independent: the Adam steps are element-wise (no global clipping), so a photo's result
does not depend on the other photos of its batch (up to float rounding in batched products).
Without landmarks the landmark term is off and the pose comes from `init` (or a centred frontal
face framed like `default_pose`); identity then rests on the photometric term alone.
"""
import functools
from dataclasses import dataclass

import numpy as np

from fastface._backend import array_module, cupy_or_none, is_cupy_array
from fastface._checks import check_array, check_finite, value_checks
from fastface.model import FaceModel
from fastface.nn.adam import Adam
from fastface.objective import OUTLINE_PHOTOMETRIC_SCALE
from fastface.ops.camera import (euler_rotation, euler_rotation_backward, project_to_pixels,
                                 project_to_pixels_backward, rigid_transform, rigid_transform_backward)
from fastface.ops.interpolate import interpolate
from fastface.ops.losses import (landmark_loss, landmark_loss_backward, photometric_loss,
                                 photometric_loss_backward, prior_loss, prior_loss_backward)
from fastface.render import FaceParameters, render_faces, render_faces_backward, uniform_light

__all__ = ["fit", "FitResult", "FitWeights", "default_pose", "default_focal", "default_model",
           "DEFAULT_RESOLUTION", "DEFAULT_ITERATIONS", "DEFAULT_LANDMARK_ITERATIONS"]

# The CPU defaults keep one photo under 2 s on 2 cores (bench/bench_fit.py, bench/RESULTS.md).
DEFAULT_RESOLUTION = 128
DEFAULT_ITERATIONS = 60
DEFAULT_LANDMARK_ITERATIONS = 150
# A portrait lens: the crop is about 20 degrees wide, as the demo's renderings.
FOCAL_PER_PIXEL = 2.9

# Landmark weights per iBUG point: the jaw line (0-16) of a photo is the face's silhouette, which
# moves over the surface as the head turns, while the model's jaw points are fixed vertices 3 mm
# inside the outline; they count less than the inner points, which sit on fixed features.
# The weights (here and FitWeights.landmark) were chosen on the 8 annotated photos of
# shared/data/faces: jaw 0.3 -> 0.5 and landmark 400 -> 1000 took the mean 68-point error from
# 3.2 % to 2.4 % of the eye-corner distance with identity coefficients up to 3.8 std; stronger
# landmark terms fit the points closer still but push identity past 5 std (implausible faces).
# With antialias the photometric term covers the whole crop; OUTLINE_PHOTOMETRIC_SCALE (crop pixels per
# face pixel at the default framing, shared with training's antialiased term) keeps its weight
# comparable. On the 8 annotated photos with detection only: mean 68-point error 12.0 % without
# antialias, 9.1 % with it (bench/RESULTS.md).

_LANDMARK_WEIGHTS = np.ones(68, np.float32)
_LANDMARK_WEIGHTS[0:17] = 0.5


@dataclass(frozen=True)
class FitWeights:
    """The weights of the energy's terms (see the module docstring).

    The landmark term is in units of the image width (a point 1 % of the width off costs
    1e-4 * landmark), the photometric term in colour distance (0..sqrt(3)) per face pixel, the
    priors per squared standard deviation.
    """
    photometric: float = 1.0
    landmark: float = 1000.0
    shape: float = 2e-4
    expression: float = 2e-4
    albedo: float = 5e-4


@dataclass(frozen=True)
class FitResult:
    """What `fit` found, per image.

    Attributes:
        params: FaceParameters (float32 arrays on the device of the images).
        vertices: (B, V, 3) model-space vertices (before pose), mm.
        albedo: (B, V, 3) per-vertex reflectance.
        landmarks: (B, 68, 2) the model's landmark vertices projected into the images, pixels.
        losses: dict of (iterations, B) float32 numpy arrays: "landmark_stage" (the energy of
            stage 2 at each step) and "total", "photometric", "landmark" of stage 3.
        focal: the focal length in pixels that was used.
        resolution: (H, W) of the images.
    """
    params: FaceParameters
    vertices: object
    albedo: object
    landmarks: object
    losses: dict
    focal: float
    resolution: tuple


def default_focal(resolution):
    """The focal length (pixels) fit assumes when none is given: FOCAL_PER_PIXEL * width."""
    return FOCAL_PER_PIXEL * float(resolution[1])


@functools.lru_cache(maxsize=None)
def _cached_default_model(level, device):
    model = FaceModel.default(level)
    return model if device == "cpu" else model.to(device)


def default_model(device="cpu"):
    """The model `fit` uses when none is given: the default model's "small" level on the CPU
    (5,000 vertices: a render and its backward at 128 x 128 take a few milliseconds) and the full
    "default" level on the GPU. Built once per process and device."""
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")
    return _cached_default_model("small" if device == "cpu" else "default", device)


def default_pose(batch, resolution, focal, face_width=0.62, model=None):
    """(angles (B, 3), translation (B, 3)) of a frontal face centred in the image.

    The distance is chosen so that the model's outer eye corners (landmarks 36 and 45) are
    `face_width` / 2.2 of the image width apart, about the framing of `fastface.io.crop_from_box`
    around a detector's box; without a model an eye distance of 90 mm is assumed.
    """
    eye_mm = 90.0
    if model is not None and model.landmarks is not None:
        lm = _host(model.mean_shape)[_host(model.landmarks)]
        eye_mm = float(np.linalg.norm(lm[45] - lm[36]))
    width = float(resolution[1])
    eye_px = face_width / 2.2 * width
    distance = focal * eye_mm / eye_px
    angles = np.zeros((batch, 3), np.float32)
    translation = np.tile(np.float32([0.0, 0.0, -distance]), (batch, 1))
    return angles, translation


def _host(a):
    return a.get() if is_cupy_array(a) else np.asarray(a)


# ---------------------------------------------------------------------------------------------
# Stage 1: pose from the landmarks in closed form

def _solve_pose(model_points, image_points, focal, resolution, init_translation=None):
    """Pose (angles (3,), translation (3,)) mapping model points (K, 3) onto pixels (K, 2).

    OpenCV's camera looks down +z with y down; ours down -z with y up (docs/conventions.md), so
    with D = diag(1, -1, -1): R = D R_cv, t = D t_cv. The principal point is the image centre in
    pixel-centre coordinates, ((W - 1) / 2, (H - 1) / 2), as in `project_to_pixels`.
    """
    import cv2
    from scipy.spatial.transform import Rotation

    H, W = resolution
    camera = np.array([[focal, 0, (W - 1) / 2.0], [0, focal, (H - 1) / 2.0], [0, 0, 1]], np.float64)
    obj = np.ascontiguousarray(model_points, np.float64)
    img = np.ascontiguousarray(image_points, np.float64)
    # Start from a frontal face at the distance its eye corners' spacing implies: the iterative
    # (Levenberg-Marquardt) solver then converges to the right one of the near-planar face's two
    # mirror solutions.
    eye_px = max(np.linalg.norm(img[45] - img[36]), 1.0)
    eye_mm = np.linalg.norm(obj[45] - obj[36])
    distance = focal * eye_mm / eye_px
    centre = img[[36, 45, 48, 54]].mean(0)
    t0 = np.array([(centre[0] - (W - 1) / 2.0) * distance / focal, (centre[1] - (H - 1) / 2.0) * distance / focal,
                   distance])
    rvec0 = cv2.Rodrigues(np.diag([1.0, -1.0, -1.0]))[0]
    ok, rvec, tvec = cv2.solvePnP(obj, img, camera, None, rvec0.copy(), t0.reshape(3, 1).copy(),
                                  useExtrinsicGuess=True, flags=cv2.SOLVEPNP_ITERATIVE)
    if not ok or not np.all(np.isfinite(tvec)) or tvec[2, 0] <= 0:
        rvec, tvec = rvec0, t0.reshape(3, 1)
    d = np.diag([1.0, -1.0, -1.0])
    rotation = d @ cv2.Rodrigues(rvec)[0]
    translation = d @ tvec[:, 0]
    angles = Rotation.from_matrix(rotation).as_euler("xyz")
    return angles.astype(np.float32), translation.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Stage 2: the landmark vertices only

class _LandmarkGeometry:
    """The model restricted to its 68 landmark vertices: vertices = mean + (c * std) @ basis."""

    def __init__(self, model, xp, geometry_offsets=None):
        idx = _host(model.landmarks)
        basis = _host(model._geometry_basis).reshape(-1, model.n_vertices, 3)[:, idx, :].reshape(-1, 68 * 3)
        self.basis = xp.asarray(np.ascontiguousarray(basis))
        self.std = xp.asarray(_host(model._geometry_std))
        self.mean = xp.asarray(np.ascontiguousarray(_host(model.mean_shape)[idx]))
        self.n_shape = model.n_shape
        self.offsets = None if geometry_offsets is None else xp.ascontiguousarray(geometry_offsets[:, xp.asarray(idx)])

    def evaluate(self, shape, expression):
        xp = array_module(("shape", shape))
        coeffs = xp.concatenate([shape, expression], axis=1) * self.std
        points = self.mean + (coeffs @ self.basis).reshape(-1, 68, 3)
        return points if self.offsets is None else points + self.offsets

    def backward(self, grad_points):
        g = (grad_points.reshape(grad_points.shape[0], -1) @ self.basis.T) * self.std
        return g[:, :self.n_shape], g[:, self.n_shape:]


def _pose_backward(points, angles, translation, rotation, camera_points, focal, resolution, grad_pixels):
    """Gradients of project_to_pixels(rigid_transform(points, R(angles), t)) -> (points, angles, t)."""
    grad_camera = project_to_pixels_backward(camera_points, focal, resolution, grad_pixels)
    grad_points, grad_rotation, grad_translation = rigid_transform_backward(points, rotation, translation,
                                                                            grad_camera)
    return grad_points, euler_rotation_backward(angles, grad_rotation), grad_translation


# ---------------------------------------------------------------------------------------------
# Stage 3 helpers

_SH_FACTORS = np.array([np.pi] + [2 * np.pi / 3] * 3 + [np.pi / 4] * 5)


def _sh_basis(xp, n):
    """(..., 9) SH basis of docs/conventions.md times the band factors, for unit normals (..., 3)."""
    x, y, z = n[..., 0], n[..., 1], n[..., 2]
    basis = xp.stack([xp.full_like(x, 0.282095), 0.488603 * y, 0.488603 * z, 0.488603 * x, 1.092548 * x * y,
                      1.092548 * y * z, 0.315392 * (3 * z * z - 1), 1.092548 * x * z, 0.546274 * (x * x - y * y)],
                     axis=-1)
    return basis * xp.asarray(_SH_FACTORS, dtype=n.dtype)


def _solve_light(rendering, images, mask, tri, regularization=1e-2):
    """(B, 9, 3) SH light that best explains the photo given the rendered albedo and normals.

    Linear in the light: colour_c = albedo_c * sum_k gamma_kc * A_k Y_k(n); least squares over
    the face pixels, a small ridge pulling gamma toward the uniform light of the image's mean
    brightness so that a few pixels cannot produce a wild light.
    """
    xp = array_module(("images", images))
    albedo_px = interpolate(rendering.albedo, rendering.raster, tri)            # (B, H, W, 3)
    normals_px = interpolate(rendering.normals, rendering.raster, tri)
    normals_px /= xp.maximum(xp.sqrt((normals_px * normals_px).sum(axis=-1, keepdims=True)), 1e-6)
    basis = _sh_basis(xp, normals_px)                                            # (B, H, W, 9)
    m = mask.astype(images.dtype)[..., None]
    B = images.shape[0]
    sh = np.zeros((B, 9, 3), np.float32)
    eye = xp.asarray(np.eye(9))
    for c in range(3):
        a = (basis * albedo_px[..., c:c + 1] * m).reshape(B, -1, 9).astype(xp.float64)
        t = (images[..., c:c + 1] * m).reshape(B, -1, 1).astype(xp.float64)
        n = xp.maximum(m.reshape(B, -1).sum(1), 1.0)[:, None, None]
        ata = xp.matmul(a.transpose(0, 2, 1), a) / n
        atb = xp.matmul(a.transpose(0, 2, 1), t) / n
        # Prior: the uniform light that matches the mean brightness (a[..., 0] = A_0 Y_0 albedo,
        # so gamma_0 = sum(photo) / sum(a[..., 0])), the other coefficients 0.
        prior = xp.zeros((B, 9, 1), xp.float64)
        prior[:, 0, 0] = (t.sum(1) / xp.maximum(a[..., :1].sum(1), 1e-6))[:, 0]
        ata = ata + regularization * eye
        atb = atb + regularization * prior
        # B small 9 x 9 systems: solved on the host (one copy of 9 x 10 numbers per image).
        sh[:, :, c] = np.linalg.solve(_host(ata), _host(atb))[..., 0]
    return xp.asarray(sh)


# ---------------------------------------------------------------------------------------------
# fit

def _check_inputs(images, landmarks, device):
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"images must be a (B, H, W, 3) float32 array; got {type(images).__name__}")
    check_array("images", images, (np.float32,), ("B", "H", "W", 3))
    check_finite("images", images)
    B = images.shape[0]
    if landmarks is not None:
        if not hasattr(landmarks, "shape") or not hasattr(landmarks, "dtype"):
            raise TypeError(f"landmarks must be a (B, 68, 2) float32 array or None; got {type(landmarks).__name__}")
        check_array("landmarks", landmarks, (np.float32, np.float64), (B, 68, 2))
        check_finite("landmarks", landmarks)


def _to_device(a, device):
    if a is None:
        return None
    if device == "gpu":
        cupy = cupy_or_none()
        if cupy is None:
            raise RuntimeError("device='gpu' needs cupy; install fastface[gpu]")
        return cupy.ascontiguousarray(cupy.asarray(a, dtype=np.float32))
    return np.ascontiguousarray(_host(a), dtype=np.float32)


def fit(images, landmarks=None, model=None, init=None, device="cpu", iterations=DEFAULT_ITERATIONS,
        landmark_iterations=DEFAULT_LANDMARK_ITERATIONS, focal=None, weights=None, landmark_weights=None,
        lr=None, masks=None, geometry_offsets=None, reflectance_offsets=None, antialias=False):
    """Fits the face model to a batch of photos (crops) by analysis by synthesis.

    Args:
        images: (B, H, W, 3) float32 RGB in [0, 1], numpy or cupy: face crops at the fitting
            resolution (`fastface.io.crop_from_landmarks` / `crop_from_box`).
        landmarks: (B, 68, 2) float32 iBUG points in the crops' pixel coordinates (0-based pixel
            centres, docs/conventions.md), or None (no landmark term; pose from `init` or
            `default_pose`).
        model: a FaceModel, or None for `default_model(device)`; moved to `device` if needed.
        init: FaceParameters to start from (any field may be None: zeros, the default pose or
            the closed-form light), or None. With landmarks and an init pose, the closed-form
            pose is skipped.
        device: "cpu" (numpy, Numba) or "gpu" (cupy); the images are moved there.
        iterations: Adam steps of the photometric stage (0 skips it: landmarks only).
        landmark_iterations: Adam steps of the landmark-only stage (ignored without landmarks).
        focal: focal length in pixels; None for `default_focal` of the images' size.
        weights: FitWeights, or None for the defaults.
        landmark_weights: (68,) or (B, 68) weights of the landmark points, or None (the inner
            points 1, the jaw line 0.5).
        lr: dict of per-group Adam step sizes overriding the defaults (keys shape, expression,
            albedo, sh, angles, translation).
        masks: (B, H, W) bool or float32 in [0, 1]: the pixels of the crops that show the photo
            (a crop reaching past the photo's border is black there), or None (all). The
            photometric term counts only face pixels inside them.
        geometry_offsets, reflectance_offsets: optional (B, V, 3) float32 offsets added to the
            model's vertices (mm) and albedo, held fixed (a trained model's corrective level,
            `Reconstructor`'s vertices_final - vertices_base); the result includes them.
        antialias: render with the outline blended into the photo (render_faces(antialias=True,
            background=images)), so that the photometric term also pulls on the face's outline;
            the term then covers every pixel of the crop (inside `masks`), outside the face the
            rendering equals the photo.

    Returns:
        FitResult (arrays on `device`).
    """
    _check_inputs(images, landmarks, device)
    for name, value in (("iterations", iterations), ("landmark_iterations", landmark_iterations)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer; got {value!r}")
    weights = weights or FitWeights()
    if not isinstance(weights, FitWeights):
        raise TypeError(f"weights must be a FitWeights or None; got {type(weights).__name__}")
    if model is None:
        model = default_model(device)
    elif not isinstance(model, FaceModel):
        raise TypeError(f"model must be a FaceModel or None; got {type(model).__name__}")
    if model.device != device:
        model = model.to(device)
    if model.landmarks is None and landmarks is not None:
        raise ValueError("model has no landmark vertices (model.landmarks is None); fitting landmarks needs them")
    B, H, W = int(images.shape[0]), int(images.shape[1]), int(images.shape[2])
    resolution = (H, W)
    focal = default_focal(resolution) if focal is None else float(focal)
    if not (np.isfinite(focal) and focal > 0):
        raise ValueError(f"focal must be a positive number of pixels; got {focal!r}")
    images = _to_device(images, device)
    xp = array_module(("images", images))
    target = _to_device(landmarks, device)
    if masks is not None:
        if not hasattr(masks, "shape") or tuple(masks.shape) != (B, H, W):
            raise ValueError(f"masks must be ({B}, {H}, {W}) bool or float32 (the images' size) or None; got "
                             f"{getattr(masks, 'shape', type(masks).__name__)}")
        masks = _to_device(masks, device)
    lw = _LANDMARK_WEIGHTS if landmark_weights is None else np.asarray(_host(landmark_weights), np.float32)
    if lw.shape not in ((68,), (B, 68)) or not np.all(np.isfinite(lw)) or np.any(lw < 0):
        raise ValueError(f"landmark_weights must be (68,) or ({B}, 68) non-negative numbers; got shape {lw.shape}")
    lw = xp.asarray(np.ascontiguousarray(np.broadcast_to(lw, (B, 68)) * weights.landmark, np.float32))
    steps = dict(shape=0.05, expression=0.05, albedo=0.05, sh=0.01, angles=0.01, translation=1.5)
    if lr:
        unknown = set(lr) - set(steps)
        if unknown:
            raise ValueError(f"lr has unknown keys {sorted(unknown)}; the groups are {sorted(steps)}")
        steps.update(lr)

    offsets = {}
    for name, value in (("geometry_offsets", geometry_offsets), ("reflectance_offsets", reflectance_offsets)):
        if value is not None:
            if not hasattr(value, "shape") or tuple(value.shape) != (B, model.n_vertices, 3):
                raise ValueError(f"{name} must be ({B}, {model.n_vertices}, 3) float32 or None; got "
                                 f"{getattr(value, 'shape', type(value).__name__)}")
            offsets[name] = _to_device(value, device)

    # --- the starting point ---
    def start(name, shape, fill=None):
        value = getattr(init, name, None) if init is not None else None
        if value is None:
            return None if fill is None else xp.asarray(fill, dtype=np.float32)
        value = _to_device(value, device)
        if tuple(value.shape) != shape:
            raise ValueError(f"init.{name} must have shape {shape}; got {tuple(value.shape)}")
        return value.copy()

    p = dict(shape=start("shape", (B, model.n_shape), np.zeros((B, model.n_shape))),
             expression=start("expression", (B, model.n_expression), np.zeros((B, model.n_expression))),
             albedo=start("albedo", (B, model.n_albedo), np.zeros((B, model.n_albedo))))
    angles, translation = start("angles", (B, 3)), start("translation", (B, 3))
    if angles is None or translation is None:
        if target is not None:
            lm_host = _host(landmarks).astype(np.float64)
            mean_lm = _host(model.mean_shape)[_host(model.landmarks)]
            poses = [_solve_pose(mean_lm, lm_host[b], focal, resolution) for b in range(B)]
            a0, t0 = np.stack([q[0] for q in poses]), np.stack([q[1] for q in poses])
        else:
            a0, t0 = default_pose(B, resolution, focal, model=model)
        angles = xp.asarray(a0) if angles is None else angles
        translation = xp.asarray(t0) if translation is None else translation
    p["angles"], p["translation"] = xp.ascontiguousarray(angles), xp.ascontiguousarray(translation)
    sh_init = start("sh", (B, 9, 3))
    losses = {}

    prior_w = dict(shape=weights.shape, expression=weights.expression, albedo=weights.albedo)
    scale = 1.0 / W  # landmark term in units of the image width

    with value_checks(False):
        # --- stage 2: landmarks only ---
        if target is not None and landmark_iterations > 0:
            geometry = _LandmarkGeometry(model, xp, offsets.get("geometry_offsets"))
            names = ("shape", "expression", "angles", "translation")
            optimizers = {k: Adam({k: p[k]}, lr=steps[k]) for k in names}
            history = []
            for _ in range(landmark_iterations):
                points = geometry.evaluate(p["shape"], p["expression"])
                rotation = euler_rotation(p["angles"])
                camera = rigid_transform(points, rotation, p["translation"])
                pixels = project_to_pixels(camera, focal, resolution)
                ones = xp.ones(B, np.float32)
                e = landmark_loss(pixels * scale, target * scale, lw)
                history.append(e)
                g_pix = landmark_loss_backward(pixels * scale, target * scale, lw, ones) * scale
                g_points, g_angles, g_translation = _pose_backward(points, p["angles"], p["translation"], rotation,
                                                                   camera, focal, resolution, g_pix)
                g_shape, g_expression = geometry.backward(g_points)
                grads = dict(shape=g_shape, expression=g_expression, angles=g_angles, translation=g_translation)
                for k in ("shape", "expression"):
                    e = e + prior_w[k] * prior_loss(p[k])
                    grads[k] = grads[k] + prior_w[k] * prior_loss_backward(p[k], None, ones)
                history[-1] = e
                for k in names:
                    optimizers[k].step({k: xp.ascontiguousarray(grads[k], dtype=np.float32)})
            losses["landmark_stage"] = np.stack([_host(h) for h in history])

        # --- stage 3: analysis by synthesis ---
        def params_now(sh):
            return FaceParameters(shape=p["shape"], expression=p["expression"], albedo=p["albedo"], sh=sh,
                                  angles=p["angles"], translation=p["translation"])

        if sh_init is None:
            first = render_faces(model, params_now(uniform_light(B, xp)), resolution, focal, **offsets)
            sh_init = _solve_light(first, images, first.mask if masks is None else first.mask * masks,
                                   model.triangles)
        p["sh"] = xp.ascontiguousarray(sh_init, dtype=np.float32)
        names = ("shape", "expression", "albedo", "sh", "angles", "translation")
        optimizers = {k: Adam({k: p[k]}, lr=steps[k]) for k in names}
        totals, photos, marks = [], [], []
        ones = xp.ones(B, np.float32)
        for _ in range(iterations):
            params = params_now(p["sh"])
            if antialias:
                rendering = render_faces(model, params, resolution, focal, antialias=True, background=images,
                                         **offsets)
                mask = xp.ones((B, H, W), np.float32) if masks is None else masks
                # The loss is averaged over the whole crop, about 2.5 pixels per face pixel at the
                # default framing: a constant factor keeps the face-only term's scale. (The exact
                # ratio per image, which changes as the face moves, made one photo diverge.)
                photo_weight = ones * np.float32(OUTLINE_PHOTOMETRIC_SCALE)
            else:
                rendering = render_faces(model, params, resolution, focal, **offsets)
                mask = rendering.mask if masks is None else rendering.mask * masks
                photo_weight = ones
            photo_weight = (photo_weight * weights.photometric).astype(np.float32)
            e_photo = photometric_loss(rendering.image, images, mask)
            grad_image = photometric_loss_backward(rendering.image, images, mask, photo_weight)
            total = photo_weight * e_photo
            grad_landmarks = None
            if target is not None:
                pixels = rendering.landmarks
                e_land = landmark_loss(pixels * scale, target * scale, lw)
                grad_landmarks = landmark_loss_backward(pixels * scale, target * scale, lw, ones) * scale
                total = total + e_land
                marks.append(e_land)
            g = render_faces_backward(model, params, rendering, resolution, focal, grad_image=grad_image,
                                      grad_landmarks=grad_landmarks).params
            grads = {k: getattr(g, k) for k in names}
            for k, w in prior_w.items():
                total = total + w * prior_loss(p[k])
                grads[k] = grads[k] + w * prior_loss_backward(p[k], None, ones)
            totals.append(total)
            photos.append(e_photo)
            for k in names:
                optimizers[k].step({k: xp.ascontiguousarray(grads[k], dtype=np.float32)})
        if iterations:
            losses["total"] = np.stack([_host(h) for h in totals])
            losses["photometric"] = np.stack([_host(h) for h in photos])
            if marks:
                losses["landmark"] = np.stack([_host(h) for h in marks])

        params = params_now(p["sh"])
        vertices, albedo = model.evaluate(params.shape, params.expression, params.albedo)
        if "geometry_offsets" in offsets:
            vertices = vertices + offsets["geometry_offsets"]
        if "reflectance_offsets" in offsets:
            albedo = albedo + offsets["reflectance_offsets"]
        rotation = euler_rotation(params.angles)
        camera = rigid_transform(vertices[:, model.landmarks], rotation, params.translation)
        projected = project_to_pixels(camera, focal, resolution)
    return FitResult(params=params, vertices=vertices, albedo=albedo, landmarks=projected, losses=losses,
                     focal=focal, resolution=resolution)
