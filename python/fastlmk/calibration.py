"""Flag thresholds of a model from its own votes on images it localizes correctly.

The vote weight of a stage (the sum of its cell probabilities) has a model-specific
range: a network that sees a landmark once gives about one, but how far below or above
one it goes on good images depends on the network, its stride and its training. A fixed
threshold therefore either misses failures (a landmark outside the field of view still
gets weight 0.2 from a network whose good votes never go below 1) or flags good points.
:func:`calibrate_confidence` measures the range on given images and puts the thresholds
a safety factor outside it.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FastlmkError, InvalidImageError, ModelError
from .geometry import Geometry, inside_image, physical_to_index
from .inference import localize
from .io import as_image
from .landmark_files import LandmarkTable
from .model import BUNDLED_MODELS, ConfidenceSpec, LandmarkModel, StageSpec, load_model
from .preprocess import orient
from .shape import MIN_SHAPES, ShapeSpec, fit_shape_model, grid_frame_mm

__all__ = [
    "CalibrationResult",
    "calibrate_confidence",
    "calibrate_shape",
    "spread_limit_mm",
    "write_calibration",
    "write_shape",
]

# Thresholds sit this factor outside the observed range: the images a model is
# calibrated on are usually ones it was trained on, where its votes are surer than on
# new images, and a flag on a good point costs a user a needless manual check.
_MARGIN = 2.0
# A network trained with one positive cell per landmark gives a landmark it sees a vote
# weight near one. Calibration images on which more than _MAX_UNSEEN_SHARE of the
# estimates have a stage weight below _UNSEEN_WEIGHT are not images the model localizes
# well: a blank or foreign image would teach "landmark not seen" as normal and switch
# the flags off.
_UNSEEN_WEIGHT = 0.25
_MAX_UNSEEN_SHARE = 0.05
# Percentiles rather than extremes, so that one odd point among the calibration images
# (a landmark that really is cut off) does not disable the check.
_LOW_PERCENTILE = 0.5
_HIGH_PERCENTILE = 99.5


@dataclass(frozen=True)
class CalibrationResult:
    """Thresholds from :func:`calibrate_confidence` and what they were derived from.

    Attributes:
        spec: The model's confidence specification with ``min_weight``,
            ``max_weight`` and ``max_spread_mm`` replaced.
        images: Number of images localized.
        points: Number of landmark estimates measured.
        weight_range: ``(low, high)``: the 0.5th percentile of each point's smallest
            stage weight and the 99.5th percentile of its largest.
        spread_high_mm: The 99.5th percentile of the final vote spreads.
    """

    spec: ConfidenceSpec
    images: int
    points: int
    weight_range: tuple[float, float]
    spread_high_mm: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "images": self.images,
            "points": self.points,
            "weight_range": list(self.weight_range),
            "spread_high_mm": self.spread_high_mm,
        }


def spread_limit_mm(global_stage: StageSpec, local_stages: Sequence[StageSpec]) -> float:
    """The largest meaningful spread threshold (mm): the smallest local crop's half-width
    (beyond it an estimate is not inside the crop it came from); without local stages,
    ten global cells. It is also a new model's default ``max_spread_mm``."""
    if local_stages:
        # crop_size is in array order, spacing in (x, y[, z]) order.
        return float(
            min((np.array(s.crop_size) * np.array(s.spacing[::-1])).min() / 2 for s in local_stages)
        )
    return 10.0 * float(np.mean(global_stage.spacing)) * global_stage.network.stride


