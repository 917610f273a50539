"""Two-stage landmark localization: global network + vote, local networks + vote."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import geometry
from .backends import Backend, get_backend, run_local_stages
from .errors import ArgumentError, InvalidImageError, ModelError
from .io import as_image
from .landmarks import Landmarks
from .model import LandmarkModel, load_model
from .networks import cell_origin, split_outputs
from .ops import vote
from .preprocess import StageTensor, orient, prepare_global, stage_geometry, stage_patches
from .sampling import patch_to_source
from .shape import ImplausibleShapeWarning, check_shape, grid_frame_mm

__all__ = ["StageVote", "localize", "pad_to_multiple"]

# Called after each step of the pipeline with the step's name (benchmarks time them).
Mark = Callable[[str], None]


@dataclass(frozen=True)
class StageVote:
    """Vote of one stage for all landmarks, float64 tensors on the pipeline's device.

    Attributes:
        position: ``(L, D)`` continuous index of the stage image, array order; NaN when
            no cell voted.
        weight: ``(L,)`` total vote weight (sum of cell probabilities).
        spread: ``(L,)`` weighted RMS distance of the votes from ``position``, in pixels.
    """

    position: torch.Tensor
    weight: torch.Tensor
    spread: torch.Tensor


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the spatial axes of ``(B, C, *S)`` at their end to multiples of ``multiple``."""
    pads: list[int] = []
    for n in reversed(x.shape[2:]):
        pads += [0, (-n) % multiple]
    if not any(pads):
        return x
    if x.device.type == "cpu" and not x.requires_grad:
        # numpy on the CPU: torch's OpenMP workers spin after a parallel copy and take the
        # cores from the ONNX Runtime call that follows (measured: 1.5 ms of its 4).
        after = [(0, 0), (0, 0)] + [(0, pads[2 * k + 1]) for k in reversed(range(x.ndim - 2))]
        return torch.from_numpy(np.pad(x.numpy(), after))
    return F.pad(x, pads)


def _vote(
    logits: torch.Tensor, disp: torch.Tensor, dim: int, stride: int, min_prob: float
) -> StageVote:
    prob, d = split_outputs(logits, disp, dim)
    res = vote(
        prob.float().contiguous(),
        d.float().contiguous(),
        stride=stride,
        origin=cell_origin(stride),
        transform="signed_log10",
        min_prob=min_prob,
    )
    assert isinstance(res.position, torch.Tensor)
    return StageVote(res.position, res.weight, res.spread)  # type: ignore[arg-type]


def _no_mark(step: str) -> None:
    pass


def run_global(
    model: LandmarkModel, image: StageTensor, backend: Backend, mark: Mark = _no_mark
) -> StageVote:
    """Global stage on a prepared image: one network call and one vote."""
    spec = model.config.global_stage
    stride = spec.network.stride
    x = pad_to_multiple(image.tensor[None, None], spec.network.input_multiple)
    logits, disp = backend.run_global(x)
    mark("global")
    v = _vote(logits[0], disp[0], model.dim, stride, spec.vote_min_prob)
    mark("global_vote")
    return v


def local_crops(
    model: LandmarkModel,
    x: torch.Tensor,
    geom: geometry.Geometry,
    centres: torch.Tensor,
    value_range: torch.Tensor,
    stage: str = "local",
) -> torch.Tensor:
    """Input of a local stage's networks: crops of the fine stage image around ``centres``.

    Args:
        model: The model.
        x: ``(*S)`` oriented input image, array order, on the backend's device.
        geom: Geometry of ``x``.
        centres: ``(L, D)`` crop centres, continuous fine-stage index, array order.
        value_range: Intensities mapped to 0 and 1 (from the global stage).
        stage: Which local stage (``"local"``, ``"local2"``, ...): its spacing is the
            fine stage's.

    Returns:
        ``(1, L, *P)`` crops, one channel per landmark (the grouped networks' input).
    """
    spec = model.config.local_stages.get(stage)
    if spec is None:
        raise ValueError(f"model has no {stage} stage")
    return stage_patches(x, geom, spec.spacing, centres, spec.crop_size, value_range)[None]


