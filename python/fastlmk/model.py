"""Model directories: configuration (``model.json``) and weights (safetensors).

A model is a directory::

    model.json              landmark names, dimensionality, working spacings, crop size,
                            network architectures, intensity normalisation, thresholds
    global.safetensors      weights of the global network
    local.safetensors       weights of the L local networks (one grouped network)
    local2.safetensors ...  weights of further local stages at other spacings, if any

It may also hold the stages' ONNX exports and their record (``onnx.json``, see
:mod:`fastlmk.export`). No file of a model can execute code when loaded (no pickle).
Bundled models live in ``fastlmk/models/<name>/`` inside the package and are loaded by
name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .errors import ModelError
from .networks import (
    AnyNetworkSpec,
    EnsembleSpec,
    LandmarkFCN,
    NetworkEnsemble,
    NetworkSpec,
    build_network,
    network_spec_from_dict,
)
from .shape import ShapeSpec

__all__ = [
    "BUNDLED_MODELS",
    "FORMAT_VERSION",
    "ConfidenceSpec",
    "IntensitySpec",
    "LandmarkModel",
    "ModelConfig",
    "StageSpec",
    "available_models",
    "ensemble_local",
    "load_model",
    "local_stage_names",
]

FORMAT_VERSION = 1
_BUNDLED = Path(__file__).parent / "models"
# The directory of the models shipped in the package (not to be rewritten in place).
BUNDLED_MODELS = _BUNDLED
# Stems of stage weight files: global, local, local2, local3 ... (see local_stage_names).
_STAGE_STEM = re.compile(r"global|local(?:[2-9]|[1-9][0-9]+)?")


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "an array", str: "a string", int: "a number"}
    return names.get(type(value), "a number" if isinstance(value, float) else type(value).__name__)


def _section(d: dict[str, Any], key: str) -> dict[str, Any]:
    """``d[key]`` (default ``{}``), which must be a JSON object."""
    value = d.get(key, {})
    if not isinstance(value, dict):
        raise ModelError(
            f"model.json: '{key}' must be a JSON object, got {_json_type(value)}; "
            "restore the model.json written with the model"
        )
    return value


@dataclass(frozen=True)
class IntensitySpec:
    """Per-image intensity normalisation: ``(v - q_low) / (q_high - q_low)``.

    ``q_low`` and ``q_high`` are the ``low`` and ``high`` percentiles of the image at the
    global working spacing, so the same mapping applies to every stage.
    """

    low: float = 1.0
    high: float = 99.0

    def to_dict(self) -> dict[str, Any]:
        return {"method": "percentile", "low": self.low, "high": self.high}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IntensitySpec:
        if d.get("method", "percentile") != "percentile":
            raise ModelError(
                f"unknown intensity normalisation {d.get('method')!r}; "
                "this version supports 'percentile'"
            )
        try:
            spec = cls(low=float(d.get("low", 1.0)), high=float(d.get("high", 99.0)))
        except (TypeError, ValueError) as exc:
            raise ModelError(
                f"model.json: invalid intensity percentiles {d}: expected numbers ({exc})"
            ) from exc
        if not 0.0 <= spec.low < spec.high <= 100.0:
            raise ModelError(f"intensity percentiles must satisfy 0 <= low < high <= 100, got {d}")
        return spec


@dataclass(frozen=True)
class StageSpec:
    """One stage (global or local) of the two-stage method.

    Attributes:
        spacing: Working spacing in mm, (x, y[, z]) order.
        network: Architecture of the stage's network(s): one network, or an ensemble
            whose votes are pooled.
        crop_size: Local stage only: crop size in working pixels, array order.
        vote_min_prob: Cells with probability below this are left out of the vote.
    """

    spacing: tuple[float, ...]
    network: AnyNetworkSpec
    crop_size: tuple[int, ...] = ()
    vote_min_prob: float = 0.0

    @property
    def network_count(self) -> int:
        """Networks in the stage: an ensemble's members, else 1."""
        return len(self.network.members) if isinstance(self.network, EnsembleSpec) else 1

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "spacing": list(self.spacing),
            "network": self.network.to_dict(),
            "vote_min_prob": self.vote_min_prob,
        }
        if self.crop_size:
            d["crop_size"] = list(self.crop_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], dim: int, name: str) -> StageSpec:
        if not isinstance(d, dict):
            raise ModelError(
                f"model.json: the '{name}' stage must be a JSON object, got {_json_type(d)}"
            )
        try:
            spacing = tuple(float(s) for s in d["spacing"])
            crop = tuple(int(c) for c in d.get("crop_size", ()))
            spec = cls(
                spacing=spacing,
                network=network_spec_from_dict(d.get("network", {})),
                crop_size=crop,
                vote_min_prob=float(d.get("vote_min_prob", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model.json: invalid '{name}' stage: {exc}") from exc
        if len(spec.spacing) != dim or min(spec.spacing) <= 0:
            raise ModelError(
                f"model.json: '{name}' spacing {spec.spacing} must be {dim} positive numbers (mm)"
            )
        multiple = spec.network.input_multiple
        if crop and (len(crop) != dim or any(c % multiple for c in crop)):
            raise ModelError(
                f"model.json: '{name}' crop_size {crop} must be {dim} multiples of "
                f"the network stride {multiple}"
            )
        return spec


@dataclass(frozen=True)
class ConfidenceSpec:
    """Thresholds that flag a landmark as unreliable.

    A stage's vote weight is the sum of its cell probabilities: about one where the
    network sees the landmark once, near zero where it sees it nowhere (e.g. outside the
    field of view), and far above the usual where it sees it everywhere (an image unlike
    the training images, or a broken network). :func:`fastlmk.calibration.calibrate_confidence`
    sets ``min_weight`` and ``max_weight`` from a model's weights on images it localizes
    correctly.

    Attributes:
        min_weight: Flag when a stage's total vote weight is below this.
        max_weight: Flag when a stage's total vote weight is above this (``inf``: never).
        max_spread_mm: Flag when the final vote's spread (weighted RMS distance of the
            votes from their mean) exceeds this.
        spread_scale_mm: Spread at which the confidence falls to one half.
    """

    min_weight: float = 0.05
    max_spread_mm: float = 10.0
    spread_scale_mm: float = 2.0
    max_weight: float = float("inf")

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_weight": self.min_weight,
            # JSON has no infinity: "no upper bound" is written as null.
            "max_weight": self.max_weight if np.isfinite(self.max_weight) else None,
            "max_spread_mm": self.max_spread_mm,
            "spread_scale_mm": self.spread_scale_mm,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConfidenceSpec:
        # Only max_weight may be null ("no upper bound"); JSON cannot hold infinity.
        unbounded = {k: v is None and k == "max_weight" for k, v in d.items()}
        return cls(**{k: float("inf") if unbounded[k] else float(v) for k, v in d.items()})


@dataclass(frozen=True)
class ModelConfig:
    """Everything about a model except its weights (the content of ``model.json``)."""

    name: str
    dim: int
    landmarks: tuple[str, ...]
    global_stage: StageSpec
    local_stage: StageSpec | None
    # Further local stages (other spacing or crop), all cropping around the global
    # estimate like ``local_stage``; see :func:`local_stage_names`.
    extra_local_stages: tuple[StageSpec, ...] = ()
    intensity: IntensitySpec = IntensitySpec()
    confidence: ConfidenceSpec = ConfidenceSpec()
    orientation: str = "LPS"
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    # The training shapes, for the plausibility check of found configurations
    # (fastlmk.shape); None: no such check.
    shape: ShapeSpec | None = None
    # Realign anatomy tilted more than this many degrees against the mean training
    # shape (fastlmk.align; needs ``shape``); None: never by default.
    align_above_deg: float | None = None

    @property
    def local_stages(self) -> dict[str, StageSpec]:
        """Every local stage by name: ``"local"``, then ``"local2"``, ``"local3"`` ..."""
        if self.local_stage is None:
            return {}
        stages = [self.local_stage, *self.extra_local_stages]
        return dict(zip(local_stage_names(len(stages)), stages, strict=True))

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "description": self.description,
            "dim": self.dim,
            "landmarks": list(self.landmarks),
            "orientation": self.orientation,
            "intensity": self.intensity.to_dict(),
            "global": self.global_stage.to_dict(),
            "local": None if self.local_stage is None else self.local_stage.to_dict(),
            "confidence": self.confidence.to_dict(),
            "metadata": self.metadata,
        }
        if self.extra_local_stages:
            d["local_extra"] = [stage.to_dict() for stage in self.extra_local_stages]
        if self.shape is not None:
            d["shape"] = self.shape.to_dict()
        if self.align_above_deg is not None:
            d["align_above_deg"] = self.align_above_deg
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The configuration in a parsed ``model.json``.

        Raises:
            ModelError: not a JSON object, an unsupported format version, or a missing
                or invalid field.
        """
        if not isinstance(d, dict):
            raise ModelError(
                f"model.json must hold a JSON object (the model configuration), got "
                f"{_json_type(d)}; restore the model.json written with the model"
            )
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelError(
                f"model.json format_version {version!r} is not supported by this "
                f"fastlmk (expects {FORMAT_VERSION}); upgrade fastlmk or re-export"
            )
        missing = [key for key in ("dim", "landmarks", "global") if key not in d]
        if missing:
            raise ModelError(
                f"model.json is missing the required field(s) {', '.join(map(repr, missing))}; "
                "restore the model.json written with the model"
            )
        try:
            dim = int(d["dim"])
        except (TypeError, ValueError):
            dim = 0  # reported just below, with the value as written
        if dim not in (2, 3):
            raise ModelError(f"model.json: invalid value for 'dim': {d['dim']!r}; expected 2 or 3")
        landmarks = d["landmarks"]
        names = tuple(str(n) for n in landmarks) if isinstance(landmarks, list) else ()
        if not names or len(set(names)) != len(names):
            raise ModelError(
                f"model.json: invalid value for 'landmarks' ({_json_type(landmarks)}): "
                "expected a non-empty list of unique names"
            )
        gspec = d["global"]
        local = d.get("local")
        extra = d.get("local_extra", [])
        if not isinstance(extra, list) or (extra and local is None):
            raise ModelError(
                "model.json: 'local_extra' must be a list of stages, and needs a 'local' stage"
            )
        shape = None if d.get("shape") is None else ShapeSpec.from_dict(d["shape"], names, dim)
        align = d.get("align_above_deg")
        if align is not None:
            valid = isinstance(align, int | float) and not isinstance(align, bool)
            if not valid or not 0 <= align <= 180 or shape is None:
                raise ModelError(
                    f"model.json: invalid value for 'align_above_deg': {align!r}; expected "
                    "null or degrees in [0, 180], with a 'shape' entry"
                )
            align = float(align)
        return cls(
            name=str(d.get("name", "")),
            dim=dim,
            landmarks=names,
            global_stage=StageSpec.from_dict(gspec, dim, "global"),
            local_stage=None if local is None else StageSpec.from_dict(local, dim, "local"),
            extra_local_stages=tuple(
                StageSpec.from_dict(e, dim, name)
                for e, name in zip(extra, local_stage_names(len(extra) + 1)[1:], strict=True)
            ),
            intensity=IntensitySpec.from_dict(_section(d, "intensity")),
            confidence=ConfidenceSpec.from_dict(_section(d, "confidence")),
            orientation=str(d.get("orientation", "LPS")),
            description=str(d.get("description", "")),
            metadata=dict(_section(d, "metadata")),
            shape=shape,
            align_above_deg=align,
        )


def local_stage_names(n: int) -> list[str]:
    """Names of ``n`` local stages: ``"local"``, ``"local2"``, ``"local3"`` ... (also the
    stems of their weight and ONNX files)."""
    return ["local"] + [f"local{k}" for k in range(2, n + 1)]


class LandmarkModel:
    """A loaded model: configuration plus the global and (optional) local networks.

    Args:
        config: The model configuration.
        global_net: The global network (``groups=1``, L landmarks).
        local_net: The L local networks as one grouped network, or None.
        path: Directory the model was loaded from, if any.
        extra_local_nets: The networks of ``config.extra_local_stages``, in order.
    """

    def __init__(
        self,
        config: ModelConfig,
        global_net: LandmarkFCN | NetworkEnsemble,
        local_net: LandmarkFCN | NetworkEnsemble | None,
        path: Path | None = None,
        extra_local_nets: Sequence[LandmarkFCN | NetworkEnsemble] = (),
    ) -> None:
        if len(extra_local_nets) != len(config.extra_local_stages) or (
            extra_local_nets and local_net is None
        ):
            raise ModelError(
                f"model {config.name!r}: {len(extra_local_nets)} networks for "
                f"{len(config.extra_local_stages)} further local stages"
            )
        self.config = config
        self.global_net = global_net.eval()
        self.local_net = None if local_net is None else local_net.eval()
        self.extra_local_nets = [net.eval() for net in extra_local_nets]
        self.path = path
        self._backends: dict[str, Any] = {}

    @classmethod
    def create(cls, config: ModelConfig) -> LandmarkModel:
        """Randomly initialised networks for ``config`` (used by training)."""
        n = len(config.landmarks)
        gnet = build_network(config.dim, n, config.global_stage.network)
        lnet = None
        if config.local_stage is not None:
            lnet = build_network(config.dim, 1, config.local_stage.network, groups=n)
        extra = [
            build_network(config.dim, 1, stage.network, groups=n)
            for stage in config.extra_local_stages
        ]
        return cls(config, gnet, lnet, extra_local_nets=extra)

    @property
    def stage_names(self) -> list[str]:
        """``"global"`` and the names of the local stages (see :func:`local_stage_names`)."""
        return ["global", *self.config.local_stages]

    def network(self, stage: str) -> LandmarkFCN | NetworkEnsemble:
        """The network of stage ``stage`` (one of :attr:`stage_names`).

        Raises:
            ModelError: the model has no such stage.
        """
        if stage == "global":
            return self.global_net
        nets = [] if self.local_net is None else [self.local_net, *self.extra_local_nets]
        named = dict(zip(local_stage_names(len(nets)), nets, strict=True))
        if stage not in named:
            raise ModelError(f"model {self.config.name!r} has no {stage} stage")
        return named[stage]

    @property
    def names(self) -> list[str]:
        return list(self.config.landmarks)

    @property
    def dim(self) -> int:
        return self.config.dim

    def save(self, directory: str | Path, weights_dtype: str = "float32") -> Path:
        """Write ``model.json`` and safetensors weights to ``directory`` (created).

        Files that belonged to weights saved there before go: the weights of stages this
        model does not have, and the ONNX exports (``*.onnx``) of any stage whose network
        differs from this model's (their record in ``onnx.json`` does not match, see
        :func:`fastlmk.export.remove_stale_onnx`).

        Args:
            directory: Output directory.
            weights_dtype: ``"float32"`` (default) or ``"float16"``: the floating-point
                tensors stored at half the size (for a bundled model that must stay
                small). Loading always gives float32 networks; float16 storage rounds
                each weight to 11 significant bits (relative error <= 4.9e-4 for magnitudes
                above 6.1e-5, an absolute error <= 3e-8 below).

        Raises:
            ModelError: unknown ``weights_dtype``, a weight outside float16's range, or
                ``directory`` is a file or cannot be created.
        """
        from .export import _state_hash, remove_stale_onnx

        if weights_dtype not in _WEIGHT_DTYPES:
            raise ModelError(
                f"weights_dtype must be one of {', '.join(_WEIGHT_DTYPES)}, got {weights_dtype!r}"
            )
        dtype = _WEIGHT_DTYPES[weights_dtype]
        from .io import make_output_directory

        out = make_output_directory(directory, ModelError, "the model")
        hashes: dict[str, str] = {}
        for stage in self.stage_names:
            net = self.network(stage)
            state = _state(net)
            if dtype != torch.float32:
                state = _cast_floats(state, dtype, f"{self.config.name!r} {stage}")
            save_file(state, str(out / f"{stage}.safetensors"))
            # The network as it loads back (float32), which the ONNX records refer to.
            loaded = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
            hashes[stage] = _state_hash(net, loaded)
        (out / "model.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        # Left behind, the files of an earlier model would make this one inconsistent
        # (stage weights its model.json lacks) or be taken for its exports.
        for path in out.glob("*.safetensors"):
            if _STAGE_STEM.fullmatch(path.stem) and path.stem not in hashes:
                path.unlink()
        remove_stale_onnx(out, hashes)
        return out

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LandmarkModel(name={c.name!r}, dim={c.dim}, landmarks={len(c.landmarks)}, "
            f"local={'yes' if c.local_stage else 'no'})"
        )


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}


_WEIGHT_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def _cast_floats(
    state: dict[str, torch.Tensor], dtype: torch.dtype, what: str
) -> dict[str, torch.Tensor]:
    """Floating-point tensors of ``state`` cast to ``dtype``; integer ones (BatchNorm's
    batch counter) unchanged. A finite value that would overflow is an error, not inf."""
    limit = torch.finfo(dtype).max
    cast = {}
    for key, t in state.items():
        if t.is_floating_point():
            if t.abs().max() > limit:
                raise ModelError(f"model {what}: weight {key} exceeds the {dtype} range")
            t = t.to(dtype)
        cast[key] = t
    return cast


def _load_weights(net: torch.nn.Module, path: Path) -> None:
    if not path.is_file():
        raise ModelError(f"model weights {path} are missing")
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ModelError(f"cannot read model weights {path}: {exc}") from exc
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(
            f"weights in {path} do not match the architecture in model.json: "
            f"{str(exc).splitlines()[0]}"
        ) from exc


def available_models() -> list[str]:
    """Names of the models bundled with this installation."""
    if not _BUNDLED.is_dir():
        return []
    return sorted(p.name for p in _BUNDLED.iterdir() if (p / "model.json").is_file())


def load_model(name_or_dir: str | Path | LandmarkModel) -> LandmarkModel:
    """Load a bundled model by name, or a model directory.

    Args:
        name_or_dir: A bundled model name (see :func:`available_models`), a model
            directory containing ``model.json``, or an already loaded model.

    Returns:
        The model, networks in eval mode on the CPU.

    Raises:
        ModelError: not a name, directory or model; unknown name; missing, invalid or
            inconsistent files.
    """
    if isinstance(name_or_dir, LandmarkModel):
        return name_or_dir
    if not isinstance(name_or_dir, str | os.PathLike):
        raise ModelError(
            f"model must be a bundled model name, a model directory or a loaded "
            f"LandmarkModel, got {type(name_or_dir).__name__} ({name_or_dir!r}); "
            f"bundled models: {', '.join(available_models()) or 'none installed'}"
        )
    path = Path(name_or_dir)
    if not (path / "model.json").is_file():
        bundled = _BUNDLED / str(name_or_dir)
        if (bundled / "model.json").is_file():
            path = bundled
        else:
            names = ", ".join(available_models()) or "none installed"
            raise ModelError(
                f"no model named or found at {str(name_or_dir)!r}: expected a "
                f"directory with model.json or a bundled model name ({names})"
            )
    try:
        raw = json.loads((path / "model.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"cannot read {path / 'model.json'}: {exc}") from exc
    try:
        config = ModelConfig.from_dict(raw)
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        # A malformed field that the checks of from_dict do not name: still the file's fault.
        raise ModelError(
            f"{path / 'model.json'} is not a valid model configuration ({exc}); "
            "restore the model.json written with the model"
        ) from exc
    stages = ["global", *config.local_stages]
    # Weights that model.json does not describe (a stage missing from 'local' /
    # 'local_extra') would be ignored, and the model run without them.
    stray = sorted(
        p.name
        for p in path.glob("*.safetensors")
        if _STAGE_STEM.fullmatch(p.stem) and p.stem not in stages
    )
    if stray:
        raise ModelError(
            f"model directory {path} holds the stage weights {', '.join(stray)}, but its "
            f"model.json describes only the stage(s) {', '.join(stages)}: add the missing "
            "stage to model.json ('local' / 'local_extra'), or delete the file(s) if they "
            "do not belong to this model"
        )
    model = LandmarkModel.create(config)
    for stage in model.stage_names:
        net = model.network(stage)
        _load_weights(net, path / f"{stage}.safetensors")
        net.eval()
    model.path = path
    return model


def _state_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a network's weights (names and values)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu()
        h.update(key.encode())
        h.update((t.float() if t.is_floating_point() else t).contiguous().numpy().tobytes())
    return h.hexdigest()


def ensemble_local(
    models: list[LandmarkModel | str | Path], name: str | None = None
) -> LandmarkModel:
    """One model whose local stages pool the local networks of several models.

    The first model gives the global network and everything else in the configuration.
    Local networks that crop at the same spacing and crop size become the members of one
    :class:`~fastlmk.networks.NetworkEnsemble` whose votes are pooled (members of
    ensembles are taken over one by one); each further spacing / crop size becomes a
    further local stage (``"local2"``, ...), in the order first met. At inference every
    local stage crops around the global estimate and votes; the final position is the
    mean of the stages' positions weighted by their numbers of member networks (so
    every local network counts alike). The models must agree in landmarks, dimension
    and intensity normalisation.

    Args:
        models: Two or more models (loaded, directories or bundled names).
        name: Name of the result (default: the first model's).

    Returns:
        The combined model (not saved; see :meth:`LandmarkModel.save`).

    Raises:
        ModelError: fewer than two models, a model without a local stage, or models that
            do not agree.
    """
    loaded = [load_model(m) for m in models]
    if len(loaded) < 2:
        raise ModelError("ensemble_local: needs at least two models")
    first = loaded[0]
    if first.config.local_stage is None:
        raise ModelError(f"ensemble_local: model {first.config.name!r} has no local stage")
    # (spacing, crop) -> (the first stage spec met, member specs, member weights)
    groups: dict[
        tuple[tuple[float, ...], tuple[int, ...]],
        tuple[StageSpec, list[NetworkSpec], list[dict[str, torch.Tensor]]],
    ] = {}
    seen: dict[str, str] = {}
    for m in loaded:
        where = f"model {m.config.name!r} ({m.path})"
        if m.config.local_stage is None or m.local_net is None:
            raise ModelError(f"ensemble_local: {where} has no local stage")
        if (m.names, m.dim, m.config.intensity, m.config.orientation) != (
            first.names,
            first.dim,
            first.config.intensity,
            first.config.orientation,
        ):
            raise ModelError(
                f"ensemble_local: {where} differs in landmarks, dimension, intensity "
                f"normalisation or orientation from {first.config.name!r}"
            )
        for stage_name, stage in m.config.local_stages.items():
            _, specs, states = groups.setdefault(
                (stage.spacing, stage.crop_size), (stage, [], [])
            )
            net = m.network(stage_name)
            if isinstance(net, NetworkEnsemble):
                new_specs, new_states = list(net.spec.members), [_state(x) for x in net.members]
            else:
                assert isinstance(stage.network, NetworkSpec)
                new_specs, new_states = [stage.network], [_state(net)]
            for state in new_states:
                # The same network twice counts double in the pooled vote: harmless
                # alone (the same points), a silent reweighting beside other networks.
                digest = _state_digest(state)
                if digest in seen:
                    warnings.warn(
                        f"ensemble_local: {where} holds a local network that {seen[digest]} "
                        "already holds (a model given twice, or an ensemble and one of its "
                        "members); it counts twice in the vote",
                        stacklevel=2,
                    )
                seen[digest] = where
            specs += new_specs
            states += new_states
    stages = [
        replace(spec0, network=specs[0] if len(specs) == 1 else EnsembleSpec(tuple(specs)))
        for spec0, specs, _ in groups.values()
    ]
    sources = [
        {"model": m.config.name, "path": str(m.path), **m.config.metadata} for m in loaded
    ]
    metadata = {**first.config.metadata, "local_ensemble_of": sources}
    config = replace(
        first.config,
        name=name or first.config.name,
        local_stage=stages[0],
        extra_local_stages=tuple(stages[1:]),
        metadata=metadata,
    )
    combined = LandmarkModel.create(config)
    combined.global_net.load_state_dict(first.global_net.state_dict())
    for stage_name, (_, _, states) in zip(config.local_stages, groups.values(), strict=True):
        net = combined.network(stage_name)
        if isinstance(net, NetworkEnsemble):
            for member, state in zip(net.members, states, strict=True):
                member.load_state_dict(state)
        else:
            net.load_state_dict(states[0])
        net.eval()
    combined.global_net.eval()
    return combined


def as_float_tuple(values: Any, dim: int, what: str) -> tuple[float, ...]:
    """A scalar or length-``dim`` sequence as a tuple of ``dim`` floats."""
    arr = np.atleast_1d(np.asarray(values, dtype=float))
    if arr.size == 1:
        arr = np.repeat(arr, dim)
    if arr.shape != (dim,):
        raise ValueError(f"{what} must be a number or {dim} numbers, got {values!r}")
    return tuple(float(v) for v in arr)
