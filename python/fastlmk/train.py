"""Training of the global and local networks from images + landmark files.

``fastlmk train --config FILE`` (TOML) or :func:`train` with a dict of the same shape::

    name = "my-model"
    output = "runs/my-model"            # model directory (checkpoints in output/checkpoint)
    [data]
    images = "images/"                  # a directory (every image file in it) or a glob
    landmarks = ["senior.csv", "junior.csv"]   # CSV image,landmark,x,y[,z] in LPS mm
    annotator = "mean"                  # "mean" of the files, or a file index / file stem
    split = "split.csv"                 # image,split ; optional
    train_split = "train"               # rows used for training
    val_split = "val"                   # rows used for validation, if present in the file
    val_fraction = 0.1                  # otherwise this fraction of the training rows
    spacing = 0.1                       # pixel spacing (mm) for 2D files that carry none
    [global]
    spacing = [1.0, 1.0]                # working spacing (mm), (x, y[, z])
    network = { channels = [16, 32, 64, 64], blocks = [1, 1, 2, 1], pools = 3 }
    patch_size = [256, 256]             # training patch (working pixels, array order)
    [local]                             # omit for a global-only model
    spacing = [0.2, 0.2]
    crop_size = [64, 64]
    network = { channels = [16, 32, 32], blocks = [1, 1, 1], pools = 1 }
    offset_sigma_mm = 2.0               # random offset of training crops from the truth
    [augment]
    rotation_deg = 10.0
    scale = 0.05                        # +- relative scaling
    translation_mm = 20.0
    intensity_scale = 0.2
    intensity_shift = 0.1
    [train]
    iterations = 2000
    batch_size = 8
    lr = 1e-3
    val_every = 200
    checkpoint_every = 200
    seed = 0
    threads = 0                         # 0: torch's default
    precision = "float32"               # or "bfloat16": convolutions in bfloat16 under
                                        # autocast (weights, optimiser and loss in float32)
    channels_last = true                # channels-last weights and activations
    global_from = "runs/other-model"    # optional: reuse (and freeze) this model's global
                                        # network; only the local networks are trained

Relative paths are relative to the configuration file. Each iteration takes one
optimisation step of the global network (unless it comes from ``global_from``) and one of
the local networks.
"""

from __future__ import annotations

import csv
import json
import math
import sys
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .calibration import calibrate_confidence
from .errors import FastlmkError
from .evaluate import mean_table
from .inference import errors_mm, localize
from .io import list_images, read_image
from .landmark_files import LandmarkTable, read_landmark_csv
from .model import (
    ConfidenceSpec,
    IntensitySpec,
    LandmarkModel,
    ModelConfig,
    StageSpec,
    as_float_tuple,
    load_model,
)
from .networks import LandmarkFCN, NetworkEnsemble, network_spec_from_dict
from .preprocess import orient, stage_image
from .sampling import sample_patches, source_to_patch
from .targets import LossWeights, landmark_loss

__all__ = ["TrainConfigError", "load_training_config", "network_loss", "train"]


# [train] precision -> autocast dtype of the network forward passes (None: plain float32).
_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,
    "bfloat16": torch.bfloat16,
}


class TrainConfigError(FastlmkError, ValueError):
    """The training configuration is invalid."""


@dataclass
class _Sample:
    image_id: str
    image: Any  # oriented SimpleITK image, kept for validation
    coarse: torch.Tensor  # (1, 1, *S) float32
    coarse_lm: torch.Tensor  # (L, D) array-order index, NaN where not annotated
    fine: torch.Tensor | None
    fine_lm: torch.Tensor | None
    truth_mm: dict[str, np.ndarray]


