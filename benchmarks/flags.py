"""How often the bundled models flag good estimates, and whether they flag cut-off ones.

    python benchmarks/flags.py --out benchmarks/results/flags.json

- ``ceph-isbi2015`` on the 150 test1 cephalograms: flagged estimates and their errors
  against the mean of the two annotators, and the number of misses beyond 4 mm; and how
  often the shape check flags one of the found landmarks moved by 5-25 mm.
- ``ceph-isbi2015`` on image 155 cut at row 1500 (the chin and the lower face are
  outside): flags of the landmarks the cut removes (by their position on the whole
  image) and of those it keeps.
- ``afids-mni152`` on the held-out synthetic volumes (``--afids-data``, written by
  ``python -m fastlmk.synthesis``; skipped when absent) and the two templates.
- Misuse: image 155 and the T1w template with a wrong pixel spacing, mirrored, upside
  down, and rotated against their voxel grid: flags and errors (against the annotations
  carried through the same change) as shipped and without the shape model (no shape
  check, :mod:`fastlmk.shape`; no realignment, :mod:`fastlmk.align`), and the fitted
  scale and rotation.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

import fastlmk
from fastlmk.geometry import Geometry, index_to_physical, physical_to_index
from fastlmk.landmark_files import read_fcsv, read_landmark_csv
from fastlmk.shape import ImplausibleShapeWarning, check_shape, grid_frame_mm

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _ceph(data: Path) -> dict[str, Any]:
    senior = read_landmark_csv(data / "landmarks_senior.csv")
    junior = read_landmark_csv(data / "landmarks_junior.csv")
    model = fastlmk.load_model("ceph-isbi2015")
    flagged, errors, grid_points = [], [], []
    for i in range(151, 301):
        key = f"{i:03d}"
        image = fastlmk.read_image(data / "images" / f"{key}.jpg", spacing=0.1)
        lm = fastlmk.localize(image, model)
        truth = {n: (senior[key][n] + junior[key][n]) / 2 for n in lm.names}
        flagged.append(lm.flagged)
        errors.append([float(np.linalg.norm(lm[n] - truth[n])) for n in lm.names])
        grid_points.append(grid_frame_mm(lm.points_mm, Geometry.from_sitk(image)))
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
        "test1_one_landmark_displaced": _displaced(grid_points, model),
        "image155_cut_at_row_1500": {
            "removed": int(removed.sum()),
            "removed_flagged": int(cut.flagged[removed].sum()),
            "kept": int((~removed).sum()),
            "kept_flagged": int(cut.flagged[~removed].sum()),
        },
    }


def _displaced(grid_points: list[np.ndarray], model: fastlmk.LandmarkModel) -> dict[str, Any]:
    """On each image's found points, one landmark (random, seed 0) moved by 5, 8, 15 or
    25 mm in a random direction: how often the shape check flags it, with the model's
    conditional predictions and with the fitted mean shape alone."""
    spec = model.config.shape
    assert spec is not None
    mean_only = replace(spec, covariance=None, max_conditional_mm=None)
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"images": len(grid_points)}
    for distance in (5.0, 8.0, 15.0, 25.0):
        caught = {"conditional": 0, "mean_shape_only": 0, "others_flagged": 0}
        for points in grid_points:
            moved = points.copy()
            k = int(rng.integers(len(points)))
            direction = rng.normal(size=points.shape[1])
            moved[k] += distance * direction / np.linalg.norm(direction)
            check = check_shape(moved, spec)
            caught["conditional"] += int(check.outlier[k])
            caught["others_flagged"] += int(np.delete(check.outlier, k).sum())
            caught["mean_shape_only"] += int(check_shape(moved, mean_only).outlier[k])
        out[f"{distance:g}_mm"] = caught
    return out


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


# A misuse case: (name, image, maps physical points (N, D) of the original image to the
# physical points of the same anatomy in the case's image).
_Case = tuple[str, sitk.Image, Callable[[np.ndarray], np.ndarray]]


def _misuse_cases(
    image: sitk.Image, spacings: list[float], rotations: list[tuple[float, ...]]
) -> list[_Case]:
    """Wrong spacings (factors), mirrored along x, upside down (y), and rotated about the
    image centre (2D: one angle; 3D: angles about x, y, z), in degrees."""
    size, dim = image.GetSize(), image.GetDimension()

    def through_index(
        case: sitk.Image, flip_axis: int | None
    ) -> Callable[[np.ndarray], np.ndarray]:
        def mapping(points: np.ndarray) -> np.ndarray:
            index = physical_to_index(points, image)
            if flip_axis is not None:
                index[:, flip_axis] = size[flip_axis] - 1 - index[:, flip_axis]
            return index_to_physical(index, case)

        return mapping

    array = sitk.GetArrayFromImage(image)
    cases: list[_Case] = []
    for factor in spacings:
        moved = sitk.Image(image)
        moved.SetSpacing([s * factor for s in image.GetSpacing()])
        cases.append((f"spacing x{factor:g}", moved, through_index(moved, None)))
    # Array axes are (y, x) or (z, y, x): x is the last, y the one before.
    for name, axis in (("mirrored (x)", 0), ("upside down (y)", 1)):
        case = sitk.GetImageFromArray(np.ascontiguousarray(np.flip(array, axis=-1 - axis)))
        case.CopyInformation(image)
        cases.append((name, case, through_index(case, axis)))
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])
    for angles in rotations:
        turn: sitk.Transform
        if dim == 2:
            turn = sitk.Euler2DTransform(centre, float(np.radians(angles[0])))
        else:
            turn = sitk.Euler3DTransform(centre, *(float(np.radians(a)) for a in angles))
        case = sitk.Resample(image, image, turn, sitk.sitkLinear, 0.0)
        # The case shows at p what the image shows at turn(p).
        inverse = turn.GetInverse()

        def turned(points: np.ndarray, inverse: sitk.Transform = inverse) -> np.ndarray:
            return np.array([inverse.TransformPoint([float(v) for v in p]) for p in points])

        what = "/".join(f"{a:g}" for a in angles)
        cases.append((f"rotated {what} deg", case, turned))
    return cases


def _misuse(
    model: fastlmk.LandmarkModel, image: sitk.Image, truth_mm: np.ndarray, cases: list[_Case]
) -> dict[str, Any]:
    """Each case as shipped (shape check, realignment above the model's threshold) and
    without the shape model (neither)."""
    plain = fastlmk.load_model(model.path)
    plain.config = replace(model.config, shape=None, align_above_deg=None)
    out = {}
    for name, case, mapping in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ImplausibleShapeWarning)
            lm = fastlmk.localize(case, model)
        before = fastlmk.localize(case, plain)
        check = lm.details["shape"]
        truth = mapping(truth_mm)
        errors = np.linalg.norm(lm.points_mm - truth, axis=1)
        errors_before = np.linalg.norm(before.points_mm - truth, axis=1)
        alignment = lm.details.get("alignment")
        out[name] = {
            "flagged": int(lm.flagged.sum()),
            "realigned_deg": None if alignment is None else round(alignment["rotation_deg"], 1),
            "shape_scale": round(float(check.scale), 3),
            "shape_rotation_deg": round(float(check.rotation_deg), 1),
            "shape_outliers": int(check.outlier.sum()),
            "shape_problems": list(check.problems),
            "mean_error_mm": round(float(np.nanmean(errors)), 2),
            "max_error_mm": round(float(np.nanmax(errors)), 2),
            "errors_over_4mm": int(np.sum(errors > 4)),
            "errors_over_4mm_flagged": int(np.sum((errors > 4) & lm.flagged)),
            "without_shape_model": {
                "flagged": int(before.flagged.sum()),
                "mean_error_mm": round(float(np.nanmean(errors_before)), 2),
                "max_error_mm": round(float(np.nanmax(errors_before)), 2),
                "errors_over_4mm": int(np.sum(errors_before > 4)),
                "errors_over_4mm_flagged": int(np.sum((errors_before > 4) & before.flagged)),
            },
        }
    return out


def _ceph_misuse(data: Path) -> dict[str, Any]:
    senior = read_landmark_csv(data / "landmarks_senior.csv")
    junior = read_landmark_csv(data / "landmarks_junior.csv")
    model = fastlmk.load_model("ceph-isbi2015")
    image = fastlmk.read_image(data / "images" / "155.jpg", spacing=0.1)
    truth = np.array([(senior["155"][n] + junior["155"][n]) / 2 for n in model.names])
    cases: list[_Case] = [("as given", image, lambda p: p)]
    cases += _misuse_cases(
        image, [0.5, 0.7, 1.3, 1.5, 2.0, 3.0], [(10,), (20,), (30,), (45,), (-20,), (-30,)]
    )
    return _misuse(model, image, truth, cases)


def _afids_misuse(data: Path) -> dict[str, Any]:
    model = fastlmk.load_model("afids-mni152")
    image = fastlmk.read_image(data / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz")
    names, points = read_fcsv(data / "groundtruth.fcsv")
    truth = np.array([points[names.index(n)] for n in model.names])
    cases: list[_Case] = [("as given", image, lambda p: p)]
    cases += _misuse_cases(
        image,
        [0.5, 0.7, 1.5, 2.0, 3.0],
        [(10, 0, 0), (20, 10, 0), (0, 0, 20), (30, 0, 0), (0, 20, 0), (-20, 0, 0)],
    )
    return _misuse(model, image, truth, cases)


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
        result["ceph-isbi2015"]["misuse_image155"] = _ceph_misuse(Path(args.isbi))
    else:
        print(f"ISBI 2015 data not found at {args.isbi}: skipped", file=sys.stderr)
    result["afids-mni152"] = _afids(Path(args.afids), Path(args.afids_data))
    if (Path(args.afids) / "groundtruth.fcsv").is_file():
        result["afids-mni152"]["misuse_T1w_template"] = _afids_misuse(Path(args.afids))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
