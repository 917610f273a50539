"""The PyTorch backend (CPU; CUDA when the tensors given to it live there)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..model import LandmarkModel

__all__ = ["TorchBackend"]


class TorchBackend:
    """Runs the model's torch networks in inference mode on the inputs' device."""

    name = "torch"

    def __init__(self, model: LandmarkModel) -> None:
        self.model = model

    def run_global(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.model.global_net.to(x.device)
        with torch.inference_mode():
            return net(x)

    def run_local(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.model.local_net is None:
            raise RuntimeError("this model has no local stage")
        net = self.model.local_net.to(x.device)
        with torch.inference_mode():
            return net(x)
