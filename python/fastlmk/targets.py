"""Training targets and losses of the regression + classification networks.

For a network with output stride ``s``, output cell ``i`` covers input pixels
``[i*s, (i+1)*s)`` along each axis and its centre is ``c_i = i*s + (s-1)/2``. The
landmark at continuous input-pixel index ``y`` (array order) lies in the cell
``floor((y + 0.5) / s)`` — the cell holding the pixel nearest to ``y``.

Targets, per landmark and cell:
  * classification: 1 in the landmark's cell, 0 elsewhere (binary cross-entropy with a
    positive weight, since positives are one cell in the whole grid);
  * regression: ``signed_log10(y - c_i)`` on every cell (L1 loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .networks import cell_origin

__all__ = ["LossWeights", "cell_centres", "inverse_signed_log10", "landmark_loss", "signed_log10"]


def signed_log10(x: torch.Tensor) -> torch.Tensor:
    """``sign(x) * log10(1 + |x|)``: compresses long displacement vectors."""
    return torch.sign(x) * torch.log10(1.0 + x.abs())


def inverse_signed_log10(t: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`signed_log10`: ``sign(t) * (10**|t| - 1)``."""
    return torch.sign(t) * (torch.pow(10.0, t.abs()) - 1.0)


def cell_centres(
    grid: tuple[int, ...], stride: int, device: torch.device | None = None
) -> torch.Tensor:
    """Input-pixel index of every cell centre.

    Returns:
        ``(D, *grid)`` float32, component ``k`` along spatial axis ``k`` (array order).
    """
    axes = [
        torch.arange(n, dtype=torch.float32, device=device) * stride + cell_origin(stride)
        for n in grid
    ]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


@dataclass(frozen=True)
class LossWeights:
    """Loss weighting.

    Attributes:
        pos_weight: Weight of the positive cell in the binary cross-entropy.
        regression: Weight of the regression (L1) term relative to classification.
    """

    pos_weight: float = 20.0
    regression: float = 1.0


def landmark_loss(
    logits: torch.Tensor,
    disp: torch.Tensor,
    landmarks: torch.Tensor,
    stride: int,
    weights: LossWeights = LossWeights(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Classification + regression loss of a batch.

    Args:
        logits: ``(B, L, *G)`` classification logits.
        disp: ``(B, L * D, *G)`` predicted signed-log10 displacements.
        landmarks: ``(B, L, D)`` true positions, continuous input-pixel index in array
            order. NaN marks a landmark that is not annotated: it contributes no loss.
        stride: Output stride of the network.
        weights: Loss weighting.

    Returns:
        ``(loss, parts)``: the scalar loss and its float components for logging.
    """
    b, n_lm = logits.shape[:2]
    grid = tuple(logits.shape[2:])
    dim = len(grid)
    annotated = torch.isfinite(landmarks).all(dim=-1)  # (B, L)
    safe = torch.where(annotated[..., None], landmarks, torch.zeros_like(landmarks))

    centres = cell_centres(grid, stride, logits.device)  # (D, *G)
    view = (b, n_lm, dim) + (1,) * dim
    target_disp = signed_log10(safe.reshape(view) - centres.unsqueeze(0).unsqueeze(0))
    pred_disp = disp.reshape(b, n_lm, dim, *grid)
    reg_mask = annotated.reshape((b, n_lm, 1) + (1,) * dim).float()
    n_reg = reg_mask.sum().clamp_min(1.0) * dim * torch.tensor(grid).prod()
    reg_loss = ((pred_disp - target_disp).abs() * reg_mask).sum() / n_reg

    cell = torch.floor((safe + 0.5) / stride).long()  # (B, L, D)
    grid_t = torch.tensor(grid, device=logits.device)
    inside = annotated & ((cell >= 0) & (cell < grid_t)).all(dim=-1)
    target_cls = torch.zeros_like(logits)
    flat = target_cls.view(b, n_lm, -1)
    strides = torch.tensor(
        [int(torch.tensor(grid[k + 1 :]).prod()) for k in range(dim)], device=logits.device
    )
    flat_index = (cell.clamp_min(0) * strides).sum(-1).clamp_max(flat.shape[-1] - 1)
    flat.scatter_(2, flat_index.unsqueeze(-1), inside.unsqueeze(-1).to(flat.dtype))
    cls_mask = annotated.reshape((b, n_lm) + (1,) * dim).float().expand_as(logits)
    pos_weight = torch.tensor(weights.pos_weight, device=logits.device)
    cls_loss = F.binary_cross_entropy_with_logits(
        logits, target_cls, weight=cls_mask, pos_weight=pos_weight, reduction="sum"
    ) / cls_mask.sum().clamp_min(1.0)

    loss = cls_loss + weights.regression * reg_loss
    return loss, {"cls": float(cls_loss.detach()), "reg": float(reg_loss.detach())}
