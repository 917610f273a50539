"""Plausibility of a found landmark configuration, against the training shapes.

Some failures leave every network confident: a pixel spacing that is wrong by a factor
(the anatomy looks twice as large as anything trained on), anatomy tilted against the
voxel grid further than the training images and their augmentation ever were, or one
landmark put on a neighbouring structure. The vote weights do not see these; the
configuration of the points does. A model stores the mean training shape and how far
the training shapes strayed from it (:class:`ShapeSpec`); :func:`check_shape` fits the
mean shape to the points found in an image with a similarity transform (scale, rotation,
translation; no mirroring) and reports a scale or rotation outside the training range
and the landmarks whose distance from the fitted mean shape is beyond what any training
shape showed.

Shapes live in the *grid frame* of the image the networks see (the image reoriented to
the model's orientation): continuous voxel index times spacing, in mm, axes (x, y[, z]).
The rotation measured there is the tilt of the anatomy against the voxel grid, which is
what the networks are sensitive to; the direction matrix of the image does not enter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ModelError
from .geometry import Geometry, physical_to_index

__all__ = [
    "MIN_SHAPES",
    "ImplausibleShapeWarning",
    "ShapeCheck",
    "ShapeSpec",
    "check_shape",
    "fit_shape_model",
    "grid_frame_mm",
    "rotation_angle_deg",
    "similarity_fit",
]

# Fewer training shapes than this do not say how far shapes stray (percentiles of a
# handful of values); such a model gets no shape check.
MIN_SHAPES = 10
# A landmark is an outlier when its distance from the fitted mean shape exceeds
# _RESIDUAL_FACTOR times the 99.5th percentile of its training distances plus the
# model's own localization error scale (the global stage's cell size): training
# shapes are annotations, while found points add the model's error to the shape's own
# variation.
_RESIDUAL_FACTOR = 2.0
_RESIDUAL_PERCENTILE = 99.5
# Margins beyond the training range widened by the augmentation: the scale may be
# another tenth off, the rotation another five degrees.
_SCALE_MARGIN = 0.10
_ROTATION_MARGIN_DEG = 5.0
# Ridge added to the covariance of the aligned training shapes: a share of the mean
# coordinate variance, at least (0.1 mm)^2. With fewer shapes than coordinates the
# covariance is singular; the ridge also keeps the predictions from trusting
# directions in which the training shapes happened not to vary.
_RIDGE_SHARE = 1e-3
_MIN_RIDGE_MM2 = 0.01


class ImplausibleShapeWarning(UserWarning):
    """The landmarks found in an image do not form a shape like the training shapes
    (scale or rotation outside the training range): every landmark is flagged."""


# eq=False: the arrays make field-wise equality ambiguous; specs compare by identity.
@dataclass(frozen=True, eq=False)
class ShapeSpec:
    """The training shapes of a model, as far as :func:`check_shape` needs them.

    Attributes:
        mean_mm: ``(L, D)`` mean training shape in the grid frame (mm, axes x, y[, z]),
            centred on its centroid, at the training shapes' mean size.
        scale_range: ``(low, high)``: the sizes, relative to ``mean_mm``, that a found
            shape may have.
        max_rotation_deg: Largest rotation of a found shape against ``mean_mm``.
        max_residual_mm: ``(L,)`` largest distance of each landmark from the fitted
            mean shape.
        shapes: Number of training shapes it was derived from.
        covariance: ``(L*D, L*D)`` covariance of the training shapes aligned to
            ``mean_mm`` (coordinates landmark-major: x0, y0[, z0], x1, ...), or None.
            With it, each landmark is also predicted from the others (the Gaussian
            conditional mean) and compared with ``max_conditional_mm``.
        max_conditional_mm: ``(L,)`` largest distance of each landmark from its
            prediction by the others, or None.
    """

    mean_mm: np.ndarray
    scale_range: tuple[float, float]
    max_rotation_deg: float
    max_residual_mm: np.ndarray
    shapes: int
    covariance: np.ndarray | None = None
    max_conditional_mm: np.ndarray | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "mean_mm": np.round(self.mean_mm, 4).tolist(),
            "scale_range": [float(v) for v in self.scale_range],
            "max_rotation_deg": float(self.max_rotation_deg),
            "max_residual_mm": np.round(self.max_residual_mm, 4).tolist(),
            "shapes": int(self.shapes),
        }
        if self.covariance is not None and self.max_conditional_mm is not None:
            # Six significant digits: the conditional predictions need the small
            # eigenvalues, which rounding to fixed decimals would destroy.
            d["covariance"] = [[float(f"{v:.6g}") for v in row] for row in self.covariance]
            d["max_conditional_mm"] = np.round(self.max_conditional_mm, 4).tolist()
        return d

    @classmethod
    def from_dict(cls, d: Any, names: Sequence[str], dim: int) -> ShapeSpec:
        """The ``shape`` entry of a model.json for a model with landmarks ``names``.

        Raises:
            ModelError: a missing field, or values of the wrong size or range.
        """
        try:
            mean = np.asarray(d["mean_mm"], dtype=np.float64)
            low, high = (float(v) for v in d["scale_range"])
            rotation = float(d["max_rotation_deg"])
            residual = np.asarray(d["max_residual_mm"], dtype=np.float64)
            shapes = int(d["shapes"])
            cov = d.get("covariance")
            covariance = None if cov is None else np.asarray(cov, dtype=np.float64)
            cond = d.get("max_conditional_mm")
            conditional = None if cond is None else np.asarray(cond, dtype=np.float64)
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            raise ModelError(
                f"model.json: invalid 'shape' entry ({type(exc).__name__}: {exc}); "
                "remove it (no shape check) or recompute it with fastlmk calibrate "
                "--landmarks"
            ) from None
        n = len(names)
        valid = (
            mean.shape == (n, dim)
            and residual.shape == (n,)
            and np.isfinite(mean).all()
            and _spans(mean, dim)
            and _positive_limits(residual)
            and 0 < low <= 1 <= high < math.inf
            and 0 < rotation <= 180
            and 0 < shapes
            and (covariance is None) == (conditional is None)
            and (
                covariance is None
                or conditional is None
                or (
                    covariance.shape == (n * dim, n * dim)
                    and conditional.shape == (n,)
                    and _positive_definite(covariance)
                    and _positive_limits(conditional)
                )
            )
        )
        if not valid:
            raise ModelError(
                f"model.json: the 'shape' entry does not fit the model ({n} landmarks, "
                f"{dim}D) or has values out of range; remove it (no shape check) or "
                "recompute it with fastlmk calibrate --landmarks"
            )
        return cls(mean, (low, high), rotation, residual, shapes, covariance, conditional)


def _positive_limits(limits: np.ndarray) -> bool:
    return bool(np.all(np.isfinite(limits) & (limits > 0)))


def _spans(mean: np.ndarray, dim: int) -> bool:
    """The mean shape has a size and is not all on one line (a rotation can be fitted)."""
    centred = mean - mean.mean(axis=0)
    singular = np.linalg.svd(centred, compute_uv=False)
    return bool(singular[0] > 0 and singular[1] > 1e-6 * singular[0])


def _positive_definite(cov: np.ndarray) -> bool:
    if not np.isfinite(cov).all() or not np.allclose(cov, cov.T, rtol=1e-4, atol=1e-6):
        return False
    try:
        np.linalg.cholesky((cov + cov.T) / 2)
    except np.linalg.LinAlgError:
        return False
    return True


@dataclass(frozen=True, eq=False)
class ShapeCheck:
    """The outcome of :func:`check_shape` for one image.

    Attributes:
        scale: Size of the found shape relative to the mean training shape.
        rotation_deg: Rotation of the found shape against the mean training shape
            (2D: signed, counter-clockwise in the (x, y) index plane; 3D: the angle of
            the rotation).
        residual_mm: ``(L,)`` distance (mm) of each landmark from where the other
            landmarks put it: its Gaussian conditional mean given them where the model
            has a covariance, else the fitted mean shape (NaN where there is no
            estimate).
        outlier: ``(L,)`` True where ``residual_mm`` is beyond the model's limit.
        problems: What makes the whole configuration implausible (empty: nothing).
    """

    scale: float
    rotation_deg: float
    residual_mm: np.ndarray
    outlier: np.ndarray
    problems: tuple[str, ...]

    @property
    def plausible(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "rotation_deg": self.rotation_deg,
            "problems": list(self.problems),
        }


def grid_frame_mm(points_mm: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Physical points (LPS mm, ``(N, D)``) in the grid frame of ``geometry``: continuous
    voxel index (x, y[, z]) times spacing, mm."""
    return physical_to_index(points_mm, geometry) * geometry.spacing


