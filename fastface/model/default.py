"""fastface's own face model, generated deterministically from analytic pieces.

No public morphable model may ship inside the library, so `FaceModel.default()` builds one:
a metric (millimetre) front face mask whose height field is a sum of smooth analytic pieces
(an ellipsoid-like base, Gaussian and smoothstep bumps and dents for the brow ridge, eye sockets,
eyeballs, nose, cheeks, lips, chin), with PCA-like identity, expression and albedo bases.

Model coordinates: x to the right as the viewer sees the face (the subject's left), y up,
z toward the viewer; the nose tip has the largest z; the vertex centroid is the origin. The mesh
is a regular grid in (x, y) over the face outline, split into triangles that are
counter-clockwise seen from +z, with the mouth as a slit (the vertices on the lip line are
doubled) so that the jaw can open it. The grid is symmetric about x = 0, so the mirror of every
vertex is another vertex exactly.

Only numpy and scipy run here, vectorised, in float64; the stored arrays are float32. The result
is the same in every process (a seeded generator, no randomness from the platform); across
machines the float32 arrays can differ only where libm or BLAS round a float64 differently in the
last bit and that flips a float32 rounding, which is rare.
"""
import functools

import numpy as np
from scipy.interpolate import PchipInterpolator

from fastface.model.landmarks import IBUG68_MIRROR

__all__ = ["generate", "LEVELS", "EXPRESSION_NAMES"]

# Grid spacing in millimetres per level: 0.78 mm gives about 35,000 vertices, 2.05 mm about 5,000.
LEVELS = {"default": 0.785, "small": 2.06}

# Face layout in millimetres (before the final recentring).
Y_TOP, Y_CHIN = 95.0, -92.0       # hairline (top of the mask) and menton (bottom of the chin)
Y_WIDEST, HALF_WIDTH = 10.0, 70.0  # the outline is widest (the cheekbones) at Y_WIDEST
Y_MOUTH = -42.0                    # the lip line (stomion), a row of the grid
MOUTH_CORNER = 24.0                # |x| of the mouth corners
EYE_X, EYE_Y = 32.0, 24.0          # eye centres (+-EYE_X, EYE_Y)
EYE_HALF_WIDTH = 14.0              # eye corners at EYE_X -+ EYE_HALF_WIDTH
NASION_Y, NOSE_TIP_Y, SUBNASALE_Y = 29.0, -8.0, -20.0

SEED = 20240531


# ----------------------------------------------------------------------------------------------
# Small analytic pieces
# ----------------------------------------------------------------------------------------------

