"""Accuracy metrics: radial errors, MRE, SDR, per landmark, against one or more references."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EvaluationError
from .landmark_files import LandmarkTable

__all__ = [
    "DEFAULT_THRESHOLDS_MM",
    "evaluate",
    "format_report",
    "mean_table",
    "radial_errors",
    "reference_names",
    "result_to_json",
    "systematic_offset",
]

DEFAULT_THRESHOLDS_MM = (2.0, 2.5, 3.0, 4.0)


def mean_table(tables: Sequence[LandmarkTable]) -> LandmarkTable:
    """Point-wise mean of several annotators.

    Every image and landmark that any table has is kept (in first-appearance order);
    each point is the mean of the tables that have it, so an annotator who skipped a
    point or an image does not remove it.

    Raises:
        EvaluationError: the tables hold points of different dimensionality.
    """
    out: LandmarkTable = {}
    for image_id in dict.fromkeys(i for t in tables for i in t):
        names = dict.fromkeys(n for t in tables for n in t.get(image_id, {}))
        out[image_id] = {}
        for name in names:
            pts = [np.asarray(t[image_id][name]) for t in tables if name in t.get(image_id, {})]
            if len({p.shape for p in pts}) > 1:
                raise EvaluationError(
                    f"image {image_id!r}, landmark {name!r}: the annotations have points of "
                    f"different dimensionality ({sorted({p.size for p in pts})}D); expected "
                    "all 2D or all 3D. Use annotation files of one kind."
                )
            out[image_id][name] = np.mean(pts, axis=0)
    return out


def _few(ids: Iterable[str], k: int = 5) -> str:
    """The first ``k`` ids, quoted, for an error message."""
    ids = list(ids)
    if not ids:
        return "none"
    shown = ", ".join(repr(i) for i in ids[:k])
    return shown + (f" and {len(ids) - k} more" if len(ids) > k else "")


def _check_dims(image_id: str, name: str, p: Any, truth: Any) -> None:
    """Raise a clear error where a prediction and its reference point differ in D.

    Without it numpy fails deep inside the subtraction with a broadcasting message
    that names neither the image nor the landmark.
    """
    if np.shape(p) != np.shape(truth):
        raise EvaluationError(
            f"image {image_id!r}, landmark {name!r}: the prediction is {np.size(p)}D and "
            f"the reference {np.size(truth)}D; expected points of the same dimensionality "
            "((x, y) or (x, y, z)) in both. Compare 2D predictions with a 2D reference "
            "(3D Slicer .mrk.json and .fcsv files always hold 3D points: use a CSV or "
            "fastlmk JSON reference for 2D images)."
        )


def radial_errors(pred: LandmarkTable, ref: LandmarkTable) -> dict[str, dict[str, float]]:
    """Euclidean distance (mm) per image and landmark for every reference point.

    A reference point without a finite prediction gets ``inf`` (a missed landmark).
    Images of ``ref`` absent from ``pred`` are left out.

    Raises:
        EvaluationError: a prediction and its reference point differ in dimensionality.
    """
    errors: dict[str, dict[str, float]] = {}
    for image_id, points in ref.items():
        if image_id not in pred:
            continue
        errors[image_id] = {}
        for name, truth in points.items():
            p = pred[image_id].get(name)
            if p is not None:
                _check_dims(image_id, name, p, truth)
            ok = p is not None and np.all(np.isfinite(p))
            errors[image_id][name] = float(np.linalg.norm(np.asarray(p) - truth)) if ok else np.inf
    return errors


def systematic_offset(pred: LandmarkTable, ref: LandmarkTable, name: str) -> dict[str, Any]:
    """Mean signed offset of one landmark's predictions from the reference.

    A model that is right on average scatters around the reference (offset near zero);
    a consistent offset means the model places the point where another convention
    would (for example the training annotators' habit), which no amount of averaging
    removes.

    Args:
        pred: Predicted landmarks (image id -> name -> mm, in the tables' coordinate
            system, e.g. LPS for images read by fastlmk).
        ref: Reference landmarks, same layout.
        name: The landmark.

    Returns:
        ``offset_mm``: mean of ``pred - ref`` per axis (same axis order as the points),
        over the images where both are finite; ``offset_norm_mm``: its length;
        ``offset_share``: ``|offset|^2 / mean(|pred - ref|^2)``, the fraction of the
        mean squared error that the constant offset explains (0 to 1); ``n``: images
        used. NaN entries when no image has both points.

    Raises:
        EvaluationError: a prediction and its reference point differ in dimensionality.
    """
    diffs = []
    for image_id, points in ref.items():
        p = pred.get(image_id, {}).get(name)
        if name not in points or p is None:
            continue
        _check_dims(image_id, name, p, points[name])
        d = np.asarray(p, dtype=np.float64) - np.asarray(points[name], dtype=np.float64)
        if np.all(np.isfinite(d)):
            diffs.append(d)
    if not diffs:
        nan = float("nan")
        return {"offset_mm": [], "offset_norm_mm": nan, "offset_share": nan, "n": 0}
    d = np.stack(diffs)
    mean = d.mean(axis=0)
    mse = float((d**2).sum(axis=1).mean())
    return {
        "offset_mm": [float(v) for v in mean],
        "offset_norm_mm": float(np.linalg.norm(mean)),
        "offset_share": float((mean**2).sum() / mse) if mse > 0 else 0.0,
        "n": int(d.shape[0]),
    }


def _summary(e: np.ndarray, thresholds: Sequence[float]) -> dict[str, Any]:
    finite = e[np.isfinite(e)]
    return {
        "n": int(e.size),
        "missed": int(e.size - finite.size),
        "mre_mm": float(finite.mean()) if finite.size else float("nan"),
        "median_mm": float(np.median(finite)) if finite.size else float("nan"),
        "std_mm": float(finite.std()) if finite.size else float("nan"),
        "max_mm": float(finite.max()) if finite.size else float("nan"),
        "sdr_percent": {
            f"{t:g}": float(100.0 * np.mean(e <= t)) if e.size else float("nan") for t in thresholds
        },
    }


def _unmatched_landmarks(pred: LandmarkTable, ref: LandmarkTable) -> dict[str, list[str]]:
    """Landmark names of the shared images that only one side has.

    A prediction whose name the reference lacks (``Sella`` for ``sella``, an extra
    point) is otherwise invisible: it is never compared, and the reference point it
    was meant for only shows as missed.
    """
    shared = [i for i in ref if i in pred]
    in_pred = dict.fromkeys(n for i in shared for n in pred[i])
    in_ref = dict.fromkeys(n for i in shared for n in ref[i])
    return {
        "only_in_predictions": [n for n in in_pred if n not in in_ref],
        "only_in_reference": [n for n in in_ref if n not in in_pred],
    }


def _metrics(
    pred: LandmarkTable, ref: LandmarkTable, thresholds: Sequence[float], ref_name: str
) -> dict[str, Any]:
    errs = radial_errors(pred, ref)
    if not errs:
        raise EvaluationError(
            f"no image id is in both the predictions ({len(pred)} images: {_few(pred)}) "
            f"and reference {ref_name!r} ({len(ref)} images: {_few(ref)}); expected the "
            "same ids on both sides (the 'image' column of a CSV file; a single-image "
            ".json, .mrk.json or .fcsv file is keyed by the id stored in it, else by its "
            "file name). Rename the ids so that they match."
        )
    names: list[str] = []
    for pts in errs.values():
        names += [n for n in pts if n not in names]
    allv = np.array([v for pts in errs.values() for v in pts.values()])
    out = _summary(allv, thresholds)
    out["images"] = len(errs)
    out["per_landmark"] = {
        n: _summary(np.array([pts[n] for pts in errs.values() if n in pts]), thresholds)
        | {"systematic": systematic_offset(pred, ref, n)}
        for n in names
    }
    out["per_image"] = {i: float(np.mean(list(p.values()))) for i, p in errs.items()}
    out["unmatched_landmarks"] = _unmatched_landmarks(pred, ref)
    return out


def _pair_single_image(
    pred: LandmarkTable, ref: LandmarkTable
) -> tuple[LandmarkTable, dict[str, str]]:
    """Key a one-image reference by the id of one-image predictions.

    A single-image reference file (.fcsv, .mrk.json) is keyed by its file name, and
    predictions by their image's name, so the ids of one annotation file and the one
    image it annotates rarely agree; with one image on each side, there is no doubt
    which belong together.
    """
    if len(pred) == 1 and len(ref) == 1:
        (pred_id,), (ref_id,) = pred, ref
        if pred_id != ref_id:
            return {pred_id: ref[ref_id]}, {ref_id: pred_id}
    return ref, {}


def evaluate(
    pred: LandmarkTable,
    references: Mapping[str, LandmarkTable],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS_MM,
    *,
    pair_single_image: bool = False,
) -> dict[str, Any]:
    """Compare predictions with one or more references.

    Args:
        pred: Predicted landmarks (image id -> name -> LPS mm).
        references: Reference name -> landmarks. With two or more, the point-wise mean
            of all references is evaluated too, under ``"mean"``.
        thresholds: SDR radii in mm.
        pair_single_image: Where ``pred`` and a reference hold one image each, under
            different ids, evaluate them as the same image (recorded in
            ``paired_images``). Meant for single-image files keyed by their file name
            (.fcsv, .mrk.json), whose ids say nothing about the image; by default the
            ids must match.

    Returns:
        ``{"thresholds_mm": [...], "references": {name: metrics}}`` where metrics hold
        ``n`` (reference points), ``missed`` (reference points without a finite
        prediction, error ``inf``), ``mre_mm``, ``median_mm``, ``std_mm``, ``max_mm``
        (over the finite errors; NaN when there is none), ``sdr_percent`` (per
        threshold), ``images``, ``per_landmark`` (the same per landmark, plus
        ``systematic``: :func:`systematic_offset`), ``per_image`` (mean error of each
        image; ``inf`` when it has a missed landmark), ``unmatched_landmarks``
        (``only_in_predictions`` / ``only_in_reference``: names of the evaluated
        images that only one side has; such predictions are not compared) and
        ``paired_images`` (reference id -> prediction id, see ``pair_single_image``).
        Use :func:`result_to_json` to write it as strict JSON.

    Raises:
        EvaluationError: no reference, no image id shared by the predictions and a
            reference, or a prediction and its reference point differ in
            dimensionality (2D against 3D).
    """
    if not references:
        raise EvaluationError(
            "no reference to evaluate against; expected at least one reference table "
            "(name -> image id -> landmark -> point). Pass one, e.g. "
            "evaluate(pred, {'annotator': table})."
        )
    tables: dict[str, LandmarkTable] = {}
    pairs: dict[str, dict[str, str]] = {}
    for name, ref in references.items():
        if pair_single_image:
            tables[name], pairs[name] = _pair_single_image(pred, ref)
        else:
            tables[name], pairs[name] = ref, {}
    out = {
        name: _metrics(pred, ref, thresholds, name) | {"paired_images": pairs[name]}
        for name, ref in tables.items()
    }
    if len(tables) > 1:
        mean = mean_table(list(tables.values()))
        out["mean"] = _metrics(pred, mean, thresholds, "mean") | {"paired_images": {}}
    return {"thresholds_mm": list(thresholds), "references": out}


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON ``null``)."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def result_to_json(result: Mapping[str, Any], indent: int | None = 1) -> str:
    """:func:`evaluate`'s result as strict JSON text.

    The result keeps ``inf`` (a missed landmark) and NaN (a statistic of no finite
    error) in memory, but JSON has no such numbers (``json.dumps`` would write
    ``Infinity``/``NaN``, which strict parsers reject), so they are written as
    ``null``: for example ``per_image`` of an image with a missed landmark, or
    ``mre_mm``/``std_mm``/``max_mm`` of a landmark that was missed in every image.

    Args:
        result: The dictionary returned by :func:`evaluate`.
        indent: As for :func:`json.dumps`.

    Returns:
        JSON text; ``null`` wherever the result holds a non-finite number.
    """
    return json.dumps(_json_safe(result), indent=indent, allow_nan=False)


def _file_stem(path: Path) -> str:
    """The file name without its landmark extension (``a.mrk.json`` -> ``a``)."""
    if path.name.lower().endswith(".mrk.json"):
        return path.name[: -len(".mrk.json")]
    return path.stem


def reference_names(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Distinct names for reference files, to key :func:`evaluate`'s ``references``.

    A name is the file name without its extension (``senior.csv`` -> ``"senior"``,
    ``rater01.mrk.json`` -> ``"rater01"``). Where two files would share a name, and for
    ``"mean"`` when there are several files (:func:`evaluate` reports the references'
    mean under that key), the parent folder is put in front (``r1/ref``, ``r2/ref``),
    and a suffix `` (2)``, `` (3)`` ... where that is still not unique (the same file
    given twice): a reference never replaces another.

    Args:
        paths: Reference files, in order.

    Returns:
        One name per path, in the same order, all different.
    """
    files = [Path(p) for p in paths]
    stems = [_file_stem(f) for f in files]
    counts = Counter(stems)
    reserved = {"mean"} if len(files) > 1 else set()
    names: list[str] = []
    for f, stem in zip(files, stems, strict=True):
        name = stem
        if counts[stem] > 1 or stem in reserved:
            # abspath, not resolve: the folder the user named, with ".." folded away
            parent = Path(os.path.abspath(f)).parent.name
            name = f"{parent}/{stem}" if parent else stem
        base, k = name, 2
        while name in names or name in reserved:
            name = f"{base} ({k})"
            k += 1
        names.append(name)
    return names


def format_report(result: dict[str, Any]) -> str:
    """Plain-text tables of :func:`evaluate`'s result."""
    lines: list[str] = []
    ths = [f"{t:g}" for t in result["thresholds_mm"]]
    head = f"{'':<28s} {'MRE':>7s} {'median':>7s} {'std':>7s} " + " ".join(
        f"{'SDR' + t:>8s}" for t in ths
    )
    for ref, m in result["references"].items():
        lines.append(
            f"reference: {ref}  ({m['images']} images, {m['n']} points, {m['missed']} missed)"
        )
        lines.append(head)
        rows = [*m["per_landmark"].items(), ("ALL", m)]
        for name, s in rows:
            lines.append(
                f"{name:<28s} {s['mre_mm']:7.2f} {s['median_mm']:7.2f} {s['std_mm']:7.2f} "
                + " ".join(f"{s['sdr_percent'][t]:7.1f}%" for t in ths)
            )
        lines.append("")
    return "\n".join(lines)
