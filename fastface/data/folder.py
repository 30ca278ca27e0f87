"""A folder of real face photos with iBUG `.pts` landmarks, cropped to an encoder's framing.

Each photo `STEM.jpg` (or .png, .jpeg, .bmp, .tif, .tiff, .webp) needs `STEM.pts` beside it with
the 68 iBUG points (1-based on disk; fastface.io.read_pts). A batch crops every photo from its
landmarks to `resolution` and returns the landmarks in crop pixels, so real photos can stand in
for synthetic faces in training (`train --data FOLDER`) or be fitted.

Framing: the crop must show the face where the synthetic training faces are. Either pass
`target_landmarks` (68, 2) crop pixels directly, or `framing=(focal, translation)` (a
Reconstructor's `focal` and `translation`) with the face `model`: the target is then the model's
mean-face landmarks, frontal, at that translation, projected with that focal length
(`framing_landmarks`). The photo's landmarks are fitted onto the target by a least-squares scale
and translation (fastface.io.crop_from_landmarks). With neither, the landmarks' bounding box is
centred and scaled by `scale`.
"""
import os

import numpy as np

from fastface.io.crop import DEFAULT_SCALE, crop_from_landmarks
from fastface.io.images import read_image
from fastface.io.landmarks import N_LANDMARKS, read_pts

