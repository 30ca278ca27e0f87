"""`python -m fastface reconstruct PHOTO_OR_FOLDER --out DIR`: photos in, 3D faces out.

For each photo STEM it writes, each file atomically (fastface._files.atomic_write):
    DIR/STEM.obj, DIR/STEM.ply     the mesh in model space (mm), vertex colours from the albedo
    DIR/STEM_params.json           every parameter, named; the crop and the camera (written last)
    DIR/STEM_overlay.png           the shaded reconstruction blended over the photo, landmarks drawn
    DIR/STEM_landmarks.pts         the model's 68 landmarks projected into the photo (iBUG, 1-based)
A rerun skips the photos whose five files all exist, so an interrupted folder resumes.

Per photo: read it (fastface.io.read_image), find the face (given landmarks, or OpenCV's
detector), crop it to the fitting resolution with the framing of the fitter's starting pose
(the mean face's landmarks projected at `fit.default_pose`, so that a detector's box already
puts the face where the fit starts), fit (fastface.fit; with --checkpoint the trained encoder
gives the starting point), and map the results back onto the photo with Crop.invert.

With --workers N (a local Dask cluster of N processes) or --scheduler ADDRESS (a running Dask
scheduler; its workers must be able to import fastface) the photos are spread over Dask workers.
Each worker builds its model (or loads its checkpoint) once and keeps it in a module-level cache.
Every photo is fitted alone, with the same arithmetic, wherever it runs, so the outputs are the
same as in one process. A worker that dies mid-run loses nothing: the scheduler runs its photos
again elsewhere, and the atomic writes leave no half-written file behind.
"""
import contextlib
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time

import numpy as np

__all__ = ["add_parser", "run", "Settings", "reconstruct_photo", "reconstruct_paths", "find_photos",
           "PHOTO_EXTENSIONS", "OUTPUT_SUFFIXES"]

PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".jp2", ".pgm", ".ppm")
OUTPUT_SUFFIXES = (".obj", ".ply", "_overlay.png", "_landmarks.pts", "_params.json")
# The overlay is rendered at about the photo's own pixel density around the face, up to this size.
_OVERLAY_MAX_RENDER = 1024


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every photo of one run shares (sent to the Dask workers: plain values only)."""
    out: str
    device: str = "cpu"
    checkpoint: str = None
    resolution: int = None      # None: the fitter's default (or the checkpoint's)
    iterations: int = None      # None: fit.DEFAULT_ITERATIONS
    landmark_iterations: int = None
    antialias: bool = True      # fit with the outline blended into the photo (see fit's docstring)

    def fit_options(self):
        from fastface.fit import DEFAULT_ITERATIONS, DEFAULT_LANDMARK_ITERATIONS
        return dict(iterations=DEFAULT_ITERATIONS if self.iterations is None else self.iterations,
                    landmark_iterations=(DEFAULT_LANDMARK_ITERATIONS if self.landmark_iterations is None
                                         else self.landmark_iterations), antialias=self.antialias)


class PhotoError(Exception):
    """A photo that cannot be reconstructed (unreadable, no face, bad landmarks): one line for the user."""


# ---------------------------------------------------------------------------------------------
# What one process (or Dask worker) loads once

_CACHE = {}


def _state(settings):
    """(model, resolution, focal, target_landmarks, reconstructor or None), built once per process."""
    key = (settings.device, settings.checkpoint, settings.resolution)
    state = _CACHE.get(key)
    if state is None:
        import importlib
        fit_module = importlib.import_module("fastface.fit")  # the module: fastface.fit is the function
        reconstructor = None
        if settings.checkpoint:
            from fastface.reconstructor import Reconstructor
            reconstructor = Reconstructor(settings.checkpoint, device=settings.device)
            model, resolution, focal = reconstructor.model, tuple(reconstructor.resolution), float(reconstructor.focal)
            translation = np.asarray(reconstructor.translation, np.float32).reshape(1, 3)
            angles = np.zeros((1, 3), np.float32)
        else:
            model = fit_module.default_model(settings.device)
            side = settings.resolution or fit_module.DEFAULT_RESOLUTION
            resolution = (side, side)
            focal = fit_module.default_focal(resolution)
            angles, translation = fit_module.default_pose(1, resolution, focal, model=model)
        target = _framing_landmarks(model, angles, translation, focal, resolution)
        state = (model, resolution, focal, target, reconstructor)
        _CACHE[key] = state
    return state


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def _framing_landmarks(model, angles, translation, focal, resolution):
    """(68, 2) crop pixels of the mean face's landmarks at the starting pose: the crop's framing."""
    from fastface.ops.camera import euler_rotation, project_to_pixels, rigid_transform
    points = np.ascontiguousarray(_host(model.mean_shape)[_host(model.landmarks)][None], np.float32)
    rotation = euler_rotation(np.asarray(angles, np.float32))
    camera = rigid_transform(points, rotation, np.asarray(translation, np.float32))
    return project_to_pixels(camera, focal, resolution)[0].astype(np.float64)


# ---------------------------------------------------------------------------------------------
# BLAS threads

@functools.lru_cache(maxsize=None)
def _openblas_thread_functions():
    """[(get, set)] of the OpenBLAS libraries loaded in this process (Linux; [] elsewhere)."""
    import ctypes
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower() and "/" in line})
    except OSError:
        return []
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        names = (("openblas", ""), ("scipy_openblas", "64_"), ("openblas", "64_"), ("scipy_openblas", ""))
        for prefix, suffix in names:
            get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
            set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
            if get is not None and set_ is not None:
                found.append((get, set_))
                break
    return found


@contextlib.contextmanager
def _one_thread():
    """Runs the block with OpenBLAS and Numba on one thread each, then restores their counts.

    Speed: one photo's fit multiplies (1, 144) coefficients by the bases, too little work to
    share, and OpenBLAS's threads spin while they wait: on the busy 2-core machine two BLAS threads
    made each photo ~5x slower in CPU time (0.3 s against 1.4 s measured). Photos run in parallel
    over Dask workers instead.
    Identical results: some CPU kernels split their sums by thread, so a photo fitted with two
    Numba threads differed in the last bits (and, through Adam, in the written files) from one
    fitted with one. With one thread everywhere a photo gives the same files on any machine.
    """
    import numba
    functions = _openblas_thread_functions()
    before = [get() for get, _ in functions]
    numba_before = numba.get_num_threads()
    for _, set_ in functions:
        set_(1)
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(numba_before)
        for (_, set_), count in zip(functions, before):
            set_(count)


# ---------------------------------------------------------------------------------------------
# One photo

def output_paths(out, stem):
    return [pathlib.Path(out) / f"{stem}{suffix}" for suffix in OUTPUT_SUFFIXES]


def is_complete(out, stem):
    return all(p.is_file() for p in output_paths(out, stem))


def _valid_pixels(crop, photo_shape):
    """(H, W) float32: 1 where the crop pixel's centre falls inside the photo, else 0."""
    h, w = crop.size
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    p = crop.invert(np.stack([jj.ravel(), ii.ravel()], axis=1))
    H0, W0 = photo_shape[:2]
    inside = (p[:, 0] >= -0.5) & (p[:, 0] <= W0 - 0.5) & (p[:, 1] >= -0.5) & (p[:, 1] <= H0 - 0.5)
    return inside.reshape(h, w).astype(np.float32)


def _locate(image, landmarks_path, resolution, target):
    """(crop, Crop, crop landmarks or None, photo landmarks or None, "given" or "detected")."""
    from fastface import io
    if landmarks_path is not None:
        try:
            points = io.read_pts(landmarks_path)
        except (OSError, ValueError) as e:
            raise PhotoError(f"bad landmarks: {e}") from None
        crop_image, crop = io.crop_from_landmarks(image, points, resolution, target_landmarks=target)
        return crop_image, crop, crop.apply(points).astype(np.float32), points, "given"
    detect = getattr(io, "detect_faces", None)
    if detect is None:
        raise PhotoError("no landmarks given and this fastface has no face detector (fastface.io.detect_faces)")
    boxes = detect(image)
    if len(boxes) == 0:
        raise PhotoError("no face found (pass its landmarks with --landmarks)")
    crop_image, crop = io.crop_from_box(image, boxes[0], resolution, target_landmarks=target)
    return crop_image, crop, None, None, "detected"