def _smoothstep(edge0, edge1, x):
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(x, y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


def outline_half_width(y):
    """Half-width of the face outline at height y: a rounded dome above, an egg-shaped jaw below."""
    y = np.asarray(y, dtype=np.float64)
    up = np.clip((y - Y_WIDEST) / (Y_TOP - Y_WIDEST), 0.0, 1.0)
    down = np.clip((Y_WIDEST - y) / (Y_WIDEST - Y_CHIN), 0.0, 1.0)
    w_up = HALF_WIDTH * np.clip(1.0 - up ** 2.4, 0.0, None) ** (1.0 / 2.4)
    w_down = HALF_WIDTH * np.clip(1.0 - down ** 2.1, 0.0, None) ** (1.0 / 2.1)
    return np.where(y >= Y_WIDEST, w_up, w_down)


def outline_top(x):
    """Height of the outline's upper half at x (the inverse of outline_half_width above Y_WIDEST)."""
    t = np.clip(np.abs(x) / HALF_WIDTH, 0.0, 1.0)
    return Y_WIDEST + (Y_TOP - Y_WIDEST) * (1.0 - t ** 2.4) ** (1.0 / 2.4)


def outline_bottom(x):
    """Height of the outline's lower half at x."""
    t = np.clip(np.abs(x) / HALF_WIDTH, 0.0, 1.0)
    return Y_WIDEST - (Y_WIDEST - Y_CHIN) * (1.0 - t ** 2.1) ** (1.0 / 2.1)


def _eye_opening(ax, y):
    """Upper and lower lid heights over the eye at |x| = ax (NaN-free; outside the eye, the centre)."""
    u = np.clip((ax - EYE_X) / EYE_HALF_WIDTH, -1.0, 1.0)  # -1 at the inner corner, +1 outer
    tilt = 1.2 * u  # the outer corner sits a little higher (canthal tilt)
    arc = np.clip(1.0 - u * u, 0.0, None)
    upper = EYE_Y + tilt + 5.2 * arc ** 0.75 * (1.0 - 0.15 * u)  # peak slightly toward the nose
    lower = EYE_Y + tilt - 3.6 * arc ** 0.9
    return upper, lower


def _eye_inside(ax, y, soft=0.6):
    """Smooth indicator (0..1) of the palpebral fissure (the visible eyeball)."""
    upper, lower = _eye_opening(ax, y)
    u = (ax - EYE_X) / EYE_HALF_WIDTH
    inside_x = _smoothstep(1.0, 1.0 - soft / EYE_HALF_WIDTH * 2.0, np.abs(u))
    return inside_x * _smoothstep(-soft, soft, upper - y) * _smoothstep(-soft, soft, y - lower)


_MIDLINE = PchipInterpolator(  # the skull's midline profile z(y), without nose, lips and chin
    [-100.0, -92.0, -80.0, -60.0, -40.0, -20.0, 0.0, 20.0, 40.0, 60.0, 75.0, 90.0, 100.0],
    [-26.0, -16.0, -6.0, 0.0, 2.0, 2.0, 1.0, 0.0, 1.5, 0.0, -5.0, -13.0, -20.0],
)

_NOSE_HEIGHT = PchipInterpolator(  # height of the nose ridge above the face along y
    [-24.0, SUBNASALE_Y, -17.0, -13.0, NOSE_TIP_Y, 0.0, 10.0, 20.0, NASION_Y, 40.0],
    [0.0, 2.0, 10.0, 19.5, 22.5, 18.5, 12.5, 7.0, 2.5, 0.0],
)
_NOSE_WIDTH = PchipInterpolator(  # Gaussian width of the nose ridge along y
    [-24.0, -14.0, NOSE_TIP_Y, 0.0, 15.0, NASION_Y, 40.0],
    [9.0, 8.5, 7.5, 6.5, 5.5, 7.0, 9.0],
)


def height_parts(x, y):
    """The named analytic pieces whose sum is the mean face's z at (x, y), float64.

    Every piece is exactly symmetric (a function of |x|). The identity basis scales some of them
    (nose, lips, chin, cheeks, brow ridge) to vary a face's features.
    """
    ax = np.abs(x)
    zero = np.zeros_like(ax)
    p = {}
    # Ellipsoid-like base: the midline profile, curving back toward the outline.
    a = np.maximum(outline_half_width(y), 22.0) + 8.0
    side = 1.0 - np.sqrt(np.clip(1.0 - (ax / a) ** 2, 0.0, None))
    depth = 72.0 - 12.0 * _smoothstep(-20.0, -90.0, y)
    p["base"] = _MIDLINE(np.clip(y, -100.0, 100.0)) - depth * side
    # Forehead: frontal eminences and temples.
    p["forehead"] = zero.copy()
    p["forehead"] += 2.0 * _gauss(ax, y, 24.0, 66.0, 14.0, 12.0)
    p["forehead"] -= 4.0 * _gauss(ax, y, 62.0, 42.0, 9.0, 14.0)
    # Brow ridge along an arch above each eye, and the glabella between them.
    p["brow_ridge"] = zero.copy()
    brow_y = 40.0 + 3.5 * np.clip(1.0 - ((ax - 34.0) / 26.0) ** 2, 0.0, None)
    along = _smoothstep(62.0, 50.0, ax)
    p["brow_ridge"] += 4.5 * np.exp(-0.5 * ((y - brow_y) / 5.5) ** 2) * along
    p["brow_ridge"] += 2.5 * _gauss(ax, y, 0.0, 36.0, 9.0, 7.0)
    # Eye sockets, eyeballs, lids.
    p["eyes"] = zero.copy()
    p["eyes"] -= 11.5 * _gauss(ax, y, EYE_X, EYE_Y + 1.0, 14.5, 10.0)
    r2 = ((ax - EYE_X) / 11.0) ** 2 + ((y - EYE_Y) / 9.0) ** 2
    p["eyes"] += 6.0 * np.exp(-0.5 * r2 * 1.6)
    inside = _eye_inside(ax, y)
    p["eyes"] -= 1.1 * inside  # the lid margins stand proud of the eyeball
    upper, _ = _eye_opening(ax, y)
    crease = np.exp(-0.5 * ((y - upper - 4.0) / 1.3) ** 2) * _smoothstep(EYE_HALF_WIDTH + 2.0, EYE_HALF_WIDTH - 4.0,
                                                                          np.abs(ax - EYE_X))
    p["eyes"] -= 1.0 * crease
    # Cheeks and cheekbones.
    p["cheeks"] = zero.copy()
    p["cheeks"] += 5.5 * _gauss(ax, y, 42.0, -2.0, 15.0, 14.0)
    p["cheeks"] += 3.5 * _gauss(ax, y, 50.0, 12.0, 11.0, 7.0)
    # Nose: ridge, tip, alae, the grooves beside the alae.
    p["nose"] = zero.copy()
    yc = np.clip(y, -24.0, 40.0)
    nh = np.where((y > -24.0) & (y < 40.0), _NOSE_HEIGHT(yc), 0.0)
    nw = _NOSE_WIDTH(yc)
    p["nose"] += nh * np.exp(-0.5 * (ax / nw) ** 2.4)
    p["nose"] += 2.5 * _gauss(ax, y, 0.0, NOSE_TIP_Y + 1.0, 5.0, 4.5)
    p["nose"] += 7.5 * _gauss(ax, y, 12.5, -13.0, 5.0, 4.5)
    p["nose"] -= 1.5 * _gauss(ax, y, 17.0, -11.0, 1.8, 5.0)
    p["nose"] -= 3.0 * _gauss(ax, y, 6.0, -17.5, 2.5, 1.6)  # nostrils, seen from below the tip
    # Muzzle: the mouth region stands out of the face; the nasolabial folds bound it.
    p["muzzle"] = zero.copy()
    p["muzzle"] += 9.0 * _gauss(ax, y, 0.0, -40.0, 27.0, 20.0)
    t = np.clip((y + 12.0) / -34.0, 0.0, 1.0)  # along the fold from the ala to past the mouth corner
    fold_x = 17.0 + 13.0 * t
    fold = np.exp(-0.5 * ((ax - fold_x) / 3.0) ** 2) * _smoothstep(-8.0, -14.0, y) * _smoothstep(-52.0, -44.0, y)
    p["muzzle"] -= 1.6 * fold
    # Lips: upper and lower vermilion (thinner toward the corners), the lip line, the philtrum.
    p["lips"] = zero.copy()
    taper = np.sqrt(np.clip(1.0 - (ax / (MOUTH_CORNER + 1.0)) ** 2, 0.0, None))
    bow = 1.3 * np.exp(-0.5 * ((ax - 5.5) / 3.5) ** 2) - 0.6 * np.exp(-0.5 * (ax / 2.0) ** 2)
    upper_h = (7.5 + bow) * taper + 0.8
    lower_h = 10.5 * taper + 0.8
    up = np.clip((y - Y_MOUTH) / upper_h, 0.0, 1.0)
    lo = np.clip((Y_MOUTH - y) / lower_h, 0.0, 1.0)
    upper_profile = np.sin(np.pi * up ** 0.75) * (1.0 + 0.35 * up)  # fullest near the vermilion border
    lower_profile = np.sin(np.pi * lo ** 0.85)
    p["lips"] += 3.4 * taper ** 0.7 * upper_profile * (y >= Y_MOUTH)
    p["lips"] += 4.6 * taper ** 0.7 * lower_profile * (y < Y_MOUTH)
    p["lips"] -= 1.8 * np.exp(-0.5 * ((y - Y_MOUTH) / 1.0) ** 2) * _smoothstep(MOUTH_CORNER + 4.0, MOUTH_CORNER - 2.0, ax)
    p["lips"] -= 1.2 * _gauss(ax, y, MOUTH_CORNER + 1.5, Y_MOUTH, 2.5, 2.5)
    upper_top = Y_MOUTH + upper_h
    philtrum = _smoothstep(SUBNASALE_Y, SUBNASALE_Y - 3.0, y) * _smoothstep(upper_top - 1.0, upper_top + 3.0, y)
    p["lips"] += 0.9 * np.exp(-0.5 * ((ax - 5.0) / 1.6) ** 2) * philtrum
    # Chin and the groove above it.
    p["chin"] = zero.copy()
    p["chin"] -= 3.5 * _gauss(ax, y, 0.0, -58.0, 16.0, 4.0)
    p["chin"] += 8.0 * _gauss(ax, y, 0.0, -73.0, 15.0, 10.0)
    return p


def height(x, y):
    """z of the mean face surface at (x, y), float64; exactly symmetric: height(-x, y) == height(x, y)."""
    return sum(height_parts(x, y).values())


SKIN = np.array([0.80, 0.60, 0.50])
LIPS = np.array([0.72, 0.40, 0.40])
BROWS = np.array([0.30, 0.21, 0.16])
SCLERA = np.array([0.86, 0.83, 0.80])
IRIS = np.array([0.36, 0.25, 0.17])
PUPIL = np.array([0.04, 0.03, 0.03])


def _blend(base, colour, weight):
    return base + (colour - base) * weight[:, None]


def brow_mask(ax, y):
    """Smooth 0..1 mask of the eyebrows: a band over each eye, thick near the nose, thin outside."""
    u = np.clip((ax - 13.0) / 43.0, 0.0, 1.0)  # 0 at the inner end, 1 at the tail
    centre = 41.0 + 6.0 * np.sin(np.pi * np.clip(u * 1.15, 0.0, 1.0)) - 2.0 * u
    half = 4.2 - 2.4 * u
    along = _smoothstep(11.0, 15.0, ax) * _smoothstep(58.0, 53.0, ax)
    return _smoothstep(half + 1.0, half - 1.0, np.abs(y - centre)) * along


def lip_mask(ax, y):
    """Smooth 0..1 mask of the vermilion of both lips."""
    taper = np.sqrt(np.clip(1.0 - (ax / (MOUTH_CORNER + 1.0)) ** 2, 0.0, None))
    bow = 1.3 * np.exp(-0.5 * ((ax - 5.5) / 3.5) ** 2) - 0.6 * np.exp(-0.5 * (ax / 2.0) ** 2)
    top = Y_MOUTH + (7.5 + bow) * taper + 0.8
    bottom = Y_MOUTH - 10.5 * taper - 0.8
    return _smoothstep(top + 0.7, top - 0.7, y) * _smoothstep(bottom - 0.9, bottom + 0.9, y) * \
        _smoothstep(MOUTH_CORNER + 1.5, MOUTH_CORNER - 1.0, ax)


def mean_albedo(x, y):
    """Mean albedo (V, 3) in [0, 1]: skin, redder lips and cheeks, dark brows, eyes."""
    ax = np.abs(x)
    col = np.broadcast_to(SKIN, (x.size, 3)).copy()
    # Gentle regional variation: redder cheeks and nose, a paler forehead, a darker jaw line.
    col = _blend(col, np.array([0.82, 0.54, 0.47]), 0.45 * _gauss(ax, y, 40.0, 0.0, 14.0, 12.0))
    col = _blend(col, np.array([0.82, 0.56, 0.48]), 0.35 * _gauss(ax, y, 0.0, -8.0, 8.0, 10.0))
    col = _blend(col, np.array([0.70, 0.52, 0.44]), 0.35 * _smoothstep(-45.0, -85.0, y) * _smoothstep(0.0, 40.0, ax))
    col = _blend(col, np.array([0.68, 0.50, 0.44]), 0.4 * _gauss(ax, y, 34.0, 17.0, 10.0, 3.5))  # under the eyes
    col = _blend(col, LIPS, lip_mask(ax, y))
    col = _blend(col, np.array([0.25, 0.14, 0.12]), 0.9 * _gauss(ax, y, 6.0, -17.5, 2.6, 1.5))  # nostrils
    col = _blend(col, BROWS, 0.85 * brow_mask(ax, y))
    # Eyes: sclera, iris, pupil inside the opening, lash lines along the lids.
    inside = _eye_inside(ax, y, soft=0.35)
    r = np.hypot(ax - EYE_X, y - EYE_Y - 0.6)
    eye = _blend(np.broadcast_to(SCLERA, (x.size, 3)).copy(), IRIS, _smoothstep(5.9, 5.3, r))
    eye = _blend(eye, PUPIL, _smoothstep(2.4, 1.9, r))
    col = _blend(col, eye, inside)
    upper, lower = _eye_opening(ax, y)
    in_x = _smoothstep(EYE_HALF_WIDTH + 2.5, EYE_HALF_WIDTH - 1.0, np.abs(ax - EYE_X))
    col = _blend(col, np.array([0.12, 0.08, 0.07]), 0.85 * in_x * np.exp(-0.5 * ((y - upper - 0.3) / 0.55) ** 2))
    col = _blend(col, np.array([0.35, 0.25, 0.22]), 0.5 * in_x * np.exp(-0.5 * ((y - lower + 0.2) / 0.5) ** 2))
    return col


# ----------------------------------------------------------------------------------------------
# The mesh
# ----------------------------------------------------------------------------------------------

def _grid_mesh(h):
    """Vertices (x, y) on a symmetric grid over the outline, triangles CCW from +z, mouth slit.

    Returns xy (V, 2) float64, triangles (T, 3) int64, symmetry (V,) int64, lower_lip (V,) bool
    (True for the doubled lip-line vertices that belong to the lower lip).
    """
    r_min = int(np.ceil((Y_CHIN - Y_MOUTH) / h))
    r_max = int(np.floor((Y_TOP - Y_MOUTH) / h))
    rows = np.arange(r_min, r_max + 1)
    y_rows = Y_MOUTH + rows * h
    w_rows = outline_half_width(y_rows)
    n_rows = np.floor(w_rows / h + 1e-9).astype(np.int64)
    n_max = int(n_rows.max())
    cols = np.arange(-n_max, n_max + 1)
    present = np.abs(cols)[None, :] <= n_rows[:, None]
    idx = np.full(present.shape, -1, dtype=np.int64)
    idx[present] = np.arange(int(present.sum()))
    rr, cc = np.nonzero(present)
    x = cols[cc] * h
    y = y_rows[rr]
    # Boundary vertices move onto the outline: row ends along x where the outline is steep,
    # column ends along y where it is flat. A vertex moves less than one grid step and keeps
    # its order within its row and its column, so no triangle flips (the tests check it).
    steep = np.abs(x) >= 0.75 * HALF_WIDTH
    row_end = (np.abs(cols[cc]) == n_rows[rr]) & (n_rows[rr] > 0)
    above = np.zeros_like(present)
    above[:-1] = present[1:]
    below = np.zeros_like(present)
    below[1:] = present[:-1]
    col_top = ~above[rr, cc] & (y > Y_WIDEST) & ~steep
    col_bottom = ~below[rr, cc] & (y < Y_WIDEST) & ~steep
    x_move = row_end & ~col_top & ~col_bottom
    x_moved = np.where(x_move, np.sign(cols[cc]) * w_rows[rr], x)
    y = np.where(col_top, outline_top(x), np.where(col_bottom, outline_bottom(x), y))
    x = x_moved
    n_grid = x.size
    symmetry = idx[rr, (2 * n_max - cc)]
    # The mouth slit: lip-line vertices strictly between the corners get a lower-lip twin.
    r0 = int(np.nonzero(rows == 0)[0][0])
    corner = int(np.floor(MOUTH_CORNER / h + 1e-9))
    slit_cols = np.nonzero((np.abs(cols) < corner) & present[r0])[0]
    twin = np.full(n_grid, -1, dtype=np.int64)
    twin_ids = n_grid + np.arange(slit_cols.size)
    twin[idx[r0, slit_cols]] = twin_ids
    x = np.concatenate([x, x[idx[r0, slit_cols]]])
    y = np.concatenate([y, y[idx[r0, slit_cols]]])
    symmetry = np.concatenate([symmetry, twin[symmetry[idx[r0, slit_cols]]]])
    lower_lip = np.zeros(x.size, dtype=bool)
    lower_lip[n_grid:] = True

    # Cells: corners a (bottom left), b (bottom right), c (top right), d (top left).
    a = idx[:-1, :-1]
    b = idx[:-1, 1:]
    c = idx[1:, 1:].copy()
    d = idx[1:, :-1].copy()
    below_slit = (rows[1:] == 0)[:, None]  # cells whose top row is the lip line use the twins
    for corner_ids in (c, d):
        has_twin = below_slit & (corner_ids >= 0)
        twins = np.where(has_twin, twin[np.maximum(corner_ids, 0)], -1)
        corner_ids[has_twin & (twins >= 0)] = twins[has_twin & (twins >= 0)]
    right = (cols[:-1] >= 0)[None, :].repeat(a.shape[0], axis=0)  # mirrored diagonals left of x=0
    pa, pb, pc, pd = a >= 0, b >= 0, c >= 0, d >= 0
    full = pa & pb & pc & pd
    tris = []

    def add(mask, *corners):
        tris.append(np.stack([k[mask] for k in corners], axis=1))

    add(full & right, a, b, c)
    add(full & right, a, c, d)
    add(full & ~right, a, b, d)
    add(full & ~right, b, c, d)
    three = (pa.astype(int) + pb + pc + pd) == 3
    add(three & ~pa, b, c, d)
    add(three & ~pb, a, c, d)
    add(three & ~pc, a, b, d)
    add(three & ~pd, a, b, c)
    triangles = np.concatenate(tris, axis=0)
    # Drop vertices that no triangle uses (single-vertex rows at the very top or bottom).
    used = np.zeros(x.size, dtype=bool)
    used[triangles.ravel()] = True
    remap = np.cumsum(used) - 1
    triangles = remap[triangles]
    symmetry = remap[symmetry[used]]
    xy = np.stack([x[used], y[used]], axis=1)
    return xy, triangles, symmetry, lower_lip[used]


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------

# ----------------------------------------------------------------------------------------------
# Landmarks (iBUG 68)
# ----------------------------------------------------------------------------------------------

def _landmark_targets():
    """Designed (x, y) of the 68 iBUG points on the subject's right (image left, x <= 0) half.

    Returns a dict index -> (x, y, where) with where in {"any", "upper", "lower"} (which side of
    the mouth slit a point on the lip line belongs to). The other half mirrors these.
    """
    t = {}
    # Jaw 0..8: along the outline from the level below the eye down to the chin, 3 mm inside.
    ys = np.linspace(18.0, Y_CHIN, 4001)
    px, py = -outline_half_width(ys), ys
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(px), np.diff(py)))])
    for k in range(9):
        i = int(np.searchsorted(arc, arc[-1] * k / 8.0).clip(0, ys.size - 1))
        cx, cy = px[i], py[i]
        nx, ny = cx - 0.0, cy - (-15.0)
        n = np.hypot(nx, ny)
        t[k] = (cx - 3.0 * nx / n, cy - 3.0 * ny / n, "any")
    # Brows 17..21, outer to inner, along the middle of the brow.
    for k, u in zip(range(17, 22), (0.95, 0.72, 0.5, 0.28, 0.05)):
        ax = 13.0 + 43.0 * u
        centre = 41.0 + 6.0 * np.sin(np.pi * min(u * 1.15, 1.0)) - 2.0 * u
        t[k] = (-ax, centre + 1.0, "any")
    # Nose bridge 27..30 (30, the tip, is chosen by its height below), nose base 31..33.
    for k, y in zip(range(27, 30), (NASION_Y - 3.0, 15.0, 3.0)):
        t[k] = (0.0, y, "any")
    t[30] = (0.0, NOSE_TIP_Y, "any")
    t[31], t[32], t[33] = (-10.0, -16.5, "any"), (-5.0, -18.5, "any"), (0.0, SUBNASALE_Y + 0.5, "any")
    # Right eye (image left) 36..41: outer corner, upper lid, inner corner, lower lid.
    for k, u, lid in ((36, 0.97, "corner"), (37, 0.35, "upper"), (38, -0.35, "upper"), (39, -0.97, "corner"),
                      (40, -0.35, "lower"), (41, 0.35, "lower")):
        ax = EYE_X + u * EYE_HALF_WIDTH
        upper, lower = _eye_opening(np.array([ax]), None)
        y = {"corner": 0.5 * (upper[0] + lower[0]), "upper": upper[0] - 0.3, "lower": lower[0] + 0.3}[lid]
        t[k] = (-ax, y, "any")
    # Outer lip 48..51 and 57..59, inner lip 60..62 and 66..67.
    def lip_top(ax):
        taper = np.sqrt(max(1.0 - (ax / (MOUTH_CORNER + 1.0)) ** 2, 0.0))
        bow = 1.3 * np.exp(-0.5 * ((ax - 5.5) / 3.5) ** 2) - 0.6 * np.exp(-0.5 * (ax / 2.0) ** 2)
        return Y_MOUTH + (7.5 + bow) * taper + 0.3, Y_MOUTH - 10.5 * taper - 0.3
    t[48] = (-MOUTH_CORNER - 0.5, Y_MOUTH, "upper")
    t[49] = (-15.0, lip_top(15.0)[0], "any")
    t[50] = (-5.5, lip_top(5.5)[0], "any")
    t[51] = (0.0, lip_top(0.0)[0], "any")
    t[57] = (0.0, lip_top(0.0)[1], "any")
    t[58] = (-6.5, lip_top(6.5)[1], "any")
    t[59] = (-15.5, lip_top(15.5)[1], "any")
    t[60] = (-MOUTH_CORNER + 3.5, Y_MOUTH, "upper")
    t[61] = (-8.0, Y_MOUTH, "upper")
    t[62] = (0.0, Y_MOUTH, "upper")
    t[66] = (0.0, Y_MOUTH, "lower")
    t[67] = (-8.0, Y_MOUTH, "lower")
    return t


