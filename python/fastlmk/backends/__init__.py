"""Inference backends: run a model's global and local networks.

A backend takes float32 tensors ``(B, C, *S)`` (spatial axes in array order) on its
:attr:`Backend.device` and returns the networks' raw outputs
``(logits (B, L, *G), disp (B, L * D, *G))`` as float32 torch tensors on the same device.
The choice is made by ``localize(..., backend=...)``:

* ``"torch"``: the model's torch networks, on the CPU or on CUDA (``"torch-cuda"``
  forces the GPU; ``"torch-cuda-graphs"`` replays each network as a CUDA graph per
  input shape, see :class:`~fastlmk.backends.torch_backend.CudaGraphRunner`).
* ``"onnxruntime"``: ONNX Runtime on the CPU (the CPU default): the model's int8
  networks when it ships them (``*.int8.onnx``, see :mod:`fastlmk.quantize`), else
  float32. ``"onnxruntime-fp32"`` and ``"onnxruntime-int8"`` force one precision.
* ``"tensorrt"``: TensorRT engines on an NVIDIA GPU (optional extra ``fastlmk[tensorrt]``).
* ``"auto"``: TensorRT when it is importable and a GPU is present, else torch on CUDA
  when a GPU is present, else ONNX Runtime on the CPU (torch on the CPU when
  onnxruntime is not installed).

A backend is created once per model and backend name and cached on the model.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Protocol

import torch

from ..errors import FastlmkError

if TYPE_CHECKING:
    from ..model import LandmarkModel

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "available_backends",
    "get_backend",
    "resolve_backend",
    "run_local_stages",
]

BACKENDS = (
    "auto",
    "torch",
    "torch-cuda",
    "torch-cuda-graphs",
    "onnxruntime",
    "onnxruntime-fp32",
    "onnxruntime-int8",
    "tensorrt",
)


class BackendUnavailableError(FastlmkError):
    """The requested backend cannot run here (a package or a GPU is missing)."""


class Backend(Protocol):
    """Runs the networks of one model."""

    name: str
    device: torch.device

    def run_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def run_local(
        self, x: torch.Tensor, stage: str = "local"
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


def run_local_stages(
    backend: Backend, crops: dict[str, torch.Tensor]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Run the networks of several local stages: ``{stage: crops}`` -> ``{stage: (logits,
    displacements)}``. A backend with a ``run_local_stages`` method of its own may run
    them side by side (ONNX Runtime does, on its own threads); otherwise one after the
    other with :meth:`Backend.run_local`."""
    own = getattr(backend, "run_local_stages", None)
    if own is not None:
        return own(crops)
    return {stage: backend.run_local(x, stage) for stage, x in crops.items()}


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def available_backends() -> list[str]:
    """Concrete backends (not ``"auto"``) that can run on this machine, in the order
    ``"auto"`` prefers them (it takes the first)."""
    gpu = torch.cuda.is_available()
    names = []
    if gpu and _importable("tensorrt"):
        names.append("tensorrt")
    if gpu:
        names += ["torch-cuda", "torch-cuda-graphs"]
    if _importable("onnxruntime"):
        names.append("onnxruntime")
    names.append("torch")
    return names


def resolve_backend(name: str) -> str:
    """The concrete backend ``name`` stands for (``"auto"`` -> the fastest available)."""
    if name not in BACKENDS:
        raise FastlmkError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return available_backends()[0] if name == "auto" else name


def get_backend(model: LandmarkModel, name: str = "auto") -> Backend:
    """The backend called ``name`` for ``model``, created once and cached on the model.

    Raises:
        FastlmkError: unknown name.
        BackendUnavailableError: the backend's package or a GPU is missing.
    """
    resolved = resolve_backend(name)
    cached: Backend | None = model._backends.get(resolved)
    if cached is not None:
        return cached
    backend: Backend
    if resolved.startswith("torch"):
        from .torch_backend import TorchBackend

        device = torch.device("cpu" if resolved == "torch" else "cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailableError(
                f"backend {resolved!r} needs a CUDA GPU and a CUDA build of torch; "
                "use backend='torch' or 'onnxruntime' on this machine"
            )
        backend = TorchBackend(model, device, cuda_graphs=resolved == "torch-cuda-graphs")
    elif resolved.startswith("onnxruntime"):
        from .onnxruntime_backend import OnnxRuntimeBackend

        precision = resolved.partition("-")[2] or "auto"
        backend = OnnxRuntimeBackend(model, precision=precision)
    else:
        from .tensorrt_backend import TensorRTBackend

        backend = TensorRTBackend(model)
    model._backends[resolved] = backend
    return backend
