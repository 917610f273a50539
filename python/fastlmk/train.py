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
                                        # network; only the local networks are trained;
                                        # a directory or a bundled model name

Relative paths are relative to the configuration file. Each iteration takes one
optimisation step of the global network (unless it comes from ``global_from``) and one of
the local networks.
"""

from __future__ import annotations

import csv
import json
import math
import os
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

from .calibration import calibrate_confidence, spread_limit_mm
from .errors import FastlmkError
from .evaluate import mean_table
from .geometry import Geometry
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
    available_models,
    load_model,
)
from .networks import LandmarkFCN, NetworkEnsemble, network_spec_from_dict
from .preprocess import orient, stage_image
from .sampling import sample_patches, source_to_patch
from .shape import fit_shape_model, grid_frame_mm
from .targets import LossWeights, landmark_loss

__all__ = ["TrainConfigError", "load_training_config", "network_loss", "train"]


# [train] precision -> autocast dtype of the network forward passes (None: plain float32).
_AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "float32": None,
    "bfloat16": torch.bfloat16,
}


class TrainConfigError(FastlmkError, ValueError):
    """The training configuration is invalid."""


def _section(cfg: dict[str, Any], name: str) -> dict[str, Any]:
    """The ``[name]`` table of the configuration (empty when absent).

    Raises:
        TrainConfigError: the value is not a table.
    """
    value = cfg.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise TrainConfigError(
            f"[{name}] must be a table of settings, got {value!r}; write it as a "
            f"[{name}] section (or a dict in the Python API)"
        )
    return value


def _number(
    section: str,
    key: str,
    value: Any,
    kind: type[int] | type[float],
    minimum: float | None = None,
    below: float | None = None,
) -> Any:
    """A numeric setting, checked for its type and range.

    Args:
        section: Configuration section, for the message (``"train"``; ``""``: top level).
        key: The setting's key.
        value: Its value.
        kind: ``int`` (an integral number: 3 or 3.0, never 2.7) or ``float`` (finite).
        minimum: Smallest allowed value, if any.
        below: The value must be smaller than this, if given.

    Returns:
        The value as ``kind``.

    Raises:
        TrainConfigError: not a number of that kind, or out of range.
    """
    where = f"[{section}] {key}" if section else key
    expected = "an integer" if kind is int else "a finite number"
    if minimum is not None:
        expected += f" >= {minimum:g}"
    if below is not None:
        expected += f" and < {below:g}"
    # bool is an int in Python, but "true" is never a meaningful count or rate.
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok and not math.isfinite(value):
        ok = False
    if ok and kind is int and not float(value).is_integer():
        ok = False
    if ok and minimum is not None and value < minimum:
        ok = False
    if ok and below is not None and value >= below:
        ok = False
    if not ok:
        raise TrainConfigError(
            f"{where} = {value!r} is invalid: expected {expected}; correct it in the "
            "training configuration"
        )
    return kind(value)


def _setting(
    table: dict[str, Any],
    section: str,
    key: str,
    default: Any,
    kind: type[int] | type[float],
    minimum: float | None = None,
    below: float | None = None,
) -> Any:
    """``table[key]`` (or ``default``) checked by :func:`_number`."""
    return _number(section, key, table.get(key, default), kind, minimum, below)


def _int_list(section: str, key: str, value: Any, minimum: int) -> list[int]:
    """A list of integers >= ``minimum`` (sizes, channel counts).

    Raises:
        TrainConfigError: not a list, or an entry that is not such an integer.
    """
    if not isinstance(value, list | tuple) or not value:
        raise TrainConfigError(
            f"[{section}] {key} = {value!r} is invalid: expected a non-empty list of "
            f"integers >= {minimum} (e.g. [16, 16]); write it as a list"
        )
    return [_number(section, f"{key} entry", v, int, minimum) for v in value]


def _bool(section: str, key: str, value: Any) -> bool:
    """A true/false setting (a string such as "no" would otherwise count as true)."""
    if not isinstance(value, bool):
        raise TrainConfigError(
            f"[{section}] {key} = {value!r} is invalid: expected true or false"
        )
    return value


def _landmark_list(value: Any) -> list[str]:
    """The top-level ``landmarks`` setting: a non-empty list of unique non-empty names.

    Raises:
        TrainConfigError: a string (which would be read letter by letter), an empty
            list, an entry that is not a non-empty string, or a repeated name.
    """
    if not isinstance(value, list | tuple) or not value:
        raise TrainConfigError(
            f"landmarks = {value!r} is invalid: expected a non-empty list of landmark "
            'names, e.g. landmarks = ["apex"]; omit it to train every annotated landmark'
        )
    bad = [v for v in value if not isinstance(v, str) or not v.strip()]
    if bad:
        raise TrainConfigError(
            f"landmarks: {bad[:5]} are not landmark names: expected non-empty strings"
        )
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
        raise TrainConfigError(
            f"landmarks lists {repeated} more than once: expected unique names; "
            "remove the repetitions"
        )
    return list(value)


def _check_annotated(names: list[str], table: LandmarkTable, train_ids: list[str]) -> None:
    """Every configured landmark must be annotated on at least one training image.

    A name that is never annotated trains on nothing, yet the model would return a
    position for it with no flag.
    """
    present: dict[str, None] = {}
    for image_id in train_ids:
        present.update(dict.fromkeys(table[image_id]))
    missing = [n for n in names if n not in present]
    if missing:
        raise TrainConfigError(
            f"landmarks {missing} are not annotated on any training image: every name "
            "in 'landmarks' must appear in the landmark files (which have e.g. "
            f"{list(present)[:5]}); correct the names or remove them"
        )


def _check_output(output: Path) -> None:
    """Refuse an output directory that cannot be created, before any training time is
    spent (it is first written at the first checkpoint)."""
    for path in (output, output / "checkpoint"):
        if path.exists() and not path.is_dir():
            raise TrainConfigError(
                f"output {path} is a file: expected a directory (new or existing); "
                "give another output path"
            )
    parent = output
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise TrainConfigError(
            f"output {output} lies below the file {parent}: expected a directory path; "
            "give another output path"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise TrainConfigError(
            f"output {output}: {parent} is not writable; give a writable output path"
        )


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
    data = _section(cfg, "data")

    def absolute(p: Any, what: str) -> str:
        if not isinstance(p, str) or not p:
            raise TrainConfigError(
                f"{what} = {p!r} is invalid: expected a path (a string); correct it in {path}"
            )
        return p if Path(p).is_absolute() else str(base / p)

    for key in ("images", "split"):
        if key in data:
            data[key] = absolute(data[key], f"[data] {key}")
    if "landmarks" in data:
        data["landmarks"] = [
            absolute(p, "[data] landmarks") for p in _landmark_files(data["landmarks"])
        ]
    if "output" in cfg:
        cfg["output"] = absolute(cfg["output"], "output")
    tcfg = _section(cfg, "train")
    source = tcfg.get("global_from")
    # A bundled model name stays a name (load_model resolves it), unless a directory of
    # that name sits next to the configuration.
    if source is not None and not (
        isinstance(source, str) and source in available_models() and not (base / source).exists()
    ):
        tcfg["global_from"] = absolute(source, "[train] global_from")
    return cfg


def _landmark_files(value: Any) -> list[Any]:
    """``[data] landmarks``: one file or a non-empty list of files."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list | tuple) or not value:
        raise TrainConfigError(
            f"[data] landmarks = {value!r} is invalid: expected a landmark file or a "
            'non-empty list of them, e.g. ["senior.csv", "junior.csv"]'
        )
    return list(value)


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


