"""Accuracy and speed of an AFIDs model on the MNI152 templates and held-out deformations.

    python benchmarks/accuracy_afids.py --model afids-mni152 \
        --synthetic runs/afids-data --out runs/afids_accuracy.json

Evaluates (a) the T2w template (a contrast never seen in training), (b) the held-out
``test`` deformations of the T1w template in ``--synthetic`` (fiducials moved by the
same deformation; also without realignment, ``align=False``), (c) the undeformed T1w
template; prints per-fiducial errors beside
the four raters' errors against the consensus (the human level) and writes JSON with
machine, versions and commit. Localize time: median of repeated runs on the T1w template
(in-memory image; the read is timed separately).
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

import fastlmk
from fastlmk.afids import find_afids_data, read_consensus, read_rater
from fastlmk.evaluate import result_to_json
from fastlmk.inference import errors_mm
from fastlmk.landmark_files import read_landmark_csv


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def _metadata() -> dict[str, Any]:
    return {
        "commit": _commit(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "fastlmk": fastlmk.__version__,
            "torch": torch.__version__,
            "SimpleITK": sitk.Version.VersionString(),
            "numpy": np.__version__,
        },
    }


def _summary(errors: np.ndarray) -> dict[str, float]:
    e = errors[np.isfinite(errors)]
    return {
        "mean_mm": float(np.mean(e)),
        "median_mm": float(np.median(e)),
        "std_mm": float(np.std(e)),
        "max_mm": float(np.max(e)),
        "sdr_2mm": float(np.mean(e <= 2.0)),
        "sdr_4mm": float(np.mean(e <= 4.0)),
        "n": int(e.size),
    }


def _test_split(synthetic: Path) -> list[str]:
    with open(synthetic / "split.csv", newline="") as f:
        return [r["image"] for r in csv.DictReader(f) if r["split"] == "test"]


def _time_localize(image: sitk.Image, model: Any, repeats: int) -> list[float]:
    fastlmk.localize(image, model)  # warm-up: first-call allocations and backend set-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fastlmk.localize(image, model)
        times.append(time.perf_counter() - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="afids-mni152", help="model directory or name")
    parser.add_argument("--data", default=None, help="AFIDs data directory (default: search)")
    parser.add_argument("--synthetic", default=None, help="data set with a 'test' split")
    parser.add_argument("--repeats", type=int, default=5, help="timed localize runs")
    parser.add_argument("--out", default=None, help="JSON output file")
    args = parser.parse_args(argv)

    data = find_afids_data(args.data)
    names, consensus = read_consensus(data)
    truth = dict(zip(names, consensus, strict=True))
    model = fastlmk.load_model(args.model)
    if list(model.names) != names:
        raise SystemExit("the model's landmarks are not the 32 AFIDs in consensus order")

    per: dict[str, np.ndarray] = {}
    for rater in data.raters:
        per[rater.stem] = np.linalg.norm(read_rater(rater) - consensus, axis=1)
    t1w = fastlmk.read_image(data.t1w)
    t2w = fastlmk.read_image(data.t2w)
    per["T1w"] = errors_mm(fastlmk.localize(t1w, model), truth)
    per["T2w"] = errors_mm(fastlmk.localize(t2w, model), truth)

    deformed: list[np.ndarray] = []
    unaligned: list[np.ndarray] = []  # the same without realignment (fastlmk.align)
    realigned_deg: list[float] = []
    if args.synthetic:
        synthetic = Path(args.synthetic)
        table = read_landmark_csv(synthetic / "landmarks.csv")
        for image_id in _test_split(synthetic):
            image = fastlmk.read_image(synthetic / "images" / f"{image_id}.nii.gz")
            lm = fastlmk.localize(image, model)
            deformed.append(errors_mm(lm, table[image_id]))
            unaligned.append(
                errors_mm(fastlmk.localize(image, model, align=False), table[image_id])
            )
            if "alignment" in lm.details:
                realigned_deg.append(round(float(lm.details["alignment"]["rotation_deg"]), 1))
        if deformed:
            per["deformed"] = np.nanmean(np.stack(deformed), axis=0)
            per["no_realign"] = np.nanmean(np.stack(unaligned), axis=0)

    times = _time_localize(t1w, model, args.repeats)
    t0 = time.perf_counter()
    fastlmk.read_image(data.t1w)
    read_s = time.perf_counter() - t0

    columns = list(per)
    print(f"{'fiducial':<34s}" + "".join(f"{c:>10s}" for c in columns))
    for i, name in enumerate(names):
        print(f"{name[:33]:<34s}" + "".join(f"{per[c][i]:10.2f}" for c in columns))
    print(f"{'mean':<34s}" + "".join(f"{np.nanmean(per[c]):10.2f}" for c in columns))
    raters = [c for c in columns if c.startswith("rater")]
    if raters:
        human = np.concatenate([per[c] for c in raters])
        print(f"raters vs consensus: mean {np.mean(human):.2f} mm over {human.size} placements")
    if deformed:
        all_def = np.concatenate(deformed)
        print(
            f"held-out deformations: mean {np.nanmean(all_def):.2f} mm over {len(deformed)} "
            f"volumes x {len(names)} fiducials ({len(realigned_deg)} realigned, by "
            f"{realigned_deg} deg; without realignment "
            f"{np.nanmean(np.concatenate(unaligned)):.2f} mm)"
        )
    med = statistics.median(times)
    print(
        f"localize (1 mm template, {t1w.GetSize()}): median {med:.3f} s "
        f"(min {min(times):.3f}, max {max(times):.3f}, {len(times)} runs); read {read_s:.3f} s"
    )

    result: dict[str, Any] = {
        "benchmark": "accuracy_afids",
        "model": str(model.path),
        "data": data.source,
        "synthetic": args.synthetic,
        **_metadata(),
        "fiducials": names,
        "per_fiducial_mm": {c: [float(v) for v in per[c]] for c in columns},
        "summary": {c: _summary(per[c]) for c in columns if c not in ("deformed", "no_realign")},
        "localize_seconds": {"median": med, "min": min(times), "max": max(times), "runs": times},
        "read_seconds": read_s,
    }
    if raters:
        result["summary"]["raters_all"] = _summary(np.concatenate([per[c] for c in raters]))
    if deformed:
        result["summary"]["deformed"] = _summary(np.concatenate(deformed))
        result["summary"]["deformed_without_realignment"] = _summary(np.concatenate(unaligned))
        result["deformed_images"] = len(deformed)
        result["deformed_realigned_deg"] = realigned_deg
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(result_to_json(result) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
