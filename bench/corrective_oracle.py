"""How much of what the corrective level could learn a trained checkpoint has learned.

The synthetic faces differ from the base model's mean by a population offset outside the model's
span (fastface.data.synthetic.POPULATION_GEOMETRY_RMS), the same in every face: the part of the
detail a corrective space can capture best. On held-out faces this prints the geometric error
(after rigid alignment) of the base level, of the final level, and of the base level plus the true
offset (what a perfect learned offset would reach), then how the learned offsets compare with it.

    PYTHONPATH=$PWD python bench/corrective_oracle.py run/checkpoint.h5 [n_faces]
"""
import sys

import numpy as np

from fastface.data.synthetic import EVAL_SEEDS, SyntheticFaces
from fastface.evaluate import rigid_alignment_error
from fastface.reconstructor import Reconstructor


def rms(field):
    return float(np.sqrt((field ** 2).sum(-1).mean()))


def main(path, n=96):
    rec = Reconstructor(path)
    faces = SyntheticFaces(rec.model, resolution=rec.resolution)
    population = np.asarray(faces.population_vertices)
    errors = {"base": [], "final": [], "base + true population offset": []}
    offsets = []
    batch = rec.settings.batch
    for i in range(0, n, batch):
        data = faces.batch([EVAL_SEEDS[k] for k in range(i, min(n, i + batch))])
        out = rec(data.images)
        truth, base, final = (np.asarray(a) for a in (data.vertices, out.vertices_base, out.vertices_final))
        offsets.append(final - base)
        errors["base"] += list(rigid_alignment_error(base, truth))
        errors["final"] += list(rigid_alignment_error(final, truth))
        errors["base + true population offset"] += list(rigid_alignment_error(base + population, truth))
    offsets = np.concatenate(offsets)
    mean = offsets.mean(0)
    for name, e in errors.items():
        print(f"geometric error, {name}: {np.mean(e):.4f} mm")
    cosine = float((mean * population).sum() / np.linalg.norm(mean) / np.linalg.norm(population))
    print(f"population offset {rms(population):.3f} mm RMS; learned offsets' mean {rms(mean):.3f} mm RMS, "
          f"cosine {cosine:.3f} with it; per-face part about the mean {rms(offsets - mean):.3f} mm RMS")


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]))
