"""Accuracy metrics: radial errors, MRE, SDR, per landmark, against one or more references."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .landmark_files import LandmarkTable

__all__ = [
    "DEFAULT_THRESHOLDS_MM",
    "evaluate",
    "format_report",
    "mean_table",
    "radial_errors",
    "systematic_offset",
]

DEFAULT_THRESHOLDS_MM = (2.0, 2.5, 3.0, 4.0)


def mean_table(tables: Sequence[LandmarkTable]) -> LandmarkTable:
    """Point-wise mean of several annotators (points absent from a table are skipped)."""
    out: LandmarkTable = {}
    for image_id in tables[0]:
        out[image_id] = {}
        for name in tables[0][image_id]:
            pts = [t[image_id][name] for t in tables if name in t.get(image_id, {})]
            out[image_id][name] = np.mean(pts, axis=0)
    return out


def radial_errors(pred: LandmarkTable, ref: LandmarkTable) -> dict[str, dict[str, float]]:
    """Euclidean distance (mm) per image and landmark for every reference point.

    A reference point without a finite prediction gets ``inf`` (a missed landmark).
    """
    errors: dict[str, dict[str, float]] = {}
    for image_id, points in ref.items():
        if image_id not in pred:
            continue
        errors[image_id] = {}
        for name, truth in points.items():
            p = pred[image_id].get(name)
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
    """
    diffs = []
    for image_id, points in ref.items():
        p = pred.get(image_id, {}).get(name)
        if name not in points or p is None:
            continue
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


def _metrics(
    pred: LandmarkTable, ref: LandmarkTable, thresholds: Sequence[float]
) -> dict[str, Any]:
    errs = radial_errors(pred, ref)
    if not errs:
        raise ValueError(
            "no image is in both the predictions and the reference; check the "
            "image ids (the 'image' column)"
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
    return out


def evaluate(
    pred: LandmarkTable,
    references: Mapping[str, LandmarkTable],
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS_MM,
) -> dict[str, Any]:
    """Compare predictions with one or more references.

    Args:
        pred: Predicted landmarks (image id -> name -> LPS mm).
        references: Reference name -> landmarks. With two or more, the point-wise mean
            of all references is evaluated too, under ``"mean"``.
        thresholds: SDR radii in mm.

    Returns:
        ``{"references": {name: metrics}}`` where metrics hold ``mre_mm``, ``median_mm``,
        ``std_mm``, ``sdr_percent`` (per threshold), ``per_landmark`` (the same per landmark,
        plus ``systematic``: :func:`systematic_offset`) and ``per_image``.
    """
    if not references:
        raise ValueError("evaluate needs at least one reference")
    out = {name: _metrics(pred, ref, thresholds) for name, ref in references.items()}
    if len(references) > 1:
        out["mean"] = _metrics(pred, mean_table(list(references.values())), thresholds)
    return {"thresholds_mm": list(thresholds), "references": out}


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