def local_vote(
    model: LandmarkModel,
    logits: torch.Tensor,
    disp: torch.Tensor,
    centres: torch.Tensor,
    stage: str = "local",
) -> StageVote:
    """A local stage's vote from its networks' outputs on the crops around ``centres``.

    Returns:
        The vote, positions as continuous fine-stage indices (array order).
    """
    spec = model.config.local_stages[stage]
    local = _vote(logits[0], disp[0], model.dim, spec.network.stride, spec.vote_min_prob)
    pos = patch_to_source(local.position[None], centres[None].double(), spec.crop_size)[0]
    return StageVote(pos, local.weight, local.spread)


def _confidence(
    model: LandmarkModel,
    weights: list[np.ndarray],
    spread_mm: np.ndarray,
) -> np.ndarray:
    c = model.config.confidence
    conf = np.ones_like(spread_mm)
    for w in weights:
        conf *= np.clip(np.nan_to_num(w), 0.0, 1.0)
    conf /= 1.0 + (np.nan_to_num(spread_mm, nan=np.inf) / c.spread_scale_mm) ** 2
    return np.clip(np.nan_to_num(conf), 0.0, 1.0)


# Largest global-stage grid localize accepts: about 100 times the largest image of the
# bundled models (a 30 x 30 cm cephalogram at 0.8 mm, a head at 4 mm). The global
# network's first layers hold tens of floats per voxel, so a grid this size already
# takes gigabytes; beyond it the cause is almost always a wrong spacing.
MAX_GLOBAL_VOXELS = 1 << 24


def _check_extent(img: sitk.Image, spacing: tuple[float, ...], model_name: str) -> None:
    """Refuse images whose physical size cannot be right for the model.

    Catches a wrong ``spacing`` (e.g. 10 instead of 0.1 mm) before it makes the global
    grid absurdly large (memory) or smaller than one of its cells.
    """
    extent = np.array(img.GetSize()) * np.array(img.GetSpacing())  # mm, (x, y[, z])
    cells = extent / np.array(spacing)
    what = " x ".join(f"{e:.4g}" for e in extent)
    if (cells < 1).any():
        raise InvalidImageError(
            f"the image is {what} mm, smaller than one cell of model {model_name!r}'s global "
            f"stage ({spacing} mm); check the pixel spacing (--spacing)"
        )
    if float(np.prod(cells)) > MAX_GLOBAL_VOXELS:
        raise InvalidImageError(
            f"the image is {what} mm, which at model {model_name!r}'s global spacing "
            f"({spacing} mm) is {float(np.prod(cells)):.3g} voxels, far beyond any image "
            "it was made for; check the pixel spacing (--spacing)"
        )


