"""ONNX export of a model's networks, checked against torch.

``export_onnx`` writes, next to ``model.json`` (or into any directory)::

    global.onnx        the global network      image (B, 1, *S) -> logits, disp
    local.onnx         the L local networks    crops (B, L, *P) -> logits, disp
    local2.onnx ...    further local stages (other spacings), if the model has them
    *.fp16.onnx        the same in float16 (weights, inputs and outputs)

Batch and spatial axes are dynamic (every spatial size must be a multiple of the
network's stride). Every file is run with ONNX Runtime on random input at two shapes and
compared with the float32 torch network; the largest absolute difference is returned.

Models without ONNX files next to them are exported on the fly into a cache directory
(:func:`cache_dir`), keyed by :func:`model_hash`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import FastlmkError
from .model import LandmarkModel
from .networks import LandmarkFCN, NetworkEnsemble

__all__ = [
    "ExportError",
    "ExportResult",
    "cache_dir",
    "check_onnx",
    "export_onnx",
    "max_abs_difference",
    "model_hash",
    "onnx_file",
    "onnx_files",
]

# Opset 17 is read by every ONNX Runtime >= 1.17 and TensorRT 10.
_OPSET = 17
_INPUT, _OUTPUTS = "image", ("logits", "disp")
# Hashing reads every weight: do it once per loaded model.
_HASHES: weakref.WeakKeyDictionary[LandmarkModel, str] = weakref.WeakKeyDictionary()


class ExportError(FastlmkError):
    """An ONNX export failed or does not reproduce the torch network."""


@dataclass(frozen=True)
class ExportResult:
    """One exported network.

    Attributes:
        path: The ONNX file.
        stage: ``"global"``, ``"local"``, ``"local2"`` ...
        fp16: Whether the file computes in float16.
        max_abs_diff: Largest absolute difference of ONNX Runtime's outputs (logits and
            signed-log displacements) from the float32 torch network on random input,
            or NaN when not checked.
    """

    path: Path
    stage: str
    fp16: bool
    max_abs_diff: float


def cache_dir() -> Path:
    """Where on-the-fly exports and TensorRT engines are kept: ``$FASTLMK_CACHE_DIR``,
    else ``~/.cache/fastlmk``."""
    env = os.environ.get("FASTLMK_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fastlmk"


def model_hash(model: LandmarkModel) -> str:
    """SHA-256 (16 hex digits) of the model's configuration and weights.

    Two models with the same ``model.json`` content and the same weights hash equally,
    wherever they are stored; any change of a weight changes the hash.
    """
    cached = _HASHES.get(model)
    if cached is not None:
        return cached
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for net in (model.network(stage) for stage in model.stage_names):
        for name, t in net.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()[:16]
    _HASHES[model] = digest
    return digest


def onnx_file(stage: str, fp16: bool = False) -> str:
    """File name of a stage's ONNX export: ``global.onnx``, ``local.fp16.onnx`` ..."""
    return f"{stage}{'.fp16' if fp16 else ''}.onnx"


def onnx_files(model: LandmarkModel, fp16: bool = False) -> dict[str, Path]:
    """The ONNX file of each stage of ``model``, exported first when missing.

    Files next to ``model.json`` are used when all are present (bundled models ship
    them); otherwise the model is exported once into ``cache_dir()/onnx/<model_hash>``.

    Returns:
        ``{"global": path, "local": path, ...}``: one per :attr:`LandmarkModel.stage_names`.
    """
    stages = model.stage_names
    if model.path is not None:
        here = {s: Path(model.path) / onnx_file(s, fp16) for s in stages}
        if all(p.is_file() for p in here.values()):
            return here
    target = cache_dir() / "onnx" / model_hash(model)
    files = {s: target / onnx_file(s, fp16) for s in stages}
    if not all(p.is_file() for p in files.values()):
        export_onnx(model, target, fp16=fp16, check=False)
    return files