def load_training_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML training configuration; relative paths become absolute."""
    path = Path(path)
    try:
        cfg = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TrainConfigError(f"cannot read training config {path}: {exc}") from exc
    base = path.resolve().parent
    data = cfg.get("data", {})

    def absolute(p: str) -> str:
        return p if Path(p).is_absolute() else str(base / p)

    for key in ("images", "split"):
        if key in data:
            data[key] = absolute(data[key])
    if "landmarks" in data:
        lms = data["landmarks"]
        data["landmarks"] = [absolute(p) for p in ([lms] if isinstance(lms, str) else lms)]
    if "output" in cfg:
        cfg["output"] = absolute(cfg["output"])
    tcfg = cfg.get("train", {})
    if "global_from" in tcfg:
        tcfg["global_from"] = absolute(tcfg["global_from"])
    return cfg


def _image_files(spec: str) -> dict[str, Path]:
    """Image id -> file for a directory or a glob (:func:`fastlmk.io.list_images`)."""
    out = list_images(spec)
    if not out:
        raise TrainConfigError(f"no image files found at {spec!r}")
    return out


def _combine_annotators(files: list[str], annotator: Any) -> LandmarkTable:
    """One table from several annotators' files: their point-wise mean, or one of them."""
    tables = [read_landmark_csv(f) for f in files]
    if annotator == "mean":
        return mean_table(tables)
    stems = [Path(f).stem for f in files]
    if isinstance(annotator, int) and 0 <= annotator < len(files):
        return tables[annotator]
    if annotator in stems:
        return tables[stems.index(annotator)]
    raise TrainConfigError(
        f"annotator {annotator!r} is neither 'mean', a file index nor one of {stems}"
    )


def _split(
    ids: list[str],
    data: dict[str, Any],
    rng: np.random.Generator,
) -> tuple[list[str], list[str]]:
    split_file = data.get("split")
    train_name, val_name = data.get("train_split", "train"), data.get("val_split", "val")
    if split_file:
        with open(split_file, newline="") as f:
            rows = {r["image"]: r["split"] for r in csv.DictReader(f)}
        train = [i for i in ids if rows.get(i) == train_name]
        val = [i for i in ids if rows.get(i) == val_name]
    else:
        train, val = list(ids), []
    if not val:
        n_val = round(len(train) * float(data.get("val_fraction", 0.1)))
        order = rng.permutation(len(train))
        val = sorted(train[i] for i in order[:n_val])
        train = sorted(train[i] for i in order[n_val:])
    if not train:
        raise TrainConfigError("the split leaves no training images")
    return train, val


def _stage_from(section: dict[str, Any], dim: int, name: str) -> StageSpec:
    try:
        return StageSpec(
            spacing=as_float_tuple(section["spacing"], dim, f"[{name}] spacing"),
            network=network_spec_from_dict(section.get("network", {})),
            crop_size=tuple(int(c) for c in section.get("crop_size", ())),
            vote_min_prob=float(section.get("vote_min_prob", 0.0)),
        )
    except (KeyError, ValueError) as exc:
        raise TrainConfigError(f"invalid [{name}] section: {exc}") from exc


def _model_config(cfg: dict[str, Any], dim: int, names: list[str]) -> ModelConfig:
    gstage = _stage_from(cfg.get("global", {}), dim, "global")
    lstage = None
    if cfg.get("local"):
        lstage = _stage_from(cfg["local"], dim, "local")
        multiple = lstage.network.input_multiple
        if len(lstage.crop_size) != dim or any(c % multiple for c in lstage.crop_size):
            raise TrainConfigError(
                f"[local] crop_size must be {dim} multiples of the local "
                f"network stride {multiple}"
            )
    final = lstage or gstage
    cell_mm = float(np.mean(final.spacing)) * final.network.stride
    extent = (
        (np.array(lstage.crop_size) * np.array(lstage.spacing[::-1])).min() / 2
        if lstage
        else 10 * cell_mm
    )
    intensity = IntensitySpec.from_dict(cfg.get("intensity", {}))
    return ModelConfig(
        name=str(cfg.get("name", "model")),
        dim=dim,
        landmarks=tuple(names),
        global_stage=gstage,
        local_stage=lstage,
        intensity=intensity,
        confidence=ConfidenceSpec(
            min_weight=0.05, max_spread_mm=float(extent), spread_scale_mm=cell_mm
        ),
        orientation=str(cfg.get("orientation", "LPS")),
        description=str(cfg.get("description", "")),
    )


