"""Synthetic faces with ground truth: the training and evaluation data of the multi-level model.

    faces = SyntheticFaces(FaceModel.default("small"), resolution=(64, 64))
    batch = faces.batch(TRAIN_SEEDS[0:8])        # or any 8 seeds; one face per seed
    batch.images, batch.landmarks, batch.vertices, batch.detail_vertices, ...

Each face is a face of the morphable model (identity and albedo coefficients drawn from the
model's prior, N(0, 1) in standard deviations; a sparse and smaller expression) PLUS detail that
the base model cannot express, which a learned corrective space (Tewari et al., CVPR 2018) can:

- geometry: a held-back basis of 16 smooth random displacement fields (sums of regional
  deformations, three in four mirror-symmetric; 2 mm RMS together), forehead lines, frown lines,
  nasolabial folds, crow's feet and local bumps;
- reflectance: a held-back basis of 8 smooth skin-coloured fields (cosine modes finer than the
  default model's own; 0.035 RMS together), red and brown blotches, moles and freckles.

Every detail row is made orthogonal (least squares, in float64) to the model's own basis (and,
for geometry, to the seven similarity motions of the mean face, which the pose would absorb), so
`detail_vertices` and `detail_albedo` lie exactly outside the base model's span. (What that
projection leaves of a smooth field carries the negatives of the model's sharp designed
features; the held-back geometry is smoothed and projected again, ten rounds, see _build_detail.
Even so, 2 mm of geometry outside the span makes lumpy faces: the price of "outside the span";
`detail_scale` sizes it.) The detail is a
fixed dictionary (built once per model and `seed`) times sparse per-face coefficients: one GEMM
per batch on either device, and a linear corrective space of the paper's kind can represent it.

Each face then gets a random pose, SH lighting (ambient plus one directional light, slightly
tinted) and a random background (a colour gradient, blotches at two scales, fine noise), and is
rendered with the library's own ops at `supersample` times the resolution and area-averaged, so
its outline is antialiased. Landmarks are the model's 68 landmark vertices of the ground-truth
(detailed) geometry, projected with `project_to_pixels`.

Determinism: every random number of a face comes from a generator seeded by (seed, face seed) on
the host, so a seed gives the same face whatever batch it is in and on whichever device. Identical
bits are promised for the same batch on the same device; across batch compositions, the model's
GEMM may round the last bit differently (BLAS and the GPU kernels choose their blocking by batch
size), which can flip a rare pixel on a triangle edge.
"""
import weakref
from dataclasses import dataclass

import numpy as np

from fastface._backend import is_cupy_array
from fastface._checks import value_checks
from fastface.ops.camera import euler_rotation, perspective_projection, project_to_pixels, rigid_transform
from fastface.ops.normals import vertex_adjacency, vertex_normals
from fastface.ops.rasterize import rasterize_interpolate
from fastface.ops.shading import sh_shade
from fastface.render import FaceParameters

__all__ = ["TRAIN_SEEDS", "EVAL_SEEDS", "SyntheticFaces", "SyntheticBatch", "default_framing", "directional_sh"]

# One face per seed. Disjoint: evaluation faces are never trained on.
TRAIN_SEEDS = range(0, 1_000_000)
EVAL_SEEDS = range(1_000_000, 1_010_000)

# The framing: the camera at TRANSLATION_Z mm from the face (a portrait distance), the focal chosen
# so that the default model's frontal mean face fills 80% of the image height (measured: its
# projected height at 650 mm is 0.2846 focal lengths, for both levels) and centred vertically (the
# mesh's centroid sits 2.5 mm below the middle of its outline's extent).
TRANSLATION_Z = -650.0
FACE_HEIGHT_FRACTION = 0.80
_PROJECTED_HEIGHT_AT_650 = 0.2846  # (y_max - y_min) / focal of the frontal mean face at z = -650 mm
FOCAL_PER_HEIGHT = FACE_HEIGHT_FRACTION / _PROJECTED_HEIGHT_AT_650  # 2.81
TRANSLATION_Y = 2.5

# The random pose and framing jitter (uniform in +-): radians, millimetres.
ANGLE_RANGE = (0.25, 0.6, 0.15)            # pitch, yaw, roll
TRANSLATION_JITTER = (6.0, 6.0, 30.0)      # x, y, z

# Held-back bases: the number of components and the RMS (mm / linear RGB per vertex) of them all
# together at one standard deviation each. Sixteen geometry components of similar size: what lies
# outside the model's span of a smooth field is peaky (its maximum 3-6 times its RMS), and with
# fewer, larger components one of them made odd ridges.
N_HELD_BACK_GEOMETRY = 16
N_HELD_BACK_ALBEDO = 8
HELD_BACK_GEOMETRY_RMS = 2.0
HELD_BACK_ALBEDO_RMS = 0.035
# The population's mean face differs from the base model's mean outside the model's span, as real
# faces differ from a morphable model built from a few hundred scans (the gap that motivates the
# learned corrective space of Tewari et al. 2018): a fixed combination of the held-back fields,
# added to every face on top of its own detail.
POPULATION_GEOMETRY_RMS = 2.5
POPULATION_ALBEDO_RMS = 0.03

# The mouth's interior (where the model has a hole between the lips): its depth behind the lips
# (mm of the default model) and its colour.
MOUTH_DEPTH = 12.0
MOUTH_COLOUR = np.array([0.10, 0.035, 0.03], dtype=np.float32)
MOUTH_SHADOW = 0.3


def default_framing(resolution, translation_z=TRANSLATION_Z):
    """(focal in pixels, mean camera translation (3,) float32 in mm) for images of `resolution`.

    The default model's frontal mean face then fills FACE_HEIGHT_FRACTION (80%) of the image height,
    centred: focal = 2.81 H at 650 mm, scaled with the distance.
    """
    height, _ = _resolution(resolution)
    translation_z = float(translation_z)
    if not translation_z < -50.0:
        raise ValueError(f"translation_z must be below -50 mm (in front of the camera); got {translation_z}")
    focal = FOCAL_PER_HEIGHT * height * (-translation_z / -TRANSLATION_Z)
    return float(focal), np.array([0.0, TRANSLATION_Y, translation_z], dtype=np.float32)


def directional_sh(direction, intensity, ambient, tint=(1.0, 1.0, 1.0), ambient_tint=(1.0, 1.0, 1.0)):
    """(9, 3) float64 SH coefficients of an ambient term plus one distant light from `direction`.

    The irradiance of a distant light projects onto the SH basis as the basis evaluated at the
    light's direction (Ramamoorthi and Hanrahan 2001); the renderer applies the Â_l factors. An
    ambient of 1 and intensity 0 give colour = albedo (docs/conventions.md).
    """
    x, y, z = np.asarray(direction, dtype=np.float64) / np.linalg.norm(direction)
    basis = np.array([0.282095, 0.488603 * y, 0.488603 * z, 0.488603 * x, 1.092548 * x * y,
                      1.092548 * y * z, 0.315392 * (3 * z * z - 1), 1.092548 * x * z,
                      0.546274 * (x * x - y * y)])
    sh = intensity * basis[:, None] * np.asarray(tint, dtype=np.float64)[None, :] / np.pi
    sh[0] += ambient * np.asarray(ambient_tint, dtype=np.float64) / (np.pi * 0.282095)
    return sh


