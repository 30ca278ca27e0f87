"""Cropping a face out of a photo, keeping the similarity transform that maps results back.

All coordinates are 0-based pixel centres (docs/conventions.md): the centre of pixel (row i,
column j) is (x=j, y=i), in the photo and in the crop alike. A `Crop` maps photo points p to crop
points q = s R(θ) p + t, and `cv2.warpAffine` uses the same pixel-centre convention, so the
pixel at q in the crop shows the photo at `invert(q)`.

Framing. An encoder sees faces framed as it was trained; a fitter wants the face to fill the
crop the same way. `crop_from_landmarks(..., target_landmarks=T)` fits the photo's landmarks onto
T (68 points in crop pixels, e.g. the synthetic training faces' mean landmarks) by least squares,
so that the crop shows the face where the training faces were. Without T it frames the
landmarks' bounding box: the box's centre goes to the crop's centre and `scale` times its larger
side fills the crop's smaller side. `crop_from_box` estimates that bounding box from a face
detector's box (the constants below, measured on the iBUG photos) and frames it the same way.
"""
import dataclasses
import math

import numpy as np

from fastface._checks import check_resolution

__all__ = ["Crop", "crop_from_landmarks", "crop_from_box", "landmark_frame", "box_to_landmark_frame",
           "DEFAULT_SCALE", "BOX_CENTRE_DY", "BOX_SIZE"]

# The landmarks' bounding box (brows to chin, jaw to jaw) times 1.6 fills the crop: the whole
# face with some forehead, hair and background around it.
DEFAULT_SCALE = 1.6
# From an OpenCV frontal-face Haar box (x0, y0, x1, y1) of width w to the 68 landmarks' bounding
# box: centre (box centre x, box centre y + BOX_CENTRE_DY * w), larger side BOX_SIZE * w.
# Measured on the seven iBUG photos of shared/data/faces where the Haar cascade finds the face
# (tests/io/test_detect.py measures them again): landmark-box centre below the Haar box centre by
# 0.158 w (spread 0.028 w), landmark-box side 0.887 w (spread 0.047 w); horizontally the centres
# differ by 0.05 w (spread 0.08 w, it follows the yaw), so no horizontal shift is applied.
BOX_CENTRE_DY = 0.16
BOX_SIZE = 0.89


@dataclasses.dataclass(frozen=True)
class Crop:
    """A similarity transform from photo pixels to crop pixels, and the crop's size.

    q = scale * R(rotation) p + translation, for p and q (x, y) in 0-based pixel-centre
    coordinates; R(θ) = [[cos θ, -sin θ], [sin θ, cos θ]] acting on (x, y) with y pointing down,
    so a positive rotation turns the photo clockwise as seen on screen.

    Attributes:
        scale: float > 0, crop pixels per photo pixel.
        translation: (tx, ty) floats, crop pixels.
        size: (H, W) of the crop.
        rotation: float, radians (0 unless asked for).
    """
    scale: float
    translation: tuple
    size: tuple
    rotation: float = 0.0

    def __post_init__(self):
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a finite number > 0; got {self.scale!r}")
        t = tuple(float(v) for v in self.translation)
        if len(t) != 2 or not all(math.isfinite(v) for v in t):
            raise ValueError(f"translation must be two finite numbers; got {self.translation!r}")
        object.__setattr__(self, "translation", t)
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "rotation", float(self.rotation))
        object.__setattr__(self, "size", check_resolution("size", self.size))

    @property
    def matrix(self):
        """(2, 3) float64 [s R | t], the photo-to-crop matrix cv2.warpAffine takes."""
        c, s = math.cos(self.rotation) * self.scale, math.sin(self.rotation) * self.scale
        return np.array([[c, -s, self.translation[0]], [s, c, self.translation[1]]])

    @property
    def inverse_matrix(self):
        """(2, 3) float64, the crop-to-photo matrix."""
        return cv2_invert(self.matrix)

    def apply(self, points):
        """Photo points (..., 2) -> crop points (..., 2); float32 stays float32, else float64."""
        return _transform(self.matrix, points)

    def invert(self, points):
        """Crop points (..., 2) -> photo points (..., 2); float32 stays float32, else float64."""
        return _transform(self.inverse_matrix, points)


def cv2_invert(m):
    """Inverse of a (2, 3) affine matrix (float64)."""
    a = np.vstack([m, [0.0, 0.0, 1.0]])
    return np.linalg.inv(a)[:2]


def _transform(m, points):
    xp = np
    if type(points).__module__.startswith("cupy"):  # keep cupy points on the device
        import cupy as xp
    p = xp.asarray(points)
    if p.shape[-1:] != (2,) or p.dtype.kind not in "fiu":
        raise ValueError(f"points must be a real array of shape (..., 2); got {p.dtype} {tuple(p.shape)}")
    dtype = np.float32 if p.dtype == np.float32 else np.float64
    p64 = p.astype(np.float64)
    mm = xp.asarray(m)
    out = p64 @ mm[:, :2].T + mm[:, 2]
    return out.astype(dtype)


