"""Inference with a trained multi-level model: images in, parameters, both levels' geometry and albedo out.

    rec = fastface.Reconstructor("run/checkpoint.h5", device="cpu")
    out = rec(images)                    # (B, H, W, 3) float32 RGB in [0, 1], H, W = rec.resolution
    out.vertices_final, out.albedo_final # (B, V, 3) model space, before the pose
    out.render("final").image            # (B, H, W, 3)
    graph = rec.capture(1)               # GPU: one image at a time, replayed from a CUDA graph

The framing a caller must match: the faces the model was trained on were seen through a camera of
focal length `rec.focal` (pixels) at about `rec.translation` (mm, camera space); crop photos so
that the face sits as it does in the synthetic training images (fastface.io.crop_from_landmarks).
"""
import dataclasses

import numpy as np

from fastface._backend import array_module
from fastface._checks import check_array, check_finite, value_checks

__all__ = ["Reconstructor", "Reconstruction", "ReconstructorGraph"]


@dataclasses.dataclass
class Reconstruction:
    """What `Reconstructor.__call__` returns for a batch."""
    params: object            # FaceParameters (shared pose and light; base-level coefficients)
    z_geo: object             # (B, n_geometry)
    z_ref: object             # (B, n_reflectance)
    vertices_base: object     # (B, V, 3) model space, mm
    vertices_final: object
    albedo_base: object       # (B, V, 3)
    albedo_final: object
    landmarks: object         # (B, 68, 2) pixels of the input (final level), docs/conventions.md
    _reconstructor: object = dataclasses.field(repr=False, default=None)

    def render(self, level="final"):
        """The `Rendering` of one level ("base" or "final") at the input's resolution and framing."""
        from fastface.render import render_faces
        rec = self._reconstructor
        if level == "base":
            return render_faces(rec.model, self.params, rec.resolution, rec.focal)
        if level == "final":
            return render_faces(rec.model, self.params, rec.resolution, rec.focal,
                                geometry_offsets=self.vertices_final - self.vertices_base,
                                reflectance_offsets=self.albedo_final - self.albedo_base)
        raise ValueError(f"level must be 'base' or 'final'; got {level!r}")


class Reconstructor:
    """A trained encoder, corrective space and base model, ready for inference.

    Args:
        checkpoint_path: a checkpoint written by `python -m fastface train`.
        device: "cpu" or "gpu".

    Attributes:
        resolution: (H, W) of the images it takes. model: the base FaceModel. focal: pixels.
        translation: (3,) float the mean camera-space translation (mm) of its training faces.
        layout: the CodeLayout. settings: the training settings.
    """

    def __init__(self, checkpoint_path, device="cpu"):
        from fastface.checkpoint import load_checkpoint
        from fastface.train import TrainSettings, build
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu'; got {device!r}")
        checkpoint = load_checkpoint(checkpoint_path)
        settings = TrainSettings.from_dict(checkpoint.settings)
        settings.device = device
        self.settings = settings
        self._autoencoder, _, _ = build(settings, checkpoint)
        ae = self._autoencoder
        self.model, self.layout = ae.model, ae.layout
        self.resolution, self.focal = ae.resolution, ae.focal
        self.translation = np.asarray(ae.layout.translation, dtype=np.float32)
        self.step = checkpoint.step

    @property
    def device(self):
        return self.model.device

    def __call__(self, images):
        """Reconstructs a batch: (B, H, W, 3) float32 RGB in [0, 1] on the reconstructor's device."""
        xp = array_module(("images", images), ("the reconstructor's model", self.model.mean_shape))
        H, W = self.resolution
        check_array("images", images, np.float32, ("B", H, W, 3))
        check_finite("images", images)
        return self._infer(xp.ascontiguousarray(images))

    def _infer(self, images):
        """The reconstruction of checked, contiguous images (no host synchronisation: a graph records it)."""
        from fastface.ops.camera import euler_rotation, project_to_pixels, rigid_transform
        ae = self._autoencoder
        with value_checks(False):
            code = ae.encoder.forward(images)
            params, z_geo, z_ref = ae.decode(code)
            base_v, base_a = self.model.evaluate(params.shape, params.expression, params.albedo)
            geo, ref = ae.correctives.evaluate(z_geo, z_ref)
            final_v, final_a = base_v + geo, base_a + ref
            cam = rigid_transform(final_v[:, self.model.landmarks], euler_rotation(params.angles), params.translation)
        # Checked where checks are on (a landmark behind the camera raises); a capture turns them off.
        landmarks = project_to_pixels(cam, self.focal, self.resolution)
        return Reconstruction(params=params, z_geo=z_geo, z_ref=z_ref, vertices_base=base_v, vertices_final=final_v,
                              albedo_base=base_a, albedo_final=final_a, landmarks=landmarks, _reconstructor=self)

    def capture(self, batch_size):
        """The inference of `batch_size` images recorded in a CUDA graph (GPU only): see ReconstructorGraph.

        At small batches the ~40 launches from Python, not the GPU, set the time of a call; a replay
        costs one launch."""
        if self.device != "gpu":
            raise RuntimeError("capture needs the reconstructor on the GPU (device='gpu')")
        return ReconstructorGraph(self, int(batch_size))


class ReconstructorGraph:
    """`Reconstructor` inference of one batch size, replayed from a CUDA graph.

        graph = rec.capture(1)
        out = graph(images)       # (1, H, W, 3) float32 on the GPU: copied into graph.images, then one replay

    The arrays of the returned Reconstruction are the graph's own buffers: the next call overwrites
    them (copy what must be kept). The weights are read in place, so a graph follows later training.

    Attributes:
        images: the (B, H, W, 3) input buffer the graph reads (fill it in place and call with no argument).
        result: the Reconstruction the graph writes.
    """

    def __init__(self, reconstructor, batch_size):
        from fastface._backend import cupy_or_none
        from fastface.cuda_graph import capture
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        cupy = cupy_or_none()
        H, W = reconstructor.resolution
        self.images = cupy.zeros((batch_size, H, W, 3), dtype=np.float32)
        reconstructor._infer(self.images)  # warm-up: kernels compiled, caches and workspaces made
        self._graph = capture(lambda: reconstructor._infer(self.images), "the reconstructor's inference")
        reconstructor._autoencoder.encoder.hold_workspaces()  # the graph replays into the workspace it recorded
        self.result = self._graph.result
        self._reconstructor = reconstructor

    def __call__(self, images=None):
        """Copies `images` (if given, checked like Reconstructor's) into `self.images`, replays; returns `result`."""
        if images is not None:
            array_module(("images", images), ("the reconstructor's model", self._reconstructor.model.mean_shape))
            check_array("images", images, np.float32, tuple(self.images.shape))
            check_finite("images", images)
            self.images[...] = images
        self._graph.launch()
        return self.result