def _landmark_names(table: LandmarkTable, ids: list[str], log: Callable[[str], None]) -> list[str]:
    """Every landmark name of the training images, in order of first appearance.

    Names annotated on only some images are legitimate (partly annotated data trains
    with the missing points left out) but are also what a misspelt name looks like, so
    they are reported.
    """
    counts: dict[str, int] = {}
    for image_id in ids:
        for name in table[image_id]:
            counts[name] = counts.get(name, 0) + 1
    partial = [f"{n!r} on {c} of {len(ids)}" for n, c in counts.items() if c < len(ids)]
    if partial:
        log(
            "warning: landmarks not annotated on every image (check the spelling if this "
            f"is unexpected): {'; '.join(partial[:10])}"
        )
    return list(counts)


def _prepare(
    image_ids: list[str],
    files: dict[str, Path],
    table: dict[str, dict[str, np.ndarray]],
    config: ModelConfig,
    spacing: Any,
    log: Callable[[str], None],
) -> list[_Sample]:
    out = []
    outside: list[str] = []
    t0 = time.perf_counter()
    for image_id in image_ids:
        img = orient(read_image(files[image_id], spacing=spacing), config.orientation)
        if img.GetDimension() != config.dim:
            raise TrainConfigError(
                f"image {image_id} is {img.GetDimension()}D; the landmarks are {config.dim}D"
            )
        truth = {n: p for n, p in table[image_id].items() if n in config.landmarks}
        for name, point in list(truth.items()):
            index = img.TransformPhysicalPointToContinuousIndex([float(v) for v in point])
            if not all(-0.5 <= i <= n - 0.5 for i, n in zip(index, img.GetSize(), strict=True)):
                # Trained on, it would teach a position the image does not show; it is
                # left out like an unannotated point, and counted (see _check_outside).
                outside.append(f"{image_id}/{name}")
                del truth[name]
        pts = np.array([truth.get(n, np.full(config.dim, np.nan)) for n in config.landmarks])
        coarse, value_range = stage_image(img, config.global_stage.spacing, None, config.intensity)
        sample = _Sample(
            image_id,
            img,
            torch.from_numpy(coarse.array)[None, None],
            torch.from_numpy(coarse.physical_to_index(pts)).float(),
            None,
            None,
            truth,
        )
        if config.local_stage is not None:
            fine, _ = stage_image(img, config.local_stage.spacing, value_range, config.intensity)
            sample.fine = torch.from_numpy(fine.array)[None, None]
            sample.fine_lm = torch.from_numpy(fine.physical_to_index(pts)).float()
        out.append(sample)
    trained = set(config.landmarks)
    _check_outside(outside, sum(len(trained & set(table[i])) for i in image_ids), log)
    log(f"prepared {len(out)} images in {time.perf_counter() - t0:.1f} s")
    return out


