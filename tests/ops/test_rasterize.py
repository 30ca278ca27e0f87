"""Tests of fastface.ops.rasterize: reference, tie rules, gradients, GPU parity, bad input."""
import sys

import numpy as np
import pytest

import fastface
from fastface.ops.interpolate import interpolate, interpolate_backward
from fastface.ops.rasterize import (
    Raster, rasterize, rasterize_backward, rasterize_interpolate, rasterize_interpolate_backward,
)
from tests.cuda_emulation import build_emulated_library
from tests.gradcheck import assert_gradient_matches

from bench.workloads import spherical_cap


# ------------------------------------------------------------------------------------------------
# A slow, obvious float64 reference: every pixel against every triangle, in NDC.
# ------------------------------------------------------------------------------------------------

def cross2(a, b):
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


def reference_rasterize(pos, tri, resolution, cull_backfaces=False):
    """(tri_id, bary, depth) by brute force in float64; pos (B, V, 4)."""
    H, W = resolution
    pos = np.asarray(pos, np.float64)
    B = pos.shape[0]
    X = (2 * (np.arange(W) + 0.5) / W - 1)[None, :].repeat(H, 0)
    Y = (1 - 2 * (np.arange(H) + 0.5) / H)[:, None].repeat(W, 1)
    tri_id = np.full((B, H, W), -1, np.int64)
    bary = np.zeros((B, H, W, 2))
    depth = np.full((B, H, W), np.inf)
    for b in range(B):
        for t, (i0, i1, i2) in enumerate(tri):
            p = pos[b, [i0, i1, i2]]
            if (p[:, 3] <= 0).any():
                continue
            ndc = p[:, :2] / p[:, 3:]
            area = cross2(ndc[1] - ndc[0], ndc[2] - ndc[0])
            if area == 0 or (cull_backfaces and area < 0):
                continue
            # Screen-space barycentrics, then the perspective correction l_k / w_k.
            lam = np.stack([
                cross2(ndc[2] - ndc[1], np.stack([X, Y], -1) - ndc[1]),
                cross2(ndc[0] - ndc[2], np.stack([X, Y], -1) - ndc[2]),
                cross2(ndc[1] - ndc[0], np.stack([X, Y], -1) - ndc[0]),
            ]) / area
            inside = (lam >= 0).all(0)
            z = (lam * (p[:, 2] / p[:, 3])[:, None, None]).sum(0)
            persp = lam / p[:, 3][:, None, None]
            persp = persp / persp.sum(0)
            take = inside & (z >= -1) & (z <= 1) & (z < depth[b])
            tri_id[b][take] = t
            depth[b][take] = z[take]
            bary[b][take] = np.moveaxis(persp[:2], 0, -1)[take]
    return tri_id, bary, depth


def reference_interpolate(attr, tri_id, bary, tri):
    attr = np.asarray(attr, np.float64)
    B = tri_id.shape[0]
    attr3 = attr if attr.ndim == 3 else np.broadcast_to(attr, (B,) + attr.shape)
    out = np.zeros(tri_id.shape + (attr.shape[-1],))
    for b in range(B):
        m = tri_id[b] >= 0
        v = tri[tri_id[b][m]]
        u, w = bary[b][m][:, 0:1], bary[b][m][:, 1:2]
        out[b][m] = u * attr3[b][v[:, 0]] + w * attr3[b][v[:, 1]] + (1 - u - w) * attr3[b][v[:, 2]]
    return out


def bary_fixed(pos, tri, tri_id, resolution):
    """Perspective-correct barycentrics for a fixed tri_id map, float64 (the function that
    rasterize_backward differentiates), by the screen-space formula the reference uses."""
    H, W = resolution
    pos = np.asarray(pos, np.float64)
    X = (2 * (np.arange(W) + 0.5) / W - 1)[None, :].repeat(H, 0)
    Y = (1 - 2 * (np.arange(H) + 0.5) / H)[:, None].repeat(W, 1)
    out = np.zeros(tri_id.shape + (2,))
    for b in range(tri_id.shape[0]):
        m = tri_id[b] >= 0
        p = pos[b][tri[tri_id[b][m]]]  # (n, 3, 4)
        ndc = p[..., :2] / p[..., 3:]
        q = np.stack([X[m], Y[m]], -1)
        lam = np.stack([cross2(ndc[:, 2] - ndc[:, 1], q - ndc[:, 1]),
                        cross2(ndc[:, 0] - ndc[:, 2], q - ndc[:, 2]),
                        cross2(ndc[:, 1] - ndc[:, 0], q - ndc[:, 0])], -1)
        persp = lam / p[..., 3]
        out[b][m] = (persp / persp.sum(-1, keepdims=True))[:, :2]
    return out


# ------------------------------------------------------------------------------------------------
# Inputs.
# ------------------------------------------------------------------------------------------------

def triangle_soup(rng, B=2, T=24, dtype=np.float32):
    """Random overlapping triangles in clip space with w in [0.5, 2] and NDC z in (-0.9, 0.9)."""
    V = 3 * T
    ndc = rng.uniform(-1.2, 1.2, size=(B, V, 2))
    # Keep triangles compact so that they overlap but are not slivers.
    centre = rng.uniform(-0.9, 0.9, size=(B, T, 1, 2))
    ndc = (centre + 0.5 * (ndc.reshape(B, T, 3, 2) - centre)).reshape(B, V, 2)
    z = rng.uniform(-0.9, 0.9, size=(B, V, 1))
    w = rng.uniform(0.5, 2.0, size=(B, V, 1))
    pos = np.concatenate([ndc * w, z * w, w], -1).astype(dtype)
    tri = np.arange(V, dtype=np.int32).reshape(T, 3)
    return pos, tri


def pixel_clip(sx, sy, H, W, z=0.0, w=1.0):
    """Clip position of pixel coordinates (sx, sy) (centres at integers, y down)."""
    x = (np.asarray(sx, np.float64) + 0.5) * 2 / W - 1
    y = 1 - (np.asarray(sy, np.float64) + 0.5) * 2 / H
    z = np.broadcast_to(z, x.shape)
    w = np.broadcast_to(w, x.shape)
    return np.stack([x * w, y * w, z * w, w], -1)


def coverage_count(pos, tri, resolution, **kw):
    """How many triangles cover each pixel, each triangle rasterized alone."""
    count = 0
    for t in range(tri.shape[0]):
        count = count + (rasterize(pos, tri[t:t + 1], resolution, **kw).tri_id >= 0)
    return count


def agreement(tri_id, ref_id):
    covered = (tri_id >= 0) | (ref_id >= 0)
    return (tri_id[covered] == ref_id[covered]).mean()


# ------------------------------------------------------------------------------------------------
# 1. Forward against the reference.
# ------------------------------------------------------------------------------------------------

def test_triangle_soup_matches_reference(rng, tol):
    pos, tri = triangle_soup(rng)
    res = (40, 48)
    raster = rasterize(pos, tri, res)
    ref_id, ref_bary, ref_depth = reference_rasterize(pos, tri, res)
    assert agreement(raster.tri_id, ref_id) >= tol["reference_pixel_agreement"]
    same = (raster.tri_id == ref_id) & (ref_id >= 0)
    assert same.sum() > 0.3 * raster.tri_id.size
    np.testing.assert_allclose(raster.bary[same], ref_bary[same], atol=tol["float32_reference_atol"])
    np.testing.assert_allclose(raster.depth[same], ref_depth[same], atol=tol["raster_depth_atol"])
    assert raster.tri_id.dtype == np.int32 and raster.bary.dtype == np.float32
    assert raster.depth.dtype == np.float32