def _directional_sh_batch(direction, intensity, ambient, tint, ambient_tint):
    """`directional_sh` for a batch: direction (B, 3), intensity and ambient (B,), tints (B, 3) -> (B, 9, 3)."""
    x, y, z = (direction / np.linalg.norm(direction, axis=1, keepdims=True)).T
    basis = np.stack([np.full_like(x, 0.282095), 0.488603 * y, 0.488603 * z, 0.488603 * x, 1.092548 * x * y,
                      1.092548 * y * z, 0.315392 * (3 * z * z - 1), 1.092548 * x * z, 0.546274 * (x * x - y * y)],
                     axis=1)
    sh = intensity[:, None, None] * basis[:, :, None] * tint[:, None, :] / np.pi
    sh[:, 0] += ambient[:, None] * ambient_tint / (np.pi * 0.282095)
    return sh


@dataclass(frozen=True)
class SyntheticBatch:
    """A batch of synthetic faces and their ground truth (numpy, or cupy for a GPU model).

    Attributes:
        images: (B, H, W, 3) float32 in [0, 1], the face over its background.
        mask: (B, H, W) bool, True where the face covers at least half of the pixel (the model's
            surface only: the dark mouth interior seen through open lips is not in it).
        coverage: (B, H, W) float32 in [0, 1], the fraction of the pixel's samples the face covers.
        landmarks: (B, 68, 2) float32 pixel coordinates (docs/conventions.md) of the model's
            landmark vertices of the ground-truth geometry.
        vertices: (B, V, 3) float32 ground-truth model-space vertices (before pose), detail included.
        albedo: (B, V, 3) float32 ground-truth albedo, detail included (not clipped).
        params: `FaceParameters` of the base part (coefficients, SH, pose), float32.
        detail_vertices: (B, V, 3) float32, vertices minus the base model's vertices of `params`.
        detail_albedo: (B, V, 3) float32, albedo minus the base model's albedo of `params`.
        background: (B, H, W, 3) float32, the background alone.
        seeds: (B,) int64 numpy array, the face seeds.
    """
    images: object
    mask: object
    coverage: object
    landmarks: object
    vertices: object
    albedo: object
    params: FaceParameters
    detail_vertices: object
    detail_albedo: object
    background: object
    seeds: object


# ----------------------------------------------------------------------------------------------
# The detail dictionaries (host, float64, built once per model and seed)
# ----------------------------------------------------------------------------------------------

def _smoothstep(edge0, edge1, x):
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _mirror(fields, symmetry, negate_x):
    """The mirror image (x -> -x) of per-vertex fields (..., V, 3) through the model's symmetry map."""
    out = fields[..., symmetry, :].copy()
    if negate_x:
        out[..., 0] = -out[..., 0]
    return out


def _with_parity(rows, symmetry, negate_x):
    """Rows (M, 3V) made mirror-symmetric, or (every fourth, k % 4 == 3) mirror-antisymmetric:
    (f +- mirror(f)) / 2. Faces are mostly symmetric (and the corrective space is regularised
    toward symmetry); the antisymmetric ones are pure asymmetry, orthogonal to all symmetric rows,
    so that orthonormalising the rows keeps each one's parity."""
    if symmetry is None:
        return rows
    fields = rows.reshape(len(rows), -1, 3)
    sign = np.where(np.arange(len(rows)) % 4 == 3, -1.0, 1.0)[:, None, None]
    return (0.5 * (fields + sign * _mirror(fields, symmetry, negate_x))).reshape(len(rows), -1)


def _mirror_closed(span, symmetry, negate_x):
    """The rows of `span` (K, 3V) and their mirror images: a span that the mirror maps onto itself,
    so that what lies outside it stays outside when mirrored (and symmetrising keeps it there)."""
    if symmetry is None:
        return span
    return np.concatenate([span, _mirror(span.reshape(len(span), -1, 3), symmetry, negate_x).reshape(len(span), -1)])


def _span_basis(span):
    """Orthonormal rows (K', N) spanning the rows of `span` (K, N), float64, dropping the directions
    that the rows do not really span (the default model's rows and the similarity motions are
    linearly dependent: their Gram matrix's condition number is 1e16, so it cannot be inverted).
    Rows are scaled to unit norm first: the similarity motions are thousands of times longer than
    the model's orthonormal rows, and a threshold relative to the largest eigenvalue then dropped
    real directions."""
    span = span / np.maximum(np.linalg.norm(span, axis=1, keepdims=True), 1e-300)  # comparable eigenvalues
    for _ in range(2):  # the second pass makes the first's rows orthonormal to rounding
        values, vectors = np.linalg.eigh(span @ span.T)
        keep = values > 1e-9 * values.max()
        span = (vectors[:, keep].T @ span) / np.sqrt(values[keep])[:, None]
    return span


def _project_out(rows, basis, passes=2):
    """`rows` (M, N) minus their projection onto orthonormal rows `basis` (K, N) (least squares);
    twice by default, the second pass removing what the first left to rounding."""
    for _ in range(passes):
        rows = rows - (rows @ basis.T) @ basis
    return rows


def _orthonormal_rows(rows):
    """Orthonormal rows spanning `rows` (M, N), in order (modified Gram-Schmidt, twice)."""
    q = rows.copy()
    for _ in range(2):
        for k in range(q.shape[0]):
            q[k] -= (q[:k] @ q[k]) @ q[:k]
            q[k] /= np.linalg.norm(q[k])
    return q


def _cosine_modes(xy, n):
    """(V, n*n) fields cos(p pi u) cos(q pi v) over the bounding box of the points, and (p, q)."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    u = (xy - lo) / np.maximum(hi - lo, 1e-9)
    cu = np.cos(np.pi * np.arange(n)[None, :] * u[:, 0:1])
    cv = np.cos(np.pi * np.arange(n)[None, :] * u[:, 1:2])
    p, q = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return (cu[:, :, None] * cv[:, None, :]).reshape(len(xy), n * n), p.ravel(), q.ravel()


def _smooth_random_fields(rng, xy, count, directions, symmetry, negate_x, width):
    """`count` smooth random fields (count, V, 3): cosine modes up to 12 x 12 over the bounding box
    of `xy` (the default model's own random fields go to 8 x 8) with a Gaussian spectrum of `width`
    in mode number and no constant mode, each channel along a row of `directions` (3, 3); three in
    four made mirror-symmetric through the model's symmetry map, the fourth antisymmetric."""
    modes, p, q = _cosine_modes(xy, 12)
    f = np.sqrt(p * p + q * q)
    spectrum = np.exp(-0.5 * (f / width) ** 2) * (f > 0)
    coef = rng.standard_normal((count, len(f), 3)) * spectrum[None, :, None]
    fields = np.einsum("vm,kmc->kvc", modes, coef @ directions)
    return _with_parity(fields.reshape(count, -1), symmetry, negate_x).reshape(count, -1, 3)


def _regional_fields(rng, xy, count, scale, symmetry):
    """`count` smooth random displacement fields (count, V, 3), each the sum of four regional
    deformations: a Gaussian window (8 to 16 mm, times `scale`) around a random point of the face
    times a random direction that varies linearly across the window (a swelling, a shift, a
    twist). Three in four are mirror-symmetric, the fourth antisymmetric. Localised, so that more
    of each lies outside the model's span (about half): of smooth global fields (cosine modes) only
    10-30% does, and what the projection left of them gathered along the outline and undid the
    model's sharp designed features (the lips, the nose), which looked like melted faces."""
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    fields = np.zeros((count, len(xy), 3))
    for k in range(count):
        for _ in range(4):
            centre = lo + (hi - lo) * rng.uniform(0.15, 0.85, 2)
            sigma = rng.uniform(8.0, 16.0) * scale
            d = (xy - centre) / sigma
            window = np.exp(-0.5 * np.sum(d * d, axis=1))
            direction = rng.standard_normal((3, 3))  # constant, d/dx and d/dy parts
            fields[k] += window[:, None] * (direction[0] + d[:, 0:1] * direction[1] + d[:, 1:2] * direction[2])
    return _with_parity(fields.reshape(count, -1), symmetry, True).reshape(count, -1, 3)


def _pick(rng, pool, size, p=None):
    """`size` distinct vertices of `pool` (with repeats only when a small mesh has fewer)."""
    return rng.choice(pool, size=size, replace=len(pool) < size, p=p)


def _segment_distance(points, a, b):
    """Distance (V,) of 2D points to the segment a-b, and the parameter t in [0, 1] of the nearest point."""
    ab = b - a
    t = np.clip(((points - a) @ ab) / (ab @ ab), 0.0, 1.0)
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1), t