def _landmarks(pos, symmetry, lower_lip):
    """Vertex indices (68,) of the iBUG points: the vertex nearest each designed point on the image's
    left half (on the right side of the mouth slit), mirrored through `symmetry` for the other half."""
    xy = pos[:, :2]
    lm = np.full(68, -1, dtype=np.int64)
    midline = pos[:, 0] == 0.0
    for k, (x, y, where) in _landmark_targets().items():
        ok = lower_lip.copy() if where == "lower" else ~lower_lip
        if x == 0.0:
            ok &= midline
        else:
            ok &= pos[:, 0] < 0.0
        d = np.where(ok, np.hypot(xy[:, 0] - x, xy[:, 1] - y), np.inf)
        lm[k] = int(np.argmin(d))
    # The nose tip is the highest vertex on the midline near the designed tip.
    near_tip = midline & (np.abs(pos[:, 1] - NOSE_TIP_Y) < 8.0)
    lm[30] = int(np.flatnonzero(near_tip)[np.argmax(pos[near_tip, 2])])
    for k in range(68):
        if lm[k] < 0:
            lm[k] = symmetry[lm[IBUG68_MIRROR[k]]]
    return lm


# ----------------------------------------------------------------------------------------------
# Bases
# ----------------------------------------------------------------------------------------------