def test_spherical_cap_matches_reference_and_interpolates_within_tolerance(tol):
    pos, tri, colors = spherical_cap(n=13, batch=3, seed=5)
    res = (36, 36)
    raster = rasterize(pos, tri, res)
    ref_id, ref_bary, _ = reference_rasterize(pos, tri, res)
    assert agreement(raster.tri_id, ref_id) >= tol["reference_pixel_agreement"]
    assert 0.5 < (raster.tri_id >= 0).mean() < 0.95
    both = (raster.tri_id >= 0) & (ref_id >= 0)
    img = interpolate(colors, raster, tri)
    ref_img = reference_interpolate(colors, np.where(ref_id >= 0, ref_id, -1), ref_bary, tri)
    assert np.abs(img[both] - ref_img[both]).max() <= tol["reference_attr_atol"]
    assert (img[raster.tri_id < 0] == 0).all()


def test_empty_pixels_hold_documented_values():
    pos, tri, _ = spherical_cap(n=5, batch=1)
    raster = rasterize(pos, tri, (16, 16))
    empty = raster.tri_id < 0
    assert empty.any() and (~empty).any()
    assert (raster.bary[empty] == 0).all()
    assert np.isposinf(raster.depth[empty]).all()
    assert np.isfinite(raster.depth[~empty]).all()


# ------------------------------------------------------------------------------------------------
# Tie rules: shared edges and vertices, depth order, equal depths.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("diagonal", ["main", "anti"])
@pytest.mark.parametrize("winding", ["ccw", "cw"])
def test_shared_edge_pixel_covered_exactly_once(diagonal, winding):
    H = W = 8
    corners = pixel_clip([-0.5, 7.5, 7.5, -0.5], [7.5, 7.5, -0.5, -0.5], H, W).astype(np.float32)
    # Both diagonals pass exactly through pixel centres (x + y = 7, and x = y).
    tri = np.array([[0, 1, 2], [0, 2, 3]] if diagonal == "main" else [[0, 1, 3], [1, 2, 3]], np.int32)
    if winding == "cw":
        tri = tri[:, ::-1].copy()
    count = coverage_count(corners, tri, (H, W))
    assert (count == 1).all()
    raster = rasterize(corners, tri, (H, W))
    assert (raster.tri_id >= 0).all()


def test_fan_around_a_pixel_centre_covers_every_pixel_once():
    H = W = 9
    # Spokes from the centre pixel (4, 4) through pixel centres in 8 directions, far off screen.
    dirs = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
    sx = [4] + [4 + 64 * dx for dx, _ in dirs]
    sy = [4] + [4 + 64 * dy for _, dy in dirs]
    pos = pixel_clip(sx, sy, H, W).astype(np.float32)
    tri = np.array([[0, 1 + k, 1 + (k + 1) % 8] for k in range(8)], np.int32)
    for t in (tri, tri[:, ::-1].copy()):
        assert (coverage_count(pos, t, (H, W)) == 1).all()


@pytest.mark.parametrize("perspective", [False, True])
def test_grid_mesh_covering_the_screen_has_no_holes_and_no_double_cover(rng, perspective):
    H, W = 14, 13
    # Vertices at integer pixel coordinates (on pixel centres), spacing 4, jittered by an integer,
    # extending past the screen; each cell split along a random diagonal.
    gx, gy = np.meshgrid(np.arange(-4, W + 5, 4), np.arange(-4, H + 5, 4))
    n_r, n_c = gx.shape
    sx = gx + rng.integers(-1, 2, gx.shape) * (gx > -4) * (gx < gx.max())
    sy = gy + rng.integers(-1, 2, gy.shape) * (gy > -4) * (gy < gy.max())
    w = rng.uniform(0.5, 2.0, sx.shape) if perspective else 1.0
    pos = pixel_clip(sx, sy, H, W, z=rng.uniform(-0.5, 0.5, sx.shape), w=w).reshape(-1, 4).astype(np.float32)
    tris = []
    for r in range(n_r - 1):
        for c in range(n_c - 1):
            a, b, d, e = r * n_c + c, r * n_c + c + 1, (r + 1) * n_c + c, (r + 1) * n_c + c + 1
            tris += [[a, b, e], [a, e, d]] if rng.random() < 0.5 else [[a, b, d], [b, e, d]]
    tri = np.array(tris, np.int32)
    count = coverage_count(pos, tri, (H, W))
    assert (count == 1).all(), f"{(count == 0).sum()} holes, {(count > 1).sum()} pixels covered twice"


def test_nearer_triangle_wins_whatever_the_order(tol):
    H = W = 6
    far = pixel_clip([-10, 40, -10], [-10, -10, 40], H, W, z=0.5)
    near = pixel_clip([-10, 40, -10], [-10, -10, 40], H, W, z=-0.2, w=2.0)
    pos = np.concatenate([far, near]).astype(np.float32)
    for tri in (np.array([[0, 1, 2], [3, 4, 5]], np.int32), np.array([[3, 4, 5], [0, 1, 2]], np.int32)):
        raster = rasterize(pos, tri, (H, W))
        near_id = int(np.nonzero(tri[:, 0] == 3)[0][0])
        assert (raster.tri_id == near_id).all()
        np.testing.assert_allclose(raster.depth, -0.2, atol=tol["float32_reference_atol"])


def test_equal_depths_go_to_the_lower_triangle_id():
    H = W = 6
    pos = pixel_clip([-10, 40, -10], [-10, -10, 40], H, W, z=0.3).astype(np.float32)
    tri = np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]], np.int32)
    assert (rasterize(pos, tri, (H, W)).tri_id == 0).all()
    assert (rasterize(pos, tri[::-1].copy(), (H, W)).tri_id == 0).all()


def test_horizontal_edge_through_a_row_of_centres_goes_to_the_triangle_below():
    # Two triangles share a horizontal edge lying exactly on pixel row 3. The top-left rule gives a
    # horizontal edge's centres to the triangle for which it is a top edge: the one below it (y
    # grows downwards in the pixel frame), whatever the winding.
    H = W = 8
    pos = pixel_clip([-10, 30, -10, 30], [-10, -10, 3, 3], H, W)  # top-left, top-right, mid-left, mid-right
    pos = np.concatenate([pos, pixel_clip([-10, 30], [30, 30], H, W)]).astype(np.float32)
    above = [0, 2, 3]
    below = [2, 4, 3]
    for tris in ([above, below], [below, above]):
        for winding in (1, -1):
            tri = np.array([t[::winding] for t in tris], np.int32)
            raster = rasterize(pos, tri, (H, W))
            below_id = tris.index(below)
            assert (raster.tri_id[0, 3] == below_id).all(), raster.tri_id[0]
            assert (raster.tri_id[0, :3] == 1 - below_id).all() and (raster.tri_id[0, 4:] == below_id).all()
            assert (coverage_count(pos, tri, (H, W)) == 1).all()