def _read_split(split_file: str, ids: list[str], log: Callable[[str], None]) -> dict[str, str]:
    """Image id -> split name from an ``image,split`` CSV file.

    Ids without an image (with landmarks) are reported: often a renamed or missing file.
    """
    try:
        with open(split_file, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            if not {"image", "split"} <= set(columns):
                raise TrainConfigError(
                    f"[data] split file {split_file} has columns {columns}: expected "
                    "'image' and 'split' columns (a header line image,split)"
                )
            rows = {r["image"]: r["split"] for r in reader}
    except OSError as exc:
        raise TrainConfigError(
            f"[data] split file {split_file} cannot be read ({exc.strerror or exc}): "
            "expected an image,split CSV file; correct the path or remove 'split'"
        ) from exc
    known = set(ids)
    unknown = [i for i in rows if i not in known]
    if unknown:
        log(
            f"warning: {len(unknown)} image id(s) of the split file {split_file} have no "
            f"image file with landmarks and are left out (e.g. {', '.join(unknown[:5])})"
        )
    return rows


def _split(
    ids: list[str],
    data: dict[str, Any],
    rng: np.random.Generator,
    log: Callable[[str], None] = lambda msg: None,
) -> tuple[list[str], list[str]]:
    split_file = data.get("split")
    train_name, val_name = data.get("train_split", "train"), data.get("val_split", "val")
    # Checked even when a split file gives the validation set: a wrong value is a
    # mistake either way.
    val_fraction = _setting(data, "data", "val_fraction", 0.1, float, 0.0, 1.0)
    if split_file:
        rows = _read_split(str(split_file), ids, log)
        train = [i for i in ids if rows.get(i) == train_name]
        val = [i for i in ids if rows.get(i) == val_name]
    else:
        train, val = list(ids), []
    if not val:
        n_val = round(len(train) * val_fraction)
        order = rng.permutation(len(train))
        val = sorted(train[i] for i in order[:n_val])
        train = sorted(train[i] for i in order[n_val:])
    if not train:
        raise TrainConfigError("the split leaves no training images")
    return train, val


def _check_network(section: str, net: Any) -> None:
    """Type checks of a ``network`` table (and of an ensemble's members), which
    :func:`network_spec_from_dict` would otherwise coerce (16.7 -> 16) or fail on with a
    bare TypeError (``channels = 16``)."""
    where = f"{section}.network"
    if not isinstance(net, dict):
        raise TrainConfigError(
            f"[{section}] network = {net!r} is invalid: expected a table such as "
            "{ channels = [16, 32], blocks = [1, 1], pools = 1 }"
        )
    if isinstance(net.get("members"), list):
        for i, member in enumerate(net["members"]):
            _check_network(f"{section}.network.members[{i}]", member)
        return
    for key in ("channels", "blocks"):
        if key in net:
            _int_list(where, key, net[key], 1 if key == "channels" else 0)
    for key in ("pools", "stem_kernel", "head_channels"):
        if key in net:
            _number(where, key, net[key], int, 1 if key == "stem_kernel" else 0)


def _stage_from(section: dict[str, Any], dim: int, name: str) -> StageSpec:
    if "spacing" not in section:
        raise TrainConfigError(
            f"[{name}] needs 'spacing': the working spacing in mm, e.g. spacing = "
            f"{[1.0] * dim}"
        )
    spacing = section["spacing"]
    values = spacing if isinstance(spacing, list | tuple) else [spacing]
    for v in values:
        _number(name, "spacing", v, float, None)
        if v <= 0:
            raise TrainConfigError(
                f"[{name}] spacing = {spacing!r} is invalid: expected spacings > 0 mm"
            )
    _check_network(name, section.get("network", {}))
    crop = section.get("crop_size", ())
    crop_size = tuple(_int_list(name, "crop_size", crop, 1)) if "crop_size" in section else ()
    vote_min_prob = _setting(section, name, "vote_min_prob", 0.0, float, 0.0, 1.0)
    try:
        return StageSpec(
            spacing=as_float_tuple(spacing, dim, f"[{name}] spacing"),
            network=network_spec_from_dict(section.get("network", {})),
            crop_size=crop_size,
            vote_min_prob=vote_min_prob,
        )
    except (KeyError, ValueError, TypeError) as exc:
        raise TrainConfigError(f"invalid [{name}] section: {exc}") from exc


def _model_config(cfg: dict[str, Any], dim: int, names: list[str]) -> ModelConfig:
    gstage = _stage_from(_section(cfg, "global"), dim, "global")
    lstage = None
    if _section(cfg, "local"):
        lstage = _stage_from(cfg["local"], dim, "local")
        multiple = lstage.network.input_multiple
        if len(lstage.crop_size) != dim or any(c % multiple for c in lstage.crop_size):
            raise TrainConfigError(
                f"[local] crop_size must be {dim} multiples of the local "
                f"network stride {multiple}"
            )
    final = lstage or gstage
    cell_mm = float(np.mean(final.spacing)) * final.network.stride
    extent = spread_limit_mm(gstage, [lstage] if lstage else [])
    try:
        intensity = IntensitySpec.from_dict(_section(cfg, "intensity"))
    except FastlmkError as exc:
        raise TrainConfigError(f"invalid [intensity] section: {exc}") from exc
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
        data = _section(cfg, "data")
        for key in ("images", "landmarks"):
            if key not in data:
                raise TrainConfigError(f"[data] needs '{key}'")
        if not isinstance(data["images"], str | Path):
            raise TrainConfigError(
                f"[data] images = {data['images']!r} is invalid: expected a directory or a "
                "glob (a string)"
            )
        landmark_files = _landmark_files(data["landmarks"])
        configured = None if cfg.get("landmarks") is None else _landmark_list(cfg["landmarks"])
        tcfg = _section(cfg, "train")
        self.iterations = _setting(tcfg, "train", "iterations", 1000, int, 1)
        self.batch_size = _setting(tcfg, "train", "batch_size", 8, int, 1)
        self.val_every = _setting(tcfg, "train", "val_every", 200, int, 1)
        self.ckpt_every = _setting(tcfg, "train", "checkpoint_every", 200, int, 1)
        self.seed = _setting(tcfg, "train", "seed", 0, int, 0)
        threads = _setting(tcfg, "train", "threads", 0, int, 0)
        # lr 0 is allowed: a run that keeps the initial weights (used to inspect them).
        lr = _setting(tcfg, "train", "lr", 1e-3, float, 0.0)
        wd = _setting(tcfg, "train", "weight_decay", 1e-4, float, 0.0)
        pos_weight = _setting(tcfg, "train", "pos_weight", 20.0, float, 0.0)
        regression_weight = _setting(tcfg, "train", "regression_weight", 1.0, float, 0.0)
        precision = tcfg.get("precision", "float32")
        if precision not in _AUTOCAST_DTYPES:
            raise TrainConfigError(
                f"[train] precision must be one of {sorted(_AUTOCAST_DTYPES)}, not {precision!r}"
            )
        self.precision = str(precision)
        self.autocast_dtype = _AUTOCAST_DTYPES[self.precision]
        self.channels_last = _bool("train", "channels_last", tcfg.get("channels_last", True))
        self.aug = _section(cfg, "augment")
        for key in ("rotation_deg", "translation_mm", "intensity_scale", "intensity_shift"):
            _setting(self.aug, "augment", key, 0.0, float, 0.0)
        # A relative scaling of 1 or more can shrink a patch to nothing or mirror it.
        _setting(self.aug, "augment", "scale", 0.0, float, 0.0, 1.0)
        lsec = _section(cfg, "local")
        self.offset_sigma_mm = _setting(lsec, "local", "offset_sigma_mm", 2.0, float, 0.0)
        gsec = _section(cfg, "global")
        patch = (
            _int_list("global", "patch_size", gsec["patch_size"], 1)
            if "patch_size" in gsec
            else None
        )
        self.global_from = tcfg.get("global_from")
        if self.global_from is not None and not isinstance(self.global_from, str | Path):
            raise TrainConfigError(
                f"[train] global_from = {self.global_from!r} is invalid: expected a model "
                "directory or a bundled model name"
            )
        output = cfg.get("output", "model")
        if not isinstance(output, str | Path) or not str(output):
            raise TrainConfigError(f"output = {output!r} is invalid: expected a directory path")
        self.output = Path(output)
        _check_output(self.output)
        if threads > 0:
            torch.set_num_threads(threads)

        torch.manual_seed(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        files = _image_files(str(data["images"]))
        table = _combine_annotators(landmark_files, data.get("annotator", "mean"))
        ids = [i for i in files if i in table]
        missing = sorted(set(table) - set(files))
        if missing:
            log(f"warning: {len(missing)} annotated images have no image file (e.g. {missing[0]})")
        if not ids:
            raise TrainConfigError("no image has both an image file and landmarks")
        train_ids, val_ids = _split(ids, data, rng, log)
        if configured is None:
            names = _landmark_names(table, ids, log)
        else:
            _check_annotated(configured, table, train_ids)
            names = configured
        dim = len(next(iter(table[ids[0]].values())))
        self.config = _model_config(cfg, dim, names)
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
            pos_weight=pos_weight,
            regression=regression_weight,
        )
        stride = self.config.global_stage.network.stride
        if patch is not None:
            self.patch = tuple(patch)
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
        self.start = 0
        self.iteration = 0  # the iteration in progress (0-based), for messages
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
        if other.config.orientation != mine.orientation:
            # Its network learnt images in its own orientation; fed another, it would
            # see the anatomy mirrored or permuted.
            raise TrainConfigError(
                f"[train] global_from: {source} was trained on {other.config.orientation} "
                f"oriented images; this configuration has orientation = "
                f"{mine.orientation!r}: set orientation = {other.config.orientation!r} or "
                "train the global stage too"
            )
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
        self._check_finite(loss, "global")
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
        self._check_finite(loss, "local")
        self.lopt.zero_grad(set_to_none=True)
        loss.backward()
        self.lopt.step()
        return parts

    def _check_finite(self, loss: torch.Tensor, stage: str) -> None:
        """Stop a diverged run before its step spoils the weights (they would train to
        the end for nothing); checkpoints already written are kept."""
        value = float(loss.detach())
        if math.isfinite(value):
            return
        ckpt = self._ckpt_dir()
        kept = (
            f"; the last good checkpoint in {ckpt} is kept"
            if (ckpt / "state.safetensors").is_file()
            else ""
        )
        raise TrainConfigError(
            f"training diverged: the {stage} loss is {value} at iteration "
            f"{self.iteration + 1}: expected a finite loss; lower [train] lr (now "
            f"{self.lr:g}){kept}"
        )

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
        try:
            result = calibrate_confidence(self.model, [s.image for s in samples], backend="torch")
        except FastlmkError as exc:
            # A model that localizes its own validation images badly keeps the loose
            # default thresholds; the log says so, and the model is still saved.
            self.log(f"warning: flag thresholds not calibrated: {exc}")
            return
        self.model.config = replace(self.model.config, confidence=result.spec)
        self.model.config.metadata["confidence_calibration"] = result.to_dict()
        c = result.spec
        self.log(
            f"flag thresholds from {result.images} images: stage vote weight "
            f"{c.min_weight:.3g}..{c.max_weight:.3g}, spread <= {c.max_spread_mm:.3g} mm"
        )

    def _fit_shape(self) -> None:
        """The shape model (see fastlmk.shape) from the annotations of every image used.

        Skipped, with a log line, when there are too few images or landmarks for one.
        """
        cfg = self.model.config
        shapes = [
            grid_frame_mm(
                np.array([s.truth_mm.get(n, np.full(cfg.dim, np.nan)) for n in cfg.landmarks]),
                Geometry.from_sitk(s.image),
            )
            for s in self.train + self.val
        ]
        try:
            spec = fit_shape_model(
                shapes,
                rotation_deg=float(self.aug.get("rotation_deg", 0.0)),
                scale=float(self.aug.get("scale", 0.0)),
                localization_mm=float(np.mean(cfg.global_stage.spacing)),
            )
        except ValueError as exc:
            self.log(f"no shape model, so no shape check: {exc}")
            return
        self.model.config = replace(cfg, shape=spec)
        low, high = spec.scale_range
        self.log(
            f"shape model from {spec.shapes} images: scale {low:.2f}..{high:.2f}, rotation <= "
            f"{spec.max_rotation_deg:.0f} deg"
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
                {
                    "iteration": iteration,
                    "seconds": self._seconds(),
                    "history": self.history,
                    "model_config": self._checkpoint_config(),
                },
                indent=1,
            )
        )

    def _checkpoint_config(self) -> dict[str, Any]:
        """What a checkpoint's weights belong to: the model configuration without its
        name, description, flag thresholds and metadata (which training does not fix)."""
        d = self.config.to_dict()
        keys = ("dim", "landmarks", "orientation", "intensity", "global", "local")
        # JSON round trip: tuples become lists, as in a loaded state.json.
        out: dict[str, Any] = json.loads(json.dumps({k: d.get(k) for k in keys}))
        return out

    def _check_checkpoint_config(self, stored: Any, d: Path) -> None:
        """Refuse to resume a checkpoint of another model configuration."""
        if stored is None:
            # Written before checkpoints recorded their configuration: the weight
            # shapes are still checked when they are loaded.
            self.log(f"warning: {d} does not record its model configuration; not compared")
            return
        mine = self._checkpoint_config()
        if not isinstance(stored, dict):
            stored = {}
        differ = []
        for key, value in mine.items():
            other = stored.get(key)
            if isinstance(value, dict) and isinstance(other, dict):
                differ += [
                    f"{key}.{k}: {other.get(k)!r} -> {value.get(k)!r}"
                    for k in sorted(set(value) | set(other))
                    if value.get(k) != other.get(k)
                ]
            elif value != other:
                differ.append(f"{key}: {other!r} -> {value!r}")
        if differ:
            raise TrainConfigError(
                f"--resume: the checkpoint in {d} belongs to another model configuration "
                f"({'; '.join(differ)}): expected the configuration it was trained with; "
                "restore that configuration, or train into a new output directory"
            )

    def load_checkpoint(self) -> None:
        d = self._ckpt_dir()
        if not (d / "state.safetensors").is_file():
            raise TrainConfigError(f"--resume: no checkpoint in {d}")
        try:
            meta = json.loads((d / "state.json").read_text())
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            self.start = int(meta["iteration"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TrainConfigError(
                f"--resume: {d / 'state.json'} is unreadable or damaged ({exc}): expected "
                "the state written with the checkpoint; restore it, or train afresh "
                "without --resume into a new output directory"
            ) from exc
        self._check_checkpoint_config(meta.get("model_config"), d)
        try:
            self._load_state(load_file(str(d / "state.safetensors")))
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise TrainConfigError(
                f"--resume: the checkpoint in {d} does not fit this configuration or is "
                f"damaged ({str(exc).splitlines()[0]}): expected the weights of the same "
                "architecture; resume with the configuration it was trained with, or "
                "train into a new output directory"
            ) from exc
        self.seconds_before = float(meta.get("seconds", 0.0))
        self.history = list(meta.get("history", []))
        self.log(f"resumed from {d} at iteration {self.start}")

    def _load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Weights, optimiser moments and random states from a checkpoint's tensors."""
        expected = {
            prefix
            for prefix, net, opt in (
                ("global", self.model.global_net, self.gopt),
                ("local", self.model.local_net, self.lopt),
            )
            if net is not None and opt is not None
        }
        stored = {k.split(".", 1)[0] for k in tensors if ".net." in k}
        if stored != expected:
            raise ValueError(
                f"it holds trained {sorted(stored)} networks, this configuration trains "
                f"{sorted(expected)}"
            )
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

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> Path:
        self._set_training(True)
        n = len(self.train)
        self.t0 = t0 = time.perf_counter()
        tty = sys.stderr.isatty()
        last_val: dict[str, float] = {}
        for it in range(self.start, self.iterations):
            self.iteration = it
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
        self._fit_shape()
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
                    "augment": dict(self.aug),
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
