"""The compiled separable resampling kernel (CPU preprocessing) against float64 numpy
and against the torch block products it replaces on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastlmk import _C, geometry
from fastlmk.preprocess import _as_float32, _axes, _resample_axis_torch, resample_stage


def _reference(x: np.ndarray, first: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """out[l, j, c] = sum_t weights[j, t] * x[l, clamp(first[j] + t), c] in float64."""
    index = np.clip(first[:, None] + np.arange(weights.shape[1]), 0, x.shape[1] - 1)
    return np.einsum("jt,ljtc->ljc", weights.astype(np.float64), x.astype(np.float64)[:, index])


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32, np.float64]
)
@pytest.mark.parametrize(
    ("lead", "n_in", "trail", "n_out", "taps"),
    [
        (1, 97, 70, 13, 9),  # inner axis, columns not a multiple of the strip width
        (3, 40, 5, 40, 3),  # inner axis, narrow rows
        (70, 53, 1, 11, 17),  # last axis, rows not a multiple of the strip width
        (1, 5, 1, 7, 12),  # more taps than samples: every tap clamped
        (2, 300, 33, 41, 31),  # enough work for several threads
    ],
)
def test_kernel_equals_float64_reference(
    dtype: type, lead: int, n_in: int, trail: int, n_out: int, taps: int
) -> None:
    rng = np.random.default_rng(lead * 1000 + n_in + taps)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        x = rng.integers(max(info.min, -3000), min(info.max, 3000), (lead, n_in, trail))
    else:
        x = rng.normal(0, 500, (lead, n_in, trail))
    x = x.astype(dtype)
    # Windows inside the axis, hanging over both ends and entirely outside it.
    first = rng.integers(-taps - 3, n_in + 3, n_out).astype(np.int64)
    weights = rng.normal(0, 1, (n_out, taps)).astype(np.float32)
    weights[:, -1] = 0.0  # padded taps
    got = _C.resample_axis_cpu(x, first, weights)
    ref = _reference(x, first, weights)
    assert got.dtype == np.float32 and got.shape == (lead, n_out, trail)
    # float32 accumulation: relative to the sum of the magnitudes of the products.
    scale = _reference(np.abs(x.astype(np.float64)), first, np.abs(weights)) + 1e-30
    assert np.max(np.abs(got - ref) / scale) < 1e-5


def test_kernel_rejects_bad_arguments() -> None:
    x = np.zeros((2, 8, 3), np.float32)
    first = np.zeros(4, np.int64)
    w = np.ones((4, 2), np.float32)
    with pytest.raises(ValueError, match="lead, n_in, trail"):
        _C.resample_axis_cpu(x[0], first, w)
    with pytest.raises(ValueError, match="C-contiguous"):
        _C.resample_axis_cpu(x[:, ::2], first, w)
    with pytest.raises(TypeError, match="uint8, int8"):
        _C.resample_axis_cpu(x.astype(np.uint64), first, w)
    with pytest.raises(ValueError, match="one row per entry"):
        _C.resample_axis_cpu(x, first, w[:3])
    with pytest.raises(ValueError, match="empty"):
        _C.resample_axis_cpu(np.zeros((2, 0, 3), np.float32), first, w)


def _torch_products(
    x: torch.Tensor, geom: geometry.Geometry, spacing: tuple[float, ...]
) -> torch.Tensor:
    axes = _axes(geom, spacing)
    out = _as_float32(x)
    last = len(axes) - 1
    for dim in sorted(range(len(axes)), key=lambda d: (1.0 / axes[d].ratio, d == last)):
        out = _resample_axis_torch(out, dim, axes[dim])
    return out


@pytest.mark.parametrize(
    ("shape", "spacing", "target", "dtype"),
    [
        ((2400, 1935), (0.1, 0.1), (0.8, 0.8), torch.uint8),  # a cephalogram
        ((301, 250), (0.13, 0.1), (0.7, 0.45), torch.float32),
        ((200, 150), (1.0, 1.0), (1.0, 2.5), torch.float64),  # one axis upsampled
        ((40, 130, 120), (0.7, 0.7, 1.0), (4.0, 4.0, 4.0), torch.int16),
        ((30, 50, 45), (0.7, 0.8, 1.0), (3.0, 2.0, 0.5), torch.int32),
    ],
)
def test_cpu_kernel_equals_torch_products(
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 250).to(dtype)
    dim = len(shape)
    geom = geometry.Geometry(np.zeros(dim), np.array(spacing), np.eye(dim), shape[::-1])
    got = resample_stage(x, geom, target)
    ref = _torch_products(x, geom, target)
    assert got.dtype == torch.float32 and got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-5 * 250
