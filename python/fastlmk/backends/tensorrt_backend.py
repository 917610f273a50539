"""The TensorRT backend: engines built from the model's ONNX files, run on an NVIDIA GPU.

UNTESTED: TensorRT cannot be installed on the machines fastlmk is developed on. This
module is written against the documented TensorRT 10 Python API (name-based tensors,
``execute_async_v3``) and kept apart from the rest of fastlmk; its tests skip without
TensorRT and a GPU.

* Build: the ONNX file (:func:`fastlmk.export.onnx_files`) is parsed, one optimisation
  profile covers the input shapes (batch 1..``max_batch``; spatial sizes from one stride
  up to the next power of two above the shape seen, optimised for that shape), float32
  or float16 (``BuilderFlag.FP16``), with a timing cache kept beside the engines.
* Cache: serialised engines live in ``cache_dir()/engines/``, named by model hash, stage,
  precision, shape bucket, TensorRT version and GPU name; a change of any of them builds
  a new engine.
* Run: each engine is deserialised once; input and output buffers are torch CUDA
  tensors bound by name; ``execute_async_v3`` runs on the backend's own CUDA stream,
  ordered after the caller's stream and before it again, so outputs stay on the device
  for the CUDA vote.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import FastlmkError
from . import BackendUnavailableError

if TYPE_CHECKING:
    from ..model import LandmarkModel

__all__ = ["TensorRTBackend", "TensorRTError"]

_WORKSPACE_BYTES = 2 << 30
_INPUT = "image"


class TensorRTError(FastlmkError):
    """TensorRT could not parse, build or run an engine."""


def _bucket(n: int, stride: int) -> int:
    """Largest spatial size an engine built for size ``n`` accepts: a power of two."""
    size = 2 * stride
    while size < n:
        size *= 2
    return size


class _Engine:
    """One deserialised engine and its execution context."""

    def __init__(self, trt: Any, runtime: Any, plan: bytes, device: torch.device) -> None:
        self._trt = trt
        self.engine = runtime.deserialize_cuda_engine(plan)
        if self.engine is None:
            raise TensorRTError("TensorRT could not deserialise a cached engine; delete it")
        self.context = self.engine.create_execution_context()
        self.device = device
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = ["logits", "disp"]  # the export's output names, in this order
        if sorted(names) != sorted([*self.inputs, *self.outputs]) or self.inputs != [_INPUT]:
            raise TensorRTError(f"engine tensors {names} are not fastlmk's {_INPUT}/logits/disp")
        self.dtype = (
            torch.float16
            if self.engine.get_tensor_dtype(self.inputs[0]) == trt.DataType.HALF
            else torch.float32
        )

    def run(self, x: torch.Tensor, stream: torch.cuda.Stream) -> tuple[torch.Tensor, ...]:
        x = x.to(self.device, self.dtype).contiguous()
        if not self.context.set_input_shape(_INPUT, tuple(x.shape)):
            raise TensorRTError(f"TensorRT rejected input shape {tuple(x.shape)}")
        self.context.set_tensor_address(_INPUT, x.data_ptr())
        outputs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            out = torch.empty(shape, dtype=self.dtype, device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        caller = torch.cuda.current_stream(self.device)
        stream.wait_stream(caller)  # the input was written on the caller's stream
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise TensorRTError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        caller.wait_stream(stream)
        for t in (x, *outputs):
            t.record_stream(stream)  # keep the buffers alive until the engine is done
        return tuple(o.float() for o in outputs)


class TensorRTBackend:
    """Runs a model's networks as TensorRT engines on a CUDA GPU.

    Args:
        model: The model.
        fp16: Build float16 engines (float32 inputs and outputs are converted).
        device: The CUDA device; the current one when None.
        max_batch: Largest batch an engine accepts.

    Raises:
        BackendUnavailableError: tensorrt is not installed or no GPU is visible.
    """

    name = "tensorrt"

    def __init__(
        self,
        model: LandmarkModel,
        fp16: bool = False,
        device: torch.device | None = None,
        max_batch: int = 8,
    ) -> None:
        try:
            import tensorrt as trt
        except ImportError as exc:
            raise BackendUnavailableError(
                "backend 'tensorrt' needs TensorRT 10: pip install 'fastlmk[tensorrt]' "
                "(NVIDIA GPUs only); or use backend='torch-cuda'"
            ) from exc
        if not torch.cuda.is_available():
            raise BackendUnavailableError("backend 'tensorrt' needs a CUDA GPU")
        self._trt = trt
        self.device = device or torch.device("cuda", torch.cuda.current_device())
        self.fp16 = fp16
        self.max_batch = max_batch
        self._model = model
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._stream = torch.cuda.Stream(self.device)
        self._engines: dict[tuple[str, tuple[int, ...]], _Engine] = {}

    # -- engine cache ------------------------------------------------------------------

    def _cache(self) -> Path:
        from ..export import cache_dir

        return cache_dir() / "engines"

    def _tag(self) -> str:
        gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(self.device)).strip("-")
        return f"trt{self._trt.__version__}-{gpu}"

    def _engine(self, stage: str, shape: tuple[int, ...]) -> _Engine:
        from ..export import network_hash

        net = self._model.network(stage)  # ModelError for a stage the model lacks
        multiple = net.spec.input_multiple  # every member of an ensemble must fit
        bucket = tuple(_bucket(n, multiple) for n in shape[2:])
        key = (stage, bucket)
        if key not in self._engines:
            precision = "fp16" if self.fp16 else "fp32"
            size = "x".join(map(str, bucket))
            # Keyed by the stage network's own weights: an engine is valid for exactly
            # those, whatever else in model.json (thresholds, other stages) changes.
            plan_path = self._cache() / (
                f"{network_hash(self._model, stage)}-{stage}-{precision}-{size}-{self._tag()}.plan"
            )
            if not plan_path.is_file():
                self._build(stage, shape, bucket, multiple, plan_path)
            self._engines[key] = _Engine(
                self._trt, self._runtime, plan_path.read_bytes(), self.device
            )
        return self._engines[key]

    def _build(
        self,
        stage: str,
        shape: tuple[int, ...],
        bucket: tuple[int, ...],
        stride: int,
        plan_path: Path,
    ) -> None:
        from ..export import onnx_files

        trt = self._trt
        onnx_path = onnx_files(self._model)[stage]
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(onnx_path.read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, _WORKSPACE_BYTES)
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        channels = shape[1]
        profile = builder.create_optimization_profile()
        profile.set_shape(
            _INPUT,
            (1, channels, *([stride] * len(bucket))),
            tuple(shape),
            (self.max_batch, channels, *bucket),
        )
        config.add_optimization_profile(profile)
        timing_path = self._cache() / f"timing-{self._tag()}.cache"
        timing = config.create_timing_cache(
            timing_path.read_bytes() if timing_path.is_file() else b""
        )
        config.set_timing_cache(timing, False)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise TensorRTError(f"TensorRT could not build an engine from {onnx_path}")
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = plan_path.with_suffix(".tmp")
        tmp.write_bytes(bytes(plan))
        tmp.replace(plan_path)
        timing_path.write_bytes(bytes(timing.serialize()))

    # -- Backend interface ---------------------------------------------------------------

    def _run(self, stage: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, disp = self._engine(stage, tuple(x.shape)).run(x, self._stream)
        return logits, disp

    def run_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run("global", x)

    def run_local(self, x: torch.Tensor, stage: str = "local") -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(stage, x)
