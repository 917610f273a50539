"""The inference preprocessing (torch) against the reference (SimpleITK) preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fastlmk import geometry
from fastlmk.model import IntensitySpec
from fastlmk.preprocess import (
    _smoothing_kernel,
    prepare_global,
    resample_stage,
    stage_geometry,
    stage_image,
    stage_patches,
)
from fastlmk.sampling import sample_patches

# Max abs difference allowed between the two implementations, in normalised units
# (the image's 1st..99th percentile range is 1): float32 rounding is ~1e-6.
TOL = 1e-4


def _image(
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    dtype: type = np.float32,
    seed: int = 0,
    rotate: bool = False,
) -> sitk.Image:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 100, shape[-1])
    array = (rng.random(shape) * 150 + ramp).astype(dtype)
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin([3.0, -7.5, 11.0][: len(shape)])
    if rotate:  # direction does not enter the resampling, but must survive it
        c, s = np.cos(0.3), np.sin(0.3)
        d = np.eye(len(shape))
        d[:2, :2] = [[c, -s], [s, c]]
        img.SetDirection(d.ravel().tolist())
    return img


CASES = [
    # (array shape, input spacing (x, y[, z]), global spacing, local spacing, crop, dtype)
    ((480, 387), (0.1, 0.1), (0.8, 0.8), (0.2, 0.2), (64, 64), np.uint8),
    ((301, 250), (0.13, 0.1), (0.7, 0.45), (0.2, 0.1), (32, 48), np.float32),
    ((200, 150), (1.0, 1.0), (1.0, 2.5), (0.5, 1.0), (16, 24), np.float32),  # upsampling
    ((3, 90, 80), (0.7, 0.7, 1.0), (4.0, 4.0, 4.0), (1.0, 1.0, 1.0), (8, 16, 16), np.int16),
    ((60, 70, 80), (0.7, 0.8, 1.0), (3.0, 2.0, 1.0), (0.5, 1.0, 1.5), (12, 16, 8), np.float32),
]


@pytest.mark.parametrize("sigma", [0.3, 0.866, 2.8, 3.97])
def test_kernel_reproduces_the_recursive_gaussian(sigma: float) -> None:
    signal = np.random.default_rng(1).random(90).astype(np.float32) * 100
    img = sitk.GetImageFromArray(np.tile(signal, (4, 1)))
    ref = sitk.GetArrayFromImage(
        sitk.RecursiveGaussian(img, sigma, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, 0)
    )[0]
    kernel = np.array(_smoothing_kernel(sigma))
    r = len(kernel) // 2
    got = np.convolve(np.pad(signal.astype(np.float64), r, mode="edge"), kernel[::-1], "valid")
    assert abs(kernel.sum() - 1) < 1e-6
    np.testing.assert_allclose(got, ref, atol=1e-4)


@pytest.mark.parametrize(("shape", "spacing", "gs", "ls", "crop", "dtype"), CASES)
def test_fast_path_equals_reference(
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    gs: tuple[float, ...],
    ls: tuple[float, ...],
    crop: tuple[int, ...],
    dtype: type,
) -> None:
    img = _image(shape, spacing, dtype, rotate=True)
    spec = IntensitySpec(1.0, 99.0)
    geom = geometry.Geometry.from_sitk(img)
    # The image's own dtype: integer images are converted inside the resampling.
    x = torch.from_numpy(sitk.GetArrayFromImage(img))
    assert x.dtype == torch.from_numpy(np.zeros(1, dtype)).dtype

    # Global stage: resampled image, intensity range and geometry.
    ref, value_range = stage_image(img, gs, None, spec)
    got, got_range = prepare_global(x, geom, gs, spec)
    assert got.geometry == ref.geometry == stage_geometry(geom, gs)
    np.testing.assert_allclose(got_range.numpy(), value_range, rtol=1e-5)
    assert np.abs(got.tensor.numpy() - ref.array).max() < TOL
    raw = sitk.GetArrayFromImage(geometry.resample_to_spacing(img, gs))
    assert np.abs(resample_stage(x, geom, gs).numpy() - raw).max() < TOL * np.ptp(raw)

    # Local stage: crops of the fine image, inside, across the edge and fully outside.
    fine, _ = stage_image(img, ls, value_range, spec)
    n = np.array(fine.array.shape, dtype=float)
    rng = np.random.default_rng(2)
    centres = np.concatenate(
        [rng.uniform(0, n - 1, (5, len(n))), [np.zeros(len(n)), n - 1, n + 3, -n / 2]]
    )
    expected = sample_patches(
        torch.from_numpy(fine.array)[None, None], torch.from_numpy(centres).float()[None], crop
    )[0]
    patches = stage_patches(x, geom, ls, torch.from_numpy(centres), crop, got_range)
    assert patches.shape == expected.shape
    assert np.abs(patches.numpy() - expected.numpy()).max() < TOL


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 72601])
def test_percentiles_follow_numpy(n: int) -> None:
    from fastlmk.preprocess import _percentiles

    values = np.random.default_rng(n).normal(size=n).astype(np.float32)
    pcts = (0.0, 1.0, 37.5, 99.0, 100.0)
    got = [float(v) for v in _percentiles(torch.from_numpy(values), pcts)]
    np.testing.assert_allclose(got, np.percentile(values.astype(np.float64), pcts), rtol=1e-6)
    if torch.cuda.is_available():
        on_gpu = [float(v) for v in _percentiles(torch.from_numpy(values).cuda(), pcts)]
        np.testing.assert_allclose(on_gpu, got, rtol=1e-6)


def test_training_preprocessing_is_unchanged() -> None:
    """Training uses stage_image: it must stay the SimpleITK reference, bit for bit."""
    img = _image((120, 100), (0.1, 0.1))
    spec = IntensitySpec()
    got, value_range = stage_image(img, (0.4, 0.4), None, spec)
    resampled = sitk.GetArrayFromImage(geometry.resample_to_spacing(img, (0.4, 0.4)))
    lo, hi = np.percentile(resampled, [spec.low, spec.high])
    assert value_range == (float(lo), float(hi))
    expected = (resampled - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    np.testing.assert_array_equal(got.array, expected)


def test_constant_image_gets_a_unit_range() -> None:
    img = sitk.GetImageFromArray(np.full((40, 30), 7.0, np.float32))
    geom = geometry.Geometry.from_sitk(img)
    # Working spacing = image spacing: no smoothing, so the values stay exactly 7.
    got, value_range = prepare_global(
        torch.full((40, 30), 7.0), geom, (1.0, 1.0), IntensitySpec()
    )
    assert value_range.tolist() == [7.0, 8.0]
    assert torch.all(got.tensor == 0)


def test_patch_arguments_are_checked() -> None:
    img = _image((50, 40), (1.0, 1.0))
    geom = geometry.Geometry.from_sitk(img)
    with pytest.raises(ValueError, match="centres"):
        stage_patches(
            torch.zeros(50, 40), geom, (1.0, 1.0), torch.zeros(3, 3), (8, 8),
            torch.tensor([0.0, 1.0]),
        )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu() -> None:
    img = _image((480, 387), (0.1, 0.1), np.uint8)
    geom = geometry.Geometry.from_sitk(img)
    x = torch.from_numpy(sitk.GetArrayFromImage(img))
    spec = IntensitySpec()
    cpu, cpu_range = prepare_global(x, geom, (0.8, 0.8), spec)
    gpu, gpu_range = prepare_global(x.cuda(), geom, (0.8, 0.8), spec)
    assert (gpu.tensor.cpu() - cpu.tensor).abs().max() < TOL
    assert (gpu_range.cpu() - cpu_range).abs().max() < 1e-3
    centres = torch.tensor([[100.0, 90.5], [-3.0, 10.0]], dtype=torch.float64)
    a = stage_patches(x, geom, (0.2, 0.2), centres, (32, 32), cpu_range)
    b = stage_patches(x.cuda(), geom, (0.2, 0.2), centres.cuda(), (32, 32), gpu_range)
    assert (b.cpu() - a).abs().max() < TOL
