"""iBUG `.pts` landmark files (300-W mark-up, 68 points).

The format:

    version: 1
    n_points: 68
    {
    x y
    ...
    }

Coordinates on disk are 1-based, as in 300-W (Matlab's convention): the centre of the top-left
pixel is (1, 1). In memory fastface uses 0-based pixel-centre coordinates, the centre of pixel
(row i, column j) at (x=j, y=i) (docs/conventions.md). `read_pts` subtracts 1, `write_pts` adds it.
"""
import os
import re

import numpy as np

from fastface._files import atomic_write

__all__ = ["read_pts", "write_pts", "N_LANDMARKS"]

N_LANDMARKS = 68
_HEADER = re.compile(r"^\s*(\w+)\s*:\s*(.*?)\s*$")


def read_pts(path, n_points=N_LANDMARKS):
    """Reads an iBUG `.pts` file.

    Args:
        path: str or path-like.
        n_points: the number of points the caller expects (68 for the iBUG mark-up); None takes
            whatever the file declares.

    Returns:
        (n_points, 2) float32, (x = column, y = row) in 0-based pixel-centre coordinates (the
        file's 1-based values minus 1).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a malformed file (missing header or braces, a line that is not two numbers,
            a count that differs from `n_points` or from the header), naming the file and line.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a .pts file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected an iBUG .pts file)") from None

    declared = None
    opened = None
    points = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}, line {number}"
        if opened is None:
            if line == "{":
                opened = number
                continue
            match = _HEADER.match(line)
            if match is None:
                raise ValueError(f"{where}: expected a header line ('version: 1', 'n_points: 68') or "
                                 f"'{{'; got {raw!r}")
            key, value = match.group(1).lower(), match.group(2)
            if key == "n_points":
                try:
                    declared = int(value)
                except ValueError:
                    raise ValueError(f"{where}: n_points must be an integer; got {value!r}") from None
            continue
        if line == "}":
            break
        fields = line.split()
        try:
            values = [float(v) for v in fields]
        except ValueError:
            values = None
        if values is None or len(values) != 2 or not all(np.isfinite(values)):
            raise ValueError(f"{where}: expected two numbers 'x y' or '}}'; got {raw!r}")
        points.append(values)
    else:
        if opened is None:
            raise ValueError(f"{path}: no '{{' line: not an iBUG .pts file (expected 'version: 1', "
                             f"'n_points: N', '{{', N lines 'x y', '}}')")
        raise ValueError(f"{path}, line {len(lines)}: the file ends without the closing '}}' "
                         f"(cut short?)")
    if declared is None:
        raise ValueError(f"{path}: no 'n_points:' line before the '{{' on line {opened}")
    if len(points) != declared:
        raise ValueError(f"{path}: the header declares n_points: {declared} but the file has "
                         f"{len(points)} points")
    if n_points is not None and len(points) != n_points:
        raise ValueError(f"{path}: expected {n_points} points; the file has {len(points)}")
    return np.asarray(points, dtype=np.float64).reshape(-1, 2).astype(np.float32) - np.float32(1)


def write_pts(path, points):
    """Writes an iBUG `.pts` file atomically (1-based on disk, 6 decimals).

    Args:
        path: str or path-like.
        points: (N, 2) array, 0-based pixel-centre coordinates (x = column, y = row), finite.
    """
    p = np.asarray(points)
    if p.ndim != 2 or p.shape[1] != 2 or p.dtype.kind not in "fiu":
        raise ValueError(f"points must be a real (N, 2) array; got {p.dtype} {p.shape}")
    p = p.astype(np.float64) + 1.0
    if not np.all(np.isfinite(p)):
        raise ValueError("points must be finite; got NaN or Inf")
    text = ["version: 1", f"n_points: {len(p)}", "{"]
    text += [f"{x:.6f} {y:.6f}" for x, y in p]
    text += ["}", ""]
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(text))
