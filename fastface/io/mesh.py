"""Triangle meshes to and from files: Wavefront OBJ (with vertex colours) and PLY.

Vertex colours in OBJ are the common extension `v x y z r g b` (r, g, b in [0, 1]) that MeshLab,
Blender and trimesh read. PLY stores them as `uchar red green blue`. All writes are atomic
(fastface._files.atomic_write): a crash leaves the previous file or none, never half a mesh.
"""
import os

import numpy as np

from fastface._files import atomic_write

__all__ = ["save_obj", "save_ply", "load_obj"]


def _host(name, a):
    if type(a).__module__.startswith("cupy"):  # a file is written from host memory anyway
        a = a.get()
    if not isinstance(a, np.ndarray):
        a = np.asarray(a)
    return a


def _check_mesh(vertices, triangles, colors):
    v = _host("vertices", vertices)
    t = _host("triangles", triangles)
    if v.ndim != 2 or v.shape[1] != 3 or v.dtype.kind not in "fiu":
        raise ValueError(f"vertices must be a real (V, 3) array; got {v.dtype} {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError("vertices must be finite; got NaN or Inf")
    if t.ndim != 2 or t.shape[1] != 3 or t.dtype.kind not in "iu":
        raise ValueError(f"triangles must be an integer (T, 3) array; got {t.dtype} {t.shape}")
    if t.size and (t.min() < 0 or t.max() >= len(v)):
        raise ValueError(f"triangles must index vertices in [0, {len(v)}); got values in "
                         f"[{t.min()}, {t.max()}]")
    c = None
    if colors is not None:
        c = _host("colors", colors)
        if c.shape != v.shape or c.dtype.kind not in "fiu":
            raise ValueError(f"colors must be a real (V, 3) array like vertices {v.shape}; got {c.dtype} {c.shape}")
        if c.dtype == np.uint8:
            c = c.astype(np.float64) / 255
        if not np.all(np.isfinite(c)):
            raise ValueError("colors must be finite; got NaN or Inf")
        c = np.clip(c.astype(np.float64), 0, 1)
    return v, t.astype(np.int64), c


def _rows(line_format, table):
    """Formats every row of a 2D array with one %-format line, in one C-level call (np.savetxt
    formats row by row in Python: 4x slower on a 35,000-vertex face)."""
    if len(table) == 0:
        return ""
    values = table.ravel().tolist()  # Python ints for integer tables, floats for float tables
    return (line_format * len(table)) % tuple(values)


def save_obj(path, vertices, triangles, colors=None):
    """Writes a Wavefront OBJ file.

    Args:
        path: str or path-like.
        vertices: (V, 3) float array (numpy; cupy is copied to the host).
        triangles: (T, 3) integer array, 0-based (written 1-based).
        colors: None or (V, 3) float in [0, 1] (clipped) or uint8, written as `v x y z r g b`.
    """
    v, t, c = _check_mesh(vertices, triangles, colors)
    with atomic_write(path) as tmp:
        with open(tmp, "w", encoding="ascii", newline="\n") as f:
            f.write(f"# fastface mesh: {len(v)} vertices, {len(t)} triangles\n")
            if c is None:
                f.write(_rows("v %.6f %.6f %.6f\n", v.astype(np.float64)))
            else:
                f.write(_rows("v %.6f %.6f %.6f %.6f %.6f %.6f\n", np.hstack([v.astype(np.float64), c])))
            f.write(_rows("f %d %d %d\n", t + 1))


def save_ply(path, vertices, triangles, colors=None, binary=True):
    """Writes a PLY file: float x, y, z, optional uchar red, green, blue, and the triangles.

    Args:
        path: str or path-like.
        vertices: (V, 3) float array.
        triangles: (T, 3) integer array, 0-based.
        colors: None or (V, 3) float in [0, 1] (rounded to 0..255) or uint8.
        binary: True for `binary_little_endian 1.0`, False for `ascii 1.0`.
    """
    v, t, c = _check_mesh(vertices, triangles, colors)
    header = ["ply", "format binary_little_endian 1.0" if binary else "format ascii 1.0",
              "comment fastface mesh", f"element vertex {len(v)}",
              "property float x", "property float y", "property float z"]
    if c is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header += [f"element face {len(t)}", "property list uchar int vertex_indices", "end_header"]
    header = ("\n".join(header) + "\n").encode("ascii")
    c8 = None if c is None else np.round(c * 255).astype(np.uint8)
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(header)
            if binary:
                fields = [("xyz", "<f4", (3,))] + ([("rgb", "u1", (3,))] if c8 is not None else [])
                rows = np.empty(len(v), dtype=np.dtype(fields))
                rows["xyz"] = v
                if c8 is not None:
                    rows["rgb"] = c8
                f.write(rows.tobytes())
                faces = np.empty(len(t), dtype=np.dtype([("n", "u1"), ("idx", "<i4", (3,))]))
                faces["n"] = 3
                faces["idx"] = t
                f.write(faces.tobytes())
            else:
                v32 = v.astype(np.float32).astype(np.float64)  # the values a float property holds
                if c8 is None:
                    text = _rows("%.9g %.9g %.9g\n", v32)
                else:
                    text = _rows("%.9g %.9g %.9g %d %d %d\n", np.hstack([v32, c8.astype(np.float64)]))
                f.write(text.encode("ascii"))
                f.write(_rows("3 %d %d %d\n", t).encode("ascii"))


_IGNORED = ("#", "vt", "vn", "vp", "g", "o", "s", "usemtl", "mtllib", "l")


def _load_simple_obj(lines):
    """The common case in bulk (what save_obj writes: 'v' lines all of one length, 'f a b c' with
    positive indices): (vertices, triangles, colors) or None for the general, line-by-line path,
    which also names the line of any error."""
    v_lines, f_lines = [], []
    for line in lines:
        head = line[:2]
        if head == "v ":
            v_lines.append(line[2:])
        elif head == "f ":
            f_lines.append(line[2:])
        elif line.strip() and not line.lstrip().startswith(_IGNORED):
            return None
    if not v_lines or "/" in "".join(f_lines):
        return None
    lengths = {len(x.split()) for x in v_lines}
    face_lengths = {len(x.split()) for x in f_lines}
    if len(lengths) != 1 or lengths.pop() not in (3, 6) or face_lengths - {3}:
        return None
    try:
        values = np.array(" ".join(v_lines).split(), dtype=np.float64).reshape(len(v_lines), -1)
        idx = np.array(" ".join(f_lines).split(), dtype=np.int64).reshape(-1, 3)
    except ValueError:
        return None
    if not np.all(np.isfinite(values)) or (idx.size and (idx.min() < 1 or idx.max() > len(values))):
        return None
    colors = values[:, 3:6].astype(np.float32) if values.shape[1] == 6 else None
    return values[:, :3].astype(np.float32), (idx - 1).astype(np.int32), colors


def load_obj(path):
    """Reads the vertices, faces and vertex colours of a Wavefront OBJ file.

    `v x y z [r g b]` lines give the vertices (a 4th value alone, a homogeneous w, is ignored);
    `f` lines may use the `a`, `a/b`, `a//c` and `a/b/c` forms, 1-based or negative (relative)
    indices, and polygons of more than three vertices are split into a fan of triangles. Texture
    coordinates, normals, groups and materials are ignored.

    Returns:
        (vertices (V, 3) float32, triangles (T, 3) int32 0-based, colors (V, 3) float32 or None;
        colours only when every vertex has them).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: a malformed line (named with the file and line) or a file without vertices.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not an OBJ file")
    try:
        with open(path, encoding="utf-8", errors="strict") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected a Wavefront OBJ file)") from None
    fast = _load_simple_obj(lines)
    if fast is not None:
        return fast
    vertices, colors, faces = [], [], []
    n_coloured = 0
    for number, raw in enumerate(lines, start=1):
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        kind = fields[0]
        if kind == "v":
            try:
                values = [float(x) for x in fields[1:]]
            except ValueError:
                values = None
            if values is None or len(values) not in (3, 4, 6, 7):
                raise ValueError(f"{path}, line {number}: expected 'v x y z' or 'v x y z r g b'; "
                                 f"got {raw.strip()!r}")
            vertices.append(values[:3])
            if len(values) >= 6:
                colors.append(values[-3:])
                n_coloured += 1
            else:
                colors.append((0.0, 0.0, 0.0))
        elif kind == "f":
            if len(fields) < 4:
                raise ValueError(f"{path}, line {number}: a face needs at least 3 vertices; "
                                 f"got {raw.strip()!r}")
            polygon = []
            for token in fields[1:]:
                head = token.split("/", 1)[0]
                try:
                    index = int(head)
                except ValueError:
                    raise ValueError(f"{path}, line {number}: bad vertex reference {token!r}") from None
                resolved = index - 1 if index > 0 else len(vertices) + index
                if index == 0 or not 0 <= resolved < len(vertices):
                    raise ValueError(f"{path}, line {number}: vertex index {index} out of range "
                                     f"(there are {len(vertices)} vertices so far)")
                polygon.append(resolved)
            for k in range(1, len(polygon) - 1):
                faces.append((polygon[0], polygon[k], polygon[k + 1]))
    if not vertices:
        raise ValueError(f"{path}: no vertices ('v' lines): not a Wavefront OBJ mesh")
    v = np.asarray(vertices, dtype=np.float32)
    t = np.asarray(faces, dtype=np.int32).reshape(-1, 3)
    c = np.asarray(colors, dtype=np.float32) if n_coloured == len(vertices) else None
    return v, t, c