def _check_outside(outside: list[str], total: int, log: Callable[[str], None]) -> None:
    """Warn about annotated points outside their image; refuse when they are common.

    A few can be genuine (a structure cut off by the field of view); many mean the
    coordinates are in another convention (pixels instead of mm, RAS instead of LPS).
    """
    if not outside:
        return
    if len(outside) > max(1, total // 10):
        raise TrainConfigError(
            f"{len(outside)} of {total} annotated points lie outside their images (e.g. "
            f"{', '.join(outside[:3])}); landmark files must hold LPS coordinates in mm "
            "(pixel index x spacing for 2D image files), check the convention"
        )
    log(
        f"warning: {len(outside)} annotated point(s) outside their image left out of "
        f"training: {', '.join(outside[:10])}"
    )


def network_loss(
    net: LandmarkFCN | NetworkEnsemble,
    x: torch.Tensor,
    target: torch.Tensor,
    weights: LossWeights,
    autocast_dtype: torch.dtype | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss of one network on one batch.

    An ensemble's members are trained independently, each on its own grid: the loss is
    the sum of theirs (the logged parts are averaged).

    Args:
        net: The network (its weights in ``memory_format``).
        x: ``(B, C, *S)`` input patches, spatial axes in array order.
        target: ``(B, L, D)`` true positions, continuous patch index, array order.
        weights: Loss weighting.
        autocast_dtype: Run the forward pass under autocast to this dtype (None: as is);
            the outputs are cast back to float32 before the loss.
        memory_format: Memory format of the input (that of the weights).

    Returns:
        ``(loss, parts)``: the scalar loss and its float components for logging.
    """
    members = list(net.members) if isinstance(net, NetworkEnsemble) else [net]
    total = torch.zeros((), device=x.device)
    parts: dict[str, float] = {}
    x = x.contiguous(memory_format=memory_format)
    for member in members:
        assert isinstance(member, LandmarkFCN)
        if autocast_dtype is None:
            logits, disp = member(x)
        else:
            with torch.autocast(x.device.type, dtype=autocast_dtype):
                logits, disp = member(x)
            logits, disp = logits.float(), disp.float()
        loss, p = landmark_loss(logits, disp, target, member.stride, weights)
        total = total + loss
        for k, v in p.items():
            parts[k] = parts.get(k, 0.0) + v / len(members)
    return total, parts


def _random_matrices(n: int, dim: int, aug: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    """``(n, D, D)`` random rotation x isotropic scaling (array-order axes)."""
    max_rot = math.radians(float(aug.get("rotation_deg", 0.0)))
    scale = 1.0 + float(aug.get("scale", 0.0)) * (2 * torch.rand(n, generator=gen) - 1)
    if dim == 2:
        a = max_rot * (2 * torch.rand(n, generator=gen) - 1)
        c, s = torch.cos(a), torch.sin(a)
        rot = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)
    else:
        rot = torch.eye(3).repeat(n, 1, 1)
        for i, j in ((0, 1), (1, 2), (0, 2)):
            a = max_rot * (2 * torch.rand(n, generator=gen) - 1)
            g = torch.eye(3).repeat(n, 1, 1)
            g[:, i, i], g[:, j, j] = torch.cos(a), torch.cos(a)
            g[:, i, j], g[:, j, i] = -torch.sin(a), torch.sin(a)
            rot = g @ rot
    return rot * scale[:, None, None]


def _intensity(x: torch.Tensor, aug: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    view = (b,) + (1,) * (x.dim() - 1)
    a = 1.0 + float(aug.get("intensity_scale", 0.0)) * (2 * torch.rand(view, generator=gen) - 1)
    s = float(aug.get("intensity_shift", 0.0)) * (2 * torch.rand(view, generator=gen) - 1)
    return x * a + s


def _stack(images: list[torch.Tensor]) -> torch.Tensor | None:
    """``(N, 1, *S)`` when all images have one size (batched sampling), else None."""
    if len({tuple(im.shape) for im in images}) != 1:
        return None
    return torch.cat(images)


class _Trainer:
    def __init__(self, cfg: dict[str, Any], log: Callable[[str], None]) -> None:
        self.cfg, self.log = cfg, log
        data = cfg.get("data", {})
        for key in ("images", "landmarks"):
            if key not in data:
                raise TrainConfigError(f"[data] needs '{key}'")
        tcfg = cfg.get("train", {})
        self.iterations = int(tcfg.get("iterations", 1000))
        self.batch_size = int(tcfg.get("batch_size", 8))
        self.val_every = int(tcfg.get("val_every", 200))
        self.ckpt_every = int(tcfg.get("checkpoint_every", 200))
        self.seed = int(tcfg.get("seed", 0))
        if self.iterations < 1 or self.batch_size < 1:
            raise TrainConfigError("[train] iterations and batch_size must be >= 1")
        if int(tcfg.get("threads", 0)) > 0:
            torch.set_num_threads(int(tcfg["threads"]))
        precision = str(tcfg.get("precision", "float32"))
        if precision not in _AUTOCAST_DTYPES:
            raise TrainConfigError(
                f"[train] precision must be one of {sorted(_AUTOCAST_DTYPES)}, not {precision!r}"
            )
        self.precision = precision
        self.autocast_dtype = _AUTOCAST_DTYPES[precision]
        self.channels_last = bool(tcfg.get("channels_last", True))
        self.aug = cfg.get("augment", {})
        self.output = Path(cfg.get("output", "model"))

        torch.manual_seed(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        files = _image_files(str(data["images"]))
        table = _combine_annotators(list(data["landmarks"]), data.get("annotator", "mean"))
        ids = [i for i in files if i in table]
        missing = sorted(set(table) - set(files))
        if missing:
            log(f"warning: {len(missing)} annotated images have no image file (e.g. {missing[0]})")
        if not ids:
            raise TrainConfigError("no image has both an image file and landmarks")
        names = list(cfg.get("landmarks") or _landmark_names(table, ids, log))
        dim = len(next(iter(table[ids[0]].values())))
        self.config = _model_config(cfg, dim, names)
        train_ids, val_ids = _split(ids, data, rng)
        log(
            f"{len(train_ids)} training and {len(val_ids)} validation images, {len(names)} "
            f"landmarks, {dim}D"
        )
        self.train = _prepare(train_ids, files, table, self.config, data.get("spacing"), log)
        self.val = _prepare(val_ids, files, table, self.config, data.get("spacing"), log)

        self.model = LandmarkModel.create(self.config)
        if self.channels_last:
            self.memory_format = (
                torch.channels_last if self.config.dim == 2 else torch.channels_last_3d
            )
            # Module.to(memory_format=...) exists at run time; torch's stubs omit it.
            self.model.global_net.to(memory_format=self.memory_format)  # type: ignore[call-overload]
            if self.model.local_net is not None:
                self.model.local_net.to(memory_format=self.memory_format)  # type: ignore[call-overload]
        else:
            self.memory_format = torch.contiguous_format
        lr = float(tcfg.get("lr", 1e-3))
        wd = float(tcfg.get("weight_decay", 1e-4))
        self.global_from = tcfg.get("global_from")
        self.gopt: torch.optim.Optimizer | None = None
        if self.global_from:
            self._reuse_global(str(self.global_from))
        else:
            self.gopt = torch.optim.AdamW(
                self.model.global_net.parameters(), lr=lr, weight_decay=wd
            )
        self.lopt = (
            None
            if self.model.local_net is None
            else torch.optim.AdamW(self.model.local_net.parameters(), lr=lr, weight_decay=wd)
        )
        self.lr = lr
        self.loss_weights = LossWeights(
            pos_weight=float(tcfg.get("pos_weight", 20.0)),
            regression=float(tcfg.get("regression_weight", 1.0)),
        )
        gsec = cfg.get("global", {})
        stride = self.config.global_stage.network.stride
        if "patch_size" in gsec:
            self.patch = tuple(int(p) for p in gsec["patch_size"])
        else:
            biggest = np.max([s.coarse.shape[2:] for s in self.train], axis=0)
            self.patch = tuple(int(math.ceil(n / stride) * stride) for n in biggest)
        if len(self.patch) != dim or any(p % stride for p in self.patch):
            raise TrainConfigError(
                f"[global] patch_size {self.patch} must be {dim} multiples of "
                f"the global stride {stride}"
            )
        self.coarse_stack = _stack([s.coarse for s in self.train])
        self.fine_stack = (
            _stack([s.fine for s in self.train])  # type: ignore[misc]
            if self.config.local_stage is not None
            else None
        )
        for i, s in enumerate(self.train):  # keep one copy of each image in memory
            if self.coarse_stack is not None:
                s.coarse = self.coarse_stack[i : i + 1]
            if self.fine_stack is not None:
                s.fine = self.fine_stack[i : i + 1]
        lsec = cfg.get("local") or {}
        self.offset_sigma_mm = float(lsec.get("offset_sigma_mm", 2.0))
        self.start = 0
        self.seconds_before = 0.0  # training time of earlier runs this one resumes
        self.t0 = time.perf_counter()
        self.history: list[dict[str, Any]] = []

    def _reuse_global(self, source: str) -> None:
        """Take the global network of an existing model, frozen (no optimiser step, batch
        norm statistics kept)."""
        if self.model.local_net is None:
            raise TrainConfigError("[train] global_from needs a [local] stage to train")
        other = load_model(source)
        mine = self.config
        if tuple(other.names) != tuple(mine.landmarks) or other.dim != mine.dim:
            raise TrainConfigError(
                f"[train] global_from: {source} has landmarks {other.names} ({other.dim}D); "
                f"this configuration has {mine.landmarks} ({mine.dim}D)"
            )
        if other.config.global_stage != mine.global_stage:
            raise TrainConfigError(
                f"[train] global_from: the [global] section must match the global stage of "
                f"{source}: {other.config.global_stage} != {mine.global_stage}"
            )
        if other.config.intensity != mine.intensity:
            raise TrainConfigError(f"[train] global_from: {source} normalises differently")
        self.model.global_net.load_state_dict(other.global_net.state_dict())
        self.model.global_net.eval()
        for p in self.model.global_net.parameters():
            p.requires_grad_(False)
        self.log(f"global network taken from {source} (not trained)")

    # -- one optimisation step per stage ------------------------------------------------
    def _lr(self, it: int) -> float:
        warm = min(1.0, (it + 1) / 50)
        return self.lr * warm * 0.5 * (1 + math.cos(math.pi * it / self.iterations))

    def _images(self, idx: torch.Tensor, fine: bool) -> torch.Tensor | list[torch.Tensor]:
        """The batch's images: one ``(B, 1, *S)`` tensor when all have one size."""
        stack = self.fine_stack if fine else self.coarse_stack
        if stack is not None:
            return stack[idx]
        return [self.train[i].fine if fine else self.train[i].coarse for i in idx.tolist()]

    def _sample(
        self,
        images: torch.Tensor | list[torch.Tensor],
        centres: torch.Tensor,
        size: tuple[int, ...],
        mats: torch.Tensor,
    ) -> torch.Tensor:
        if isinstance(images, torch.Tensor):
            return sample_patches(images, centres, size, mats)
        return torch.cat(
            [
                sample_patches(im, centres[b : b + 1], size, mats[b : b + 1])
                for b, im in enumerate(images)
            ]
        )

    def _loss(
        self, net: LandmarkFCN | NetworkEnsemble, x: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return network_loss(
            net, x, target, self.loss_weights, self.autocast_dtype, self.memory_format
        )

    def _global_step(self, idx: torch.Tensor) -> dict[str, float]:
        dim, b = self.config.dim, len(idx)
        trans_px = float(self.aug.get("translation_mm", 0.0)) / torch.tensor(
            self.config.global_stage.spacing[::-1], dtype=torch.float32
        )
        mats = _random_matrices(b, dim, self.aug, self.gen)[:, None]  # (B, 1, D, D)
        shapes = torch.tensor(
            [self.train[i].coarse.shape[2:] for i in idx.tolist()], dtype=torch.float32
        )
        centres = (shapes - 1) / 2 + trans_px * (2 * torch.rand(b, dim, generator=self.gen) - 1)
        x = self._sample(self._images(idx, fine=False), centres[:, None], self.patch, mats)
        truth = torch.stack([self.train[i].coarse_lm for i in idx.tolist()])  # (B, L, D)
        n_lm = truth.shape[1]
        lms = source_to_patch(
            truth, centres[:, None].expand(b, n_lm, dim), self.patch, mats.expand(b, n_lm, dim, dim)
        )
        x = _intensity(x, self.aug, self.gen)
        loss, parts = self._loss(self.model.global_net, x, lms)
        assert self.gopt is not None
        self.gopt.zero_grad(set_to_none=True)
        loss.backward()
        self.gopt.step()
        return parts

    def _local_step(self, idx: torch.Tensor) -> dict[str, float]:
        assert self.model.local_net is not None and self.lopt is not None
        stage = self.config.local_stage
        assert stage is not None
        dim, n_lm = self.config.dim, len(self.config.landmarks)
        sigma_px = self.offset_sigma_mm / torch.tensor(stage.spacing[::-1], dtype=torch.float32)
        b = len(idx)
        truth = torch.stack([self.train[i].fine_lm for i in idx.tolist()])
        centres = (
            torch.nan_to_num(truth, nan=0.0)
            + torch.randn(b, n_lm, dim, generator=self.gen) * sigma_px
        )
        mats = _random_matrices(b * n_lm, dim, self.aug, self.gen).reshape(b, n_lm, dim, dim)
        x = self._sample(self._images(idx, fine=True), centres, stage.crop_size, mats)
        target = source_to_patch(truth, centres, stage.crop_size, mats)  # (B, L, D)
        x = _intensity(x, self.aug, self.gen)
        # Group l of the local network sees crop l and predicts landmark l only.
        loss, parts = self._loss(self.model.local_net, x, target)
        self.lopt.zero_grad(set_to_none=True)
        loss.backward()
        self.lopt.step()
        return parts

    # -- validation, checkpoints --------------------------------------------------------
    def validate(self) -> dict[str, float]:
        if not self.val:
            return {}
        self._set_training(False)
        errs = []
        for s in self.val:
            errs.append(errors_mm(localize(s.image, self.model, backend="torch"), s.truth_mm))
        self._set_training(True)
        e = np.concatenate(errs)
        return {"val_mre_mm": float(np.nanmean(e)), "val_median_mm": float(np.nanmedian(e))}

    def _calibrate(self) -> None:
        """Flag thresholds from the trained model's votes (see fastlmk.calibration).

        On the validation images when there are any: on training images the votes are
        surer than on new ones. Without validation images, on up to 50 training images
        (the thresholds' margin covers part of that difference).
        """
        samples = self.val or self.train[:50]
        result = calibrate_confidence(self.model, [s.image for s in samples], backend="torch")
        self.model.config = replace(self.model.config, confidence=result.spec)
        self.model.config.metadata["confidence_calibration"] = result.to_dict()
        c = result.spec
        self.log(
            f"flag thresholds from {result.images} images: stage vote weight "
            f"{c.min_weight:.3g}..{c.max_weight:.3g}, spread <= {c.max_spread_mm:.3g} mm"
        )

    def _set_training(self, training: bool) -> None:
        self.model.global_net.train(training and self.gopt is not None)
        if self.model.local_net is not None:
            self.model.local_net.train(training)

    def _ckpt_dir(self) -> Path:
        return self.output / "checkpoint"

    def _seconds(self) -> float:
        """Training time so far, earlier runs that this one resumed included."""
        return self.seconds_before + time.perf_counter() - self.t0

    def save_checkpoint(self, iteration: int) -> None:
        d = self._ckpt_dir()
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        for prefix, net, opt in (
            ("global", self.model.global_net, self.gopt),
            ("local", self.model.local_net, self.lopt),
        ):
            if net is None or opt is None:
                continue
            for k, v in net.state_dict().items():
                tensors[f"{prefix}.net.{k}"] = v.detach().contiguous()
            for pid, st in opt.state_dict()["state"].items():
                for k, v in st.items():
                    tensors[f"{prefix}.opt.{pid}.{k}"] = torch.as_tensor(v).contiguous()
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.gen"] = self.gen.get_state()
        tmp = d / "state.safetensors.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(d / "state.safetensors")
        (d / "state.json").write_text(
            json.dumps(
                {"iteration": iteration, "seconds": self._seconds(), "history": self.history},
                indent=1,
            )
        )

    def load_checkpoint(self) -> None:
        d = self._ckpt_dir()
        if not (d / "state.safetensors").is_file():
            raise TrainConfigError(f"--resume: no checkpoint in {d}")
        tensors = load_file(str(d / "state.safetensors"))
        meta = json.loads((d / "state.json").read_text())
        for prefix, net, opt in (
            ("global", self.model.global_net, self.gopt),
            ("local", self.model.local_net, self.lopt),
        ):
            if net is None or opt is None:
                continue
            net.load_state_dict(
                {
                    k[len(prefix) + 5 :]: v
                    for k, v in tensors.items()
                    if k.startswith(f"{prefix}.net.")
                }
            )
            sd = opt.state_dict()
            state: dict[int, dict[str, torch.Tensor]] = {}
            for k, v in tensors.items():
                if k.startswith(f"{prefix}.opt."):
                    pid, name = k[len(prefix) + 5 :].split(".", 1)
                    state.setdefault(int(pid), {})[name] = v
            sd["state"] = state
            opt.load_state_dict(sd)
            # The checkpoint holds plain contiguous tensors; keep the moments in the
            # parameters' memory format so that the optimiser step stays dense.
            for p in net.parameters():
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor) and v.shape == p.shape and v.dim() >= 4:
                        opt.state[p][k] = v.contiguous(memory_format=self.memory_format)
        torch.set_rng_state(tensors["rng.torch"])
        self.gen.set_state(tensors["rng.gen"])
        self.start = int(meta["iteration"])
        self.seconds_before = float(meta.get("seconds", 0.0))
        self.history = list(meta.get("history", []))
        self.log(f"resumed from {d} at iteration {self.start}")

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> Path:
        self._set_training(True)
        n = len(self.train)
        self.t0 = t0 = time.perf_counter()
        tty = sys.stderr.isatty()
        last_val: dict[str, float] = {}
        for it in range(self.start, self.iterations):
            lr = self._lr(it)
            for opt in (self.gopt, self.lopt):
                if opt is not None:
                    for group in opt.param_groups:
                        group["lr"] = lr
            idx = torch.randint(n, (self.batch_size,), generator=self.gen)
            parts: dict[str, float] = {}
            if self.gopt is not None:
                parts.update({f"g_{k}": v for k, v in self._global_step(idx).items()})
            if self.model.local_net is not None:
                parts.update({f"l_{k}": v for k, v in self._local_step(idx).items()})
            done = it + 1
            if done % self.val_every == 0 or done == self.iterations:
                last_val = self.validate()
                self.history.append({"iteration": done, **parts, **last_val})
            if done % self.ckpt_every == 0 or done == self.iterations:
                self.save_checkpoint(done)
            rate = (done - self.start) / max(time.perf_counter() - t0, 1e-9)
            msg = (
                f"[{done:>6d}/{self.iterations}] "
                + " ".join(f"{k} {v:.4f}" for k, v in parts.items())
                + "".join(f" | {k} {v:.3f}" for k, v in last_val.items())
                + f" | {rate:.2f} it/s"
            )
            if tty:
                print("\r" + msg, end="", file=sys.stderr, flush=True)
            elif done % max(1, min(self.val_every, 50)) == 0 or done == self.iterations:
                self.log(msg)
        if tty:
            print(file=sys.stderr)
        elapsed = self._seconds()
        self._set_training(False)
        self._calibrate()
        self.model.config.metadata.update(
            {
                "training": {
                    "iterations": self.iterations,
                    "seconds": round(elapsed, 1),
                    "train_images": [s.image_id for s in self.train],
                    "val_images": [s.image_id for s in self.val],
                    "seed": self.seed,
                    "precision": self.precision,
                    "channels_last": self.channels_last,
                    "final_validation": last_val,
                    **({"global_from": str(self.global_from)} if self.global_from else {}),
                },
            }
        )
        self.model.save(self.output)
        (self.output / "training_log.json").write_text(json.dumps(self.history, indent=1))
        self.log(f"model written to {self.output} ({elapsed:.1f} s of training)")
        return self.output


def train(
    config: dict[str, Any] | str | Path,
    *,
    output: str | Path | None = None,
    resume: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train a model.

    Args:
        config: A training configuration dict (see the module docstring) or a TOML file.
        output: Model directory; overrides ``config["output"]``.
        resume: Continue from ``output/checkpoint`` (same config).
        log: Receives progress lines; defaults to printing to stderr.

    Returns:
        The model directory (``model.json`` + safetensors weights).
    """
    cfg = load_training_config(config) if isinstance(config, str | Path) else dict(config)
    if output is not None:
        cfg["output"] = str(output)

    def _stderr(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    trainer = _Trainer(cfg, log or _stderr)
    if resume:
        trainer.load_checkpoint()
    return trainer.run()