def _fit_crop(settings, crop_image, crop_landmarks, valid):
    from fastface.fit import fit
    model, resolution, focal, _, reconstructor = _state(settings)
    init, offsets = None, {}
    images = crop_image[None]
    if reconstructor is not None:
        # The encoder's parameters start the fit; its corrective level (the final level's offsets
        # from the base model) is kept fixed, so the mesh is the final level refined by fitting.
        xp = np if settings.device == "cpu" else __import__("cupy")
        encoded = reconstructor(xp.asarray(images))
        init = encoded.params
        offsets = dict(geometry_offsets=encoded.vertices_final - encoded.vertices_base,
                       reflectance_offsets=encoded.albedo_final - encoded.albedo_base)
    return fit(images, None if crop_landmarks is None else crop_landmarks[None], model=model, init=init,
               device=settings.device, focal=focal, masks=valid[None], **offsets, **settings.fit_options())


def _params_json(result, model, crop, photo_path, photo_shape, source, photo_landmarks, settings):
    p = {k: _host(getattr(result.params, k))[0].astype(np.float64) for k in
         ("shape", "expression", "albedo", "sh", "angles", "translation")}
    names = model.expression_names or [f"expression_{k}" for k in range(model.n_expression)]
    losses = {k: float(v[-1, 0]) for k, v in result.losses.items() if len(v)}
    return {
        "photo": os.path.basename(photo_path),
        "photo_size": {"height": int(photo_shape[0]), "width": int(photo_shape[1])},
        "landmarks_source": source,
        "model": model.name,
        "mesh_space": "model space (mm, before the pose), x right, y up, z toward the viewer",
        "camera": {"focal_px": result.focal, "resolution": list(result.resolution),
                   "convention": "docs/conventions.md: OpenGL camera, principal point at the crop centre"},
        "crop": {"scale": crop.scale, "translation": list(crop.translation), "rotation": crop.rotation,
                 "size": list(crop.size), "maps": "photo pixels p -> crop pixels scale * R(rotation) p + translation"},
        "fit": {"iterations": settings.fit_options(), "checkpoint": settings.checkpoint, "final_losses": losses},
        "parameters": {
            "shape": p["shape"].tolist(),
            "expression": dict(zip(names, p["expression"].tolist())),
            "albedo": p["albedo"].tolist(),
            "sh": {"layout": "(9, 3): SH basis k (docs/conventions.md) times RGB", "coefficients": p["sh"].tolist()},
            "angles": dict(zip(("pitch", "yaw", "roll"), p["angles"].tolist())),
            "translation": dict(zip(("x", "y", "z"), p["translation"].tolist())),
        },
        "landmarks_photo": _host(photo_landmarks).astype(np.float64).tolist(),
    }


def _cpu_model(model):
    """The model on the CPU, copied once per process (the overlay renders there, at photo size)."""
    if model.device == "cpu":
        return model
    cached = _CACHE.get(("cpu copy", id(model)))
    if cached is None or cached[0] is not model:
        cached = (model, model.to("cpu"))
        _CACHE[("cpu copy", id(model))] = cached
    return cached[1]