def _orthonormalize(design):
    """Orthonormal rows spanning the rows of `design` (K, N), in order, like QR (CholeskyQR2).

    Row k of the result is row k of the design made orthogonal to the rows before it and scaled
    to unit norm, with a positive projection on the design row (so "jaw_open" stays an opening).
    Two passes of Cholesky QR cost two (K, N) x (N, K) products, much less than Householder QR
    on (N, K), and are orthonormal to rounding for the well-conditioned designs built here.
    """
    # Unit rows first: the result does not change (R absorbs the scaling), but the condition
    # number drops to that of the directions alone, so one pass is nearly always enough.
    q = design / np.linalg.norm(design, axis=1, keepdims=True)
    for _ in range(2):
        lower = np.linalg.cholesky(q @ q.T)  # gram = L L^T, positive diagonal
        q = np.linalg.inv(lower) @ q  # an 80 x 80 inverse and a product beat a triangular solve here
        # One pass leaves an orthogonality error near eps * cond(L)^2; a second pass only when
        # that is not negligible.
        if np.linalg.cond(lower) < 1e3:
            break
    return q


def _cosine_modes(x, y, n):
    """(V, n*n) smooth fields cos(p pi u) cos(q pi v) over the face's bounding box."""
    u = (x + HALF_WIDTH) / (2.0 * HALF_WIDTH)
    v = (y - Y_CHIN) / (Y_TOP - Y_CHIN)
    cu = np.cos(np.pi * np.arange(n)[None, :] * u[:, None])
    cv = np.cos(np.pi * np.arange(n)[None, :] * v[:, None])
    return (cu[:, :, None] * cv[:, None, :]).reshape(len(x), n * n)


