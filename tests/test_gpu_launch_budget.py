"""How much GPU work the hot calls queue: a budget in launches, counted on the CPU with the fake cupy.

At batch 1 the GPU path's time is set by Python and by the number of launches, not by the kernels
(bench/RESULTS.md: render_faces took 1.7 ms at batch 1 and at batch 64 in run 3, when one Euler rotation
alone was about 90 small cupy operations). tests/fake_cupy.py records every operation that would be
device work on real cupy: kernel launches, fills, copies, elementwise and reduction kernels, memsets,
scans, GEMMs and transfers. The budgets below are today's counts. A change that adds work to these paths
fails here, and must either remove the work or raise the budget, with the reason in its commit.
"""
import collections

import numpy as np
import pytest

import fastface
from bench.workloads import spherical_cap
from tests.fake_cupy import install

RES = (32, 32)


def _calls(cp):
    pos, tri, colors = spherical_cap(n=21, batch=1)
    pos, tri, colors = cp.asarray(pos[0]), cp.asarray(tri), cp.asarray(colors)
    grad_image = cp.zeros((1,) + RES + (3,), np.float32)
    model = fastface.FaceModel.default(level="small").to("gpu")
    face = fastface.FaceParameters(
        shape=cp.zeros((1, model.n_shape), np.float32), expression=cp.zeros((1, model.n_expression), np.float32),
        albedo=cp.zeros((1, model.n_albedo), np.float32), sh=fastface.uniform_light(1, cp),
        angles=cp.zeros((1, 3), np.float32), translation=cp.asarray(np.array([[0, 0, -550.0]], np.float32)))

    def forward_backward():
        raster, _ = fastface.rasterize_interpolate(pos, tri, RES, colors)
        return fastface.rasterize_interpolate_backward(pos, tri, colors, raster, grad_image)

    return {
        "rasterize_interpolate": lambda: fastface.rasterize_interpolate(pos, tri, RES, colors),
        "rasterize_interpolate + backward": forward_backward,
        "render_faces": lambda: fastface.render_faces(model, face, RES, 60.0),
    }


# (call, value checks) -> the most device operations one call may queue at batch 1.
BUDGETS = {
    # memset of the key buffer (the bary output), the triangle pass, the resolve with interpolation.
    ("rasterize_interpolate", False): 3,
    # + one check kernel each for pos, tri and attr.
    ("rasterize_interpolate", True): 6,
    # + zeroed position and float4 attribute accumulators, the fused backward, the float4 -> float3 copy.
    ("rasterize_interpolate + backward", False): 7,
    ("rasterize_interpolate + backward", True): 15,
    # model (2 GEMVs), Euler, rigid transform, projection, normals, shading, memset, triangle pass,
    # resolve, the mask (tri_id >= 0), and the landmarks (gather of 68 camera points, projection):
    # every loss of the training step and of fitting reads them.
    ("render_faces", False): 13,
    # + 9 value checks: 6 parameters, the camera points (finite, in front) and the colours.
    ("render_faces", True): 22,
}


@pytest.mark.parametrize("call, checks", list(BUDGETS), ids=[f"{c}-checks_{'on' if v else 'off'}" for c, v in BUDGETS])
def test_a_batch_of_one_queues_no_more_gpu_work_than_its_budget(monkeypatch, call, checks):
    gpu = install(monkeypatch)
    fn = _calls(gpu.cupy)[call]
    with fastface.value_checks(checks):
        fn()  # the first call may build caches (the render's adjacency)
        gpu.device_work.clear()
        fn()
    work = list(gpu.device_work)
    summary = collections.Counter(work).most_common()
    assert len(work) <= BUDGETS[(call, checks)], f"{call}: {len(work)} device operations, budget " \
                                                 f"{BUDGETS[(call, checks)]}: {summary}"
    assert "device-to-host copy" not in work, f"{call} reads device data back: {summary}"
    fastface.check_device_errors()


def test_the_counter_sees_array_operations_and_transfers(monkeypatch):
    # The negative control: work written as array operations (as the Euler rotation was before its
    # kernel) and a read-back are counted, so a budget cannot hold by not seeing them.
    gpu = install(monkeypatch)
    angles = gpu.cupy.zeros((1, 3), np.float32)
    gpu.device_work.clear()
    c, s = np.cos(angles), np.sin(angles)
    np.stack([c, -s, s, c], axis=-1)
    angles.get()
    assert gpu.device_work == ["cos", "sin", "negative", "stack", "device-to-host copy"]