def _curve_distance(points, control, samples=64):
    """Distance (V,) of 2D points to a quadratic Bezier curve through control (3, 2), and the
    curve parameter (V,) of the nearest sample."""
    t = np.linspace(0.0, 1.0, samples)
    curve = ((1 - t) ** 2)[:, None] * control[0] + (2 * (1 - t) * t)[:, None] * control[1] + \
        (t ** 2)[:, None] * control[2]
    d = np.linalg.norm(points[:, None, :] - curve[None, :, :], axis=2)
    nearest = d.argmin(axis=1)
    return d[np.arange(len(points)), nearest], t[nearest], curve[nearest]


class _Layout:
    """Where the face's parts are on the mean shape, from its 68 landmarks (so any model with
    landmarks works): eye centres, brows, nose, mouth corners; `s` scales millimetres of the
    default model (interocular distance 64 mm) to this model's."""

    def __init__(self, mean_shape, landmarks):
        lm = mean_shape[landmarks]
        self.xy = mean_shape[:, :2]
        self.eye_r, self.eye_l = lm[36:42, :2].mean(axis=0), lm[42:48, :2].mean(axis=0)  # image left, right
        self.s = np.linalg.norm(self.eye_l - self.eye_r) / 64.0
        self.brow_top = lm[17:27, 1].max()
        self.brow_outer = np.abs(lm[[17, 26], 0]).mean()
        self.brow_inner_y = lm[[21, 22], 1].mean()
        self.ala = lm[[31, 35], :2]
        self.mouth = lm[[48, 54], :2]
        self.eye_outer = lm[[36, 45], :2]
        self.top = mean_shape[:, 1].max()

    def eye_weight(self):
        """(V,) 1 on the skin, 0 on the eyeballs (ellipses around the eye centres)."""
        w = np.ones(len(self.xy))
        for c in (self.eye_r, self.eye_l):
            r = np.hypot((self.xy[:, 0] - c[0]) / (15.0 * self.s), (self.xy[:, 1] - c[1]) / (7.0 * self.s))
            w *= _smoothstep(0.8, 1.2, r)
        return w


def _geometry_features(layout, rng, normals, groove_width):
    """Local geometry rows (M, V, 3) of unit peak depth along the mean shape's normals, and their kinds."""
    s, xy = layout.s, layout.xy
    x, y = xy[:, 0], xy[:, 1]
    rows, kinds = [], []

    def add(height, kind):
        rows.append(height[:, None] * normals)
        kinds.append(kind)

    w = groove_width
    # Forehead lines: three patterns (2, 3 or 4 grooves) arching slightly over the brows.
    fade_x = _smoothstep(layout.brow_outer * 1.05, layout.brow_outer * 0.7, np.abs(x))
    fade_top = _smoothstep(layout.top - 4.0 * s, layout.top - 14.0 * s, y)
    for count, spacing, first in ((2, 9.0, 15.0), (3, 8.0, 12.0), (4, 7.0, 10.0)):
        h = np.zeros_like(x)
        for k in range(count):
            yk = layout.brow_top + (first + spacing * k) * s + 0.004 * x * x / s
            h -= np.exp(-0.5 * ((y - yk) / w) ** 2)
        add(h * fade_x * fade_top, "forehead")
    # Frown lines: two short vertical grooves between the brows, closer together at the bottom.
    h = np.zeros_like(x)
    for sx in (-1.0, 1.0):
        h -= np.exp(-0.5 * ((x - sx * (7.0 * s + 0.15 * (y - layout.brow_inner_y))) / w) ** 2)
    h *= _smoothstep(layout.brow_inner_y - 6.0 * s, layout.brow_inner_y - 1.0 * s, y) * \
        _smoothstep(layout.brow_inner_y + 12.0 * s, layout.brow_inner_y + 5.0 * s, y)
    add(h, "frown")
    # Nasolabial folds, one row per side: a crease from beside the nose's ala to below the mouth
    # corner, with the cheek bulging over it on the outside.
    for side in (0, 1):
        sx = -1.0 if side == 0 else 1.0
        a = layout.ala[side] + np.array([sx * 4.0 * s, 2.0 * s])
        c = layout.mouth[side] + np.array([sx * 5.0 * s, -9.0 * s])
        mid = 0.5 * (a + c) + np.array([sx * 6.0 * s, 0.0])
        d, t, nearest = _curve_distance(xy, np.stack([a, mid, c]))
        taper = np.sin(np.pi * np.clip(t, 0.0, 1.0)) ** 0.5 * (d < 25.0 * s)
        outside = (sx * (x - nearest[:, 0]) > 0.0).astype(float)
        h = -np.exp(-0.5 * (d / (1.4 * w)) ** 2) + 0.5 * outside * np.exp(-0.5 * ((d - 4.0 * s) / (4.0 * s)) ** 2)
        add(h * taper, "nasolabial")
    # Crow's feet, one row per side: three short grooves fanning out from the eye's outer corner.
    for side in (0, 1):
        sx = -1.0 if side == 0 else 1.0
        corner = layout.eye_outer[side] + np.array([sx * 3.0 * s, 0.0])
        h = np.zeros_like(x)
        for angle in (-0.5, 0.0, 0.45):
            end = corner + 10.0 * s * np.array([sx * np.cos(angle), np.sin(angle)])
            d, t = _segment_distance(xy, corner, end)
            h -= np.exp(-0.5 * (d / w) ** 2) * np.sin(np.pi * t)
        add(h, "crows_feet")
    # Bumps: Gaussian bumps (or dents: the coefficient's sign) of 4 to 10 mm at fixed places on the skin.
    skin = np.flatnonzero(layout.eye_weight() > 0.99)
    skin = skin if len(skin) else np.arange(len(xy))
    for centre in _pick(rng, skin, 48):
        radius = rng.uniform(4.0, 10.0) * s
        add(np.exp(-0.5 * np.sum((xy - xy[centre]) ** 2, axis=1) / radius ** 2), "bump")
    return np.stack(rows), kinds