def _overlay(image, result, model, crop, given_landmarks, photo_landmarks):
    """(H0, W0, 3) uint8 BGR: the face rendered in grey-skin under a fixed light, blended over the photo."""
    import cv2

    from fastface.__main__ import _directional_sh
    from fastface.render import FaceParameters, render_faces

    H0, W0 = image.shape[:2]
    h, w = result.resolution
    # Render the crop k times larger, about the photo's pixel density, then warp it into the photo.
    k = int(np.clip(np.ceil(1.0 / crop.scale), 1, max(1, _OVERLAY_MAX_RENDER // max(h, w))))
    params = result.params
    # _directional_sh divides the light by pi: 2.2 gives a cosine lobe of 0.7 over an ambient 0.35.
    light = np.asarray(_directional_sh((0.5, 0.6, 1.0), 2.2, 0.35, (1.0, 1.0, 1.0)), np.float32)[None]
    view = FaceParameters(shape=_host(params.shape), expression=_host(params.expression),
                          albedo=np.zeros_like(_host(params.albedo)), sh=light,
                          angles=_host(params.angles), translation=_host(params.translation))
    cpu_model = _cpu_model(model)
    # A uniform light grey albedo (the model's mean albedo replaced): only the shape shows. The
    # geometry is the result's (with a checkpoint's corrective offsets, the final level).
    base_vertices, base_albedo = cpu_model.evaluate(view.shape, view.expression, view.albedo)
    grey_albedo = (np.float32(0.75) - base_albedo).astype(np.float32)
    detail = np.ascontiguousarray(_host(result.vertices) - base_vertices, dtype=np.float32)
    rendering = render_faces(cpu_model, view, (k * h, k * w), k * result.focal, geometry_offsets=detail,
                             reflectance_offsets=grey_albedo)
    grey = rendering.image[0] * np.float32([0.95, 1.0, 1.08])  # a cool grey, apart from skin
    layer = np.concatenate([grey, rendering.mask[0][..., None].astype(np.float32)], axis=-1)
    # photo pixel p -> crop pixel q = M p -> enlarged crop pixel k (q + 0.5) - 0.5
    m = np.asarray(crop.matrix, np.float64) * k
    m[:, 2] += (k - 1) / 2.0
    warped = cv2.warpAffine(layer, m, (W0, H0), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0, 0))
    alpha = 0.7 * warped[..., 3:4]
    blended = (1 - alpha) * image + alpha * np.clip(warped[..., :3], 0, 1)
    bgr = np.ascontiguousarray((np.clip(blended, 0, 1)[..., ::-1] * 255 + 0.5).astype(np.uint8))
    eyes = float(np.linalg.norm(photo_landmarks[45] - photo_landmarks[36]))
    radius = max(1, int(round(eyes / 45)))  # points a fiftieth of the face wide, whatever the photo
    if given_landmarks is not None:  # the given points in red, under the model's
        for x, y in given_landmarks:
            cv2.circle(bgr, (int(round(x)), int(round(y))), radius + 1, (40, 40, 230), -1, cv2.LINE_AA)
    for x, y in photo_landmarks:
        cv2.circle(bgr, (int(round(x)), int(round(y))), radius, (60, 230, 60), -1, cv2.LINE_AA)
    return bgr


def reconstruct_photo(photo, landmarks_path, settings):
    """Reconstructs one photo and writes its five files; returns a dict (stem, status, message, seconds).

    status: "done", "skipped" (complete outputs already there) or "failed" (message says why).
    seconds: the process's CPU time for the photo. Never raises for a bad photo; a bug still raises.
    """
    with _one_thread():
        return _reconstruct_photo(photo, landmarks_path, settings)


def _reconstruct_photo(photo, landmarks_path, settings):
    import cv2

    from fastface import io
    from fastface._files import atomic_write

    photo = str(photo)
    stem = pathlib.Path(photo).stem
    out = pathlib.Path(settings.out)
    if is_complete(out, stem):
        return dict(stem=stem, photo=photo, status="skipped", message="", seconds=0.0)
    model, resolution, _, target, _ = _state(settings)  # built once per process, not timed per photo
    start = time.process_time()
    try:
        try:
            image = io.read_image(photo)
        except (OSError, ValueError) as e:
            raise PhotoError(str(e).replace(photo + ": ", "")) from None
        crop_image, crop, crop_landmarks, given, source = _locate(image, landmarks_path, resolution, target)
        result = _fit_crop(settings, crop_image, crop_landmarks, _valid_pixels(crop, image.shape))
    except PhotoError as e:
        return dict(stem=stem, photo=photo, status="failed", message=f"{photo}: {e}", seconds=0.0)
    photo_landmarks = crop.invert(_host(result.landmarks)[0].astype(np.float64))
    vertices = _host(result.vertices)[0]
    colors = np.clip(_host(result.albedo)[0], 0.0, 1.0)
    triangles = _host(model.triangles)
    paths = dict(zip(OUTPUT_SUFFIXES, output_paths(out, stem)))
    io.save_obj(paths[".obj"], vertices, triangles, colors)
    io.save_ply(paths[".ply"], vertices, triangles, colors)
    io.write_pts(paths["_landmarks.pts"], photo_landmarks.astype(np.float32))
    overlay = _overlay(image, result, model, crop, given, photo_landmarks)
    with atomic_write(paths["_overlay.png"]) as tmp:
        if not cv2.imwrite(tmp, overlay):
            raise OSError(f"OpenCV could not write {paths['_overlay.png']}")
    record = _params_json(result, model, crop, photo, image.shape, source, photo_landmarks, settings)
    with atomic_write(paths["_params.json"]) as tmp:  # last: its presence marks a complete photo
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1)
            f.write("\n")
    return dict(stem=stem, photo=photo, status="done", message="", seconds=time.process_time() - start)


# ---------------------------------------------------------------------------------------------
# Many photos

def find_photos(path):
    """The photos of a file or folder (sorted by name); raises FileNotFoundError / ValueError."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        return [path]
    photos = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in PHOTO_EXTENSIONS
                    and not p.name.startswith("."))
    if not photos:
        raise ValueError(f"{path}: no photos in this folder (looked for {', '.join(PHOTO_EXTENSIONS)})")
    stems = {}
    for p in photos:
        if p.stem in stems:
            raise ValueError(f"{p} and {stems[p.stem]} would write the same outputs ({p.stem}.obj, ...); "
                             "rename one")
        stems[p.stem] = p
    return photos


def landmarks_for(photos, landmarks):
    """One .pts path (or None) per photo: FILE for a single photo, FOLDER/STEM.pts for each."""
    if landmarks is None:
        return [None] * len(photos)
    landmarks = pathlib.Path(landmarks)
    if not landmarks.exists():
        raise FileNotFoundError(f"{landmarks}: no such landmark file or folder")
    if landmarks.is_file():
        if len(photos) != 1:
            raise ValueError(f"--landmarks {landmarks} is one file but there are {len(photos)} photos; "
                             "give a folder of STEM.pts files")
        return [landmarks]
    return [landmarks / f"{p.stem}.pts" for p in photos]


def _task(photo, landmarks_path, settings):
    """What a Dask worker runs for one photo (module-level, so that workers can import it)."""
    return reconstruct_photo(photo, landmarks_path, settings)


def reconstruct_paths(photos, landmarks, settings, client=None, progress=True, on_result=None):
    """Reconstructs the photos (in this process, or on a Dask `client`); returns the result dicts.

    on_result: optional callable(result dict) called as each photo finishes (tests use it).
    """
    from tqdm import tqdm

    results = []
    bar = tqdm(total=len(photos), unit="photo", disable=not progress or len(photos) < 2, file=sys.stderr,
               dynamic_ncols=True)

    def report(r):
        results.append(r)
        if r["status"] == "failed":
            bar.write(r["message"], file=sys.stderr)
        bar.update(1)
        if on_result is not None:
            on_result(r)

    try:
        if client is None:
            for photo, pts in zip(photos, landmarks):
                report(reconstruct_photo(photo, pts, settings))
        else:
            from distributed import as_completed
            # retries: a photo whose worker died is rescheduled by the scheduler anyway (that does
            # not count as a retry); these cover an error raised inside a task.
            futures = [client.submit(_task, str(photo), None if pts is None else str(pts), settings,
                                     key=f"fastface-reconstruct-{i}-{pathlib.Path(photo).stem}", retries=1, pure=False)
                       for i, (photo, pts) in enumerate(zip(photos, landmarks))]
            for future in as_completed(futures):
                report(future.result())
    finally:
        bar.close()
    return results


@contextlib.contextmanager
def _environment_kept():
    """Restores os.environ as it was when the block ends.

    Dask's nanny sets OMP_NUM_THREADS, MKL_NUM_THREADS and OPENBLAS_NUM_THREADS to 1 in this
    process's own os.environ (its pre-spawn environment, for the workers it starts) and leaves
    them there, so every process started afterwards (a training run, a test's subprocess) would
    run BLAS single-threaded and round differently from this one."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        if dict(os.environ) != saved:
            os.environ.clear()
            os.environ.update(saved)


def _client(args):
    """A Dask client for --workers / --scheduler, or None; exits with a clear line without dask."""
    if not args.workers and not args.scheduler:
        return None, None
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise SystemExit("fastface reconstruct: --workers and --scheduler need Dask's distributed scheduler; "
                         "install it with: pip install 'fastface[distributed]'") from None
    if args.scheduler:
        return Client(args.scheduler), None
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None)
    return Client(cluster), cluster


# ---------------------------------------------------------------------------------------------
# Command line

def add_parser(subparsers):
    p = subparsers.add_parser(
        "reconstruct", help="fit 3D faces to photos: meshes, parameters, overlays and landmarks",
        description=__doc__.split("\n\n")[0])
    p.add_argument("photos", metavar="PHOTO_OR_FOLDER", help="a photo, or a folder of photos")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (made if missing)")
    p.add_argument("--landmarks", metavar="FILE_OR_FOLDER",
                   help="iBUG .pts landmarks: a file for one photo, or a folder with STEM.pts per photo "
                        "(default: find the face with OpenCV's detector)")
    p.add_argument("--checkpoint", metavar="CKPT", help="a trained model (python -m fastface train): its "
                   "encoder gives the fit's starting point")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--resolution", type=int, default=None, help="fitting resolution in pixels "
                   "(default 128; with --checkpoint the encoder's)")
    p.add_argument("--iterations", type=int, default=None, help="photometric Adam steps (default 60)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--workers", type=int, metavar="N", help="spread the photos over a local Dask cluster "
                       "of N worker processes")
    group.add_argument("--scheduler", metavar="ADDRESS", help="spread the photos over a running Dask "
                       "scheduler's workers (tcp://host:8786)")
    p.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                   help="no progress bar (--no-progress, as for train and evaluate)")
    return p


