"""Tests of fastface.ops.antialias: reference, gradients, silhouettes only, GPU parity, bad input."""
import numpy as np
import pytest

import fastface
from bench.workloads import grid_mesh, spherical_cap
from fastface.ops.antialias import (
    AntialiasTopology, antialias, antialias_backward, antialias_topology, silhouette_edges, silhouette_pixels,
)
from fastface.ops.rasterize import Raster, rasterize
from tests.gradcheck import assert_gradient_matches


# --------------------------------------------------------------------------------------------------
# The slow, obvious reference: float64, NDC geometry with divisions, brute-force topology.

def _cross2(ax, ay, bx, by):
    return ax * by - ay * bx


def reference_topology(tri):
    """opposite[t, k]: the far vertex of the lowest-numbered other triangle that has edge k of t, or -1."""
    T = len(tri)
    opposite = -np.ones((T, 3), int)
    for t in range(T):
        for k in range(3):
            a, b = tri[t][(k + 1) % 3], tri[t][(k + 2) % 3]
            for s in range(T):
                if s != t and {a, b} <= set(tri[s]):
                    opposite[t, k] = [v for v in tri[s] if v not in (a, b)][0]
                    break
    return opposite


def reference_is_silhouette(p, tri, opposite, t, k):
    """Edge k of drawn triangle t in NDC: no neighbour, a neighbour not drawn, or its far vertex on t's
    side of the edge or on it (the surface folds)."""
    ndc = p[:, :2] / p[:, 3:]
    a, c, third = ndc[tri[t][(k + 1) % 3]], ndc[tri[t][(k + 2) % 3]], ndc[tri[t][k]]
    d = opposite[t, k]
    return d < 0 or p[d, 3] <= 0 or _cross2(*(c - a), *(ndc[d] - a)) * _cross2(*(c - a), *(third - a)) >= 0


def reference_antialias(color, tri_id, depth, pos, tri):
    """Pair by pair in float64: crossings of the segment between the centres with the front triangle's
    edges on the screen (NDC), silhouettes from the brute-force topology."""
    color = np.asarray(color, np.float64)
    pos = np.asarray(pos, np.float64)
    B, H, W, _ = color.shape
    opposite = reference_topology(tri)
    out = color.copy()
    for b in range(B):
        p = pos[b] if pos.ndim == 3 else pos
        ndc = p[:, :2] / p[:, 3:]
        pairs = [((i, j), (i, j + 1)) for i in range(H) for j in range(W - 1)]
        pairs += [((i, j), (i + 1, j)) for i in range(H - 1) for j in range(W)]
        for p0, p1 in pairs:
            t0, t1 = tri_id[b][p0], tri_id[b][p1]
            if t0 == t1:
                continue
            if t1 < 0:
                front, other = p0, p1
            elif t0 < 0:
                front, other = p1, p0
            else:
                d0, d1 = depth[b][p0], depth[b][p1]
                front, other = (p1, p0) if (d1 < d0 or (d1 == d0 and t1 < t0)) else (p0, p1)
            t = tri_id[b][front]
            centre = lambda q: np.array([(2 * q[1] + 1 - W) / W, (H - 2 * q[0] - 1) / H])  # noqa: E731
            pf, po = centre(front), centre(other)
            crossings = []
            for k in range(3):
                a, c, third = ndc[tri[t][(k + 1) % 3]], ndc[tri[t][(k + 2) % 3]], ndc[tri[t][k]]
                side = _cross2(*(c - a), *(third - a))
                gf, go = _cross2(*(c - a), *(pf - a)) * np.sign(side), _cross2(*(c - a), *(po - a)) * np.sign(side)
                if side != 0 and gf >= 0 and go < 0:
                    crossings.append((gf / (gf - go), k))
            if not crossings:
                continue
            f, k = min(crossings)
            if not reference_is_silhouette(p, tri, opposite, t, k):
                continue
            dst, src, weight = (other, front, f - 0.5) if f >= 0.5 else (front, other, 0.5 - f)
            out[b][dst] += weight * (color[b][src] - color[b][dst])
    return out


# --------------------------------------------------------------------------------------------------
# Scenes: clip positions in float64, triangles, resolution.