def _albedo_features(layout, rng):
    """Local reflectance rows (M, V, 3): unit-amplitude blotches, moles and freckle patterns."""
    s, xy = layout.s, layout.xy
    skin = layout.eye_weight()
    rows, kinds = [], []
    candidates = np.flatnonzero(skin > 0.99)
    candidates = candidates if len(candidates) else np.arange(len(xy))

    def spot(centre, radius):
        return np.exp(-0.5 * np.sum((xy - xy[centre]) ** 2, axis=1) / radius ** 2)

    # Blotches: red (irritation) and brown (pigmentation) patches of 4 to 12 mm.
    for k, centre in enumerate(_pick(rng, candidates, 24)):
        colour = np.array([0.07, -0.03, -0.02]) if k % 2 == 0 else np.array([-0.06, -0.06, -0.04])
        rows.append(spot(centre, rng.uniform(4.0, 12.0) * s)[:, None] * colour * skin[:, None])
        kinds.append("blotch")
    # Moles: small dark brown spots centred on a vertex (so the peak is seen at any mesh density).
    for centre in _pick(rng, candidates, 48):
        rows.append(spot(centre, rng.uniform(1.0, 2.0) * s)[:, None] * np.array([-0.40, -0.32, -0.25]))
        kinds.append("mole")
    # Freckles: four patterns of 80 small light-brown spots over the nose and the cheeks.
    centre_xy = 0.5 * (layout.eye_r + layout.eye_l) + np.array([0.0, -20.0 * s])
    density = np.exp(-0.5 * (((xy[candidates, 0] - centre_xy[0]) / (28.0 * s)) ** 2 +
                             ((xy[candidates, 1] - centre_xy[1]) / (14.0 * s)) ** 2))
    for _ in range(4):
        f = np.zeros(len(xy))
        for centre in _pick(rng, candidates, 80, density / density.sum()):
            f += rng.uniform(0.6, 1.2) * spot(centre, rng.uniform(1.0, 1.6) * s)
        rows.append(np.minimum(f, 1.2)[:, None] * np.array([-0.10, -0.09, -0.06]) * skin[:, None])
        kinds.append("freckles")
    return np.stack(rows), kinds


def _outline_distance(mean_shape, triangles):
    """(V,) distance in the (x, y) plane from each vertex to the nearest vertex of the mesh's
    longest boundary loop (the face's outline)."""
    from scipy.spatial import cKDTree  # noqa: PLC0415

    directed = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]).astype(np.int64)
    n = len(mean_shape)
    keys = directed[:, 0] * n + directed[:, 1]
    boundary = directed[~np.isin(directed[:, 1] * n + directed[:, 0], keys)]
    following = dict(zip(boundary[:, 0].tolist(), boundary[:, 1].tolist()))
    seen, longest = set(), []
    for start in following:
        if start in seen:
            continue
        loop, v = [start], following[start]
        seen.add(start)
        while v != start and v in following and v not in seen:
            seen.add(v)
            loop.append(v)
            v = following[v]
        if len(loop) > len(longest):
            longest = loop
    if not longest:
        return np.full(n, np.inf)
    return cKDTree(mean_shape[longest, :2]).query(mean_shape[:, :2])[0]


def _smoother(mean_shape, triangles, length):
    """A function that smooths per-vertex fields (M, 3V) over the mesh: x -> (I + t L)^-1 x, L the
    graph Laplacian of the edges and t = (length / median edge length)^2, so that variations finer
    than about `length` mm are damped. One sparse factorisation, then triangular solves per call."""
    import scipy.sparse  # noqa: PLC0415
    import scipy.sparse.linalg  # noqa: PLC0415

    V = len(mean_shape)
    e = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]).astype(np.int64)
    e = np.unique(np.sort(e, axis=1), axis=0)
    adjacency = scipy.sparse.coo_matrix((np.ones(2 * len(e)), (np.r_[e[:, 0], e[:, 1]], np.r_[e[:, 1], e[:, 0]])),
                                        shape=(V, V)).tocsc()
    laplacian = scipy.sparse.diags(np.asarray(adjacency.sum(axis=1)).ravel()) - adjacency
    edge = float(np.median(np.linalg.norm(mean_shape[e[:, 0]] - mean_shape[e[:, 1]], axis=1)))
    lu = scipy.sparse.linalg.splu((scipy.sparse.identity(V) + (length / edge) ** 2 * laplacian).tocsc())

    def smooth(rows):
        x = rows.reshape(len(rows), V, 3).transpose(1, 0, 2).reshape(V, -1)  # (V, M * 3)
        x = lu.solve(np.asfortranarray(x))
        return x.reshape(V, len(rows), 3).transpose(1, 0, 2).reshape(len(rows), -1)

    return smooth


def _similarity_motions(mean_shape):
    """(7, 3V): the three translations, three infinitesimal rotations and the scaling of the mean shape."""
    p = mean_shape - mean_shape.mean(axis=0)
    one, zero = np.ones(len(p)), np.zeros(len(p))
    x, y, z = p[:, 0], p[:, 1], p[:, 2]
    motions = [(one, zero, zero), (zero, one, zero), (zero, zero, one),
               (zero, -z, y), (z, zero, -x), (-y, x, zero), (x, y, z)]
    return np.stack([np.stack(m, axis=1).reshape(-1) for m in motions])


@dataclass(frozen=True)
class _Detail:
    geometry: np.ndarray       # (K_g, 3V) float32: row k is a displacement of one unit of coefficient k
    albedo: np.ndarray         # (K_a, 3V) float32
    geometry_kinds: tuple      # (K_g,) the kind of each row: "held_back", "forehead", ...
    albedo_kinds: tuple
    population_geometry: np.ndarray = None  # (3V,) float32, the population's offset (mm)
    population_albedo: np.ndarray = None    # (3V,) float32


def _host(a):
    return a.get() if is_cupy_array(a) else np.asarray(a)


OUTLINE_TAPER = 0.6  # the held-back geometry's size at the outline, relative to inside
ROUNDS = 10  # smoothing-and-projection rounds of the held-back geometry (see _build_detail)


