"""Fused vote kernel vs the array expressions it replaces.

CPU: ``fastlmk.ops.vote`` on numpy input vs the same vote written as plain numpy
(float64, the way the reference implementation computes it). CUDA (when available and
compiled): the CUDA kernel vs the equivalent torch expression on the GPU, with
``torch.cuda.synchronize()`` inside every timed call. Results are checked for agreement
before anything is timed.

    python benchmarks/vote_bench.py [--out benchmarks/results/vote_cpu.json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fastlmk import _C
from fastlmk.ops import vote

CASES = [
    # name, L, grid, stride, origin, min_prob
    ("2d-ceph-L19-75x60", 19, (75, 60), 32.0, 15.5, 0.0),
    ("3d-L32-64^3", 32, (64, 64, 64), 4.0, 1.5, 0.0),
    ("3d-L32-64^3-min_prob", 32, (64, 64, 64), 4.0, 1.5, 0.05),
]
TRANSFORM = "signed_log10"


def make_inputs(n_landmarks: int, grid: tuple[int, ...], seed: int = 0):
    rng = np.random.default_rng(seed)
    prob = (rng.random((n_landmarks, *grid)) ** 8).astype(np.float32)
    disp = rng.normal(0.0, 1.0, (n_landmarks, len(grid), *grid)).astype(np.float32)
    return prob, disp


def numpy_vote(prob, disp, stride, origin, min_prob):
    """The vote as a user would write it with numpy (float64 sums)."""
    n_landmarks, *grid = prob.shape
    dims = len(grid)
    axes = [origin + stride * np.arange(n) for n in grid]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"))
    d = np.sign(disp) * (10.0 ** np.abs(disp.astype(np.float64)) - 1.0)
    votes = (centres + d).reshape(n_landmarks, dims, -1)
    w = np.where((prob > 0) & (prob >= min_prob), prob, 0.0)
    w = w.reshape(n_landmarks, -1).astype(np.float64)
    weight = w.sum(-1)
    position = np.einsum("lc,ldc->ld", w, votes) / weight[:, None]
    r2 = ((votes - position[:, :, None]) ** 2).sum(1)
    spread = np.sqrt((w * r2).sum(-1) / weight)
    return position, weight, spread


def torch_vote(prob, disp, centres, min_prob):
    """The same expression in torch on the input's device (centres precomputed)."""
    n_landmarks, dims = disp.shape[:2]
    t = disp.double()
    votes = (centres + torch.sign(t) * torch.expm1(t.abs() * math.log(10.0)))
    votes = votes.reshape(n_landmarks, dims, -1)
    p = prob.double().reshape(n_landmarks, -1)
    w = torch.where((p > 0) & (p >= min_prob), p, torch.zeros_like(p))
    weight = w.sum(-1)
    position = torch.einsum("lc,ldc->ld", w, votes) / weight[:, None]
    r2 = ((votes - position[:, :, None]) ** 2).sum(1)
    spread = torch.sqrt((w * r2).sum(-1) / weight)
    return position, weight, spread


def time_it(fn: Callable[[], Any], warmup: int, repeats: int,
            sync: Callable[[], None] | None = None) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - start)
    ms = np.array(times) * 1e3
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "min_ms": float(ms.min()), "repeats": repeats}


def check_close(name: str, got, expected) -> None:
    for g, e, what in zip(got, expected, ("position", "weight", "spread"), strict=True):
        g = g.cpu().numpy() if isinstance(g, torch.Tensor) else np.asarray(g)
        e = e.cpu().numpy() if isinstance(e, torch.Tensor) else np.asarray(e)
        if not np.allclose(g, e, rtol=1e-6, atol=1e-6, equal_nan=True):
            raise SystemExit(f"{name}: {what} differs from the reference; not timing it")


def metadata() -> dict[str, Any]:
    def version(pkg: str) -> str:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return str(getattr(sys.modules.get(pkg), "__version__", "not installed"))

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "csrc"], cwd=root,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    meta: dict[str, Any] = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count()},
        "versions": {"python": sys.version.split()[0], "numpy": np.__version__,
                     "torch": torch.__version__, "fastlmk": version("fastlmk")},
        "git_commit": commit,
        "csrc_dirty": dirty,
        "cuda_compiled": _C.cuda_compiled(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if torch.cuda.is_available():
        meta["machine"]["gpu"] = torch.cuda.get_device_name()
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vote_cpu.json"))
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()

    results = []
    for name, n_landmarks, grid, stride, origin, min_prob in CASES:
        prob, disp = make_inputs(n_landmarks, grid)
        params = {"stride": stride, "origin": origin, "transform": TRANSFORM,
                  "min_prob": min_prob}
        check_close(name, vote(prob, disp, **params),
                    numpy_vote(prob, disp, stride, origin, min_prob))
        fused = time_it(lambda p=prob, d=disp, kw=params: vote(p, d, **kw),
                        args.warmup, args.repeats)
        plain = time_it(lambda p=prob, d=disp, s=stride, o=origin, m=min_prob:
                        numpy_vote(p, d, s, o, m), args.warmup, max(5, args.repeats // 3))
        row: dict[str, Any] = {
            "case": name, "L": n_landmarks, "grid": list(grid), "transform": TRANSFORM,
            "min_prob": min_prob, "cpu_fused": fused, "cpu_numpy": plain,
            "cpu_speedup": plain["median_ms"] / fused["median_ms"],
        }
        print(f"{name:24s} cpu  fused {fused['median_ms']:8.3f} ms (p90 "
              f"{fused['p90_ms']:.3f})  numpy {plain['median_ms']:8.3f} ms (p90 "
              f"{plain['p90_ms']:.3f})  x{row['cpu_speedup']:.1f}")

        if torch.cuda.is_available() and _C.cuda_compiled():
            prob_t = torch.from_numpy(prob).cuda()
            disp_t = torch.from_numpy(disp).cuda()
            axes = [origin + stride * torch.arange(n, device="cuda", dtype=torch.float64)
                    for n in grid]
            centres = torch.stack(torch.meshgrid(*axes, indexing="ij"))
            check_close(name + " cuda", vote(prob_t, disp_t, **params),
                        torch_vote(prob_t, disp_t, centres, min_prob))
            sync = torch.cuda.synchronize
            kernel = time_it(lambda p=prob_t, d=disp_t, kw=params: vote(p, d, **kw),
                             10, args.repeats * 10, sync)
            expr = time_it(lambda p=prob_t, d=disp_t, c=centres, m=min_prob:
                           torch_vote(p, d, c, m), 10, args.repeats * 10, sync)
            row.update(cuda_fused=kernel, cuda_torch=expr,
                       cuda_speedup=expr["median_ms"] / kernel["median_ms"])
            print(f"{name:24s} cuda fused {kernel['median_ms']:8.3f} ms (p90 "
                  f"{kernel['p90_ms']:.3f})  torch {expr['median_ms']:8.3f} ms (p90 "
                  f"{expr['p90_ms']:.3f})  x{row['cuda_speedup']:.1f}")
        results.append(row)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**metadata(), "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
