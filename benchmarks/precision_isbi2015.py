"""Accuracy and speed of each numeric precision on the ISBI 2015 validation split; JSON.

Variants, all in one run on the same images (the validation images recorded in the
model's training metadata; never test1). The bundled model is trained on every training
image, so run this on the model of the same recipe that held the validation images out:

    fastlmk train --config configs/isbi2015.toml
    fastlmk train --config configs/isbi2015-local-b.toml
    fastlmk ensemble runs/ceph-isbi2015 runs/ceph-isbi2015-local-b --out runs/ceph-isbi2015-ensemble
    python benchmarks/precision_isbi2015.py --model runs/ceph-isbi2015-ensemble \
        --out benchmarks/results/precision_isbi2015_val.json

* ``torch-fp32``: the torch backend (the reference of the deltas).
* ``torch-bf16``: the same networks under CPU bfloat16 autocast.
* ``onnxruntime-fp32``: the float32 ONNX networks.
* ``onnxruntime-int8-global``: int8 global network, float32 local networks.
* ``onnxruntime-int8-all``: both networks in int8.

The int8 networks are calibrated here, on training images that are not validation
images (``--calibration`` of them, the first in file order), into a temporary copy of
the model; the shipped ones come from the same command (``fastlmk export --int8``).
Reported per variant: MRE and SDR@2mm against the mean of the two annotators, the
change of MRE from torch-fp32, the median time of the network calls (global + local)
and of ``localize`` end to end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import fastlmk
from fastlmk.backends import get_backend
from fastlmk.evaluate import mean_table
from fastlmk.inference import _localize
from fastlmk.landmark_files import read_landmark_csv
from fastlmk.quantize import quantize_int8

sys.path.insert(0, str(Path(__file__).parent))
from accuracy_isbi2015 import DEFAULT_DATA, _metadata


class Bf16Torch:
    """The torch CPU backend with bfloat16 autocast around each network call."""

    name, device = "torch-bf16", torch.device("cpu")

    def __init__(self, model: fastlmk.LandmarkModel) -> None:
        self.inner = get_backend(model, "torch")

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def run_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            logits, disp = self.inner.run_global(x)
        return logits.float(), disp.float()

    def run_local(self, x: torch.Tensor, stage: str = "local") -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            logits, disp = self.inner.run_local(x, stage)
        return logits.float(), disp.float()


def run_variant(model: fastlmk.LandmarkModel, backend: Any, images: dict[str, Any],
                truth: dict[str, dict[str, np.ndarray]], repeats: int) -> dict[str, Any]:
    errors, net_ms, total_ms = [], [], []
    for image_id, image in images.items():
        _localize(image, model, backend=backend)  # warm-up
        for _ in range(repeats):
            steps: dict[str, float] = {}
            last = start = time.perf_counter()

            def mark(step: str, steps: dict[str, float] = steps) -> None:
                nonlocal last
                now = time.perf_counter()
                steps[step] = now - last
                last = now

            lm = _localize(image, model, backend=backend, mark=mark)
            total_ms.append(1e3 * (time.perf_counter() - start))
            net_ms.append(1e3 * (steps.get("global", 0.0) + steps.get("local", 0.0)))
        errors.append([np.linalg.norm(lm[n] - truth[image_id][n]) for n in lm.names])
    e = np.array(errors)
    return {
        "mre_mm": float(e.mean()),
        "sdr2_percent": float((e <= 2.0).mean() * 100),
        "networks_median_ms": float(np.median(net_ms)),
        "localize_median_ms": float(np.median(total_ms)),
        "per_landmark_mre_mm": dict(zip(lm.names, e.mean(axis=0).round(4).tolist(),
                                        strict=True)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--calibration", type=int, default=20,
                        help="training images used to calibrate int8 (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per image")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    data = Path(args.data)
    if not (data / "split.csv").is_file():
        raise SystemExit(f"ISBI 2015 data not found at {data}")
    model = fastlmk.load_model(args.model)
    training = model.config.metadata.get("training", {})
    val_ids = list(training.get("val_images", []))
    cal_ids = [i for i in training.get("train_images", []) if i not in val_ids]
    cal_ids = cal_ids[: args.calibration]
    if not val_ids or not cal_ids:
        raise SystemExit(
            f"model {args.model} records no validation images (the bundled model is trained "
            "on all 150 training images): pass --model a model trained with a validation "
            "split, e.g. the ensemble of configs/isbi2015.toml + configs/isbi2015-local-b.toml")
    senior = read_landmark_csv(data / "landmarks_senior.csv")
    junior = read_landmark_csv(data / "landmarks_junior.csv")
    truth = mean_table([{i: senior[i] for i in val_ids}, {i: junior[i] for i in val_ids}])
    images = {i: fastlmk.read_image(data / "images" / f"{i}.jpg", spacing=0.1)
              for i in val_ids}

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "model"
        shutil.copytree(Path(str(model.path)), work,
                        ignore=shutil.ignore_patterns("*.int8.onnx"))
        copy = fastlmk.load_model(work)
        calib = [data / "images" / f"{i}.jpg" for i in cal_ids]
        quantize_int8(copy, calib, spacing=0.1)
        int8_all = fastlmk.load_model(work)
        variants: dict[str, tuple[fastlmk.LandmarkModel, Any]] = {
            "torch-fp32": (model, "torch"),
            "torch-bf16": (model, Bf16Torch(model)),
            "onnxruntime-fp32": (int8_all, "onnxruntime-fp32"),
            "onnxruntime-int8-all": (int8_all, "onnxruntime-int8"),
        }
        for name, (m, backend) in variants.items():
            print(f"{name} ...", file=sys.stderr, flush=True)
            results[name] = run_variant(m, backend, images, truth, args.repeats)
        for local_int8 in work.glob("local*.int8.onnx"):  # local, local2, ...
            local_int8.unlink()
        int8_global = fastlmk.load_model(work)
        print("onnxruntime-int8-global ...", file=sys.stderr, flush=True)
        results["onnxruntime-int8-global"] = run_variant(
            int8_global, "onnxruntime-int8", images, truth, args.repeats)

    ref = results["torch-fp32"]["mre_mm"]
    print(f"\n{'variant':26s} {'MRE mm':>8s} {'delta':>8s} {'SDR2 %':>7s} "
          f"{'nets ms':>8s} {'localize ms':>12s}")
    for name, r in results.items():
        r["delta_mre_mm_vs_torch_fp32"] = r["mre_mm"] - ref
        print(f"{name:26s} {r['mre_mm']:8.4f} {r['mre_mm'] - ref:+8.4f} "
              f"{r['sdr2_percent']:7.1f} {r['networks_median_ms']:8.1f} "
              f"{r['localize_median_ms']:12.1f}")
    report = {"model": str(model.path), "split": "val", "images": val_ids,
              "calibration_images": cal_ids, "variants": results, "meta": _metadata()}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
