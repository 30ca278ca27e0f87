"""Encoder throughput (issue 4): forward, and forward + backward + Adam, on the GPU and the CPU.

Workload: `fastface.nn.Encoder(513)` at 224x224, the issue's reference net (patchify 4x4/4 stem to
32 channels, four stages of a 3x3/2 and a 3x3/1 convolution with 64, 128, 256, 512 channels, ReLU,
global average pool, fc to 513): 4.97 M parameters, 0.3835 GFLOP per image forward.

GPU rows: forward at batch 1, 64, 256 in the float32 and float16 modes (float16 with the im2col
and with the implicit-GEMM convolutions; tf32 at batch 256), eager (one Python call per kernel)
and replayed from a CUDA graph (`Encoder.capture`); forward + backward + Adam at batch 64. Targets (issue 4, H100): forward >= 300,000 images/s at batch 256, <= 0.25 ms at batch 1,
forward + backward + Adam at batch 64 <= 2.5 ms. PyTorch reference on H100 (cuDNN, channels-last):
fp16 forward batch 256 0.85 ms, fp32 1.12 ms, batch 1 0.45 ms, fp16 fwd+bwd+Adam batch 64 4.2 ms.
When torch imports, the same architecture with the same weights runs side by side (channels_last,
cudnn.benchmark, fp16 autocast; never a dependency).

CPU row: forward + backward at 64x64, batch 8 (target: well under a second on 2 cores).
Adam CPU row: one `Adam.step` of the training encoder, `Encoder(257 + 64, resolution=64)` (4.87 M
float32 parameters, clipping and weight decay on; target: well under 10 ms on 2 cores).

Figures: `ms` and `images_per_s` from the median wall time of one synchronised call (Python
overhead included); on the GPU also `device_us` from CUDA events around back-to-back calls, and
`tflops` achieved (a backward counted as twice the forward's FLOPs).

    python -m pytest bench/bench_encoder.py --benchmark-only
"""
import numpy as np
import pytest

import fastface
from bench._gpu_timing import bench_gpu, device_seconds
from fastface._backend import gpu_available
from fastface.nn import Adam, Encoder

N_OUTPUTS = 513
RES = 224
needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs cupy and a CUDA GPU")
# tf32 gets only the batch-256 rows: the device run's time is shared by every benchmark.
GPU_MODES = ["float32", "float16", "float16-implicit"]


def _gpu_encoder(mode):
    """mode: a precision, with "-implicit" for the implicit-GEMM convolutions."""
    precision, _, algorithm = mode.partition("-")
    return Encoder(N_OUTPUTS, resolution=RES, conv_algorithm=algorithm or "im2col").to("gpu", precision=precision)


def _record(benchmark, batch, flops, device_s=None, **extra):
    if benchmark.stats is None:  # --benchmark-disable: the body ran once, untimed
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["ms"] = round(seconds * 1e3, 4)
    benchmark.extra_info["images_per_s"] = round(batch / seconds, 1)
    benchmark.extra_info["gflop_per_call"] = round(flops / 1e9, 3)
    benchmark.extra_info["tflops"] = round(flops / seconds / 1e12, 2)
    if device_s is not None:
        benchmark.extra_info["device_us"] = round(device_s * 1e6, 1)
        benchmark.extra_info["device_images_per_s"] = round(batch / device_s, 1)
        benchmark.extra_info["device_tflops"] = round(flops / device_s / 1e12, 2)
    benchmark.extra_info.update(extra)


# --- CPU ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("work", ["forward", "forward_backward"])
def test_cpu_encoder_64x64_batch_8(benchmark, work):
    enc = Encoder(N_OUTPUTS, resolution=64)
    rng = np.random.default_rng(0)
    x = rng.random((8, 64, 64, 3), dtype=np.float32)
    g = rng.standard_normal((8, N_OUTPUTS)).astype(np.float32)

    def fn():
        enc.forward(x)
        if work == "forward_backward":
            enc.backward(g, need_grad_x=False)

    benchmark.group = "encoder 64x64 B=8 (CPU)"
    with fastface.value_checks(False):
        fn()  # compile / load the Numba cache outside the timing
        benchmark(fn)
    flops = 8 * enc.flops_per_image() * (3 if work == "forward_backward" else 1)
    _record(benchmark, 8, flops, target_ms=1000 if work == "forward_backward" else None)


