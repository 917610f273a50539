"""``make demo``: the 32 AFIDs in the MNI152 brain template, with the bundled model.

Localizes the anatomical fiducials in the T1w template and in the T2w template (a
contrast the model never saw in training), prints each fiducial's error against the
AFIDs consensus beside the human raters' errors (when the rater files are present) and
writes ``demo_out/``: a 3D Slicer ``.mrk.json`` (LPS) and a PNG of three orthogonal
slices through each fiducial, per template, plus the consensus as ``.mrk.json``.

The template comes from ``../shared/data/afids-mni152`` or the ``autoafids`` wheel
(``pip install --no-deps autoafids==0.1.4``; ``make demo`` does that when needed).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from .afids import find_afids_data, read_consensus, read_rater
from .inference import localize
from .io import read_image
from .landmark_files import write_slicer_markups
from .model import load_model
from .overlay import write_overlay

__all__ = ["main"]

MODEL = "afids-mni152"


def main(out_dir: str | Path = "demo_out") -> int:
    """Run the demo; returns the process exit status."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = find_afids_data()
    model = load_model(MODEL)
    names, consensus = read_consensus(data)
    print(f"template and consensus from {data.source}; model {MODEL!r}", flush=True)
    write_slicer_markups(out / "consensus.mrk.json", names, consensus)

    errors: dict[str, np.ndarray] = {}
    confidence: dict[str, np.ndarray] = {}
    for label, path in (("T1w", data.t1w), ("T2w", data.t2w)):
        image = read_image(path)
        t0 = time.perf_counter()
        lm = localize(image, model)
        seconds = time.perf_counter() - t0
        errors[label] = np.linalg.norm(lm.points_mm - consensus, axis=1)
        confidence[label] = lm.confidence
        lm.to_slicer(out / f"{label}.mrk.json")
        write_overlay(image, lm, out / f"{label}.png")
        print(f"{label}: localized {len(names)} fiducials in {seconds:.2f} s", flush=True)

    human = [np.linalg.norm(read_rater(r) - consensus, axis=1) for r in data.raters]
    rater_col = f"{'raters':>8s}" if human else ""
    print(
        f"\nerror vs consensus (mm)\n{'fiducial':<36s}{'T1w':>8s}{'T2w':>8s}{rater_col}"
        f"{'conf T1w':>10s}"
    )
    rater_mean = np.mean(human, axis=0) if human else None
    for i, name in enumerate(names):
        row = f"{name[:35]:<36s}{errors['T1w'][i]:8.2f}{errors['T2w'][i]:8.2f}"
        if rater_mean is not None:
            row += f"{rater_mean[i]:8.2f}"
        print(row + f"{confidence['T1w'][i]:10.2f}")
    mean_row = f"{'mean':<36s}{errors['T1w'].mean():8.2f}{errors['T2w'].mean():8.2f}"
    if rater_mean is not None:
        mean_row += f"{rater_mean.mean():8.2f}"
    print(mean_row)
    if human:
        print(f"('raters': mean distance of the {len(human)} AFIDs raters to their consensus)")
    print(
        f"\nwrote {out}/T1w.mrk.json, T2w.mrk.json, consensus.mrk.json (3D Slicer, LPS) and "
        f"T1w.png, T2w.png (orthogonal slices through each fiducial)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
