"""Training step time of the shipped recipes: float32 vs channels-last vs bfloat16.

For each case (the networks of a shipped training configuration at its training patch and
crop sizes and batch size, random inputs and targets: the step time does not depend on
the data), one full optimisation step of the global network and one of the local
networks, as ``fastlmk train`` takes them (``fastlmk.train.network_loss``: forward,
loss, backward, AdamW step), in three settings:

* ``float32``: contiguous (NCHW) weights and activations, float32;
* ``float32-channels-last``: the ``[train]`` default, same arithmetic in another memory
  order;
* ``bfloat16``: channels-last with the forward pass under bfloat16 autocast
  (``precision = "bfloat16"``; weights, optimiser and loss stay float32).

The settings take turns within each repeat (seeded shuffled order) so that a shared
machine's drifts hit them alike; after warm-up: median, p90 of each, the ratio of the
medians to ``float32`` and the projected time of the configuration's iteration count.
Data loading and augmentation are not included (about 2 % of a step in a profile of the
ISBI recipe).

    python benchmarks/train_step.py --out benchmarks/results/train_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fastlmk.model import LandmarkModel
from fastlmk.networks import LandmarkFCN
from fastlmk.targets import LossWeights
from fastlmk.train import _model_config, load_training_config, network_loss
from latency import metadata, stats

ROOT = Path(__file__).resolve().parents[1]
# name, configuration, number of landmarks (the data's, not stated in the configuration)
CASES = {
    "isbi2015": (ROOT / "configs" / "isbi2015.toml", 19),
    "afids-mni152": (ROOT / "configs" / "afids-mni152.toml", 32),
}
SETTINGS: dict[str, tuple[torch.memory_format | None, torch.dtype | None]] = {
    "float32": (None, None),
    "float32-channels-last": (torch.channels_last, None),
    "bfloat16": (torch.channels_last, torch.bfloat16),
}


class _Step:
    """One network, its optimiser and a fixed random batch in one setting."""

    def __init__(self, net: LandmarkFCN, x: torch.Tensor, target: torch.Tensor,
                 setting: str) -> None:
        fmt, self.dtype = SETTINGS[setting]
        if fmt is not None and net.dim == 3:
            fmt = torch.channels_last_3d
        self.fmt = fmt or torch.contiguous_format
        self.net = net.to(memory_format=self.fmt).train()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=1e-4)
        self.x, self.target = x, target

    def __call__(self) -> float:
        t = time.perf_counter()
        loss, _ = network_loss(self.net, self.x, self.target, LossWeights(), self.dtype,
                               self.fmt)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return (time.perf_counter() - t) * 1e3


def case_steps(config_path: Path, n_landmarks: int) -> tuple[dict[str, dict[str, _Step]],
                                                               dict[str, Any]]:
    cfg = load_training_config(config_path)
    dim = len(cfg["global"]["spacing"])
    config = _model_config(cfg, dim, [f"L{i}" for i in range(n_landmarks)])
    batch = int(cfg.get("train", {}).get("batch_size", 8))
    gen = torch.Generator().manual_seed(0)
    shapes: dict[str, tuple[int, ...]] = {}
    steps: dict[str, dict[str, _Step]] = {}
    # (stage, input channels, input size): the global network sees one image channel, the
    # grouped local network one crop per landmark.
    stages = [("global", 1, tuple(cfg["global"]["patch_size"]))]
    if config.local_stage is not None:
        stages.append(("local", n_landmarks, tuple(config.local_stage.crop_size)))
    for name, channels, size in stages:
        x = torch.randn((batch, channels, *size), generator=gen)
        target = torch.rand((batch, n_landmarks, dim), generator=gen) * torch.tensor(size)
        shapes[name] = tuple(x.shape)
        steps[name] = {}
        for setting in SETTINGS:
            torch.manual_seed(0)
            model = LandmarkModel.create(config)
            net = model.global_net if name == "global" else model.local_net
            assert isinstance(net, LandmarkFCN)
            steps[name][setting] = _Step(net, x, target, setting)
    info = {"config": str(config_path.relative_to(ROOT)), "landmarks": n_landmarks,
            "batch_size": batch, "input_shapes": shapes,
            "iterations": int(cfg.get("train", {}).get("iterations", 1000)),
            "global_from": "global_from" in cfg.get("train", {})}
    return steps, info


def run_case(name: str, repeats: int, warmup: int) -> dict[str, Any]:
    config_path, n_landmarks = CASES[name]
    steps, info = case_steps(config_path, n_landmarks)
    order = list(SETTINGS)
    rng = random.Random(0)
    times: dict[str, dict[str, list[float]]] = {n: {s: [] for s in SETTINGS} for n in steps}
    for rep in range(warmup + repeats):
        rng.shuffle(order)
        for setting in order:
            for stage_name, by_setting in steps.items():
                ms = by_setting[setting]()
                if rep >= warmup:
                    times[stage_name][setting].append(ms)
    result: dict[str, Any] = {**info, "settings": {}}
    for setting in SETTINGS:
        per_stage = {n: stats(times[n][setting]) for n in steps}
        trained = [n for n in steps if not (n == "global" and info["global_from"])]
        step_ms = float(np.sum([per_stage[n]["median_ms"] for n in trained]))
        result["settings"][setting] = {
            "stages": per_stage,
            "step_median_ms": step_ms,
            "projected_training_min": step_ms * info["iterations"] / 60e3,
        }
    base = result["settings"]["float32"]
    for r in result["settings"].values():
        r["speedup_vs_float32"] = base["step_median_ms"] / r["step_median_ms"]
        for n in steps:
            r["stages"][n]["speedup_vs_float32"] = (
                base["stages"][n]["median_ms"] / r["stages"][n]["median_ms"])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = {"meta": metadata(), "repeats": args.repeats, "warmup": args.warmup,
              "threads": torch.get_num_threads(), "cases": {}}
    for name in args.cases:
        report["cases"][name] = r = run_case(name, args.repeats, args.warmup)
        print(f"{name} (batch {r['batch_size']}, {r['iterations']} iterations)")
        for setting, s in r["settings"].items():
            stages = "  ".join(f"{n} {v['median_ms']:.0f} ms" for n, v in s["stages"].items())
            print(f"  {setting:22s} {stages}  step {s['step_median_ms']:.0f} ms "
                  f"x{s['speedup_vs_float32']:.2f}  ~{s['projected_training_min']:.0f} min")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
