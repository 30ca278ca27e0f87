"""Value checks on the GPU that do not make the host wait (fastface/_device_checks.py).

The bookkeeping (slots, generations, which failure is reported, and how) is tested on the CPU with
a record in ordinary memory whose words the tests write the way kernels/checks.cu does. The
kernel, the deferred reports and the absence of any host synchronisation in the ops are tested on
the GPU.
"""
import ctypes
import pathlib
import re
import types

import numpy as np
import pytest

import fastface
from fastface import _device_checks
from fastface._device_checks import _SLOTS, _Record
from tests.cuda_emulation import build_emulated_library


@pytest.fixture
def host_record(monkeypatch):
    """A record in numpy memory, installed as the process's record."""
    record = _Record(np.zeros(1 + _SLOTS, np.uint64), address=0)
    monkeypatch.setattr(_device_checks, "_record", record)
    return record


def _kernel_reports(record, slot, generation):
    """What flag_values_outside does when it finds a bad value: the slot, then word 0."""
    record.words[1 + slot] = generation
    record.words[0] = generation


def test_value_checks_takes_true_false_or_sync_only():
    for mode in (True, False, "sync"):
        with fastface.value_checks(mode):
            pass
    for bad in (1, 0, None, "Sync", "deferred"):
        with pytest.raises(ValueError, match="value_checks takes True, False or 'sync'"):
            with fastface.value_checks(bad):
                pass


def test_nothing_is_raised_while_no_check_failed(host_record):
    host_record.register("{} holds NaN", ("pos",))
    _device_checks.raise_failed_checks()
    host_record.words[0] = 0


def test_a_failed_check_raises_its_message_once(host_record):
    slot, generation = host_record.register("{} {} holds NaN or infinite values", ("pos", (2, 3)))
    _kernel_reports(host_record, slot, generation)
    with pytest.raises(ValueError, match=r"pos \(2, 3\) holds NaN or infinite values \(found on the GPU.*'sync'"):
        _device_checks.raise_failed_checks()
    assert host_record.words[0] == 0, "the record is cleared once read"
    _device_checks.raise_failed_checks()  # reported once, not again


def test_the_earliest_failure_is_raised_and_later_ones_counted(host_record):
    ok = host_record.register("ok {}", (0,))
    first = host_record.register("first {}", (1,))
    second = host_record.register("second {}", (2,))
    _kernel_reports(host_record, *second)  # the kernels may finish in any order
    _kernel_reports(host_record, *first)
    with pytest.raises(ValueError, match=r"^first 1 .*; 1 later checks failed too, the first: second 2$"):
        _device_checks.raise_failed_checks()
    assert host_record.messages[ok[0]] is not None, "a check that passed keeps its slot until reused"


def test_a_slot_reused_by_a_later_check_is_not_blamed_for_an_old_failure(host_record):
    old_slot, old_generation = host_record.register("old {}", (1,))
    _kernel_reports(host_record, old_slot, old_generation)
    with pytest.raises(ValueError, match="old 1"):
        _device_checks.raise_failed_checks()
    for _ in range(_SLOTS - 1):
        host_record.register("filler", ())
    slot, generation = host_record.register("new {}", (2,))
    assert slot == old_slot and generation != old_generation
    host_record.words[0] = 99  # some other check failed; this slot still holds the old generation
    with pytest.raises(ValueError, match="its record before it was read"):
        _device_checks.raise_failed_checks()


def test_a_failure_whose_slot_was_reused_before_it_was_read_gets_a_generic_message(host_record):
    slot, generation = host_record.register("lost {}", (1,))
    _kernel_reports(host_record, slot, generation)
    for _ in range(_SLOTS):
        host_record.register("later", ())
    with pytest.raises(ValueError, match=f"more than {_SLOTS} later checks reused its record"):
        _device_checks.raise_failed_checks()


def test_a_failure_never_read_is_printed_at_exit(host_record, capsys):
    slot, generation = host_record.register("{} holds NaN", ("colors",))
    _kernel_reports(host_record, slot, generation)
    _device_checks._report_at_exit()
    assert "a GPU value check failed and was never reported: colors holds NaN" in capsys.readouterr().err
    _device_checks._report_at_exit()
    assert capsys.readouterr().err == "", "reported once"


def test_check_device_errors_without_any_gpu_check_is_a_no_op(monkeypatch):
    monkeypatch.setattr(_device_checks, "_record", None)
    fastface.check_device_errors()