def _cap(batch=2, n=7):
    pos, tri, _ = spherical_cap(n=n, batch=batch, seed=1)
    return pos.astype(np.float64), tri, (20, 22)


def _fold_and_occluder(rng, batch=2):
    """A grid whose right half is folded back behind its left half (the fold is a silhouette between
    faces that share vertices), an occluding triangle in front, perspective w in [0.8, 1.3]."""
    xy, tri = grid_mesh(5)
    xy = 0.8 * xy
    x, y = xy[:, 0], xy[:, 1]
    folded = x > 0
    sx = np.where(folded, -0.5 * x, x)
    sz = np.where(folded, 0.4 * x, 0.0)
    grid = np.stack([sx, y, sz], -1)
    occluder = np.array([[-0.35, -0.9, -0.5], [0.9, -0.25, -0.5], [0.05, 0.55, -0.5]])
    verts = np.concatenate([grid, occluder])
    tri = np.concatenate([tri, [[len(grid), len(grid) + 1, len(grid) + 2]]]).astype(np.int32)
    pos = np.empty((batch, len(verts), 4))
    for b in range(batch):
        v = verts + rng.uniform(-0.04, 0.04, verts.shape)
        w = rng.uniform(0.8, 1.3, len(verts))
        pos[b] = np.concatenate([v * w[:, None], w[:, None]], -1)
    return pos, tri, (19, 23)


def _scenes(rng):
    return [_cap(), _fold_and_occluder(rng)]


def _colors(rng, raster, C=3, dtype=np.float64):
    return rng.uniform(0, 1, raster.tri_id.shape + (C,)).astype(dtype)


# 1. Forward against the reference.

def test_antialias_matches_reference_in_float64(rng, tol):
    for pos, tri, res in _scenes(rng):
        raster = rasterize(pos, tri, res)
        color = _colors(rng, raster)
        out = antialias(color, raster, pos, tri)
        want = reference_antialias(color, raster.tri_id, raster.depth, pos, tri)
        assert out.dtype == np.float64 and out.shape == color.shape
        changed = np.abs(want - color).max(-1) > 0
        assert changed.sum() >= 8, "the scene should have silhouette pixels to blend"
        np.testing.assert_allclose(out, want, rtol=tol["float64_reference_rtol"], atol=tol["float64_reference_atol"])


def test_antialias_float32_matches_reference(rng, tol):
    for pos, tri, res in _scenes(rng):
        pos = pos.astype(np.float32)
        raster = rasterize(pos, tri, res)
        color = _colors(rng, raster, C=4, dtype=np.float32)
        out = antialias(color, raster, pos, tri)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, reference_antialias(color, raster.tri_id, raster.depth, pos, tri),
                                   atol=tol["float32_reference_atol"])


def test_unbatched_positions_and_a_given_topology_give_the_same_image(rng):
    pos, tri, res = _fold_and_occluder(rng, batch=1)
    raster = rasterize(pos[0], tri, res)
    color = _colors(rng, raster)
    topology = antialias_topology(tri)
    assert isinstance(topology, AntialiasTopology) and topology.opposite.dtype == np.int32
    np.testing.assert_array_equal(topology.opposite, reference_topology(tri))
    np.testing.assert_array_equal(antialias(color, raster, pos[0], tri, topology=topology),
                                  antialias(color, raster, pos, tri))


def test_a_uniform_image_is_unchanged_and_empty_images_too(rng):
    pos, tri, res = _cap()
    raster = rasterize(pos, tri, res)
    color = np.full(raster.tri_id.shape + (3,), 0.25)
    np.testing.assert_array_equal(antialias(color, raster, pos, tri), color)
    far = pos.copy()
    far[..., :2] += 10 * far[..., 3:]  # off screen: nothing is drawn
    empty = rasterize(far, tri, res)
    color = _colors(rng, empty)
    np.testing.assert_array_equal(antialias(color, empty, far, tri), color)


