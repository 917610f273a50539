"""Command line: ``fastlmk train | localize | evaluate | export | ensemble | bench | calibrate``."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import FastlmkError

__all__ = ["main"]


def _spacing(args: argparse.Namespace) -> float | tuple[float, ...] | None:
    """``--spacing``: one number for every axis, or one per axis (x, y[, z])."""
    if not args.spacing:
        return None
    return args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    out = train(args.config, output=args.output, resume=args.resume)
    print(out)
    return 0


def _image_id(item: str | Path) -> str:
    """Image id of an input path: its name without the image-format suffix.

    ``scans/155.jpg`` -> ``155``, ``ct.nii.gz`` -> ``ct``, a DICOM directory -> its name.
    A name that is only a suffix (``.jpg``) gives ``image``.
    """
    from .io import IMAGE_SUFFIXES

    # Only a known image-format suffix is taken off; other dots stay ("155.v2.jpg" ->
    # "155.v2"), so distinct files keep distinct ids.
    name = Path(item).name
    for suffix in sorted(IMAGE_SUFFIXES | {".dcm"}, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name or "image"


def _unique_ids(items: Sequence[str]) -> list[str]:
    """One id per input; a repeated name gets ``-2``, ``-3``... so no output is overwritten.

    Compared without case, since ``Scan.csv`` and ``scan.csv`` are one file on
    case-insensitive file systems.
    """
    ids: list[str] = []
    for item in items:
        base = _image_id(item)
        candidate, n = base, 1
        while candidate.casefold() in {i.casefold() for i in ids}:
            n += 1
            candidate = f"{base}-{n}"
        if candidate != base:
            print(
                f"note: {item}: an earlier input has the id {base!r}; written as {candidate!r}",
                file=sys.stderr,
            )
        ids.append(candidate)
    return ids


def _previous_table(path: Path, names: Sequence[str], dim: int) -> dict:
    """The ``landmarks.csv`` a previous run of this model left in the output directory.

    Kept and updated rather than replaced; a file that is not such a table (another
    model's landmarks, other dimensionality, annotations) is refused before any work.
    """
    from .landmark_files import read_landmark_csv

    if not path.is_file():
        return {}
    try:
        table = read_landmark_csv(path)
    except FastlmkError as exc:
        raise FastlmkError(
            f"{path} exists but cannot be read ({exc}); move it or choose another --out"
        ) from exc
    foreign = {n for pts in table.values() for n in pts} - set(names)
    dims = {len(p) for pts in table.values() for p in pts.values()}
    if foreign or dims - {dim}:
        what = f"landmarks {sorted(foreign)[:5]}" if foreign else f"{sorted(dims)}D points"
        raise FastlmkError(
            f"{path} holds {what} that this model ({dim}D) does not write; it is not a "
            "previous result of this model, and is kept: move it or choose another --out"
        )
    return table


def _degrees(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 180:
        raise argparse.ArgumentTypeError(f"expected degrees in [0, 180], got {text!r}")
    return value


def _cmd_localize(args: argparse.Namespace) -> int:
    import time
    import warnings

    from .inference import _align_threshold, localize
    from .io import as_image, make_output_directory
    from .landmark_files import write_landmark_csv
    from .model import load_model
    from .overlay import write_overlay
    from .shape import ImplausibleShapeWarning

    model = load_model(args.model)
    _align_threshold(model, args.align)  # a model that cannot realign: one error, up front
    out = make_output_directory(args.out, FastlmkError, "the results (--out)")
    table_path = out / "landmarks.csv"
    table = _previous_table(table_path, model.names, model.dim)
    spacing = _spacing(args)
    failures = 0
    last_write = time.monotonic()
    for item, name in zip(args.inputs, _unique_ids(args.inputs), strict=True):
        try:
            image = as_image(item, spacing=spacing)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ImplausibleShapeWarning)
                lm = localize(image, model, backend=args.backend, align=args.align)
            lm.image = name
            lm.to_csv(out / f"{name}.csv")
            lm.to_json(out / f"{name}.json")
            lm.to_slicer(out / f"{name}.mrk.json")
            if args.overlay:
                write_overlay(image, lm, out / f"{name}.png")
        except FastlmkError as exc:
            # Most messages already start with the path; name it once.
            where = "" if str(exc).startswith(str(item)) else f"{item}: "
            print(f"error: {where}{exc}", file=sys.stderr)
            failures += 1
            continue
        # The table holds the points that were found; one without an estimate (NaN,
        # always flagged) is named under "not_found" in the image's JSON.
        # An earlier run's entry for this id is replaced (if this run fails on the image,
        # the earlier entry stays, as do the earlier run's files for it).
        missing = lm.not_found()
        found = {n: p for n, p in zip(lm.names, lm.points_mm, strict=True) if n not in missing}
        table.pop(name, None)
        if found:
            table[name] = found
        for w in caught:
            if issubclass(w.category, ImplausibleShapeWarning):
                print(f"warning: {item}: {w.message}", file=sys.stderr)
            else:  # not ours to reword
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        n_flag = int(lm.flagged.sum())
        print(
            f"{item}: {len(lm)} landmarks"
            + (f", {n_flag} flagged" if n_flag else "")
            + (f", not found: {', '.join(missing)}" if missing else "")
        )
        # Rewritten every few seconds (not after every image: the table grows) so an
        # interruption loses little, and at the end.
        if table and time.monotonic() - last_write > 5.0:
            write_landmark_csv(table_path, table)
            last_write = time.monotonic()
    if table:
        write_landmark_csv(table_path, table)
    elif table_path.is_file():  # its only image was re-run and nothing was found
        table_path.unlink()
    return 1 if failures else 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .errors import LandmarkFileError
    from .evaluate import evaluate, format_report, reference_names, result_to_json
    from .landmark_files import read_landmarks

    pred: dict = {}
    pred_files: list[Path] = []
    for p in args.pred:
        path = Path(p)
        files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
        if not files:
            raise LandmarkFileError(
                f"{path}: no .csv file in this directory; expected landmark CSV files "
                "(as written by `fastlmk localize`). Pass those files or their directory."
            )
        pred_files += files
        for f in files:
            for image_id, pts in read_landmarks(f).items():
                pred.setdefault(image_id, {}).update(pts)
    # Named by file, made distinct (r1/ref.csv and r2/ref.csv would both be "ref"),
    # so that no reference replaces another in the dictionary.
    names = reference_names(args.ref)
    refs = {name: read_landmarks(r) for name, r in zip(names, args.ref, strict=True)}
    # Slicer files hold one image keyed by the file name, which says nothing about which
    # image it is: only then may one prediction image and one reference image with
    # different ids be taken as the same image. Ids written in CSV/JSON must match.
    named_by_file = [
        str(f).lower().endswith((".fcsv", ".mrk.json")) for f in [*pred_files, *args.ref]
    ]
    result = evaluate(pred, refs, pair_single_image=any(named_by_file))
    for name, m in result["references"].items():
        for ref_id, pred_id in m["paired_images"].items():
            print(
                f"note: reference {name!r} (image {ref_id!r}) and the predictions (image "
                f"{pred_id!r}) hold one image each, under different ids; evaluated as the "
                "same image",
                file=sys.stderr,
            )
        if name == "mean" and len(refs) > 1:
            continue  # the mean's names are the references', already reported
        only_pred = m["unmatched_landmarks"]["only_in_predictions"]
        only_ref = m["unmatched_landmarks"]["only_in_reference"]
        parts = []
        if only_pred:
            parts.append(
                "only in the predictions (not evaluated): " + ", ".join(map(repr, only_pred))
            )
        if only_ref:
            parts.append(
                "only in the reference (counted as missed): " + ", ".join(map(repr, only_ref))
            )
        if parts:
            hint = " Names must match exactly, case included." if only_pred else ""
            print(
                f"warning: reference {name!r}: landmark names {'; '.join(parts)}.{hint}",
                file=sys.stderr,
            )
    print(format_report(result))
    if args.out:
        try:
            Path(args.out).write_text(result_to_json(result) + "\n")
        except OSError as exc:
            raise FastlmkError(
                f"--out {args.out}: cannot write the metrics ({exc.strerror or exc}); "
                "expected a writable file path. Choose another --out."
            ) from exc
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .model import load_model

    int8_only = [
        flag
        for flag, value in (("--calibration", args.calibration), ("--stages", args.stages))
        if value
    ]
    if int8_only and not args.int8:
        raise FastlmkError(f"{' and '.join(int8_only)} only apply with --int8")
    if args.stages and len(set(args.stages)) != len(args.stages):
        raise FastlmkError(f"--stages names a stage more than once: {' '.join(args.stages)}")
    if args.int8 and args.fp16:
        raise FastlmkError("--int8 and --fp16 write different files: give one of them")
    model = load_model(args.model)
    if args.int8:
        from .quantize import check_calibration_images, quantize_int8

        if not args.calibration:
            raise FastlmkError("--int8 needs --calibration IMAGE [IMAGE ...] (training images)")
        images = check_calibration_images(args.calibration)
        spacing = _spacing(args)
        for q in quantize_int8(
            model, images, spacing=spacing, directory=args.out, stages=args.stages
        ):
            print(
                f"{q.path}  calibrated on {q.calibration_batches} inputs, "
                f"max |int8 - fp32| = {q.max_abs_diff:.2e}"
            )
        return 0
    for r in export_onnx(model, args.out, fp16=args.fp16, check=not args.no_check):
        checked = not math.isnan(r.max_abs_diff)
        print(f"{r.path}" + (f"  max |onnx - torch| = {r.max_abs_diff:.2e}" if checked else ""))
    return 0


def _cmd_ensemble(args: argparse.Namespace) -> int:
    from .model import ensemble_local

    model = ensemble_local(list(args.models), name=args.name)
    out = model.save(args.out, weights_dtype=args.weights)
    stages = []
    for stage, spec in model.config.local_stages.items():
        spacing = " x ".join(f"{s:g}" for s in spec.spacing)
        stages.append(f"{stage}: {spec.network_count} network(s) at {spacing} mm")
    print(f"{out}: global network of {args.models[0]}; {'; '.join(stages)}")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import warnings

    from .calibration import calibrate_confidence, calibrate_shape, write_calibration, write_shape
    from .evaluate import mean_table
    from .landmark_files import read_landmarks
    from .model import load_model

    if not Path(args.model).is_dir():
        raise FastlmkError(
            f"calibrate rewrites the model's model.json: give a model directory, not "
            f"{args.model!r} (to change a bundled model, copy its directory first: "
            "fastlmk.load_model(name).path)"
        )
    model = load_model(args.model)
    if args.shape_only and not args.landmarks:
        raise FastlmkError("--shape-only needs --landmarks FILE [FILE ...]")
    shape = None
    if args.landmarks:
        # Read (and checked) before any image is localized.
        table = mean_table([read_landmarks(f) for f in args.landmarks])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            shape = calibrate_shape(
                model,
                args.images,
                table,
                spacing=_spacing(args),
                rotation_deg=args.rotation_deg,
                scale=args.scale,
            )
        for w in caught:
            print(f"note: {w.message}", file=sys.stderr)
    # Everything is computed before model.json is touched: a failure changes nothing.
    result = None
    if not args.shape_only:
        result = calibrate_confidence(
            model, args.images, spacing=_spacing(args), backend=args.backend
        )
    if shape is not None:
        path = write_shape(model, shape)
        low_s, high_s = shape.scale_range
        limits, what = shape.max_residual_mm, "from the fitted mean shape"
        if shape.max_conditional_mm is not None:
            limits, what = shape.max_conditional_mm, "from their prediction by the others"
        print(
            f"shape model from {shape.shapes} annotated images: scale {low_s:.2f}..{high_s:.2f}, "
            f"rotation <= {shape.max_rotation_deg:.0f} deg, landmark distance limits "
            f"{limits.min():.3g}..{limits.max():.3g} mm {what}\n"
            f"written to {path}"
        )
    if result is None:
        return 0
    before = model.config.confidence
    path = write_calibration(model, result)
    after = result.spec
    low, high = result.weight_range
    print(
        f"{result.points} estimates on {result.images} images: stage vote weights "
        f"{low:.3g}..{high:.3g}\nmin_weight {before.min_weight:.3g} -> {after.min_weight:.3g}, "
        f"max_weight {before.max_weight:.3g} -> {after.max_weight:.3g}, max_spread_mm "
        f"{before.max_spread_mm:.3g} -> {after.max_spread_mm:.3g}\nwritten to {path}"
    )
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    import time

    import numpy as np

    from .backends import available_backends
    from .inference import localize
    from .io import read_image
    from .model import load_model

    model = load_model(args.model)
    spacing = _spacing(args)
    image = read_image(args.image, spacing=spacing)
    backends = args.backend or available_backends()
    for name in backends:
        for _ in range(args.warmup):
            localize(image, model, backend=name)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            localize(image, model, backend=name)
            times.append(1e3 * (time.perf_counter() - t))
        median, p90 = np.percentile(times, [50, 90])
        print(f"{name:12s} median {median:8.2f} ms   p90 {p90:8.2f} ms")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastlmk",
        description=("Anatomical landmark localization in 2D/3D medical images (physical LPS mm)."),
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from images + landmark files")
    p.add_argument("--config", required=True, help="training configuration (TOML)")
    p.add_argument("--output", help="model directory (overrides the config)")
    p.add_argument("--resume", action="store_true", help="continue from output/checkpoint")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("localize", help="localize landmarks in images")
    p.add_argument("model", help="bundled model name or model directory")
    p.add_argument("inputs", nargs="+", help="image files or DICOM series directories")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument(
        "--spacing",
        type=float,
        nargs="+",
        help="pixel spacing in mm (one number, or x y [z]); required for 2D files",
    )
    p.add_argument("--overlay", action="store_true", help="also write a PNG overlay per image")
    p.add_argument("--backend", default="auto", help="inference backend (default: auto)")
    align = p.add_mutually_exclusive_group()
    align.add_argument(
        "--align",
        nargs="?",
        type=_degrees,
        const=True,
        default=None,
        metavar="DEG",
        help="realign anatomy tilted more than DEG degrees against the model's mean "
        "training shape (default: the model's setting; without DEG: it, else 3)",
    )
    align.add_argument(
        "--no-align", dest="align", action="store_false", help="never realign"
    )
    p.set_defaults(func=_cmd_localize)

    p = sub.add_parser("evaluate", help="MRE / SDR of predictions against references")
    p.add_argument(
        "--pred",
        nargs="+",
        required=True,
        help="predicted landmark CSV files or directories of them; predictions of one "
        "image and a one-image reference are paired even where their ids differ",
    )
    p.add_argument(
        "--ref",
        action="append",
        required=True,
        help="reference landmark file; repeat for several annotators (each is named by "
        "its file name, with its folder in front where two names are the same)",
    )
    p.add_argument(
        "--out",
        help="write the metrics as JSON; numbers that are not finite are null (per_image "
        "of an image with a missed landmark, statistics of a landmark never found)",
    )
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser(
        "export", help="write ONNX files of a model's networks, checked against torch"
    )
    p.add_argument("model", help="bundled model name or model directory")
    p.add_argument("--fp16", action="store_true", help="float16 networks (*.fp16.onnx)")
    p.add_argument("--out", help="output directory (default: the model directory)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime check")
    p.add_argument(
        "--int8",
        action="store_true",
        help="int8 networks (*.int8.onnx) for the onnxruntime backend, calibrated on images",
    )
    p.add_argument(
        "--calibration",
        nargs="+",
        metavar="IMAGE",
        help="calibration images or directories for --int8 (training images, not test images)",
    )
    p.add_argument(
        "--stages",
        nargs="+",
        metavar="STAGE",
        help="networks to quantize with --int8: global, local, local2 ... (default: all)",
    )
    p.add_argument("--spacing", type=float, nargs="+", help="pixel spacing in mm (2D files)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "ensemble",
        help="combine the local networks of several models into one model (same crops: "
        "pooled votes; other spacings or crops: further local stages)",
    )
    p.add_argument("models", nargs="+", help="models; the first gives the global network")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--name", help="model name (default: the first model's)")
    p.add_argument(
        "--weights",
        choices=["float32", "float16"],
        default="float32",
        help="storage type of the weights (float16: half the size; loaded as float32)",
    )
    p.set_defaults(func=_cmd_ensemble)

    p = sub.add_parser("bench", help="time localize on one image with each backend")
    p.add_argument("model", help="bundled model name or model directory")
    p.add_argument("image", help="image file")
    p.add_argument("--spacing", type=float, nargs="+", help="pixel spacing in mm (2D files)")
    p.add_argument("--backend", action="append", help="backend (repeat; default: all available)")
    p.add_argument("--warmup", type=_non_negative_int, default=3)
    p.add_argument("--repeats", type=_positive_int, default=20)
    p.set_defaults(func=_cmd_bench)

    p = sub.add_parser(
        "calibrate",
        help="set a model's flag thresholds from its votes on images it localizes well "
        "(rewrites the confidence entry of model.json); with --landmarks also its shape model",
    )
    p.add_argument("model", help="bundled model name or model directory")
    p.add_argument("images", nargs="+", help="images showing every landmark (e.g. validation)")
    p.add_argument("--spacing", type=float, nargs="+", help="pixel spacing in mm (2D files)")
    p.add_argument("--backend", default="auto")
    p.add_argument(
        "--landmarks",
        nargs="+",
        help="annotations of the images (several files: their mean): also fit the shape "
        "model that flags implausible landmark configurations",
    )
    p.add_argument(
        "--rotation-deg",
        type=float,
        help="the training augmentation's rotation (default: from the model's metadata, else 0)",
    )
    p.add_argument(
        "--scale",
        type=float,
        help="the training augmentation's scale change (default: from the model's "
        "metadata, else 0)",
    )
    p.add_argument(
        "--shape-only",
        action="store_true",
        help="fit only the shape model (no localization, vote thresholds kept)",
    )
    p.set_defaults(func=_cmd_calibrate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FastlmkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
