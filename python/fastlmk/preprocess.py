"""Preprocessing: an image in physical space -> normalised arrays at each stage's spacing.

Each stage works on the (oriented) image resampled to the stage's working spacing. All
stage grids share the image's origin (centre of voxel 0) and direction, so a stage
index converts to physical space through that stage's :class:`~fastlmk.geometry.Geometry`.
Intensities are mapped with one per-image linear map for all stages, measured at the
global (coarsest) spacing.

Two implementations of the same resampling live here, on purpose:

* :func:`stage_image` is the reference: :func:`fastlmk.geometry.resample_to_spacing`
  (SimpleITK recursive Gaussian + linear resampling of the whole image). Training uses it.
* The inference path (:func:`resample_stage`, :func:`stage_patches`) computes the same
  values on the image's device. Per axis, "smooth with the recursive Gaussian, then
  interpolate linearly at ``k * s' / s``" is one linear map whose rows are short (the
  Gaussian's impulse response, measured once from SimpleITK itself, shifted to the two
  interpolation neighbours). The global stage applies these rows along each axis; the
  local stage builds, for every crop pixel, the row that samples the *fine stage image*
  bilinearly (the crop of :func:`fastlmk.sampling.sample_patches`) and evaluates only the
  crops, never the whole fine image. On the CPU the rows run in the compiled kernels
  (``fastlmk._C``: compact rows, integer images read directly); elsewhere as torch
  products over windows of the input. Tests hold all of them to the same values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from . import _C, geometry
from .io import image_to_array
from .model import IntensitySpec

__all__ = [
    "StageImage",
    "StageTensor",
    "intensity_range",
    "normalise",
    "orient",
    "prepare_global",
    "resample_stage",
    "stage_geometry",
    "stage_image",
    "stage_patches",
]

# The smoothing kernel is cut where the response beyond it (each side) sums to less than
# this: a resampled value then moves by less than 1e-6 of the image's value range.
_KERNEL_TAIL = 1e-6


class _OnStageGrid:
    """Index <-> physical conversion for anything carrying a stage ``geometry``."""

    geometry: geometry.Geometry

    def index_to_physical(self, index_array_order: np.ndarray) -> np.ndarray:
        """``(N, D)`` continuous indices in array order -> ``(N, D)`` LPS mm (x, y[, z])."""
        return geometry.index_to_physical(
            geometry.array_index_to_itk(index_array_order), self.geometry
        )

    def physical_to_index(self, points_mm: np.ndarray) -> np.ndarray:
        """``(N, D)`` LPS mm -> ``(N, D)`` continuous indices in array order."""
        return geometry.itk_index_to_array(geometry.physical_to_index(points_mm, self.geometry))


@dataclass(frozen=True)
class StageImage(_OnStageGrid):
    """An image prepared for one stage (numpy; the reference path and training).

    Attributes:
        array: ``(*S)`` float32 normalised intensities, array order ((y, x) or (z, y, x)).
        geometry: Physical geometry of ``array`` (index order (x, y[, z])).
    """

    array: np.ndarray
    geometry: geometry.Geometry


@dataclass(frozen=True)
class StageTensor(_OnStageGrid):
    """An image prepared for one stage as a torch tensor on the pipeline's device.

    Attributes:
        tensor: ``(*S)`` float32 normalised intensities, array order.
        geometry: Physical geometry of ``tensor`` (index order (x, y[, z])).
    """

    tensor: torch.Tensor
    geometry: geometry.Geometry


def orient(image: sitk.Image, orientation: str) -> sitk.Image:
    """Reorient a 3D image's axes to the model's orientation; 2D images are unchanged."""
    if image.GetDimension() != 3:
        return image
    # Already oriented (the common case): skip DICOMOrient's copy of the whole volume.
    current = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())
    return image if current == orientation.upper() else geometry.orient_to(image, orientation)


def intensity_range(array: np.ndarray, spec: IntensitySpec) -> tuple[float, float]:
    """Intensities mapped to 0 and 1: the ``spec`` percentiles of ``array``.

    A (nearly) constant image gets a unit range so that normalisation neither divides by
    zero nor blows float rounding noise (e.g. left by smoothing) up to full contrast.
    """
    lo, hi = np.percentile(array, [spec.low, spec.high])
    if not hi - lo > 1e-6 * max(1.0, abs(float(lo)), abs(float(hi))):
        hi = lo + 1.0
    return float(lo), float(hi)


def stage_image(
    image: sitk.Image,
    spacing: tuple[float, ...],
    value_range: tuple[float, float] | None,
    spec: IntensitySpec,
) -> tuple[StageImage, tuple[float, float]]:
    """Resample ``image`` to ``spacing`` (mm, (x, y[, z])) and normalise its intensities.

    The reference implementation (SimpleITK, whole image); training uses it.

    Args:
        image: Oriented input image.
        spacing: Working spacing of the stage.
        value_range: Intensities mapped to 0 and 1; measured on this stage's array
            when None.
        spec: Normalisation percentiles (used when ``value_range`` is None).

    Returns:
        ``(stage image, value_range used)``.
    """
    resampled = geometry.resample_to_spacing(image, spacing)
    array = image_to_array(resampled).astype(np.float32, copy=False)
    if value_range is None:
        value_range = intensity_range(array, spec)
    lo, hi = value_range
    array = (array - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return StageImage(
        np.ascontiguousarray(array, dtype=np.float32), geometry.Geometry.from_sitk(resampled)
    ), value_range


# ---------------------------------------------------------------------------------------
# The inference path.


@dataclass(frozen=True)
class _Axis:
    """Resampling of one axis: ``n_in`` input samples at spacing ``s`` -> ``n_out`` at ``s'``.

    Output sample ``j`` is the smoothed input evaluated (linearly) at input index
    ``j * ratio``, ``ratio = s' / s``; ``kernel`` is the smoothing impulse response
    (``(2r + 1,)`` float64, centre tap in the middle; ``[1.0]`` for no smoothing).
    """

    n_in: int
    n_out: int
    ratio: float
    kernel: tuple[float, ...]

    @property
    def radius(self) -> int:
        return len(self.kernel) // 2

    def width(self, n_positions: int) -> int:
        """Input samples that ``n_positions`` consecutive output positions can touch."""
        return math.floor(n_positions * self.ratio) + 2 * self.radius + 4


@functools.lru_cache(maxsize=64)
def _smoothing_kernel(sigma_px: float) -> tuple[float, ...]:
    """Impulse response of SimpleITK's recursive Gaussian (as used by
    :func:`fastlmk.geometry.resample_to_spacing`) of ``sigma_px`` pixels.

    Measured rather than derived: the recursive filter is only approximately Gaussian
    (visibly so below one pixel), and the reference is the filter itself. Away from the
    image ends the filter is exactly a convolution with this response; at the ends it
    behaves as if the edge sample were repeated, which the window gather reproduces.
    """
    half = math.ceil(10 * sigma_px) + 10
    impulse = np.zeros((4, 2 * half + 1), np.float32)
    impulse[:, half] = 1.0
    out = sitk.RecursiveGaussian(
        sitk.GetImageFromArray(impulse),
        sigma_px,
        False,
        sitk.RecursiveGaussianImageFilter.ZeroOrder,
        0,
    )
    response = sitk.GetArrayFromImage(out)[0].astype(np.float64)
    # tail[k] = mass beyond k taps from the centre, on the heavier side.
    mass = np.abs(response)
    tail = np.maximum(np.cumsum(mass[::-1])[::-1][half + 1 :], np.cumsum(mass)[:half][::-1])
    r = int(np.argmax(np.append(tail, 0.0) < _KERNEL_TAIL))
    kernel = response[half - r : half + r + 1]
    # The cut mass goes back in, so that a constant image stays exactly constant.
    return tuple((kernel * (response.sum() / kernel.sum())).tolist())


def _axis(n_in: int, s: float, s_new: float) -> _Axis:
    if s_new == s:
        return _Axis(n_in, n_in, 1.0, (1.0,))
    n_out = math.floor((n_in - 1) * s / s_new + 1e-6) + 1
    kernel: tuple[float, ...] = (1.0,)
    # Same rule as resample_to_spacing: smooth downsampled axes of >= 4 samples.
    if s_new > s and n_in >= 4:
        kernel = _smoothing_kernel(0.5 * math.sqrt(s_new**2 - s**2) / s)
    return _Axis(n_in, n_out, s_new / s, kernel)


def _axes(geom: geometry.Geometry, spacing: Sequence[float]) -> list[_Axis]:
    """Per-axis resampling in array order ((y, x) or (z, y, x))."""
    itk = [
        _axis(n, float(s), float(t))
        for n, s, t in zip(geom.size, geom.spacing, spacing, strict=True)
    ]
    return itk[::-1]


def stage_geometry(geom: geometry.Geometry, spacing: Sequence[float]) -> geometry.Geometry:
    """Geometry of the stage grid at ``spacing`` (mm, (x, y[, z])): same origin and
    direction as ``geom``; the size rule of :func:`fastlmk.geometry.resample_to_spacing`."""
    if len(spacing) != geom.dim:
        raise ValueError(f"stage spacing {tuple(spacing)} must have {geom.dim} values (x, y[, z])")
    sizes = [a.n_out for a in _axes(geom, spacing)][::-1]
    return geometry.Geometry(geom.origin, np.asarray(spacing, float), geom.direction, tuple(sizes))


def _axis_rows(axis: _Axis, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the linear map from input samples to the stage image sampled at ``q``.

    Args:
        axis: The axis' resampling.
        q: ``(B, P)`` float64 continuous stage-grid positions, ``q[b, p + 1] = q[b, p] + 1``.
            A non-integer position interpolates the stage image linearly (zero outside
            it, as :func:`fastlmk.sampling.sample_patches` does).

    Returns:
        ``(start (B,) int64, rows (B, P, W) float32)``: stage value at ``q[b, p]`` =
        ``sum_w rows[b, p, w] * x[clamp(start[b] + w, 0, n_in - 1)]``, ``W =
        axis.width(P)``.
    """
    dev = q.device
    b, p = q.shape
    width = axis.width(p)
    kernel = torch.tensor(axis.kernel, dtype=torch.float64, device=dev)
    taps = torch.arange(len(axis.kernel), device=dev) - axis.radius
    j0 = torch.floor(q)
    g = q - j0
    j_first = j0[:, :1].clamp(0, axis.n_out - 1)
    start = torch.floor(j_first * axis.ratio).long() - axis.radius  # (B, 1)
    index_parts, weight_parts = [], []
    for jj, c in ((j0, 1.0 - g), (j0 + 1.0, g)):
        inside = (jj >= 0) & (jj <= axis.n_out - 1)
        pos = jj.clamp(0, axis.n_out - 1) * axis.ratio
        i = torch.floor(pos)
        frac = pos - i
        i = i.long().clamp(0, axis.n_in - 1)
        for ii, cc in ((i, 1.0 - frac), (torch.clamp(i + 1, max=axis.n_in - 1), frac)):
            col = ii[..., None] + taps - start[..., None]  # (B, P, T)
            w = (c * cc * inside)[..., None] * kernel
            # Rows of positions outside the stage image have zero weight and may point
            # outside the window.
            index_parts.append(col.clamp(0, width - 1))
            weight_parts.append(w)
    rows = torch.zeros(b, p, width, dtype=torch.float64, device=dev)
    rows.scatter_add_(2, torch.cat(index_parts, -1), torch.cat(weight_parts, -1))
    return start[:, 0], rows.float()


