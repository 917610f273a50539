"""The probability-weighted landmark vote, run by fastlmk's compiled kernel.

The global and local networks predict, for every output-grid cell ``i`` and landmark
``l``, a probability ``p_il`` that the landmark lies in the cell and a displacement
``d_il`` from the cell centre to the landmark. :func:`vote` fuses the whole estimate
into one pass over those grids (C++ on the CPU, CUDA for CUDA tensors)::

    c_i      = origin + i * stride                       (cell centre, input pixels)
    v_il     = c_i + d_il                                (the cell's vote)
    w_il     = p_il if p_il >= min_prob and p_il > 0 else 0
    weight_l = sum_i w_il
    position_l = sum_i w_il v_il / weight_l
    spread_l = sqrt(sum_i w_il ||v_il - position_l||^2 / weight_l)

All coordinates are continuous indices of the network's *input* image, in pixels,
with axes in array (numpy) order: ``(y, x)`` in 2D, ``(z, y, x)`` in 3D.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple, TypeAlias

import numpy as np
import torch

from fastlmk import _C

__all__ = ["Array", "VoteResult", "vote"]

Array: TypeAlias = np.ndarray | torch.Tensor
Transform: TypeAlias = Literal["linear", "signed_log10"]

_TRANSFORMS = ("linear", "signed_log10")


class VoteResult(NamedTuple):
    """Result of :func:`vote`, one row per landmark.

    The arrays are numpy arrays for numpy input and torch float64 tensors on the
    input's device for torch input.
    """

    position: Array
    """(L, D) float64: the landmark as a continuous index of the input image, in input
    pixels, axes in grid (numpy) order; NaN where ``weight == 0``."""
    weight: Array
    """(L,) float64: the sum of the probabilities that voted (the vote's total mass)."""
    spread: Array
    """(L,) float64: weighted RMS distance of the votes from ``position``, in input
    pixels; NaN where ``weight == 0``."""


class _Params(NamedTuple):
    stride: list[float]
    origin: list[float]
    transform: str
    min_prob: float


def vote(
    prob: Array,
    disp: Array,
    *,
    stride: float | Sequence[float],
    origin: float | Sequence[float],
    transform: Transform = "signed_log10",
    min_prob: float = 0.0,
) -> VoteResult:
    """Probability-weighted vote of every grid cell for every landmark's position.

    Args:
        prob: (L, *grid) per-cell probability that landmark ``l`` lies in the cell,
            with 2 or 3 grid axes in array order (``(H, W)`` or ``(Z, H, W)``).
            Negative and NaN probabilities are treated as 0.
        disp: (L, D, *grid) displacement from each cell centre to the landmark as the
            network predicts it; component ``k`` is along grid axis ``k``. After
            ``transform`` it is in input pixels.
        stride: Input pixels per grid cell: one number, or D numbers in grid-axis order.
        origin: Input-pixel index of the centre of cell ``(0, ..., 0)``: one number, or
            D numbers in grid-axis order. For a network whose cell ``i`` covers input
            pixels ``[i * s, (i + 1) * s)``, this is ``(s - 1) / 2``.
        transform: How ``disp`` encodes the displacement: ``"linear"`` (pixels), or
            ``"signed_log10"`` for ``t = sign(d) * log10(1 + |d|)``, undone as
            ``d = sign(t) * (10**|t| - 1)``.
        min_prob: Cells with ``p < min_prob`` do not vote (their displacement is not
            even read, so it may be NaN).

    Inputs must be both numpy arrays or both torch tensors on the same device. Any
    floating dtype is accepted; anything but float32 is converted to float32 first
    (a copy; float64 values are rounded). Sums are accumulated in float64. Arbitrary
    strides (transposed or sliced views) are read in place. CPU input runs the
    multi-threaded C++ kernel with the GIL released; CUDA tensors run the CUDA kernel
    on the current stream of their device without a host synchronisation. No
    gradient flows through the vote.

    Returns:
        VoteResult ``(position (L, D), weight (L,), spread (L,))``, float64, numpy for
        numpy input, torch tensors on the input's device for torch input.

    Raises:
        TypeError: an input is not a numpy array or torch tensor, or not floating point.
        ValueError: shapes, devices or parameters are inconsistent or out of range, or
            the input is on CUDA and fastlmk was built without CUDA support.

    Example:
        >>> import numpy as np
        >>> prob = np.zeros((1, 4, 5), np.float32); prob[0, 2, 3] = 1.0
        >>> disp = np.zeros((1, 2, 4, 5), np.float32); disp[0, :, 2, 3] = (0.5, -1.0)
        >>> r = vote(prob, disp, stride=8, origin=3.5, transform="linear")
        >>> r.position.tolist(), r.weight.tolist(), r.spread.tolist()
        ([[20.0, 26.5]], [1.0], [0.0])
    """
    is_torch = isinstance(prob, torch.Tensor)
    for name, value in (("prob", prob), ("disp", disp)):
        if not isinstance(value, np.ndarray | torch.Tensor):
            raise TypeError(f"{name} must be a numpy array or a torch tensor, "
                            f"got {type(value).__name__}")
    if isinstance(disp, torch.Tensor) != is_torch:
        raise TypeError("prob and disp must both be numpy arrays or both torch tensors, got "
                        f"{type(prob).__name__} and {type(disp).__name__}")

    dims = _check_shapes(tuple(prob.shape), tuple(disp.shape))
    stride_t = _per_axis(stride, dims, "stride", positive=True)
    origin_t = _per_axis(origin, dims, "origin", positive=False)
    if transform not in _TRANSFORMS:
        raise ValueError(f"transform must be one of {_TRANSFORMS}, got {transform!r}")
    min_prob = float(min_prob)
    if not min_prob >= 0.0:
        raise ValueError(f"min_prob must be >= 0 (a probability threshold), got {min_prob}")
    params = _Params(stride_t, origin_t, transform, min_prob)

    if isinstance(prob, torch.Tensor) and isinstance(disp, torch.Tensor):
        if prob.device != disp.device:
            raise ValueError(f"prob and disp must be on the same device, got {prob.device} "
                             f"and {disp.device}")
        prob_t = _float32_tensor(prob, "prob")
        disp_t = _float32_tensor(disp, "disp")
        if prob_t.device.type == "cuda":
            return _vote_cuda(prob_t, disp_t, dims, params)
        if prob_t.device.type != "cpu":
            raise ValueError(f"prob is on {prob_t.device}; vote runs on CPU and CUDA tensors")
        out = _C.vote_cpu(prob_t.numpy(), disp_t.numpy(), **params._asdict())
        return _split(torch.from_numpy(out), dims)

    assert isinstance(prob, np.ndarray) and isinstance(disp, np.ndarray)
    out = _C.vote_cpu(_float32_array(prob, "prob"), _float32_array(disp, "disp"),
                      **params._asdict())
    return _split(out, dims)


def _check_shapes(prob_shape: tuple[int, ...], disp_shape: tuple[int, ...]) -> int:
    if len(prob_shape) not in (3, 4):
        raise ValueError("prob must have shape (L, *grid) with 2 or 3 grid axes (D = 2 or 3), "
                         f"got ndim={len(prob_shape)} shape={prob_shape}")
    dims = len(prob_shape) - 1
    expected = (prob_shape[0], dims, *prob_shape[1:])
    if disp_shape != expected:
        raise ValueError(f"disp must have shape (L, D, *grid) = {expected} to match prob "
                         f"{prob_shape}, got {disp_shape}")
    return dims


def _per_axis(value: float | Sequence[float], dims: int, name: str, *,
              positive: bool) -> list[float]:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number or a sequence of {dims} numbers, "
                        f"got {value!r}") from None
    if arr.ndim == 0:
        arr = np.full(dims, arr)
    if arr.shape != (dims,):
        raise ValueError(f"{name} must be one number or {dims} numbers (one per grid axis, "
                         f"in grid order), got {value!r}")
    values = [float(v) for v in arr]
    for v in values:
        if not math.isfinite(v) or (positive and v <= 0):
            what = "positive and finite" if positive else "finite"
            raise ValueError(f"{name} must be {what}, got {value!r}")
    return values