def _network(model: LandmarkModel, stage: str) -> LandmarkFCN | NetworkEnsemble:
    if stage not in model.stage_names:
        raise ExportError(f"model {model.config.name!r} has no {stage} stage to export")
    return model.network(stage)


def _example_shapes(model: LandmarkModel, stage: str) -> list[tuple[int, ...]]:
    """Two input shapes ``(B, C, *S)`` per stage: one to trace, one to test dynamic axes."""
    net = _network(model, stage)
    s, dim = net.spec.input_multiple, model.dim
    if stage == "global":
        return [(1, 1, *([4 * s] * dim)), (2, 1, *[(3 + k) * s for k in range(dim)])]
    crop = model.config.local_stages[stage].crop_size
    return [(1, net.groups, *crop), (2, net.groups, *[c + s for c in crop])]


def _write_atomically(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    dim = example.dim() - 2
    spatial = {0: "batch", **{2 + k: f"s{k}" for k in range(dim)}}
    grid = {0: "batch", **{2 + k: f"g{k}" for k in range(dim)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write to a temporary file and rename, so a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter (no onnxscript dependency) announces its deprecation.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                net,
                (example,),
                tmp,
                dynamo=False,
                input_names=[_INPUT],
                output_names=list(_OUTPUTS),
                dynamic_axes={_INPUT: spatial, _OUTPUTS[0]: grid, _OUTPUTS[1]: grid},
                opset_version=_OPSET,
                do_constant_folding=True,
            )
        # mkstemp creates the file private (0600); give it the usual permissions.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        raise ExportError(f"ONNX export of {path.name} failed: {exc}") from exc


def max_abs_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest ``|a - b|`` in float64; equal infinities count as equal, and a NaN or an
    unmatched infinity as ``inf``, so that a broken output can never look like a match."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    with np.errstate(invalid="ignore"):
        diff = np.where(a64 == b64, 0.0, np.abs(a64 - b64))
    return float(np.where(np.isnan(diff), np.inf, diff).max(initial=0.0))


def check_onnx(path: Path, net: torch.nn.Module, shapes: list[tuple[int, ...]]) -> float:
    """Largest absolute output difference of ONNX Runtime (CPU) running ``path`` from the
    float32 torch ``net``, on seeded uniform [0, 1] input of each shape ``(B, C, *S)``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtype = np.float16 if session.get_inputs()[0].type == "tensor(float16)" else np.float32
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in shapes:
        x = torch.rand(shape, generator=gen)
        with torch.inference_mode():
            ref = net.float()(x)
        got = session.run(None, {_INPUT: x.numpy().astype(dtype)})
        for a, b in zip(got, ref, strict=True):
            worst = max(worst, max_abs_difference(a, b.double().numpy()))
    return worst


def export_onnx(
    model: LandmarkModel,
    directory: str | Path | None = None,
    *,
    fp16: bool = False,
    check: bool = True,
) -> list[ExportResult]:
    """Export the global and local networks of ``model`` to ONNX.

    Args:
        model: A loaded model.
        directory: Output directory; the model's own directory when None.
        fp16: Write float16 networks (``*.fp16.onnx``: weights, inputs and outputs).
        check: Run each file with ONNX Runtime and compare it with torch (needs
            ``onnxruntime``).

    Returns:
        One :class:`ExportResult` per stage.

    Raises:
        ExportError: no output directory, or the export failed.
    """
    if directory is None:
        if model.path is None:
            raise ExportError("this model was not loaded from a directory: pass `directory`")
        directory = model.path
    out = Path(directory)
    results = []
    for stage in model.stage_names:
        net = _network(model, stage)
        shapes = _example_shapes(model, stage)
        example = torch.rand(shapes[0], generator=torch.Generator().manual_seed(0))
        path = out / onnx_file(stage, fp16)
        if fp16:
            _write_atomically(copy.deepcopy(net).half().eval(), example.half(), path)
        else:
            _write_atomically(net.eval(), example, path)
        diff = check_onnx(path, net, shapes) if check else float("nan")
        results.append(ExportResult(path, stage, fp16, diff))
    return results