def test_triangle_exactly_on_the_near_plane_is_kept():
    # z = -w at every corner: NDC z = -1 exactly, on the near plane, which is inside ([-1, 1]).
    H = W = 6
    for w in (1.0, 2.0, 0.5):
        pos = pixel_clip([-10, 40, -10], [-10, -10, 40], H, W, z=-1.0, w=w).astype(np.float32)
        raster = rasterize(pos, np.array([[0, 1, 2]], np.int32), (H, W))
        assert (raster.tri_id == 0).all() and (raster.depth == -1).all()
    # Just in front of it (z < -w), the fragments are dropped.
    pos = pixel_clip([-10, 40, -10], [-10, -10, 40], H, W, z=-1.0).astype(np.float32)
    pos[:, 2] = np.nextafter(np.float32(-1), np.float32(-2))
    assert (rasterize(pos, np.array([[0, 1, 2]], np.int32), (H, W)).tri_id == -1).all()


def test_coplanar_plus_and_minus_zero_depths_tie_to_the_lower_triangle_id():
    # The same triangle twice, at depth +0 (id 0) and -0 (id 1): -0 and +0 are the same depth, so the
    # tie goes to the lower id. Without folding -0 onto +0 the key of -0 would sort first.
    H = W = 6
    plus = pixel_clip([-10, 40, -10], [-10, -10, 40], H, W, z=0.0).astype(np.float32)
    minus = plus.copy()
    minus[:, 2] = -0.0
    pos = np.concatenate([plus, minus])
    for tri in (np.array([[0, 1, 2], [3, 4, 5]], np.int32), np.array([[3, 4, 5], [0, 1, 2]], np.int32)):
        raster = rasterize(pos, tri, (H, W))
        assert (raster.tri_id == 0).all()
        assert (raster.depth == 0).all()


# ------------------------------------------------------------------------------------------------
# The reproducers of issue 10 and what they pin: exact coverage (fixed point), no silent loss at
# extreme coordinates (guard-band clipping), precise barycentrics on grazing triangles.
# ------------------------------------------------------------------------------------------------

# Three triangles around vertex 0, which lies within 3e-7 pixel of the centre of pixel (4, 3) of 8 x 8.
ISSUE_FAN_POS = np.array([[-0.12499994, -0.124999948, 0, 1], [0.470597565, -0.364754915, 0, 1],
                          [-0.384724975, -0.845493376, 0, 1], [-0.877177238, 0.225146353, 0, 1]], np.float32)
ISSUE_FAN_TRI = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 1]], np.int32)
# A triangle with a corner at w = 1e-37 (NDC 3e36), every w > 0: 1,040 pixels of 64 x 64.
ISSUE_TINY_W_POS = np.array([[0.3, 0.3, 0, 1e-37], [-0.5, -0.5, 0, 1], [0.5, -0.5, 0, 1]], np.float32)


def exact_coverage(pos, tri, resolution):
    """Coverage of each pixel centre by each triangle, in float64 homogeneous form (no division, so any
    w > 0 works), and each centre's distance in pixels to the nearest edge of its triangle.

    Returns (inside (T, H, W) bool, distance (T, H, W)); W and H powers of two keep the pixel NDC exact.
    """
    H, W = resolution
    p = np.asarray(pos, np.float64)[:, [0, 1, 3]]
    X = (2 * np.arange(W) + 1 - W) / W
    Y = (H - 2 * np.arange(H) - 1) / H
    q = np.stack(np.broadcast_arrays(X[None, :], Y[:, None], 1.0), -1)  # (H, W, 3)
    inside, dist = [], []
    for t in tri:
        lines = [np.cross(p[t[(k + 1) % 3]], p[t[(k + 2) % 3]]) for k in range(3)]
        sign = np.sign(lines[2] @ p[t[2]])
        vals = np.stack([q @ ln for ln in lines]) * sign                # (3, H, W)
        scale = np.stack([np.hypot(ln[0] * 2 / W, ln[1] * 2 / H) for ln in lines])[:, None, None]
        inside.append((vals >= 0).all(0))
        dist.append((np.abs(vals) / scale).min(0))
    return np.array(inside), np.array(dist)


def test_issue_fan_reproducer_covers_the_pixel_at_the_vertex_exactly_once():
    count = coverage_count(ISSUE_FAN_POS, ISSUE_FAN_TRI, (8, 8))
    assert count[0, 4, 3] == 1, "the pixel centre at the shared vertex"
    inside, dist = exact_coverage(ISSUE_FAN_POS, ISSUE_FAN_TRI, (8, 8))
    # Elsewhere, exactly the pixels the exact triangles cover, up to snapping next to an edge.
    exact = inside.sum(0)
    assert (count[0] == exact)[dist.min(0) > 1.0 / 64].all()
    assert (count <= 1).all()


@pytest.mark.parametrize("scale", [1e6, 1e7, 1e12, 1e19, 1e30])
def test_huge_coordinates_cover_what_the_exact_triangle_covers(rng, tol, scale):
    res = (64, 64)
    tri = np.array([[0, 1, 2]], np.int32)
    fractions = []
    for _ in range(12):
        # Corners at NDC +-scale, the edge from corner 0 to corner 1 through a random point of the screen.
        c, d = rng.uniform(-0.8, 0.8, 2), rng.normal(size=2)
        d /= np.linalg.norm(d)
        far = rng.normal(size=2)
        ndc = np.array([c + scale * d, c - scale * (d + 1e-3 * rng.normal(size=2)), scale * far / np.linalg.norm(far)])
        pos = np.concatenate([ndc, np.zeros((3, 1)), np.ones((3, 1))], 1).astype(np.float32)
        got = rasterize(pos, tri, res).tri_id[0] == 0
        inside, dist = exact_coverage(pos, tri, res)
        wrong = got != inside[0]
        assert (dist[0][wrong] <= tol["snapped_coverage_px"]).all(), dist[0][wrong].max()
        fractions.append(got.mean())
    assert 0.2 < np.mean(fractions) < 0.8  # the edges do cross the screen


def test_screen_covering_triangle_at_1e19_covers_the_whole_screen():
    for s in (1e19, 1e30, 3e38):
        pos = np.array([[-s, -s, 0, 1], [s, -s, 0, 1], [0, s, 0, 1]], np.float32)
        for tri in (np.array([[0, 1, 2]], np.int32), np.array([[2, 1, 0]], np.int32)):
            raster = rasterize(pos, tri, (64, 64))
            assert (raster.tri_id == 0).all() and (raster.depth == 0).all()


def test_corner_near_the_camera_plane_is_clipped_not_dropped(tol):
    tri = np.array([[0, 1, 2]], np.int32)
    raster = rasterize(ISSUE_TINY_W_POS, tri, (64, 64))
    inside, dist = exact_coverage(ISSUE_TINY_W_POS, tri, (64, 64))
    # 1,040 as the issue's float64 path counts; the exact closed triangle also holds the 16 centres on
    # its edge x = y (the line to the far corner), which the top-left rule gives to a neighbour.
    assert (raster.tri_id[0] >= 0).sum() == 1040
    wrong = (raster.tri_id[0] >= 0) != inside[0]
    assert wrong.sum() == 16 and (dist[0][wrong] == 0).all()
    # The barycentrics reproject onto the pixel centres, and the depth is the plane's (z = 0).
    assert (raster.depth[0][raster.tri_id[0] >= 0] == 0).all()
    assert _max_reprojection_px(ISSUE_TINY_W_POS, raster, (64, 64)) <= tol["bary_reprojection_px"]