def _float32_array(a: np.ndarray, name: str) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array (float32 preferred), "
                        f"got dtype {a.dtype}")
    # Also turns non-native byte order into native float32.
    return a if a.dtype == np.float32 else a.astype(np.float32)


def _float32_tensor(t: torch.Tensor, name: str) -> torch.Tensor:
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor (float32 preferred), "
                        f"got dtype {t.dtype}")
    return t.detach().to(torch.float32)


def _vote_cuda(prob: torch.Tensor, disp: torch.Tensor, dims: int,
               params: _Params) -> VoteResult:
    if not _C.cuda_compiled():
        raise ValueError("prob is a CUDA tensor, but fastlmk was built without CUDA support; "
                         "rebuild with nvcc on PATH")
    device = prob.device
    out = torch.empty((prob.shape[0], dims + 2), dtype=torch.float64, device=device)
    _C.vote_cuda(prob_ptr=prob.data_ptr(), prob_shape=list(prob.shape),
                 prob_strides=list(prob.stride()), disp_ptr=disp.data_ptr(),
                 disp_shape=list(disp.shape), disp_strides=list(disp.stride()),
                 out_ptr=out.data_ptr(), device=device.index,
                 stream=torch.cuda.current_stream(device).cuda_stream, **params._asdict())
    return _split(out, dims)


def _split(out: Array, dims: int) -> VoteResult:
    if isinstance(out, torch.Tensor):
        return VoteResult(out[:, :dims].contiguous(), out[:, dims].contiguous(),
                          out[:, dims + 1].contiguous())
    return VoteResult(np.ascontiguousarray(out[:, :dims]), np.ascontiguousarray(out[:, dims]),
                      np.ascontiguousarray(out[:, dims + 1]))
