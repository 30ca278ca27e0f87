"""`python -m fastface train`: self-supervised training of the multi-level face model.

The loop only feeds batches, sums the weighted losses (fastface/objective.py), steps Adam, logs and
checkpoints; the numbers come from the pipeline (fastface/autoencoder.py).

Schedule (Tewari et al. train the base level first as well): for the first `base_fraction` of the
steps only the base level is rendered and trained (encoder alone: the morphable model, pose and light
must explain the images as far as they can before a corrective space may explain the rest); then
both levels are trained jointly with every term, the corrective space with its own Adam. The
learning rates drop by 10x for the last 15% of the steps.

Faults: a step whose loss or gradients are not finite is skipped (logged, weights untouched); the
checkpoint is written atomically every `checkpoint_every` steps, at the end and on Ctrl-C, so a
`kill -9` loses at most the steps since the last one. The data of step s depends only on (seed, s),
so `--resume` continues exactly as an uninterrupted run would from that checkpoint.
"""
import csv
import dataclasses
import json
import os
import pathlib
import signal
import sys
import time

import numpy as np

__all__ = ["TrainSettings", "train", "default_settings", "add_parser", "run"]

# The encoder's arithmetic on the GPU unless a run asks for another. TF32 tensor cores (float32 range,
# 10-bit mantissa products, float32 sums) ran the encoder's forward at batch 256 in 1.395 ms against
# 2.774 ms in float32 on the H200 (bench/RESULTS.md, run 3), the encoder being about half of a float32
# training step; unlike float16 it needs no loss scaling. The CPU computes in float32 whatever is asked.
GPU_PRECISION = "tf32"

# Per-device defaults: the configuration a user should run.
# cpu: shows the method on two cores in well under 15 minutes (the small model, 64x64).
# gpu: the full configuration (the default model, 224x224, batch 64).
DEFAULTS = {
    "cpu": dict(level="small", resolution=64, batch=8, steps=6000, checkpoint_every=500, preview_every=1000),
    "gpu": dict(level="default", resolution=224, batch=64, steps=40000, checkpoint_every=2000, preview_every=2000),
}


@dataclasses.dataclass
class TrainSettings:
    device: str = "cpu"
    level: str = "small"
    resolution: int = 64
    batch: int = 8
    steps: int = 6000
    seed: int = 0
    lr: float = 3e-4
    corrective_lr: float = 3e-3
    base_fraction: float = 0.3
    checkpoint_every: int = 500
    preview_every: int = 1000
    n_geometry: int = 64
    n_reflectance: int = 64
    data: str = None
    widths: tuple = (32, 64, 128, 256)
    weights: dict = None
    geometry_code_scale: float = 30.0
    reflectance_code_scale: float = 1.0
    graph: bool = None  # record each stage's step in a CUDA graph; None: on the GPU (fastface/training_step.py)
    precision: str = None  # the encoder's GEMMs on the GPU: "float32", "tf32" or "float16" (the face model's and the
    #                        corrective space's: float32 for "float32", else tf32); None: GPU_PRECISION
    antialias: bool = False  # render the levels with the outline blended into the input (fastface/autoencoder.py)

    def to_dict(self):
        d = dataclasses.asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        if "widths" in d:
            d["widths"] = tuple(int(w) for w in d["widths"])
        return cls(**d)


def default_settings(device="cpu", **overrides):
    """TrainSettings with the device's defaults, then `overrides` (None values ignored)."""
    values = dict(DEFAULTS[device])
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainSettings(device=device, **values)


# ----------------------------------------------------------------------------------------------
# Building the pieces
# ----------------------------------------------------------------------------------------------