def _quad(split):
    """Two triangles forming a quad with a diagonal that passes between pixel centres; with split=True
    the second triangle has its own copies of the diagonal's vertices (no shared edge)."""
    corners = np.array([[-0.62, -0.71], [0.66, -0.58], [0.57, 0.69], [-0.53, 0.61]])
    verts = np.concatenate([corners, corners[[0, 2]]]) if split else corners
    pos = np.concatenate([verts, np.zeros((len(verts), 1)), np.ones((len(verts), 1))], -1)[None]
    return pos, np.array([[0, 1, 2], [4, 5, 3] if split else [0, 2, 3]], np.int32)


def test_an_edge_between_two_front_facing_triangles_is_not_blended(rng):
    res = (16, 16)
    pos, tri = _quad(split=False)
    raster = rasterize(pos, tri, res)
    assert set(np.unique(raster.tri_id)) == {-1, 0, 1}
    color = _colors(rng, raster)
    out = antialias(color, raster, pos, tri)
    inside = (raster.tri_id[0] >= 0)
    # Pixels away from the quad's outline (all four neighbours covered) keep their colour, the diagonal's
    # pixels included; the outline's pixels are blended.
    interior = inside.copy()
    interior[1:] &= inside[:-1]
    interior[:-1] &= inside[1:]
    interior[:, 1:] &= inside[:, :-1]
    interior[:, :-1] &= inside[:, 1:]
    diagonal = np.zeros_like(inside)
    diagonal[:, :-1] |= raster.tri_id[0, :, :-1] != raster.tri_id[0, :, 1:]
    diagonal &= interior
    assert diagonal.sum() >= 5
    np.testing.assert_array_equal(out[0][interior], color[0][interior])
    assert (np.abs(out[0] - color[0]).max(-1) > 0)[inside & ~interior].sum() >= 10
    # The same with the second triangle wound the other way (it runs along the diagonal the same way as
    # the first): still two faces on either side of the edge, still not a silhouette.
    flipped = tri[:, ::-1].copy()
    flipped[0] = tri[0]
    runs = [{(t[m], t[(m + 1) % 3]) for m in range(3)} for t in flipped]
    assert runs[0] & runs[1]  # one directed edge in both
    np.testing.assert_array_equal(antialias(color, raster, pos, flipped), out)
    # The same quad without the shared edge (each triangle has its own vertices): the diagonal is now a
    # silhouette of both triangles and its pixels are blended.
    pos_split, tri_split = _quad(split=True)
    raster_split = rasterize(pos_split, tri_split, res)
    np.testing.assert_array_equal(raster_split.tri_id, raster.tri_id)
    out_split = antialias(color, raster_split, pos_split, tri_split)
    assert (np.abs(out_split[0] - color[0]).max(-1) > 0)[diagonal].sum() >= 3


def test_a_fold_where_the_neighbour_faces_away_is_a_silhouette(rng):
    """The fold of _fold_and_occluder: the triangles on its two sides share vertices, but the far one faces
    away; pixels on the fold's right are background and get the front half's colour blended in."""
    pos, tri, res = _fold_and_occluder(rng, batch=1)
    pos = pos[:, :-3]  # without the occluder
    tri = tri[:-1]
    raster = rasterize(pos, tri, res)
    color = _colors(rng, raster)
    topology = antialias_topology(tri)
    assert (topology.opposite >= 0).sum() > 0.8 * topology.opposite.size  # the fold's edges have neighbours
    out = antialias(color, raster, pos, tri, topology=topology)
    no_neighbours = AntialiasTopology(np.full_like(topology.opposite, -1), tri.shape[0])
    # Every edge treated as a boundary blends at least as many pixels; the fold alone blends the fold's.
    changed = np.abs(out - color).max(-1) > 0
    changed_all = np.abs(antialias(color, raster, pos, tri, topology=no_neighbours) - color).max(-1) > 0
    assert (changed <= changed_all).all() and changed_all.sum() > changed.sum()
    right_of_covered = np.zeros_like(changed[0])
    covered = raster.tri_id[0] >= 0
    right_of_covered[:, 1:] = covered[:, :-1] & ~covered[:, 1:]
    xs = np.nonzero(right_of_covered)[1]
    assert xs.size and changed[0][right_of_covered].any()


# 2. Backward against central differences (float64).

