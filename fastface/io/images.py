"""Reading photos: whatever OpenCV decodes, as (H, W, 3) float32 RGB in [0, 1].

OpenCV decodes a damaged file as far as it can and only prints a warning: a JPEG cut short comes
back as a whole image whose lower part is grey. `read_image` therefore checks the container
itself before decoding (a JPEG must end with its EOI marker, a PNG with its IEND chunk), so that a
truncated download is an error naming the file rather than a silently wrong photo.
"""
import os

import numpy as np

__all__ = ["read_image"]

_JPEG_SOI = b"\xff\xd8"
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"
# Some cameras and editors append bytes after the EOI marker (maker-note trailers, zero padding,
# second images of a multi-picture file that end with their own EOI). The marker must lie within
# this many bytes of the end; the entropy-coded data of a cut-off scan never contains it.
_JPEG_TRAILER_MAX = 1 << 16


def _check_path(path):
    """Returns the path as str after checking that it names an existing, non-empty file."""
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path}: the file is empty")
    return path


def _check_complete(path, data):
    """Raises ValueError when a JPEG or PNG file has been cut short."""
    if data.startswith(_JPEG_SOI):
        if data.rfind(_JPEG_EOI, max(0, len(data) - _JPEG_TRAILER_MAX)) < 0:
            raise ValueError(f"{path}: truncated JPEG (no end-of-image marker; the file was cut short)")
    elif data.startswith(_PNG_SIGNATURE):
        if data.rfind(_PNG_IEND) < 0:
            raise ValueError(f"{path}: truncated PNG (no IEND chunk; the file was cut short)")


def read_image(path):
    """Reads a photo as RGB.

    Args:
        path: str or path-like, any format OpenCV decodes (JPEG, PNG, TIFF, BMP, WebP, ...).

    Returns:
        (H, W, 3) float32 RGB in [0, 1], row 0 at the top. The EXIF orientation is applied (so
        H, W are those of the upright photo); a grey image is repeated into three channels; an
        alpha channel is dropped (the colour channels are kept as stored); 8-bit values are
        divided by 255, 16-bit by 65535; floating-point images are clipped to [0, 1].

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a directory, an empty file, a truncated JPEG or PNG, or a file OpenCV cannot
            decode. Every message starts with the path.
    """
    import cv2

    path = _check_path(path)
    with open(path, "rb") as f:  # bytes + imdecode: works with any file name, unlike cv2.imread
        data = f.read()
    _check_complete(path, data)
    # ANYDEPTH keeps 16-bit and float samples; ANYCOLOR keeps grey as one channel and drops alpha.
    # Without IMREAD_IGNORE_ORIENTATION (and unlike IMREAD_UNCHANGED), OpenCV rotates the image
    # by its EXIF orientation tag (tests/io/test_images.py checks it on a hand-made EXIF JPEG).
    flags = cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as e:
        raise ValueError(f"{path}: not an image OpenCV can decode ({e.err or e})") from None
    if image is None or image.size == 0:
        raise ValueError(f"{path}: not an image OpenCV can decode")
    if image.ndim == 2:
        image = image[:, :, None]
    channels = image.shape[2]
    if channels == 1:
        image = np.repeat(image, 3, axis=2)
    elif channels == 4:  # ANYCOLOR keeps alpha for some formats: drop it like IMREAD_COLOR does
        image = image[:, :, :3]
    elif channels != 3:
        raise ValueError(f"{path}: unsupported number of channels {channels}")
    image = image[:, :, ::-1]  # OpenCV's BGR to RGB
    if image.dtype == np.uint8:
        out = image.astype(np.float32) * np.float32(1 / 255)
    elif image.dtype == np.uint16:
        out = image.astype(np.float32) * np.float32(1 / 65535)
    elif image.dtype.kind == "f":
        out = np.clip(np.nan_to_num(image.astype(np.float32)), 0, 1)
    else:
        raise ValueError(f"{path}: unsupported sample type {image.dtype}")
    return np.ascontiguousarray(np.clip(out, 0, 1), dtype=np.float32)