def localize(
    image: Any,
    model: LandmarkModel | str | Path,
    *,
    spacing: float | tuple[float, ...] | None = None,
    backend: str = "auto",
    align: bool | float | None = None,
) -> Landmarks:
    """Find the model's landmarks in one image.

    Args:
        image: A path (2D: PNG/JPEG/BMP/TIFF; 3D: NIfTI, NRRD, MHA/MHD or a DICOM series
            directory), a numpy array in array order ((y, x) or (z, y, x); needs
            ``spacing``), a ``SimpleITK.Image``, an ``itk.Image`` or a torch tensor.
        model: A loaded model, a model directory or a bundled model name.
        spacing: Pixel spacing in mm, (x, y[, z]) or one number; overrides the image's own
            spacing (2D image formats carry none).
        backend: ``"auto"``, ``"onnxruntime"`` (``"onnxruntime-fp32"``,
            ``"onnxruntime-int8"``), ``"torch"``, ``"torch-cuda"`` (``"torch-cuda-graphs"``)
            or ``"tensorrt"``
            (see :mod:`fastlmk.backends`). On a GPU backend the whole
            pipeline (resampling, normalisation, crops, votes) runs on the device.
        align: Realign anatomy tilted against the voxel grid (:mod:`fastlmk.align`):
            when the points of a first pass are rotated more than a threshold against
            the model's mean training shape, the image is turned back (on the CPU) and
            localized again. None: the model's threshold (``align_above_deg`` in
            model.json; none: off); False: off; True: the model's threshold, else
            3 degrees; a number: that threshold in degrees. Needs a model with a shape
            model.

    Returns:
        :class:`Landmarks` in physical LPS mm, with confidence and flags.

    Raises:
        InvalidImageError: unreadable file, wrong dimensionality, NaN/Inf, empty image.
        MissingSpacingError: an array or 2D file given without ``spacing``.

    Example:
        >>> lm = fastlmk.localize("ceph.jpg", "ceph-isbi2015", spacing=0.1)  # doctest: +SKIP
        >>> lm["sella"]                                                       # doctest: +SKIP
    """
    model = load_model(model)
    above = _align_threshold(model, align)
    if above is None:
        return _localize(image, model, spacing=spacing, backend=backend)
    from .align import localize_aligned  # it calls _localize

    return localize_aligned(image, model, spacing=spacing, backend=backend, above_deg=above)


def _align_threshold(model: LandmarkModel, align: bool | float | None) -> float | None:
    """The realignment threshold (degrees) that ``align`` asks for; None: no realignment."""
    from .align import DEFAULT_ALIGN_DEG

    cfg = model.config
    if align is None:
        return cfg.align_above_deg if cfg.shape is not None else None
    if isinstance(align, bool | np.bool_):
        if not align:
            return None
    elif not isinstance(align, int | float | np.integer | np.floating) or not (
        0 <= float(align) <= 180
    ):
        raise ArgumentError(f"align must be None, a bool or degrees in [0, 180], not {align!r}")
    if cfg.shape is None:
        raise ModelError(
            f"align: model {cfg.name!r} has no shape model to measure the tilt against; "
            "fit one with fastlmk calibrate --landmarks"
        )
    if isinstance(align, bool | np.bool_):
        return cfg.align_above_deg if cfg.align_above_deg is not None else DEFAULT_ALIGN_DEG
    return float(align)


def _image_tensor(image: sitk.Image, device: torch.device) -> torch.Tensor:
    """Voxels of ``image`` as a tensor on ``device``, array order, the image's own dtype
    (integer images are converted to float32 by the resampling, on the device)."""
    array = sitk.GetArrayViewFromImage(image)  # no copy; read only, while ``image`` lives
    if array.dtype.kind == "u" and array.dtype.itemsize > 1:  # torch lacks uint16/32 ops
        array = array.astype(np.int64 if array.dtype.itemsize > 2 else np.int32)
    with warnings.catch_warnings():
        # torch warns that the view is not writable; nothing downstream writes to it.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).to(device)