def test_cpu_adam_step_5m_parameters(benchmark):
    enc = Encoder(257 + 64, resolution=64)
    rng = np.random.default_rng(0)
    enc.flat_grads[...] = 1e-3 * rng.standard_normal(enc.flat_grads.size).astype(np.float32)
    opt = Adam(enc, lr=1e-3, weight_decay=1e-4, clip_norm=1.0)
    benchmark.group = f"Adam step, {enc.flat_params.size / 1e6:.2f} M parameters (CPU)"
    opt.step()  # compile / load the Numba cache outside the timing
    benchmark(opt.step)
    if benchmark.stats is not None:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["ms"] = round(seconds * 1e3, 3)
        # bytes: g read twice (norm, update), p, m, v read and written
        benchmark.extra_info["gb_per_s"] = round(enc.flat_params.size * 4 * 8 / seconds / 1e9, 2)
        benchmark.extra_info["target_ms"] = 10


# --- GPU ------------------------------------------------------------------------------------------

def _bench_gpu(benchmark, fn, batch, flops, group, **extra):
    device_s = bench_gpu(benchmark, fn, group, repeats=30)  # its untimed first call fills the workspaces
    _record(benchmark, batch, flops, device_s, **extra)


FORWARD_TARGET_MS = {1: 0.25, 64: None, 256: 256 / 300_000 * 1e3}


@pytest.fixture(autouse=True)
def gpu_row_isolation(request):
    """Each GPU row starts on a healthy, idle device with the default stream current, and gives
    back what it allocated, whatever happened inside it: one failing row cannot break the next.

    Before the row: synchronise; a device left broken by an earlier row (a sticky kernel fault
    cannot be cleared inside a process) skips the row with the reason instead of failing it
    with an unrelated error. After: back to the null stream, synchronise, drop the row's
    encoder, graphs and workspaces, and free the memory pool's cached blocks.
    """
    if "gpu" not in request.node.name or not gpu_available():
        yield
        return
    import gc

    import cupy
    try:
        cupy.cuda.Device().synchronize()
    except Exception as err:  # noqa: BLE001 - report any device failure as the skip reason
        pytest.skip(f"the GPU is unusable after an earlier row: {type(err).__name__}: {err}")
    try:
        yield
    finally:
        cupy.cuda.Stream.null.use()
        gc.collect()
        try:
            cupy.cuda.Device().synchronize()
        finally:
            cupy.get_default_memory_pool().free_all_blocks()


@pytest.fixture(scope="module")
def images():
    import cupy
    rng = np.random.default_rng(0)
    return cupy.asarray(rng.random((256, RES, RES, 3), dtype=np.float32))


FORWARD_ROWS = ([(b, p, m) for b in (1, 64, 256) for p in GPU_MODES for m in ("eager", "graph")]
                + [(256, "tf32", "graph")])


@needs_gpu
@pytest.mark.parametrize("batch,precision,mode", FORWARD_ROWS)
def test_gpu_encoder_forward(benchmark, images, batch, precision, mode):
    enc = _gpu_encoder(precision)
    x = images[:batch]
    if mode == "graph":
        graph = enc.capture(batch)
        graph.x[...] = x
        fn = graph.forward
    else:
        def fn():
            enc.forward(x)
    _bench_gpu(benchmark, fn, batch, batch * enc.flops_per_image(),
               f"encoder forward 224x224 B={batch} (GPU)", precision=precision, mode=mode,
               target_ms=FORWARD_TARGET_MS[batch])


