"""Preprocessing: an image in physical space -> normalised arrays at each stage's spacing.

Each stage works on the (oriented) image resampled to the stage's working spacing. All
stage grids share the image's origin (centre of voxel 0) and direction, so a stage
index converts to physical space through that stage's :class:`~fastlmk.geometry.Geometry`.
Intensities are mapped with one per-image linear map for all stages, measured at the
global (coarsest) spacing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from . import geometry
from .io import image_to_array
from .model import IntensitySpec

__all__ = ["StageImage", "intensity_range", "orient", "stage_image"]


@dataclass(frozen=True)
class StageImage:
    """An image prepared for one stage.

    Attributes:
        array: ``(*S)`` float32 normalised intensities, array order ((y, x) or (z, y, x)).
        geometry: Physical geometry of ``array`` (index order (x, y[, z])).
    """

    array: np.ndarray
    geometry: geometry.Geometry

    def index_to_physical(self, index_array_order: np.ndarray) -> np.ndarray:
        """``(N, D)`` continuous indices in array order -> ``(N, D)`` LPS mm (x, y[, z])."""
        return geometry.index_to_physical(
            geometry.array_index_to_itk(index_array_order), self.geometry
        )

    def physical_to_index(self, points_mm: np.ndarray) -> np.ndarray:
        """``(N, D)`` LPS mm -> ``(N, D)`` continuous indices in array order."""
        return geometry.itk_index_to_array(geometry.physical_to_index(points_mm, self.geometry))


def orient(image: sitk.Image, orientation: str) -> sitk.Image:
    """Reorient a 3D image's axes to the model's orientation; 2D images are unchanged."""
    return geometry.orient_to(image, orientation) if image.GetDimension() == 3 else image


def intensity_range(array: np.ndarray, spec: IntensitySpec) -> tuple[float, float]:
    """Intensities mapped to 0 and 1: the ``spec`` percentiles of ``array``.

    A constant image gets a unit range so that normalisation never divides by zero.
    """
    lo, hi = np.percentile(array, [spec.low, spec.high])
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def stage_image(
    image: sitk.Image,
    spacing: tuple[float, ...],
    value_range: tuple[float, float] | None,
    spec: IntensitySpec,
) -> tuple[StageImage, tuple[float, float]]:
    """Resample ``image`` to ``spacing`` (mm, (x, y[, z])) and normalise its intensities.

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