def calibrate_confidence(
    model: LandmarkModel | str | Path,
    images: Iterable[Any],
    *,
    spacing: float | tuple[float, ...] | None = None,
    backend: str = "auto",
) -> CalibrationResult:
    """Set a model's flag thresholds from its votes on images it handles well.

    ``min_weight`` becomes half the 0.5th percentile of the smallest stage weight of
    each estimate, ``max_weight`` twice the 99.5th percentile of the largest, and
    ``max_spread_mm`` twice the 99.5th percentile of the final vote spreads, at most the
    half-width of the smallest local crop (beyond it the estimate would not be inside
    the crop it came from; without local stages ten global cells);
    ``spread_scale_mm`` is kept. (The
    confidence itself is not thresholded: on new images it falls well below its range on
    the calibration images for estimates that are still good.) The model itself is not
    changed: apply the result with :func:`write_calibration`, or in memory with
    ``dataclasses.replace(model.config, confidence=result.spec)``.

    Args:
        model: The model to calibrate (a loaded model, a directory or a bundled name).
        images: Images that show every landmark (paths, arrays with ``spacing``,
            SimpleITK images; see :func:`fastlmk.localize`), e.g. its validation images.
        spacing: Pixel spacing in mm for image files that carry none (PNG/JPEG).
        backend: Inference backend, as for :func:`fastlmk.localize`.

    Returns:
        The new thresholds and the figures they come from.

    Raises:
        FastlmkError: no image given, no finite estimate on any of them, or more than
            5 % of the estimates with a stage vote weight below 0.25, where a seen
            landmark has about 1 (images the model does not localize well; they would
            make the flags useless).
        InvalidImageError, MissingSpacingError: as :func:`fastlmk.localize`.
    """
    if not isinstance(model, LandmarkModel):
        model = load_model(model)
    low_w, high_w, spreads = [], [], []
    n_images = 0
    for item in images:
        image = as_image(item, spacing=spacing)
        lm = localize(image, model, backend=backend)
        n_images += 1
        weights = [lm.details["global_weight"]]
        if "local_weight" in lm.details:
            weights.append(lm.details["local_weight"])
        w = np.stack(weights)  # (stages, L)
        ok = np.isfinite(lm.points_mm).all(axis=1) & np.isfinite(w).all(axis=0)
        low_w.append(w.min(axis=0)[ok])
        high_w.append(w.max(axis=0)[ok])
        # The spread that the flag tests: the local stages' where there are any.
        spread = lm.details.get("local_spread_mm", lm.details["global_spread_mm"])
        spreads.append(np.asarray(spread)[ok])
    if n_images == 0:
        raise FastlmkError("calibrate_confidence needs at least one image")
    lows, highs, spread_all = (np.concatenate(v) for v in (low_w, high_w, spreads))
    unseen = int(np.sum(lows < _UNSEEN_WEIGHT))
    if unseen > _MAX_UNSEEN_SHARE * lows.size:
        raise FastlmkError(
            f"on the {n_images} calibration images, {unseen} of {lows.size} estimates "
            f"have a stage vote weight below {_UNSEEN_WEIGHT} (a landmark the networks "
            "see gets about 1): these are not images the model localizes well, and "
            "calibrating on them would switch the flags off; calibrate on images that "
            "show every landmark, like its training images"
        )
    if lows.size == 0:
        raise FastlmkError(
            f"no landmark was found on any of the {n_images} calibration images; calibrate "
            "on images the model localizes correctly"
        )
    low = float(np.percentile(lows, _LOW_PERCENTILE))
    high = float(np.percentile(highs, _HIGH_PERCENTILE))
    spread_high = float(np.percentile(spread_all, _HIGH_PERCENTILE))
    old = model.config.confidence
    spec = replace(
        old,
        min_weight=low / _MARGIN,
        max_weight=high * _MARGIN,
        max_spread_mm=min(
            spread_limit_mm(model.config.global_stage, list(model.config.local_stages.values())),
            spread_high * _MARGIN,
        ),
    )
    return CalibrationResult(spec, n_images, int(lows.size), (low, high), spread_high)


