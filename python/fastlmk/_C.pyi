"""fastlmk's compiled kernels: the probability-weighted landmark vote (CPU and CUDA) and
the separable resampling of the CPU preprocessing.

Private: call :func:`fastlmk.ops.vote`, which checks and converts its inputs, and
:func:`fastlmk.preprocess.resample_stage`.
Every output row is ``(position[0..D), weight, spread)`` in float64, positions as
continuous input-pixel indices in grid (numpy) axis order; see :mod:`fastlmk.ops`.
"""

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

def vote_cpu(
    prob: npt.NDArray[np.float32],
    disp: npt.NDArray[np.float32],
    *,
    stride: Sequence[float],
    origin: Sequence[float],
    transform: str,
    min_prob: float,
) -> npt.NDArray[np.float64]:
    """Vote on the CPU with the GIL released, reading any strides in place.

    Args:
        prob: (L, *grid) native float32, 2 or 3 grid axes.
        disp: (L, D, *grid) native float32.
        stride: 1 or D input pixels per cell (positive).
        origin: 1 or D input-pixel indices of the centre of cell 0.
        transform: ``"linear"`` or ``"signed_log10"``.
        min_prob: cells with ``p < min_prob`` (or ``p <= 0``, or NaN) do not vote.

    Returns:
        (L, D + 2) float64 rows ``(position..., weight, spread)``; NaN position and
        spread where the weight is 0.

    Raises:
        TypeError: prob or disp is not a native float32 array.
        ValueError: shapes or parameters are inconsistent or out of range.
    """

def vote_cuda(
    *,
    prob_ptr: int,
    prob_shape: Sequence[int],
    prob_strides: Sequence[int],
    disp_ptr: int,
    disp_shape: Sequence[int],
    disp_strides: Sequence[int],
    stride: Sequence[float],
    origin: Sequence[float],
    transform: str,
    min_prob: float,
    out_ptr: int,
    device: int,
    stream: int,
) -> None:
    """Enqueue the vote on a CUDA stream; returns without synchronising.

    Args:
        prob_ptr: device address of prob's first float32 element (``tensor.data_ptr()``).
        prob_shape: (L, *grid).
        prob_strides: prob's strides in elements (``tensor.stride()``).
        disp_ptr: device address of disp's first float32 element.
        disp_shape: (L, D, *grid).
        disp_strides: disp's strides in elements.
        stride, origin, transform, min_prob: as for :func:`vote_cpu`.
        out_ptr: device address of a preallocated C-contiguous (L, D + 2) float64
            buffer that receives the rows ``(position..., weight, spread)``.
        device: CUDA device index holding all three buffers.
        stream: the ``cudaStream_t`` to run on (``torch.cuda.Stream.cuda_stream``).

    Raises:
        RuntimeError: a CUDA call failed (with cudaGetErrorString's text), or the
            module was built without CUDA support.
        ValueError: shapes or parameters are inconsistent or out of range.
    """

def cuda_compiled() -> bool:
    """Whether this build contains the CUDA kernel."""

def cuda_device_count() -> int:
    """Number of visible CUDA devices; 0 without CUDA support, driver or device."""

def resample_axis_cpu(
    x: npt.NDArray[np.generic],
    first: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float32],
    *,
    threads: int = 0,
) -> npt.NDArray[np.float32]:
    """Resample axis 1 of ``x`` by a short linear map per output sample, with the GIL
    released, on at most ``threads`` threads (0: one per hardware thread).

    ``out[l, j, c] = sum_t weights[j, t] * x[l, clamp(first[j] + t, 0, n_in - 1), c]``,
    accumulated in float32 in a fixed order (independent of the thread count).

    Args:
        x: (lead, n_in, trail) C-contiguous native uint8, int8, uint16, int16, int32,
            float32 or float64 array; integers are converted as they are read.
        first: (n_out,) C-contiguous int64, first input sample of each output sample
            (may lie outside [0, n_in): clamped, which repeats the edge samples).
        weights: (n_out, taps) C-contiguous float32.

    Returns:
        (lead, n_out, trail) float32.

    Raises:
        TypeError: x has another element type.
        ValueError: shapes or layouts are inconsistent, n_in is 0 or threads < 0.
    """

def stage_rows_cpu(
    q: npt.NDArray[np.float64],
    kernel: npt.NDArray[np.float64],
    ratio: float,
    n_in: int,
    n_out: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
    """One axis' linear map from input samples to a stage grid sampled at positions ``q``.

    The stage grid is the input smoothed by ``kernel`` (edge samples repeated) and sampled
    at ``j * ratio`` for ``j`` in ``[0, n_out)``; a position between stage samples
    interpolates linearly, and the stage grid is zero outside ``[0, n_out - 1]``.

    Args:
        q: (*Q) finite float64 positions on the stage grid.
        kernel: (odd,) float64 smoothing taps, centre tap in the middle.
        ratio: Input samples per stage sample (positive).
        n_in: Input samples on the axis.
        n_out: Stage samples on the axis.

    Returns:
        ``(first (*Q) int64, weights (*Q, taps) float32)`` with ``taps = ceil(ratio) + 2 +
        len(kernel) - 1``: value at ``q[i]`` = ``sum_t weights[i, t] * x[clamp(first[i] +
        t, 0, n_in - 1)]``.

    Raises:
        ValueError: a non-finite position, an even kernel, or sizes/ratio out of range.
    """

def crop_cpu(
    x: npt.NDArray[np.generic],
    first: Sequence[npt.NDArray[np.int64]],
    weights: Sequence[npt.NDArray[np.float32]],
    *,
    threads: int = 0,
) -> npt.NDArray[np.float32]:
    """Separable crops of a 2D (Y, X) or 3D (Z, Y, X) image, on at most ``threads``
    threads over the crops (0: one per hardware thread).

    Crop ``k`` is ``out[k, p0, p1(, p2)] = sum_t prod_d weights[d][k, p_d, t_d] *
    x[clamp(first[0][k, p0] + t_0), clamp(first[1][k, p1] + t_1)(, ...)]``, every index
    clamped to its axis. Each crop's input window is read once.

    Args:
        x: (Y, X) or (Z, Y, X) C-contiguous array of an element type that
            :func:`resample_axis_cpu` accepts.
        first: one (K, P_d) C-contiguous int64 array per image axis.
        weights: one (K, P_d, taps_d) C-contiguous float32 array per image axis.

    Returns:
        (K, *P) float32.

    Raises:
        TypeError: x has another element type.
        ValueError: shapes or layouts are inconsistent, or threads < 0.
    """