def build(settings, checkpoint=None):
    """(autoencoder, objective, optimizers, data) for `settings`, from `checkpoint` where given."""
    from fastface.autoencoder import CodeLayout, FaceAutoencoder
    from fastface.data.synthetic import default_framing
    from fastface.model import FaceModel
    from fastface.model.corrective import CorrectiveSpace
    from fastface.nn import Adam, Encoder
    from fastface.objective import LossWeights, MultiLevelObjective

    resolution = (settings.resolution, settings.resolution)
    model = FaceModel.default(level=settings.level)
    focal, translation = default_framing(resolution)
    layout = CodeLayout(n_shape=model.n_shape, n_expression=model.n_expression, n_albedo=model.n_albedo,
                        n_geometry=settings.n_geometry, n_reflectance=settings.n_reflectance,
                        translation=tuple(float(t) for t in translation),
                        geometry_code_scale=settings.geometry_code_scale,
                        reflectance_code_scale=settings.reflectance_code_scale)
    if checkpoint is not None:
        encoder, correctives = checkpoint.encoder(), checkpoint.correctives()
    else:
        encoder = Encoder(n_outputs=layout.size, resolution=settings.resolution, seed=settings.seed,
                          widths=settings.widths)
        correctives = CorrectiveSpace(model.n_vertices, n_geometry=settings.n_geometry,
                                      n_reflectance=settings.n_reflectance, seed=settings.seed)
    if settings.device == "gpu":
        precision = settings.precision or GPU_PRECISION
        # The face model's and the corrective decoders' GEMMs go to TF32 tensor cores too unless the run
        # asks for float32 throughout (their float32 CUDA-core GEMMs took ~0.5 ms of a 5 ms step on the H200).
        gemm_precision = "float32" if precision == "float32" else "tf32"
        model = model.to("gpu", precision=gemm_precision)
        encoder.to("gpu", precision=precision)
        correctives.to("gpu", precision=gemm_precision)
    autoencoder = FaceAutoencoder(model, encoder, correctives, layout, resolution, focal, antialias=settings.antialias)
    objective = MultiLevelObjective(model, resolution, LossWeights.from_dict(settings.weights or {}))
    optimizers = {"encoder": Adam(encoder, lr=settings.lr, clip_norm=10.0),
                  "correctives": Adam(correctives, lr=settings.corrective_lr, clip_norm=10.0)}
    if checkpoint is not None:
        for name, opt in optimizers.items():
            checkpoint.restore_optimizer(name, opt)
    return autoencoder, objective, optimizers


class _Data:
    """The batches of a run: synthetic faces (default) or a folder of photos with .pts files.

    The batch of step s depends only on (seed, s), never on the steps before: a resumed run sees the
    same data as an uninterrupted one.
    """

    def __init__(self, settings, model, focal, translation):
        from fastface.data.synthetic import TRAIN_SEEDS, SyntheticFaces
        resolution = (settings.resolution, settings.resolution)
        self.seed, self.batch = settings.seed, settings.batch
        self.folder = None
        self._drawn = None  # (step, SyntheticFaces.draw) made ahead by prefetch
        if settings.data:
            from fastface.data.folder import FaceFolder
            host_model = model if model.device == "cpu" else model.to("cpu")
            self.folder = FaceFolder(settings.data, resolution, framing=(focal, translation), model=host_model)
            self.xp = np if model.device == "cpu" else __import__("cupy")
            if len(self.folder) == 0:
                raise ValueError(f"{settings.data} holds no photo with a .pts file")
        else:
            self.train_seeds = TRAIN_SEEDS
            # The data is rendered with the model in float32 whatever the run's GEMM precision (a GPU
            # run's model may evaluate in TF32: fine for training, not for the faces' ground truth). The
            # copy shares the model's arrays.
            self.faces = SyntheticFaces(model.to(model.device, precision="float32"), resolution=resolution)

    def _seeds(self, rng):
        return [self.train_seeds[int(i)] for i in rng.integers(0, len(self.train_seeds), size=self.batch)]

    def prefetch(self, step):
        """Draws the synthetic faces of `step` on the host now (the loop calls it while the GPU runs the
        step before: on the H200 a batch's draws kept the GPU waiting ~2 ms of a 9.8 ms loop step)."""
        if self.folder is None and (self._drawn is None or self._drawn[0] != step):
            self._drawn = (step, self.faces.draw(self._seeds(np.random.default_rng([self.seed, step]))))

    def __call__(self, step):
        rng = np.random.default_rng([self.seed, step])
        if self.folder is not None:
            idx = rng.integers(0, len(self.folder), size=self.batch)
            images, landmarks = self.folder.batch(idx)
            return self.xp.asarray(images), self.xp.asarray(landmarks)
        seeds = self._seeds(rng)
        draws = self._drawn[1] if self._drawn is not None and self._drawn[0] == step else None
        self._drawn = None
        b = self.faces.batch(seeds, draws=draws)
        return b.images, b.landmarks


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def _lr_factor(step, steps):
    return 0.1 if step >= int(0.85 * steps) else 1.0


