"""The compiled separable resampling kernel (CPU preprocessing) against float64 numpy
and against the torch block products it replaces on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastlmk import _C, geometry
from fastlmk.preprocess import (
    _as_float32,
    _axes,
    _Axis,
    _axis,
    _patches_torch,
    _resample_axis_torch,
    resample_stage,
    stage_geometry,
    stage_patches,
)


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
        (2, 300, 33, 41, 31),
        (1, 2400, 130, 300, 77),  # enough work for three threads (3M multiply-adds)
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
    # Fixed accumulation order: the thread count does not change a bit of the result.
    for threads in (1, 3):
        assert np.array_equal(_C.resample_axis_cpu(x, first, weights, threads=threads), got)
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
    with pytest.raises(ValueError, match="threads"):
        _C.resample_axis_cpu(x, first, w, threads=-1)


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


def _stage_rows_reference(axis: _Axis, q: np.ndarray) -> np.ndarray:
    """Dense float64 rows ``(B, P, n_in)``: the stage grid (input smoothed by the axis'
    kernel with edge samples repeated, sampled at ``j * ratio``) interpolated linearly at
    ``q``, zero outside it; written from the definition, sample by sample."""
    kernel = np.asarray(axis.kernel)
    r = axis.radius
    dense = np.zeros((*q.shape, axis.n_in))
    for idx in np.ndindex(*q.shape):
        j0 = int(np.floor(q[idx]))
        for jj, c in ((j0, 1.0 - (q[idx] - j0)), (j0 + 1, q[idx] - j0)):
            if not 0 <= jj <= axis.n_out - 1:
                continue
            pos = jj * axis.ratio
            i = int(np.floor(pos))
            frac = pos - i
            for ii, cc in ((min(i, axis.n_in - 1), 1.0 - frac), (min(i + 1, axis.n_in - 1), frac)):
                for t in range(-r, r + 1):
                    dense[(*idx, int(np.clip(ii + t, 0, axis.n_in - 1)))] += c * cc * kernel[t + r]
    return dense


@pytest.mark.parametrize(
    ("n_in", "s", "s_new"),
    [(2400, 0.1, 0.25), (100, 1.0, 0.4), (50, 0.7, 4.0), (5, 1.0, 3.0), (80, 1.0, 1.0)],
)
def test_stage_rows_equal_the_definition(n_in: int, s: float, s_new: float) -> None:
    axis = _axis(n_in, s, s_new)
    rng = np.random.default_rng(n_in)
    # Crop positions inside, across both ends and beyond the stage grid.
    q = rng.uniform(-12, axis.n_out + 12, (6, 1)) + np.arange(20)
    first, weights = _C.stage_rows_cpu(q, np.asarray(axis.kernel), axis.ratio, n_in, axis.n_out)
    assert first.shape == q.shape and weights.shape[:2] == q.shape
    dense = np.zeros((*q.shape, n_in))
    cols = np.clip(first[..., None] + np.arange(weights.shape[-1]), 0, n_in - 1)
    for idx in np.ndindex(*q.shape):
        np.add.at(dense[idx], cols[idx], weights[idx])
    np.testing.assert_allclose(dense, _stage_rows_reference(axis, q), atol=1e-6)


def test_stage_rows_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match="odd length"):
        _C.stage_rows_cpu(np.zeros((2, 3)), np.ones(2), 1.0, 10, 10)
    with pytest.raises(ValueError, match="finite"):
        _C.stage_rows_cpu(np.full((2, 3), np.nan), np.ones(1), 1.0, 10, 10)
    with pytest.raises(ValueError, match=">= 1"):
        _C.stage_rows_cpu(np.zeros((2, 3)), np.ones(1), 0.0, 10, 10)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(50, 61), (9, 20, 17)])
def test_crops_equal_float64_reference(dtype: type, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape))
    x = rng.integers(0, 120, shape).astype(dtype)
    k, firsts, weights, index = 5, [], [], []
    for d, n in enumerate(shape):
        p, taps = 7 + d, 4 + 2 * d
        first = rng.integers(-taps - 2, n + 2, (k, p)).astype(np.int64)
        firsts.append(first)
        weights.append(rng.normal(0, 1, (k, p, taps)).astype(np.float32))
        index.append(np.clip(first[..., None] + np.arange(taps), 0, n - 1))
    got = _C.crop_cpu(x, firsts, weights)
    for threads in (1, 3):
        assert np.array_equal(_C.crop_cpu(x, firsts, weights, threads=threads), got)
    xd = x.astype(np.float64)
    if len(shape) == 2:
        win = xd[index[0][:, :, :, None, None], index[1][:, None, None, :, :]]
        ref = np.einsum("kpa,kqb,kpaqb->kpq", *[w.astype(np.float64) for w in weights], win)
    else:
        i0, i1, i2 = index
        win = xd[
            i0[:, :, :, None, None, None, None], i1[:, None, None, :, :, None, None],
            i2[:, None, None, None, None, :, :],
        ]
        ref = np.einsum("kpa,kqb,krc,kpaqbrc->kpqr", *[w.astype(np.float64) for w in weights], win)
    assert got.shape == (k, *[f.shape[1] for f in firsts])
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()


def test_crops_reject_bad_arguments() -> None:
    x = np.zeros((10, 12), np.float32)
    f, w = np.zeros((2, 3), np.int64), np.ones((2, 3, 2), np.float32)
    with pytest.raises(ValueError, match="2D"):
        _C.crop_cpu(x[0], [f], [w])
    with pytest.raises(ValueError, match="one array per image axis"):
        _C.crop_cpu(x, [f], [w])
    with pytest.raises(ValueError, match="same number of crops"):
        _C.crop_cpu(x, [f, f[:1]], [w, w[:1]])
    with pytest.raises(ValueError, match="taps >= 1"):
        _C.crop_cpu(x, [f, f], [w, w[..., :0]])
    with pytest.raises(ValueError, match="P >= 1"):
        _C.crop_cpu(x, [f, f[:, :0]], [w, w[:, :0]])
    with pytest.raises(ValueError, match="threads"):
        _C.crop_cpu(x, [f, f], [w, w], threads=-1)


@pytest.mark.parametrize(
    ("shape", "spacing", "target", "dtype"),
    [
        ((2400, 1935), (0.1, 0.1), (0.25, 0.25), torch.uint8),  # cephalogram crops
        ((301, 250), (0.13, 0.1), (0.2, 0.1), torch.float32),
        ((40, 130, 120), (0.7, 0.7, 1.0), (1.0, 1.0, 1.0), torch.int16),
    ],
)
def test_cpu_crops_equal_torch_products(
    shape: tuple[int, ...],
    spacing: tuple[float, ...],
    target: tuple[float, ...],
    dtype: torch.dtype,
) -> None:
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(shape, generator=gen, dtype=torch.float64) * 250).to(dtype)
    dim = len(shape)
    geom = geometry.Geometry(np.zeros(dim), np.array(spacing), np.eye(dim), shape[::-1])
    n = np.array(stage_geometry(geom, target).size[::-1], dtype=float)
    centres = torch.from_numpy(
        np.concatenate([np.random.default_rng(5).uniform(0, n - 1, (6, dim)), [n + 2, -n / 3]])
    )
    crop = (16, 24, 20)[:dim]
    value_range = torch.tensor([10.0, 200.0], dtype=torch.float64)
    got = stage_patches(x, geom, target, centres, crop, value_range)
    raw, sums = _patches_torch(x, _axes(geom, target), centres, crop)
    mass = sums[0]
    for d in range(1, dim):
        mass = mass[..., None] * sums[d].reshape(len(centres), *[1] * d, -1)
    ref = (raw - 10.0 * mass) / 190.0
    assert got.shape == ref.shape
    assert float((got - ref).abs().max()) < 1e-5


def test_crops_do_not_depend_on_the_thread_count() -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 255, (400, 420)).astype(np.uint8)
    k, p, taps = 16, 64, 27  # ~4M multiply-adds: several threads
    firsts = [rng.integers(-20, n - 60, (k, 1)) + 2 * np.arange(p) for n in x.shape]
    weights = [rng.normal(0, 1, (k, p, taps)).astype(np.float32) for _ in x.shape]
    firsts = [f.astype(np.int64) for f in firsts]
    one = _C.crop_cpu(x, firsts, weights, threads=1)
    for threads in (0, 2, 3):
        assert np.array_equal(_C.crop_cpu(x, firsts, weights, threads=threads), one)