def _error(message):
    print(f"fastface reconstruct: {message}", file=sys.stderr)


def run(args):
    """Runs the command; returns the exit status (0: every photo done or already complete,
    1: some photo failed, 2: nothing to do because of a usage error)."""
    if args.workers is not None and args.workers < 1:
        _error("--workers must be at least 1")
        return 2
    if args.resolution is not None and args.resolution < 32:
        _error("--resolution must be at least 32")
        return 2
    if args.iterations is not None and args.iterations < 0:
        _error("--iterations must be >= 0")
        return 2
    if args.device == "gpu":
        from fastface._backend import gpu_available
        if not gpu_available():
            _error("--device gpu needs cupy and a CUDA GPU (pip install 'fastface[gpu]'); none was found")
            return 2
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        _error(f"{args.checkpoint}: no such checkpoint file")
        return 2
    try:
        photos = find_photos(args.photos)
        landmarks = landmarks_for(photos, args.landmarks)
    except (OSError, ValueError) as e:
        _error(str(e))
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        _error(f"cannot make the output folder {args.out}: {e.strerror or e}")
        return 2
    settings = Settings(out=os.path.abspath(args.out), device=args.device,
                        checkpoint=os.path.abspath(args.checkpoint) if args.checkpoint else None,
                        resolution=args.resolution, iterations=args.iterations)
    try:
        _state(settings)  # here, so that a bad checkpoint is one line, not one per photo (cached for later)
    except (OSError, ValueError, KeyError, TypeError) as e:
        _error(f"cannot load {args.checkpoint}: {e}" if args.checkpoint else f"cannot build the face model: {e}")
        return 2
    start = time.perf_counter()
    with _environment_kept():
        client, cluster = _client(args)
        try:
            results = reconstruct_paths(photos, landmarks, settings, client=client, progress=not args.quiet)
        finally:
            if client is not None:
                client.close()
            if cluster is not None:
                cluster.close()
    elapsed = time.perf_counter() - start
    counts = {s: sum(r["status"] == s for r in results) for s in ("done", "skipped", "failed")}
    done_seconds = [r["seconds"] for r in results if r["status"] == "done"]
    per_photo = f", {np.mean(done_seconds):.2f} s of CPU per photo" if done_seconds and client is None else ""
    print(f"{counts['done']} reconstructed, {counts['skipped']} already complete, {counts['failed']} failed "
          f"in {elapsed:.1f} s{per_photo}; outputs in {settings.out}")
    return 1 if counts["failed"] else 0