def _resolution(resolution):
    if isinstance(resolution, (int, np.integer)):
        resolution = (resolution, resolution)
    return check_resolution("resolution", resolution)


def _check_image(image):
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype.kind != "f":
        shape = getattr(image, "shape", None)
        raise ValueError(f"image must be a numpy (H, W, 3) float array (read_image's output); got "
                         f"{getattr(image, 'dtype', type(image).__name__)} {shape}")
    return np.ascontiguousarray(image, dtype=np.float32)


def _check_points(name, points, n=None):
    p = np.asarray(points, dtype=np.float64) if isinstance(points, (np.ndarray, list, tuple)) else None
    if p is None or p.ndim != 2 or p.shape[1] != 2 or (n is not None and p.shape[0] != n) or p.shape[0] < 2:
        want = f"({n}, 2)" if n is not None else "(K, 2) with K >= 2"
        raise ValueError(f"{name} must be a numpy array {want}; got {getattr(points, 'dtype', '')} "
                         f"{getattr(points, 'shape', type(points).__name__)}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"{name} must be finite; got NaN or Inf")
    return p


def landmark_frame(landmarks):
    """(centre (2,), size) of the points' bounding box: its centre and its larger side (pixels)."""
    p = _check_points("landmarks", landmarks)
    lo, hi = p.min(axis=0), p.max(axis=0)
    return (lo + hi) / 2, float(max(hi - lo))


def box_to_landmark_frame(box):
    """Estimates `landmark_frame` of the 68 landmarks from a face box (x0, y0, x1, y1) as
    detect_faces returns it (pixel columns x0 .. x1 - 1, rows y0 .. y1 - 1)."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must be four numbers (x0, y0, x1, y1); got {box!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise ValueError(f"box must be finite with x1 > x0 and y1 > y0; got {box!r}")
    w = x1 - x0
    # the box covers pixel columns x0 .. x1 - 1: its centre in pixel-centre coordinates
    centre = np.array([(x0 + x1 - 1) / 2, (y0 + y1 - 1) / 2 + BOX_CENTRE_DY * w])
    return centre, BOX_SIZE * w


def _frame_crop(centre, size, resolution, scale, rotation=0.0, pivot=None):
    """The Crop that puts `centre` at the crop's centre and `scale * size` over its smaller side."""
    h, w = resolution
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0; got {scale!r}")
    if not size > 0:
        raise ValueError(f"the face's extent must be > 0 pixels; got {size}")
    s = min(h, w) / (scale * size)
    c, sn = math.cos(rotation) * s, math.sin(rotation) * s
    target = np.array([(w - 1) / 2, (h - 1) / 2])
    t = target - np.array([c * centre[0] - sn * centre[1], sn * centre[0] + c * centre[1]])
    return Crop(scale=s, translation=tuple(t), size=(h, w), rotation=rotation)


def fit_similarity(source, target, rotation=False):
    """Least-squares q ≈ s R p + t of (K, 2) points (Umeyama; rotation fixed at 0 unless asked).

    Returns (scale, rotation, translation (2,)). Points as complex numbers z = x + iy: the fit is
    q ≈ a p + t with a = s e^{iθ}; centred, a = Σ conj(p) q / Σ |p|² (real part only without
    rotation).
    """
    p = source[:, 0] + 1j * source[:, 1]
    q = target[:, 0] + 1j * target[:, 1]
    pm, qm = p.mean(), q.mean()
    pc, qc = p - pm, q - qm
    denom = float(np.sum(np.abs(pc) ** 2))
    if denom <= 0:
        raise ValueError("landmarks must not all coincide")
    a = np.sum(np.conj(pc) * qc) / denom
    if not rotation:
        a = complex(a.real, 0.0)
    s, theta = abs(a), math.atan2(a.imag, a.real)
    if s <= 0 or (not rotation and a.real <= 0):
        raise ValueError("the landmarks cannot be fitted onto target_landmarks by a scale > 0 "
                         "without rotation (mirrored or upside-down?)")
    t = qm - a * pm
    return s, theta, np.array([t.real, t.imag])


def _eye_roll(p):
    """The angle that turns the line between the eye centres (iBUG 36-41, 42-47) horizontal."""
    d = p[42:48].mean(axis=0) - p[36:42].mean(axis=0)
    return -math.atan2(d[1], d[0])


def warp(image, crop):
    """Resamples the photo into the crop: (H, W, 3) float32.

    Bilinear (cv2.warpAffine, which rounds sample positions to 1/32 pixel). Where the crop
    shrinks the photo, the photo's footprint is first reduced with cv2.resize(INTER_AREA), which
    averages the pixels under each output pixel instead of skipping them (no aliasing), and the
    remaining near-unit warp is bilinear. Parts of the crop outside the photo are black.
    """
    import cv2

    image = _check_image(image)
    h, w = crop.size
    m = crop.matrix
    if crop.scale < 0.999:
        ih, iw = image.shape[:2]
        corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
        foot = crop.invert(corners)
        margin = 2.0 / crop.scale + 2
        x0 = int(max(0, math.floor(foot[:, 0].min() - margin)))
        y0 = int(max(0, math.floor(foot[:, 1].min() - margin)))
        x1 = int(min(iw, math.ceil(foot[:, 0].max() + margin)))
        y1 = int(min(ih, math.ceil(foot[:, 1].max() + margin)))
        if x1 <= x0 or y1 <= y0:
            return np.zeros((h, w, 3), np.float32)
        sub = image[y0:y1, x0:x1]
        nw = max(1, int(round((x1 - x0) * crop.scale)))
        nh = max(1, int(round((y1 - y0) * crop.scale)))
        kx, ky = nw / (x1 - x0), nh / (y1 - y0)
        reduced = cv2.resize(sub, (nw, nh), interpolation=cv2.INTER_AREA)
        # photo -> reduced: cv2.resize keeps pixel centres aligned, x_r = (x - x0 + 0.5) kx - 0.5
        a = np.array([[kx, 0.0, (0.5 - x0) * kx - 0.5], [0.0, ky, (0.5 - y0) * ky - 0.5]])
        m = (np.vstack([m, [0, 0, 1]]) @ np.linalg.inv(np.vstack([a, [0, 0, 1]])))[:2]  # reduced -> crop
        image = reduced
    out = cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(0.0, 0.0, 0.0))
    return np.ascontiguousarray(out.reshape(h, w, 3), dtype=np.float32)