def test_clipped_fan_stays_watertight_across_the_guard_band():
    # A fan whose rim lies far beyond the guard band (and one rim vertex near the camera plane):
    # every triangle is clipped, and the shared edges must still cover each centre once.
    H = W = 16
    angles = np.linspace(0, 2 * np.pi, 7, endpoint=False) + 0.3
    for radius in (1e5, 1e9, 1e20):
        ndc = np.concatenate([[[0.01, -0.02]], radius * np.stack([np.cos(angles), np.sin(angles)], -1)])
        w = np.ones(len(ndc))
        w[3] = 1e-30
        pos = np.concatenate([ndc * w[:, None], np.zeros((len(ndc), 1)), w[:, None]], 1).astype(np.float32)
        tri = np.array([[0, 1 + k, 1 + (k + 1) % 7] for k in range(7)], np.int32)
        assert (coverage_count(pos, tri, (H, W)) == 1).all()


def grazing_triangle(rng, delta):
    """Three clip positions on a plane passing at distance delta from the camera centre (the origin of
    (x, y, w)): the triangle is seen nearly edge-on. The plane holds the ray of a random screen point
    d and a random direction e."""
    d = np.array([rng.uniform(-0.8, 0.8), rng.uniform(-0.8, 0.8), 1.0])
    e = rng.normal(size=3)
    e -= (e @ d) / (d @ d) * d
    e /= np.linalg.norm(e)
    n = np.cross(d, e)
    n /= np.linalg.norm(n)
    pts = np.array([d * rng.uniform(0.5, 5) + e * rng.uniform(-1, 1) + n * delta for _ in range(3)])
    return np.stack([pts[:, 0], pts[:, 1], np.zeros(3), pts[:, 2]], 1).astype(np.float32)


def _reprojection_px(pos, raster, resolution, bary=None):
    """Per covered pixel, the distance in pixels between its centre and the screen point of its
    barycentrics (raster.bary, or `bary` (n, 2) in the covered pixels' order): sum b_k p_k projected
    in float64, b_2 = 1 - u - v in float64."""
    H, W = resolution
    ii, jj = np.nonzero(raster.tri_id[0] >= 0)
    b = raster.bary[0, ii, jj] if bary is None else bary
    u, v = b[:, 0].astype(np.float64), b[:, 1].astype(np.float64)
    p = np.asarray(pos, np.float64)
    P = u[:, None] * p[0] + v[:, None] * p[1] + (1 - u - v)[:, None] * p[2]
    sx = (P[:, 0] / P[:, 3] + 1) * W / 2 - 0.5
    sy = (1 - P[:, 1] / P[:, 3]) * H / 2 - 0.5
    return np.hypot(sx - jj, sy - ii)


def _max_reprojection_px(pos, raster, resolution):
    e = _reprojection_px(pos, raster, resolution)
    return e.max() if len(e) else 0.0


def test_barycentrics_of_grazing_triangles_reproject_within_1e_5_pixel_of_the_rounded_exact_ones(rng, tol):
    # Rounding even the exact weights to float32 moves the reprojection by up to L * w_max / w_min ulps
    # (L the triangle's length on screen): the test holds the rasterizer to that plus 1e-5 pixel.
    tri = np.array([[0, 1, 2]], np.int32)
    worst, n = 0.0, 0
    for _ in range(300):
        pos = grazing_triangle(rng, 10 ** rng.uniform(-5, -1))
        raster = rasterize(pos, tri, (64, 64))
        if not (raster.tri_id >= 0).any():
            continue
        exact = bary_fixed(pos[None], tri, raster.tri_id, (64, 64))[0][raster.tri_id[0] >= 0]
        rounded = _reprojection_px(pos, raster, (64, 64), exact.astype(np.float32))
        worst = max(worst, (_reprojection_px(pos, raster, (64, 64)) - rounded).max())
        n += len(rounded)
    assert n > 100
    assert worst <= tol["bary_reprojection_px"], worst


# ------------------------------------------------------------------------------------------------
# Dropped triangles and fragments, culling.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("w_bad", [0.0, -1.0])
def test_triangle_with_a_vertex_at_w_not_positive_is_dropped(w_bad):
    H = W = 8
    pos = pixel_clip([-10, 40, -10], [-10, -10, 40], H, W).astype(np.float32)
    assert (rasterize(pos, np.array([[0, 1, 2]], np.int32), (H, W)).tri_id == 0).all()
    pos[1, 3] = w_bad
    if w_bad == 0.0:
        pos[1, :3] = 0.0
    assert (rasterize(pos, np.array([[0, 1, 2]], np.int32), (H, W)).tri_id == -1).all()


def test_fragments_outside_the_depth_range_are_dropped():
    H = W = 8
    # NDC z goes from -1.5 at the left to 1.5 at the right: only the middle columns survive.
    pos = pixel_clip([-0.5, 7.5, 7.5, -0.5], [7.5, 7.5, -0.5, -0.5], H, W,
                     z=np.array([-1.5, 1.5, 1.5, -1.5])).astype(np.float32)
    tri = np.array([[0, 1, 2], [0, 2, 3]], np.int32)
    raster = rasterize(pos, tri, (H, W))
    z_centre = -1.5 + 3.0 * (np.arange(W) + 0.5) / W
    expected = np.abs(z_centre) <= 1
    assert ((raster.tri_id[0] >= 0) == expected[None, :]).all()


def test_backface_culling_drops_clockwise_triangles():
    H = W = 8
    pos = pixel_clip([-10, 40, -10], [30, 30, -20], H, W).astype(np.float32)
    ccw = np.array([[0, 1, 2]], np.int32)  # y-up screen: bottom-left, bottom-right, top-left
    cw = ccw[:, ::-1].copy()
    assert (rasterize(pos, ccw, (H, W), cull_backfaces=True).tri_id == 0).all()
    assert (rasterize(pos, cw, (H, W), cull_backfaces=True).tri_id == -1).all()
    assert (rasterize(pos, cw, (H, W)).tri_id == 0).all()


def test_spherical_cap_is_front_facing():
    pos, tri, _ = spherical_cap(n=9, batch=2)
    full = rasterize(pos, tri, (24, 24))
    culled = rasterize(pos, tri, (24, 24), cull_backfaces=True)
    np.testing.assert_array_equal(full.tri_id, culled.tri_id)


def test_cull_matches_reference(rng, tol):
    pos, tri = triangle_soup(rng, B=1, T=16)
    ref_id, _, _ = reference_rasterize(pos, tri, (32, 32), cull_backfaces=True)
    raster = rasterize(pos, tri, (32, 32), cull_backfaces=True)
    assert agreement(raster.tri_id, ref_id) >= tol["reference_pixel_agreement"]


# ------------------------------------------------------------------------------------------------
# Batch of one, float64, fused path.
# ------------------------------------------------------------------------------------------------

def test_unbatched_positions_give_a_batch_of_one():
    pos, tri, _ = spherical_cap(n=7, batch=1)
    r1 = rasterize(pos[0], tri, (16, 20))
    r2 = rasterize(pos, tri, (16, 20))
    assert r1.tri_id.shape == (1, 16, 20) and r1.bary.shape == (1, 16, 20, 2)
    np.testing.assert_array_equal(r1.tri_id, r2.tri_id)
    np.testing.assert_array_equal(r1.bary, r2.bary)
    g = rasterize_backward(pos[0], tri, r1, np.ones((1, 16, 20, 2), np.float32))
    assert g.shape == pos[0].shape