def _localize(
    image: Any,
    model: LandmarkModel | str | Path,
    *,
    spacing: float | tuple[float, ...] | None = None,
    backend: str | Backend = "auto",
    mark: Mark = _no_mark,
) -> Landmarks:
    """:func:`localize`, calling ``mark(step)`` after each step of the pipeline; ``backend``
    may also be a :class:`~fastlmk.backends.Backend` object."""
    model = load_model(model)
    cfg = model.config
    # Integer images stay integer here: the resampling converts them on the device
    # (faster than a float32 SimpleITK copy first).
    img = as_image(image, spacing=spacing, keep_integer=True)
    if img.GetDimension() != cfg.dim:
        # A colour array (H, W, 3) or (H, W, 4) reads as a volume of 3 or 4 slices.
        colour = cfg.dim == 2 and img.GetDimension() == 3 and img.GetSize()[0] in (3, 4)
        hint = (
            f"; an array of shape (H, W, {img.GetSize()[0]}) is read as a volume of "
            f"{img.GetSize()[0]} slices: if it is a colour image, give one channel (e.g. "
            "array[..., 0]) or the mean of the channels"
            if colour
            else ""
        )
        raise InvalidImageError(
            f"model {cfg.name!r} localizes landmarks in {cfg.dim}D images but the input is "
            f"{img.GetDimension()}D (size {img.GetSize()}){hint}"
        )
    _check_extent(img, cfg.global_stage.spacing, cfg.name)
    runner = get_backend(model, backend) if isinstance(backend, str) else backend
    name = Path(image).name.split(".")[0] if isinstance(image, str | Path) else ""
    original = geometry.Geometry.from_sitk(img)
    oriented = orient(img, cfg.orientation)
    geom = geometry.Geometry.from_sitk(oriented)
    x = _image_tensor(oriented, runner.device)

    coarse, value_range = prepare_global(x, geom, cfg.global_stage.spacing, cfg.intensity)
    mark("preprocess")
    g = run_global(model, coarse, runner, mark)
    # Device-side results, gathered into one host transfer at the end.
    outputs = [g.position, g.weight[:, None], g.spread[:, None]]
    starts, crops = {}, {}
    for stage, lstage in cfg.local_stages.items():
        fine = stage_geometry(geom, lstage.spacing)
        # Both grids share origin and direction: an index scales by the spacing ratio.
        scale = torch.tensor(
            np.divide(cfg.global_stage.spacing, lstage.spacing)[::-1].copy(),
            dtype=torch.float64,
            device=x.device,
        )
        centres = g.position * scale
        have = torch.isfinite(centres).all(dim=1, keepdim=True)
        middle = (torch.tensor(fine.size[::-1], dtype=torch.float64, device=x.device) - 1) / 2
        starts[stage] = torch.where(have, centres, middle)
        crops[stage] = local_crops(model, x, geom, starts[stage], value_range, stage)
    if crops:
        mark("crop")
        # All local stages in one call: a backend may run them side by side.
        nets = run_local_stages(runner, crops)
        mark("local")
        for stage, start in starts.items():
            loc = local_vote(model, *nets[stage], start, stage)
            outputs += [start, loc.position, loc.weight[:, None], loc.spread[:, None]]
        mark("local_vote")
    host = torch.cat(outputs, dim=1).cpu().numpy()
    mark("to_host")
    result = _assemble(model, original, img, geom, host, name)
    mark("to_physical")
    return result


