"""Per-kernel GPU profile of the rasterizer, interpolation and their backward passes.

    python3 bench/profile_rasterize.py            # B = 64 and B = 1, spherical cap 189x189, 224x224

Every kernel of the rasterize / interpolate / backward pipelines is timed on its own with CUDA events
(median and min over repeats; a busy-wait kernel queued first keeps the GPU ahead of Python, so
the events see the kernels, not the launch latency), next to variants that a choice depends on:
grid shapes (block size, images per thread), a per-vertex pre-pass, the forward without its
atomics or without its edges (where the time goes), a resolve that re-clears the key buffer
(instead of a memset), scalar against vector atomics in the fused backward, register caps and
--fmad=true (information only: the library needs --fmad=false for CPU/GPU bit parity). Then
whole ops: device time per call of back-to-back calls at B = 64, wall time per call at B = 1.
Variants that must give the library's numbers are checked and print "same" or "DIFFERENT".

Variant kernels live in bench/rasterize_variants.cu (appended to kernels/rasterize.cu's source,
compiled with the library's options); nothing here changes what the library runs. Takes about
10-20 s on an H100/H200, most of it NVRTC compiles.
"""
import importlib
import pathlib
import statistics
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import fastface  # noqa: E402
from bench.workloads import spherical_cap  # noqa: E402
from fastface._backend import read_kernel_source  # noqa: E402

R = importlib.import_module("fastface.ops.rasterize")
I = importlib.import_module("fastface.ops.interpolate")

RES = (224, 224)
GRID = 189
REPS = 30
ROWS = []


def _i32(*xs):
    return tuple(np.int32(x) for x in xs)


def _compile(cupy, extra_options=(), variants=True):
    src = read_kernel_source("rasterize.cu")  # with kernels/*.cuh pasted in, as the library compiles it
    if variants:
        src += "\n" + (ROOT / "bench" / "rasterize_variants.cu").read_text()
    names = tuple(R._GPU_NAMES)
    module = cupy.RawModule(code=src, options=("-std=c++17",) + tuple(extra_options), name_expressions=names)
    module.compile()
    return module


class Timer:
    def __init__(self, cupy, spin):
        self.cupy = cupy
        self.spin = spin

    def __call__(self, launch, setup=None, reps=REPS):
        """(median, min) microseconds of launch() alone; setup() runs before each, untimed."""
        cupy = self.cupy
        events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(reps)]
        if setup:
            setup()
        launch()  # warm-up
        self.spin((1,), (1,), (np.int64(reps * 60_000 + 200_000),))  # ~60 us of Python per repeat
        for start, stop in events:
            if setup:
                setup()
            start.record()
            launch()
            stop.record()
        events[-1][1].synchronize()
        us = [cupy.cuda.get_elapsed_time(a, b) * 1e3 for a, b in events]
        return statistics.median(us), min(us)


def row(section, name, t, note=""):
    med, lo = t
    ROWS.append((section, name, med, lo, note))
    print(f"{section:<9} {name:<64} {med:9.1f} {lo:9.1f}  {note}", flush=True)


def gbps(nbytes, t):
    return f"{nbytes / (t[0] * 1e-6) / 1e9:,.0f} GB/s"