def test_float64_positions_give_float64_barycentrics_close_to_float32(tol):
    pos, tri, _ = spherical_cap(n=9, batch=2)
    r32 = rasterize(pos, tri, (24, 24))
    r64 = rasterize(pos.astype(np.float64), tri, (24, 24))
    assert r64.bary.dtype == np.float64 and r64.depth.dtype == np.float64
    same = (r32.tri_id == r64.tri_id) & (r32.tri_id >= 0)
    assert same.mean() > 0.99 * (r32.tri_id >= 0).mean()
    np.testing.assert_allclose(r64.bary[same], r32.bary[same], atol=tol["float32_reference_atol"])


def test_fused_rasterize_interpolate_equals_the_two_calls(rng):
    pos, tri, colors = spherical_cap(n=9, batch=2)
    for attr in (colors, rng.uniform(size=(2,) + colors.shape).astype(np.float32), colors[:, :1].copy()):
        raster, img = rasterize_interpolate(pos, tri, (20, 24), attr)
        ref = rasterize(pos, tri, (20, 24))
        np.testing.assert_array_equal(raster.tri_id, ref.tri_id)
        np.testing.assert_array_equal(raster.bary, ref.bary)
        np.testing.assert_array_equal(raster.depth, ref.depth)
        np.testing.assert_array_equal(img, interpolate(attr, ref, tri))


def test_band_split_gives_the_same_result_as_whole_images():
    # One image is split into row bands over the CPU threads; two images are not (with 2 threads).
    pos, tri, colors = spherical_cap(n=11, batch=2, seed=3)
    both = rasterize(pos, tri, (23, 19))
    for b in range(2):
        one = rasterize(pos[b], tri, (23, 19))
        np.testing.assert_array_equal(one.tri_id[0], both.tri_id[b])
        np.testing.assert_array_equal(one.bary[0], both.bary[b])


@pytest.mark.parametrize("n_bands", [2, 3, 5])
def test_row_band_sums_of_the_backward_equal_whole_images(rng, monkeypatch, n_bands):
    # With fewer images than CPU threads the backward splits each image into row bands, each with its
    # own accumulators that the caller sums (per image for per-image attributes). On a two-core
    # machine a batch of 2 or more never splits, so the band count is forced here.
    module = sys.modules["fastface.ops.rasterize"]
    pos, tri, colors = _perturbed_cap(rng, n=9, batch=3)
    res = (15, 17)
    per_image = rng.uniform(size=(3,) + colors.shape)
    grad_bary = rng.standard_normal((3,) + res + (2,))
    monkeypatch.setattr(module, "_n_bands", lambda B, H: 1)
    whole = []
    for attr in (per_image, colors):
        raster, img = rasterize_interpolate(pos, tri, res, attr)
        grad_out = rng.standard_normal(img.shape)
        whole.append((attr, raster, grad_out, rasterize_interpolate_backward(pos, tri, attr, raster, grad_out)))
    whole_bary = rasterize_backward(pos, tri, whole[0][1], grad_bary)
    monkeypatch.setattr(module, "_n_bands", lambda B, H: n_bands)
    f64 = dict(rtol=1e-12, atol=1e-12)
    for attr, raster, grad_out, (want_pos, want_attr) in whole:
        banded_raster, img = rasterize_interpolate(pos, tri, res, attr)
        np.testing.assert_array_equal(banded_raster.tri_id, raster.tri_id)
        np.testing.assert_array_equal(banded_raster.bary, raster.bary)
        grad_pos, grad_attr = rasterize_interpolate_backward(pos, tri, attr, raster, grad_out)
        assert grad_attr.shape == attr.shape
        np.testing.assert_allclose(grad_pos, want_pos, **f64)
        np.testing.assert_allclose(grad_attr, want_attr, **f64)
    np.testing.assert_allclose(rasterize_backward(pos, tri, whole[0][1], grad_bary), whole_bary, **f64)


# ------------------------------------------------------------------------------------------------
# 2. Backward against central differences (float64).
# ------------------------------------------------------------------------------------------------

def _perturbed_cap(rng, n=7, batch=2):
    pos, tri, colors = spherical_cap(n=n, batch=batch, seed=11)
    pos = pos.astype(np.float64)
    pos[..., 3] *= rng.uniform(0.9, 1.1, size=pos.shape[:2])  # vary w so all its terms matter
    return pos, tri, colors.astype(np.float64)


def test_rasterize_backward_matches_finite_differences(rng, tol):
    pos, tri, _ = _perturbed_cap(rng)
    res = (14, 16)
    raster = rasterize(pos, tri, res)
    grad_bary = rng.standard_normal(raster.bary.shape)
    grad_pos = rasterize_backward(pos, tri, raster, grad_bary)
    assert grad_pos.shape == pos.shape and grad_pos.dtype == np.float64
    assert (grad_pos[..., 2] == 0).all()
    tri_id = raster.tri_id
    assert_gradient_matches(lambda p: bary_fixed(p, tri, tri_id, res), pos, grad_bary, grad_pos, tol,
                            n_samples=60, rng=rng)


def test_fused_backward_matches_finite_differences_and_the_two_backward_calls(rng, tol):
    pos, tri, colors = _perturbed_cap(rng)
    res = (12, 14)
    for attr in (colors, rng.uniform(size=(2,) + colors.shape)):
        raster, img = rasterize_interpolate(pos, tri, res, attr)
        grad_out = rng.standard_normal(img.shape)
        grad_pos, grad_attr = rasterize_interpolate_backward(pos, tri, attr, raster, grad_out)
        ga2, grad_bary = interpolate_backward(attr, raster, tri, grad_out)
        f64 = dict(rtol=tol["float64_reference_rtol"], atol=tol["float64_reference_atol"])
        np.testing.assert_allclose(grad_attr, ga2, **f64)
        np.testing.assert_allclose(grad_pos, rasterize_backward(pos, tri, raster, grad_bary), **f64)
        tri_id = raster.tri_id

        def image_of_pos(p):
            r = Raster(tri_id, bary_fixed(p, tri, tri_id, res), raster.depth)
            return interpolate(attr, r, tri)

        assert_gradient_matches(image_of_pos, pos, grad_out, grad_pos, tol, n_samples=40, rng=rng)
        assert_gradient_matches(lambda a: interpolate(a, raster, tri), attr, grad_out, grad_attr, tol,
                                n_samples=40, rng=rng)


# ------------------------------------------------------------------------------------------------
# 3. GPU against CPU.
# ------------------------------------------------------------------------------------------------

def _assert_rasters_match(gpu, cpu, tol):
    tri_id = gpu.tri_id.get()
    covered = (tri_id >= 0) | (cpu.tri_id >= 0)
    mismatch = (tri_id != cpu.tri_id)[covered].mean()
    assert mismatch <= tol["gpu_cpu_tri_id_mismatch"], f"{mismatch:.2e} of covered pixels differ"
    same = tri_id == cpu.tri_id
    np.testing.assert_allclose(gpu.bary.get()[same], cpu.bary[same], rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])
    np.testing.assert_allclose(gpu.depth.get()[same], cpu.depth[same], rtol=tol["gpu_cpu_rtol"],
                               atol=tol["gpu_cpu_atol"])
    return same


def _assert_scatter_close(got, ref, tol):
    """Sums of many terms in another order (atomics): relative to the largest entry."""
    np.testing.assert_allclose(got, ref, rtol=tol["gpu_cpu_scatter_rtol"],
                               atol=tol["gpu_cpu_scatter_atol_of_max"] * np.abs(ref).max())