__all__ = ["FaceFolder", "framing_landmarks", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def framing_landmarks(model, resolution, focal, translation):
    """Where a frontal mean face at `translation` puts its 68 landmarks in an image.

    Args:
        model: a FaceModel with landmarks (host arrays are read; a GPU model is copied back).
        resolution: (H, W) or an int.
        focal: focal length in pixels.
        translation: (3,) camera-space translation in the model's units (z < 0).

    Returns:
        (68, 2) float32 pixel coordinates (docs/conventions.md).
    """
    from fastface.ops.camera import project_to_pixels

    if getattr(model, "landmarks", None) is None:
        raise ValueError("model has no landmark indices (model.landmarks is None): it cannot give a framing")
    res = (resolution, resolution) if isinstance(resolution, (int, np.integer)) else tuple(resolution)
    mean = model.mean_shape
    mean = mean.get() if hasattr(mean, "get") else np.asarray(mean)
    idx = model.landmarks
    idx = idx.get() if hasattr(idx, "get") else np.asarray(idx)
    t = np.asarray(translation, dtype=np.float64).reshape(-1)
    if t.shape != (3,) or not np.all(np.isfinite(t)):
        raise ValueError(f"translation must be three finite numbers; got {translation!r}")
    points = (mean[idx].astype(np.float64) + t).astype(np.float32)
    return np.asarray(project_to_pixels(points, float(focal), res), dtype=np.float32)


class FaceFolder:
    """The annotated photos of one folder, cropped on demand.

    Args:
        folder: a directory holding photos and their `.pts` files (same stem).
        resolution: (H, W) of the crops, or one int.
        target_landmarks: (68, 2) crop pixels onto which each photo's landmarks are fitted.
        framing: (focal, translation) of the encoder's training faces; with `model`, gives
            target_landmarks (see `framing_landmarks`). Not together with target_landmarks.
        model: the FaceModel for `framing` (default: FaceModel.default()).
        scale: the bounding-box framing's scale when neither target nor framing is given.
        rotation: also fit a rotation (False keeps photos upright).

    Attributes:
        items: [(image path, pts path)] in sorted order; `len(folder)` of them.
        landmarks: (N, 68, 2) float32, every photo's landmarks in photo pixels (read up front,
            so a bad `.pts` file is reported when the folder is opened).
        target_landmarks: (68, 2) float64 or None.

    Raises (naming the file or folder): FileNotFoundError for a missing folder; ValueError for a
    path that is not a folder, a folder without photos, a photo without its `.pts`, a bad `.pts`.
    """

    def __init__(self, folder, resolution, target_landmarks=None, framing=None, model=None,
                 scale=DEFAULT_SCALE, rotation=False):
        folder = os.fspath(folder)
        if not os.path.exists(folder):
            raise FileNotFoundError(f"{folder}: no such folder")
        if not os.path.isdir(folder):
            raise ValueError(f"{folder}: not a folder")
        self.folder = folder
        self.resolution = (resolution, resolution) if isinstance(resolution, (int, np.integer)) else tuple(resolution)
        if target_landmarks is not None and framing is not None:
            raise ValueError("give target_landmarks or framing, not both")
        if framing is not None:
            try:
                focal, translation = framing
            except (TypeError, ValueError):
                raise ValueError(f"framing must be (focal, translation); got {framing!r}") from None
            if model is None:
                from fastface.model import FaceModel
                model = FaceModel.default()
            target_landmarks = framing_landmarks(model, self.resolution, focal, translation)
        if target_landmarks is not None:
            target_landmarks = np.asarray(target_landmarks, dtype=np.float64)
            if target_landmarks.shape != (N_LANDMARKS, 2):
                raise ValueError(f"target_landmarks must be ({N_LANDMARKS}, 2); got {target_landmarks.shape}")
        self.target_landmarks = target_landmarks
        self.scale = float(scale)
        self.rotation = bool(rotation)

        names = sorted(os.listdir(folder))
        photos = [n for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                  and os.path.isfile(os.path.join(folder, n))]
        if not photos:
            raise ValueError(f"{folder}: no photos in the folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
        items, missing = [], []
        for name in photos:
            pts = os.path.join(folder, os.path.splitext(name)[0] + ".pts")
            (items if os.path.isfile(pts) else missing).append((os.path.join(folder, name), pts))
        if missing:
            shown = ", ".join(os.path.basename(p) for p, _ in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ValueError(f"{folder}: {len(missing)} photo(s) without a .pts file of the same name: "
                             f"{shown}{more} (expected e.g. {missing[0][1]})")
        self.items = items
        self.landmarks = np.stack([read_pts(pts) for _, pts in items])

    def __len__(self):
        return len(self.items)

    def __repr__(self):
        return f"FaceFolder({self.folder!r}, {len(self)} photos, resolution={self.resolution})"

    def _index(self, i):
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"indices must be integers; got {type(i).__name__}")
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} photos")
        return int(i) % len(self)

    def crop(self, index):
        """Crops one photo: (image (H, W, 3) float32, landmarks (68, 2) float32 crop pixels, Crop).

        The Crop maps photo pixels to crop pixels (its `invert` puts results back on the photo).
        A photo that cannot be read raises read_image's error, naming the file."""
        i = self._index(index)
        photo = read_image(self.items[i][0])
        lm = self.landmarks[i]
        h, w = photo.shape[:2]
        if lm[:, 0].max() > w + 0.5 or lm[:, 1].max() > h + 0.5 or lm.min() < -1.5:
            raise ValueError(f"{self.items[i][1]}: the landmarks lie outside the {w}x{h} photo "
                             f"{self.items[i][0]} (a .pts file of another image?)")
        image, crop = crop_from_landmarks(photo, lm, self.resolution, scale=self.scale,
                                          target_landmarks=self.target_landmarks, rotation=self.rotation)
        return image, crop.apply(lm), crop

    def batch(self, indices):
        """Crops several photos: (images (B, H, W, 3) float32, landmarks (B, 68, 2) float32 crop pixels)."""
        indices = list(np.asarray(indices).reshape(-1)) if not isinstance(indices, (list, tuple)) else list(indices)
        h, w = self.resolution
        images = np.empty((len(indices), h, w, 3), np.float32)
        landmarks = np.empty((len(indices), N_LANDMARKS, 2), np.float32)
        for b, i in enumerate(indices):
            images[b], landmarks[b], _ = self.crop(i)
        return images, landmarks