def _fixed_coverage(f, pos, tri, res):
    """f(p) that also asserts that rasterize(p) covers the same pixels as at pos (no centre changes
    coverage under the finite-difference step)."""
    tri_id = rasterize(pos, tri, res).tri_id

    def g(p):
        raster = rasterize(p, tri, res)
        np.testing.assert_array_equal(raster.tri_id, tri_id, err_msg="a pixel centre changed coverage")
        return f(p, raster)

    return g


def test_antialias_backward_matches_finite_differences(rng, tol):
    for pos, tri, res in _scenes(rng):
        raster = rasterize(pos, tri, res)
        color = _colors(rng, raster)
        grad_out = rng.standard_normal(color.shape)
        grad_color, grad_pos = antialias_backward(color, raster, pos, tri, grad_out)
        assert grad_color.shape == color.shape and grad_pos.shape == pos.shape
        assert (grad_pos[..., 2] == 0).all() and np.abs(grad_pos).max() > 0
        assert_gradient_matches(lambda c: antialias(c, raster, pos, tri), color, grad_out, grad_color, tol,
                                n_samples=120, rng=rng)
        f = _fixed_coverage(lambda p, r: antialias(color, r, p, tri), pos, tri, res)
        assert_gradient_matches(f, pos, grad_out, grad_pos, tol)


def test_antialias_backward_of_unbatched_positions_sums_the_images(rng, tol):
    pos, tri, res = _cap(batch=1)
    p = np.repeat(pos, 2, 0)
    raster = rasterize(p, tri, res)
    color = _colors(rng, raster)
    grad_out = rng.standard_normal(color.shape)
    grad_color, grad_pos = antialias_backward(color, raster, pos[0], tri, grad_out)
    want_color, want_pos = antialias_backward(color, raster, p, tri, grad_out)
    np.testing.assert_array_equal(grad_color, want_color)
    np.testing.assert_allclose(grad_pos, want_pos.sum(0), rtol=tol["float64_reference_rtol"],
                               atol=tol["float64_reference_atol"])


def test_row_bands_give_the_same_image_and_gradients(rng, monkeypatch):
    """One image split over several row bands (pairs across bands, private accumulators summed) against
    one band."""
    import sys
    module = sys.modules["fastface.ops.antialias"]
    pos, tri, res = _cap(batch=1)
    raster = rasterize(pos, tri, res)
    color = _colors(rng, raster)
    grad_out = rng.standard_normal(color.shape)
    monkeypatch.setattr(module, "_n_bands", lambda B, H: 1)
    one = antialias_backward(color, raster, pos, tri, grad_out)
    image = antialias(color, raster, pos, tri)
    monkeypatch.setattr(module, "_n_bands", lambda B, H: 5)
    banded = antialias_backward(color, raster, pos, tri, grad_out)
    np.testing.assert_array_equal(antialias(color, raster, pos, tri), image)
    np.testing.assert_array_equal(banded[0], one[0])
    np.testing.assert_allclose(banded[1], one[1], rtol=1e-12, atol=1e-12)


def reference_silhouettes(pos, tri):
    """(B, T) masks the obvious way: a triangle is drawn when its w are positive and its NDC area is not 0;
    edge k of a drawn triangle is a silhouette as reference_is_silhouette says."""
    opposite = reference_topology(tri)
    out = np.zeros((len(pos), len(tri)), np.uint8)
    for b, p in enumerate(np.asarray(pos, np.float64)):
        ndc = p[:, :2] / p[:, 3:]
        for t in range(len(tri)):
            a, b_, c = (ndc[v] for v in tri[t])
            if (p[tri[t], 3] <= 0).any() or _cross2(*(b_ - a), *(c - a)) == 0:
                continue
            for k in range(3):
                if reference_is_silhouette(p, tri, opposite, t, k):
                    out[b, t] |= 1 << k
    return out