@needs_gpu
@pytest.mark.parametrize("precision", GPU_MODES)
@pytest.mark.parametrize("mode", ["eager", "graph"])
def test_gpu_encoder_forward_backward_adam(benchmark, images, precision, mode):
    import cupy
    batch = 64
    enc = _gpu_encoder(precision)
    opt = Adam(enc, lr=1e-4)
    x = images[:batch]
    g = cupy.asarray(np.random.default_rng(1).standard_normal((batch, N_OUTPUTS)).astype(np.float32) / batch)
    if mode == "graph":
        graph = enc.capture(batch, backward=True, optimizer=opt)
        graph.x[...] = x
        graph.grad_y[...] = g
        fn = graph.step
    else:
        def fn():
            enc.forward(x)
            enc.backward(g, need_grad_x=False)
            opt.step()
    _bench_gpu(benchmark, fn, batch, 3 * batch * enc.flops_per_image(),
               f"encoder forward+backward+Adam 224x224 B={batch} (GPU)", precision=precision, mode=mode,
               target_ms=2.5)


# --- PyTorch side by side (optional) ---------------------------------------------------------------

def _torch_or_skip():
    try:
        import torch  # noqa: PLC0415 - optional comparison, never a dependency
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        return torch
    except Exception as err:
        pytest.skip(f"torch is unavailable: {type(err).__name__}: {err}")


def torch_encoder(torch, enc):
    """The same architecture in torch.nn, with the encoder's weights, channels-last."""
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.convs = nn.ModuleList(
                nn.Conv2d(L.c_in, L.c_out, L.kernel, L.stride, L.padding) for L in enc.layers)
            self.fc = nn.Linear(enc.layers[-1].c_out, enc.settings["n_outputs"])

        def forward(self, x):  # x: (B, 3, H, W), channels-last memory
            x = x - 0.5
            for conv in self.convs:
                x = torch.relu(conv(x))
            return self.fc(x.mean(dim=(2, 3)))

    net = Net()
    with torch.no_grad():
        for conv, L in zip(net.convs, enc.layers):
            w = np.asarray(enc.params[f"{L.name}.weight"].get())
            conv.weight.copy_(torch.from_numpy(w.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.asarray(enc.params[f"{L.name}.bias"].get())))
        net.fc.weight.copy_(torch.from_numpy(np.asarray(enc.params["fc.weight"].get()).T.copy()))
        net.fc.bias.copy_(torch.from_numpy(np.asarray(enc.params["fc.bias"].get())))
    return net.cuda().to(memory_format=torch.channels_last)


def _torch_setup(torch, precision):
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    return (torch.autocast("cuda", dtype=torch.float16) if precision == "float16"
            else torch.autocast("cuda", enabled=False))


@needs_gpu
@pytest.mark.parametrize("batch", [1, 64, 256])
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_gpu_torch_forward(benchmark, images, batch, precision):
    import cupy
    torch = _torch_or_skip()
    enc = Encoder(N_OUTPUTS, resolution=RES).to("gpu")
    net = torch_encoder(torch, enc)
    x = torch.from_dlpack(images[:batch]).permute(0, 3, 1, 2)  # NCHW view of NHWC memory
    autocast = _torch_setup(torch, precision)
    with torch.no_grad():
        with autocast:
            y_torch = net(x).float()
        diff = float((y_torch - torch.from_dlpack(enc.forward(images[:batch]))).abs().max())

    def fn():
        with torch.no_grad(), autocast:
            net(x)

    _bench_gpu(benchmark, fn, batch, batch * enc.flops_per_image(),
               f"encoder forward 224x224 B={batch} (GPU)", precision=precision, mode="torch",
               max_abs_diff_vs_fastface_float32=diff)
    cupy.cuda.Device().synchronize()


