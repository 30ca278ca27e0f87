"""CUDA graphs: GPU work recorded once from Python and replayed at the cost of one launch.

A training step or a small-batch inference queues 100 to 300 kernels, copies and fills from Python;
at about 5 to 20 µs of host time each, the host, not the GPU, sets the pace. `capture(fn)` runs
`fn` once on a capturing stream, so that nothing executes and every operation is recorded into a
graph; `CapturedGraph.launch()` then replays all of them with one call.

What `fn` may do (the rules of stream capture):
- launch kernels, call cuBLAS through fastface/_gemm.py, run CuPy elementwise operations and
  reductions, copy between device arrays;
- not read a device value on the host (`.get()`, `float(a)`, `if a.any():`), copy host data to the
  device, synchronise, or use CuPy calls that do one of these inside (boolean masks, `nonzero`);
  the capture fails then, and this module ends it before the error propagates;
- every kernel argument is recorded by value: a Python number that should change between replays
  must live in device memory instead (Adam's learning rate and step count do);
- a replay reads and writes the same memory as the capture: inputs are written into the arrays the
  capture read (`graph_input[...] = new_batch`) and outputs read from the arrays it wrote.

Memory. Every buffer a graph recorded must stay allocated as long as the graph, and never be handed
to another array: a cache that frees a buffer when its key changes (the encoder's per-batch
workspace) must keep the recorded one (`Encoder.hold_workspaces`). Arrays that `fn` allocates while
capturing are served by a memory pool of the graph's own,
which lives as long as the graph: the replays write into those blocks, so no other array may ever
get one (PyTorch's graphs keep a private pool for the same reason). Blocks freed and taken again
inside the capture are safe, since the graph keeps the stream's order. The capture runs in CuPy's
relaxed mode, in which the pool may still grow with cudaMalloc. Kernels are compiled, caches filled
and cuBLAS handles made by a warm-up call of `fn` before the capture (the caller's job: the warm-up
is a real step, with real effects).
"""
from fastface._backend import cupy_or_none
from fastface._checks import value_checks

__all__ = ["CapturedGraph", "capture"]


class CapturedGraph:
    """`fn()` recorded in a CUDA graph (made by `capture`).

    Attributes:
        result: what `fn` returned during the capture; arrays in it are rewritten by each launch.
    """

    def __init__(self, graph, pool, stream, result):
        self._graph, self._pool, self._stream = graph, pool, stream
        self.result = result
        self.launches = 0

    def launch(self, stream=None):
        """Replays the graph on `stream` (default: the current stream), after the work queued there."""
        cupy = cupy_or_none()
        self._graph.launch(cupy.cuda.get_current_stream() if stream is None else stream)
        self.launches += 1
        return self.result


def capture(fn, what="the step"):
    """Records `fn()` (no arguments) in a CUDA graph, with value checks off and a private memory pool.

    Exception-safe: if `fn` or the capture fails, the capture is ended before the error propagates,
    so the stream is never left capturing (which would make every later synchronisation fail with
    cudaErrorStreamCaptureUnsupported), the partial graph is dropped, and the error keeps its type
    with a note naming `what`.

    Returns:
        CapturedGraph.
    """
    cupy = cupy_or_none()
    if cupy is None:
        raise RuntimeError("a CUDA graph needs cupy and a CUDA GPU")
    cupy.cuda.get_current_stream().synchronize()  # the warm-up's work is done before the capture starts
    stream = cupy.cuda.Stream(non_blocking=True)
    pool = cupy.cuda.MemoryPool()
    with value_checks(False), cupy.cuda.using_allocator(pool.malloc), stream:
        stream.begin_capture()
        try:
            result = fn()
        except BaseException as error:
            try:
                stream.end_capture()
            except Exception:  # noqa: BLE001 - an invalidated capture raises here; the first error matters
                pass
            error.add_note(f"(while recording {what} in a CUDA graph; the capture was ended)")
            raise
        graph = stream.end_capture()
    return CapturedGraph(graph, pool, stream, result)