def test_silhouette_edges_and_pixels_match_the_reference_and_are_what_antialias_uses(rng):
    for pos, tri, res in _scenes(rng):
        sil = silhouette_edges(pos, tri)
        np.testing.assert_array_equal(sil, reference_silhouettes(pos, tri))
        assert sil.any() and not sil.all()
        raster = rasterize(pos, tri, res)
        psil = silhouette_pixels(raster, pos, tri)
        gathered = np.where(raster.tri_id >= 0, np.take_along_axis(sil, raster.tri_id.reshape(len(sil), -1), 1)
                            .reshape(raster.tri_id.shape), 0)
        np.testing.assert_array_equal(psil, gathered)
        assert psil.dtype == np.uint8 and psil.any()
        color = _colors(rng, raster)
        grad_out = rng.standard_normal(color.shape)
        np.testing.assert_array_equal(antialias(color, raster, pos, tri, silhouettes=psil),
                                      antialias(color, raster, pos, tri))
        for got, want in zip(antialias_backward(color, raster, pos, tri, grad_out, silhouettes=psil),
                             antialias_backward(color, raster, pos, tri, grad_out)):
            np.testing.assert_array_equal(got, want)
        # The given masks are used: with none set, nothing is blended and no position gets a gradient.
        none = np.zeros_like(psil)
        np.testing.assert_array_equal(antialias(color, raster, pos, tri, silhouettes=none), color)
        assert not antialias_backward(color, raster, pos, tri, grad_out, silhouettes=none)[1].any()
    pos, tri, res = _cap(batch=1)
    np.testing.assert_array_equal(silhouette_edges(pos[0], tri), silhouette_edges(pos, tri))  # unbatched: (1, T)
    raster = rasterize(pos, tri, res)
    np.testing.assert_array_equal(silhouette_pixels(raster, pos[0], tri), silhouette_pixels(raster, pos, tri))


def degenerate_and_hidden_neighbours():
    """Triangle 0 with a neighbour across each edge: across edge 0 (v1-v2) a degenerate one, its far vertex
    exactly on the edge's line; across edge 1 (v2-v0) one whose far vertex is behind the camera (w < 0);
    across edge 2 (v0-v1) a front-facing continuation of the surface. Clip positions (1, 5, 4) float32."""
    ndc = np.array([[-0.5, -0.25], [0.0, 0.0], [0.25, 0.25], [0.5, 0.5], [-0.75, 0.5], [0.25, -0.75]], np.float32)
    w = np.array([1.0, 1.0, 1.0, 1.0, -1.0, 1.0], np.float32)
    pos = np.concatenate([ndc * np.abs(w)[:, None], np.zeros((6, 1), np.float32), w[:, None]], 1)
    tri = np.array([[0, 1, 2], [2, 1, 3], [0, 2, 4], [1, 0, 5]], np.int32)
    return pos[None], tri


def test_a_degenerate_or_hidden_neighbour_makes_a_silhouette_and_a_continuing_one_does_not():
    pos, tri = degenerate_and_hidden_neighbours()
    sil = silhouette_edges(pos, tri)
    assert sil[0, 0] == 0b011, bin(sil[0, 0])
    np.testing.assert_array_equal(sil, reference_silhouettes(pos, tri))
    assert sil[0, 2] == 0  # a vertex behind the camera: never drawn, no silhouette edges
    assert sil[0, 1] == 0  # degenerate: none either


