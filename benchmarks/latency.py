"""End-to-end ``localize`` latency of every available backend, with a per-stage breakdown.

Cases (both in one run, every backend available here, ratios to the torch backend):

* ``ceph``: a 1935 x 2400 cephalogram at 0.1 mm with the ISBI 2015 model
  (the bundled ``ceph-isbi2015``, else random weights with the same
  configuration: latency does not depend on the weights). The image is
  ``../shared/data/isbi2015/images/151.jpg`` when present, else synthetic.
* ``ct``: a 512 x 512 x 300 int16 volume at 0.7 x 0.7 x 1.0 mm with a 3D model defined
  here (global 4 mm, local 1 mm crops of 32^3, 32 landmarks; random weights).

Timed from the decoded array to landmarks in mm (``localize`` on a SimpleITK image),
after warm-up; the backends take turns, one run each per repeat in a shuffled order, so
that a shared machine's drifts (and the run before) hit them alike; median, p90 and p99
of the repeats, the ratio of the medians to torch's and the paired ratio (median over
repeats of torch's run time over the backend's run time in the same repeat); CUDA is
synchronised inside every timed step. Each backend's landmarks are first checked against
the torch backend's.
Also recorded: peak resident memory, the multiply-accumulates (MACs) of every
convolution of each network at the benchmark's input size, the machine's measured
float32 matrix-product peak and the fraction of it each network step achieves, and a
peer: the ``landmarker`` package's spatial configuration network (SCN) forward plus
heatmap decoding on the same cephalogram (skipped, with the reason, when it cannot run),
and the networks' throughput at batch 1 and batch 4 (images per second, global + local
network calls only: ``localize`` takes one image at a time).

Backends: every one available here; with onnxruntime also ``onnxruntime-fp32``, so that
the model's shipped int8 networks (``onnxruntime``, see ``fastlmk export --int8``) and
float32 are compared in the same run.

    python benchmarks/latency.py --out latency.json [--backends onnxruntime torch]
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

import fastlmk
from fastlmk.backends import available_backends, get_backend
from fastlmk.inference import _localize, pad_to_multiple
from fastlmk.model import LandmarkModel, ModelConfig, StageSpec, available_models, load_model
from fastlmk.networks import NetworkSpec
from fastlmk.preprocess import stage_geometry

ROOT = Path(__file__).resolve().parents[1]
CEPH_IMAGE = ROOT.parent / "shared" / "data" / "isbi2015" / "images" / "151.jpg"
STEPS = ("preprocess", "global", "global_vote", "crop", "local", "local_vote", "to_host",
         "to_physical")


# -- environment -------------------------------------------------------------------------


def metadata() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__, "SimpleITK": sitk.Version.VersionString(),
                "fastlmk": fastlmk.__version__ if hasattr(fastlmk, "__version__") else "dev"}
    for mod in ("onnxruntime", "tensorrt", "landmarker"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    from fastlmk.backends.onnxruntime_backend import physical_cores

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": {"platform": platform.platform(), "cpu": cpu,
                    "logical_cpus": torch.get_num_threads(), "physical_cores": physical_cores(),
                    "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": versions,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def stats(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {"median_ms": float(np.median(a)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "min_ms": float(a.min()), "n": len(a)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def matmul_peak_gflops(device: torch.device) -> float:
    """Measured float32 matrix-product rate (GFLOP/s) on ``device``: the best of several
    products large enough to reach the machine's sustained peak."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.rand(n, n, device=device)
    b = torch.rand(n, n, device=device)
    best = float("inf")
    for _ in range(5):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def conv_macs(net: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of every convolution of ``net`` for one input of ``shape``,
    counted from the module shapes (output elements x input channels per group x kernel)."""
    total = 0

    def hook(m: torch.nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)
        total += out.numel() * (m.in_channels // m.groups) * int(np.prod(m.kernel_size))

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
    with torch.inference_mode():
        net(torch.zeros(shape))
    for h in handles:
        h.remove()
    return total


# -- cases -------------------------------------------------------------------------------


def ceph_case() -> tuple[str, LandmarkModel, sitk.Image, dict[str, Any]]:
    info: dict[str, Any] = {}
    if "ceph-isbi2015" in available_models():
        model = load_model("ceph-isbi2015")
        info["model"] = "ceph-isbi2015 (bundled)"
    else:
        from fastlmk.train import _model_config

        cfg = tomllib.loads((ROOT / "configs" / "isbi2015.toml").read_text())
        torch.manual_seed(0)
        model = LandmarkModel.create(_model_config(cfg, 2, [f"L{i}" for i in range(19)]))
        info["model"] = "random weights, configs/isbi2015.toml (trained model absent)"
    if CEPH_IMAGE.is_file():
        from PIL import Image

        array = np.asarray(Image.open(CEPH_IMAGE).convert("L"))
        info["image"] = str(CEPH_IMAGE)
    else:
        rng = np.random.default_rng(0)
        array = (rng.random((2400, 1935)) * 60 + np.linspace(40, 200, 1935)).astype(np.uint8)
        info["image"] = "synthetic 2400 x 1935 uint8"
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.1, 0.1))
    return "ceph", model, image, info


def ct_model() -> LandmarkModel:
    config = ModelConfig(
        name="ct-benchmark",
        dim=3,
        landmarks=tuple(f"L{i}" for i in range(32)),
        global_stage=StageSpec((4.0, 4.0, 4.0), NetworkSpec(
            channels=(16, 32, 64, 64), blocks=(1, 1, 2, 1), pools=3, stem_kernel=5)),
        local_stage=StageSpec((1.0, 1.0, 1.0), NetworkSpec(
            channels=(8, 16, 32), blocks=(1, 1, 1), pools=1, stem_kernel=3),
            crop_size=(32, 32, 32)),
    )
    torch.manual_seed(0)
    return LandmarkModel.create(config)


def ct_case() -> tuple[str, LandmarkModel, sitk.Image, dict[str, Any]]:
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[:300, :512, :512]
    body = ((y - 256) ** 2 + (x - 256) ** 2 < 200**2) * 1000 - 1000
    volume = (body + (z % 50 < 5) * 600).astype(np.int16)
    volume += rng.integers(-30, 30, size=(300, 1, 512), dtype=np.int16)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((0.7, 0.7, 1.0))
    return "ct", ct_model(), image, {"model": "random weights, 3D config in latency.py",
                                     "image": "synthetic 512 x 512 x 300 int16"}


# -- timing ------------------------------------------------------------------------------


def time_backends(model: LandmarkModel, image: sitk.Image, backends: list[str], warmup: int,
                  repeats: int) -> dict[str, tuple[dict[str, Any], np.ndarray]]:
    """Time every backend on the same image, interleaved: each repeat runs every backend
    once, in an order shuffled per repeat (fixed seed), so drifts of a shared machine's
    speed hit all backends alike, and so does the run before (torch's OpenMP workers
    spin for a while after its last parallel op and slow whatever runs next: a fixed
    order would always charge that to the same backend); the paired ratio to torch is
    the median over repeats of the two runs' ratio."""
    points: dict[str, np.ndarray] = {}
    for backend in backends:
        for _ in range(warmup):
            points[backend] = _localize(image, model, backend=backend).points_mm
    per_step: dict[str, dict[str, list[float]]] = {b: {s: [] for s in STEPS} for b in backends}
    total: dict[str, list[float]] = {b: [] for b in backends}
    order = random.Random(0)
    for _ in range(repeats):
        for backend in order.sample(backends, len(backends)):
            steps = per_step[backend]
            sync()
            last = start = time.perf_counter()

            def mark(step: str, steps: dict[str, list[float]] = steps) -> None:
                nonlocal last
                sync()
                now = time.perf_counter()
                steps[step].append(1e3 * (now - last))
                last = now

            _localize(image, model, backend=backend, mark=mark)
            total[backend].append(1e3 * (time.perf_counter() - start))
    out = {}
    for backend in backends:
        timing: dict[str, Any] = {
            "end_to_end": stats(total[backend]),
            "steps_median_ms": {s: float(np.median(v)) for s, v in per_step[backend].items()
                                if v},
        }
        if "torch" in total:
            timing["paired_speedup_vs_torch_cpu"] = float(np.median(
                np.array(total["torch"]) / np.array(total[backend])))
        out[backend] = (timing, points[backend])
    return out


def batch_throughput(model: LandmarkModel, image: sitk.Image, backend: str,
                     batches: tuple[int, ...] = (1, 4), repeats: int = 5) -> dict[str, float]:
    """Images per second of the global + local network calls at each batch size."""
    runner = get_backend(model, backend)
    shapes = network_shapes(model, image)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for b in batches:
        inputs = {stage: torch.rand((b, *shape[1:]), generator=gen).to(runner.device)
                  for stage, shape in shapes.items()}

        def call(inputs: dict[str, torch.Tensor]) -> None:
            for stage, x in inputs.items():
                if stage == "global":
                    runner.run_global(x)
                else:
                    runner.run_local(x, stage)
            sync()

        call(inputs)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            call(inputs)
            times.append(time.perf_counter() - t)
        out[f"batch_{b}_images_per_s"] = b / float(np.median(times))
    return out


def network_shapes(model: LandmarkModel, image: sitk.Image) -> dict[str, tuple[int, ...]]:
    from fastlmk.geometry import Geometry

    cfg = model.config
    coarse = stage_geometry(Geometry.from_sitk(image), cfg.global_stage.spacing)
    x = pad_to_multiple(torch.zeros(1, 1, *coarse.size[::-1]), model.global_net.spec.input_multiple)
    shapes = {"global": tuple(x.shape)}
    for stage, spec in cfg.local_stages.items():
        shapes[stage] = (1, len(cfg.landmarks), *spec.crop_size)
    return shapes


def flops_report(model: LandmarkModel, image: sitk.Image) -> dict[str, Any]:
    out = {}
    for stage, shape in network_shapes(model, image).items():
        net = model.network(stage)
        out[stage] = {"input_shape": list(shape), "conv_gmacs": conv_macs(net, shape) / 1e9}
    return out


# -- the peer ----------------------------------------------------------------------------


def peer_landmarker(image: sitk.Image, n_landmarks: int, warmup: int,
                    repeats: int) -> dict[str, Any]:
    """landmarker's SCN (Payer et al. 2019): resize to its 512 x 512 working size, forward,
    decode the heatmaps (argmax), scale back; random weights (latency only)."""
    try:
        import landmarker
        from landmarker.heatmap.decoder import heatmap_to_coord
        from landmarker.models import OriginalSpatialConfigurationNet
    except Exception as exc:  # any import failure means: no peer in this run
        return {"skipped": f"landmarker not importable: {type(exc).__name__}: {exc}"}
    size = 512
    torch.manual_seed(0)
    net = OriginalSpatialConfigurationNet(in_channels=1, out_channels=n_landmarks).eval()
    array = torch.from_numpy(sitk.GetArrayFromImage(image).astype(np.float32))
    scale = torch.tensor(array.shape, dtype=torch.float32) / size

    def run() -> torch.Tensor:
        with torch.inference_mode():
            x = torch.nn.functional.interpolate(array[None, None], size=(size, size),
                                                mode="bilinear", align_corners=False)
            x = (x - x.mean()) / x.std()
            heatmaps = net(x)
            return heatmap_to_coord(heatmaps, method="argmax") * scale

    times = []
    for i in range(warmup + repeats):
        t = time.perf_counter()
        run()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t))
    return {"package": f"landmarker {landmarker.__version__}",
            "model": "OriginalSpatialConfigurationNet (defaults), random weights",
            "pipeline": f"resize to {size}x{size} + forward + argmax decode, CPU torch",
            "macs_g": conv_macs(net, (1, 1, size, size)) / 1e9,
            "end_to_end": stats(times)}


