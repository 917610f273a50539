"""The ONNX Runtime backend: the CPU default.

One inference session per network, created when the backend is made (once per model,
see :func:`fastlmk.backends.get_backend`), with all graph optimisations (batch-norm
folding, conv + activation fusion) and one intra-op thread per physical core: on CPUs
with SMT, a second thread per core competes for the same vector units and is slower.
A model with several local stages runs them side by side
(:meth:`OnnxRuntimeBackend.run_local_stages`), the cores shared out among them: the
local networks' small convolutions gain little from a second thread each (measured on
the cephalometric model's int8 networks: 20.9 against 19.6 ms, 8.4 against 9.3 ms), so
two stages on one core each finish sooner than one after the other on both.

Precision: ``"fp32"`` runs the float32 exports; ``"int8"`` the statically quantized
networks written by :func:`fastlmk.quantize.quantize_int8` (``*.int8.onnx`` next to
``model.json``) for the stages that have one, float32 for the others; ``"auto"`` takes
whatever int8 networks the model ships (bundled models ship only those whose accuracy
was checked on held-out images) and float32 for the rest.

Only files recorded as exported from the model's current weights are run (see
:func:`fastlmk.export.current_onnx_files`): a stale int8 file is left out with a warning,
and its stage runs in float32, exported from the weights.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..errors import ModelError
from . import BackendUnavailableError

if TYPE_CHECKING:
    from ..model import LandmarkModel

__all__ = ["OnnxRuntimeBackend", "physical_cores"]


def physical_cores() -> int:
    """Physical CPU cores this process may run on (logical CPUs / SMT siblings)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    logical = allowed or os.cpu_count() or 1
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return logical
    cores: set[tuple[str, str]] = set()
    phys = core = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            phys = value.strip()
        elif key == "core id":
            core = value.strip()
            cores.add((phys, core))
    n_logical = text.count("processor\t:") or logical
    smt = max(1, n_logical // len(cores)) if cores else 1
    return max(1, logical // smt)


def _files(model: LandmarkModel, precision: str) -> dict[str, tuple[Path, str]]:
    """The network file and its precision for each stage."""
    from ..export import current_onnx_files, onnx_files
    from ..quantize import int8_file

    if precision not in ("auto", "fp32", "int8"):
        raise ModelError(f"unknown ONNX Runtime precision {precision!r}: auto, fp32 or int8")
    stages = model.stage_names
    if precision == "fp32" or model.path is None:
        int8: dict[str, Path] = {}
    else:
        # A file from other weights would silently give another network's answers.
        int8 = current_onnx_files(model, {s: Path(model.path) / int8_file(s) for s in stages})
    if precision == "int8" and not int8:
        raise ModelError(
            f"model {model.config.name!r} has no int8 networks exported from its current "
            "weights next to its model.json: write them with "
            "`fastlmk export MODEL --int8 --calibration IMAGES`"
        )
    # The float32 files are exported (once, into the cache) only when a stage needs them.
    fp32 = onnx_files(model) if set(int8) != set(stages) else {}
    return {s: (int8[s], "int8") if s in int8 else (fp32[s], "fp32") for s in stages}


def _unloadable(model: LandmarkModel, path: Path, precision: str, exc: Exception) -> str:
    """The message for an ONNX file that ONNX Runtime cannot load."""
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = str(model.path) if model.path is not None else "MODEL"
    if model.path is not None and path.parent == Path(model.path):
        redo = (
            f"`fastlmk export {where} --int8 --calibration IMAGES`"
            if precision == "int8"
            else f"`fastlmk export {where}`"
        )
        fix = f"re-export it with {redo}, or delete it"
    else:  # the on-the-fly export in the cache directory
        fix = "delete it, and it is exported again when next needed"
    return (
        f"cannot load the {precision} ONNX network {path}: the file is damaged, truncated "
        f"or not an ONNX model ({reason}); {fix}"
    )


class OnnxRuntimeBackend:
    """Runs a model's exported ONNX networks with ONNX Runtime on the CPU.

    Args:
        model: The model; its ONNX files come from :func:`fastlmk.export.onnx_files`
            (next to ``model.json``, else exported once into the cache directory).
        threads: Cores to use; one per physical core when None. The global network
            gets all of them; several local stages share them out.
        precision: ``"auto"``, ``"fp32"`` or ``"int8"`` (see the module docstring).

    Attributes:
        files: The ONNX file each stage's network runs from.
        precision: The precision of each stage's network, ``"fp32"`` or ``"int8"``.
        threads: The intra-op threads of each stage's session.

    Raises:
        BackendUnavailableError: onnxruntime is not installed.
        ModelError: int8 asked for a model without (current) int8 files, an unknown
            precision, or an ONNX file that ONNX Runtime cannot load (damaged, truncated).
    """

    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(
        self, model: LandmarkModel, threads: int | None = None, precision: str = "auto"
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailableError(
                "backend 'onnxruntime' needs the onnxruntime package: "
                "pip install 'fastlmk[onnx]', or use backend='torch'"
            ) from exc
        files = _files(model, precision)
        self.files = {stage: path for stage, (path, _) in files.items()}
        self.precision = {stage: p for stage, (_, p) in files.items()}

        cores = threads or physical_cores()
        local_stages = [s for s in files if s != "global"]
        # Several local stages run side by side, each on its share of the cores.
        self._side_by_side = len(local_stages) > 1 and cores > 1
        self._local_count = len(local_stages)
        local_threads = max(1, cores // len(local_stages)) if self._side_by_side else cores

        def options(intra: int) -> Any:
            o = ort.SessionOptions()
            o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            o.intra_op_num_threads = intra
            o.inter_op_num_threads = 1
            o.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            # Idle ONNX Runtime threads otherwise spin for a while after each run and
            # take the cores from the steps (resampling, crops) that follow.
            o.add_session_config_entry("session.intra_op.allow_spinning", "0")
            return o

        self._model_name = model.config.name
        self.threads = {s: cores if s == "global" else local_threads for s in files}
        self._sessions: dict[str, Any] = {}
        for stage, (path, p) in files.items():
            try:
                self._sessions[stage] = ort.InferenceSession(
                    str(path), options(self.threads[stage]), providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime raises its own types, one per cause
                raise ModelError(_unloadable(model, path, p, exc)) from exc
        self._pool: ThreadPoolExecutor | None = None
        self._pool_pid = 0

    def _run(self, stage: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        session = self._sessions.get(stage)
        if session is None:
            raise ModelError(f"model {self._model_name!r} has no {stage} stage")
        array = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
        logits, disp = session.run(None, {"image": array})
        return torch.from_numpy(logits), torch.from_numpy(disp)

    def run_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._run("global", x)

    def run_local(self, x: torch.Tensor, stage: str = "local") -> tuple[torch.Tensor, torch.Tensor]:
        return self._run(stage, x)

    def run_local_stages(
        self, crops: dict[str, torch.Tensor]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Several local stages' networks, side by side on their share of the cores when
        the model has more than one local stage (ONNX Runtime releases the GIL while it
        runs); ``{stage: (1, L, *P) crops}`` -> ``{stage: (logits, displacements)}``."""
        if not self._side_by_side or len(crops) < 2:
            return {stage: self._run(stage, x) for stage, x in crops.items()}
        if self._pool is None or self._pool_pid != os.getpid():
            # A forked child inherits the pool object but not its threads: make a new one.
            self._pool = ThreadPoolExecutor(self._local_count, "fastlmk-ort")
            self._pool_pid = os.getpid()
        futures = {stage: self._pool.submit(self._run, stage, x) for stage, x in crops.items()}
        return {stage: f.result() for stage, f in futures.items()}