def similarity_fit(source: np.ndarray, target: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity transform taking ``source`` onto ``target`` (Umeyama).

    Args:
        source: ``(N, D)`` points.
        target: ``(N, D)`` corresponding points, N >= 2.

    Returns:
        ``(scale, rotation, translation)`` with ``rotation`` a proper ``(D, D)`` rotation
        (determinant +1: mirroring is not allowed), such that
        ``target ≈ scale * source @ rotation.T + translation``.
    """
    mu_s, mu_t = source.mean(axis=0), target.mean(axis=0)
    s, t = source - mu_s, target - mu_t
    cov = t.T @ s / len(source)
    u, sv, vt = np.linalg.svd(cov)
    fix = np.ones(len(sv))
    fix[-1] = np.sign(np.linalg.det(u @ vt)) or 1.0
    rotation = (u * fix) @ vt
    var_s = float(np.mean(np.sum(s * s, axis=1)))
    scale = float(np.sum(sv * fix) / var_s) if var_s > 0 else 0.0
    return scale, rotation, mu_t - scale * (rotation @ mu_s)


def rotation_angle_deg(rotation: np.ndarray) -> float:
    """Angle of a rotation matrix in degrees: 2D signed (counter-clockwise in the (x, y)
    plane), 3D the angle about its axis (>= 0)."""
    if len(rotation) == 2:
        return math.degrees(math.atan2(rotation[1, 0], rotation[0, 0]))
    cos = (np.trace(rotation) - 1.0) / 2.0
    return math.degrees(math.acos(float(np.clip(cos, -1.0, 1.0))))


def _fit(mean: np.ndarray, points: np.ndarray, use: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Scale, rotation (deg) and per-landmark distances (NaN where ``points`` is not
    finite) of the mean shape fitted to ``points`` on the landmarks in ``use``."""
    scale, rotation, shift = similarity_fit(mean[use], points[use])
    fitted = scale * mean @ rotation.T + shift
    with np.errstate(invalid="ignore"):
        residual = np.linalg.norm(points - fitted, axis=1)
    return scale, rotation_angle_deg(rotation), residual


def _covariance(aligned: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Ridge-regularised covariance ``(L*D, L*D)`` of shapes ``(N, L*D)`` about ``mean``."""
    dev = aligned - mean
    cov = dev.T @ dev / max(len(aligned) - 1, 1)
    ridge = max(_MIN_RIDGE_MM2, _RIDGE_SHARE * float(np.trace(cov)) / len(cov))
    return cov + ridge * np.eye(len(cov))


# Variance (mm^2) given to the directions in which a similarity transform moves the mean
# shape: far above any shape variation, so that the predictions ignore them.
_POSE_VARIANCE_MM2 = 1e6


def _pose_directions(mean: np.ndarray) -> np.ndarray:
    """Orthonormal ``(L*D, k)`` basis of the changes of the flattened ``mean`` under
    translation, rotation and scaling (k = 4 in 2D, 7 in 3D)."""
    n_lm, dim = mean.shape
    directions = []
    for axis in range(dim):  # translations
        t = np.zeros((n_lm, dim))
        t[:, axis] = 1.0
        directions.append(t.ravel())
    if dim == 2:
        directions.append(np.column_stack([-mean[:, 1], mean[:, 0]]).ravel())
    else:
        for unit in np.eye(3):
            directions.append(np.cross(unit, mean).ravel())
    directions.append(mean.ravel())  # scaling
    q, _ = np.linalg.qr(np.stack(directions, axis=1))
    return q


def _pose_free(cov: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``cov`` with a huge variance along the pose directions of ``mean``.

    Shapes aligned by a similarity fit satisfy exact constraints (fixed centroid,
    rotation, size): without this, each landmark would be "predicted" from the others
    through those constraints, and a misplaced landmark, once the shape is realigned,
    would look consistent.
    """
    q = _pose_directions(mean)
    return cov + _POSE_VARIANCE_MM2 * (q @ q.T)


def _conditional_residuals(
    x: np.ndarray, mean: np.ndarray, cov: np.ndarray, given: np.ndarray, dim: int
) -> np.ndarray:
    """Distance of each landmark of ``x`` (``(L*D,)``, aligned to the mean shape) from
    its Gaussian conditional mean given the landmarks in ``given`` other than itself.

    For a landmark in ``given`` the residual is ``P_tt^-1 (P (x - mean))_t`` with ``P``
    the precision of the ``given`` coordinates (one inversion for all of them); for
    one outside, ``x_t - mean_t - C_tG P (x_G - mean_G)``. NaN where ``x`` is NaN.
    """
    n = len(given)
    out = np.full(n, np.nan)
    coords = np.repeat(given, dim)
    if not coords.any():
        return out
    precision = np.linalg.inv(cov[np.ix_(coords, coords)])
    weighted = precision @ (x[coords] - mean[coords])
    position = np.cumsum(coords) - 1  # index of each coordinate within the given set
    for k in range(n):
        t = slice(k * dim, (k + 1) * dim)
        if not np.isfinite(x[t]).all():
            continue
        if given[k]:
            inside = position[t]
            block = precision[np.ix_(inside, inside)]
            out[k] = float(np.linalg.norm(np.linalg.solve(block, weighted[inside])))
        else:
            predicted = mean[t] + cov[t][:, coords] @ weighted
            out[k] = float(np.linalg.norm(x[t] - predicted))
    return out


def _aligned_to_mean(points: np.ndarray, mean: np.ndarray, use: np.ndarray) -> np.ndarray:
    """``points`` mapped onto ``mean`` by the similarity fitted on ``use`` (mean frame)."""
    scale, rotation, shift = similarity_fit(points[use], mean[use])
    return scale * points @ rotation.T + shift


def _conditional_model(
    stack: np.ndarray, present: np.ndarray, mean: np.ndarray, localization_mm: float
) -> tuple[np.ndarray, np.ndarray] | tuple[None, None]:
    """Covariance of the complete training shapes aligned to ``mean`` and each
    landmark's limit: twice the 99.5th percentile of its leave-one-out distance from
    its prediction by the others, plus ``localization_mm``. (None, None) unless there
    are more complete shapes than coordinates (L * D) and than MIN_SHAPES."""
    complete = present.all(axis=1)
    n_lm, dim = mean.shape
    # With fewer shapes than coordinates the covariance is mostly ridge: the leave-one-
    # out limits come out far too tight and flag correct points.
    if complete.sum() <= max(MIN_SHAPES, n_lm * dim):
        return None, None
    every = np.ones(n_lm, dtype=bool)
    aligned = np.stack([_aligned_to_mean(sh, mean, every).ravel() for sh in stack[complete]])
    flat = mean.ravel()
    held_out = []
    for i in range(len(aligned)):
        cov_i = _pose_free(_covariance(np.delete(aligned, i, axis=0), flat), mean)
        held_out.append(_conditional_residuals(aligned[i], flat, cov_i, every, dim))
    limit = _RESIDUAL_FACTOR * np.percentile(np.stack(held_out), _RESIDUAL_PERCENTILE, axis=0)
    return _covariance(aligned, flat), limit + max(localization_mm, 1e-6)


def fit_shape_model(
    shapes: Sequence[np.ndarray],
    *,
    rotation_deg: float = 0.0,
    scale: float = 0.0,
    localization_mm: float = 0.0,
) -> ShapeSpec:
    """The mean shape and the limits of :func:`check_shape` from annotated shapes.

    The mean is found by generalized Procrustes analysis (each shape aligned to the
    current mean by a similarity transform, the mean recomputed, ten rounds). Limits: the
    scale range of the training shapes widened by the augmentation's ``scale`` and a
    further tenth; the largest training rotation plus ``rotation_deg`` and five degrees;
    per landmark twice the 99.5th percentile of its training distances from the fitted
    mean shape plus ``localization_mm``. With more complete shapes than coordinates
    (L * D) and than :data:`MIN_SHAPES`, also the covariance of the aligned shapes
    (ridge-regularised) and, per landmark, twice the 99.5th percentile of its
    leave-one-out distance from its prediction by the other landmarks (the Gaussian
    conditional mean, blind to pose) plus ``localization_mm``.

    Args:
        shapes: ``(L, D)`` arrays in the grid frame (:func:`grid_frame_mm`), one per
            training image; NaN rows for landmarks not annotated on an image.
        rotation_deg: The training augmentation's largest rotation (degrees).
        scale: The training augmentation's largest relative scale change.
        localization_mm: The model's typical localization error (mm), added to the
            residual limits (found points carry it on top of the shape's variation).

    Returns:
        The shape specification to store in the model (``ModelConfig.shape``).

    Raises:
        ValueError: fewer than :data:`MIN_SHAPES` shapes with at least D + 2 landmarks,
            shapes of different sizes, a landmark annotated on fewer than half of
            the shapes, or an augmentation value out of range.
    """
    if not (math.isfinite(rotation_deg) and 0 <= rotation_deg <= 180):
        raise ValueError(f"rotation_deg must be degrees in [0, 180], not {rotation_deg!r}")
    if not (math.isfinite(scale) and 0 <= scale < 1):
        raise ValueError(f"scale must be a relative change in [0, 1), not {scale!r}")
    if not (math.isfinite(localization_mm) and localization_mm >= 0):
        raise ValueError(f"localization_mm must be >= 0, not {localization_mm!r}")
    if not shapes:
        raise ValueError("fit_shape_model needs annotated shapes")
    stack = np.stack([np.asarray(s, dtype=np.float64) for s in shapes])  # (N, L, D)
    if stack.ndim != 3 or stack.shape[2] not in (2, 3):
        raise ValueError(f"shapes must be (L, 2) or (L, 3) arrays, got {stack.shape[1:]}")
    n_lm, dim = stack.shape[1:]
    present = np.asarray(np.isfinite(stack).all(axis=2))  # (N, L)
    keep = present.sum(axis=1) >= dim + 2
    if keep.sum() < MIN_SHAPES or n_lm < dim + 2:
        raise ValueError(
            f"a shape model needs at least {MIN_SHAPES} shapes with {dim + 2} or more "
            f"landmarks each; got {int(keep.sum())} such shapes of {n_lm} landmarks"
        )
    stack, present = stack[keep], present[keep]
    sparse = present.mean(axis=0) < 0.5
    if sparse.any():
        raise ValueError(
            f"landmarks {np.flatnonzero(sparse).tolist()} are annotated on fewer than "
            "half of the shapes"
        )
    # Start from the most complete shape; Procrustes rounds converge in a few steps.
    first = int(np.argmax(present.sum(axis=1)))
    mean = np.where(present[first][:, None], stack[first], np.nanmean(stack, axis=0))
    for _ in range(10):
        aligned = np.full_like(stack, np.nan)
        for i, (shape, use) in enumerate(zip(stack, present, strict=True)):
            s, r, t = similarity_fit(shape[use], mean[use])
            aligned[i, use] = s * shape[use] @ r.T + t
        mean = np.nanmean(aligned, axis=0)
        mean -= mean.mean(axis=0)
    # Procrustes leaves the mean in the pose of the shape it started from; turn it to the
    # training shapes' average pose, so that rotations are measured from the middle of
    # their range (the average rotation: the sum of the rotation matrices projected onto
    # the rotations).
    turns = np.zeros((dim, dim))
    for shape, use in zip(stack, present, strict=True):
        turns += similarity_fit(mean[use], shape[use])[1]
    u, _, vt = np.linalg.svd(turns)
    fix = np.ones(dim)
    fix[-1] = np.sign(np.linalg.det(u @ vt)) or 1.0
    mean = mean @ ((u * fix) @ vt).T
    if not _spans(mean, dim):
        raise ValueError(
            "the annotated landmarks lie on one line (or on one point): no rotation can "
            "be measured against them"
        )
    # The mean at the training shapes' mean size (Procrustes shrinks it slightly).
    sizes = [
        np.sqrt(np.mean(np.sum((sh[u] - sh[u].mean(axis=0)) ** 2, axis=1)))
        / np.sqrt(np.mean(np.sum((mean[u] - mean[u].mean(axis=0)) ** 2, axis=1)))
        for sh, u in zip(stack, present, strict=True)
    ]
    mean *= float(np.mean(sizes))
    scales, rotations, residuals = [], [], []
    for shape, use in zip(stack, present, strict=True):
        s, angle, res = _fit(mean, shape, use)
        scales.append(s)
        rotations.append(abs(angle))
        residuals.append(res)
    res = np.stack(residuals)  # (N, L), NaN where not annotated
    limit = _RESIDUAL_FACTOR * np.nanpercentile(res, _RESIDUAL_PERCENTILE, axis=0)
    covariance, conditional = _conditional_model(stack, present, mean, localization_mm)
    return ShapeSpec(
        mean_mm=mean,
        scale_range=(
            min(1.0, min(scales) * (1.0 - scale) / (1.0 + _SCALE_MARGIN)),
            max(1.0, max(scales) * (1.0 + scale) * (1.0 + _SCALE_MARGIN)),
        ),
        max_rotation_deg=min(180.0, max(rotations) + rotation_deg + _ROTATION_MARGIN_DEG),
        max_residual_mm=limit + max(localization_mm, 1e-6),
        shapes=len(stack),
        covariance=covariance,
        max_conditional_mm=conditional,
    )


def check_shape(
    points: np.ndarray, spec: ShapeSpec, trusted: np.ndarray | None = None
) -> ShapeCheck:
    """Compare the landmarks found in one image with the model's training shapes.

    The mean shape is fitted to the found points by a similarity transform; the
    landmark furthest beyond its limit is left out of the fit and the fit repeated,
    until every landmark used is within its limit, so that one misplaced landmark does
    not drag the fit and make its neighbours look wrong. At least half of the fitted
    landmarks (and D + 1) stay in the fit.

    Args:
        points: ``(L, D)`` found landmarks in the grid frame (:func:`grid_frame_mm`),
            model order; NaN rows for landmarks without estimate.
        spec: The model's shape specification.
        trusted: ``(L,)`` bool, the landmarks to fit on (e.g. those the vote checks
            did not flag: a landmark cut off by the field of view would otherwise
            drag the scale); all found ones when None or when fewer than D + 2 of them
            are trusted. Every found landmark gets its distance and outlier flag.

    With a covariance in ``spec``, each landmark is then predicted from the others (the
    points aligned to the mean shape by the fit; the Gaussian conditional mean), and an
    outlier is a landmark further from its prediction than ``max_conditional_mm``; the
    worst one is left out of the predictions of the others while more than half remain.

    Returns:
        The fitted scale and rotation, each landmark's distance from where the others
        put it and its outlier flag, and the problems of the whole configuration: a
        scale or rotation outside the model's range, fewer than half the landmarks
        consistent with any one placement of the mean shape, or fewer than D + 2 and
        than half of the found landmarks trusted.
    """
    points = np.asarray(points, dtype=np.float64)
    mean, limit = spec.mean_mm, spec.max_residual_mm
    if points.shape != mean.shape:
        raise ValueError(
            f"check_shape: points of shape {points.shape}; the model has {mean.shape} "
            "(landmarks, dimensions)"
        )
    if trusted is not None and np.shape(trusted) != (len(mean),):
        raise ValueError(f"check_shape: trusted must have shape ({len(mean)},)")
    found = np.isfinite(points).all(axis=1)
    dim = mean.shape[1]
    n_found = int(found.sum())
    nan = np.full(len(points), np.nan)
    if n_found < dim + 2:
        # Too few points to say anything about their configuration.
        return ShapeCheck(math.nan, math.nan, nan, np.zeros(len(points), bool), ())
    use = found.copy()
    n_trusted = n_found if trusted is None else int(np.sum(found & trusted))
    if n_trusted >= dim + 2:
        use &= np.asarray(trusted, dtype=bool) if trusted is not None else found
    fitted = int(use.sum())
    residual, use = _leave_out_worst(lambda u: _fit(mean, points, u)[2], use, limit, dim)
    scale, angle, _ = _fit(mean, points, use)
    with np.errstate(invalid="ignore"):
        outlier = found & (residual > limit)
    problems = []
    if (outlier & use).any():
        problems.append(
            f"no placement of the mean training shape fits more than {int(use.sum())} "
            f"of the {fitted} landmarks it was fitted to"
        )
    distance = np.where(found, residual, np.nan)
    if spec.covariance is not None and spec.max_conditional_mm is not None:
        start = found & (np.asarray(trusted, dtype=bool) if trusted is not None else found)
        if start.sum() < dim + 2:
            start = found
        distance, outlier = _conditional_outliers(points, spec, use, start)
        distance = distance * scale  # mean-shape frame -> mm in the image
    low, high = spec.scale_range
    if not low <= scale <= high:
        problems.append(
            f"the landmarks span {scale:.2f} times the mean training shape (training "
            f"range with augmentation {low:.2f}..{high:.2f}): check the pixel spacing"
        )
    if abs(angle) > spec.max_rotation_deg:
        problems.append(
            f"the landmarks are rotated {abs(angle):.0f} degrees against the mean training "
            f"shape in the voxel grid (at most {spec.max_rotation_deg:.0f} seen in "
            "training): the anatomy is tilted further than the model was trained for"
        )
    if n_trusted < dim + 2 and n_trusted < n_found / 2:
        # Most landmarks failed the other checks and the few left cannot be checked
        # against each other: they are no more credible than the rest.
        problems.append(
            f"only {n_trusted} of the {n_found} landmarks found pass the vote checks, "
            "too few to check their configuration"
        )
    return ShapeCheck(scale, angle, distance, outlier, tuple(problems))


def _conditional_outliers(
    points: np.ndarray, spec: ShapeSpec, pose: np.ndarray, given: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mean-shape frame) of each landmark from its prediction by the others
    and the outlier flags, the points aligned to the mean shape by the similarity fitted
    on ``pose``. The landmark furthest beyond its limit leaves the set the predictions
    are conditioned on, and the predictions are repeated, while more than half of
    ``given`` remain: a misplaced landmark must not move the predictions of the rest."""
    assert spec.covariance is not None and spec.max_conditional_mm is not None
    mean, limit = spec.mean_mm, spec.max_conditional_mm
    dim = mean.shape[1]
    x = _aligned_to_mean(points, mean, pose).ravel()
    flat, cov = mean.ravel(), _pose_free(spec.covariance, mean)
    distance, _ = _leave_out_worst(
        lambda g: _conditional_residuals(x, flat, cov, g, dim), given, limit, dim
    )
    with np.errstate(invalid="ignore"):
        return distance, np.isfinite(distance) & (distance > limit)


def _leave_out_worst(
    distances: Callable[[np.ndarray], np.ndarray], use: np.ndarray, limit: np.ndarray, dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """``distances(use)`` after leaving out, one at a time, the landmark of ``use``
    furthest beyond its ``limit``, while more than half of ``use`` (and D + 1) remain.

    Returns:
        The last distances and the landmarks still used.
    """
    use = use.copy()
    keep_at_least = max(dim + 1, math.ceil(int(use.sum()) / 2))
    while True:
        distance = distances(use)
        ratio = np.where(use, distance / limit, 0.0)
        worst = int(np.argmax(ratio))
        if ratio[worst] <= 1.0 or use.sum() <= keep_at_least:
            return distance, use
        use[worst] = False