def test_numpy_inputs_are_never_queued_on_a_device():
    assert not fastface._checks.queue_on_device(np.zeros(3, np.float32), 0, 1, "x")


class _ArrayOnFakeDevice(np.ndarray):
    """A numpy array that answers `.device.id` as a cupy array does."""

    @property
    def device(self):
        return types.SimpleNamespace(id=0)


_C_TO_NUMPY = {"long long": np.int64, "unsigned long long": np.uint64, "int": np.int32,
               "float": np.float32, "double": np.float64}


def _kernel_parameter_types():
    """The C types of flag_values_outside's parameters, in order, read from kernels/checks.cu."""
    source = (pathlib.Path(__file__).resolve().parent.parent / "kernels" / "checks.cu").read_text()
    parameters = re.search(r"flag_values_outside\((.*?)\)", source, re.S).group(1)
    return [re.sub(r"\s*\w+$", "", p.replace("const", "").replace("__restrict__", "").strip()).strip()
            for p in parameters.split(",")]


def test_queue_check_launches_with_the_kernel_signature_and_meaning(host_record, monkeypatch):
    # The launch is emulated on the host with the meaning of kernels/checks.cu, reading the arguments
    # in the kernel's parameter order and checking that each has the width of its C type: a swapped or
    # mistyped argument would be garbage on the GPU, and this catches it where no GPU is present.
    c_types = _kernel_parameter_types()
    assert c_types == ["T*", "long long", "long long", "long long", "Bound", "Bound", "unsigned long long", "int",
                       "unsigned long long"]
    launches = []

    def fake_kernel(name):
        def launch(grid, block, args):
            values = args[0]
            element, bound = re.fullmatch(r"flag_values_outside<(.+), (.+)>", name).groups()
            assert np.dtype(_C_TO_NUMPY.get(element, np.float16)) == values.dtype, (name, values.dtype)
            for c_type, arg in zip(c_types[1:], args[1:]):
                expected = np.dtype(_C_TO_NUMPY[bound if c_type == "Bound" else c_type])
                assert np.asarray(arg).dtype == expected, (name, c_type, arg)
            count, offset, stride, lo, hi, _address, slot, generation = args[1:]
            picked = np.asarray(values).ravel()[offset + stride * np.arange(count)]
            if not np.all((picked >= lo) & (picked <= hi)):
                _kernel_reports(host_record, int(slot), generation)
            launches.append((name, grid, block))
        return launch

    monkeypatch.setattr(_device_checks, "_KERNELS", fake_kernel)
    monkeypatch.setattr(_device_checks, "_the_record", lambda: host_record)
    points = np.zeros((2, 5, 3), np.float32).view(_ArrayOnFakeDevice)
    points[..., 2] = -1.0
    assert _device_checks.queue_check(points, -10.0, -0.5, "z {}", "in front", offset=2, stride=3, count=10)
    _device_checks.raise_failed_checks()
    points[1, 4, 2] = 0.0
    points[0, 0, 0] = 5.0  # not a z: outside the strided view
    _device_checks.queue_check(points, -10.0, -0.5, "z {}", "behind", offset=2, stride=3, count=10)
    with pytest.raises(ValueError, match="z behind"):
        _device_checks.raise_failed_checks()
    tri = np.array([[0, 1, 2], [2, 3, -1]], np.int32).view(_ArrayOnFakeDevice)
    _device_checks.queue_check(tri, 0, 3, "tri {}", "range")
    with pytest.raises(ValueError, match="tri range"):
        _device_checks.raise_failed_checks()
    half = np.array([1.0, np.inf], np.float16).view(_ArrayOnFakeDevice)
    _device_checks.queue_check(half, -65504.0, 65504.0, "half {}", "inf")
    with pytest.raises(ValueError, match="half inf"):
        _device_checks.raise_failed_checks()
    assert [name for name, _, _ in launches] == (["flag_values_outside<float, float>"] * 2
                                                + ["flag_values_outside<int, int>", "flag_values_outside<__half, float>"])
    assert not _device_checks.queue_check(tri.astype(np.int64).view(_ArrayOnFakeDevice), 0, 3, "no kernel"), \
        "a dtype without a kernel is left to the host"


