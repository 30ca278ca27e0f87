"""Photos, landmarks, meshes and face crops: what goes into fastface and what comes out.

- `read_image`: any photo OpenCV reads, as (H, W, 3) float32 RGB in [0, 1]; `write_image`.
- `read_pts`, `write_pts`: iBUG `.pts` landmark files (1-based on disk, 0-based in memory).
- `Crop`, `crop_from_landmarks`, `crop_from_box`: the face cut out and scaled, with the
  similarity transform that maps results back onto the photo.
- `save_obj`, `save_ply`, `load_obj`: meshes with vertex colours.
- `detect_faces`: OpenCV's frontal-face Haar cascades (shipped with fastface), the best supported first.
"""
from fastface.io.crop import (BOX_CENTRE_DY, BOX_SIZE, DEFAULT_SCALE, Crop, crop_from_box,
                              crop_from_landmarks, landmark_frame)
from fastface.io.detect import CASCADES, detect_faces
from fastface.io.images import read_image, write_image
from fastface.io.landmarks import N_LANDMARKS, read_pts, write_pts
from fastface.io.mesh import load_obj, save_obj, save_ply

__all__ = ["read_image", "write_image", "read_pts", "write_pts", "N_LANDMARKS", "Crop", "crop_from_landmarks",
           "crop_from_box", "landmark_frame", "DEFAULT_SCALE", "BOX_CENTRE_DY", "BOX_SIZE",
           "save_obj", "save_ply", "load_obj", "detect_faces", "CASCADES"]
