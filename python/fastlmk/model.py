"""Model directories: configuration (``model.json``) and weights (safetensors).

A model is a directory::

    model.json              landmark names, dimensionality, working spacings, crop size,
                            network architectures, intensity normalisation, thresholds
    global.safetensors      weights of the global network
    local.safetensors       weights of the L local networks (one grouped network)

No file of a model can execute code when loaded (no pickle). Bundled models live in
``fastlmk/models/<name>/`` inside the package and are loaded by name.
"""

from __future__ import annotations

import json
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

__all__ = [
    "FORMAT_VERSION",
    "ConfidenceSpec",
    "IntensitySpec",
    "LandmarkModel",
    "ModelConfig",
    "StageSpec",
    "available_models",
    "ensemble_local",
    "load_model",
]

FORMAT_VERSION = 1
_BUNDLED = Path(__file__).parent / "models"


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
        spec = cls(low=float(d.get("low", 1.0)), high=float(d.get("high", 99.0)))
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

    Attributes:
        min_weight: Flag when a stage's total vote weight (sum of cell probabilities)
            is below this.
        max_spread_mm: Flag when the final vote's spread (weighted RMS distance of the
            votes from their mean) exceeds this.
        spread_scale_mm: Spread at which the confidence falls to one half.
    """

    min_weight: float = 0.05
    max_spread_mm: float = 10.0
    spread_scale_mm: float = 2.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_weight": self.min_weight,
            "max_spread_mm": self.max_spread_mm,
            "spread_scale_mm": self.spread_scale_mm,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConfidenceSpec:
        return cls(**{k: float(v) for k, v in d.items()})


@dataclass(frozen=True)
class ModelConfig:
    """Everything about a model except its weights (the content of ``model.json``)."""

    name: str
    dim: int
    landmarks: tuple[str, ...]
    global_stage: StageSpec
    local_stage: StageSpec | None
    intensity: IntensitySpec = IntensitySpec()
    confidence: ConfidenceSpec = ConfidenceSpec()
    orientation: str = "LPS"
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
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

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ModelError(
                f"model.json format_version {version!r} is not supported by this "
                f"fastlmk (expects {FORMAT_VERSION}); upgrade fastlmk or re-export"
            )
        try:
            dim = int(d["dim"])
            names = tuple(str(n) for n in d["landmarks"])
            gspec = d["global"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"model.json is missing a required field: {exc}") from exc
        if dim not in (2, 3):
            raise ModelError(f"model.json: dim must be 2 or 3, got {dim}")
        if not names or len(set(names)) != len(names):
            raise ModelError("model.json: 'landmarks' must be a non-empty list of unique names")
        local = d.get("local")
        return cls(
            name=str(d.get("name", "")),
            dim=dim,
            landmarks=names,
            global_stage=StageSpec.from_dict(gspec, dim, "global"),
            local_stage=None if local is None else StageSpec.from_dict(local, dim, "local"),
            intensity=IntensitySpec.from_dict(d.get("intensity", {})),
            confidence=ConfidenceSpec.from_dict(d.get("confidence", {})),
            orientation=str(d.get("orientation", "LPS")),
            description=str(d.get("description", "")),
            metadata=dict(d.get("metadata", {})),
        )


class LandmarkModel:
    """A loaded model: configuration plus the global and (optional) local networks.

    Args:
        config: The model configuration.
        global_net: The global network (``groups=1``, L landmarks).
        local_net: The L local networks as one grouped network, or None.
        path: Directory the model was loaded from, if any.
    """

    def __init__(
        self,
        config: ModelConfig,
        global_net: LandmarkFCN | NetworkEnsemble,
        local_net: LandmarkFCN | NetworkEnsemble | None,
        path: Path | None = None,
    ) -> None:
        self.config = config
        self.global_net = global_net.eval()
        self.local_net = None if local_net is None else local_net.eval()
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
        return cls(config, gnet, lnet)

    @property
    def names(self) -> list[str]:
        return list(self.config.landmarks)

    @property
    def dim(self) -> int:
        return self.config.dim

    def save(self, directory: str | Path) -> Path:
        """Write ``model.json`` and safetensors weights to ``directory`` (created)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        save_file(_state(self.global_net), str(out / "global.safetensors"))
        if self.local_net is not None:
            save_file(_state(self.local_net), str(out / "local.safetensors"))
        (out / "model.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        return out

    def __repr__(self) -> str:
        c = self.config
        return (
            f"LandmarkModel(name={c.name!r}, dim={c.dim}, landmarks={len(c.landmarks)}, "
            f"local={'yes' if c.local_stage else 'no'})"
        )


def _state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}


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
        ModelError: unknown name, missing or invalid files.
    """
    if isinstance(name_or_dir, LandmarkModel):
        return name_or_dir
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
    config = ModelConfig.from_dict(raw)
    model = LandmarkModel.create(config)
    _load_weights(model.global_net, path / "global.safetensors")
    if model.local_net is not None:
        _load_weights(model.local_net, path / "local.safetensors")
    model.path = path
    model.global_net.eval()
    if model.local_net is not None:
        model.local_net.eval()
    return model


def ensemble_local(
    models: list[LandmarkModel | str | Path], name: str | None = None
) -> LandmarkModel:
    """One model whose local stage pools the votes of several models' local networks.

    The first model gives the global network and everything else in the configuration;
    the local networks of all models become the members of one
    :class:`~fastlmk.networks.NetworkEnsemble` (members of ensembles are taken over one
    by one). The local stages must agree in spacing, crop size, landmarks and intensity
    normalisation, so that all members see the same crops.

    Args:
        models: Two or more models (loaded, directories or bundled names).
        name: Name of the result (default: the first model's).

    Returns:
        The combined model (not saved; see :meth:`LandmarkModel.save`).

    Raises:
        ModelError: fewer than two models, a model without a local stage, or stages that
            do not agree.
    """
    loaded = [load_model(m) for m in models]
    if len(loaded) < 2:
        raise ModelError("ensemble_local: needs at least two models")
    first = loaded[0]
    base = first.config.local_stage
    if base is None:
        raise ModelError(f"ensemble_local: model {first.config.name!r} has no local stage")
    specs: list[NetworkSpec] = []
    states: list[dict[str, torch.Tensor]] = []
    for m in loaded:
        stage = m.config.local_stage
        where = f"model {m.config.name!r} ({m.path})"
        if stage is None or m.local_net is None:
            raise ModelError(f"ensemble_local: {where} has no local stage")
        if (m.names, m.dim, m.config.intensity) != (first.names, first.dim, first.config.intensity):
            raise ModelError(
                f"ensemble_local: {where} differs in landmarks, dimension or intensity "
                f"normalisation from {first.config.name!r}"
            )
        if (stage.spacing, stage.crop_size) != (base.spacing, base.crop_size):
            raise ModelError(
                f"ensemble_local: {where} crops {stage.crop_size} at {stage.spacing} mm; "
                f"the first model crops {base.crop_size} at {base.spacing} mm"
            )
        net = m.local_net
        if isinstance(net, NetworkEnsemble):
            specs += list(net.spec.members)
            states += [_state(member) for member in net.members]
        else:
            assert isinstance(stage.network, NetworkSpec)
            specs.append(stage.network)
            states.append(_state(net))
    local = replace(base, network=EnsembleSpec(tuple(specs)))
    sources = [
        {"model": m.config.name, "path": str(m.path), **m.config.metadata} for m in loaded
    ]
    metadata = {**first.config.metadata, "local_ensemble_of": sources}
    config = replace(
        first.config, name=name or first.config.name, local_stage=local, metadata=metadata
    )
    combined = LandmarkModel.create(config)
    combined.global_net.load_state_dict(first.global_net.state_dict())
    assert isinstance(combined.local_net, NetworkEnsemble)
    for member, state in zip(combined.local_net.members, states, strict=True):
        member.load_state_dict(state)
    combined.global_net.eval()
    combined.local_net.eval()
    return combined


def as_float_tuple(values: Any, dim: int, what: str) -> tuple[float, ...]:
    """A scalar or length-``dim`` sequence as a tuple of ``dim`` floats."""
    arr = np.atleast_1d(np.asarray(values, dtype=float))
    if arr.size == 1:
        arr = np.repeat(arr, dim)
    if arr.shape != (dim,):
        raise ValueError(f"{what} must be a number or {dim} numbers, got {values!r}")
    return tuple(float(v) for v in arr)