_CHECKS_EMU_SHIM = r"""
#include <cmath>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct dim3 { unsigned x, y, z; };
static dim3 blockIdx, blockDim, threadIdx, gridDim;
// Blocks of one thread: the barrier's OR over the block is the thread's own flag.
inline bool __syncthreads_or(bool x) { return x; }
inline void __threadfence_system() {}
#include "checks.cu"
template <typename T, typename Bound>
void launch(const T* values, long long count, long long offset, long long stride, Bound lo, Bound hi,
            unsigned long long record, int slot, unsigned long long generation, unsigned grid) {
    blockDim = {1, 1, 1}; gridDim = {grid, 1, 1}; threadIdx = {0, 0, 0};
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx = {b, 0, 0};
        flag_values_outside<T, Bound>(values, count, offset, stride, lo, hi, record, slot, generation);
    }
}
extern "C" {
void emu_float(const float* v, long long n, long long o, long long s, float lo, float hi, unsigned long long r,
               int slot, unsigned long long g, unsigned grid) { launch<float, float>(v, n, o, s, lo, hi, r, slot, g, grid); }
void emu_double(const double* v, long long n, long long o, long long s, double lo, double hi, unsigned long long r,
                int slot, unsigned long long g, unsigned grid) { launch<double, double>(v, n, o, s, lo, hi, r, slot, g, grid); }
void emu_int(const int* v, long long n, long long o, long long s, int lo, int hi, unsigned long long r,
             int slot, unsigned long long g, unsigned grid) { launch<int, int>(v, n, o, s, lo, hi, r, slot, g, grid); }
void emu_half(const __half* v, long long n, long long o, long long s, float lo, float hi, unsigned long long r,
              int slot, unsigned long long g, unsigned grid) { launch<__half, float>(v, n, o, s, lo, hi, r, slot, g, grid); }
}
"""

# The host stand-in for CUDA's half type: GCC's _Float16, converted to float exactly.
_FAKE_CUDA_FP16 = "#pragma once\ntypedef _Float16 __half;\ninline float __half2float(__half h) { return (float)h; }\n"


@pytest.fixture(scope="module")
def checks_emulated(tmp_path_factory):
    build = tmp_path_factory.mktemp("checks_emulated")
    (build / "cuda_fp16.h").write_text(_FAKE_CUDA_FP16)
    lib = build_emulated_library(build, _CHECKS_EMU_SHIM, (f"-I{build}", "-Wall", "-Werror"))
    c = ctypes
    for name, bound in (("emu_float", c.c_float), ("emu_double", c.c_double), ("emu_int", c.c_int),
                        ("emu_half", c.c_float)):
        getattr(lib, name).argtypes = [c.c_void_p, c.c_longlong, c.c_longlong, c.c_longlong, bound, bound,
                                       c.c_ulonglong, c.c_int, c.c_ulonglong, c.c_uint]
    return lib


@pytest.mark.parametrize("dtype, entry", [(np.float32, "emu_float"), (np.float64, "emu_double"),
                                          (np.int32, "emu_int"), (np.float16, "emu_half")])
def test_check_kernel_emulated_on_the_host_flags_exactly_the_values_outside(checks_emulated, rng, dtype, entry):
    # kernels/checks.cu's own code, compiled for the host with blocks of one thread: every value
    # outside [lo, hi] (and NaN) among the strided elements is found, whatever the grid size, and
    # nothing is written when all are inside.
    launch = getattr(checks_emulated, entry)
    values = (rng.uniform(-5, 5, 3 * 40) if dtype != np.int32 else rng.integers(-5, 6, 3 * 40)).astype(dtype)
    values[values > 4] = 4  # so that [lo, hi] = [-5, 4] holds everything at first
    record = np.zeros(1 + 8, np.uint64)
    for grid in (1, 7, 200):
        for offset, stride, count in ((0, 1, 120), (2, 3, 40)):
            launch(values.ctypes.data, count, offset, stride, -5, 4, record.ctypes.data, 3, 11, grid)
            assert not record.any(), (grid, offset, stride)
    bad = [(2 + 3 * 17, 5), (2 + 3 * 39, -6)] + ([] if dtype == np.int32 else [(2 + 3 * 5, np.nan)])
    for index, value in bad:
        trial = values.copy()
        trial[index] = value
        for grid in (1, 7, 200):
            record[:] = 0
            launch(trial.ctypes.data, 40, 2, 3, -5, 4, record.ctypes.data, 3, 11, grid)
            assert record[0] == 11 and record[1 + 3] == 11 and not np.delete(record, [0, 4]).any(), (index, grid)
            record[:] = 0
            launch(trial.ctypes.data, 40, 1, 3, -5, 4, record.ctypes.data, 3, 11, grid)  # another component
            assert not record.any(), "a value outside the strided view was flagged"


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------