def profile_batch(cupy, mods, timer, B):
    main, fmad, caps = mods["main"], mods["fmad"], mods["caps"]
    pos, tri, colors = spherical_cap(n=GRID, batch=B, xp=cupy)
    V, T = pos.shape[1], tri.shape[0]
    H, W = RES
    HW = H * W
    rng = np.random.default_rng(1)
    grad_out = cupy.asarray(rng.standard_normal((B, H, W, 3)).astype(np.float32))
    grad_bary = cupy.asarray(rng.standard_normal((B, H, W, 2)).astype(np.float32))
    stream = cupy.cuda.get_current_stream().ptr
    zbuf = cupy.empty((B, H, W), cupy.uint64)
    zref = cupy.empty_like(zbuf)
    tri_id = cupy.empty((B, H, W), cupy.int32)
    bary = cupy.empty((B, H, W, 2), cupy.float32)
    depth = cupy.empty((B, H, W), cupy.float32)
    out = cupy.empty((B, H, W, 3), cupy.float32)
    scr = cupy.empty((B, V, 4), cupy.float32)
    dims = _i32(B, V, T, H, W)
    inverses = (np.float64(1.0 / W), np.float64(1.0 / H))  # the resolve's 1 / W and 1 / H
    sec = f"B={B}"
    print(f"\n== B = {B}: {T} triangles, {V} vertices, {H}x{W}; us per launch (median, min of {REPS}) ==")
    print(f"{'section':<9} {'kernel / variant':<64} {'median':>9} {'min':>9}  note")

    def clear():
        cupy.cuda.runtime.memsetAsync(zbuf.data.ptr, 0xFF, zbuf.nbytes, stream)

    def fwd_launch(mod, name="rasterize_fwd", block=256, ipt=1, first=pos):
        grid = ((T + block - 1) // block, min(-(-B // ipt), 65535))
        fn = mod.get_function(name)
        extra = (pos,) if name == "rasterize_fwd_screen" else ()  # its clipper reads the clip positions
        return lambda: fn(grid, (block,), (first, tri) + dims + (np.int32(0), zbuf) + extra)

    # --- forward: the key buffer ---
    t = timer(clear)
    row(sec, "memset zbuf 0xFF (cudaMemsetAsync)", t, gbps(zbuf.nbytes, t))
    copy_t = timer(lambda: zref.__setitem__(Ellipsis, zbuf))
    row(sec, "reference: d2d copy of zbuf (cupy)", copy_t, gbps(2 * zbuf.nbytes, copy_t))

    # --- forward: the triangle pass and its variants ---
    clear()
    fwd_launch(main)()
    zref[...] = zbuf
    n_frag = int((zref != np.uint64(0xFFFFFFFFFFFFFFFF)).sum())
    print(f"          ({n_frag} covered pixels = {n_frag / (B * HW):.1%}; {B * T} triangle-threads)")
    for block in (256, 128, 512, 64):
        for ipt in (1, 2, 4, 8):
            if ipt > 1 and block != 256:
                continue
            t = timer(fwd_launch(main, block=block, ipt=ipt), setup=clear)
            row(sec, f"rasterize_fwd block {block}, {ipt} image(s)/thread", t, "library" if (block, ipt) == (R._FWD_BLOCK, R._FWD_IMAGES_PER_THREAD)
                else "")
    t = timer(fwd_launch(main, "rasterize_fwd_serial_loads"), setup=clear)
    clear()
    fwd_launch(main, "rasterize_fwd_serial_loads")()
    row(sec, "rasterize_fwd_serial_loads (before hoisting the vertex loads)", t,
        "same keys" if bool((zbuf == zref).all()) else "DIFFERENT keys")
    for name, what in (("rasterize_fwd_fast_first", "the band and validity tests after the three fast tests"),
                       ("rasterize_fwd_bound_256x3", "launch bound 256 x 3: up to 85 registers")):
        lib_shape = dict(block=R._FWD_BLOCK, ipt=R._FWD_IMAGES_PER_THREAD)
        t = timer(fwd_launch(main, name, **lib_shape), setup=clear)
        clear()
        fwd_launch(main, name, **lib_shape)()
        row(sec, f"{name} ({what})", t, "same keys" if bool((zbuf == zref).all()) else "DIFFERENT keys")
    t = timer(fwd_launch(main, "rasterize_fwd_v1", block=R._FWD_BLOCK), setup=clear)
    clear()
    fwd_launch(main, "rasterize_fwd_v1", block=R._FWD_BLOCK)()
    row(sec, f"rasterize_fwd_v1 block {R._FWD_BLOCK} (before: canonical edges, nested loops)", t,
        "same keys" if bool((zbuf == zref).all()) else "DIFFERENT keys")
    row(sec, "rasterize_fwd_no_atomics (setup + edges + depth)", timer(fwd_launch(main, "rasterize_fwd_no_atomics")))
    row(sec, "rasterize_fwd_setup_only (loads + setup + bbox)", timer(fwd_launch(main, "rasterize_fwd_setup_only")))
    pre = main.get_function("rasterize_setup")
    pre_launch = lambda: pre(((V + 255) // 256, min(B, 65535)), (256,), (pos,) + _i32(B, V, H, W) + (scr,))  # noqa: E731
    t = timer(pre_launch)
    row(sec, "rasterize_setup (per-vertex pre-pass, _FWD_PREPASS)", t, gbps(2 * pos.nbytes, t))
    pre_launch()
    t = timer(fwd_launch(main, "rasterize_fwd_screen", first=scr), setup=clear)
    clear()
    fwd_launch(main, "rasterize_fwd_screen", first=scr)()
    row(sec, "rasterize_fwd_screen (after the pre-pass)", t,
        "same keys" if bool((zbuf == zref).all()) else "DIFFERENT keys")
    for label, mod in (("--fmad=true", fmad),) + tuple((f"--maxrregcount={n}", m) for n, m in caps.items()):
        t = timer(fwd_launch(mod), setup=clear)
        clear()
        fwd_launch(mod)()
        row(sec, f"rasterize_fwd compiled with {label}", t, "same keys" if bool((zbuf == zref).all()) else
            "DIFFERENT keys")

    # --- forward: the resolve pass ---
    def resolve(mod, C=0, block=256, name=None, ipt=1):
        grid = ((HW + block - 1) // block, min(-(-B // ipt), 65535))
        attr = colors if C else zbuf
        kname = name or f"rasterize_resolve<{C}>"
        fn = mod.get_function(kname)
        return lambda: fn(grid, (block,), (pos, tri, zbuf) + dims + inverses + (
            attr, np.int32(C), np.int32(0), tri_id, bary, depth, out if C else depth))

    zbuf[...] = zref
    px_bytes = 8 + 4 + 8 + 4
    for block in (256, 128, 512):
        t = timer(resolve(main, 0, block))
        row(sec, f"rasterize_resolve<0> block {block}", t, gbps(B * HW * px_bytes, t) + (" library" if block == 256
                                                                                          else ""))
    t = timer(resolve(main, 3))
    row(sec, "rasterize_resolve<3> (fused interpolation)", t, gbps(B * HW * (px_bytes + 12), t))
    for ipt in (2, 4):  # a thread's index arithmetic shared by ipt images (the outputs do not depend on it)
        t = timer(resolve(main, 3, ipt=ipt))
        row(sec, f"rasterize_resolve<3>, {ipt} images/thread", t, gbps(B * HW * (px_bytes + 12), t))
    # Two pixels per thread, vector loads and stores (bench/rasterize_variants.cu): same outputs?
    resolve(main, 3)()
    ref3 = (tri_id.copy(), bary.copy(), depth.copy(), out.copy())
    pairs = main.get_function("rasterize_resolve_pairs3")
    pairs_launch = lambda: pairs(((HW // 2 + 255) // 256, min(B, 65535)), (256,), (pos, tri, zbuf) + dims + (  # noqa: E731
        colors, np.int32(0), tri_id, bary, depth, out))
    t = timer(pairs_launch)
    pairs_launch()
    same = all(bool((a == b).all()) for a, b in zip((tri_id, bary, depth, out), ref3))
    row(sec, "rasterize_resolve_pairs3 (2 pixels a thread, vector stores)", t,
        gbps(B * HW * (px_bytes + 12), t) + (" same outputs" if same else " DIFFERENT outputs"))
    row(sec, "rasterize_resolve<0> compiled with --fmad=true", timer(resolve(fmad, 0)))
    resolve(main, 0)()
    ref = (tri_id.copy(), bary.copy(), depth.copy())
    rc = main.get_function("rasterize_resolve_clear0")
    rc_launch = lambda: rc(((HW + 255) // 256, min(B, 65535)), (256,), (pos, tri, zbuf) + dims + inverses + (  # noqa: E731
        tri_id, bary, depth))
    t = timer(rc_launch, setup=lambda: zbuf.__setitem__(Ellipsis, zref))
    zbuf[...] = zref
    rc_launch()
    same = all(bool((a == b).all()) for a, b in zip((tri_id, bary, depth), ref)) and bool(
        (zbuf == np.uint64(0xFFFFFFFFFFFFFFFF)).all())
    row(sec, "rasterize_resolve_clear0 (resolve + write the empty key back)", t,
        "same, buffer cleared" if same else "DIFFERENT")

    # --- interpolation (separate path) ---
    tri_id[...], bary[...] = ref[0], ref[1]
    ik = I._gpu_kernel
    grid_px = ((HW + 255) // 256, min(B, 65535))
    t = timer(lambda: ik("interpolate_fwd<3>")(grid_px, (256,), (colors, tri_id, bary, tri) + dims + _i32(3, 0) + (
        out,)))
    row(sec, "interpolate_fwd<3>", t)
    grad_attr3 = cupy.zeros((V, 3), cupy.float32)
    gb = cupy.empty((B, H, W, 2), cupy.float32)
    zero_ga3 = lambda: grad_attr3.fill(0)  # noqa: E731
    t = timer(lambda: ik("interpolate_bwd<3>")(grid_px, (256,), (colors, tri_id, bary, tri, grad_out) + dims + _i32(
        3, 0) + (grad_attr3, gb)), setup=zero_ga3)
    row(sec, "interpolate_bwd<3> (scalar atomics)", t)

    # --- backward ---
    grad_pos = cupy.zeros((B, V, 4), cupy.float32)
    acc4 = cupy.zeros((V, 4), cupy.float32)

    def zero_pos():
        cupy.cuda.runtime.memsetAsync(grad_pos.data.ptr, 0, grad_pos.nbytes, stream)

    t = timer(zero_pos)
    row(sec, "memset grad_pos (B, V, 4) zeros", t, gbps(grad_pos.nbytes, t))
    bwd = main.get_function("rasterize_bwd")
    t = timer(lambda: bwd(grid_px, (256,), (pos, tri, tri_id, grad_bary) + dims + (
        grad_pos,)), setup=zero_pos)
    row(sec, "rasterize_bwd (grad_bary -> grad_pos)", t)

    def fused_bwd(name, acc):
        fn = main.get_function(name)
        return lambda: fn(grid_px, (256,), (pos, tri, colors, tri_id, grad_out) + dims + _i32(
            3, 0) + (grad_pos, acc))

    def zero_both(acc):
        def f():
            zero_pos()
            acc.fill(0)
        return f

    t4 = timer(fused_bwd("rasterize_interpolate_bwd<3>", acc4), setup=zero_both(acc4))
    row(sec, "rasterize_interpolate_bwd<3> (float4 attr atomics)", t4, "library")
    t1 = timer(fused_bwd("rasterize_interpolate_bwd<-1>", grad_attr3), setup=zero_both(grad_attr3))
    row(sec, "rasterize_interpolate_bwd<-1> C=3 (scalar attr atomics)", t1, "before this change")
    zero_both(acc4)()
    fused_bwd("rasterize_interpolate_bwd<3>", acc4)()
    v4 = acc4[:, :3].get()
    zero_both(grad_attr3)()
    fused_bwd("rasterize_interpolate_bwd<-1>", grad_attr3)()
    v1 = grad_attr3.get()
    print(f"          (float4 vs scalar attribute gradient: max |diff| {np.abs(v4 - v1).max():.2e}, "
          f"max |value| {np.abs(v1).max():.2e})")
    f43 = main.get_function("float4_to_float3")
    row(sec, "float4_to_float3 (V, 4) -> (V, 3)", timer(lambda: f43(((V + 255) // 256,), (256,), (
        acc4, np.int32(V), grad_attr3))))
    attr_b = cupy.asarray(np.broadcast_to(colors.get(), (B, V, 3)).copy())
    acc4b = cupy.zeros((B, V, 4), cupy.float32)
    fb3 = main.get_function("rasterize_interpolate_bwd<3>")
    t = timer(lambda: fb3(grid_px, (256,), (
        pos, tri, attr_b, tri_id, grad_out) + dims + _i32(3, 1) + (grad_pos, acc4b)), setup=zero_both(acc4b))
    row(sec, "rasterize_interpolate_bwd<3>, per-image attributes", t, "no cross-image contention")


def profile_ops(cupy, B):
    """Whole ops as the benchmark calls them: device us per call of back-to-back calls (B >= 8)
    or wall us per call, synchronised (B = 1)."""
    pos, tri, colors = spherical_cap(n=GRID, batch=B, xp=cupy)
    grad_out = cupy.asarray(np.random.default_rng(1).standard_normal((B,) + RES + (3,)).astype(np.float32))
    if B == 1:
        pos = pos[0]

    def fused():
        raster, img = R.rasterize_interpolate(pos, tri, RES, colors)
        return R.rasterize_interpolate_backward(pos, tri, colors, raster, grad_out)

    def separate():
        raster = R.rasterize(pos, tri, RES)
        I.interpolate(colors, raster, tri)
        grad_colors, grad_bary = I.interpolate_backward(colors, raster, tri, grad_out)
        return R.rasterize_backward(pos, tri, raster, grad_bary), grad_colors

    ops = {"rasterize": lambda: R.rasterize(pos, tri, RES),
           "rasterize_interpolate (fused)": lambda: R.rasterize_interpolate(pos, tri, RES, colors),
           "fwd+bwd fused": fused, "fwd+bwd separate": separate}
    targets = {64: {"rasterize": 100, "rasterize_interpolate (fused)": 150, "fwd+bwd fused": 300},
               1: {"rasterize": 50, "rasterize_interpolate (fused)": 50}}.get(B, {})
    print(f"\n== whole ops, B = {B}: " + ("device us per call, 50 back-to-back calls (median of 5)" if B > 1 else
                                         "wall us per synchronised call (median, min of 300)") + " ==")
    with fastface.value_checks(False):
        for name, fn in ops.items():
            fn()
            cupy.cuda.Device().synchronize()
            if B > 1:
                per = []
                for _ in range(5):
                    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
                    start.record()
                    for _ in range(50):
                        fn()
                    stop.record()
                    stop.synchronize()
                    per.append(cupy.cuda.get_elapsed_time(start, stop) * 1e3 / 50)
                t = (statistics.median(per), min(per))
            else:
                walls = []
                for _ in range(300):
                    t0 = time.perf_counter()
                    fn()
                    cupy.cuda.Device().synchronize()
                    walls.append((time.perf_counter() - t0) * 1e6)
                t = (statistics.median(walls), min(walls))
            target = targets.get(name)
            row(f"ops B={B}", name, t, f"target {target} us" if target else "")


def main():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # noqa: BLE001
        print(f"needs cupy and a CUDA GPU: {type(err).__name__}: {err}")
        return 1
    t0 = time.perf_counter()
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    print(f"device: {props['name'].decode()}, {props['multiProcessorCount']} SMs; cupy {cupy.__version__}")
    main_mod = _compile(cupy, ("--fmad=false",))
    fmad_mod = _compile(cupy, ())
    caps = {n: _compile(cupy, ("--fmad=false", f"--maxrregcount={n}")) for n in (48, 40)}
    spin = main_mod.get_function("spin_ns")
    print(f"compiled in {time.perf_counter() - t0:.1f} s")
    timer = Timer(cupy, spin)
    mods = {"main": main_mod, "fmad": fmad_mod, "caps": caps}
    for B in (64, 1):
        profile_batch(cupy, mods, timer, B)
    for B in (64, 1):
        profile_ops(cupy, B)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