# (_FWD_BLOCK, _FWD_IMAGES_PER_THREAD, _FWD_PREPASS) against the library's defaults.
@pytest.mark.parametrize("launch", [(128, 3, True), (512, 2, False), (256, 1, True)])
def test_gpu_triangle_pass_launch_options_give_the_same_rasters(cupy, monkeypatch, launch):
    mod = sys.modules[rasterize.__module__]  # the module, which fastface.ops shadows with the function
    pos, tri = spherical_cap(n=41, batch=4, seed=3)[:2]
    ref = rasterize(cupy.asarray(pos), cupy.asarray(tri), (64, 72))
    for name, value in zip(("_FWD_BLOCK", "_FWD_IMAGES_PER_THREAD", "_FWD_PREPASS"), launch):
        monkeypatch.setattr(mod, name, value)
    got = rasterize(cupy.asarray(pos), cupy.asarray(tri), (64, 72))
    for a, b in zip((got.tri_id, got.bary, got.depth), (ref.tri_id, ref.bary, ref.depth)):
        np.testing.assert_array_equal(a.get(), b.get())


@pytest.mark.parametrize("cull", [False, True])
def test_gpu_rasterize_matches_cpu(cupy, rng, tol, cull):
    for pos, tri in (spherical_cap(n=41, batch=4, seed=2)[:2], triangle_soup(rng, B=3, T=60)):
        cpu = rasterize(pos, tri, (64, 72), cull_backfaces=cull)
        gpu = rasterize(cupy.asarray(pos), cupy.asarray(tri), (64, 72), cull_backfaces=cull)
        assert isinstance(gpu.tri_id, cupy.ndarray) and gpu.bary.dtype == np.float32
        _assert_rasters_match(gpu, cpu, tol)


def issue_10_cases(rng):
    """The cases of issue 10 (the tests above pin each on the CPU), as (name, pos, tri, resolution):
    the fan with a vertex within 3e-7 pixel of a centre, a horizontal edge on a row of centres, a
    triangle on the near plane, +0 against -0 depths, huge coordinates, a screen-covering triangle at
    1e19, a corner at w = 1e-37 and a clipped fan (the guard-band clipper), grazing triangles (the
    float64 barycentrics). tests/test_gpu_paths_emulated.py runs them through the GPU path's host
    emulation, the test below on a GPU."""
    one = np.array([[0, 1, 2]], np.int32)
    cases = [("fan at a vertex", ISSUE_FAN_POS, ISSUE_FAN_TRI, (8, 8)),
             ("corner at w = 1e-37", ISSUE_TINY_W_POS, one, (64, 64))]
    edge = np.concatenate([pixel_clip([-10, 30, -10, 30], [-10, -10, 3, 3], 8, 8),
                           pixel_clip([-10, 30], [30, 30], 8, 8)]).astype(np.float32)
    cases.append(("horizontal edge", edge, np.array([[0, 2, 3], [2, 4, 3]], np.int32), (8, 8)))
    cases.append(("near plane", pixel_clip([-10, 40, -10], [-10, -10, 40], 6, 6, z=-1.0).astype(np.float32), one,
                  (6, 6)))
    plus = pixel_clip([-10, 40, -10], [-10, -10, 40], 6, 6, z=0.0).astype(np.float32)
    minus = plus.copy()
    minus[:, 2] = -0.0
    cases.append(("+0 and -0", np.concatenate([minus, plus]), np.array([[0, 1, 2], [3, 4, 5]], np.int32), (6, 6)))
    for s in (1e6, 1e19):
        pos = np.array([[-s, -0.3 * s, 0.2, 1], [s, -s, -0.1, 1], [0.1, s, 0.5, 1]], np.float32)
        cases.append((f"huge {s:g}", pos, one, (32, 40)))
    angles = np.linspace(0, 2 * np.pi, 7, endpoint=False) + 0.3
    ndc = np.concatenate([[[0.01, -0.02]], 1e9 * np.stack([np.cos(angles), np.sin(angles)], -1)])
    w = np.ones(len(ndc))
    w[3] = 1e-30
    fan = np.concatenate([ndc * w[:, None], rng.uniform(-0.5, 0.5, (len(ndc), 1)) * w[:, None], w[:, None]], 1)
    cases.append(("clipped fan", fan.astype(np.float32),
                  np.array([[0, 1 + k, 1 + (k + 1) % 7] for k in range(7)], np.int32), (16, 16)))
    grazing = np.stack([grazing_triangle(rng, 10 ** rng.uniform(-5, -1)) for _ in range(12)])
    cases.append(("grazing", grazing, one, (64, 64)))
    # Triangles whose vertices lie just within, at and just beyond 64 pixels of each other (the GPU
    # steps their edge values in int below that, in long long from it), one spanning the screen and
    # a long sliver: with too wide an int range the edge values of the large ones would overflow.
    big = [pixel_clip([10, 10 + e, 10], [20, 20 + 0.3 * e, 20 + e], 256, 256, z=0.1) for e in (63.99, 64.0, 64.01)]
    big.append(pixel_clip([-3, 258, 100], [-2, 30, 259], 256, 256, z=0.2))
    big.append(pixel_clip([0.5, 255.5, 255.2], [3.2, 250.1, 250.6], 256, 256, z=0.3))
    cases.append(("int and long long edge values", np.concatenate(big).astype(np.float32),
                  np.arange(15, dtype=np.int32).reshape(5, 3), (256, 256)))
    return cases


@pytest.mark.parametrize("prepass", [False, True])
def test_gpu_rasterize_gives_the_cpu_triangle_ids_on_the_issue_10_cases(cupy, rng, tol, monkeypatch, prepass):
    # The same integer algorithm on both: identical ids, even at vertices, on edges and after clipping.
    monkeypatch.setattr(sys.modules["fastface.ops.rasterize"], "_FWD_PREPASS", prepass)
    for name, pos, tri, res in issue_10_cases(rng):
        cpu = rasterize(pos, tri, res)
        gpu = rasterize(cupy.asarray(pos), cupy.asarray(tri), res)
        np.testing.assert_array_equal(gpu.tri_id.get(), cpu.tri_id, err_msg=name)
        np.testing.assert_allclose(gpu.bary.get(), cpu.bary, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
        np.testing.assert_allclose(gpu.depth.get(), cpu.depth, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])


def test_gpu_rasterize_interpolate_and_batch_of_one_match_cpu(cupy, tol):
    pos, tri, colors = spherical_cap(n=41, batch=3, seed=4)
    for p in (pos, pos[0]):
        for attr in (colors, colors[:, :2].copy(), np.repeat(colors, 3, axis=1)):  # C = 3, 2 and 9 (runtime)
            cpu_r, cpu_img = rasterize_interpolate(p, tri, (48, 40), attr)
            with fastface.value_checks(False):
                gpu_r, gpu_img = rasterize_interpolate(cupy.asarray(p), cupy.asarray(tri), (48, 40), cupy.asarray(attr))
            same = _assert_rasters_match(gpu_r, cpu_r, tol)
            np.testing.assert_allclose(gpu_img.get()[same], cpu_img[same], rtol=tol["gpu_cpu_rtol"],
                                       atol=tol["gpu_cpu_atol"])