def test_on_a_closed_surface_an_inner_edge_is_a_silhouette_exactly_where_the_facing_flips(rng):
    """The per-edge test against the definition it replaces: on a consistently oriented closed mesh (a
    UV sphere under random rotations and perspective, so that about half of it faces away), an edge
    with two drawn neighbours is a silhouette when its triangles run opposite ways on the screen."""
    n_lat, n_lon = 14, 20
    lat = np.linspace(0, np.pi, n_lat + 1)[1:-1]
    lon = np.linspace(0, 2 * np.pi, n_lon, endpoint=False)
    ring = np.stack([np.sin(lat)[:, None] * np.cos(lon), np.sin(lat)[:, None] * np.sin(lon),
                     np.repeat(np.cos(lat)[:, None], n_lon, 1)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 0, 1]], ring, [[0, 0, -1]]])
    south = len(verts) - 1
    idx = lambda r, c: 1 + r * n_lon + c % n_lon  # noqa: E731
    tri = [[0, idx(0, c), idx(0, c + 1)] for c in range(n_lon)]
    tri += [[idx(r, c), idx(r + 1, c), idx(r + 1, c + 1)] for r in range(n_lat - 2) for c in range(n_lon)]
    tri += [[idx(r, c), idx(r + 1, c + 1), idx(r, c + 1)] for r in range(n_lat - 2) for c in range(n_lon)]
    tri += [[south, idx(n_lat - 2, c + 1), idx(n_lat - 2, c)] for c in range(n_lon)]
    tri = np.array(tri, np.int32)
    opposite = reference_topology(tri)
    assert (opposite >= 0).all(), "a closed mesh: every edge has a neighbour"
    # The triangle across edge k of t (the pose does not change it): found once, by brute force.
    across = [[next(s for s in range(len(tri)) if s != t and {tri[t][(k + 1) % 3], tri[t][(k + 2) % 3]} <= set(tri[s]))
               for k in range(3)] for t in range(len(tri))]
    checked = 0
    for _ in range(4):
        q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
        cam = verts @ q.T + [0.0, 0.0, -3.0]
        pos = np.concatenate([cam[:, :2], np.zeros((len(cam), 1)), -cam[:, 2:]], 1)[None]  # w = depth
        sil = silhouette_edges(pos, tri)[0]
        ndc = pos[0, :, :2] / pos[0, :, 3:]
        area = np.array([_cross2(*(ndc[b] - ndc[a]), *(ndc[c] - ndc[a])) for a, b, c in tri])
        assert (area > 0).any() and (area < 0).any()
        for t in range(len(tri)):
            for k, n in enumerate(across[t]):
                if min(abs(area[t]), abs(area[n])) < 1e-9:
                    continue  # seen edge-on: the float32 sign may go either way
                assert bool(sil[t] >> k & 1) == (np.sign(area[t]) != np.sign(area[n])), (t, k, n)
                checked += 1
    assert checked > 2000


def test_silhouette_pixel_bands_give_the_same_masks(rng, monkeypatch):
    import sys
    module = sys.modules["fastface.ops.antialias"]
    pos, tri, res = _fold_and_occluder(rng, batch=2)
    raster = rasterize(pos, tri, res)
    monkeypatch.setattr(module, "_n_bands", lambda B, H: 1)
    one = silhouette_pixels(raster, pos, tri)
    monkeypatch.setattr(module, "_n_bands", lambda B, H: 4)
    np.testing.assert_array_equal(silhouette_pixels(raster, pos, tri), one)


def test_silhouettes_of_another_shape_or_type_are_refused(rng):
    pos, tri, res = _cap()
    raster = rasterize(pos, tri, res)
    color = _colors(rng, raster)
    psil = silhouette_pixels(raster, pos, tri)
    with pytest.raises(ValueError, match="silhouettes must have shape"):
        antialias(color, raster, pos, tri, silhouettes=psil[:1])
    with pytest.raises(ValueError, match=r"silhouettes must be per pixel.*silhouette_pixels.*per-triangle"):
        antialias(color, raster, pos, tri, silhouettes=silhouette_edges(pos, tri))
    with pytest.raises(TypeError, match="silhouettes must be uint8"):
        antialias_backward(color, raster, pos, tri, color, silhouettes=psil.astype(np.int32))


def test_silhouette_pixels_refuse_bad_inputs(rng):
    pos, tri, res = _cap()
    raster = rasterize(pos, tri, res)
    with pytest.raises(TypeError, match="raster must be a Raster"):
        silhouette_pixels(raster.tri_id, pos, tri)
    with pytest.raises(ValueError, match="batch sizes differ"):
        silhouette_pixels(raster, np.concatenate([pos, pos]), tri)
    with pytest.raises(ValueError, match=r"raster.tri_id holds triangle ids in \[-1, \d+\], outside"):
        silhouette_pixels(raster, pos, tri[:3])
    with pytest.raises(ValueError, match="topology was built for"):
        silhouette_pixels(raster, pos, tri, topology=antialias_topology(tri[:3]))
    with pytest.raises(TypeError, match="topology must be an AntialiasTopology"):
        silhouette_pixels(raster, pos, tri, topology=tri)
    bad = pos.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="pos"):
        silhouette_pixels(raster, bad, tri)


# 3. GPU against CPU.

