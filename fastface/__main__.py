"""Command line: `python -m fastface demo | train | evaluate | reconstruct`.

demo renders faces of the embedded default model to PNG; train and evaluate learn and measure the
multi-level face model (fastface/train.py, fastface/evaluate.py).
"""
import argparse
import pathlib
import sys
import time

import numpy as np

__all__ = ["main"]


def _directional_sh(direction, intensity, ambient, tint):
    """(9, 3) SH coefficients of an ambient term plus one distant light from `direction`.

    The irradiance of a distant light projects onto the SH basis as the basis evaluated at the
    light's direction (Ramamoorthi and Hanrahan 2001); the renderer applies the Â_l factors.
    """
    x, y, z = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    basis = np.array([0.282095, 0.488603 * y, 0.488603 * z, 0.488603 * x, 1.092548 * x * y,
                      1.092548 * y * z, 0.315392 * (3 * z * z - 1), 1.092548 * x * z,
                      0.546274 * (x * x - y * y)])
    sh = intensity * basis[:, None] * np.asarray(tint, dtype=np.float64)[None, :] / np.pi
    sh[0] += ambient / (np.pi * 0.282095)
    return sh


def _write_png(cv2, path, bgr):
    """Writes an image atomically (a failed write leaves an earlier file as it was); raises if cv2 cannot."""
    from fastface._files import atomic_write
    with atomic_write(path) as tmp:
        if not cv2.imwrite(tmp, bgr):
            raise OSError(f"OpenCV could not write the image {path}")


def _demo_parameters(model, n_faces, seed):
    """Varied identity, expression, pose and lighting, drawn from a seeded generator."""
    from fastface.render import FaceParameters
    rng = np.random.default_rng(seed)
    shape = rng.standard_normal((n_faces, model.n_shape)) * 0.9
    albedo = rng.standard_normal((n_faces, model.n_albedo)) * 0.9
    expression = np.zeros((n_faces, model.n_expression))
    names = list(getattr(model, "expression_names", []))
    for b in range(n_faces):
        if b > 0 and names:  # the first face keeps a neutral expression
            expression[b, rng.integers(len(names))] = rng.uniform(1.5, 2.5)
        expression[b] += rng.standard_normal(model.n_expression) * 0.15
    angles = np.stack([rng.uniform(-0.25, 0.25, n_faces),   # pitch
                       rng.uniform(-0.6, 0.6, n_faces),     # yaw
                       rng.uniform(-0.15, 0.15, n_faces)], axis=1)
    angles[0] = 0.0
    translation = np.tile([0.0, 0.0, -650.0], (n_faces, 1))
    sh = np.stack([
        _directional_sh(direction=(rng.uniform(-1, 1), rng.uniform(-0.2, 1), 1.0),
                        intensity=rng.uniform(0.5, 0.9), ambient=rng.uniform(0.35, 0.6),
                        tint=1 + rng.uniform(-0.12, 0.12, 3))
        for _ in range(n_faces)])
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    return FaceParameters(shape=f32(shape), expression=f32(expression), albedo=f32(albedo),
                          sh=f32(sh), angles=f32(angles), translation=f32(translation))


def demo(out_dir, n_faces=6, size=512, level="default", seed=0, supersample=2):
    """Renders `n_faces` faces to `out_dir`/face_<k>.png and a gallery; returns the paths."""
    import cv2

    from fastface.model import FaceModel
    from fastface.render import render_faces

    start = time.perf_counter()
    model = FaceModel.default(level=level)
    params = _demo_parameters(model, n_faces, seed)
    render_size = size * supersample
    focal = 2.9 * render_size  # a portrait lens: the face fills most of the frame at 65 cm
    rendering = render_faces(model, params, (render_size, render_size), focal)
    background = np.linspace(0.35, 0.15, render_size, dtype=np.float32)[None, :, None, None]
    images = np.where(rendering.mask[..., None], rendering.image, background)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, tiles = [], []
    for b in range(n_faces):
        rgb = cv2.resize(np.clip(images[b], 0, 1), (size, size), interpolation=cv2.INTER_AREA)
        bgr = (rgb[..., ::-1] * 255 + 0.5).astype(np.uint8)
        path = out_dir / f"face_{b}.png"
        _write_png(cv2, path, bgr)
        paths.append(path)
        tiles.append(bgr)
    columns = min(n_faces, 3)
    rows = [np.concatenate(tiles[r:r + columns] + [np.zeros_like(tiles[0])] * (columns - len(tiles[r:r + columns])), axis=1)
            for r in range(0, n_faces, columns)]
    gallery = out_dir / "gallery.png"
    _write_png(cv2, gallery, np.concatenate(rows, axis=0))
    elapsed = time.perf_counter() - start
    return paths + [gallery], elapsed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m fastface", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="render faces of the embedded default model to PNG files")
    demo_parser.add_argument("--out", default="fastface_demo", help="output folder (default: ./fastface_demo)")
    demo_parser.add_argument("--n", type=int, default=6, help="number of faces (default 6)")
    demo_parser.add_argument("--size", type=int, default=512, help="image size in pixels (default 512)")
    demo_parser.add_argument("--level", default="default", choices=("default", "small"), help="model level")
    demo_parser.add_argument("--seed", type=int, default=0)
    from fastface import evaluate as evaluate_command
    from fastface import reconstruct as reconstruct_command
    from fastface import train as train_command
    train_command.add_parser(commands)
    evaluate_command.add_parser(commands)
    reconstruct_command.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_command.run(args)
    if args.command == "evaluate":
        return evaluate_command.run(args)
    if args.command == "reconstruct":
        return reconstruct_command.run(args)
    if args.command == "demo":
        if args.n < 1 or args.size < 16:
            parser.error("--n must be >= 1 and --size >= 16")
        paths, elapsed = demo(args.out, n_faces=args.n, size=args.size, level=args.level, seed=args.seed)
        for path in paths:
            print(path)
        print(f"rendered {args.n} faces in {elapsed:.2f} s; pictures are in {pathlib.Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
