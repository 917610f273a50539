"""Int8 ONNX networks for the CPU, calibrated on real images.

``quantize_int8`` writes, next to a model's float32 ONNX files::

    global.int8.onnx   the global network, int8 weights (per output channel) and int8
    local.int8.onnx    activations; the two heads (classification, displacement) stay
    local2.int8.onnx   float32, so the vote reads float32 logits and displacements
    ...                (further local stages, if the model has them)

The L local networks run as one grouped network in float32; their int8 file holds them
ungrouped, one graph per landmark side by side (same input and outputs): ONNX Runtime's
int8 convolutions have no fast kernel for grouped convolutions, and separate graphs give
every landmark's activations their own quantization scales.

The activation ranges come from the inputs the networks actually see: the float32
pipeline is run on the calibration images and every global input and local crop batch is
recorded. Static quantization in ONNX Runtime's operator format (QLinearConv) runs on the
CPU's 8-bit dot-product instructions (AVX-512 VNNI / AVX-VNNI).

Int8 changes the numbers: check the accuracy on held-out images before relying on it
(``benchmarks/accuracy_isbi2015.py --backend onnxruntime-int8 --split val``).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .errors import FastlmkError
from .export import (
    ExportError,
    _example_shapes,
    _make_directory,
    _state_hash,
    _update_record,
    _write_atomically,
    max_abs_difference,
    onnx_files,
)
from .networks import ungrouped

if TYPE_CHECKING:
    from .model import LandmarkModel

__all__ = [
    "QuantizeResult",
    "calibration_inputs",
    "check_calibration_images",
    "int8_file",
    "quantize_int8",
]


def int8_file(stage: str) -> str:
    """File name of a stage's int8 network: ``global.int8.onnx`` / ``local.int8.onnx``."""
    return f"{stage}.int8.onnx"


@dataclass(frozen=True)
class QuantizeResult:
    """One quantized network.

    Attributes:
        path: The int8 ONNX file.
        stage: ``"global"``, ``"local"``, ``"local2"`` ...
        calibration_batches: Recorded network inputs its activation ranges come from.
        max_abs_diff: Largest absolute difference of its outputs (logits, signed-log
            displacements) from the float32 ONNX network on the calibration inputs.
    """

    path: Path
    stage: str
    calibration_batches: int
    max_abs_diff: float


class _Recorder:
    """A backend that runs another one and keeps a float32 copy of every input."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.inputs: dict[str, list[np.ndarray]] = {"global": []}

    def run_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.inputs["global"].append(x.detach().cpu().float().numpy().copy())
        return self.inner.run_global(x)

    def run_local(self, x: torch.Tensor, stage: str = "local") -> tuple[torch.Tensor, torch.Tensor]:
        self.inputs.setdefault(stage, []).append(x.detach().cpu().float().numpy().copy())
        return self.inner.run_local(x, stage)


def calibration_inputs(
    model: LandmarkModel,
    images: Sequence[Any],
    spacing: float | tuple[float, ...] | None = None,
) -> dict[str, list[np.ndarray]]:
    """The network inputs of the float32 pipeline on ``images``.

    Args:
        model: The model.
        images: Anything :func:`fastlmk.localize` accepts (paths, arrays, images).
        spacing: Pixel spacing in mm for inputs that carry none (2D image files, arrays).

    Returns:
        ``{"global": [(1, 1, *S) arrays], "local": [(1, L, *P) arrays], ...}`` (float32;
        one key per stage the model has), one entry per image.
    """
    from .backends import get_backend
    from .inference import _localize

    recorder = _Recorder(get_backend(model, "torch"))
    for image in images:
        _localize(image, model, spacing=spacing, backend=recorder)
    return recorder.inputs


def _float_nodes(path: Path) -> list[str]:
    """Names of the nodes that stay float32: everything outside the networks' stems and
    bodies (the heads, so the vote reads float32 logits and displacements, and in an
    ensemble the ops that lay the members' outputs out as one vote)."""
    import onnx

    graph = onnx.load(str(path)).graph
    return [n.name for n in graph.node if "/stem/" not in n.name and "/body/" not in n.name]


def _source_onnx(model: LandmarkModel, stage: str, fp32: Path, tmp: Path) -> Path:
    """The float32 graph to quantize: the exported file, except for grouped (local)
    networks, which are exported ungrouped (one graph per landmark, same outputs), so
    every landmark's network gets its own activation scales and ONNX Runtime's fast
    int8 convolution kernels (it has none for grouped convolutions)."""
    net = model.network(stage)
    if net.groups == 1:
        return fp32
    path = tmp / "ungrouped.onnx"
    shape = _example_shapes(model, stage)[0]
    _write_atomically(ungrouped(net).eval(), torch.rand(shape), path)
    return path


class _Reader:
    """ONNX Runtime calibration reader over recorded inputs."""

    def __init__(self, arrays: list[np.ndarray]) -> None:
        self._it: Iterator[np.ndarray] = iter(arrays)

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self._it, None)
        return None if x is None else {"image": x}


