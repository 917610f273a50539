"""Physical-space geometry: the one place where index <-> physical conversions live.

Conventions (used everywhere in fastlmk):

* Physical points are ITK/LPS world coordinates in millimetres, ordered (x, y[, z]).
* Continuous indices are in ITK order (x, y[, z]) too, unless a name says ``_zyx``
  or "array order". Index 0 is the *centre* of the first voxel.
* numpy arrays obtained from SimpleITK are in array order (z, y, x);
  :func:`array_index_to_itk` / :func:`itk_index_to_array` are the only functions
  that flip between the two orders.
* ``p = origin + direction @ (spacing * index)``, where column k of ``direction`` is
  the physical (LPS) unit vector of index axis k. This is SimpleITK's
  ``GetDirection()`` reshaped row-major to (D, D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import SimpleITK as sitk

from fastlmk.errors import InvalidImageError

__all__ = [
    "Geometry",
    "array_index_to_itk",
    "index_to_physical",
    "inside_image",
    "itk_index_to_array",
    "orient_to",
    "physical_to_index",
    "resample_to_spacing",
    "spacing_vector",
]

# A direction matrix whose |determinant| is below this is treated as singular: real
# direction matrices are orthonormal (|det| = 1), so this only rejects broken headers.
_MIN_ABS_DETERMINANT = 1e-6

_INTERPOLATORS = {
    "nearest": sitk.sitkNearestNeighbor,
    "linear": sitk.sitkLinear,
    "bspline": sitk.sitkBSpline,
    "lanczos": sitk.sitkLanczosWindowedSinc,
}


def _readonly_float64(values: Any, shape: tuple[int, ...], name: str) -> np.ndarray:
    array = np.array(values, dtype=np.float64)
    if array.shape != shape:
        raise InvalidImageError(
            f"Geometry {name} has shape {array.shape}, expected {shape}. "
            f"Pass one value per image axis, in (x, y[, z]) order."
        )
    array.setflags(write=False)
    return array


@dataclass(frozen=True)
class Geometry:
    """Physical-space geometry of a 2D or 3D image (the ITK image model).

    Attributes:
        origin: (D,) float64, physical LPS position in mm of the centre of voxel
            (0, 0[, 0]), ordered (x, y[, z]).
        spacing: (D,) float64, voxel size in mm along index axes (x, y[, z]).
        direction: (D, D) float64; column k is the physical direction (unit vector in
            LPS) of index axis k, i.e. SimpleITK's ``GetDirection()`` reshaped row-major.
        size: number of voxels along (x, y[, z]), SimpleITK's ``GetSize()``.

    The arrays are stored as read-only float64 copies. Construction validates the
    geometry and raises :class:`~fastlmk.errors.InvalidImageError` when spacing is
    not finite and positive, origin is not finite, or direction is singular.

    Example:
        >>> g = Geometry(origin=[0.0, 0.0], spacing=[0.1, 0.1],
        ...              direction=np.eye(2), size=(1935, 2400))
        >>> g.dim
        2
        >>> index_to_physical(np.array([10.0, 20.0]), g).tolist()
        [1.0, 2.0]
    """

    origin: np.ndarray
    spacing: np.ndarray
    direction: np.ndarray
    size: tuple[int, ...]

    def __post_init__(self) -> None:
        size = tuple(int(n) for n in self.size)
        dim = len(size)
        if dim not in (2, 3):
            raise InvalidImageError(
                f"Geometry has {dim} axes (size {size}); expected a 2D or 3D image."
            )
        if any(n < 1 for n in size):
            raise InvalidImageError(f"Geometry size {size} has an axis with no voxels.")
        origin = _readonly_float64(self.origin, (dim,), "origin")
        spacing = _readonly_float64(self.spacing, (dim,), "spacing")
        direction = _readonly_float64(self.direction, (dim, dim), "direction")
        if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise InvalidImageError(
                f"Spacing {spacing.tolist()} is invalid: every value must be finite and > 0 "
                f"(mm per voxel along x, y[, z]). Pass the correct spacing."
            )
        if not np.all(np.isfinite(origin)):
            raise InvalidImageError(f"Origin {origin.tolist()} must be finite (mm).")
        if not np.all(np.isfinite(direction)) or (
            abs(np.linalg.det(direction)) < _MIN_ABS_DETERMINANT
        ):
            raise InvalidImageError(
                f"Direction matrix {direction.tolist()} is not invertible; expected "
                f"(near-)orthonormal direction cosines. Fix the image header."
            )
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "direction", direction)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Geometry):
            return NotImplemented
        return (
            self.size == other.size
            and np.array_equal(self.origin, other.origin)
            and np.array_equal(self.spacing, other.spacing)
            and np.array_equal(self.direction, other.direction)
        )

    def __hash__(self) -> int:
        return hash(
            (self.size, self.origin.tobytes(), self.spacing.tobytes(), self.direction.tobytes())
        )

    @property
    def dim(self) -> int:
        """Number of spatial axes, 2 or 3."""
        return len(self.size)

    @cached_property
    def index_to_physical_matrix(self) -> np.ndarray:
        """(D, D) float64 matrix ``direction @ diag(spacing)``: maps an index step to mm."""
        matrix = self.direction * self.spacing[np.newaxis, :]
        matrix.setflags(write=False)
        return matrix

    @cached_property
    def physical_to_index_matrix(self) -> np.ndarray:
        """(D, D) float64 inverse of :attr:`index_to_physical_matrix`."""
        matrix = np.linalg.inv(self.index_to_physical_matrix)
        matrix.setflags(write=False)
        return matrix

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Geometry:
        """Geometry of a 2D or 3D SimpleITK image.

        Args:
            image: a SimpleITK image.

        Returns:
            Its geometry.

        Raises:
            InvalidImageError: the image is not 2D/3D or its geometry is invalid.
        """
        dim = image.GetDimension()
        return cls(
            origin=np.array(image.GetOrigin()),
            spacing=np.array(image.GetSpacing()),
            direction=np.array(image.GetDirection()).reshape(dim, dim),
            size=tuple(image.GetSize()),
        )

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Set this geometry's origin, spacing and direction on ``image`` (in place).

        Args:
            image: a SimpleITK image whose size equals :attr:`size`.

        Returns:
            ``image`` itself, for chaining.

        Raises:
            InvalidImageError: the image size differs from :attr:`size`.
        """
        if tuple(image.GetSize()) != self.size:
            raise InvalidImageError(
                f"Cannot apply a geometry of size {self.size} to an image of size "
                f"{tuple(image.GetSize())}."
            )
        image.SetOrigin(self.origin.tolist())
        image.SetSpacing(self.spacing.tolist())
        image.SetDirection(self.direction.ravel().tolist())
        return image

    def to_sitk_reference(self, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
        """A zero-filled SimpleITK image with this geometry (e.g. a resampling reference).

        Args:
            pixel_type: SimpleITK pixel type id, float32 by default.

        Returns:
            A new image of size :attr:`size` with this geometry.
        """
        return self.apply_to(sitk.Image(list(self.size), pixel_type))


def _as_geometry(geometry: Geometry | sitk.Image) -> Geometry:
    return geometry if isinstance(geometry, Geometry) else Geometry.from_sitk(geometry)


def _check_points(points: Any, dim: int, name: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim not in (1, 2) or array.shape[-1] != dim:
        raise ValueError(
            f"{name} has shape {array.shape}; expected ({dim},) or (N, {dim}) "
            f"for a {dim}D image, in (x, y[, z]) order."
        )
    return array


def index_to_physical(index_xyz: Any, geometry: Geometry | sitk.Image) -> np.ndarray:
    """Continuous ITK-order indices to physical LPS points.

    Computes ``origin + direction @ (spacing * index)``, vectorised.

    Args:
        index_xyz: (D,) or (N, D) continuous indices in ITK order (x, y[, z]);
            integer index i is the centre of voxel i.
        geometry: the image geometry (or a SimpleITK image to take it from).

    Returns:
        float64 array of the same shape: physical points in mm, LPS, (x, y[, z]).

    Raises:
        ValueError: the last axis of ``index_xyz`` is not the image dimension.

    Example:
        >>> g = Geometry([10.0, 0.0], [2.0, 0.5], np.eye(2), (4, 4))
        >>> index_to_physical([[1.0, 2.0]], g).tolist()
        [[12.0, 1.0]]
    """
    g = _as_geometry(geometry)
    index = _check_points(index_xyz, g.dim, "index_xyz")
    return index @ g.index_to_physical_matrix.T + g.origin


def physical_to_index(points_xyz: Any, geometry: Geometry | sitk.Image) -> np.ndarray:
    """Physical LPS points to continuous ITK-order indices (inverse of index_to_physical).

    Args:
        points_xyz: (D,) or (N, D) physical points in mm, LPS, (x, y[, z]).
        geometry: the image geometry (or a SimpleITK image to take it from).

    Returns:
        float64 array of the same shape: continuous indices (x, y[, z]); not rounded,
        not clipped to the image.

    Raises:
        ValueError: the last axis of ``points_xyz`` is not the image dimension.
    """
    g = _as_geometry(geometry)
    points = _check_points(points_xyz, g.dim, "points_xyz")
    return (points - g.origin) @ g.physical_to_index_matrix.T


def inside_image(index_xyz: Any, size: Sequence[int]) -> np.ndarray:
    """``(N,)`` bool: continuous ITK indices ``(N, D)`` within the image of ``size``
    voxels (x, y[, z]), i.e. within half a voxel of its centres; False for NaN."""
    index = np.asarray(index_xyz, dtype=np.float64)
    upper = np.asarray(size, dtype=np.float64) - 0.5
    with np.errstate(invalid="ignore"):
        return np.asarray(((index >= -0.5) & (index <= upper)).all(axis=-1))


def array_index_to_itk(idx_zyx: Any) -> np.ndarray:
    """Array-order indices (z, y, x) / (y, x) to ITK order (x, y, z) / (x, y).

    Args:
        idx_zyx: (..., D) indices in numpy array order.

    Returns:
        (..., D) array with the last axis reversed (a new contiguous array, same dtype).
    """
    return np.ascontiguousarray(np.asarray(idx_zyx)[..., ::-1])


def itk_index_to_array(idx_xyz: Any) -> np.ndarray:
    """ITK-order indices (x, y, z) / (x, y) to numpy array order (z, y, x) / (y, x).

    Args:
        idx_xyz: (..., D) indices in ITK order.

    Returns:
        (..., D) array with the last axis reversed (a new contiguous array, same dtype).
    """
    return np.ascontiguousarray(np.asarray(idx_xyz)[..., ::-1])


def spacing_vector(
    spacing: float | Sequence[float] | np.ndarray, dim: int, hint: str = ""
) -> np.ndarray:
    """A spacing given as one scalar or one value per axis, as ``(dim,)`` float64 mm.

    Args:
        spacing: mm per pixel, a scalar or (x, y[, z]).
        dim: Image dimensionality.
        hint: Appended to error messages (what the caller should pass instead).

    Raises:
        InvalidImageError: wrong number of values, or a value that is not finite and > 0.
    """
    values = np.asarray(spacing, dtype=np.float64)
    if values.ndim == 0:
        values = np.full(dim, float(values))
    suffix = f"; {hint}" if hint else ""
    if values.shape != (dim,):
        raise InvalidImageError(
            f"spacing {values.tolist()} has {values.size} values but the image is {dim}D "
            f"(expected {dim} values in (x, y[, z]) order, mm, or one scalar){suffix}."
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InvalidImageError(
            f"spacing {values.tolist()} is invalid: every value must be finite and > 0 mm{suffix}."
        )
    return values


def resample_to_spacing(
    image: sitk.Image,
    spacing: float | Sequence[float],
    *,
    interpolator: str = "linear",
    antialias: bool = True,
) -> sitk.Image:
    """Resample an image onto a grid with a new spacing, same origin and direction.

    The output keeps the origin (centre of voxel 0) and direction; its size along
    each axis is ``floor((n - 1) * s / s') + 1`` so the output voxel centres cover the
    input's physical extent without extrapolation. Output index k' therefore sits at
    input continuous index ``k' * s' / s`` (per axis, ITK order).

    When ``antialias`` is true and an axis is downsampled (s' > s), that axis is first
    smoothed with a recursive Gaussian of standard deviation
    ``sigma = 0.5 * sqrt(s'^2 - s^2)`` mm, which removes frequencies the coarse grid
    cannot represent. Pass ``antialias=False`` (and ``interpolator="nearest"``) for
    label maps.

    Smoothing and all four interpolators are separable and the grid change is
    axis-aligned in index space, so the work is done one axis at a time, most
    reduced axis first: each later pass runs on an already smaller image (about
    2x faster than smoothing the full volume along every axis, same result up to
    float rounding).

    Args:
        image: 2D or 3D single-component SimpleITK image.
        spacing: new spacing in mm, (x, y[, z]) order, or one scalar for all axes.
        interpolator: "linear" (default), "nearest", "bspline" or "lanczos".
        antialias: smooth downsampled axes first.

    Returns:
        float32 SimpleITK image with the new spacing, same origin and direction.

    Raises:
        InvalidImageError: invalid target spacing or image geometry.
        ValueError: unknown interpolator name.
    """
    if interpolator not in _INTERPOLATORS:
        raise ValueError(
            f"Unknown interpolator {interpolator!r}; expected one of {sorted(_INTERPOLATORS)}."
        )
    geometry = Geometry.from_sitk(image)
    new_spacing = spacing_vector(spacing, geometry.dim)
    spacing_now = geometry.spacing.tolist()
    size_now = list(geometry.size)
    work = sitk.Cast(image, sitk.sitkFloat32)
    # Most reduced axis first (smallest s / s'), so later passes touch fewer voxels.
    for axis in sorted(range(geometry.dim), key=lambda a: spacing_now[a] / new_spacing[a]):
        s, s_new = spacing_now[axis], float(new_spacing[axis])
        if s_new == s:
            continue
        # Recursive Gaussians need at least 4 samples along the smoothed axis.
        if antialias and s_new > s and size_now[axis] >= 4:
            sigma_mm = 0.5 * math.sqrt(s_new**2 - s**2)
            work = sitk.RecursiveGaussian(
                work, sigma_mm, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis
            )
        # The epsilon keeps e.g. (n - 1) * 0.1 / 0.3 = 2.9999999 from losing a voxel.
        size_now[axis] = math.floor((size_now[axis] - 1) * s / s_new + 1e-6) + 1
        spacing_now[axis] = s_new
        work = sitk.Resample(
            work,
            size_now,
            sitk.Transform(),
            _INTERPOLATORS[interpolator],
            geometry.origin.tolist(),
            spacing_now,
            geometry.direction.ravel().tolist(),
            0.0,
            sitk.sitkFloat32,
        )
    return work


def orient_to(image: sitk.Image, orientation: str = "LPS") -> sitk.Image:
    """Permute/flip the axes of a 3D image to be closest to ``orientation``.

    Uses ``sitk.DICOMOrient``: the voxel data and geometry are rearranged so that
    index axes point (as closely as a permutation and flips allow) towards the given
    anatomical directions; every voxel keeps its physical position. "LPS" gives an
    identity-like direction matrix. 2D images are returned unchanged.

    Args:
        image: 2D or 3D SimpleITK image.
        orientation: three letters, one from each of {L, R}, {P, A}, {S, I}
            (e.g. "LPS", "RAS"), naming where index axes x, y, z point to.

    Returns:
        The reoriented image (a new image for 3D input).

    Raises:
        ValueError: ``orientation`` is not a valid three-letter code.
    """
    if image.GetDimension() == 2:
        return image
    code = orientation.upper()
    axis_of_letter = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
    if len(code) != 3 or sorted(axis_of_letter.get(c, -1) for c in code) != [0, 1, 2]:
        raise ValueError(
            f"Invalid orientation {orientation!r}: expected three letters, one from each "
            f"of L/R, P/A, S/I, e.g. 'LPS' or 'RAS'."
        )
    return sitk.DICOMOrient(image, code)
