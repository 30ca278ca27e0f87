"""Shared fixtures and the one tolerance table every test reads from."""
import numpy as np
import pytest

from fastface._backend import gpu_available

# Tolerances, each with the reason for its size. Tests read them from here, never inline.
TOLERANCES = {
    # A whole render chain on the GPU against the CPU: the model GEMM (BLAS against our kernels)
    # and normals sum in different orders, and shading and interpolation carry that drift on.
    "pipeline_gpu_cpu_rtol": 1e-4,
    "pipeline_gpu_cpu_atol": 1e-5,
    # Central differences in float64 with eps=1e-6 carry O(eps^2) truncation and O(1e-16/eps)
    # rounding error: 1e-6 relative is far above both and far below any real bug.
    "gradcheck_rtol": 1e-6,
    "gradcheck_atol": 1e-8,
    # GPU against CPU in float32: different operation order (FMA contraction, atomics) moves
    # the last bits; the issue fixes 1e-5 relative.
    "gpu_cpu_rtol": 1e-5,
    "gpu_cpu_atol": 1e-6,
    # Pixels whose centre lies within float rounding of an edge or whose depths tie may flip
    # between implementations; the issue allows at most 0.1% of covered pixels.
    "gpu_cpu_tri_id_mismatch": 1e-3,
    # Against an independent rasterizer (OpenGL, or a float64 brute force): 99% of covered
    # pixels agree, interpolated attributes within 2e-3.
    "reference_pixel_agreement": 0.99,
    "reference_attr_atol": 2e-3,
    # A float32 product summed over K (~10^2) or N (~10^5) terms, against float64 or another
    # float32 order: the error scales with the sum of the terms' magnitudes (sum_k |c_k b_k|),
    # not with the result, which may cancel. 1e-5 of that sum is far above float32 rounding of
    # a blocked sum and far below any indexing or scaling bug.
    "gemm_l1_rtol": 1e-5,
    # Model files store float32; converting units (micrometres, decimetres, 0..255, variances)
    # rounds once more in float32 or float64: a few float32 ulps (6e-8 each) at most.
    "unit_conversion_rtol": 1e-6,
    # The encoder on the GPU against the CPU, as a norm-wise relative error ||a - b|| / ||b|| of
    # outputs and gradients. float32: ten chained GEMMs (K up to 4608) and weight gradients summed
    # over up to B*H*W rows in another order; CPU float32 against float64 measures 1e-7 to 1e-6;
    # 1e-4 is far below the 1e-2 or more of a real bug.
    "nn_gpu_cpu_float32_rel": 1e-4,
    # TF32 and float16 round every GEMM operand (float16 also every stored activation and
    # activation gradient) to 10 mantissa bits. Emulated on the CPU (same rounding points as the
    # kernels): outputs 4e-4 to 1e-3 from float32, so 1e-2 shows the forward's accuracy kept.
    # Gradients: 1e-2 to 6e-2, nearly all from ReLUs whose input lies within rounding of 0
    # (~1e-3 of the units per layer) passing or stopping the gradient the other way, as in any
    # mixed-precision training; 0.15 (a cosine above 0.99) bounds that and still fails on a
    # wrong kernel (errors of order 1).
    "nn_reduced_precision_forward_rel": 1e-2,
    "nn_reduced_precision_grad_rel": 0.15,
    # One value rounded to float16 on one side and not, or differently, on the other: one ulp.
    "float16_rtol": 1e-3,
    # A float64 op against a float64 reference of the same formula written out slowly (or the
    # same op through another path: unbatched, fused): only the operation order differs, ~1e-15
    # relative; 1e-12 leaves room for mildly ill-conditioned entries.
    "float64_reference_rtol": 1e-12,
    "float64_reference_atol": 1e-12,
    # A float32 op against a float64 reference on O(1) values (unit normals, colours, samples,
    # rotations): a few float32 ulps (6e-8 each) per term over ~10 terms.
    "float32_reference_atol": 1e-5,
    # Rasterizer depth against the float64 reference: interpolated from edge functions, products
    # of pixel coordinates (10^2..10^4), whose float32 rounding relative to their sum reaches
    # ~1e-5 on small triangles; 5e-5 of NDC depth is far below a depth-order bug (1e-3 or more).
    "raster_depth_atol": 5e-5,
    # Gradients scattered with atomics (GPU) against a sequential sum (CPU), float32: each vertex
    # sums tens of pixels' terms of either sign in another order, so the difference scales with
    # the largest terms, not with the (possibly cancelled) result: 1e-5 of the array's largest
    # entry, and 1e-4 relative.
    "gpu_cpu_scatter_rtol": 1e-4,
    "gpu_cpu_scatter_atol_of_max": 1e-5,
    # Fitting (tests/test_fit.py, test_reconstruct.py) a photo rendered from the model at known
    # parameters: the landmarks are reproduced to a fraction of a pixel (the jaw points weigh
    # less, the priors pull a little), the pose to 0.05 rad (yaw trades against identity width
    # on 68 points), the model-space surface to 3 mm RMS (a face is ~190 mm tall: 1.5 %) though
    # the 144 geometry coefficients themselves are not identifiable from one view.
    "fit_landmark_px": 0.5,
    "fit_angles_rad": 0.05,
    "fit_vertices_rms_mm": 3.0,
    # The same photo fitted alone or in a batch: BLAS sums a batch of one (a GEMV) and of three
    # in another order, and Adam, which normalises each step to about lr whatever the gradient's
    # size, turns those last bits into ~0.05 px over 210 steps (measured); a photo coupled to
    # its neighbours would move by pixels.
    "fit_batch_independence_px": 0.15,
    # The acceptance bar of issue 9 on the real annotated photos: mean 68-point error over the
    # outer-eye-corner distance |p36 - p45|.
    "fit_real_landmark_error": 0.05,
    # fit's GPU branch in host emulation against the CPU, 2 + 2 Adam steps: float32 sums in
    # another order (1e-6 px measured) that Adam, normalising each step, can turn into a few
    # 1e-4 px; a wrong kernel argument or a host/device mix-up moves pixels.
    "fit_gpu_emulated_px": 1e-2,
    # The rasterizer's barycentrics, reprojected through the clip positions onto the screen, against
    # the pixel centre (issue 10): rounding the exact weights to float32 gives about 1e-6 pixel,
    # the old float32 formula up to 2e-2 on triangles seen nearly edge-on.
    "bary_reprojection_px": 1e-5,
    # Coverage on the 1/256-pixel grid against exact coverage of the unsnapped triangle: a snapped
    # vertex moves by at most 1/512 pixel per axis (plus the float32 rounding of a screen position
    # of up to 2.5e4 pixels, 1/1024), so a centre may change sides only that close to an edge;
    # 1/64 pixel bounds that and still catches a wrong clip (pixels off) or a lost triangle.
    "snapped_coverage_px": 1.0 / 64,
}


