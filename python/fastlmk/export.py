"""ONNX export of a model's networks, checked against torch.

``export_onnx`` writes, next to ``model.json`` (or into any directory)::

    global.onnx        the global network      image (B, 1, *S) -> logits, disp
    local.onnx         the L local networks    crops (B, L, *P) -> logits, disp
    local2.onnx ...    further local stages (other spacings), if the model has them
    *.fp16.onnx        the same in float16 (weights, inputs and outputs)

Batch and spatial axes are dynamic (every spatial size must be a multiple of the
network's stride). Every file is run with ONNX Runtime on random input at two shapes and
compared with the float32 torch network; the largest absolute difference is returned.

Every file written into a directory is recorded in that directory's ``onnx.json``
(:data:`RECORD_FILE`) with the hash of the network it was exported from
(:func:`network_hash`: architecture and weights of its stage). A file next to
``model.json`` is used only while its record matches the model's current weights: a file
without a record, or exported from other weights (retrained, edited, or overwritten by
:meth:`~fastlmk.model.LandmarkModel.save`), is ignored with a :class:`StaleOnnxWarning`,
so it can never give the answers of another network.

Models without current ONNX files next to them are exported on the fly into a cache
directory (:func:`cache_dir`), keyed by :func:`model_hash`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import tempfile
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import FastlmkError
from .model import LandmarkModel
from .networks import LandmarkFCN, NetworkEnsemble

__all__ = [
    "RECORD_FILE",
    "ExportError",
    "ExportResult",
    "StaleOnnxWarning",
    "cache_dir",
    "check_onnx",
    "current_onnx_files",
    "export_onnx",
    "max_abs_difference",
    "model_hash",
    "network_hash",
    "onnx_file",
    "onnx_files",
    "read_onnx_record",
    "record_onnx_files",
    "remove_stale_onnx",
]

# Opset 17 is read by every ONNX Runtime >= 1.17 and TensorRT 10.
_OPSET = 17
_INPUT, _OUTPUTS = "image", ("logits", "disp")
# Hashing reads every weight: do it once per loaded model.
# model -> (the config it was computed for, hash): a new config (e.g. recalibrated
# thresholds) is a new hash, while unchanged models skip re-hashing their weights.
_HASHES: weakref.WeakKeyDictionary[LandmarkModel, tuple[object, str]] = weakref.WeakKeyDictionary()

#: The file, in a directory of ONNX files, that records which network each was made from.
RECORD_FILE = "onnx.json"
_RECORD_VERSION = 1
# The ONNX files of a model's stages: global / local / local2 ..., float32, fp16 or int8.
_ONNX_NAME = re.compile(r"(global|local(?:[2-9]|[1-9][0-9]+)?)(?:\.fp16|\.int8)?\.onnx")


class ExportError(FastlmkError):
    """An ONNX export failed or does not reproduce the torch network."""


class StaleOnnxWarning(UserWarning):
    """An ONNX file next to ``model.json`` was not (or not provably) exported from the
    model's current weights, and is not used."""


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
    if cached is not None and cached[0] is model.config:
        return cached[1]
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for net in (model.network(stage) for stage in model.stage_names):
        for name, t in net.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    digest = h.hexdigest()[:16]
    _HASHES[model] = (model.config, digest)
    return digest


