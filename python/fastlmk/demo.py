"""``make demo``: train a small model on generated 3D phantoms and localize held-out ones."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .inference import errors_mm, localize
from .landmark_files import read_landmark_csv
from .model import load_model
from .phantoms import phantom_training_config, write_phantom_dataset
from .train import train

__all__ = ["main"]


def main(out_dir: str | Path = "demo_out") -> int:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        data = write_phantom_dataset(
            Path(tmp) / "phantoms", dim=3, n_train=40, n_val=4, n_test=6, seed=1
        )
        print(
            f"generated 50 3D phantoms in {time.perf_counter() - t0:.1f} s; training a small "
            "model (global + local networks) ...",
            flush=True,
        )
        model_dir = train(
            phantom_training_config(data, 3, iterations=250, output=out / "model"),
            log=lambda m: None,
        )
        model = load_model(model_dir)
        truth = read_landmark_csv(data / "landmarks.csv")
        test_ids = [f"phantom{i:03d}" for i in range(44, 50)]
        all_err = []
        print(
            f"\n{'image':<12s} {'landmark':<14s} {'predicted (mm)':>28s} {'true (mm)':>28s} "
            f"{'error':>7s} conf"
        )
        for image_id in test_ids:
            t1 = time.perf_counter()
            lm = localize(data / "images" / f"{image_id}.mha", model)
            ms = 1000 * (time.perf_counter() - t1)
            err = errors_mm(lm, truth[image_id])
            all_err.append(err)
            for name, p, e, c in zip(lm.names, lm.points_mm, err, lm.confidence, strict=True):
                t = truth[image_id][name]
                print(
                    f"{image_id:<12s} {name:<14s} {_fmt(p):>28s} {_fmt(t):>28s} {e:6.2f}  {c:.2f}"
                )
            lm.to_slicer(out / f"{image_id}.mrk.json")
            print(f"{'':<12s} ({ms:.0f} ms)")
        e = np.concatenate(all_err)
        print(
            f"\nmean error {np.mean(e):.2f} mm, median {np.median(e):.2f} mm over {e.size} "
            f"landmarks (voxel size 1.6 x 1.6 x 1.8 mm); model and .mrk.json files in {out}/"
        )
    return 0


def _fmt(p: np.ndarray) -> str:
    return "(" + ", ".join(f"{v:7.2f}" for v in p) + ")"


if __name__ == "__main__":
    sys.exit(main())