@needs_gpu
@pytest.mark.parametrize("precision", ["float32", "float16"])
def test_gpu_torch_forward_backward_adam(benchmark, images, precision):
    torch = _torch_or_skip()
    batch = 64
    enc = Encoder(N_OUTPUTS, resolution=RES).to("gpu")
    net = torch_encoder(torch, enc)
    try:
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=True)
    except (TypeError, RuntimeError):
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x = torch.from_dlpack(images[:batch]).permute(0, 3, 1, 2)
    g = torch.randn(batch, N_OUTPUTS, device="cuda") / batch
    autocast = _torch_setup(torch, precision)

    def fn():
        opt.zero_grad(set_to_none=True)
        with autocast:
            y = net(x)
        y.float().backward(g)
        opt.step()

    _bench_gpu(benchmark, fn, batch, 3 * batch * enc.flops_per_image(),
               f"encoder forward+backward+Adam 224x224 B={batch} (GPU)", precision=precision, mode="torch")


# --- Where the float16 forward's time goes (diagnostic) -------------------------------------------

@needs_gpu
@pytest.mark.parametrize("batch", [256])
def test_gpu_encoder_float16_layer_breakdown(benchmark, images, batch):
    """Per layer at batch 256, float16: device microseconds of the gather (and of the generic
    gather kernel, "gathergeneric": USE_PATCH_GATHER and USE_ROWS_GATHER off; both also in GB/s
    of cols written + input read), of cuBLAS's GEMM on the gathered cols, and of the
    implicit-GEMM kernel (where it applies), from CUDA events around 20 back-to-back launches
    each. Says per layer which convolution is faster."""
    import cupy

    from fastface._gemm import gemm
    from fastface.nn import conv as conv_module
    from fastface.nn.conv import _conv_implicit, _im2col, implicit_gemm_supported

    enc = _gpu_encoder("float16")
    x = images[:batch]
    with fastface.value_checks(False):
        enc.forward(x)
    ws = enc._workspaces[(batch, np.dtype(np.float32))]
    weights, _, biases = enc._weights(np.dtype(np.float32))
    timings = {}
    for i, L in enumerate(enc.layers):
        a, a_bias, a_relu = enc._layer_input(i, ws, x, biases)
        k = (L.kernel, L.kernel, L.stride, L.padding)

        def gather(a=a, a_bias=a_bias, a_relu=a_relu, k=k, i=i):
            _im2col(cupy, a, a_bias, a_relu, *k, ws.cols[i])

        def product(i=i):
            gemm(ws.cols[i], weights[i], ws.z[i])

        def gather_generic(gather=gather):
            """The same gather with the specialised kernels switched off (im2col_fwd / _run)."""
            saved = conv_module.USE_PATCH_GATHER, conv_module.USE_ROWS_GATHER
            conv_module.USE_PATCH_GATHER = conv_module.USE_ROWS_GATHER = False
            try:
                gather()
            finally:
                conv_module.USE_PATCH_GATHER, conv_module.USE_ROWS_GATHER = saved

        parts = {"gather": gather, "gathergeneric": gather_generic, "gemm": product}
        gather_bytes = ws.cols[i].nbytes + a.nbytes  # cols written + the input read once
        if implicit_gemm_supported(a.dtype, L.c_in, L.c_out, True):
            def implicit(a=a, a_bias=a_bias, a_relu=a_relu, k=k, i=i):
                _conv_implicit(a, a_bias, a_relu, k[0], k[1], k[2], k[3], weights[i], ws.z[i])
            parts["implicit"] = implicit
        for part, fn in parts.items():
            try:
                us = device_seconds(fn, repeats=20) * 1e6
                timings[f"{i}_{L.name}_{part}_us"] = round(us, 1)
                if part.startswith("gather"):
                    timings[f"{i}_{L.name}_{part}_gb_s"] = round(gather_bytes / us / 1e3)
                if part in ("gemm", "implicit"):
                    timings[f"{i}_{L.name}_{part}_tflops"] = round(batch * L.flops / us / 1e6, 1)
            except Exception as err:  # noqa: BLE001 - a failing part is reported, not fatal
                timings[f"{i}_{L.name}_{part}_error"] = f"{type(err).__name__}: {err}"[:120]
                cupy.cuda.Device().synchronize()
    benchmark.group = f"encoder float16 layer breakdown B={batch} (GPU, device us)"
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)
    benchmark.extra_info.update(timings)