def test_gpu_antialias_and_backward_match_cpu(cupy, rng, tol):
    pos, tri, colors = spherical_cap(n=41, batch=3, seed=8)
    raster, image = fastface.rasterize_interpolate(pos, tri, (48, 52), colors)
    graster = Raster(*(cupy.asarray(a) for a in (raster.tri_id, raster.bary, raster.depth)))
    topology = antialias_topology(cupy.asarray(tri))
    out = antialias(image, raster, pos, tri)
    gout = antialias(cupy.asarray(image), graster, cupy.asarray(pos), cupy.asarray(tri), topology=topology)
    np.testing.assert_allclose(gout.get(), out, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
    grad_out = rng.standard_normal(out.shape).astype(np.float32)
    grad_color, grad_pos = antialias_backward(image, raster, pos, tri, grad_out)
    g_color, g_pos = antialias_backward(cupy.asarray(image), graster, cupy.asarray(pos), cupy.asarray(tri),
                                        cupy.asarray(grad_out), topology=topology)
    np.testing.assert_allclose(g_color.get(), grad_color, rtol=tol["gpu_cpu_rtol"], atol=tol["gpu_cpu_atol"])
    np.testing.assert_allclose(g_pos.get(), grad_pos, rtol=tol["gpu_cpu_scatter_rtol"],
                               atol=tol["gpu_cpu_scatter_atol_of_max"] * np.abs(grad_pos).max())
    np.testing.assert_array_equal(silhouette_edges(cupy.asarray(pos), cupy.asarray(tri), topology).get(),
                                  silhouette_edges(pos, tri))
    np.testing.assert_array_equal(silhouette_pixels(graster, cupy.asarray(pos), cupy.asarray(tri), topology).get(),
                                  silhouette_pixels(raster, pos, tri))


# 4. Bad input.

def test_bad_inputs_raise_naming_the_argument(rng):
    pos, tri, res = _cap()
    pos = pos.astype(np.float32)
    raster = rasterize(pos, tri, res)
    color = _colors(rng, raster, dtype=np.float32)
    with pytest.raises(TypeError, match="raster must be a Raster"):
        antialias(color, raster.tri_id, pos, tri)
    with pytest.raises(TypeError, match="color must be"):
        antialias(color.astype(np.int32), raster, pos, tri)
    with pytest.raises(ValueError, match="color must have shape"):
        antialias(color[0], raster, pos, tri)
    with pytest.raises(TypeError, match="pos must have the dtype of color"):
        antialias(color, raster, pos.astype(np.float64), tri)
    with pytest.raises(ValueError, match="raster.tri_id must have shape"):
        antialias(color[:, :-1], raster, pos, tri)
    with pytest.raises(TypeError, match="raster.depth must be float32"):
        antialias(color, Raster(raster.tri_id, raster.bary, raster.depth.astype(np.float64)), pos, tri)
    with pytest.raises(ValueError, match="batch sizes differ"):
        antialias(color, raster, np.concatenate([pos, pos]), tri)
    with pytest.raises(ValueError, match="tri must have shape"):
        antialias(color, raster, pos, tri[:, :2])
    with pytest.raises(ValueError, match="tri holds vertex indices"):
        antialias(color, raster, pos[:, :10], tri)
    with pytest.raises(ValueError, match="raster.tri_id holds triangle ids"):
        antialias(color, raster, pos, tri[:4])
    with pytest.raises(TypeError, match="topology must be an AntialiasTopology"):
        antialias(color, raster, pos, tri, topology=tri)
    with pytest.raises(ValueError, match="topology was built for 4 triangles"):
        antialias(color, raster, pos, tri, topology=antialias_topology(tri[:4]))
    bad = color.copy()
    bad[0, 1, 2, 0] = np.nan
    with pytest.raises(ValueError, match="color holds 1 NaN"):
        antialias(bad, raster, pos, tri)
    with pytest.raises(ValueError, match="grad_out must have shape"):
        antialias_backward(color, raster, pos, tri, color[..., :2])
    with pytest.raises(TypeError, match="grad_out must be"):
        antialias_backward(color, raster, pos, tri, None)
    with pytest.raises(TypeError, match="tri must be"):
        antialias_topology(tri.astype(np.int64))
