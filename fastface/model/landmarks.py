"""The iBUG 68-point landmark scheme: the groups of points and the left/right mirror permutation.

Points are numbered 0..67 as in the iBUG 300-W annotations; "left" and "right" below are the
image's (the viewer's), so that point 36, the outer corner of the eye on the image's left, is the
subject's right eye.
"""
import numpy as np

__all__ = ["IBUG68_GROUPS", "IBUG68_MIRROR"]

IBUG68_GROUPS = {
    "jaw": tuple(range(0, 17)),            # along the jaw line, image left to image right
    "brow_left": tuple(range(17, 22)),     # image-left brow, outer end to inner end
    "brow_right": tuple(range(22, 27)),    # image-right brow, inner end to outer end
    "nose_bridge": tuple(range(27, 31)),   # nasion down to the nose tip (30)
    "nose_base": tuple(range(31, 36)),     # image left to image right, 33 under the tip
    "eye_left": tuple(range(36, 42)),      # image-left eye: 36 outer corner, 39 inner corner
    "eye_right": tuple(range(42, 48)),     # image-right eye: 42 inner corner, 45 outer corner
    "lips_outer": tuple(range(48, 60)),    # 48 image-left corner, 51 top, 54 right corner, 57 bottom
    "lips_inner": tuple(range(60, 68)),    # 60 image-left corner, 62 top, 64 right corner, 66 bottom
}

_PAIRS = [(k, 16 - k) for k in range(8)] + [(17 + k, 26 - k) for k in range(5)] + [
    (31, 35), (32, 34), (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46), (48, 54), (49, 53),
    (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)]


def _mirror_permutation():
    perm = np.arange(68, dtype=np.int32)
    for a, b in _PAIRS:
        perm[a], perm[b] = b, a
    perm.setflags(write=False)
    return perm


# IBUG68_MIRROR[k] is the point that k becomes when the face is mirrored left to right
# (for flip augmentation: landmarks_flipped = landmarks[IBUG68_MIRROR] with x negated).
IBUG68_MIRROR = _mirror_permutation()