def _random_smooth_fields(rng, modes, n_modes, count, k0, xyz_scale, mirror_sign):
    """`count` smooth random fields (count, V, 3), finer detail as k grows.

    Row i of `xyz_scale` (3, 3) is the direction (or colour) along which random field i moves.
    Faces are mostly symmetric, so three fields in four are made mirror-symmetric, in coefficient
    space: the mirror x -> -x maps mode (p, q) to (-1)^p times itself, so a channel whose mirror
    image has sign `mirror_sign[c]` (-1 for a displacement's x, +1 otherwise) keeps only the modes
    with (-1)^p equal to that sign.
    """
    p, q = np.meshgrid(np.arange(n_modes), np.arange(n_modes), indexing="ij")
    p, freq2 = p.ravel(), (p * p + q * q).ravel()
    s = 1.0 + 3.0 * (k0 + np.arange(count)) / 80.0
    spectrum = np.exp(-0.5 * freq2[:, None] / s[None, :] ** 2)  # (modes, count)
    spectrum[0] = 0.0  # no constant field: a translation or a uniform tint is a designed component
    coef = rng.standard_normal((n_modes * n_modes, count, 3)) * spectrum[:, :, None]
    coef = coef @ xyz_scale
    parity = np.where(p % 2 == 0, 1.0, -1.0)[:, None, None]
    symmetric = (np.arange(count) % 4 != 3)[None, :, None]
    coef = np.where(symmetric & (parity != np.asarray(mirror_sign)[None, None, :]), 0.0, coef)
    fields = coef.reshape(n_modes * n_modes, count * 3).T @ modes.T  # (count * 3, V)
    return fields.reshape(count, 3, -1).transpose(0, 2, 1)


