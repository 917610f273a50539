"""Two-stage landmark localization: global network + vote, local networks + vote."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import geometry
from .backends import get_backend
from .errors import InvalidImageError
from .io import as_image
from .landmarks import Landmarks
from .model import LandmarkModel, load_model
from .networks import cell_origin, split_outputs
from .ops import vote
from .preprocess import StageImage, orient, stage_image
from .sampling import patch_to_source, sample_patches

__all__ = ["StageVote", "localize", "pad_to_multiple"]


@dataclass(frozen=True)
class StageVote:
    """Vote of one stage for all landmarks.

    Attributes:
        position: ``(L, D)`` continuous index of the stage image, array order; NaN when
            no cell voted.
        weight: ``(L,)`` total vote weight (sum of cell probabilities).
        spread: ``(L,)`` weighted RMS distance of the votes from ``position``, in pixels.
    """

    position: np.ndarray
    weight: np.ndarray
    spread: np.ndarray


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the spatial axes of ``(B, C, *S)`` at their end to multiples of ``multiple``."""
    pads: list[int] = []
    for n in reversed(x.shape[2:]):
        pads += [0, (-n) % multiple]
    return F.pad(x, pads) if any(pads) else x


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
    return StageVote(
        *(
            np.asarray(t.cpu().numpy() if isinstance(t, torch.Tensor) else t, dtype=np.float64)
            for t in res
        )
    )


def run_global(model: LandmarkModel, image: StageImage, backend: str = "auto") -> StageVote:
    """Global stage on a prepared image: one network call and one vote."""
    spec = model.config.global_stage
    stride = spec.network.stride
    x = pad_to_multiple(torch.from_numpy(image.array)[None, None], stride)
    logits, disp = get_backend(model, backend).run_global(x)
    return _vote(logits[0], disp[0], model.dim, stride, spec.vote_min_prob)


def run_local(
    model: LandmarkModel, image: StageImage, centres: np.ndarray, backend: str = "auto"
) -> StageVote:
    """Local stage: crop around ``centres`` (``(L, D)`` array-order index of ``image``),
    run the L local networks as one grouped call, vote, and map back to ``image``."""
    spec = model.config.local_stage
    if spec is None:
        raise ValueError("model has no local stage")
    src = torch.from_numpy(image.array)[None, None]
    centres_t = torch.from_numpy(centres.astype(np.float32))[None]
    crops = sample_patches(src, centres_t, spec.crop_size)  # (1, L, *C)
    logits, disp = get_backend(model, backend).run_local(crops)
    local = _vote(logits[0], disp[0], model.dim, spec.network.stride, spec.vote_min_prob)
    pos = patch_to_source(
        torch.from_numpy(local.position)[None], centres_t.double(), spec.crop_size
    )[0].numpy()
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


def localize(
    image: Any,
    model: LandmarkModel | str | Path,
    *,
    spacing: float | tuple[float, ...] | None = None,
    backend: str = "auto",
) -> Landmarks:
    """Find the model's landmarks in one image.

    Args:
        image: A path (2D: PNG/JPEG/BMP/TIFF; 3D: NIfTI, NRRD, MHA/MHD or a DICOM series
            directory), a numpy array in array order ((y, x) or (z, y, x); needs
            ``spacing``), a ``SimpleITK.Image``, an ``itk.Image`` or a torch tensor.
        model: A loaded model, a model directory or a bundled model name.
        spacing: Pixel spacing in mm, (x, y[, z]) or one number; overrides the image's own
            spacing (2D image formats carry none).
        backend: ``"auto"`` or ``"torch"``.

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
    cfg = model.config
    img = as_image(image, spacing=spacing)
    if img.GetDimension() != cfg.dim:
        raise InvalidImageError(
            f"model {cfg.name!r} localizes landmarks in {cfg.dim}D images but the input is "
            f"{img.GetDimension()}D (size {img.GetSize()})"
        )
    name = Path(image).name.split(".")[0] if isinstance(image, str | Path) else ""
    original = geometry.Geometry.from_sitk(img)
    oriented = orient(img, cfg.orientation)

    coarse, value_range = stage_image(oriented, cfg.global_stage.spacing, None, cfg.intensity)
    g = run_global(model, coarse, backend)
    points = coarse.index_to_physical(g.position)
    weights = [g.weight]
    spread_mm = g.spread * float(np.mean(cfg.global_stage.spacing))
    details: dict[str, Any] = {
        "global_points_mm": points.copy(),
        "global_weight": g.weight,
        "global_spread_mm": spread_mm.copy(),
    }
    local_outside = np.zeros(len(cfg.landmarks), dtype=bool)

    if cfg.local_stage is not None and model.local_net is not None:
        fine, _ = stage_image(oriented, cfg.local_stage.spacing, value_range, cfg.intensity)
        centres = fine.physical_to_index(points)
        have = np.isfinite(centres).all(axis=1)
        start = np.where(have[:, None], centres, (np.array(fine.array.shape) - 1) / 2.0)
        loc = run_local(model, fine, start, backend)
        moved = np.abs(loc.position - start)
        half = np.array(cfg.local_stage.crop_size) / 2.0
        local_outside = ~(moved <= half).all(axis=1)
        use_local = have & np.isfinite(loc.position).all(axis=1)
        points = np.where(use_local[:, None], fine.index_to_physical(loc.position), points)
        weights.append(loc.weight)
        local_spread_mm = loc.spread * float(np.mean(cfg.local_stage.spacing))
        spread_mm = np.where(use_local, local_spread_mm, spread_mm)
        details.update(local_weight=loc.weight, local_spread_mm=local_spread_mm)

    index = geometry.physical_to_index(points, original)
    size = np.array(img.GetSize(), dtype=float)
    inside = ((index >= -0.5) & (index <= size - 0.5)).all(axis=1)
    conf = _confidence(model, weights, spread_mm)
    c = cfg.confidence
    min_w = np.min(np.stack([np.nan_to_num(w) for w in weights]), axis=0)
    flagged = (
        ~np.isfinite(points).all(axis=1)
        | (min_w < c.min_weight)
        | ~(spread_mm <= c.max_spread_mm)
        | ~inside
        | local_outside
    )
    details["inside_image"] = inside
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