def _assemble(
    model: LandmarkModel,
    original: geometry.Geometry,
    img: sitk.Image,
    oriented: geometry.Geometry,
    host: np.ndarray,
    name: str,
) -> Landmarks:
    """Landmarks in physical space, confidence and flags from the stages' votes.

    ``oriented`` is the geometry of the oriented input image. ``host`` holds, per
    landmark, the global vote (position (D), weight, spread) and, for each local stage,
    the crop centre (D) and the local vote (position (D), weight, spread); positions are
    stage-grid indices in array order.

    With several local stages the position is the mean of theirs weighted by their
    numbers of networks, the vote weight likewise, and the spread is pooled: the
    weighted RMS over the stages of (own spread, distance to the mean).
    """
    cfg = model.config
    dim = cfg.dim
    g_pos, g_weight, g_spread = host[:, :dim], host[:, dim], host[:, dim + 1]
    coarse = stage_geometry(oriented, cfg.global_stage.spacing)
    points = geometry.index_to_physical(geometry.array_index_to_itk(g_pos), coarse)
    weights = [g_weight]
    spread_mm = g_spread * float(np.mean(cfg.global_stage.spacing))
    details: dict[str, Any] = {
        "global_points_mm": points.copy(),
        "global_weight": g_weight,
        "global_spread_mm": spread_mm.copy(),
    }
    n_lm = len(cfg.landmarks)
    local_outside = np.zeros(n_lm, dtype=bool)
    have = np.isfinite(g_pos).all(axis=1)
    stages = list(cfg.local_stages.values())
    if stages and host.shape[1] >= dim + 2 + len(stages) * (2 * dim + 2):
        s_points, s_weight, s_spread, s_count = [], [], [], []
        for k, lstage in enumerate(stages):
            o = dim + 2 + k * (2 * dim + 2)
            start, l_pos = host[:, o : o + dim], host[:, o + dim : o + 2 * dim]
            fine = stage_geometry(oriented, lstage.spacing)
            moved = np.abs(l_pos - start)
            half = np.array(lstage.crop_size) / 2.0
            local_outside |= ~(moved <= half).all(axis=1)
            s_points.append(geometry.index_to_physical(geometry.array_index_to_itk(l_pos), fine))
            s_weight.append(host[:, o + 2 * dim])
            s_spread.append(host[:, o + 2 * dim + 1] * float(np.mean(lstage.spacing)))
            s_count.append(lstage.network_count)
        pts = np.stack(s_points)  # (S, L, D)
        valid = np.isfinite(pts).all(axis=2)  # (S, L)
        w = np.array(s_count, dtype=float)[:, None] * valid
        total = w.sum(axis=0)
        use_local = have & (total > 0)
        with np.errstate(invalid="ignore", divide="ignore"):
            l_points = np.nansum(w[..., None] * np.nan_to_num(pts), axis=0) / total[:, None]
            l_weight = np.sum(w * np.nan_to_num(np.stack(s_weight)), axis=0) / total
            dist2 = np.sum((np.nan_to_num(pts) - l_points) ** 2, axis=2)
            pooled = np.sum(w * (np.nan_to_num(np.stack(s_spread)) ** 2 + dist2), axis=0)
            local_spread_mm = np.sqrt(pooled / total)
        points = np.where(use_local[:, None], l_points, points)
        weights.append(np.where(total > 0, l_weight, 0.0))
        spread_mm = np.where(use_local, local_spread_mm, spread_mm)
        details.update(local_weight=weights[-1], local_spread_mm=local_spread_mm)
        if len(stages) > 1:
            details["local_stage_points_mm"] = pts

    index = geometry.physical_to_index(points, original)
    inside = geometry.inside_image(index, img.GetSize())
    conf = _confidence(model, weights, spread_mm)
    c = cfg.confidence
    stage_weights = np.stack([np.nan_to_num(w) for w in weights])
    flagged = (
        ~np.isfinite(points).all(axis=1)
        | (stage_weights.min(axis=0) < c.min_weight)
        | (stage_weights.max(axis=0) > c.max_weight)
        | ~(spread_mm <= c.max_spread_mm)
        | ~inside
        | local_outside
    )
    details["inside_image"] = inside
    details["vote_flagged"] = flagged.copy()  # before the shape check (fastlmk.align)
    if cfg.shape is not None:
        # Fitted to the landmarks the vote checks trust: one cut off by the field of
        # view is placed at the edge and would drag the scale of the rest.
        check = check_shape(grid_frame_mm(points, oriented), cfg.shape, trusted=~flagged)
        details["shape"] = check
        flagged = flagged | check.outlier
        if not check.plausible:
            flagged = np.ones_like(flagged)
            where = f"{name}: " if name else ""
            warnings.warn(
                f"{where}every landmark flagged: {'; '.join(check.problems)}",
                ImplausibleShapeWarning,
                stacklevel=4,
            )
    return Landmarks(
        names=list(cfg.landmarks),
        points_mm=points,
        index=index,
        confidence=np.where(flagged, np.minimum(conf, 0.5), conf),
        flagged=flagged,
        image=name,
        details=details,
    )


def errors_mm(lm: Landmarks, truth: dict[str, np.ndarray]) -> np.ndarray:
    """Euclidean distance (mm) of each landmark to ``truth`` (name -> LPS mm); NaN if absent."""
    return np.array(
        [
            math.dist(p, truth[n]) if n in truth and np.isfinite(p).all() else np.nan
            for n, p in zip(lm.names, lm.points_mm, strict=True)
        ]
    )