@pytest.fixture
def gpu_scene(cupy, rng):
    """A small batch of camera-space points in front of the camera, its triangles and its clip positions."""
    n = 9
    xs, ys = np.meshgrid(np.linspace(-0.1, 0.1, n), np.linspace(-0.1, 0.1, n))
    points = np.stack([xs.ravel(), ys.ravel(), -0.5 + 0.01 * rng.standard_normal(n * n)], -1).astype(np.float32)
    quads = [(r * n + c, r * n + c + 1, (r + 1) * n + c + 1, (r + 1) * n + c) for r in range(n - 1) for c in range(n - 1)]
    tri = np.array([t for a, b, c, d in quads for t in ((a, b, c), (a, c, d))], np.int32)
    pos = fastface.perspective_projection(np.repeat(points[None], 2, 0), 200.0, (32, 32))
    return cupy.asarray(points), cupy.asarray(tri), cupy.asarray(pos)


def _raised_once(call, expected):
    """The call returns without waiting for its checks; their failure is raised by the first check that
    reads the record after the GPU wrote it. On a busy GPU that is check_device_errors(); on an idle
    one the check kernel can finish within microseconds, before a later check of the same call reads
    the record, which then raises in the call itself. Either way it is raised once."""
    with pytest.raises(ValueError, match=expected):
        call()
        fastface.check_device_errors()
    fastface.check_device_errors()  # reported once


def test_gpu_bad_values_raise_at_check_device_errors(cupy, gpu_scene):
    points, tri, pos = gpu_scene
    bad = pos.copy()
    bad[1, 5, 0] = np.nan
    _raised_once(lambda: fastface.rasterize(bad, tri, (32, 32)),
                 r"pos float32 \(2, 81, 4\) holds NaN or infinite values")


def test_gpu_a_failure_is_raised_by_the_next_checked_call(cupy, gpu_scene):
    points, tri, pos = gpu_scene
    bad_tri = tri.copy()
    bad_tri[3, 1] = 81
    fastface.rasterize(pos, bad_tri, (32, 32))
    cupy.cuda.get_current_stream().synchronize()  # the check has run; nothing has read its verdict yet
    with pytest.raises(ValueError, match=r"tri int32 \(128, 3\) holds vertex indices outside the valid range \[0, 80\]"):
        fastface.rasterize(pos, tri, (32, 32))
    fastface.check_device_errors()


@pytest.mark.parametrize("case", ["behind", "focal", "tri_id", "strided"])
def test_gpu_each_kind_of_value_check_is_deferred_and_named(cupy, gpu_scene, case):
    points, tri, pos = gpu_scene
    if case == "behind":
        behind = points.copy()
        behind[7, 2] = 0.25
        call = lambda: fastface.perspective_projection(behind, 200.0, (32, 32))  # noqa: E731
        expected = r"points \(1, 81, 3\) holds vertices behind the camera"
    elif case == "focal":
        call = lambda: fastface.project_to_pixels(  # noqa: E731
            cupy.stack([points, points]), cupy.asarray([200.0, -1.0], cupy.float32), (32, 32))
        expected = r"focal \(2,\) holds values that are not positive finite"
    elif case == "tri_id":
        raster = fastface.rasterize(pos, tri, (32, 32))
        raster.tri_id[0, 4, 4] = 500
        call = lambda: fastface.interpolate(cupy.ones((81, 3), cupy.float32), raster, tri)  # noqa: E731
        expected = r"raster.tri_id \(2, 32, 32\) holds triangle ids outside \[-1, 127\]"
    else:  # a non-contiguous view is checked through a contiguous copy
        attr = cupy.ones((81, 6), cupy.float32)
        attr[40, 2] = np.inf
        call = lambda: fastface.rasterize_interpolate(pos, tri, (32, 32), attr[:, ::2])  # noqa: E731
        expected = r"attr float32 \(81, 3\) holds NaN or infinite values"
    _raised_once(call, expected)


def test_gpu_sync_mode_raises_in_the_call_and_off_mode_never(cupy, gpu_scene):
    points, tri, pos = gpu_scene
    bad = pos.copy()
    bad[0, 0, 3] = np.inf
    with fastface.value_checks("sync"), pytest.raises(ValueError, match="pos holds 1 NaN or infinite values"):
        fastface.rasterize(bad, tri, (32, 32))
    with fastface.value_checks(False):
        fastface.rasterize(bad, tri, (32, 32))
    fastface.check_device_errors()