def test_gpu_rasterize_backward_matches_cpu(cupy, rng, tol):
    pos, tri, colors = spherical_cap(n=41, batch=2, seed=6)
    raster = rasterize(pos, tri, (56, 56))
    grad_bary = rng.standard_normal(raster.bary.shape).astype(np.float32)
    cpu = rasterize_backward(pos, tri, raster, grad_bary)
    graster = Raster(*(cupy.asarray(a) for a in (raster.tri_id, raster.bary, raster.depth)))
    gpu = rasterize_backward(cupy.asarray(pos), cupy.asarray(tri), graster, cupy.asarray(grad_bary))
    _assert_scatter_close(gpu.get(), cpu, tol)
    gpu1 = rasterize_backward(cupy.asarray(pos[0]), cupy.asarray(tri), Raster(*(a[:1] for a in (
        graster.tri_id, graster.bary, graster.depth))), cupy.asarray(grad_bary[:1]))
    assert gpu1.shape == pos[0].shape
    _assert_scatter_close(gpu1.get(), cpu[0], tol)


def test_gpu_fused_backward_matches_cpu(cupy, rng, tol):
    pos, tri, colors = spherical_cap(n=41, batch=2, seed=7)
    four = np.concatenate([colors, colors[:, :1]], axis=1)
    # C = 3 (float4 accumulator, copied out), 3 per image, 6 (scalar atomics), 2 (float2 atomics),
    # 4 per image (float4 atomics into the output itself).
    for attr in (colors, rng.uniform(size=(2,) + colors.shape).astype(np.float32), np.repeat(colors, 2, axis=1),
                 colors[:, :2].copy(), np.stack([four, 1 - four])):
        raster, img = rasterize_interpolate(pos, tri, (40, 40), attr)
        grad_out = rng.standard_normal(img.shape).astype(np.float32)
        cpu_pos, cpu_attr = rasterize_interpolate_backward(pos, tri, attr, raster, grad_out)
        graster = Raster(*(cupy.asarray(a) for a in (raster.tri_id, raster.bary, raster.depth)))
        gpu_pos, gpu_attr = rasterize_interpolate_backward(cupy.asarray(pos), cupy.asarray(tri), cupy.asarray(attr),
                                                           graster, cupy.asarray(grad_out))
        assert gpu_attr.shape == attr.shape and gpu_attr.flags.c_contiguous
        _assert_scatter_close(gpu_pos.get(), cpu_pos, tol)
        _assert_scatter_close(gpu_attr.get(), cpu_attr, tol)


def test_gpu_rejects_float64_and_mixed_devices(cupy):
    pos, tri, _ = spherical_cap(n=5, batch=1)
    with pytest.raises(TypeError, match="pos.*float32 only"):
        rasterize(cupy.asarray(pos, dtype=cupy.float64), cupy.asarray(tri), (8, 8))
    with pytest.raises(TypeError, match="tri is a numpy array but pos is a cupy array"):
        rasterize(cupy.asarray(pos), tri, (8, 8))


# ------------------------------------------------------------------------------------------------
# 4. Bad input.
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_naming_the_argument():
    pos, tri, colors = spherical_cap(n=5, batch=2)
    res = (8, 8)
    with pytest.raises(ValueError, match="pos must have shape"):
        rasterize(pos[..., :3], tri, res)
    with pytest.raises(TypeError, match="pos must be"):
        rasterize(pos.astype(np.int32), tri, res)
    with pytest.raises(TypeError, match="pos must be"):
        rasterize(pos.tolist(), tri, res)
    with pytest.raises(TypeError, match="tri must be int32"):
        rasterize(pos, tri.astype(np.int64), res)
    with pytest.raises(ValueError, match="tri holds vertex indices"):
        rasterize(pos, tri + 1, res)
    bad = pos.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="pos holds 1 NaN"):
        rasterize(bad, tri, res)
    with fastface.value_checks(False):  # memory safe without the checks
        rasterize(bad, tri + 1, res)
    with pytest.raises(ValueError, match="resolution"):
        rasterize(pos, tri, (0, 8))
    with pytest.raises(TypeError, match="resolution"):
        rasterize(pos, tri, 8)
    raster = rasterize(pos, tri, res)
    with pytest.raises(ValueError, match="batch sizes differ"):
        rasterize_backward(pos[:1], tri, raster, np.zeros_like(raster.bary[:1]))
    with pytest.raises(ValueError, match="grad_bary must have shape"):
        rasterize_backward(pos, tri, raster, np.zeros((2, 8, 9, 2), np.float32))
    with pytest.raises(TypeError, match="raster must be a Raster"):
        rasterize_backward(pos, tri, (raster.tri_id, raster.bary), np.zeros_like(raster.bary))
    with pytest.raises(ValueError, match="raster.tri_id holds triangle ids"):
        rasterize_backward(pos, tri[:3], raster, np.zeros_like(raster.bary))
    with pytest.raises(ValueError, match="attr must have one row per vertex"):
        rasterize_interpolate(pos, tri, res, colors[:-1])
    with pytest.raises(TypeError, match="attr must have the dtype"):
        rasterize_interpolate(pos, tri, res, colors.astype(np.float64))
    with pytest.raises(ValueError, match="grad_out must have shape"):
        rasterize_interpolate_backward(pos, tri, colors, raster, np.zeros((2, 8, 8, 2), np.float32))


# ------------------------------------------------------------------------------------------------
# The CUDA sources, emulated on the host: compiled as C++ with a small shim (blockIdx & co. as
# globals, sequential atomics) and run over the same grid the Python side launches, they must give
# the Numba twins' numbers bit for bit in the forward pass (same float32 operations in the same
# order, no contraction) and up to summation order in the backward. This catches a logic slip in a
# kernel on machines without a GPU; the GPU tests above check the real thing.
# ------------------------------------------------------------------------------------------------

