"""Localization of anatomy tilted against the voxel grid: turn the image, localize again.

The networks see the voxel grid as stored, and answer anatomy tilted further than the
training images were with points that follow the tilt only part of the way (the
AFIDs model, shown a head rotated 30 degrees, returns fiducials in the usual brain
pose, up to 32 mm off). The shape check of a first pass measures the tilt: the rotation
of the model's mean training shape onto the points found
(:func:`fastlmk.shape.check_shape`). When it exceeds the model's threshold, the image is
resampled so that the anatomy turns back by that rotation (about the centroid of the
points, in the grid frame of the oriented image), localized again, and the points are
turned back into the original image's space. Since the first points follow the tilt
only partly, this is repeated (up to :data:`MAX_PASSES` times, each pass resampling the
original voxels with the accumulated rotation) until the remaining rotation is below
:data:`DONE_DEG`.

Everything is measured in the grid frame (voxel index times spacing), so the result
does not depend on the direction matrix: the same voxels with a rotated direction give
exactly rotated points.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .geometry import Geometry, index_to_physical, inside_image, physical_to_index
from .io import as_image
from .landmarks import Landmarks
from .model import LandmarkModel
from .preprocess import orient
from .shape import ImplausibleShapeWarning, grid_frame_mm, rotation_angle_deg, similarity_fit

__all__ = ["DEFAULT_ALIGN_DEG", "DONE_DEG", "MAX_PASSES", "localize_aligned"]

# Threshold for ``align=True`` on a model that sets none.
DEFAULT_ALIGN_DEG = 3.0
# Passes after the first, and the remaining rotation at which they stop.
MAX_PASSES = 3
DONE_DEG = 1.0


def _orientation_axes(orientation: str, dim: int) -> np.ndarray:
    """Direction matrix ``(D, D)`` of the model orientation (3D: e.g. RAS -> diag(-1,
    -1, 1)); identity in 2D, where images are not reoriented."""
    if dim == 2:
        return np.eye(2)
    cosines = sitk.DICOMOrientImageFilter.GetDirectionCosinesFromOrientation(orientation)
    return np.array(cosines, dtype=float).reshape(3, 3)


def _trusted_count(lm: Landmarks) -> int:
    """Landmarks found and not flagged by the vote checks (the shape check's flags
    aside: it flags every landmark of a shape tilted beyond the training range)."""
    found = np.isfinite(lm.points_mm).all(axis=1)
    return int(np.sum(found & ~lm.details.get("vote_flagged", lm.flagged)))


def _all_flagged(
    first: Landmarks, name: str, caught: list[warnings.WarningMessage], why: str
) -> Landmarks:
    """The first pass with every landmark flagged, and a warning saying ``why``."""
    _replay([w for w in caught if not issubclass(w.category, ImplausibleShapeWarning)], name)
    warnings.warn(
        f"{name + ': ' if name else ''}every landmark flagged: {why}",
        ImplausibleShapeWarning,
        stacklevel=4,
    )
    return replace(
        first,
        image=name,
        flagged=np.ones_like(first.flagged),
        confidence=np.minimum(first.confidence, 0.5),
    )


def _fit_points(lm: Landmarks, dim: int) -> np.ndarray:
    """``(L,)`` bool: the landmarks to fit the rotation to (found and not flagged by the
    vote checks, or all found ones when fewer than D + 2 are)."""
    found = np.isfinite(lm.points_mm).all(axis=1)
    trusted = found & ~lm.details.get("vote_flagged", lm.flagged)
    return trusted if trusted.sum() >= dim + 2 else found


def _quiet_localize(
    image: sitk.Image, model: LandmarkModel, backend: str
) -> tuple[Landmarks, list[warnings.WarningMessage]]:
    from .inference import _localize  # here: inference imports this module lazily

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ImplausibleShapeWarning)
        lm = _localize(image, model, backend=backend)
    return lm, caught


def _replay(caught: list[warnings.WarningMessage], name: str) -> None:
    for w in caught:
        message = str(w.message)
        if issubclass(w.category, ImplausibleShapeWarning) and name:
            message = f"{name}: {message}"
        warnings.warn_explicit(message, w.category, w.filename, w.lineno)


def localize_aligned(
    image: Any,
    model: LandmarkModel,
    *,
    spacing: float | tuple[float, ...] | None = None,
    backend: str = "auto",
    above_deg: float,
) -> Landmarks:
    """:func:`fastlmk.localize`, realigning anatomy tilted more than ``above_deg``.

    Args:
        image: As for :func:`fastlmk.localize`.
        model: A loaded model with a shape model (``model.config.shape``).
        spacing: As for :func:`fastlmk.localize`.
        backend: As for :func:`fastlmk.localize`.
        above_deg: Realign when the first pass's points are rotated more than this
            (degrees) against the mean training shape.

    Returns:
        The landmarks in the original image's physical space (LPS mm). After
        realignment, confidence, flags and ``details`` are those of the last pass (the
        points in ``details`` mapped back to the original space; its shape check is
        measured in the turned image), and ``details["alignment"]``
        holds the rotation applied (``rotation_deg``, the ``(D, D)`` ``matrix`` in the
        grid frame) and the number of passes.
    """
    cfg = model.config
    if cfg.shape is None:
        raise ValueError(f"model {cfg.name!r} has no shape model: it cannot be realigned")
    name = Path(image).name.split(".")[0] if isinstance(image, str | Path) else ""
    img = as_image(image, spacing=spacing, keep_integer=True)
    first, caught = _quiet_localize(img, model, backend)
    first_caught = caught
    check = first.details.get("shape")
    first_trusted = _trusted_count(first)
    tilted = (
        check is not None
        and np.isfinite(check.rotation_deg)
        and abs(check.rotation_deg) > above_deg
        # A wrong spacing is not a tilt: turning the image would not help.
        and cfg.shape.scale_range[0] <= check.scale <= cfg.shape.scale_range[1]
    )
    if not tilted or check is None:
        _replay(caught, name)
        return replace(first, image=name)
    if first_trusted < cfg.dim + 2:
        # Tilted, as far as the points tell, but too few of them pass the vote checks
        # to measure the tilt: the few that pass are no more credible than the rest.
        return _all_flagged(
            first,
            name,
            caught,
            f"the landmarks are tilted {abs(check.rotation_deg):.0f} degrees against the "
            f"mean training shape and only {first_trusted} pass the vote checks, too few "
            "to realign the image",
        )

    dim = cfg.dim
    oriented = orient(img, cfg.orientation)
    geometry = Geometry.from_sitk(oriented)
    # The oriented voxels with origin 0 and the model orientation's axis directions
    # (``axes``, a signed permutation; identity for LPS and in 2D): the pipeline does
    # not reorient this image, and physical = axes @ grid frame.
    axes = _orientation_axes(cfg.orientation, dim)
    grid = sitk.Image(oriented)
    grid.SetOrigin([0.0] * dim)
    grid.SetDirection(axes.ravel().tolist())
    # Padding where the turned image leaves the original field of view: the darkest
    # value, the usual background of X-ray and MR images.
    stats = sitk.MinimumMaximumImageFilter()
    stats.Execute(grid)
    background = float(stats.GetMinimum())

    points = grid_frame_mm(first.points_mm, geometry)
    use = _fit_points(first, dim)
    centre = points[use].mean(axis=0)
    total = np.eye(dim)
    lm, passes = first, 0
    while passes < MAX_PASSES:
        passes += 1
        _, turn, _ = similarity_fit(cfg.shape.mean_mm[use], points[use])
        total = total @ turn
        # Resample: output(g) = input(total (g - c) + c) in the grid frame, i.e. the
        # anatomy turned back by total; in physical space (p = axes g) the matrix is
        # axes total axes^T about axes c.
        transform = sitk.AffineTransform(dim)
        transform.SetMatrix((axes @ total @ axes.T).ravel().tolist())
        transform.SetCenter((axes @ centre).tolist())
        turned = sitk.Resample(grid, grid, transform, sitk.sitkLinear, background)
        lm, caught = _quiet_localize(turned, model, backend)
        points = lm.points_mm @ axes  # grid frame of the turned image
        use = _fit_points(lm, dim)
        remaining = lm.details.get("shape")
        if (
            remaining is None
            or not np.isfinite(remaining.rotation_deg)
            or abs(remaining.rotation_deg) < DONE_DEG
            or use.sum() < dim + 2
        ):
            break
    final_found = int(np.isfinite(lm.points_mm).all(axis=1).sum())
    final_trusted = _trusted_count(lm)
    if final_trusted < max(dim + 1, math.ceil(final_found / 2)):
        # Most landmarks of the turned image fail the vote checks: its points are not
        # founded, and the original's are off by the tilt.
        return _all_flagged(
            first,
            name,
            first_caught,
            f"the landmarks are tilted {abs(check.rotation_deg):.0f} degrees against the "
            "mean training shape and the turned image gave no reliable result",
        )
    _replay(caught, name)

    def to_physical(turned_points: np.ndarray) -> np.ndarray:
        """Points (..., D) of the turned image -> LPS mm of the original image."""
        flat = turned_points.reshape(-1, dim) @ axes  # grid frame of the turned image
        grid_points = (flat - centre) @ total.T + centre
        return index_to_physical(grid_points / geometry.spacing, geometry).reshape(
            turned_points.shape
        )

    physical = to_physical(lm.points_mm)
    original = Geometry.from_sitk(img)
    index = physical_to_index(physical, original)
    inside = inside_image(index, img.GetSize())
    flagged = lm.flagged | ~inside
    details = dict(lm.details)
    for key in ("global_points_mm", "local_stage_points_mm"):
        if key in details:
            details[key] = to_physical(np.asarray(details[key], dtype=float))
    details["inside_image"] = inside
    details["alignment"] = {
        "rotation_deg": abs(rotation_angle_deg(total)),
        "matrix": total,
        "passes": passes,
    }
    details["first_pass_points_mm"] = first.points_mm
    return Landmarks(
        names=lm.names,
        points_mm=physical,
        index=index,
        confidence=np.where(flagged, np.minimum(lm.confidence, 0.5), lm.confidence),
        flagged=flagged,
        image=name,
        details=details,
    )