def write_calibration(model: LandmarkModel, result: CalibrationResult) -> Path:
    """Store calibrated thresholds in the model's ``model.json`` (nothing else changes).

    Only the ``confidence`` entry and ``metadata.confidence_calibration`` are rewritten,
    so the weight files and any exported ONNX files stay valid.

    Args:
        model: A model loaded from a directory.
        result: The output of :func:`calibrate_confidence` for this model.

    Returns:
        The ``model.json`` written.

    Raises:
        ModelError: the model was not loaded from a directory, or its model.json cannot be
            read or written.
    """
    path = _update_model_json(
        model,
        "the confidence thresholds",
        {"confidence": result.spec.to_dict()},
        {"confidence_calibration": result.to_dict()},
    )
    model.config = replace(model.config, confidence=result.spec)
    return path


def _update_model_json(
    model: LandmarkModel, what: str, entries: dict[str, Any], metadata: dict[str, Any]
) -> Path:
    """Replace top-level ``entries`` and ``metadata`` keys of the model's model.json."""
    if model.path is None:
        raise ModelError("the model was not loaded from a directory; save it first")
    if Path(model.path).resolve().is_relative_to(BUNDLED_MODELS.resolve()):
        raise ModelError(
            f"{model.path} is a model bundled with fastlmk: copy its directory and "
            "calibrate the copy"
        )
    path = Path(model.path) / "model.json"
    try:
        doc = json.loads(path.read_text())
        doc.update(entries)
        doc.setdefault("metadata", {}).update(metadata)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        tmp.replace(path)
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError(f"{path}: cannot update {what} ({exc})") from exc
    return path


def calibrate_shape(
    model: LandmarkModel | str | Path,
    images: Iterable[Any],
    landmarks: LandmarkTable,
    *,
    spacing: float | tuple[float, ...] | None = None,
    rotation_deg: float | None = None,
    scale: float | None = None,
) -> ShapeSpec:
    """A model's shape model (:mod:`fastlmk.shape`) from annotated training images.

    Each image is read for its geometry only (oriented as the model orients it), and
    its annotations are taken into the grid frame the networks see. The rotation and
    scale limits widen the training range by the training augmentation: by default the
    values recorded in the model's metadata (``training.augment``), else none.

    Args:
        model: The model (a loaded model, a directory or a bundled name).
        images: Image files the model was trained on (or like them); an image's id is
            its file name up to the first dot, as in :func:`fastlmk.localize`.
        landmarks: Annotations by image id (name -> LPS mm), e.g.
            :func:`fastlmk.landmark_files.read_landmarks` or the mean of several
            annotators (:func:`fastlmk.evaluate.mean_table`).
        spacing: Pixel spacing in mm for image files that carry none (PNG/JPEG).
        rotation_deg: The training augmentation's largest rotation (degrees).
        scale: The training augmentation's largest relative scale change.

    Returns:
        The shape specification; store it with :func:`write_shape`.

    Raises:
        FastlmkError: fewer than :data:`fastlmk.shape.MIN_SHAPES` annotated images, or
            annotations that do not give a shape model (see
            :func:`fastlmk.shape.fit_shape_model`).
        InvalidImageError, MissingSpacingError: as :func:`fastlmk.localize`.
    """
    if not isinstance(model, LandmarkModel):
        model = load_model(model)
    cfg = model.config
    rotation_deg, scale = _augmentation(cfg.metadata, rotation_deg, scale)
    if isinstance(images, str | Path):  # one file, not its characters
        images = [images]
    shapes, without, seen = [], [], set()
    for item in images:
        if not isinstance(item, str | Path):
            raise FastlmkError(
                "calibrate_shape takes image files (their names give the image ids), "
                f"not {type(item).__name__}"
            )
        if not Path(item).exists():
            raise InvalidImageError(f"{item}: no such file or directory")
        image_id = Path(item).name.split(".")[0]
        if image_id in seen:
            # The same image twice would count as two training shapes that agree
            # perfectly, and make the limits too tight.
            raise FastlmkError(f"{item}: image id {image_id!r} is given more than once")
        seen.add(image_id)
        if image_id not in landmarks:
            without.append(image_id)
            continue
        image = as_image(item, spacing=spacing)
        if image.GetDimension() != cfg.dim:
            raise InvalidImageError(
                f"{item}: a {image.GetDimension()}D image; model {cfg.name!r} is {cfg.dim}D"
            )
        geometry = Geometry.from_sitk(orient(image, cfg.orientation))
        shapes.append(_annotated_shape(landmarks[image_id], cfg, image_id, geometry))
    if without:
        warnings.warn(
            f"calibrate_shape: {len(without)} image(s) without annotations skipped: "
            f"{', '.join(without[:5])}{' ...' if len(without) > 5 else ''}",
            stacklevel=2,
        )
    if len(shapes) < MIN_SHAPES:
        missing = f" (no annotation for {', '.join(without[:5])}...)" if without else ""
        raise FastlmkError(
            f"a shape model needs at least {MIN_SHAPES} annotated images; "
            f"got {len(shapes)}{missing}"
        )
    try:
        return fit_shape_model(
            shapes,
            rotation_deg=rotation_deg,
            scale=scale,
            localization_mm=float(np.mean(cfg.global_stage.spacing)),
        )
    except ValueError as exc:
        raise FastlmkError(f"no shape model for {cfg.name!r}: {exc}") from None


