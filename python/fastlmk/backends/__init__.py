"""Inference backends: run a model's global and local networks.

A backend takes float32 arrays ``(B, C, *S)`` and returns the networks' raw outputs
``(logits (B, L, *G), disp (B, L * D, *G))`` as torch tensors. The choice is made by
``localize(..., backend=...)``; ``"auto"`` picks the fastest one available.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

from ..errors import FastlmkError

if TYPE_CHECKING:
    from ..model import LandmarkModel

__all__ = ["BACKENDS", "Backend", "get_backend"]

BACKENDS = ("auto", "torch")


class Backend(Protocol):
    """Runs the networks of one model."""

    name: str

    def run_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def run_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def get_backend(model: LandmarkModel, name: str = "auto") -> Backend:
    """The backend called ``name`` for ``model``, created once and cached on the model."""
    if name not in BACKENDS:
        raise FastlmkError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    resolved = "torch" if name == "auto" else name
    cached = model._backends.get(resolved)
    if cached is None:
        from .torch_backend import TorchBackend

        cached = TorchBackend(model)
        model._backends[resolved] = cached
    return cached