@pytest.fixture
def tol():
    return TOLERANCES


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


requires_gpu = pytest.mark.skipif(not gpu_available(), reason="needs cupy and a CUDA GPU")


@pytest.fixture
def cupy():
    if not gpu_available():
        pytest.skip("needs cupy and a CUDA GPU")
    import cupy as cp
    return cp


@pytest.fixture(autouse=True)
def no_unread_gpu_check_failures(request):
    """Fails a GPU test that leaves a value-check failure for the next test to trip over.

    The GPU's value checks report at a later call (fastface/_device_checks.py). A test that passes bad
    input on purpose reads the failure with `fastface.check_device_errors()` inside `pytest.raises`.
    """
    yield
    if "cupy" in request.fixturenames and gpu_available():
        from fastface import check_device_errors  # noqa: PLC0415
        try:
            check_device_errors()
        except ValueError as err:
            pytest.fail(f"the test left an unread GPU value-check failure: {err}")


def pytest_collection_modifyitems(config, items):
    # Marks every test that needs the GPU (through the `cupy` fixture or `requires_gpu`) with
    # `gpu`, so that the device run can select them with `-m gpu`.
    for item in items:
        needs_gpu = "cupy" in getattr(item, "fixturenames", ()) or any(
            m.name == "skipif" and "cupy" in str(m.kwargs.get("reason", "")) for m in item.iter_markers())
        if needs_gpu:
            item.add_marker(pytest.mark.gpu)
