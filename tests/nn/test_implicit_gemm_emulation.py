"""A numpy emulation of kernels/nn_conv_implicit.cu, lane by lane, against im2col @ weight.

The implicit-GEMM kernel feeds the tensor cores through inline PTX (ldmatrix, mma.sync
m16n8k16), whose per-lane register layouts are easy to get wrong and impossible to check without
a GPU. This test runs the kernel's own index arithmetic (the per-thread tile loads with the
prologue, the ldmatrix row addresses, the fragment choice per mma, the epilogue) on the CPU,
with the instructions emulated from the PTX ISA's definitions:

- ldmatrix.m8n8.x4: lanes 8j..8j+7 give the row addresses of matrix j; register j of lane l
  holds row l/4, columns 2(l%4), 2(l%4)+1 of matrix j (.trans: rows 2(l%4), 2(l%4)+1, column l/4).
- mma.m16n8k16.row.col, f16 operands (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating
  point type"), groupID g = lane >> 2, threadID_in_group t = lane % 4:
  A a0..a7 (4 registers of 2): row g for i in {0,1,4,5} else g+8; column 2t + (i&1) (+8 for i >= 4).
  B b0..b3 (2 registers of 2): row 2t + (i&1) (+8 for i >= 2); column g.
  C/D c0..c3 (float32): row g (+8 for i >= 2); column 2t + (i&1).

Unwritten shared memory is NaN, so a read outside what the loads wrote shows up in the result.
Runs on the CPU in well under a second.
"""
import numpy as np
import pytest

from fastface.nn import im2col

BM, BN, BK = 128, 64, 32
LDA, LDB, LDC = BK + 8, BN + 8, BN + 4

LANE = np.arange(32)
WARP = np.arange(8)[:, None]
G, T = LANE >> 2, LANE & 3


def ldmatrix_x4(smem, row, col, trans=False):
    """Registers (8 warps, 32 lanes, 4 registers, 2 halves) of ldmatrix.x4 from per-lane addresses."""
    r = row.reshape(8, 4, 8)[..., None]                  # matrix j, row i from lane 8j + i
    c = col.reshape(8, 4, 8)[..., None] + np.arange(8)
    mats = smem[r, c]                                    # (warp, j, row, col)
    out = np.empty((8, 32, 4, 2), dtype=smem.dtype)
    for j in range(4):
        for h in range(2):
            if trans:
                out[:, :, j, h] = mats[:, j, 2 * T + h, G]
            else:
                out[:, :, j, h] = mats[:, j, G, 2 * T + h]
    return out


def _a_index(i):
    row = G + (0 if i in (0, 1, 4, 5) else 8)
    col = 2 * T + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def _b_index(i):
    return 2 * T + (i & 1) + (8 if i >= 2 else 0), G


def _c_index(i):
    return G + (8 if i >= 2 else 0), 2 * T + (i & 1)


