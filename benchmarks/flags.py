"""How often the bundled models flag good estimates, and whether they flag cut-off ones.

    python benchmarks/flags.py --out benchmarks/results/flags.json

- ``ceph-isbi2015`` on the 150 test1 cephalograms: flagged estimates and their errors
  against the mean of the two annotators, and the number of misses beyond 4 mm.
- ``ceph-isbi2015`` on image 155 cut at row 1500 (the chin and the lower face are
  outside): flags of the landmarks the cut removes (by their position on the whole
  image) and of those it keeps.
- ``afids-mni152`` on the held-out synthetic volumes (``--afids-data``, written by
  ``python -m fastlmk.synthesis``; skipped when absent) and the two templates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import fastlmk
from fastlmk.landmark_files import read_landmark_csv

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _ceph(data: Path) -> dict[str, Any]:
    senior = read_landmark_csv(data / "landmarks_senior.csv")
    junior = read_landmark_csv(data / "landmarks_junior.csv")
    model = fastlmk.load_model("ceph-isbi2015")
    flagged, errors = [], []
    for i in range(151, 301):
        key = f"{i:03d}"
        lm = fastlmk.localize(
            fastlmk.read_image(data / "images" / f"{key}.jpg", spacing=0.1), model
        )
        truth = {n: (senior[key][n] + junior[key][n]) / 2 for n in lm.names}
        flagged.append(lm.flagged)
        errors.append([float(np.linalg.norm(lm[n] - truth[n])) for n in lm.names])
    f, e = np.array(flagged), np.array(errors)
    image = fastlmk.read_image(data / "images" / "155.jpg", spacing=0.1)
    whole = fastlmk.localize(image, model)
    cut = fastlmk.localize(image[:, :1500], model)
    removed = whole.index[:, 1] > 1499.5
    return {
        "test1": {
            "estimates": int(f.size),
            "flagged": int(f.sum()),
            "flagged_errors_mm": sorted(float(v) for v in e[f]),
            "errors_over_4mm": int((e > 4).sum()),
            "errors_over_4mm_flagged": int((f & (e > 4)).sum()),
        },
        "image155_cut_at_row_1500": {
            "removed": int(removed.sum()),
            "removed_flagged": int(cut.flagged[removed].sum()),
            "kept": int((~removed).sum()),
            "kept_flagged": int(cut.flagged[~removed].sum()),
        },
    }


def _afids(data: Path, synthetic: Path | None) -> dict[str, Any]:
    model = fastlmk.load_model("afids-mni152")
    out: dict[str, Any] = {}
    if synthetic is not None and (synthetic / "landmarks.csv").is_file():
        table = read_landmark_csv(synthetic / "landmarks.csv")
        n = flagged = 0
        flagged_errors = []
        for path in sorted((synthetic / "images").glob("test*.nii.gz")):
            lm = fastlmk.localize(path, model)
            truth = table[path.name.removesuffix(".nii.gz")]
            e = np.array([np.linalg.norm(lm[k] - truth[k]) for k in lm.names])
            n += len(lm)
            flagged += int(lm.flagged.sum())
            flagged_errors += [float(v) for v in e[lm.flagged]]
        out["synthetic_test"] = {
            "estimates": n,
            "flagged": flagged,
            "flagged_errors_mm": sorted(flagged_errors),
        }
    for contrast in ("T1w", "T2w"):
        path = data / f"tpl-MNI152NLin2009cAsym_res-01_{contrast}.nii.gz"
        if path.is_file():
            lm = fastlmk.localize(path, model)
            out[contrast] = {"estimates": len(lm), "flagged": int(lm.flagged.sum())}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--isbi", default=str(SHARED / "isbi2015"))
    parser.add_argument("--afids", default=str(SHARED / "afids-mni152"))
    parser.add_argument("--afids-data", default="runs/afids-data")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    if (Path(args.isbi) / "split.csv").is_file():
        result["ceph-isbi2015"] = _ceph(Path(args.isbi))
    else:
        print(f"ISBI 2015 data not found at {args.isbi}: skipped", file=sys.stderr)
    result["afids-mni152"] = _afids(Path(args.afids), Path(args.afids_data))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