# -- main --------------------------------------------------------------------------------


def run_case(case: Callable[[], tuple[str, LandmarkModel, sitk.Image, dict[str, Any]]],
             backends: list[str], warmup: int, repeats: int,
             peak: dict[str, float]) -> dict[str, Any]:
    name, model, image, info = case()
    result: dict[str, Any] = {**info, "size": list(image.GetSize()),
                              "spacing_mm": list(image.GetSpacing()),
                              "networks": flops_report(model, image), "backends": {}}
    available = []
    for backend in backends:
        try:
            get_backend(model, backend)
        except fastlmk.FastlmkError as exc:
            result["backends"][backend] = {"skipped": str(exc)}
            continue
        available.append(backend)
    print(f"[{name}] {', '.join(available)} ...", file=sys.stderr, flush=True)
    timed = time_backends(model, image, available, warmup, repeats)
    reference = None
    for backend in available:
        timing, points = timed[backend]
        if reference is None:
            reference = points
        timing["max_diff_mm_vs_first_backend"] = float(np.nanmax(np.abs(points - reference)))
        timing["precision"] = getattr(get_backend(model, backend), "precision", "fp32")
        timing["network_throughput"] = batch_throughput(model, image, backend,
                                                        repeats=max(3, repeats // 4))
        timing["peak_rss_mb_so_far"] = peak_rss_mb()
        if torch.cuda.is_available():
            timing["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        device = "cuda" if backend.startswith("torch-cuda") or backend == "tensorrt" else "cpu"
        for stage in ("global", "local"):
            # The "local" step times every local stage's network (local, local2, ...).
            nets = [v for k, v in result["networks"].items()
                    if k == stage or (stage == "local" and k.startswith("local"))]
            if nets and stage in timing["steps_median_ms"]:
                gmacs = sum(n["conv_gmacs"] for n in nets)
                achieved = 2 * gmacs / (timing["steps_median_ms"][stage] / 1e3)
                timing[f"{stage}_gflops"] = achieved
                timing[f"{stage}_fraction_of_peak"] = achieved / peak[device]
        result["backends"][backend] = timing
    base = result["backends"].get("torch", {}).get("end_to_end", {}).get("median_ms")
    for timing in result["backends"].values():
        if base and "end_to_end" in timing:
            timing["speedup_vs_torch_cpu"] = base / timing["end_to_end"]["median_ms"]
    if name == "ceph":
        result["peer"] = peer_landmarker(image, len(model.config.landmarks), 2,
                                         max(3, repeats // 4))
        own = [t["end_to_end"]["median_ms"] for t in result["backends"].values()
               if "end_to_end" in t]
        if "end_to_end" in result["peer"] and own:
            result["peer"]["ratio_peer_over_fastest_fastlmk"] = (
                result["peer"]["end_to_end"]["median_ms"] / min(own))
    return result


def print_table(report: dict[str, Any]) -> None:
    print("\ncase  backend           median ms    p90 ms   vs torch  paired   steps (median ms)")
    for case, res in report["cases"].items():
        for backend, t in res["backends"].items():
            if "end_to_end" not in t:
                print(f"{case:5s} {backend:16s}  skipped: {t['skipped']}")
                continue
            e = t["end_to_end"]
            steps = " ".join(f"{k}={v:.1f}" for k, v in t["steps_median_ms"].items())
            ratio = t.get("speedup_vs_torch_cpu")
            paired = t.get("paired_speedup_vs_torch_cpu")
            print(f"{case:5s} {backend:16s} {e['median_ms']:9.1f} {e['p90_ms']:9.1f}   "
                  f"{(f'{ratio:.2f}x' if ratio else '-'):>7s}  "
                  f"{(f'{paired:.2f}x' if paired else '-'):>6s}   {steps}")
        peer = res.get("peer")
        if peer:
            text = (f"{peer['end_to_end']['median_ms']:.1f} ms median ({peer['pipeline']})"
                    if "end_to_end" in peer else f"skipped: {peer['skipped']}")
            print(f"{case:5s} peer              {text}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="latency.json", help="JSON report")
    parser.add_argument("--backends", nargs="+", help="default: every available backend")
    parser.add_argument("--cases", nargs="+", default=["ceph", "ct"], choices=["ceph", "ct"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    backends = args.backends or available_backends()
    if not args.backends and "onnxruntime" in backends:
        backends.insert(backends.index("onnxruntime") + 1, "onnxruntime-fp32")
    # torch first: the reference for the agreement check and the ratios.
    backends = sorted(backends, key=lambda b: b != "torch")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                       else [])
    peak = {d.type: matmul_peak_gflops(d) for d in devices}
    report: dict[str, Any] = {**metadata(), "matmul_peak_gflops_fp32": peak,
                              "warmup": args.warmup, "repeats": args.repeats, "cases": {}}
    cases = {"ceph": ceph_case, "ct": ct_case}
    for name in args.cases:
        repeats = args.repeats if name == "ceph" else max(3, args.repeats // 4)
        report["cases"][name] = run_case(cases[name], backends, args.warmup, repeats, peak)
    report["peak_rss_mb"] = peak_rss_mb()
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
