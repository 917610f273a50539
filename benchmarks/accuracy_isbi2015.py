"""Accuracy of a cephalometric model on the ISBI 2015 benchmark; writes JSON.

    python benchmarks/accuracy_isbi2015.py --model ceph-isbi2015 --split test1 \
        --out benchmarks/results/accuracy_isbi2015_test1.json

Reports MRE +- std, median and SDR at 2 / 2.5 / 3 / 4 mm, overall and per landmark, for
the global stage alone and for global + local, against the mean of the two annotators
(the headline), the senior and the junior annotator; the inter-observer level (senior vs
junior) on the same images; and the localize time per image. Per landmark it also
reports the model's systematic offset (mean signed error and the share of the squared
error it explains) and, from the annotations alone, the senior-minus-junior mean offset
on the train split and on the evaluated split: where the annotators' habits differ
between the two, a model that learned the train split's mean sits off the evaluated
split's mean by a constant. A diagnostic (not a result: it uses the evaluated labels)
measures how much of the error those constants are: each landmark's mean offset,
estimated on one random half of the images, is removed from the other half, both ways,
over 50 random halvings. Last, the label noise of the mean of the two annotators: what a
predictor of the true point would score against it. ``--split val`` evaluates
the validation images recorded in the model's training metadata (for tuning; test1 is
for the final report only).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import fastlmk
from fastlmk.evaluate import evaluate, format_report, mean_table, result_to_json
from fastlmk.landmark_files import LandmarkTable, read_landmark_csv

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2015"


def _metadata() -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "numpy": np.__version__,
        "torch": torch.__version__,
        "fastlmk": fastlmk.__version__,
        "commit": commit,
    }


def _image_ids(data: Path, split: str, model: fastlmk.LandmarkModel) -> list[str]:
    if split == "val":
        ids = model.config.metadata.get("training", {}).get("val_images", [])
        if not ids:
            raise SystemExit("the model records no validation images; use --split test1")
        return list(ids)
    with open(data / "split.csv", newline="") as f:
        return [r["image"] for r in csv.DictReader(f) if r["split"] == split]


def _annotator_offsets(
    senior: LandmarkTable, junior: LandmarkTable, ids: list[str]
) -> dict[str, dict[str, Any]]:
    """Per landmark: mean senior-minus-junior offset (mm, x/y) and mean distance."""
    names = list(senior[ids[0]])
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        d = np.array([np.asarray(senior[i][name]) - np.asarray(junior[i][name]) for i in ids])
        out[name] = {
            "senior_minus_junior_mm": [float(v) for v in d.mean(axis=0)],
            "distance_mm": float(np.linalg.norm(d, axis=1).mean()),
        }
    return out


def _label_noise_floor(
    senior: LandmarkTable, junior: LandmarkTable, ids: list[str]
) -> dict[str, Any]:
    """Error that a predictor of the true point would show against the annotators' mean.

    If each annotator's random error is zero-mean Gaussian and independent of the
    other's, the mean label's error ``(n_s + n_j) / 2`` has the distribution of
    ``(n_s - n_j) / 2``, which the annotations show directly once each landmark's constant
    senior-minus-junior offset is taken out.
    """
    names = list(senior[ids[0]])
    radii = []
    for name in names:
        d = np.array([np.asarray(senior[i][name]) - np.asarray(junior[i][name]) for i in ids])
        radii.append(np.linalg.norm(d - d.mean(axis=0), axis=1) / 2)
    r = np.concatenate(radii)
    return {
        "note": "zero-mean, independent, Gaussian annotator errors assumed",
        "mre_mm": float(r.mean()),
        "sdr_percent": {f"{t:g}": float(100 * np.mean(r <= t)) for t in (2.0, 2.5, 3.0, 4.0)},
    }


def _offsets_removed(
    pred: LandmarkTable, ref: LandmarkTable, ids: list[str], repeats: int = 50
) -> dict[str, Any]:
    """MRE and SDR@2mm after removing per-landmark offsets fitted on the other half."""
    names = list(ref[ids[0]])
    err = np.array([[np.asarray(pred[i][n]) - np.asarray(ref[i][n]) for n in names] for i in ids])
    if not np.all(np.isfinite(err)) or len(ids) < 4:
        return {"note": "not computed: missed landmarks or fewer than 4 images"}
    rng = np.random.default_rng(0)
    mre, sdr2 = [], []
    for _ in range(repeats):
        halves = np.array_split(rng.permutation(len(ids)), 2)
        corrected = err.copy()
        for a, b in ((0, 1), (1, 0)):
            corrected[halves[a]] -= err[halves[b]].mean(axis=0)
        r = np.linalg.norm(corrected, axis=-1)
        mre.append(r.mean())
        sdr2.append(100.0 * np.mean(r <= 2.0))
    return {
        "note": "diagnostic, not a result: constant per-landmark offsets fitted on one half "
        "of these images' labels removed from the other half",
        "repeats": repeats,
        "mre_mm": float(np.mean(mre)),
        "sdr2_percent": float(np.mean(sdr2)),
        "sdr2_percent_sd": float(np.std(sdr2)),
    }


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    m = result
    return {
        "mre_mm": m["mre_mm"],
        "std_mm": m["std_mm"],
        "median_mm": m["median_mm"],
        "sdr_percent": m["sdr_percent"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="ceph-isbi2015")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--split", default="test1", help="test1 (report) or val (tuning)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--limit", type=int, default=0, help="evaluate only the first N images")
    parser.add_argument("--out", default="")
    parser.add_argument("--pred-out", default="", help="also write the predictions as CSV")
    args = parser.parse_args()

    data = Path(args.data)
    if not (data / "split.csv").is_file():
        raise SystemExit(f"ISBI 2015 data not found at {data}")
    model = fastlmk.load_model(args.model)
    ids = _image_ids(data, args.split, model)
    if args.limit:
        ids = ids[: args.limit]
    senior = read_landmark_csv(data / "landmarks_senior.csv")
    junior = read_landmark_csv(data / "landmarks_junior.csv")
    refs: dict[str, LandmarkTable] = {"mean": {}, "senior": {}, "junior": {}}
    for i in ids:
        refs["senior"][i], refs["junior"][i] = senior[i], junior[i]
    refs["mean"] = mean_table([refs["senior"], refs["junior"]])

    final: LandmarkTable = {}
    coarse: LandmarkTable = {}
    times = []
    for n, i in enumerate(ids):
        path = data / "images" / f"{i}.jpg"
        image = fastlmk.read_image(path, spacing=0.1)  # decoding is not part of the timing
        t0 = time.perf_counter()
        lm = fastlmk.localize(image, model, backend=args.backend)
        times.append(time.perf_counter() - t0)
        final[i] = dict(zip(lm.names, lm.points_mm, strict=True))
        coarse[i] = dict(zip(lm.names, lm.details["global_points_mm"], strict=True))
        if (n + 1) % 25 == 0:
            print(f"{n + 1}/{len(ids)} images", file=sys.stderr, flush=True)

    stages = {"global": evaluate(coarse, refs), "global+local": evaluate(final, refs)}
    observer = evaluate(refs["junior"], {"senior": refs["senior"]})["references"]["senior"]
    print(
        format_report(
            {
                "thresholds_mm": stages["global+local"]["thresholds_mm"],
                "references": {"mean of annotators": stages["global+local"]["references"]["mean"]},
            }
        )
    )
    for stage, res in stages.items():
        for ref, m in res["references"].items():
            sdr = m["sdr_percent"]
            print(
                f"{stage:<13s} vs {ref:<7s} MRE {m['mre_mm']:.2f} +- {m['std_mm']:.2f} mm  "
                f"SDR 2/2.5/3/4 mm: {sdr['2']:.1f} / {sdr['2.5']:.1f} / {sdr['3']:.1f} / "
                f"{sdr['4']:.1f} %"
            )
    print(
        f"inter-observer (junior vs senior): MRE {observer['mre_mm']:.2f} mm, "
        f"SDR@2mm {observer['sdr_percent']['2']:.1f} %"
    )
    with open(data / "split.csv", newline="") as f:
        train_ids = [r["image"] for r in csv.DictReader(f) if r["split"] == "train"]
    annotators = {
        "train": _annotator_offsets(senior, junior, train_ids),
        args.split: _annotator_offsets(senior, junior, ids),
    }
    per_lm = stages["global+local"]["references"]["mean"]["per_landmark"]
    print(
        f"\n{'landmark':<24s} {'MRE':>5s} {'model offset vs mean (x, y)':>29s} {'share':>6s}"
        f"  {'senior-junior: train':>21s} {args.split:>13s}"
    )
    for name, m in per_lm.items():
        sy = m["systematic"]
        off = ", ".join(f"{v:+.2f}" for v in sy["offset_mm"])
        a_tr, a_ev = (
            ", ".join(f"{v:+.2f}" for v in annotators[k][name]["senior_minus_junior_mm"])
            for k in ("train", args.split)
        )
        print(
            f"{name:<24s} {m['mre_mm']:5.2f} {off:>20s} ({sy['offset_norm_mm']:.2f}) "
            f"{100 * sy['offset_share']:5.1f}%  {a_tr:>21s} {a_ev:>13s}"
        )
    floor = _label_noise_floor(senior, junior, ids)
    print(
        f"label noise of the mean of annotators: a predictor of the true point would score "
        f"MRE {floor['mre_mm']:.2f} mm, SDR@2mm {floor['sdr_percent']['2']:.1f} %"
    )
    diagnostic = _offsets_removed(final, refs["mean"], ids)
    if "mre_mm" in diagnostic:
        print(
            f"diagnostic (uses these labels): without per-landmark constant offsets fitted on "
            f"the other half, MRE {diagnostic['mre_mm']:.2f} mm, SDR@2mm "
            f"{diagnostic['sdr2_percent']:.1f} %"
        )
    t = np.array(times) * 1000
    print(
        f"localize: median {np.median(t):.0f} ms, p90 {np.percentile(t, 90):.0f} ms per image "
        f"({args.backend} backend, decoded image to landmarks in mm)"
    )

    result = {
        "split": args.split,
        "images": ids,
        "model": str(model.path),
        "backend": args.backend,
        "summary": {
            stage: {ref: _summary(m) for ref, m in res["references"].items()}
            for stage, res in stages.items()
        },
        "stages": stages,
        "inter_observer_junior_vs_senior": observer,
        "annotator_offsets": annotators,
        "label_noise_floor": floor,
        "diagnostic_offsets_removed": diagnostic,
        "localize_ms": {
            "median": float(np.median(t)),
            "p90": float(np.percentile(t, 90)),
            "mean": float(t.mean()),
        },
        "meta": _metadata(),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(result_to_json(result) + "\n")
    if args.pred_out:
        from fastlmk.landmark_files import write_landmark_csv

        write_landmark_csv(args.pred_out, final)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