def _build_detail(model, seed):
    """The detail dictionaries of `model` (host copies of its arrays are read) for `seed`."""
    rng = np.random.default_rng([20261204, seed])
    mean_shape = _host(model.mean_shape).astype(np.float64)
    triangles = _host(model.triangles)
    landmarks = _host(model.landmarks)
    symmetry = None if model.symmetry is None else _host(model.symmetry)
    V = len(mean_shape)
    layout = _Layout(mean_shape, landmarks)
    normals = vertex_normals(mean_shape[None], triangles)[0]
    edges = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]]])
    edge_length = float(np.median(np.linalg.norm(mean_shape[edges[:, 0]] - mean_shape[edges[:, 1]], axis=1)))
    groove_width = max(1.5 * layout.s, 0.75 * edge_length)  # a groove narrower than the mesh only aliases

    # Geometry: held-back fields (orthonormalised outside the model's span and the similarity
    # motions, then scaled to their RMS), then the local features (outside the same span).
    geometry_span = np.concatenate([_host(model.shape_basis), _host(model.expression_basis)]).astype(np.float64)
    geometry_span = np.concatenate([geometry_span, _similarity_motions(mean_shape)])
    # Outside the span and its mirror image: the default model's span is not mirror-invariant (a
    # quarter of its random fields are asymmetric), and projecting symmetric fields out of it left
    # them as asymmetric as random ones (bent noses).
    span = _span_basis(_mirror_closed(geometry_span, symmetry, True))
    held = _regional_fields(rng, mean_shape[:, :2], N_HELD_BACK_GEOMETRY, layout.s, symmetry)
    held = _project_out(held.reshape(N_HELD_BACK_GEOMETRY, -1), span)
    # What the projection subtracts holds sharp copies of the model's designed features (the
    # lips, the nose, the glabella), so the remainder has their negatives (its Laplacian norm grew
    # from 0.15 to 0.56 of its norm): smooth them away over ~5 mm and project again, ten times (each
    # projection brings back a little of them). After the final orthonormalisation the rows measure
    # ~0.3 (the model's own rows: 0.15 for identity, 0.31 for expression). More rounds converge
    # toward a few dominant smooth modes (a power iteration): the rows then lose their variety.
    # The smooth part of what lies outside the span gathers along the outline (the model's designed
    # components live inside it), which makes lumpy outlines and pointed foreheads: each round also
    # tapers the fields toward the outline (to OUTLINE_TAPER = 0.6 of their size at it: 1 made
    # pointed foreheads, 0.3 left the outline and the jaw's landmarks nearly still).
    smooth = _smoother(mean_shape, triangles, 5.0 * layout.s)
    taper = OUTLINE_TAPER + (1.0 - OUTLINE_TAPER) * _smoothstep(0.0, 20.0 * layout.s,
                                                                _outline_distance(mean_shape, triangles))
    taper = np.repeat(taper, 3)
    for _ in range(ROUNDS):
        held = _with_parity(_project_out(smooth(held) * taper, span, passes=1), symmetry, True)
    held = _orthonormal_rows(_project_out(held, span))
    std = (np.arange(N_HELD_BACK_GEOMETRY) + 1.0) ** -0.25  # no one component dominates
    std *= HELD_BACK_GEOMETRY_RMS / np.sqrt(np.sum(std ** 2))
    held *= (std * np.sqrt(V))[:, None]  # a unit row spread over V vertices has RMS 1/sqrt(V)
    local, local_kinds = _geometry_features(layout, rng, normals, groove_width)
    local = _project_out(local.reshape(len(local), -1), span)
    geometry = np.concatenate([held, local]).astype(np.float32)
    geometry_kinds = ("held_back",) * N_HELD_BACK_GEOMETRY + tuple(local_kinds)

    # Reflectance, the same way, outside the albedo basis's span.
    albedo_span = _host(model.albedo_basis).astype(np.float64)
    albedo_span = _mirror_closed(albedo_span, symmetry, False)
    span = _span_basis(albedo_span) if albedo_span.shape[0] else np.zeros((0, 3 * V))  # it may have none
    # Along lightness mostly, less along redness and yellowness: a negative redness is a green cast,
    # which at the model's own proportions made faces look ill.
    skin_colours = np.array([[0.80, 0.60, 0.50], [0.25, -0.10, -0.12], [0.03, 0.03, -0.08]])
    held = _smooth_random_fields(rng, mean_shape[:, :2], N_HELD_BACK_ALBEDO, skin_colours, symmetry, False, 4.0)
    held = (held * layout.eye_weight()[None, :, None]).reshape(N_HELD_BACK_ALBEDO, -1)
    held = _orthonormal_rows(_project_out(held, span))
    std = (np.arange(N_HELD_BACK_ALBEDO) + 1.0) ** -0.5
    std *= HELD_BACK_ALBEDO_RMS / np.sqrt(np.sum(std ** 2))
    held *= (std * np.sqrt(V))[:, None]
    local, local_kinds = _albedo_features(layout, rng)
    local = local.reshape(len(local), -1)
    local = _project_out(local, span)
    albedo = np.concatenate([held, local]).astype(np.float32)
    albedo_kinds = ("held_back",) * N_HELD_BACK_ALBEDO + tuple(local_kinds)
    population = []
    for rows, n_held, rms in ((geometry, N_HELD_BACK_GEOMETRY, POPULATION_GEOMETRY_RMS),
                              (albedo, N_HELD_BACK_ALBEDO, POPULATION_ALBEDO_RMS)):
        field = rng.standard_normal(n_held) @ rows[:n_held].astype(np.float64)
        field *= rms / np.sqrt(np.mean(np.sum(field.reshape(V, 3) ** 2, axis=1)))
        population.append(field.astype(np.float32))
    for a in (geometry, albedo, *population):
        a.setflags(write=False)
    return _Detail(geometry=geometry, albedo=albedo, geometry_kinds=geometry_kinds, albedo_kinds=albedo_kinds,
                   population_geometry=population[0], population_albedo=population[1])


# Built once per (model, seed): ~1 s of CPU for the small default model, ~7 s for the default one.
# Keyed on the model object (weakly) and on the identity of its mean shape and triangles (a model
# whose arrays are replaced gets new ones); another FaceModel object (FaceModel.default() again,
# model.to("gpu")) builds its own.
_detail_cache = weakref.WeakKeyDictionary()


def _detail_of(model, seed):
    per_model = _detail_cache.setdefault(model, {})
    key = (seed, id(model.mean_shape), id(model.triangles))
    if key not in per_model:
        per_model[key] = _build_detail(model, seed)
    return per_model[key]


# How often a face has each local kind of detail, and its size when it does (mm of depth for
# geometry, a multiple of the row's colour for reflectance). "pair": both sides together, within
# 15% of each other; "one": at most one of the kind's patterns; "each": every row on its own.
_LOCAL_DETAIL = {
    "bump": ("each", 0.05, 0.3, 1.0),      # signed: bumps and dents
    "frown": ("each", 0.3, 0.2, 0.6),
    "nasolabial": ("pair", 0.8, 0.4, 2.0),
    "crows_feet": ("pair", 0.35, 0.2, 0.7),
    "forehead": ("one", 0.6, 0.3, 1.0),
    "blotch": ("each", 0.08, 0.3, 1.0),
    "mole": ("each", 0.06, 0.6, 1.0),
    "freckles": ("one", 0.3, 0.5, 1.4),
}


class _CoefficientPlan:
    """The per-face coefficients (B, K) of a detail dictionary's rows from raw random numbers: the
    held-back ones N(0, 1), the local ones sparse (_LOCAL_DETAIL). Vectorised over the batch and
    the rows: a group's "pair" and "one" rows read the uniforms of the group's first row."""

    def __init__(self, kinds):
        kinds = np.asarray(kinds)
        K = self.size = len(kinds)
        self.held = kinds == "held_back"
        self.signed = kinds == "bump"
        self.chance, self.lo, self.hi = np.zeros(K), np.zeros(K), np.zeros(K)
        self.lead, self.spread = np.arange(K), np.zeros(K)  # whose uniforms a row reads; pairs' spread
        self.one, self.position, self.count = np.zeros(K, bool), np.zeros(K), np.ones(K)
        for kind, (how, chance, lo, hi) in _LOCAL_DETAIL.items():
            rows = np.flatnonzero(kinds == kind)
            if not len(rows):
                continue
            self.chance[rows], self.lo[rows], self.hi[rows] = chance, lo, hi
            if how != "each":
                self.lead[rows] = rows[0]
            if how == "pair":
                self.spread[rows] = 0.15
            if how == "one":
                self.one[rows], self.position[rows], self.count[rows] = True, np.arange(len(rows)), len(rows)

    def coefficients(self, u, a, w, n):
        """u, a, w: (B, K) uniforms in [0, 1); n: (B, K) standard normals. Returns (B, K) float64."""
        u, a, w = u[:, self.lead], a[:, self.lead], w[:, self.lead]
        c = np.where(u < self.chance, self.lo + (self.hi - self.lo) * a, 0.0) * (1.0 + self.spread * n)
        c *= ~self.one | (np.floor(w * self.count) == self.position)  # "one": the pattern w picks
        c *= np.where(self.signed, np.sign(n), 1.0)
        return np.where(self.held, n, c)


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------

def _resolution(resolution):
    try:
        height, width = resolution
    except (TypeError, ValueError):
        raise TypeError(f"resolution must be (H, W); got {resolution!r}") from None
    for v in (height, width):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"resolution must be two positive integers (H, W); got {resolution!r}")
        if not 8 <= v <= 4096:
            raise ValueError(f"resolution must be two integers in [8, 4096]; got {resolution!r}")
    return int(height), int(width)