def _augmentation(
    metadata: dict[str, Any], rotation_deg: float | None, scale: float | None
) -> tuple[float, float]:
    """The augmentation to widen the limits by: the arguments, else the values recorded
    by training (``metadata.training.augment``), else none; checked."""
    training = metadata.get("training")
    augment = training.get("augment") if isinstance(training, dict) else None
    if not isinstance(augment, dict):
        augment = {}
    values = {
        "rotation_deg": augment.get("rotation_deg", 0.0) if rotation_deg is None else rotation_deg,
        "scale": augment.get("scale", 0.0) if scale is None else scale,
    }
    limits = {"rotation_deg": (0.0, 180.0, True), "scale": (0.0, 1.0, False)}
    out = {}
    for key, value in values.items():
        low, high, closed = limits[key]
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not (low <= number <= high if closed else low <= number < high):
            raise FastlmkError(
                f"augmentation {key} = {value!r} (argument or the model's metadata) is not "
                f"in [{low:g}, {high:g}{']' if closed else ')'}"
            )
        out[key] = number
    return out["rotation_deg"], out["scale"]


def _annotated_shape(
    table: dict[str, np.ndarray], cfg: Any, image_id: str, geometry: Geometry
) -> np.ndarray:
    """One image's annotations ``(L, D)`` in its grid frame (NaN rows: not annotated);
    refused when they are of another dimensionality or outside the image."""
    try:
        points = np.array(
            [table.get(n, np.full(cfg.dim, np.nan)) for n in cfg.landmarks], dtype=float
        )
    except ValueError:  # points of several dimensionalities
        points = np.empty(0)
    if points.shape != (len(cfg.landmarks), cfg.dim):
        raise FastlmkError(
            f"the annotations of {image_id} are not {cfg.dim}D like model {cfg.name!r}"
        )
    index = physical_to_index(points, geometry)
    outside = np.isfinite(index).all(axis=1) & ~inside_image(index, geometry.size)
    if outside.any():
        names = [n for n, o in zip(cfg.landmarks, outside, strict=True) if o]
        raise FastlmkError(
            f"{image_id}: annotated point(s) {', '.join(names)} lie outside the image; "
            "annotations must be physical LPS coordinates in mm (not pixels) of this image"
        )
    return grid_frame_mm(points, geometry)


def write_shape(model: LandmarkModel, spec: ShapeSpec) -> Path:
    """Store a shape model in the model's ``model.json`` (nothing else changes).

    Raises:
        ModelError: the model was not loaded from a directory, or its model.json cannot be
            read or written.
    """
    path = _update_model_json(model, "the shape model", {"shape": spec.to_dict()}, {})
    model.config = replace(model.config, shape=spec)
    return path
