"""`python -m fastface evaluate`: a trained checkpoint on held-out synthetic faces, base level against final level.

For every face of `EVAL_SEEDS` (disjoint from the training seeds) it reconstructs both levels and
measures, per image:
- geometric_error_mm: mean per-vertex distance between the reconstructed and the true model-space
  vertices after the rigid alignment (rotation and translation, Kabsch) that minimises it; the true
  vertices include the detail outside the base model's span;
- photometric_error: mean per-pixel colour distance (||rendered - input||, RGB in [0, 1]) over the
  pixels the reconstruction covers;
- landmark_error_px: mean distance of the 68 projected model landmarks to the true ones, in pixels.
It prints a table and writes eval.json beside the checkpoint.
"""
import json
import pathlib
import sys
import time

import numpy as np

__all__ = ["evaluate", "rigid_alignment_error", "add_parser", "run"]

METRICS = ("geometric_error_mm", "photometric_error", "landmark_error_px")


def rigid_alignment_error(predicted, truth):
    """(B,) mean distance between (B, V, 3) point sets after the best rotation and translation of `predicted`.

    Kabsch (1976): centre both, the rotation from the SVD of the cross-covariance (a reflection
    excluded), in float64.
    """
    p = np.asarray(predicted, np.float64)
    t = np.asarray(truth, np.float64)
    p = p - p.mean(axis=1, keepdims=True)
    t = t - t.mean(axis=1, keepdims=True)
    out = np.empty(p.shape[0])
    for b in range(p.shape[0]):
        u, _, vt = np.linalg.svd(p[b].T @ t[b])
        d = np.sign(np.linalg.det(u @ vt))
        r = u @ np.diag([1.0, 1.0, d]) @ vt
        out[b] = np.linalg.norm(p[b] @ r - t[b], axis=1).mean()
    return out


def _host(a):
    return a.get() if hasattr(a, "get") else np.asarray(a)


def evaluate(checkpoint_path, n=200, batch=None, device="cpu", progress=True):
    """Metrics of both levels on `n` held-out synthetic faces; returns the dict written to eval.json."""
    from fastface.data.synthetic import EVAL_SEEDS, SyntheticFaces
    from fastface.reconstructor import Reconstructor

    rec = Reconstructor(checkpoint_path, device=device)
    faces = SyntheticFaces(rec.model, resolution=rec.resolution)
    batch = batch or rec.settings.batch
    seeds = [EVAL_SEEDS[i] for i in range(n)]
    per = {f"{m}_{level}": [] for m in METRICS for level in ("base", "final")}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, unit="face", dynamic_ncols=True, file=sys.stderr, desc="evaluate")
    start = time.perf_counter()
    for i in range(0, n, batch):
        data = faces.batch(seeds[i:i + batch])
        out = rec(data.images)
        truth_v = _host(data.vertices)
        truth_lm = _host(data.landmarks)
        images = _host(data.images)
        for level in ("base", "final"):
            rendering = out.render(level)
            vertices = _host(getattr(out, f"vertices_{level}"))
            per[f"geometric_error_mm_{level}"] += list(rigid_alignment_error(vertices, truth_v))
            image, mask = _host(rendering.image), _host(rendering.mask)
            distance = np.linalg.norm(image.astype(np.float64) - images, axis=-1)
            covered = np.maximum(mask.sum(axis=(1, 2)), 1)
            per[f"photometric_error_{level}"] += list((distance * mask).sum(axis=(1, 2)) / covered)
            landmarks = _host(rendering.landmarks)
            per[f"landmark_error_px_{level}"] += list(np.linalg.norm(landmarks - truth_lm, axis=-1).mean(axis=1))
        if bar is not None:
            bar.update(len(seeds[i:i + batch]))
    if bar is not None:
        bar.close()
    result = {k: float(np.mean(v)) for k, v in per.items()}
    result.update({f"{k}_std": float(np.std(v)) for k, v in per.items()})
    result.update(n=n, step=rec.step, seconds=time.perf_counter() - start,
                  checkpoint=str(pathlib.Path(checkpoint_path).resolve()),
                  settings={k: rec.settings.to_dict()[k] for k in ("level", "resolution", "seed", "steps")})
    for k, v in result.items():
        if isinstance(v, float) and not np.isfinite(v):
            raise ValueError(f"evaluation produced a non-finite {k}; the checkpoint may be broken")
    return result


def format_table(result):
    lines = [f"{'metric':<22} {'base':>10} {'final':>10} {'final - base':>13}"]
    for m in METRICS:
        b, f = result[f"{m}_base"], result[f"{m}_final"]
        lines.append(f"{m:<22} {b:>10.4f} {f:>10.4f} {f - b:>+13.4f}")
    return "\n".join(lines)


def add_parser(commands):
    p = commands.add_parser("evaluate", help="measure a checkpoint on held-out synthetic faces (base vs final level)")
    p.add_argument("--checkpoint", required=True, help="checkpoint.h5 written by train")
    p.add_argument("--n", type=int, default=200, help="number of held-out faces (default 200)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--no-progress", action="store_true")
    return p


def run(args):
    from fastface._files import atomic_write
    if args.n < 1:
        raise SystemExit("--n must be at least 1")
    try:
        result = evaluate(args.checkpoint, n=args.n, device=args.device, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastface evaluate: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    path = pathlib.Path(args.checkpoint).resolve().parent / "eval.json"
    with atomic_write(path) as tmp:
        pathlib.Path(tmp).write_text(json.dumps(result, indent=2, sort_keys=True))
    print(f"{result['n']} held-out faces, checkpoint step {result['step']}; written to {path}")
    return 0
