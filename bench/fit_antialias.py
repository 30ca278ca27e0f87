"""Issue 10's acceptance check: does `antialias` help a fit recover the true geometry?

A fit of the small default model to a rendered target, composed by hand from the public ops and their
backwards (model.evaluate, euler_rotation, rigid_transform, perspective_projection, vertex_normals,
sh_shade, rasterize, interpolate, antialias), run twice from the same start: with the antialias op
between the interpolated image and the loss, and without it. Everything else is identical.

- Target: a face with random shape coefficients (N(0, 1) on the first 20 components), the mean albedo,
  a known light (uniform plus a directional term) and a known head pose, rendered at 4x4 samples per
  pixel and box-filtered down to 96 x 96 over a dark background (the true, area-covered image; neither
  fit renders it that way).
- Two fits, each run with and without antialias from the same start (shape 0, the mean face):
  "shape": the 80 shape coefficients, the pose known; "shape + pose": the coefficients, the 3 Euler
  angles and the translation, starting 2 degrees off in each angle and (3, -2, -10) mm off in
  translation. Albedo, light and focal length are known.
- Loss: the sum over pixels of the squared colour difference, plus 1e-3 |shape|^2; Adam (bias
  corrected), 200 and 300 steps.
- Reported: the mean distance in mm between the fitted and the true vertices, in model space (the
  face's shape) and in camera space (shape and pose), and the photometric loss at the first and last
  step (of the image each fit sees: antialiased or not).

    PYTHONPATH=. python bench/fit_antialias.py
"""
import argparse
import time

import numpy as np

import fastface
from fastface.ops.antialias import antialias, antialias_backward, antialias_topology

RES = (96, 96)
FOCAL = 230.0  # pixels: the face spans about 60 of the 96 pixels at 550 mm
BACKGROUND = np.float32([0.05, 0.05, 0.08])
SUPERSAMPLE = 4


def _lighting(batch=1):
    sh = fastface.uniform_light(batch)
    sh[:, 1:4, :] = 0.6 * sh[:, :1, :]  # light from above, in front and to the right: the face is shaded
    return sh * 0.8


class Problem:
    """The fixed parts of the fit: model, light, topology caches and the target."""

    def __init__(self, seed=0):
        self.model = fastface.FaceModel.default(level="small")
        self.tri = self.model.triangles
        self.adjacency = fastface.vertex_adjacency(self.tri, self.model.n_vertices)
        self.topology = antialias_topology(self.tri)
        self.sh = _lighting().astype(np.float32)
        rng = np.random.default_rng(seed)
        self.true_shape = np.zeros((1, self.model.n_shape), np.float32)
        self.true_shape[0, :20] = rng.standard_normal(20)
        self.true_angles = np.float32([[0.05, 0.25, -0.03]])  # pitch, yaw, roll: a visible cheek outline
        self.true_translation = np.float32([[0.0, 5.0, -550.0]])
        self.true_vertices, _ = self.model.evaluate(self.true_shape, None, None)
        self.target = self._supersampled_target()

    def _supersampled_target(self):
        big = (RES[0] * SUPERSAMPLE, RES[1] * SUPERSAMPLE)
        image = forward(self, self.true_shape, self.true_angles, self.true_translation, big, FOCAL * SUPERSAMPLE,
                        use_antialias=False)["image"]
        return image.reshape(1, RES[0], SUPERSAMPLE, RES[1], SUPERSAMPLE, 3).mean((2, 4)).astype(np.float32)


def forward(problem, shape, angles, translation, resolution=RES, focal=FOCAL, use_antialias=True):
    """The render chain from the public ops; returns every intermediate the backward needs."""
    m = problem.model
    vertices, albedo = m.evaluate(shape, None, None)
    rotation = fastface.euler_rotation(angles)
    camera = fastface.rigid_transform(vertices, rotation, translation)
    clip = fastface.perspective_projection(camera, focal, resolution)
    normals = fastface.vertex_normals(camera, problem.tri, adjacency=problem.adjacency)
    colors = fastface.sh_shade(normals, albedo, problem.sh)
    raster = fastface.rasterize(clip, problem.tri, resolution)
    shaded = fastface.interpolate(colors, raster, problem.tri)
    covered = (raster.tri_id >= 0)[..., None]
    composited = shaded + np.where(covered, 0, BACKGROUND).astype(np.float32)  # the background, constant
    image = antialias(composited, raster, clip, problem.tri, topology=problem.topology) if use_antialias \
        else composited
    return dict(vertices=vertices, albedo=albedo, rotation=rotation, camera=camera, clip=clip, normals=normals,
                colors=colors, raster=raster, composited=composited, image=image)