def _state_hash(
    net: LandmarkFCN | NetworkEnsemble, state: Mapping[str, torch.Tensor] | None = None
) -> str:
    """SHA-256 of a stage network's architecture and of ``state`` (default: its own)."""
    arch = {
        "spec": net.spec.to_dict(),
        "dim": net.dim,
        "landmarks": net.n_landmarks,
        "groups": net.groups,
    }
    h = hashlib.sha256(json.dumps(arch, sort_keys=True).encode())
    for name, t in (net.state_dict() if state is None else state).items():
        a = t.detach().cpu().contiguous().numpy()
        # Little-endian bytes, so that a record written on one machine holds on any other.
        a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
        h.update(f"{name}|{a.dtype.str}|{list(a.shape)}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def network_hash(model: LandmarkModel, stage: str) -> str:
    """SHA-256 of the architecture and weights of one stage's network.

    This is what an ONNX file of the stage is made from: it identifies the weights an
    exported file belongs to (see :data:`RECORD_FILE`). Unlike :func:`model_hash` it
    ignores the rest of ``model.json`` (thresholds, description, other stages), so
    editing those keeps the stage's exported files valid.
    """
    return _state_hash(_network(model, stage))


def onnx_file(stage: str, fp16: bool = False) -> str:
    """File name of a stage's ONNX export: ``global.onnx``, ``local.fp16.onnx`` ..."""
    return f"{stage}{'.fp16' if fp16 else ''}.onnx"


def read_onnx_record(directory: str | Path) -> dict[str, dict[str, str]]:
    """The record of a directory's ONNX files: ``{file name: {"stage": ..., "network_hash":
    ...}}``; empty when the directory has no (readable) :data:`RECORD_FILE`."""
    try:
        raw = json.loads((Path(directory) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return {}
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, dict):
        return {}
    return {
        str(name): {"stage": str(e["stage"]), "network_hash": str(e["network_hash"])}
        for name, e in files.items()
        if isinstance(e, dict) and "stage" in e and "network_hash" in e
    }


def _write_record(directory: Path, record: Mapping[str, Mapping[str, str]]) -> None:
    path = directory / RECORD_FILE
    if not record:
        path.unlink(missing_ok=True)
        return
    text = json.dumps(
        {"format_version": _RECORD_VERSION, "files": dict(sorted(record.items()))}, indent=2
    )
    # Written whole and renamed, so that a reader never sees half a record.
    tmp = path.with_name(f".{RECORD_FILE}.{os.getpid()}.tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def _update_record(
    directory: Path, added: Mapping[str, Mapping[str, str]], removed: Iterable[str] = ()
) -> None:
    record = read_onnx_record(directory)
    for name in removed:
        record.pop(name, None)
    record.update({name: dict(entry) for name, entry in added.items()})
    _write_record(directory, record)


def record_onnx_files(
    model: LandmarkModel, directory: str | Path | None = None, files: Iterable[str] | None = None
) -> dict[str, str]:
    """Record existing ONNX files as exported from ``model``'s current weights.

    For files exported by a fastlmk without records (they are otherwise ignored as
    stale): record them only when they are known to come from these very weights,
    since a file that does not is then used as if it did.

    Args:
        model: The model the files were exported from.
        directory: Where the files are; the model's own directory when None.
        files: File names (``global.int8.onnx`` ...); None: every stage's float32, fp16
            and int8 file that exists.

    Returns:
        ``{file name: network hash}`` of the files recorded.

    Raises:
        ExportError: no directory, a file missing, or a name that is no stage's file.
    """
    if directory is None:
        if model.path is None:
            raise ExportError("this model was not loaded from a directory: pass `directory`")
        directory = model.path
    out = Path(directory)
    if files is None:
        files = [
            name
            for stage in model.stage_names
            for name in (onnx_file(stage), onnx_file(stage, True), f"{stage}.int8.onnx")
            if (out / name).is_file()
        ]
    added: dict[str, dict[str, str]] = {}
    for name in files:
        match = _ONNX_NAME.fullmatch(name)
        if match is None or match.group(1) not in model.stage_names:
            raise ExportError(
                f"{name} is not the ONNX file of a stage of model {model.config.name!r} "
                f"(stages: {', '.join(model.stage_names)})"
            )
        if not (out / name).is_file():
            raise ExportError(f"cannot record {out / name}: no such file")
        stage = match.group(1)
        added[name] = {"stage": stage, "network_hash": network_hash(model, stage)}
    _update_record(out, added)
    return {name: entry["network_hash"] for name, entry in added.items()}


def current_onnx_files(model: LandmarkModel, files: Mapping[str, Path]) -> dict[str, Path]:
    """The files among ``files`` (``{stage: path}``) recorded as exported from the
    model's current weights; each other existing file is left out with a
    :class:`StaleOnnxWarning`, missing ones silently."""
    current: dict[str, Path] = {}
    records: dict[Path, dict[str, dict[str, str]]] = {}
    for stage, path in files.items():
        if not path.is_file():
            continue
        if path.parent not in records:
            records[path.parent] = read_onnx_record(path.parent)
        entry = records[path.parent].get(path.name)
        if entry is not None and entry == {
            "stage": stage,
            "network_hash": network_hash(model, stage),
        }:
            current[stage] = path
            continue
        why = (
            f"has no record in {RECORD_FILE} of the weights it was exported from"
            if entry is None
            else f"was exported from other weights than the model's current {stage} network"
        )
        redo = f"fastlmk export {path.parent}" + (
            " --int8 --calibration IMAGES"
            if path.name.endswith(".int8.onnx")
            else " --fp16"
            if path.name.endswith(".fp16.onnx")
            else ""
        )
        warnings.warn(
            f"{path} {why}, so it is not used (the network runs from the weights instead). "
            f"Re-export it (`{redo}`) or delete it; if it is known to come from these "
            "very weights, fastlmk.export.record_onnx_files records it",
            StaleOnnxWarning,
            stacklevel=2,
        )
    return current


def remove_stale_onnx(directory: str | Path, hashes: Mapping[str, str]) -> list[Path]:
    """Delete the stage ONNX files in ``directory`` that do not belong to the weights
    whose :func:`network_hash` per stage is ``hashes``: files of other stages, of other
    weights, or without a record. Their record entries go too.

    Returns:
        The deleted files.
    """
    out = Path(directory)
    record = read_onnx_record(out)
    removed: list[Path] = []
    for path in sorted(out.glob("*.onnx")):
        match = _ONNX_NAME.fullmatch(path.name)
        if match is None or not path.is_file():
            continue
        stage, entry = match.group(1), record.get(path.name)
        if stage in hashes and entry == {"stage": stage, "network_hash": hashes[stage]}:
            continue
        path.unlink()
        removed.append(path)
    kept = {name: e for name, e in record.items() if (out / name).is_file()}
    if kept != record:
        _write_record(out, kept)
    return removed


def onnx_files(model: LandmarkModel, fp16: bool = False) -> dict[str, Path]:
    """The ONNX file of each stage of ``model``, exported first when missing.

    Files next to ``model.json`` are used when every stage has one recorded as exported
    from its current weights (bundled models ship them; see :func:`current_onnx_files`);
    otherwise the model is exported once into ``cache_dir()/onnx/<model_hash>``.

    Returns:
        ``{"global": path, "local": path, ...}``: one per :attr:`LandmarkModel.stage_names`.
    """
    stages = model.stage_names
    if model.path is not None:
        here = {s: Path(model.path) / onnx_file(s, fp16) for s in stages}
        if all(p.is_file() for p in here.values()):
            if len(current_onnx_files(model, here)) == len(here):
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


def _make_directory(directory: Path) -> None:
    """Create ``directory`` (and its parents) for ONNX files.

    Raises:
        ExportError: it, or a parent, exists as a file, or it cannot be created.
    """
    from .io import make_output_directory

    make_output_directory(directory, ExportError, "ONNX files")


def _write_atomically(net: torch.nn.Module, example: torch.Tensor, path: Path) -> None:
    dim = example.dim() - 2
    spatial = {0: "batch", **{2 + k: f"s{k}" for k in range(dim)}}
    grid = {0: "batch", **{2 + k: f"g{k}" for k in range(dim)}}
    _make_directory(path.parent)
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

    Each file is recorded in the directory's :data:`RECORD_FILE` with the hash of the
    network it was exported from.

    Returns:
        One :class:`ExportResult` per stage.

    Raises:
        ExportError: no output directory, the output is a file, or the export failed.
    """
    if directory is None:
        if model.path is None:
            raise ExportError("this model was not loaded from a directory: pass `directory`")
        directory = model.path
    out = Path(directory)
    _make_directory(out)
    results = []
    for stage in model.stage_names:
        net = _network(model, stage)
        shapes = _example_shapes(model, stage)
        example = torch.rand(shapes[0], generator=torch.Generator().manual_seed(0))
        path = out / onnx_file(stage, fp16)
        # The file's entry goes before it is replaced and comes back after: at no moment
        # does the record vouch for a file of other weights (a failure leaves none).
        _update_record(out, {}, removed=[path.name])
        if fp16:
            _write_atomically(copy.deepcopy(net).half().eval(), example.half(), path)
        else:
            _write_atomically(net.eval(), example, path)
        _update_record(out, {path.name: {"stage": stage, "network_hash": _state_hash(net)}})
        diff = check_onnx(path, net, shapes) if check else float("nan")
        results.append(ExportResult(path, stage, fp16, diff))
    return results