def mma_16816(acc, a, b0, b1):
    """acc (8, 32, 4) float32 += the product of the fragments, per warp."""
    A = np.full((8, 16, 16), np.nan, dtype=np.float32)
    Bm = np.full((8, 16, 8), np.nan, dtype=np.float32)
    Cm = np.full((8, 16, 8), np.nan, dtype=np.float32)
    for i in range(8):
        r, c = _a_index(i)
        A[:, r, c] = a[:, :, i // 2, i % 2]
    b = np.stack([b0, b1], axis=2)  # (warp, lane, reg, half)
    for i in range(4):
        r, c = _b_index(i)
        Bm[:, r, c] = b[:, :, i // 2, i % 2]
    for i in range(4):
        r, c = _c_index(i)
        Cm[:, r, c] = acc[:, :, i]
    D = A @ Bm + Cm
    for i in range(4):
        r, c = _c_index(i)
        acc[:, :, i] = D[:, r, c]


def emulate_conv_implicit(x, in_bias, in_relu, w, KH, KW, stride, pad):
    """kernels/nn_conv_implicit.cu's conv_implicit_fwd, step by step, on the CPU."""
    B, H, W, C = x.shape
    N = w.shape[1]
    Ho, Wo = (H + 2 * pad - KH) // stride + 1, (W + 2 * pad - KW) // stride + 1
    M = B * Ho * Wo
    z = np.full((M, N), np.nan, dtype=np.float16)
    tid = np.arange(256)
    a_seg = tid & 3
    b_row, b_col = tid >> 3, (tid & 7) * 8
    chunks = C // BK
    steps = KH * KW * chunks
    warp_m, warp_n = (WARP & 3) * 32, (WARP >> 2) * 32
    ld_r = (LANE & 7) + ((LANE >> 3) & 1) * 8
    ld_c = (LANE >> 4) * 8
    x_flat = x.reshape(-1)
    for bx in range((M + BM - 1) // BM):
        for by in range((N + BN - 1) // BN):
            m0, n0 = bx * BM, by * BN
            rows = [m0 + (tid >> 2) + i * 64 for i in range(2)]
            a_ok = [m < M for m in rows]
            mm = [np.where(ok, m, 0) for m, ok in zip(rows, a_ok)]
            a_b = [(m // Wo) // Ho for m in mm]
            a_ih = [((m // Wo) % Ho) * stride - pad for m in mm]
            a_iw = [(m % Wo) * stride - pad for m in mm]
            b_ok = n0 + b_col < N

            def load(step):
                tap = step // chunks
                c0 = (step - tap * chunks) * BK
                kh, kw = tap // KW, tap % KW
                ra = np.zeros((2, 256, 8), dtype=np.float16)
                for i in range(2):
                    ih, iw = a_ih[i] + kh, a_iw[i] + kw
                    c = c0 + a_seg * 8
                    inside = a_ok[i] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                    src = np.where(inside, ((a_b[i] * H + ih) * W + iw) * C + c, 0)
                    v = x_flat[src[:, None] + np.arange(8)].astype(np.float32)
                    if in_bias is not None:
                        v = v + in_bias[c[:, None] + np.arange(8)]
                    if in_relu:
                        v = np.maximum(v, 0.0)
                    ra[i] = np.where(inside[:, None], v.astype(np.float16), np.float16(0))
                k = tap * C + c0 + b_row
                wv = w[k[:, None], np.minimum(n0 + b_col, N - 8)[:, None] + np.arange(8)]
                rb = np.where(b_ok[:, None], wv, np.float16(0))
                return ra, rb

            As = np.full((2, BM, LDA), np.nan, dtype=np.float16)
            Bs = np.full((2, BK, LDB), np.nan, dtype=np.float16)

            def store(buf, ra, rb):
                for i in range(2):
                    As[buf, ((tid >> 2) + i * 64)[:, None], a_seg[:, None] * 8 + np.arange(8)] = ra[i]
                Bs[buf, b_row[:, None], b_col[:, None] + np.arange(8)] = rb

            acc = np.zeros((2, 4, 8, 32, 4), dtype=np.float32)
            store(0, *load(0))
            for step in range(steps):
                buf = step & 1
                nxt = load(step + 1) if step + 1 < steps else None
                for kk in range(0, BK, 16):
                    fa = [ldmatrix_x4(As[buf], warp_m + i * 16 + ld_r, kk + ld_c + 0 * warp_m) for i in range(2)]
                    fb = [ldmatrix_x4(Bs[buf], kk + ld_r + 0 * warp_n, warp_n + p * 16 + ld_c, trans=True)
                          for p in range(2)]
                    for i in range(2):
                        for j in range(4):
                            mma_16816(acc[i, j], fa[i], fb[j >> 1][:, :, (j & 1) * 2], fb[j >> 1][:, :, (j & 1) * 2 + 1])
                if nxt is not None:
                    store(buf ^ 1, *nxt)
            Cs = np.full((BM, LDC), np.nan, dtype=np.float32)
            for i in range(2):
                for j in range(4):
                    for e in range(4):
                        Cs[warp_m + i * 16 + G + (e >> 1) * 8, warp_n + j * 8 + T * 2 + (e & 1)] = acc[i, j, :, :, e]
            for i in range(4):
                v = tid + i * 256
                r, col = v >> 3, (v & 7) * 8
                m = m0 + r
                ok = (m < M) & (n0 + col < N)
                vals = Cs[r[ok, None], col[ok, None] + np.arange(8)].astype(np.float16)
                z[m[ok, None], n0 + col[ok, None] + np.arange(8)] = vals
    return z


def test_fragment_index_maps_cover_each_tile_once():
    for index, shape, count in ((_a_index, (16, 16), 8), (_b_index, (16, 8), 4), (_c_index, (16, 8), 4)):
        seen = np.zeros(shape, dtype=int)
        for i in range(count):
            r, c = index(i)
            np.add.at(seen, (r, c), 1)
        assert np.all(seen == 1)


@pytest.mark.parametrize("C,N,stride,H,relu", [(32, 64, 1, 9, True), (64, 72, 2, 7, False), (32, 8, 2, 5, True),
                                               (96, 128, 1, 4, True)])
def test_emulated_implicit_gemm_kernel_equals_im2col_gemm(rng, tol, C, N, stride, H, relu):
    """The kernel's indexing, fragments and epilogue on the CPU: M is not a multiple of the
    128-row tile, and N is not a multiple of 64 in two cases."""
    x = rng.normal(size=(3, H, H + 1, C)).astype(np.float16)
    bias = rng.normal(size=C).astype(np.float32)
    w = (rng.normal(size=(3, 3, C, N)) / np.sqrt(9 * C)).astype(np.float16)
    cols = im2col(x.astype(np.float32), bias, (3, 3), stride, 1, in_relu=relu).astype(np.float16)
    ref = cols.astype(np.float32) @ w.reshape(-1, N).astype(np.float32)
    got = emulate_conv_implicit(x, bias, relu, w.reshape(-1, N), 3, 3, stride, 1)
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got.astype(np.float32), ref, rtol=tol["float16_rtol"] * 4, atol=2e-3)


def test_emulation_catches_a_wrong_fragment_layout(rng, monkeypatch):
    """Negative control: swapping the A fragment's two middle registers breaks the product."""
    x = rng.normal(size=(1, 4, 4, 32)).astype(np.float16)
    w = (rng.normal(size=(1, 1, 32, 8))).astype(np.float16)
    ref = x.reshape(-1, 32).astype(np.float32) @ w.reshape(32, 8).astype(np.float32)
    good = emulate_conv_implicit(x, None, False, w.reshape(32, 8), 1, 1, 1, 0)
    np.testing.assert_allclose(good.astype(np.float32), ref, rtol=4e-3, atol=2e-3)
    real = ldmatrix_x4

    def swapped(smem, row, col, trans=False):
        out = real(smem, row, col, trans)
        return out if trans else out[:, :, [0, 2, 1, 3]]

    monkeypatch.setitem(globals(), "ldmatrix_x4", swapped)
    bad = emulate_conv_implicit(x, None, False, w.reshape(32, 8), 1, 1, 1, 0)
    assert np.abs(bad.astype(np.float32) - ref).max() > 0.1