IDENTITY_NAMES = [
    "face_width", "face_length", "face_depth", "jaw_width", "forehead_width", "face_taper",
    "nose_projection", "nose_length", "nose_width", "eye_spacing", "eye_size", "brow_height",
    "brow_ridge", "cheek_fullness", "lip_fullness", "mouth_width", "mouth_height", "chin_projection",
    "chin_length", "forehead_slope",
]


def _identity_design(pos, parts):
    x, y, z = pos[:, 0], pos[:, 1], pos[:, 2]
    ax, sx = np.abs(x), np.sign(x)
    zero = np.zeros_like(x)
    zc = z - z.mean()

    def vec(dx=zero, dy=zero, dz=zero):
        return np.stack([dx + zero, dy + zero, dz + zero], axis=1)

    nose = _gauss(ax, y, 0.0, 5.0, 16.0, 24.0)
    eye = _gauss(ax, y, EYE_X, EYE_Y, 13.0, 9.0)
    brow = _gauss(ax, y, 34.0, 42.0, 22.0, 7.0)
    mouth = _gauss(ax, y, 0.0, Y_MOUTH, 26.0, 10.0)
    chin = _gauss(ax, y, 0.0, -75.0, 22.0, 14.0)
    # Each is one standard deviation in millimetres: a plausible difference between two people.
    d = {
        "face_width": vec(dx=0.04 * x),
        "face_length": vec(dy=0.04 * y),
        "face_depth": vec(dz=0.06 * zc),
        "jaw_width": vec(dx=0.06 * x * _smoothstep(-10.0, -60.0, y)),
        "forehead_width": vec(dx=0.04 * x * _smoothstep(30.0, 70.0, y)),
        "face_taper": vec(dx=0.04 * x * y / 100.0),
        "nose_projection": vec(dz=0.15 * parts["nose"]),
        "nose_length": vec(dy=-0.05 * nose * np.clip(NASION_Y - y, 0.0, 60.0)),
        "nose_width": vec(dx=0.1 * x * _gauss(ax, y, 0.0, -12.0, 18.0, 9.0)),
        "eye_spacing": vec(dx=1.5 * sx * eye),
        "eye_size": vec(dx=0.08 * (ax - EYE_X) * sx * eye, dy=0.08 * (y - EYE_Y) * eye),
        "brow_height": vec(dy=2.0 * brow),
        "brow_ridge": vec(dz=0.3 * parts["brow_ridge"]),
        "cheek_fullness": vec(dz=0.3 * parts["cheeks"]),
        "lip_fullness": vec(dz=0.2 * parts["lips"]),
        "mouth_width": vec(dx=0.06 * x * mouth),
        "mouth_height": vec(dy=2.0 * _gauss(ax, y, 0.0, Y_MOUTH, 30.0, 18.0)),
        "chin_projection": vec(dz=0.25 * parts["chin"] + 1.5 * chin),
        "chin_length": vec(dy=0.08 * np.clip(-50.0 - y, 0.0, None) * _smoothstep(45.0, 15.0, ax)),
        "forehead_slope": vec(dz=-0.3 * np.clip(y - 40.0, 0.0, None) ** 2 / 200.0),
    }
    return [d[name] for name in IDENTITY_NAMES]


EXPRESSION_NAMES = [
    "jaw_open", "smile", "lip_pucker", "brows_up", "brows_down", "eyes_closed", "mouth_stretch",
    "mouth_frown", "jaw_sideways", "cheek_puff", "nose_wrinkle", "upper_lip_raise",
    "lower_lip_depress", "smile_asymmetric", "brows_up_asymmetric", "eyes_closed_asymmetric",
    "jaw_forward", "mouth_sideways", "lips_press", "squint", "chin_raise", "nostril_flare",
]
N_EXPRESSION = 64
EXPRESSION_NAMES = EXPRESSION_NAMES + [f"local_{k:02d}" for k in range(N_EXPRESSION - len(EXPRESSION_NAMES))]


def _jaw_weight(x, y, lower_lip):
    """How much of the jaw's motion a vertex follows: 1 on the chin and the lower lip, 0 above the
    lip line, smooth everywhere except across the mouth slit (where the twins split)."""
    t = y - Y_MOUTH
    below = (t < 0.0) | lower_lip
    smooth = _smoothstep(12.0, -18.0, t)
    slit = 0.5 * _smoothstep(MOUTH_CORNER, MOUTH_CORNER - 6.0, np.abs(x)) * np.exp(-0.5 * (t / 5.0) ** 2)
    return np.clip(smooth + np.where(below, slit, -slit), 0.0, 1.0)


def _eye_close_field(ax, y, amount):
    """dy that brings the upper lid down onto the lower lid (amount = 1: closed)."""
    upper, lower = _eye_opening(ax, y)
    in_x = _smoothstep(EYE_HALF_WIDTH + 3.0, EYE_HALF_WIDTH - 1.0, np.abs(ax - EYE_X))
    opening = np.clip(y - lower, 0.0, None)
    gap = upper - lower
    dy = -np.where(y <= upper, opening, gap * np.exp(-0.5 * ((y - upper) / 5.0) ** 2))
    return amount * dy * in_x * (y > lower - 0.5)