def _max_diff(reference: Path, quantized: Path, arrays: list[np.ndarray]) -> float:
    import onnxruntime as ort

    ref = ort.InferenceSession(str(reference), providers=["CPUExecutionProvider"])
    q = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in arrays:
        for a, b in zip(ref.run(None, {"image": x}), q.run(None, {"image": x}), strict=True):
            worst = max(worst, max_abs_difference(a, b))
    return worst


def quantize_int8(
    model: LandmarkModel,
    images: Sequence[Any],
    *,
    spacing: float | tuple[float, ...] | None = None,
    directory: str | Path | None = None,
    stages: Sequence[str] | None = None,
) -> list[QuantizeResult]:
    """Write int8 versions of the model's ONNX networks, calibrated on ``images``.

    Args:
        model: A loaded model.
        images: Calibration images (use training images, never the test set); 10-30
            are enough for the activation ranges.
        spacing: Pixel spacing in mm for images that carry none.
        directory: Output directory; the model's own directory when None.
        stages: Which networks to quantize (None: all of the model's stages). The ONNX
            Runtime backend runs int8 for the stages that have an int8 file and float32
            for the others; the local stages set the final precision, so they are the
            ones most sensitive to int8.

    Each file is recorded in the directory's ``onnx.json`` with the hash of the network
    it was made from (see :data:`fastlmk.export.RECORD_FILE`).

    Returns:
        One :class:`QuantizeResult` per quantized stage.

    Raises:
        ExportError: no images, an unknown stage, no output directory, the output is a
            file, or onnxruntime missing.
    """
    if not images:
        raise ExportError("int8 calibration needs at least one image")
    fp32_files = onnx_files(model)
    if stages is None:
        stages = list(fp32_files)
    if len(set(stages)) != len(stages):
        raise ExportError(f"stages {list(stages)} name a stage more than once")
    unknown = sorted(set(stages) - set(fp32_files))
    if unknown or not stages:
        raise ExportError(
            f"cannot quantize stage(s) {unknown or list(stages)}: model {model.config.name!r} "
            f"has {', '.join(fp32_files)}"
        )
    if directory is None:
        if model.path is None:
            raise ExportError("this model was not loaded from a directory: pass `directory`")
        directory = model.path
    try:
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError as exc:
        raise ExportError(
            "int8 quantization needs onnxruntime: pip install 'fastlmk[onnx]'"
        ) from exc

    out = Path(directory)
    _make_directory(out)
    inputs = calibration_inputs(model, images, spacing)
    results = []
    for stage in stages:
        fp32, arrays = fp32_files[stage], inputs[stage]
        path = out / int8_file(stage)
        with tempfile.TemporaryDirectory() as tmp:
            # Shape inference + graph cleanup first, as ONNX Runtime recommends for
            # static quantization.
            pre = Path(tmp) / "pre.onnx"
            source = _source_onnx(model, stage, fp32, Path(tmp))
            quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
            staged = Path(tmp) / "int8.onnx"
            try:
                quantize_static(
                    str(pre),
                    str(staged),
                    _Reader(arrays),
                    quant_format=QuantFormat.QOperator,
                    per_channel=True,
                    weight_type=QuantType.QInt8,
                    activation_type=QuantType.QUInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    nodes_to_exclude=_float_nodes(pre),
                )
            except Exception as exc:
                raise ExportError(f"int8 quantization of {fp32.name} failed: {exc}") from exc
            # As in export_onnx: no record entry while the file is replaced.
            _update_record(out, {}, removed=[path.name])
            staged.replace(path)
        network = {"stage": stage, "network_hash": _state_hash(model.network(stage))}
        _update_record(out, {path.name: network})
        results.append(QuantizeResult(path, stage, len(arrays), _max_diff(fp32, path, arrays)))
    return results


def check_calibration_images(images: Sequence[str | Path]) -> list[Path]:
    """The image files among ``images``: files as given, directories and glob patterns
    expanded by :func:`fastlmk.io.list_images`.

    Raises:
        FastlmkError: an entry matches nothing, or no image is found.
    """
    from .io import list_images

    found: list[Path] = []
    for item in images:
        p = Path(item)
        if p.is_file():
            found.append(p)
        elif p.is_dir() or any(ch in str(item) for ch in "*?["):
            found += list_images(item).values()
        else:
            raise FastlmkError(f"calibration image not found: {p}")
    if not found:
        raise FastlmkError(f"no calibration images in {', '.join(map(str, images))}")
    return found
