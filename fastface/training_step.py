"""One optimisation step of the multi-level model, run eagerly or replayed from a CUDA graph.

The step: encode the batch, render the levels, evaluate every loss and regularizer
(fastface/objective.py), backpropagate into the encoder and the corrective space, and step their
Adam optimizers. Everything a training loop needs to know afterwards, the batch mean of each term
and each optimizer's squared gradient norm, is gathered into one small device array, so that a loop
reads it back with one transfer.

A step whose loss or gradient is not finite changes no weight, and the decision is taken on the
device: every optimizer prepares its gradient norm first, then all of them are gated by
`0 * (loss + norms) + 1`, NaN exactly when the loss or one of the norms is not finite (see
`Adam.update`), so that they skip together. The host only learns of it from the report.

That keeps the whole step free of host synchronisations, so on the GPU it is recorded in one CUDA
graph (fastface/cuda_graph.py): the first call runs eagerly (a real step, which also compiles
kernels and fills caches), the second records the step reading fixed input buffers, and every call
from then on copies its batch into those buffers and replays the graph: one launch instead of a few
hundred kernels, copies and allocations queued from Python.
"""
import dataclasses

import numpy as np

from fastface._backend import array_module
from fastface._checks import value_checks
from fastface.cuda_graph import capture

__all__ = ["TrainingStep", "StepReport"]


@dataclasses.dataclass
class StepReport:
    """What one step reports: each term's batch mean, their sum, and whether the step was skipped."""
    means: dict
    loss: float
    skipped: bool


class TrainingStep:
    """The training step of one stage (base level only, or both levels) at one batch shape.

    Args:
        autoencoder: `FaceAutoencoder`.
        objective: `MultiLevelObjective`.
        optimizers: {"encoder": Adam, "correctives": Adam}; the corrective space's is stepped only when
            `final` is true.
        final: train both levels (the second stage); else the base level alone.
        graph: record the step in a CUDA graph from the second call on; None means "on the GPU".

    Attributes:
        names: the term names, in report order (known after the first call).
    """

    def __init__(self, autoencoder, objective, optimizers, final, graph=None):
        on_gpu = autoencoder.device == "gpu"
        if graph and not on_gpu:
            raise ValueError("graph=True needs the autoencoder on the GPU (CUDA graphs)")
        self.autoencoder, self.objective = autoencoder, objective
        self.final = bool(final)
        self._optimizers = [optimizers["encoder"]] + ([optimizers["correctives"]] if self.final else [])
        self._use_graph = on_gpu if graph is None else bool(graph)
        self._xp = array_module(("model", autoencoder.model.mean_shape))
        self.names = None
        self._graph = None
        self._inputs = None  # (images, landmarks) buffers the graph reads
        self._shapes = None

    @property
    def captured(self):
        """Whether the step is recorded in a CUDA graph (from the second call on, on the GPU)."""
        return self._graph is not None

    def _body(self, images, landmarks, check_values, report=None):
        """The step itself: (term names, (n_terms + n_optimizers,) device array [term means..., |g|^2...])."""
        ae, xp, opts = self.autoencoder, self._xp, self._optimizers
        with value_checks(check_values):
            out = ae.forward(images, final=self.final)
            terms, grads = self.objective(out, images, landmarks, final=self.final)
        with value_checks(False):
            names = list(terms)
            n = len(names)
            if report is None:
                report = xp.empty(n + len(opts), dtype=images.dtype)
            # One small copy per entry: cupy joins more than 8 arrays (stack, concatenate) through a table
            # of pointers it sends from the host, which a CUDA graph cannot record.
            for i, name in enumerate(names):
                report[i] = terms[name].mean()
            ae.backward(out, grads)
            for opt in opts:
                opt.prepare()
            # NaN when the loss or any optimizer's gradient norm is not finite: then every optimizer skips.
            total = report[:n].sum(keepdims=True)
            for opt in opts:
                total = total + opt.gradient_norm_squares.sum(keepdims=True)
            with np.errstate(invalid="ignore"):  # inf * 0 is the NaN wanted (numpy would warn of it)
                gate = total * 0 + 1
            for opt in opts:
                opt.update(gate=gate)
            for j, opt in enumerate(opts):
                report[n + j] = opt.gradient_norm_squares.sum()
        return names, report

    def launch(self, images, landmarks, check_values=False):
        """Queues one step; returns the device array of the report (term means, then squared gradient norms).

        check_values: check the inputs and the forward's values (an eager step only; the loop checks its
        first step).
        """
        shapes = (tuple(images.shape), None if landmarks is None else tuple(landmarks.shape))
        if not self._use_graph or self.names is None or (self._shapes is not None and shapes != self._shapes):
            # Eager: the CPU, the first call (warm-up), or a batch of another shape than the recorded one.
            self.names, values = self._body(images, landmarks, check_values)
            return values
        if self._graph is None:
            xp = self._xp
            self._shapes = shapes
            self._inputs = (xp.empty_like(images), None if landmarks is None else xp.empty_like(landmarks))
            report = xp.empty(len(self.names) + len(self._optimizers), dtype=images.dtype)
            self._graph = capture(lambda: self._body(*self._inputs, False, report)[1], "the training step")
            self.autoencoder.encoder.hold_workspaces()  # the graph replays into the workspace it recorded
        self._inputs[0][...] = images
        if landmarks is not None:
            self._inputs[1][...] = landmarks
        return self._graph.launch()

    def __call__(self, images, landmarks, check_values=False):
        """One step; returns a StepReport (one device-to-host transfer on the GPU)."""
        return self.read(self.launch(images, landmarks, check_values))

    def read(self, values):
        """The StepReport of the report `launch` returned: on the GPU one device-to-host transfer, which
        waits for the step (the loop does host work for the next step between the two)."""
        host = np.asarray(values.get() if hasattr(values, "get") else values, dtype=np.float64)
        n = len(self.names)
        means = dict(zip(self.names, (float(v) for v in host[:n])))
        loss = float(sum(means.values()))
        skipped = not (np.isfinite(loss) and np.isfinite(host[n:]).all())
        return StepReport(means=means, loss=loss, skipped=skipped)