def _expression_design(pos, normals, lower_lip, rng):
    x, y, z = pos[:, 0], pos[:, 1], pos[:, 2]
    ax, sx = np.abs(x), np.sign(x)
    zero = np.zeros_like(x)
    left, right = (x > 0).astype(float), (x < 0).astype(float)  # the subject's left is +x

    def vec(dx=zero, dy=zero, dz=zero):
        return np.stack([dx + zero, dy + zero, dz + zero], axis=1)

    jaw = _jaw_weight(x, y, lower_lip)
    pivot_y, pivot_z, angle = 5.0, -75.0, 0.12  # a hinge near the ears; ~7 degrees per unit
    jaw_open = vec(dy=-angle * (z - pivot_z) * jaw, dz=angle * (y - pivot_y) * jaw)
    corner = _gauss(ax, y, MOUTH_CORNER, Y_MOUTH, 9.0, 8.0)
    cheek = _gauss(ax, y, 38.0, -12.0, 12.0, 11.0)
    smile_one = vec(dx=3.0 * sx * corner, dy=4.0 * corner + 2.0 * cheek, dz=-2.0 * corner + 1.5 * cheek)
    lips = _gauss(ax, y, 0.0, Y_MOUTH, 20.0, 11.0)
    brow_band = _smoothstep(28.0, 36.0, y) * np.exp(-0.5 * (np.clip(y - 45.0, 0.0, None) / 25.0) ** 2)
    inner_brow = _gauss(ax, y, 18.0, 40.0, 10.0, 8.0)
    eye_l = _eye_close_field(ax, y, 0.95)
    upper_lip = _gauss(ax, y, 0.0, Y_MOUTH + 8.0, 18.0, 7.0) * ~lower_lip * (y >= Y_MOUTH)
    lower_lip_w = _gauss(ax, y, 0.0, Y_MOUTH - 6.0, 18.0, 7.0) * ((y < Y_MOUTH) | lower_lip)
    lower_lid = _gauss(ax, y, EYE_X, EYE_Y - 4.0, 10.0, 3.5)
    chin = _gauss(ax, y, 0.0, -70.0, 18.0, 14.0)
    d = {
        "jaw_open": jaw_open,
        "smile": smile_one,
        "lip_pucker": vec(dx=-0.25 * x * lips, dz=6.0 * lips),
        "brows_up": vec(dy=5.0 * brow_band, dz=0.5 * brow_band),
        "brows_down": vec(dx=-2.0 * sx * inner_brow, dy=-4.0 * inner_brow, dz=1.0 * inner_brow),
        "eyes_closed": vec(dy=eye_l),
        "mouth_stretch": vec(dx=4.0 * sx * corner, dy=-1.0 * corner),
        "mouth_frown": vec(dy=-4.0 * corner, dz=-0.5 * corner),
        "jaw_sideways": vec(dx=5.0 * jaw),
        "cheek_puff": (4.0 * _gauss(ax, y, 36.0, -32.0, 13.0, 13.0))[:, None] * normals,
        "nose_wrinkle": vec(dy=3.0 * _gauss(ax, y, 9.0, 5.0, 6.0, 8.0), dz=-0.5 * _gauss(ax, y, 0.0, 20.0, 8.0, 6.0)),
        "upper_lip_raise": vec(dy=3.0 * upper_lip, dz=0.5 * upper_lip),
        "lower_lip_depress": vec(dy=-3.0 * lower_lip_w, dz=0.5 * lower_lip_w),
        # Asymmetric versions: the subject's left side (+x) does it, the right side the opposite,
        # so that they are orthogonal to the symmetric ones (as in a PCA of real expressions).
        "smile_asymmetric": smile_one * (left - right)[:, None],
        "brows_up_asymmetric": vec(dy=5.0 * brow_band * np.tanh(x / 10.0)),
        "eyes_closed_asymmetric": vec(dy=eye_l * (left - right)),
        "jaw_forward": vec(dz=4.0 * jaw),
        "mouth_sideways": vec(dx=4.0 * lips),
        "lips_press": vec(dy=-1.5 * upper_lip + 1.5 * lower_lip_w, dz=-2.0 * (upper_lip + lower_lip_w)),
        "squint": vec(dy=2.5 * lower_lid + 1.0 * cheek),
        "chin_raise": vec(dy=3.0 * chin + 1.5 * lower_lip_w, dz=1.0 * lower_lip_w),
        "nostril_flare": vec(dx=2.0 * sx * _gauss(ax, y, 12.5, -13.0, 5.0, 5.0)),
    }
    fields = [d[name] for name in EXPRESSION_NAMES if name in d]
    # The rest: smooth localized deformations around the mouth, the eyes and brows, the cheeks.
    regions = [((0.0, Y_MOUTH), (18.0, 10.0)), ((EYE_X, EYE_Y + 8.0), (14.0, 12.0)), ((35.0, -20.0), (15.0, 20.0))]
    for k in range(N_EXPRESSION - len(fields)):
        (cx, cy), (rx, ry) = regions[rng.choice(3, p=[0.5, 0.3, 0.2])]
        cx = cx * rng.choice([-1.0, 1.0]) + rng.normal(0.0, rx)
        cy = cy + rng.normal(0.0, ry)
        sigma = rng.uniform(6.0, 14.0)
        w = _gauss(x, y, cx, cy, sigma, sigma)
        direction = rng.standard_normal(3)
        fields.append(w[:, None] * direction[None, :] * (3.0 * 0.97 ** k))
    return fields


ALBEDO_NAMES = [
    "skin_brightness", "skin_redness", "skin_yellowness", "lip_colour", "lip_darkness",
    "brow_darkness", "cheek_blush", "under_eye_darkness", "beard_shadow", "nose_redness",
    "forehead_tone", "jaw_tone",
]