_EMU_SHIM = r"""
#include <cmath>
#include <math.h>
#include <cstring>
#define __global__
#define __device__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
static inline int min(int a, int b) { return b < a ? b : a; }
static inline int max(int a, int b) { return a < b ? b : a; }
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
struct dim3 { int x, y, z; };
static dim3 blockIdx, blockDim, threadIdx, gridDim;
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned long long atomicMin(unsigned long long* p, unsigned long long v) { auto o = *p; if (v < o) *p = v; return o; }
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
using std::isfinite;
#include "rasterize.cu"
namespace interp {
#undef PIXEL_LOOP
#include "interpolate.cu"
}
template <class F> void launch(int n, int gy, F f) {
    blockDim = {256, 1, 1}; gridDim = {(n + 255) / 256, gy, 1};
    for (int by = 0; by < gy; ++by) for (int bx = 0; bx < gridDim.x; ++bx) for (int tx = 0; tx < 256; ++tx) {
        blockIdx = {bx, by, 0}; threadIdx = {tx, 0, 0}; f();
    }
}
extern "C" {
void emu_rasterize(const float4* pos, const int* tri, int B, int V, int T, int H, int W, int cull,
                   unsigned long long* zbuf, const float* attr, int C, int ab, int* tri_id, float2* bary,
                   float* depth, float* out, int gy, float4* scr) {
    for (long long k = 0; k < (long long)B * H * W; ++k) zbuf[k] = ~0ull;
    if (scr) {  // the per-vertex pre-pass (_FWD_PREPASS)
        launch(V, gy, [&] { rasterize_setup(pos, B, V, H, W, scr); });
        launch(T, gy, [&] { rasterize_fwd_screen(scr, tri, B, V, T, H, W, cull, zbuf, pos); });
    } else {
        launch(T, gy, [&] { rasterize_fwd(pos, tri, B, V, T, H, W, cull, zbuf); });
    }
    launch(H * W, gy, [&] {
        if (C == 0) rasterize_resolve<0>(pos, tri, zbuf, B, V, T, H, W, 1.0 / W, 1.0 / H, attr, C, ab, tri_id, bary, depth, out);
        else if (C == 3) rasterize_resolve<3>(pos, tri, zbuf, B, V, T, H, W, 1.0 / W, 1.0 / H, attr, C, ab, tri_id, bary, depth, out);
        else rasterize_resolve<-1>(pos, tri, zbuf, B, V, T, H, W, 1.0 / W, 1.0 / H, attr, C, ab, tri_id, bary, depth, out);
    });
}
void emu_backward(const float4* pos, const int* tri, const float* attr, const int* tri_id, const float2* bary,
                  const float* grad_out, const float2* grad_bary, int B, int V, int T, int H, int W, int C, int ab,
                  float4* grad_pos, float* grad_attr, float4* grad_pos_fused, float* grad_attr_fused,
                  float* out, float2* grad_bary_out, int gy) {
    launch(H * W, gy, [&] { rasterize_bwd(pos, tri, tri_id, grad_bary, B, V, T, H, W, grad_pos); });
    launch(H * W, gy, [&] {
        if (C == 2) rasterize_interpolate_bwd<2>(pos, tri, attr, tri_id, grad_out, B, V, T, H, W, C, ab, grad_pos_fused, grad_attr_fused);
        else if (C == 3) rasterize_interpolate_bwd<3>(pos, tri, attr, tri_id, grad_out, B, V, T, H, W, C, ab, grad_pos_fused, grad_attr_fused);
        else if (C == 4) rasterize_interpolate_bwd<4>(pos, tri, attr, tri_id, grad_out, B, V, T, H, W, C, ab, grad_pos_fused, grad_attr_fused);
        else rasterize_interpolate_bwd<-1>(pos, tri, attr, tri_id, grad_out, B, V, T, H, W, C, ab, grad_pos_fused, grad_attr_fused);
    });
    launch(H * W, gy, [&] {
        if (C == 3) interp::interpolate_fwd<3>(attr, tri_id, bary, tri, B, V, T, H, W, C, ab, out);
        else interp::interpolate_fwd<-1>(attr, tri_id, bary, tri, B, V, T, H, W, C, ab, out);
    });
    launch(H * W, gy, [&] {
        if (C == 3) interp::interpolate_bwd<3>(attr, tri_id, bary, tri, grad_out, B, V, T, H, W, C, ab, grad_attr, grad_bary_out);
        else if (C == 4) interp::interpolate_bwd<4>(attr, tri_id, bary, tri, grad_out, B, V, T, H, W, C, ab, grad_attr, grad_bary_out);
        else interp::interpolate_bwd<-1>(attr, tri_id, bary, tri, grad_out, B, V, T, H, W, C, ab, grad_attr, grad_bary_out);
    });
}
}
"""


@pytest.fixture(scope="module")
def cuda_emulated(tmp_path_factory):
    return build_emulated_library(tmp_path_factory.mktemp("cuda_emulated"), _EMU_SHIM, ("-ffp-contract=off",))


def _ptr(a):
    import ctypes
    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("gy", [1, 2])  # 2: fewer grid rows than images, the kernels' strided loop
def test_cuda_sources_emulated_on_the_host_match_the_numba_twins(cuda_emulated, rng, tol, gy):
    lib = cuda_emulated
    H, W = 29, 35
    cap = spherical_cap(n=31, batch=3, seed=2)
    soup = triangle_soup(rng, B=3, T=50)
    soup[0][1, 7, 3] = -1.0  # a dropped triangle
    cases = (((cap[0], cap[1]), cap[2], 0), (soup, rng.uniform(size=(3, 150, 5)), 1),
             ((cap[0], cap[1]), rng.uniform(size=(3, cap[0].shape[1], 4)), 0), (soup, rng.uniform(size=(150, 2)), 1))
    for (pos, tri), attr, cull in cases:
        attr = np.ascontiguousarray(attr, dtype=np.float32)
        B, V = pos.shape[:2]
        T, C, ab = tri.shape[0], attr.shape[-1], int(attr.ndim == 3)
        tri_id, depth = np.empty((B, H, W), np.int32), np.empty((B, H, W), np.float32)
        bary, out = np.empty((B, H, W, 2), np.float32), np.empty((B, H, W, C), np.float32)
        raster, img = rasterize_interpolate(pos, tri, (H, W), attr, cull_backfaces=bool(cull))
        for scr in (None, np.empty((B, V, 4), np.float32)):  # the per-vertex pre-pass or not
            # The keys live in the bary output, as in fastface.ops.rasterize's GPU path.
            lib.emu_rasterize(_ptr(pos), _ptr(tri), B, V, T, H, W, cull, _ptr(bary), _ptr(attr), C, ab,
                              _ptr(tri_id), _ptr(bary), _ptr(depth), _ptr(out), gy, None if scr is None else _ptr(scr))
            np.testing.assert_array_equal(tri_id, raster.tri_id)
            np.testing.assert_array_equal(bary, raster.bary)
            np.testing.assert_array_equal(depth, raster.depth)
            np.testing.assert_array_equal(out, img)

        grad_out = rng.standard_normal(img.shape).astype(np.float32)
        grad_bary = rng.standard_normal(bary.shape).astype(np.float32)
        gp, gpf = np.zeros((B, V, 4), np.float32), np.zeros((B, V, 4), np.float32)
        # The attribute gradients of 3 or 4 channels accumulate in a (..., V, 4) float4 buffer.
        acc_shape = attr.shape[:-1] + (4 if C in (3, 4) else C,)
        ga, gaf = np.zeros(acc_shape, np.float32), np.zeros(acc_shape, np.float32)
        out2, gb = np.empty_like(out), np.empty_like(bary)
        lib.emu_backward(_ptr(pos), _ptr(tri), _ptr(attr), _ptr(tri_id), _ptr(bary), _ptr(grad_out), _ptr(grad_bary),
                         B, V, T, H, W, C, ab, _ptr(gp), _ptr(ga), _ptr(gpf), _ptr(gaf), _ptr(out2), _ptr(gb), gy)
        np.testing.assert_array_equal(out2, interpolate(attr, raster, tri))
        ref_ga, ref_gb = interpolate_backward(attr, raster, tri, grad_out)
        np.testing.assert_array_equal(gb, ref_gb)
        ref_gp, ref_gaf = rasterize_interpolate_backward(pos, tri, attr, raster, grad_out)
        assert not gaf[..., C:].any() and not ga[..., C:].any()
        for got, ref in ((gp, rasterize_backward(pos, tri, raster, grad_bary)), (gpf, ref_gp), (ga[..., :C], ref_ga),
                         (gaf[..., :C], ref_gaf)):
            _assert_scatter_close(got, ref, tol)


def test_rasterize_rejects_a_cull_flag_that_is_not_a_bool():
    pos = np.array([[-0.5, -0.5, 0, 1], [0.5, -0.5, 0, 1], [0, 0.5, 0, 1]], np.float32)
    tri = np.array([[0, 1, 2]], np.int32)
    with pytest.raises(TypeError, match="cull_backfaces"):
        rasterize(pos, tri, (8, 8), cull_backfaces="no")
