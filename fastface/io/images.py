"""Reading photos: whatever OpenCV decodes, as (H, W, 3) float32 RGB in [0, 1].

libjpeg decodes a damaged file as far as it can and only warns: depending on the OpenCV build, a
JPEG cut short comes back as a whole image whose lower part is grey, or as nothing. `read_image`
therefore checks the container itself before decoding (a JPEG's segments and scans must reach its
end-of-image marker, a PNG must hold its IEND chunk), so that a truncated download is an error
naming the file rather than a silently wrong photo.
"""
import os

import numpy as np

from fastface._files import atomic_write

__all__ = ["read_image", "write_image"]

_JPEG_SOI = b"\xff\xd8"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


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


def _jpeg_end(data):
    """The offset just past the JPEG's end-of-image marker, or -1 when the data stops before it.

    Walks the marker segments from SOI (each carries its length, so an EXIF thumbnail's own
    markers are skipped) and, after each start-of-scan, the entropy-coded data up to the next
    marker (0xFF followed by 0x00 is a stuffed byte, 0xD0-0xD7 a restart marker). Phones append
    whole videos after the EOI of a motion photo, so the marker cannot be looked for at the end.
    """
    n = len(data)
    pos = 2
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return -1  # not a marker where one must be: damaged
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:
            return pos + 2
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # stand-alone markers
            pos += 2
            continue
        if pos + 3 >= n:
            return -1
        pos += 2 + (data[pos + 2] << 8 | data[pos + 3])
        if marker == 0xDA:  # start of scan: skip the entropy-coded data
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return -1
                following = data[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2
                    continue
                break
    return -1


def _check_complete(path, data):
    """Raises ValueError when a JPEG or PNG file has been cut short."""
    if data.startswith(_JPEG_SOI):
        if _jpeg_end(data) < 0:
            raise ValueError(f"{path}: truncated JPEG (the data ends before the end-of-image marker; "
                             f"the file was cut short or damaged)")
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
        out = image.astype(np.float32) / np.float32(255)  # correctly rounded k / 255
    elif image.dtype == np.uint16:
        out = image.astype(np.float32) / np.float32(65535)
    elif image.dtype.kind == "f":
        out = np.clip(np.nan_to_num(image.astype(np.float32)), 0, 1)
    else:
        raise ValueError(f"{path}: unsupported sample type {image.dtype}")
    return np.ascontiguousarray(np.clip(out, 0, 1), dtype=np.float32)


def write_image(path, image, bits=8, quality=95):
    """Writes an RGB (or grey) image atomically, in the format of the path's extension.

    Args:
        path: str or path-like ending in .png, .jpg/.jpeg, .bmp, .tif/.tiff or .webp.
        image: (H, W, 3) RGB or (H, W) grey, float in [0, 1] (clipped; NaN written as 0), or
            uint8 / uint16 (written as they are).
        bits: 8 or 16 for float images (16 only for PNG and TIFF).
        quality: JPEG and WebP quality, 1..100.

    A failed write leaves an earlier file at `path` as it was (fastface._files.atomic_write).
    """
    import cv2

    a = np.asarray(image)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or a.dtype.kind not in "fu":
        raise ValueError(f"image must be (H, W, 3) RGB or (H, W) grey, float in [0, 1] or uint8/uint16; "
                         f"got {a.dtype} {a.shape}")
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16; got {bits!r}")
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"):
        raise ValueError(f"{path}: cannot tell the image format from the extension {ext!r} "
                         f"(use .png, .jpg, .bmp, .tif or .webp)")
    if a.dtype.kind == "f":
        if bits == 16 and ext not in (".png", ".tif", ".tiff"):
            raise ValueError(f"{path}: 16-bit images need .png or .tif")
        top = 65535 if bits == 16 else 255
        a = np.round(np.clip(np.nan_to_num(a.astype(np.float64)), 0, 1) * top).astype(np.uint16 if bits == 16 else np.uint8)
    if a.ndim == 3:
        a = np.ascontiguousarray(a[:, :, ::-1])  # RGB to OpenCV's BGR
    params = []
    if ext in (".jpg", ".jpeg"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif ext == ".webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, int(quality)]
    ok, buf = cv2.imencode(ext, a, params)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode a {a.dtype} {a.shape} image as {ext}")
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(buf.tobytes())