def _albedo_design(pos, albedo):
    x, y = pos[:, 0], pos[:, 1]
    ax = np.abs(x)
    skin = 1.0 - _eye_inside(ax, y)
    lips = lip_mask(ax, y)
    brows = brow_mask(ax, y)

    def rgb(weight, colour):
        return weight[:, None] * np.asarray(colour)[None, :]

    # Each is one standard deviation of linear RGB: a plausible difference between two people.
    d = {
        "skin_brightness": 0.15 * albedo * skin[:, None],
        "skin_redness": rgb(skin, (0.035, -0.01, -0.015)),
        "skin_yellowness": rgb(skin, (0.015, 0.015, -0.035)),
        "lip_colour": rgb(lips, (0.05, -0.03, -0.015)),
        "lip_darkness": rgb(lips, (-0.06, -0.045, -0.045)),
        "brow_darkness": rgb(brows, (-0.08, -0.06, -0.05)),
        "cheek_blush": rgb(_gauss(ax, y, 40.0, -5.0, 14.0, 12.0), (0.05, -0.02, -0.02)),
        "under_eye_darkness": rgb(_gauss(ax, y, 34.0, 16.0, 11.0, 4.0), (-0.04, -0.04, -0.03)),
        "beard_shadow": rgb(_smoothstep(-25.0, -50.0, y) * (1.0 - lips), (-0.05, -0.045, -0.03)),
        "nose_redness": rgb(_gauss(ax, y, 0.0, -8.0, 10.0, 12.0), (0.04, -0.015, -0.015)),
        "forehead_tone": rgb(_smoothstep(40.0, 70.0, y), (0.025, 0.025, 0.02)),
        "jaw_tone": rgb(_smoothstep(-20.0, -80.0, y) * _smoothstep(10.0, 50.0, ax), (-0.025, -0.025, -0.02)),
    }
    return [d[name] for name in ALBEDO_NAMES]


def _vertex_normals_analytic(x, y, eps=1e-3):
    dzdx = (height(x + eps, y) - height(x - eps, y)) / (2.0 * eps)
    dzdy = (height(x, y + eps) - height(x, y - eps)) / (2.0 * eps)
    n = np.stack([-dzdx, -dzdy, np.ones_like(x)], axis=1)
    return n / np.linalg.norm(n, axis=1, keepdims=True)


def _stack(fields):
    out = np.empty((len(fields), fields[0].size))
    for k, f in enumerate(fields):
        out[k] = f.reshape(-1)
    # Far tails of Gaussians underflow to subnormal floats, which x86 multiplies in microcode
    # (~100x slower): the products below took seconds until these were flushed to zero.
    out[np.abs(out) < 1e-100] = 0.0  # so that products of two stay normal too
    return out


def _pca_like(design, random_rms, n_vertices):
    """(orthonormal basis (K, N), std (K,)) with std decreasing, as a PCA orders its components.

    The designed components carry their own size (one standard deviation each); random field j
    gets RMS `random_rms[j]` per vertex. All are sorted by std, then orthonormalized in that order.
    """
    n_designed = design.shape[0] - len(random_rms)
    std = np.linalg.norm(design, axis=1)
    std[n_designed:] = random_rms * np.sqrt(n_vertices)  # a unit row spread over V vertices: RMS 1/sqrt(V)
    order = np.argsort(-std, kind="stable")
    return _orthonormalize(design[order]), std[order]


@functools.lru_cache(maxsize=None)
def generate(level="default"):
    """All arrays of the default model at `level` ("default" or "small"), read-only.

    Returns a dict of numpy arrays (see FaceModel.default for their meaning): float32 means,
    bases (K, 3V) and standard deviations (K,) (shape and expression also stacked as one
    "geometry" basis, the others being views of it), int32 triangles, landmarks and symmetry.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {sorted(LEVELS)}; got {level!r}")
    rng = np.random.default_rng(SEED)
    xy, triangles, symmetry, lower_lip = _grid_mesh(LEVELS[level])
    x, y = xy[:, 0], xy[:, 1]
    parts = height_parts(x, y)
    z = sum(parts.values())
    pos = np.stack([x, y, z], axis=1)
    albedo = mean_albedo(x, y)
    landmarks = _landmarks(pos, symmetry, lower_lip)
    n_vertices = len(pos)

    modes = _cosine_modes(x, y, 8)
    identity = _identity_design(pos, parts)
    identity += list(_random_smooth_fields(rng, modes, 8, 80 - len(identity), len(identity),
                                           np.diag([0.7, 0.7, 1.0]), (-1.0, 1.0, 1.0)))
    # Random identity fields: 0.8 mm RMS down to 0.1 mm, below the larger designed components.
    random_rms = 0.8 * (np.arange(80 - len(IDENTITY_NAMES)) + 1.0) ** -0.5
    shape_basis, shape_std = _pca_like(_stack(identity), random_rms, n_vertices)

    expression = _expression_design(pos, _vertex_normals_analytic(x, y), lower_lip, rng)
    expression_design = _stack(expression)
    expression_basis = _orthonormalize(expression_design)
    expression_std = np.linalg.norm(expression_design, axis=1)

    colour = _albedo_design(pos, albedo)
    # Colour fields vary along skin-like directions: lightness, redness, yellowness (the rows).
    skin_colours = np.array([[0.80, 0.60, 0.50], [0.45, -0.20, -0.25], [0.06, 0.06, -0.15]])
    colour_fields = _random_smooth_fields(rng, modes, 8, 80 - len(colour), len(colour), skin_colours,
                                          (1.0, 1.0, 1.0))
    skin = 1.0 - _eye_inside(np.abs(x), y)
    colour += list(colour_fields * skin[None, :, None])
    random_rms = 0.02 * (np.arange(80 - len(ALBEDO_NAMES)) + 1.0) ** -0.6
    albedo_basis, albedo_std = _pca_like(_stack(colour), random_rms, n_vertices)

    centre = pos.mean(axis=0)
    centre[0] = 0.0  # keep the mirror plane at x = 0 exactly
    geometry_basis = np.concatenate([shape_basis, expression_basis], axis=0).astype(np.float32)
    geometry_std = np.concatenate([shape_std, expression_std]).astype(np.float32)
    out = {
        "mean_shape": (pos - centre).astype(np.float32),
        "mean_albedo": albedo.astype(np.float32),
        "triangles": triangles.astype(np.int32),
        "geometry_basis": geometry_basis,  # the shape rows, then the expression rows
        "geometry_std": geometry_std,
        "shape_basis": geometry_basis[:80],
        "shape_std": geometry_std[:80],
        "expression_basis": geometry_basis[80:],
        "expression_std": geometry_std[80:],
        "albedo_basis": albedo_basis.astype(np.float32),
        "albedo_std": albedo_std.astype(np.float32),
        "landmarks": landmarks.astype(np.int32),
        "symmetry": symmetry.astype(np.int32),
    }
    for a in out.values():
        a.setflags(write=False)
    return out
