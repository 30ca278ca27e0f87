"""Fixtures for the io tests: the real annotated photos in shared/data/faces (skipped where absent)."""
import os

import pytest

FACES = os.environ.get("FASTFACE_FACES") or os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "faces"))
if not os.path.isdir(FACES):
    FACES = "/work/shared/data/faces"


def face_photos():
    """[(image path, pts path)] of the annotated photos, sorted; [] where the folder is absent."""
    if not os.path.isdir(FACES):
        return []
    pairs = []
    for name in sorted(os.listdir(FACES)):
        stem, ext = os.path.splitext(name)
        if ext.lower() in (".jpg", ".png") and os.path.exists(os.path.join(FACES, stem + ".pts")):
            pairs.append((os.path.join(FACES, name), os.path.join(FACES, stem + ".pts")))
    return pairs


@pytest.fixture
def photos():
    pairs = face_photos()
    if not pairs:
        pytest.skip(f"the annotated photos are not here ({FACES})")
    return pairs