class _Log:
    """DIR/log.csv: step, loss, every term, images/s; on resume, rows past the checkpoint are dropped."""

    def __init__(self, path, resume_step):
        from fastface.objective import TERM_NAMES
        self.columns = ["step", "loss", *TERM_NAMES, "images_per_s", "skipped"]
        self.path = pathlib.Path(path)
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        with open(self.path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows({k: r.get(k, "") for k in self.columns} for r in rows)
        self._file = open(self.path, "a", newline="")
        self._writer = csv.DictWriter(self._file, self.columns)

    def write(self, row):
        self._writer.writerow({k: row.get(k, "") for k in self.columns})
        self._file.flush()

    def close(self):
        self._file.close()


def train(settings, out_dir, resume=False, progress=True, stop_after=None):
    """Trains (or resumes) a run into `out_dir`; returns the path of the final checkpoint.

    Args:
        settings: TrainSettings (ignored for the architecture when resuming: the checkpoint's win,
            except `steps`, which may extend the run).
        out_dir: folder for checkpoint.h5, log.csv and preview_STEP.png.
        resume: continue from out_dir/checkpoint.h5.
        progress: show a tqdm progress bar.
        stop_after: stop (with a checkpoint) after this many steps of this call (tests).
    """
    from fastface.checkpoint import load_checkpoint, save_checkpoint
    from fastface.training_step import TrainingStep

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = out_dir / "checkpoint.h5"
    checkpoint = None
    start = 0
    if resume:
        checkpoint = load_checkpoint(ckpt_path)
        saved = TrainSettings.from_dict(checkpoint.settings)
        saved.steps = settings.steps if settings.steps else saved.steps
        saved.device = settings.device
        saved.graph = settings.graph
        saved.precision = settings.precision or saved.precision
        settings = saved
        start = checkpoint.step
    elif ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    autoencoder, objective, optimizers = build(settings, checkpoint)
    data = _Data(settings, autoencoder.model, autoencoder.focal, autoencoder.layout.translation)
    log = _Log(out_dir / "log.csv", start if resume else None)
    base_steps = int(settings.base_fraction * settings.steps)
    base_lrs = {name: opt.lr for name, opt in optimizers.items()}
    (out_dir / "settings.json").write_text(json.dumps(settings.to_dict(), indent=2, sort_keys=True))

    def save(step):
        save_checkpoint(ckpt_path, step, settings.to_dict(), autoencoder.encoder, autoencoder.correctives, optimizers)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=settings.steps, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)
    interrupted = False
    previous_handler = signal.getsignal(signal.SIGTERM)

    def on_term(signum, frame):  # a polite kill: checkpoint and stop like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    step = start
    done_here = 0
    # One TrainingStep per stage: on the GPU each is recorded in a CUDA graph at its second step.
    stages = {final: TrainingStep(autoencoder, objective, optimizers, final, graph=settings.graph)
              for final in (False, True)}
    try:
        while step < settings.steps:
            t0 = time.perf_counter()
            final = step >= base_steps
            for name, opt in optimizers.items():
                lr = base_lrs[name] * _lr_factor(step, settings.steps)
                if opt.lr != lr:
                    opt.lr = lr  # read on the device, also by a captured step
            if final and False in stages:
                del stages[False]  # the base stage is over: its graph and the memory it holds go
            images, landmarks = data(step)
            # The first batch is checked; then the loop runs unchecked. A step whose loss or gradient is
            # not finite changes no weight (decided on the device); the report says so.
            values = stages[final].launch(images, landmarks, check_values=step == start)
            if step + 1 < settings.steps:
                data.prefetch(step + 1)  # the next batch's host-side draws, while the GPU runs this step
            report = stages[final].read(values)
            means, loss, skipped = report.means, report.loss, report.skipped
            if skipped:
                print(f"step {step}: non-finite loss or gradient, step skipped (weights untouched)", file=sys.stderr)
            step += 1
            done_here += 1
            dt = time.perf_counter() - t0
            row = {"step": step, "loss": f"{loss:.6g}", "images_per_s": f"{settings.batch / dt:.1f}",
                   "skipped": int(skipped), **{k: f"{v:.6g}" for k, v in means.items()}}
            log.write(row)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{settings.batch / dt:.0f}",
                                level="both" if final else "base", refresh=False)
                bar.update(1)
            if step % settings.checkpoint_every == 0 or step == settings.steps:
                save(step)
            if settings.preview_every and (step % settings.preview_every == 0 or step == settings.steps):
                write_preview(autoencoder, images, out_dir / f"preview_{step:06d}.png")
            if stop_after is not None and done_here >= stop_after:
                save(step)
                break
    except KeyboardInterrupt:
        interrupted = True
        save(step)
        print(f"\ninterrupted: checkpoint at step {step} written to {ckpt_path}", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        log.close()
        if bar is not None:
            bar.close()
    if interrupted:
        raise KeyboardInterrupt
    return ckpt_path


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------

def _grey_light(batch, xp):
    """(B, 9, 3) SH of an ambient term and a light from the upper left front: shows the shape."""
    from fastface.render import uniform_light
    sh = uniform_light(batch, xp) * 0.45
    d = np.array([-0.4, 0.5, 1.0])
    d = d / np.linalg.norm(d)
    x, y, z = d
    basis = np.array([0.282095, 0.488603 * y, 0.488603 * z, 0.488603 * x, 1.092548 * x * y, 1.092548 * y * z,
                      0.315392 * (3 * z * z - 1), 1.092548 * x * z, 0.546274 * (x * x - y * y)])
    sh += xp.asarray((0.7 * basis / np.pi)[None, :, None].astype(np.float32))
    return sh


def render_levels(autoencoder, images):
    """(input, base, final, grey final geometry) images (B, H, W, 3) on the host, composited on the input."""
    from fastface._backend import is_cupy_array
    from fastface.render import render_faces
    host = lambda a: a.get() if is_cupy_array(a) else np.asarray(a)  # noqa: E731
    out = autoencoder.forward(images, final=True)
    xp = np if autoencoder.device == "cpu" else __import__("cupy")
    B = images.shape[0]
    grey = xp.full_like(out.final.albedo, 0.7) - (out.final.albedo - out.reflectance_offsets)
    params = dataclasses.replace(out.params, sh=_grey_light(B, xp))
    shaded = render_faces(autoencoder.model, params, autoencoder.resolution, autoencoder.focal,
                          geometry_offsets=out.geometry_offsets, reflectance_offsets=grey)
    over = lambda r: host(xp.where(r.mask[..., None], r.image, images))  # noqa: E731
    geometry = host(xp.where(shaded.mask[..., None], shaded.image, 0.15))
    return host(images), over(out.base), over(out.final), geometry


def write_preview(autoencoder, images, path, n=4, tile=128):
    """A PNG: one row per face, columns input | base reconstruction | final reconstruction | final geometry."""
    import cv2

    from fastface._files import atomic_write
    columns = render_levels(autoencoder, images[:n])
    rows = []
    for b in range(columns[0].shape[0]):
        tiles = [cv2.resize(np.clip(np.nan_to_num(c[b]), 0, 1), (tile, tile), interpolation=cv2.INTER_LINEAR) for c in columns]
        rows.append(np.concatenate(tiles, axis=1))
    picture = (np.concatenate(rows, axis=0)[..., ::-1] * 255 + 0.5).astype(np.uint8)
    with atomic_write(path) as tmp:
        if not cv2.imwrite(tmp, picture):
            raise OSError(f"OpenCV could not write the preview {path}")
    return path


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def add_parser(commands):
    p = commands.add_parser("train", help="train the multi-level face model on synthetic faces (or photos)",
                            description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--out", required=True, help="run folder: checkpoint.h5, log.csv, preview_STEP.png")
    p.add_argument("--level", choices=("small", "default"), help="face model level (cpu: small, gpu: default)")
    p.add_argument("--resolution", type=int, help="image size (cpu: 64, gpu: 224)")
    p.add_argument("--steps", type=int, help="training steps (cpu: 6000, gpu: 40000)")
    p.add_argument("--batch", type=int, help="images per step (cpu: 8, gpu: 64)")
    p.add_argument("--data", help="a folder of face photos with iBUG .pts files (default: synthetic faces)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--antialias", action="store_true",
                   help="render both levels with the outline antialiased into the input (the silhouette then "
                        "pulls on the geometry; measured on synthetic faces: better photometric and landmark "
                        "errors, worse geometry)")
    p.add_argument("--precision", choices=("float32", "tf32", "float16"),
                   help=f"gpu: the encoder's arithmetic (default {GPU_PRECISION}; float16 uses a static loss scale); "
                        "the face model's and the correctives' GEMMs are float32 with float32, else tf32")
    p.add_argument("--no-graph", action="store_true",
                   help="gpu: run every step eagerly instead of replaying it from a CUDA graph (slower; for debugging)")
    return p


def run(args):
    if args.resolution is not None and (args.resolution < 16 or args.resolution % 4):
        raise SystemExit("--resolution must be a multiple of 4, at least 16")
    for name in ("steps", "batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name} must be at least 1")
    if args.data is not None and not os.path.isdir(args.data):
        raise SystemExit(f"--data {args.data}: no such folder")
    if args.precision is not None and args.device != "gpu":
        raise SystemExit("--precision applies to --device gpu (the CPU computes in float32)")
    settings = default_settings(args.device, level=args.level, resolution=args.resolution, steps=args.steps,
                                batch=args.batch, data=args.data, seed=args.seed,
                                graph=False if args.no_graph else None, precision=args.precision,
                                antialias=args.antialias or None)
    start = time.perf_counter()
    try:
        path = train(settings, args.out, resume=args.resume, progress=not args.no_progress)
    except KeyboardInterrupt:
        return 130
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"fastface train: {e}", file=sys.stderr)
        return 2
    print(f"trained in {time.perf_counter() - start:.0f} s; checkpoint: {path}")
    print(f"evaluate it: python -m fastface evaluate --checkpoint {path}")
    return 0