def backward(problem, state, shape, angles, translation, grad_image, use_antialias=True):
    """The chain rule through the same ops, in reverse: gradients of shape, angles, translation."""
    tri = problem.tri
    grad_pos_aa = None
    if use_antialias:
        grad_image, grad_pos_aa = antialias_backward(state["composited"], state["raster"], state["clip"], tri,
                                                     grad_image, topology=problem.topology)
    grad_colors, grad_bary = fastface.interpolate_backward(state["colors"], state["raster"], tri, grad_image)
    grad_clip = fastface.rasterize_backward(state["clip"], tri, state["raster"], grad_bary)
    if grad_pos_aa is not None:
        grad_clip = grad_clip + grad_pos_aa
    grad_normals, _, _ = fastface.sh_shade_backward(state["normals"], state["albedo"], problem.sh, grad_colors)
    grad_camera = fastface.perspective_projection_backward(state["camera"], FOCAL, RES, grad_clip)
    grad_camera += fastface.vertex_normals_backward(state["camera"], tri, grad_normals, adjacency=problem.adjacency)
    grad_vertices, grad_rotation, grad_translation = fastface.rigid_transform_backward(
        state["vertices"], state["rotation"], translation, grad_camera)
    grad_angles = fastface.euler_rotation_backward(angles, grad_rotation)
    grad_shape, _, _ = problem.model.evaluate_backward(grad_vertices, None)
    return grad_shape, grad_angles, grad_translation


FITS = {  # name -> (variables, steps, start offset of the angles (rad), of the translation (mm))
    "shape": (("shape",), 200, np.zeros((1, 3), np.float32), np.zeros((1, 3), np.float32)),
    "shape + pose": (("shape", "angles", "translation"), 300,
                     np.float32(np.radians(2.0)) * np.float32([[1, -1, 1]]), np.float32([[3.0, -2.0, -10.0]])),
}


def fit(problem, use_antialias, variables, steps, angles_offset, translation_offset, prior=1e-3):
    """Adam (with bias correction) on `variables` from the mean shape and the offset pose."""
    params = {"shape": np.zeros_like(problem.true_shape), "angles": problem.true_angles + angles_offset,
              "translation": problem.true_translation + translation_offset}
    lr = {"shape": 0.05, "angles": 0.004, "translation": 1.0}
    moments = {k: (np.zeros_like(v), np.zeros_like(v)) for k, v in params.items()}
    beta1, beta2 = 0.9, 0.999
    losses = []
    with fastface.value_checks(False):
        for step in range(1, steps + 1):
            state = forward(problem, params["shape"], params["angles"], params["translation"],
                            use_antialias=use_antialias)
            residual = state["image"] - problem.target
            losses.append(float((residual.astype(np.float64) ** 2).sum()))
            grads = dict(zip(("shape", "angles", "translation"), backward(
                problem, state, params["shape"], params["angles"], params["translation"], 2 * residual,
                use_antialias)))
            grads["shape"] = grads["shape"] + 2 * prior * params["shape"]
            for k in variables:
                m, v = moments[k]
                g = grads[k]
                m[...] = beta1 * m + (1 - beta1) * g
                v[...] = beta2 * v + (1 - beta2) * g * g
                m_hat = m / (1 - beta1 ** step)
                v_hat = v / (1 - beta2 ** step)
                params[k] = (params[k] - lr[k] * m_hat / (np.sqrt(v_hat) + 1e-8)).astype(np.float32)
        final = forward(problem, params["shape"], params["angles"], params["translation"], use_antialias=False)
    vertices, _ = problem.model.evaluate(params["shape"], None, None)
    model_error = float(np.linalg.norm(vertices - problem.true_vertices, axis=-1).mean())
    true_camera = fastface.rigid_transform(problem.true_vertices, fastface.euler_rotation(problem.true_angles),
                                           problem.true_translation)
    camera_error = float(np.linalg.norm(final["camera"] - true_camera, axis=-1).mean())
    return dict(model_mm=model_error, camera_mm=camera_error, loss_first=losses[0], loss_last=losses[-1],
                translation=params["translation"][0].tolist())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="Adam steps of every fit (default: 200, 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    problem = Problem(args.seed)
    start_vertices, _ = problem.model.evaluate(np.zeros_like(problem.true_shape), None, None)
    print(f"small model: {problem.model.n_vertices} vertices, {problem.model.n_triangles} triangles; "
          f"{RES[0]}x{RES[1]}; true translation {problem.true_translation[0].tolist()}; start (mean shape) "
          f"model-space error {np.linalg.norm(start_vertices - problem.true_vertices, axis=-1).mean():.2f} mm")
    for name, (variables, steps, angles_offset, translation_offset) in FITS.items():
        for use_antialias in (False, True):
            t0 = time.perf_counter()
            r = fit(problem, use_antialias, variables, steps if args.steps is None else args.steps, angles_offset,
                    translation_offset)
            print(f"{name:>12}, antialias {'on ' if use_antialias else 'off'}: mean vertex error "
                  f"{r['model_mm']:.2f} mm (model space), {r['camera_mm']:.2f} mm (camera space); loss "
                  f"{r['loss_first']:.1f} -> {r['loss_last']:.1f}; translation "
                  f"{np.round(r['translation'], 1).tolist()}; {time.perf_counter() - t0:.1f} s")

if __name__ == "__main__":
    main()