def crop_from_landmarks(image, landmarks, resolution, scale=DEFAULT_SCALE, target_landmarks=None,
                        rotation=False):
    """Crops the face that `landmarks` mark out of `image`.

    Args:
        image: (H0, W0, 3) float32 photo (read_image).
        landmarks: (68, 2) photo pixels, 0-based pixel centres (read_pts).
        resolution: (H, W) of the crop, or one int for a square.
        scale: without target_landmarks, the crop's smaller side spans `scale` times the larger
            side of the landmarks' bounding box, centred on that box.
        target_landmarks: (68, 2) crop pixels where the landmarks should land (the training
            faces' framing); the crop is then the least-squares similarity from `landmarks` onto
            them and `scale` is not used.
        rotation: False keeps the photo upright (scale and translation only); True also turns
            it (the least-squares rotation onto target_landmarks, or without target_landmarks
            the roll that levels the eyes).

    Returns:
        (crop (H, W, 3) float32, Crop). `Crop.apply(landmarks)` gives the landmarks in the crop.
    """
    image = _check_image(image)
    p = _check_points("landmarks", landmarks)
    res = _resolution(resolution)
    if target_landmarks is not None:
        q = _check_points("target_landmarks", target_landmarks, n=p.shape[0])
        s, theta, t = fit_similarity(p, q, rotation=bool(rotation))
        crop = Crop(scale=s, translation=tuple(t), size=res, rotation=theta)
    else:
        roll = _eye_roll(p) if rotation and p.shape[0] == 68 else 0.0
        centre, size = landmark_frame(p)
        crop = _frame_crop(centre, size, res, float(scale), rotation=roll)
    return warp(image, crop), crop


def crop_from_box(image, box, resolution, scale=DEFAULT_SCALE, target_landmarks=None):
    """Crops a face given a detector box, framed as `crop_from_landmarks` would (approximately).

    Args:
        image: (H0, W0, 3) float32 photo.
        box: (x0, y0, x1, y1) photo pixels (detect_faces).
        resolution: (H, W) or an int.
        scale: as in crop_from_landmarks.
        target_landmarks: (68, 2) crop pixels, as in crop_from_landmarks: the estimated bounding
            box of the face's landmarks is mapped onto the bounding box of these.

    Returns:
        (crop (H, W, 3) float32, Crop).

    The landmarks' bounding box is estimated from the box with BOX_CENTRE_DY and BOX_SIZE.
    """
    image = _check_image(image)
    res = _resolution(resolution)
    centre, size = box_to_landmark_frame(box)
    if target_landmarks is not None:
        q = _check_points("target_landmarks", target_landmarks)
        t_centre, t_size = landmark_frame(q)
        s = t_size / size
        crop = Crop(scale=s, translation=tuple(t_centre - s * centre), size=res)
    else:
        crop = _frame_crop(centre, size, res, float(scale))
    return warp(image, crop), crop