def _windows(x: torch.Tensor, axis: int, starts: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` gathered along ``axis`` at ``clamp(start + w)`` for every start: the axis
    becomes ``(len(starts), width)``. Clamping repeats the edge sample, like the reference
    smoothing does at the image ends."""
    n = x.shape[axis]
    index = (starts[:, None] + torch.arange(width, device=x.device)).clamp(0, n - 1)
    out = x.index_select(axis, index.reshape(-1))
    return out.reshape(*x.shape[:axis], len(starts), width, *x.shape[axis + 1 :])


def _block_size(axis: _Axis) -> int:
    """Output samples per matrix product along an axis: the input window of a block is
    about twice the kernel's support (fewer, larger products cost less overhead; smaller
    blocks multiply fewer zeros)."""
    return max(4, math.ceil((2 * axis.radius + 2) / axis.ratio))


@functools.lru_cache(maxsize=32)
def _axis_plan(axis: _Axis, device: torch.device) -> tuple[list[int], torch.Tensor]:
    """Window starts (host ints) and rows ``(n_blocks, block, W)`` on ``device`` for
    resampling a whole axis in blocks of output samples. Computed once per axis geometry:
    repeated images of one size cost no host work and no device synchronisation."""
    block = min(_block_size(axis), axis.n_out)
    n_blocks = math.ceil(axis.n_out / block)
    q = torch.arange(n_blocks * block, dtype=torch.float64).reshape(-1, block)
    starts, rows = _axis_rows(axis, q)
    return starts.tolist(), rows.to(device)


@functools.lru_cache(maxsize=32)
def _axis_map(axis: _Axis) -> tuple[np.ndarray, np.ndarray]:
    """The whole axis' map in the compiled kernel's form, ``(first (n_out,) int64,
    weights (n_out, taps) float32)``: the stage grid sampled at its own samples.
    Computed once per axis geometry."""
    q = np.arange(axis.n_out, dtype=np.float64)
    kernel = np.asarray(axis.kernel)
    first, weights = _C.stage_rows_cpu(q, kernel, axis.ratio, axis.n_in, axis.n_out)
    # At whole samples the second interpolation neighbour has weight 0: the columns it
    # would fill are zero in every row, and the kernel need not multiply them.
    used = int(np.flatnonzero(weights.any(axis=0)).max(initial=0)) + 1
    return first, np.ascontiguousarray(weights[:, :used])


# Element types the compiled CPU kernel reads without a float32 copy of the image first.
_KERNEL_DTYPES = frozenset(
    {torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64}
)


def _threads() -> int:
    """Threads for the compiled kernels: torch's intra-op setting, so that
    ``torch.set_num_threads`` and ``OMP_NUM_THREADS`` limit fastlmk's CPU work too."""
    return max(1, torch.get_num_threads())


def _resample_axis_cpu(x: torch.Tensor, dim: int, axis: _Axis) -> torch.Tensor:
    """:func:`_resample_axis_torch` by the compiled kernel (CPU tensors of
    ``_KERNEL_DTYPES``): one pass over the input, integers converted as they are read,
    threads over output rows. Measured several times faster than the block products."""
    first, weights = _axis_map(axis)
    lead, trail = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1 :])
    flat = x.detach().contiguous().reshape(lead, axis.n_in, trail).numpy()
    out = torch.from_numpy(_C.resample_axis_cpu(flat, first, weights, threads=_threads()))
    return out.reshape(*x.shape[:dim], axis.n_out, *x.shape[dim + 1 :])


def _resample_axis(x: torch.Tensor, dim: int, axis: _Axis) -> torch.Tensor:
    """Resample array axis ``dim`` of ``x`` (``(*S)``, any real dtype) with ``axis``;
    float32 result (``x`` itself when the axis is unchanged)."""
    if axis.ratio == 1.0 and len(axis.kernel) == 1:
        return x
    if x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and not x.requires_grad:
        return _resample_axis_cpu(x, dim, axis)
    return _resample_axis_torch(_as_float32(x), dim, axis)


def _resample_axis_torch(x: torch.Tensor, dim: int, axis: _Axis) -> torch.Tensor:
    """Resample array axis ``dim`` of ``x`` (``(*S)`` float32) with ``axis`` by small
    matrix products over windows of the input (any device)."""
    if axis.ratio == 1.0 and len(axis.kernel) == 1:
        return x
    starts, rows = _axis_plan(axis, x.device)
    width = rows.shape[-1]
    lead, trail = math.prod(x.shape[:dim]), math.prod(x.shape[dim + 1 :])
    flat = x.reshape(lead, axis.n_in, trail)
    parts = []
    for k, s in enumerate(starts):
        win = (
            flat.narrow(1, s, width)
            if 0 <= s and s + width <= axis.n_in
            else _windows(flat, 1, torch.tensor([s], device=x.device), width)[:, 0]
        )  # (lead, W, trail)
        # Plain 2D products where possible: batched broadcasting products are slower.
        if trail == 1:
            parts.append((win[..., 0] @ rows[k].T)[..., None])
        elif lead == 1:
            parts.append((rows[k] @ win[0])[None])
        else:
            parts.append(torch.matmul(rows[k], win))
    out = torch.cat(parts, 1)[:, : axis.n_out]
    return out.reshape(*x.shape[:dim], axis.n_out, *x.shape[dim + 1 :])


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as float32. On the CPU through numpy: its allocator asks the kernel for huge
    pages, and the page faults of a fresh buffer dominate the conversion (a 512 x 512 x
    300 int16 volume: 40 ms against 100 ms for ``Tensor.float()``, measured)."""
    if x.dtype == torch.float32:
        return x
    if x.device.type == "cpu" and not x.requires_grad:
        return torch.from_numpy(x.numpy().astype(np.float32))
    return x.float()


def resample_stage(
    x: torch.Tensor, geom: geometry.Geometry, spacing: Sequence[float]
) -> torch.Tensor:
    """The image resampled to a stage's spacing, as :func:`stage_image` (before
    normalisation) computes it, on ``x``'s device.

    Args:
        x: ``(*S)`` image, array order ((y, x) or (z, y, x)), any real dtype.
        geom: Geometry of ``x``.
        spacing: Stage spacing in mm, (x, y[, z]).

    Returns:
        ``(*S')`` float32 on ``x``'s device; ``S'`` is the size of
        :func:`stage_geometry` in array order.
    """
    axes = _axes(geom, spacing)
    # On the CPU the compiled kernel reads integer images directly. Elsewhere one
    # conversion of the whole image up front: measured faster than converting the
    # (overlapping) windows of the first pass, for uint8 2D and int16 3D images alike.
    out = x if x.device.type == "cpu" else _as_float32(x)
    # Most reduced axis first, as the reference does: later passes touch fewer samples.
    # On ties the last (contiguous) axis goes last: its products are the slower ones.
    last = len(axes) - 1
    for dim in sorted(range(len(axes)), key=lambda d: (1.0 / axes[d].ratio, d == last)):
        out = _resample_axis(out, dim, axes[dim])
    return _as_float32(out)


def normalise(values: torch.Tensor, value_range: torch.Tensor) -> torch.Tensor:
    """Map ``value_range`` (``(2,)``: intensities to 0 and 1) to [0, 1] linearly, float32."""
    lo, hi = value_range.to(values.device, torch.float32)
    if values.device.type == "cpu" and not values.requires_grad:
        # numpy on the CPU: see _affine_cpu.
        return _affine_cpu(values, float(lo), float(hi))
    return (values - lo) / (hi - lo)


def _affine_cpu(values: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``(values - lo) / (hi - lo)`` in float32 by numpy, for CPU tensors. torch's
    parallel element-wise ops leave its OpenMP workers spinning for milliseconds, which
    takes the cores from an ONNX Runtime call that follows (its global network ran 30 %
    slower after them, measured); numpy runs on the calling thread only."""
    out = np.subtract(values.numpy(), np.float32(lo), dtype=np.float32)
    out /= np.float32(hi) - np.float32(lo)
    return torch.from_numpy(out)


def _percentiles(values: torch.Tensor, percents: Sequence[float]) -> list[torch.Tensor]:
    """``numpy.percentile``'s default (linear) rule by selection, without a full sort
    (torch.quantile sorts, ~10x slower on the CPU): float64 0-d tensors on the device."""
    n = values.numel()
    ranks = []
    for pct in percents:
        pos = pct / 100.0 * (n - 1)
        k = math.floor(pos)
        ranks.append((pos - k, k, min(k + 1, n - 1)))
    if values.device.type == "cpu":
        # One numpy selection for all ranks: a single pass instead of two kthvalue
        # calls per percentile.
        flat = values.detach().numpy()
        kth = sorted({r for _, k, k1 in ranks for r in (k, k1)})
        part = np.partition(flat, kth)
        return [
            torch.tensor(float(part[k]) + frac * (float(part[k1]) - float(part[k])),
                         dtype=torch.float64)
            for frac, k, k1 in ranks
        ]
    out = []
    for frac, k, k1 in ranks:
        below = values.kthvalue(k + 1).values.double()
        above = values.kthvalue(k1 + 1).values.double()
        out.append(below + frac * (above - below))
    return out


def prepare_global(
    x: torch.Tensor,
    geom: geometry.Geometry,
    spacing: Sequence[float],
    spec: IntensitySpec,
) -> tuple[StageTensor, torch.Tensor]:
    """The global stage's image: resampled, intensity range measured on it, normalised.

    Args:
        x: ``(*S)`` oriented input image, array order, on the pipeline's device.
        geom: Geometry of ``x``.
        spacing: Global working spacing in mm, (x, y[, z]).
        spec: Normalisation percentiles.

    Returns:
        ``(stage tensor, value_range)`` as :func:`stage_image` with ``value_range=None``
        returns them; ``value_range`` is a ``(2,)`` float64 tensor on ``x``'s device (no
        host synchronisation).
    """
    coarse = resample_stage(x, geom, spacing)
    lo, hi = _percentiles(coarse.reshape(-1), (spec.low, spec.high))
    # A (nearly) constant image gets a unit range, by the same rule as intensity_range.
    scale = torch.maximum(torch.maximum(lo.abs(), hi.abs()), torch.ones_like(lo))
    value_range = torch.stack([lo, torch.where(hi - lo > 1e-6 * scale, hi, lo + 1.0)])
    return StageTensor(normalise(coarse, value_range), stage_geometry(geom, spacing)), value_range


def _gather_windows(
    x: torch.Tensor, index: list[torch.Tensor], starts: list[torch.Tensor], widths: list[int]
) -> torch.Tensor:
    """``x[tuple(index)]``: the ``(K, *W)`` windows of ``x`` at ``starts`` (edge samples
    repeated outside ``x``). On the CPU, windows inside ``x`` are plain slices: advanced
    indexing with broadcast index tensors is several times slower there. On a GPU the one
    gather stays, as it needs no host synchronisation."""
    if x.device.type != "cpu":
        return x[tuple(index)]
    first = [s.tolist() for s in starts]
    parts = []
    for j in range(len(first[0])):
        lo = [first[d][j] for d in range(x.ndim)]
        if all(0 <= a and a + w <= n for a, w, n in zip(lo, widths, x.shape, strict=True)):
            parts.append(x[tuple(slice(a, a + w) for a, w in zip(lo, widths, strict=True))])
        else:
            parts.append(x[tuple(i[j] for i in index)])
    return torch.stack(parts)


def stage_patches(
    x: torch.Tensor,
    geom: geometry.Geometry,
    spacing: Sequence[float],
    centres: torch.Tensor,
    size: Sequence[int],
    value_range: torch.Tensor,
) -> torch.Tensor:
    """Patches of the normalised stage image, computed from ``x`` without making it.

    Equals ``sample_patches(stage_image(...).array, centres, size)`` (bilinear, zero
    outside the stage image) up to float rounding.

    Args:
        x: ``(*S)`` oriented input image, array order, on the pipeline's device.
        geom: Geometry of ``x``.
        spacing: Stage spacing in mm, (x, y[, z]).
        centres: ``(K, D)`` patch centres, continuous stage-grid index, array order
            (any float dtype, on ``x``'s device).
        size: Patch size ``P`` (D ints, array order).
        value_range: ``(2,)`` intensities mapped to 0 and 1.

    Returns:
        ``(K, *P)`` float32 on ``x``'s device.
    """
    axes = _axes(geom, spacing)
    dim = len(axes)
    if centres.ndim != 2 or centres.shape[1] != dim or len(size) != dim:
        raise ValueError(
            f"stage_patches: centres {tuple(centres.shape)} must be (K, {dim}) and size "
            f"{tuple(size)} {dim} ints, for a {dim}D image"
        )
    if x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and not x.requires_grad:
        # The compiled kernel: each crop's window read once, no dense (mostly zero) rows.
        host = centres.detach().to(dtype=torch.float64).numpy()
        firsts, weights = [], []
        for d in range(dim):
            offsets = np.arange(size[d], dtype=np.float64) - (size[d] - 1) / 2
            a = axes[d]
            first, w = _C.stage_rows_cpu(
                host[:, d : d + 1] + offsets, np.asarray(a.kernel), a.ratio, a.n_in, a.n_out
            )
            firsts.append(first)
            weights.append(w)
        crops = _C.crop_cpu(x.contiguous().numpy(), firsts, weights, threads=_threads())
        # Sampling weights sum to less than one where a patch leaves the stage image
        # (zero padding there), so the offset of the normalisation scales with them.
        lo, hi = (float(v) for v in value_range)
        mass = _outer_sums([w.sum(-1) for w in weights])
        crops -= np.float32(lo) * mass
        crops /= np.float32(hi) - np.float32(lo)
        return torch.from_numpy(crops)  # numpy throughout: see _affine_cpu
    raw, sums = _patches_torch(x, axes, centres, size)
    lo_t, hi_t = value_range.to(x.device, torch.float32)
    return (raw - lo_t * _outer_sums(sums)) / (hi_t - lo_t)


def _outer_sums(sums: list[Any]) -> Any:
    """``(K, *P)`` products of the per-axis ``(K, P_d)`` row sums (numpy or torch)."""
    k = sums[0].shape[0]
    mass = sums[0]
    for d in range(1, len(sums)):
        mass = mass[..., None] * sums[d].reshape(k, *[1] * d, -1)
    return mass


def _patches_torch(
    x: torch.Tensor, axes: list[_Axis], centres: torch.Tensor, size: Sequence[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Unnormalised patches by dense rows and products (any device), and each axis' row
    sums ``(K, P_d)``."""
    dim = len(axes)
    c = centres.to(device=x.device, dtype=torch.float64)
    rows, starts = [], []
    for d in range(dim):
        offsets = torch.arange(size[d], dtype=torch.float64, device=x.device) - (size[d] - 1) / 2
        start, r = _axis_rows(axes[d], c[:, d : d + 1] + offsets)
        starts.append(start)
        rows.append(r)  # (K, P_d, W_d)
    k = centres.shape[0]
    widths = [r.shape[-1] for r in rows]
    index = []
    for d in range(dim):
        i = (starts[d][:, None] + torch.arange(widths[d], device=x.device)).clamp(
            0, axes[d].n_in - 1
        )
        index.append(i.reshape(k, *[widths[d] if e == d else 1 for e in range(dim)]))
    win = _gather_windows(x, index, starts, widths).float()  # (K, *W)
    if dim == 2:
        raw = torch.einsum("kpi,kij,kqj->kpq", rows[0], win, rows[1])
    else:
        raw = torch.einsum("kpi,kijl->kpjl", rows[0], win)
        raw = torch.einsum("kqj,kpjl->kpql", rows[1], raw)
        raw = torch.einsum("ksl,kpql->kpqs", rows[2], raw)
    return raw, [r.sum(-1) for r in rows]
