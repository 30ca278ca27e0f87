"""Training and evaluation data: synthetic faces with ground truth (and a reader of real photos)."""
from fastface.data.synthetic import (EVAL_SEEDS, TRAIN_SEEDS, SyntheticBatch, SyntheticFaces, default_framing,
                                     directional_sh)
from fastface.data.folder import FaceFolder, framing_landmarks

__all__ = ["TRAIN_SEEDS", "EVAL_SEEDS", "SyntheticFaces", "SyntheticBatch", "default_framing", "directional_sh", "FaceFolder",
           "framing_landmarks"]