def _smoothing_matrix(n, grid):
    """(n, grid) weights that spread a grid x grid field smoothly over n pixels (Gaussian, rows sum to 1)."""
    pixel = (np.arange(n) + 0.5) / n * (grid - 1)
    w = np.exp(-0.5 * ((pixel[:, None] - np.arange(grid)[None, :]) / 0.6) ** 2)
    return w / w.sum(axis=1, keepdims=True)


_COARSE, _MEDIUM, _TILE = 4, 12, 256  # background blotch grids and the fine-noise tile's size


class SyntheticFaces:
    """A deterministic source of synthetic faces with ground truth (module docstring).

    Args:
        model: a `FaceModel` with landmarks, on the CPU (numpy results) or the GPU (cupy results).
        resolution: (H, W) of the images.
        focal: focal length in pixels; None: `default_framing(resolution, translation_z)`.
        translation_z: the mean distance of the camera (mm, negative: in front); None: -650.
        detail: False renders the base model's faces only (the detail arrays are then zeros and the
            base part of each face is unchanged).
        seed: selects the detail dictionaries (the held-back bases, where bumps and moles sit) and
            the fine-noise texture; the faces of a seed differ between two values of it.
        supersample: render at this many times the resolution and area-average (1: no antialiasing).
        population: add the population's offset from the model's mean (POPULATION_GEOMETRY_RMS,
            POPULATION_ALBEDO_RMS; outside the base model's span, the same in every face, times detail_scale) to
            the detail; off with detail=False or detail_scale=0.
        detail_scale: multiplies every detail coefficient (geometry and reflectance): 1 gives the
            sizes documented in the module, 0 the same as detail=False.

    Attributes:
        focal, translation ((3,) float32 numpy, mm): the framing; resolution, model, detail,
            detail_scale, seed, supersample.
        detail_geometry_basis (K_g, 3V), detail_albedo_basis (K_a, 3V): the detail dictionaries
            (float32, on the model's device), with `detail_geometry_kinds` / `detail_albedo_kinds`.
    """

    def __init__(self, model, resolution=(64, 64), focal=None, translation_z=None, detail=True, seed=0,
                 supersample=2, detail_scale=1.0, population=True):
        if model.landmarks is None:
            raise ValueError("model must have landmarks (68 vertex indices): the faces' landmarks are "
                             "projected from them")
        self.model = model
        self.resolution = _resolution(resolution)
        if translation_z is None:
            translation_z = TRANSLATION_Z
        default_focal, self.translation = default_framing(self.resolution, translation_z)
        if focal is None:
            focal = default_focal
        if isinstance(focal, bool) or not isinstance(focal, (int, float, np.integer, np.floating)):
            raise TypeError(f"focal must be a number of pixels; got {focal!r}")
        if not np.isfinite(focal) or focal <= 0:
            raise ValueError(f"focal must be a positive number of pixels; got {focal!r}")
        self.focal = float(focal)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise TypeError(f"seed must be a non-negative integer; got {seed!r}")
        self.seed = int(seed)
        self.detail = bool(detail)
        if isinstance(detail_scale, bool) or not isinstance(detail_scale, (int, float, np.integer, np.floating)) \
                or not np.isfinite(detail_scale) or detail_scale < 0:
            raise ValueError(f"detail_scale must be a non-negative number; got {detail_scale!r}")
        self.detail_scale = float(detail_scale)
        if isinstance(supersample, bool) or not isinstance(supersample, (int, np.integer)) or supersample < 1:
            raise ValueError(f"supersample must be a positive integer; got {supersample!r}")
        self.supersample = int(supersample)
        self._xp = _array_module_of(model)
        xp = self._xp

        detail_bases = _detail_of(model, self.seed)
        self.detail_geometry_kinds = detail_bases.geometry_kinds
        self.detail_albedo_kinds = detail_bases.albedo_kinds
        self._geometry_plan = _CoefficientPlan(self.detail_geometry_kinds)
        self._albedo_plan = _CoefficientPlan(self.detail_albedo_kinds)
        self.detail_geometry_basis = xp.asarray(detail_bases.geometry)
        self.detail_albedo_basis = xp.asarray(detail_bases.albedo)
        # The population's offset from the model's mean (POPULATION_GEOMETRY_RMS), in every face.
        self.population = bool(population) and self.detail and self.detail_scale > 0
        V = model.n_vertices
        self.population_vertices = xp.asarray(self.detail_scale * detail_bases.population_geometry.reshape(V, 3)) \
            if self.population else xp.zeros((V, 3), np.float32)
        self.population_albedo = xp.asarray(self.detail_scale * detail_bases.population_albedo.reshape(V, 3)) \
            if self.population else xp.zeros((V, 3), np.float32)
        self._adjacency = vertex_adjacency(model.triangles, model.n_vertices)
        self._landmarks = xp.ascontiguousarray(model.landmarks)
        # The mouth's interior: where the model has a hole between the lips (the default model's
        # slit), a fan of triangles from (a copy of) its rim to a point behind it, dark, so that an open
        # mouth shows a mouth rather than the background. It is not part of the model's surface:
        # not in `mask` or `coverage`, and the rim's normals come from the model's triangles alone.
        triangles = _host(model.triangles)
        loop = _mouth_loop(triangles, _host(model.landmarks), model.n_vertices)
        if loop is None:
            self._mouth_loop = self._triangles_with_mouth = None
        else:
            rim = model.n_vertices + np.arange(len(loop))  # the rim's copies, then the centre
            fan = np.stack([rim, np.roll(rim, -1), np.full_like(rim, model.n_vertices + len(loop))], axis=1)
            self._mouth_loop = xp.asarray(loop.astype(np.int32))
            self._triangles_with_mouth = xp.asarray(np.concatenate([triangles, fan]).astype(np.int32))
            layout = _Layout(_host(model.mean_shape).astype(np.float64), _host(model.landmarks))
            self._mouth_depth = np.float32(MOUTH_DEPTH * layout.s)
            self._mouth_colour = xp.asarray(MOUTH_COLOUR)

        # Background pieces: pixel coordinates in [-1, 1], the blotch grids' smoothing matrices and a
        # fine-noise tile, all fixed; each image draws its own colours, amounts and tile offset.
        H, W = self.resolution
        rng = np.random.default_rng([20261205, self.seed])
        f32 = np.float32
        self._bg_y = xp.asarray(((np.arange(H) + 0.5) / H * 2.0 - 1.0).astype(f32))
        self._bg_x = xp.asarray(((np.arange(W) + 0.5) / W * 2.0 - 1.0).astype(f32))
        self._bg_smooth = [(xp.asarray(_smoothing_matrix(H, g).astype(f32)),
                            xp.asarray(_smoothing_matrix(W, g).T.astype(f32).copy())) for g in (_COARSE, _MEDIUM)]
        self._bg_tile = xp.asarray(rng.standard_normal((_TILE, _TILE, 3)).astype(f32))
        self._bg_rows = xp.asarray(np.arange(H, dtype=np.int32))
        self._bg_cols = xp.asarray(np.arange(W, dtype=np.int32))

    @property
    def device(self):
        return self.model.device

    @property
    def framing(self):
        """(focal, translation): what `fastface.data.FaceFolder(framing=...)` and a Reconstructor
        trained on these faces share."""
        return self.focal, self.translation

    # ------------------------------------------------------------------------------------------

    def _layout_of_draws(self):
        """The raw random numbers of one face: (name, count) of its normals, then of its uniforms."""
        model, Kg, Ka = self.model, self._geometry_plan.size, self._albedo_plan.size
        normals = (("shape", model.n_shape), ("expression", model.n_expression), ("albedo", model.n_albedo),
                   ("detail_geometry", Kg), ("detail_albedo", Ka), ("bg_coarse", _COARSE * _COARSE * 3),
                   ("bg_medium", _MEDIUM * _MEDIUM * 3), ("bg_c1", 3))
        uniforms = (("expression", 7), ("angles", 3), ("translation", 3), ("sh", 11), ("detail_geometry", 3 * Kg),
                    ("detail_albedo", 3 * Ka), ("background", 13))
        return normals, uniforms

    def _raw(self, seeds):
        """(B, N) standard normals and (B, U) uniforms in [0, 1): every random number of each face,
        from the face's own generator seeded by (seed, face seed), two draws per face."""
        normals, uniforms = self._layout_of_draws()
        n_total, u_total = sum(c for _, c in normals), sum(c for _, c in uniforms)
        n, u = np.empty((len(seeds), n_total)), np.empty((len(seeds), u_total))
        for b, face_seed in enumerate(seeds):
            rng = np.random.default_rng([self.seed, face_seed])
            n[b] = rng.standard_normal(n_total)
            u[b] = rng.random(u_total)

        def split(a, layout):
            out, start = {}, 0
            for name, count in layout:
                out[name], start = a[:, start:start + count], start + count
            return out

        return split(n, normals), split(u, uniforms)

    def _draw_batch(self, seeds):
        """The faces' parameters (host, float64, by name) from their random numbers, vectorised."""
        model = self.model
        n, u = self._raw(seeds)
        B = len(seeds)
        d = {"shape": n["shape"], "albedo": n["albedo"]}
        # Expressions: sparser and smaller than identity: a little of everything, and up to three
        # components (the default model's first 22 are named ones: jaw_open, smile, ...) clearly.
        expression = 0.2 * n["expression"]
        ue = u["expression"]
        if model.n_expression:
            which = np.minimum((ue[:, 1:4] * model.n_expression).astype(np.int64), model.n_expression - 1)
            amount = (0.4 + 1.2 * ue[:, 4:7]) * (np.arange(3)[None, :] < np.floor(4.0 * ue[:, 0:1]))
            np.add.at(expression, (np.repeat(np.arange(B), 3), which.ravel()), amount.ravel())
        d["expression"] = expression
        d["angles"] = (2.0 * u["angles"] - 1.0) * np.asarray(ANGLE_RANGE)
        d["translation"] = self.translation + (2.0 * u["translation"] - 1.0) * np.asarray(TRANSLATION_JITTER)
        # Light: an ambient term and one directional light from the front half, slightly tinted.
        us = u["sh"]
        direction = np.stack([2.0 * us[:, 0] - 1.0, -0.3 + 1.3 * us[:, 1], 0.5 + 0.7 * us[:, 2]], axis=1)
        # Tints along the warm-cool (blackbody-like) direction, plus a little of anything: a green or
        # magenta cast of 12%, as drawn before, made faces look ill.
        warm = np.array([1.0, 0.0, -1.0])
        tint = 1.0 + 0.10 * (2.0 * us[:, 5:6] - 1.0) * warm + 0.03 * (2.0 * us[:, 6:9] - 1.0)
        ambient_tint = 1.0 + 0.06 * (2.0 * us[:, 9:10] - 1.0) * warm + 0.02 * (2.0 * us[:, 10:11] - 1.0)
        d["sh"] = _directional_sh_batch(direction, intensity=0.3 + 0.6 * us[:, 3], ambient=0.3 + 0.35 * us[:, 4],
                                        tint=tint, ambient_tint=ambient_tint)
        for name, plan in (("detail_geometry", self._geometry_plan), ("detail_albedo", self._albedo_plan)):
            K = plan.size
            ud = u[name]
            c = plan.coefficients(ud[:, :K], ud[:, K:2 * K], ud[:, 2 * K:], n[name])
            d[name] = c * self.detail_scale if self.detail else np.zeros_like(c)
        # Background: two colours along a random direction, blotches at two scales, fine noise.
        ub = u["background"]
        grey, saturation = 0.05 + 0.9 * ub[:, 0:1], 0.1 + 0.7 * ub[:, 1:2]
        c0 = grey + saturation * (0.03 + 0.94 * ub[:, 2:5] - grey)
        c1 = np.clip(c0 + 0.25 * n["bg_c1"], 0.0, 1.0)
        angle = 2.0 * np.pi * ub[:, 5]
        d["bg_colours"] = np.concatenate([c0, c1, np.cos(angle)[:, None], np.sin(angle)[:, None],
                                          0.3 + 1.2 * ub[:, 6:7]], axis=1)
        d["bg_coarse"] = (n["bg_coarse"] * (0.02 + 0.13 * ub[:, 7:8])).reshape(B, _COARSE, _COARSE, 3)
        d["bg_medium"] = (n["bg_medium"] * (0.08 * ub[:, 8:9])).reshape(B, _MEDIUM, _MEDIUM, 3)
        d["bg_noise"] = np.concatenate([0.06 * ub[:, 9:10], np.floor(_TILE * ub[:, 10:12])], axis=1)
        return d

    def _upload(self, draws):
        """Packs the batch's arrays into one float32 host buffer, moves it to the device once, and
        returns C-contiguous views of it by name (each view starts on a 256-byte boundary)."""
        offsets, total = {}, 0
        for name, a in draws.items():
            offsets[name] = total
            total += -(-a.size // 64) * 64
        host = np.zeros(total, dtype=np.float32)
        for name, a in draws.items():
            host[offsets[name]:offsets[name] + a.size] = a.reshape(-1)
        device = self._xp.asarray(host)
        return {name: device[offsets[name]:offsets[name] + a.size].reshape(a.shape) for name, a in draws.items()}

    def _background(self, a):
        """(B, H, W, 3) backgrounds from the drawn numbers `a` (on the device)."""
        xp = self._xp
        colours = a["bg_colours"]
        B = colours.shape[0]
        c0, c1 = colours[:, None, None, 0:3], colours[:, None, None, 3:6]
        cos, sin, spread = colours[:, 6, None, None], colours[:, 7, None, None], colours[:, 8, None, None]
        t = (0.5 + 0.5 * spread * (cos * self._bg_x[None, None, :] + sin * self._bg_y[None, :, None])).clip(0.0, 1.0)
        bg = c0 + (c1 - c0) * t[..., None]
        for (rows, cols_t), name in zip(self._bg_smooth, ("bg_coarse", "bg_medium")):
            grid = a[name]  # (B, g, g, 3)
            g = grid.shape[1]
            field = rows @ grid.reshape(B, g, g * 3)                       # (B, H, g*3)
            field = field.reshape(B, -1, g, 3).transpose(0, 1, 3, 2) @ cols_t  # (B, H, 3, W)
            bg = bg + field.transpose(0, 1, 3, 2)
        noise = a["bg_noise"]
        rows = (self._bg_rows[None, :] + noise[:, 1:2].astype(np.int32)) % _TILE
        cols = (self._bg_cols[None, :] + noise[:, 2:3].astype(np.int32)) % _TILE
        bg = bg + noise[:, 0, None, None, None] * self._bg_tile[rows[:, :, None], cols[:, None, :]]
        return xp.ascontiguousarray(bg.clip(0.0, 1.0), dtype=np.float32)

    def _with_mouth(self, camera, colours, rotation):
        """Camera-space vertices, colours and triangles with the mouth's interior appended: copies
        of the rim's vertices in shadow (MOUTH_SHADOW times their colour) and one vertex of
        MOUTH_COLOUR, MOUTH_DEPTH behind the rim's mean along the face's own -z axis."""
        xp = self._xp
        B, V = camera.shape[0], camera.shape[1]
        loop = self._mouth_loop
        L = loop.shape[0]
        points = xp.empty((B, V + L + 1, 3), dtype=np.float32)
        points[:, :V] = camera
        points[:, V:V + L] = camera[:, loop]
        points[:, V + L] = points[:, V:V + L].mean(axis=1) - self._mouth_depth * rotation[:, :, 2]
        shaded = xp.empty((B, V + L + 1, 3), dtype=np.float32)
        shaded[:, :V] = colours
        shaded[:, V:V + L] = colours[:, loop] * np.float32(MOUTH_SHADOW)
        shaded[:, V + L] = self._mouth_colour
        return points, shaded, self._triangles_with_mouth

    def draw(self, seeds):
        """The host-side part of `batch(seeds)`: the faces' random parameters, drawn from their seeds (numpy,
        about 2 ms for 64 faces on a slow CPU). A training loop draws the next batch while the GPU runs a
        step and passes the result to `batch`; the faces are the same either way."""
        seeds = _check_seeds(seeds)
        return _Draws(tuple(int(s) for s in seeds), self._draw_batch(seeds))

    def batch(self, seeds, draws=None):
        """Renders the faces of `seeds` (a sequence of non-negative integers, e.g. TRAIN_SEEDS[:8]).

        Args:
            seeds: the faces' seeds.
            draws: optional, `draw(seeds)` made ahead; None draws here.

        Returns:
            `SyntheticBatch`, numpy arrays for a CPU model, cupy arrays for a GPU model.
        """
        seeds = _check_seeds(seeds)
        if draws is None:
            draws = self.draw(seeds)
        elif not isinstance(draws, _Draws) or draws.seeds != tuple(int(s) for s in seeds):
            raise ValueError("draws must be this SyntheticFaces' draw(seeds) of the same seeds")
        model, xp = self.model, self._xp
        B, (H, W), ss = len(seeds), self.resolution, self.supersample
        a = self._upload(draws.arrays)
        V = model.n_vertices
        with value_checks(False):  # every input is made here, finite and in front of the camera
            base_vertices, base_albedo = model.evaluate(a["shape"], a["expression"], a["albedo"])
            detail_vertices = (a["detail_geometry"] @ self.detail_geometry_basis).reshape(B, V, 3)
            detail_vertices += self.population_vertices
            detail_albedo = (a["detail_albedo"] @ self.detail_albedo_basis).reshape(B, V, 3)
            detail_albedo += self.population_albedo
            vertices = base_vertices + detail_vertices
            albedo = base_albedo + detail_albedo
            rotation = euler_rotation(a["angles"])
            camera = rigid_transform(vertices, rotation, a["translation"])
            normals = vertex_normals(camera, model.triangles, adjacency=self._adjacency)
            colours = sh_shade(normals, albedo, a["sh"])
            triangles = model.triangles
            if self._mouth_loop is not None:
                camera, colours, triangles = self._with_mouth(camera, colours, rotation)
            clip = perspective_projection(camera, self.focal * ss, (H * ss, W * ss))
            raster, image = rasterize_interpolate(clip, triangles, (H * ss, W * ss), colours)
            landmarks = project_to_pixels(xp.ascontiguousarray(camera[:, self._landmarks]), self.focal, (H, W))
        # Area average: the image is black where no triangle covers a sample, so the mean of a
        # block is the face's colour times its coverage, and the background fills the rest.
        image = _block_mean(image, ss)
        covered = _block_mean((raster.tri_id >= 0).astype(np.float32)[..., None], ss)[..., 0]
        face = covered
        if self._mouth_loop is not None:  # the face's own surface, without the mouth's interior
            on_face = (raster.tri_id >= 0) & (raster.tri_id < model.n_triangles)
            face = _block_mean(on_face.astype(np.float32)[..., None], ss)[..., 0]
        background = self._background(a)
        images = (image + (1.0 - covered)[..., None] * background).clip(0.0, 1.0)
        params = FaceParameters(shape=a["shape"], expression=a["expression"], albedo=a["albedo"], sh=a["sh"],
                                angles=a["angles"], translation=a["translation"])
        return SyntheticBatch(images=xp.ascontiguousarray(images, dtype=np.float32), mask=face >= 0.5,
                              coverage=xp.ascontiguousarray(face, dtype=np.float32), landmarks=landmarks,
                              vertices=vertices, albedo=albedo, params=params, detail_vertices=detail_vertices,
                              detail_albedo=detail_albedo, background=background,
                              seeds=np.asarray(seeds, dtype=np.int64))


@dataclass(frozen=True)
class _Draws:
    """SyntheticFaces.draw's result: the seeds and the host arrays drawn from them, by name."""
    seeds: tuple
    arrays: dict


def _block_mean(image, ss):
    """(B, H, W, C) means of the ss x ss blocks of (B, ss H, ss W, C): a sum of ss^2 strided views
    (numpy's mean over two non-adjacent axes took 5 ms at 8 x 128 x 128 x 3, this 0.3 ms)."""
    if ss == 1:
        return image
    total = None
    for i in range(ss):
        for j in range(ss):
            part = image[:, i::ss, j::ss]
            total = part.copy() if total is None else total + part
    return total * np.float32(1.0 / (ss * ss))


def _array_module_of(model):
    if is_cupy_array(model.mean_shape):
        from fastface._backend import cupy_or_none  # noqa: PLC0415
        return cupy_or_none()
    return np


def _mouth_loop(triangles, landmarks, n_vertices):
    """The vertices (L,) int64 of the boundary loop through the inner lip landmarks (the rim of the
    mouth's hole), in order, or None when the mesh has no such hole."""
    directed = np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]).astype(np.int64)
    keys = directed[:, 0] * n_vertices + directed[:, 1]
    reverse = directed[:, 1] * n_vertices + directed[:, 0]
    boundary = directed[~np.isin(reverse, keys)]  # an edge whose reverse no triangle has
    following = dict(zip(boundary[:, 0].tolist(), boundary[:, 1].tolist()))
    for start in landmarks[[62, 66, 61, 63, 65, 67]].tolist():
        loop, v = [start], following.get(start)
        while v is not None and v != start and len(loop) <= len(following):
            loop.append(v)
            v = following.get(v)
        # A closed loop, and not the outline (which holds most of the boundary).
        if v == start and 3 <= len(loop) < 0.5 * len(following):
            return np.array(loop, dtype=np.int64)
    return None


def _check_seeds(seeds):
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        raise TypeError(f"seeds must be a sequence of integers (e.g. [{seeds}]); got the integer {seeds!r}")
    try:
        values = [s for s in seeds]
    except TypeError:
        raise TypeError(f"seeds must be a sequence of non-negative integers; got {seeds!r}") from None
    if not values:
        raise ValueError("seeds must hold at least one seed; got an empty sequence")
    for s in values:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise TypeError(f"seeds must hold integers; got {s!r} ({type(s).__name__})")
        if s < 0:
            raise ValueError(f"seeds must be non-negative integers; got {s}")
    return [int(s) for s in values]
