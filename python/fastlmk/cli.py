"""Command line: ``fastlmk train | localize | evaluate | export | bench``."""

from __future__ import annotations

import argparse
import json
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


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train

    out = train(args.config, output=args.output, resume=args.resume)
    print(out)
    return 0


def _cmd_localize(args: argparse.Namespace) -> int:
    from .inference import localize
    from .io import as_image
    from .landmark_files import write_landmark_csv
    from .model import load_model
    from .overlay import write_overlay

    model = load_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spacing = _spacing(args)
    table = {}
    failures = 0
    for item in args.inputs:
        try:
            image = as_image(item, spacing=spacing)
            lm = localize(image, model, backend=args.backend)
        except FastlmkError as exc:
            print(f"error: {item}: {exc}", file=sys.stderr)
            failures += 1
            continue
        lm.image = Path(item).name.split(".")[0]
        stem = out / lm.image
        lm.to_csv(stem.with_suffix(".csv"))
        lm.to_json(stem.with_suffix(".json"))
        lm.to_slicer(out / f"{lm.image}.mrk.json")
        if args.overlay:
            write_overlay(image, lm, stem.with_suffix(".png"))
        table[lm.image] = dict(zip(lm.names, lm.points_mm, strict=True))
        n_flag = int(lm.flagged.sum())
        print(f"{item}: {len(lm)} landmarks" + (f", {n_flag} flagged" if n_flag else ""))
    if table:
        write_landmark_csv(out / "landmarks.csv", table)
    return 1 if failures else 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_report
    from .landmark_files import read_landmarks

    pred: dict = {}
    for p in args.pred:
        path = Path(p)
        files = sorted(path.glob("*.csv")) if path.is_dir() else [path]
        for f in files:
            for image_id, pts in read_landmarks(f).items():
                pred.setdefault(image_id, {}).update(pts)
    refs = {Path(r).stem: read_landmarks(r) for r in args.ref}
    result = evaluate(pred, refs)
    print(format_report(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx
    from .model import load_model

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
    p.set_defaults(func=_cmd_localize)

    p = sub.add_parser("evaluate", help="MRE / SDR of predictions against references")
    p.add_argument(
        "--pred",
        nargs="+",
        required=True,
        help="predicted landmark CSV files or directories of them",
    )
    p.add_argument(
        "--ref",
        action="append",
        required=True,
        help="reference landmark file; repeat for several annotators",
    )
    p.add_argument("--out", help="write the metrics as JSON")
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
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.set_defaults(func=_cmd_bench)
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