def test_gpu_good_inputs_pass_every_check(cupy, gpu_scene):
    points, tri, pos = gpu_scene
    raster = fastface.rasterize(pos, tri, (32, 32))
    fastface.interpolate(cupy.ones((81, 3), cupy.float32), raster, tri)
    fastface.perspective_projection(points, 200.0, (32, 32))
    fastface.check_device_errors()


def _spin_kernel(cupy):
    return cupy.RawKernel(r'''
extern "C" __global__ void spin(long long ns) {
    for (long long waited = 0; waited < ns; waited += 1000000) __nanosleep(1000000);
}''', "spin")


def _gpu_op_calls(cupy, points, tri, pos):
    """Every checked GPU op, as (name, zero-argument call)."""
    attr = cupy.ones((81, 3), cupy.float32)
    raster = fastface.rasterize(pos, tri, (32, 32))
    grad_bary = cupy.ones_like(raster.bary)
    grad_image = cupy.ones((2, 32, 32, 3), cupy.float32)
    vertices = cupy.stack([points, points])
    normals = fastface.vertex_normals(vertices, tri)
    sh = cupy.zeros((2, 9, 3), cupy.float32)
    image = cupy.ones((2, 32, 32, 3), cupy.float32)
    pixels = cupy.full((2, 81, 2), 5.0, cupy.float32)
    model = fastface.FaceModel.default(level="small").to("gpu")
    coefficients = cupy.zeros((2, model.n_shape), cupy.float32)
    face = fastface.FaceParameters(
        shape=coefficients, expression=cupy.zeros((2, model.n_expression), cupy.float32),
        albedo=cupy.zeros((2, model.n_albedo), cupy.float32), sh=fastface.uniform_light(2, cupy),
        angles=cupy.zeros((2, 3), cupy.float32), translation=cupy.asarray([[0, 0, -550.0]] * 2, cupy.float32))
    topology = fastface.antialias_topology(tri)  # built once per mesh, on the host
    from fastface.model.corrective import corrective_mesh, smoothness_loss
    mesh = corrective_mesh(model)
    model_offsets = cupy.zeros((2, model.n_vertices, 3), cupy.float32)
    return [
        ("rasterize", lambda: fastface.rasterize(pos, tri, (32, 32))),
        ("rasterize_interpolate", lambda: fastface.rasterize_interpolate(pos, tri, (32, 32), attr)),
        ("rasterize_backward", lambda: fastface.rasterize_backward(pos, tri, raster, grad_bary)),
        ("interpolate", lambda: fastface.interpolate(attr, raster, tri)),
        ("interpolate_backward", lambda: fastface.interpolate_backward(attr, raster, tri, grad_image)),
        ("vertex_normals", lambda: fastface.vertex_normals(vertices, tri)),
        ("sh_shade", lambda: fastface.sh_shade(normals, attr, sh)),
        ("perspective_projection", lambda: fastface.perspective_projection(vertices, 200.0, (32, 32))),
        ("project_to_pixels", lambda: fastface.project_to_pixels(vertices, 200.0, (32, 32))),
        ("sample_image", lambda: fastface.sample_image(image, pixels)),
        ("FaceModel.evaluate", lambda: model.evaluate(coefficients, None, None)),
        ("render_faces", lambda: fastface.render_faces(model, face, (32, 32), 60.0)),
        ("render_faces antialiased", lambda: fastface.render_faces(model, face, (32, 32), 60.0, antialias=True)),
        ("antialias", lambda: fastface.antialias(image, raster, pos, tri, topology=topology)),
        ("photometric_loss", lambda: fastface.photometric_loss(image, image, raster.tri_id >= 0)),
        ("landmark_loss", lambda: fastface.landmark_loss(pixels, pixels, cupy.ones(81, cupy.float32))),
        ("smoothness_loss", lambda: smoothness_loss(model_offsets, mesh)),
    ]


def test_gpu_checked_ops_do_not_wait_for_the_gpu(cupy, gpu_scene):
    # A kernel that sleeps for half a second is queued first; an op that synchronised the host would
    # return only after it finished. Each op must return while the sleeper is still running.
    points, tri, pos = gpu_scene
    calls = _gpu_op_calls(cupy, points, tri, pos)
    for name, call in calls:
        call()  # compiles the kernels and allocates the pool outside the measured window
    spin = _spin_kernel(cupy)
    for name, call in calls:
        stream = cupy.cuda.get_current_stream()
        stream.synchronize()
        spin((1,), (1,), (np.int64(500_000_000),))
        sleeper_done = stream.record()
        call()
        assert not sleeper_done.done, f"{name} waited for the GPU with value checks on"
    fastface.check_device_errors()
