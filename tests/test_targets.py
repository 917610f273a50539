from __future__ import annotations

import numpy as np
import pytest
import torch

from fastlmk.targets import (
    LossWeights,
    cell_centres,
    inverse_signed_log10,
    landmark_loss,
    signed_log10,
)


def test_signed_log_round_trip() -> None:
    x = torch.linspace(-500, 500, 1001, dtype=torch.float64)
    assert torch.allclose(inverse_signed_log10(signed_log10(x)), x, rtol=1e-12, atol=1e-9)
    assert signed_log10(torch.tensor(9.0)) == pytest.approx(1.0)


def test_cell_centres() -> None:
    c = cell_centres((2, 3), stride=4)
    assert c.shape == (2, 2, 3)
    assert c[0, :, 0].tolist() == [1.5, 5.5] and c[1, 0].tolist() == [1.5, 5.5, 9.5]


def _reference_loss(
    logits: np.ndarray, disp: np.ndarray, lms: np.ndarray, stride: int, w: LossWeights
) -> float:
    """Straightforward float64 loops over batch, landmark and cell."""
    b, n, *grid = logits.shape
    dim = len(grid)
    cls_sum = reg_sum = 0.0
    n_cls = n_reg = 0
    for bi in range(b):
        for li in range(n):
            y = lms[bi, li]
            if not np.isfinite(y).all():
                continue
            target_cell = tuple(np.floor((y + 0.5) / stride).astype(int))
            for cell in np.ndindex(*grid):
                c = np.array(cell) * stride + (stride - 1) / 2
                t = np.sign(y - c) * np.log10(1 + np.abs(y - c))
                pred = disp[(bi, slice(li * dim, (li + 1) * dim), *cell)]
                reg_sum += np.abs(pred - t).sum()
                n_reg += dim
                z = logits[(bi, li, *cell)]
                is_pos = cell == target_cell
                log_p, log_1mp = -np.log1p(np.exp(-z)), -np.log1p(np.exp(z))
                cls_sum += -(w.pos_weight * log_p) if is_pos else -log_1mp
                n_cls += 1
    return cls_sum / n_cls + w.regression * reg_sum / n_reg


@pytest.mark.parametrize("dim", [2, 3])
def test_loss_matches_reference(dim: int) -> None:
    rng = np.random.default_rng(dim)
    grid, stride, b, n = (3,) * dim, 4, 2, 3
    logits = rng.normal(size=(b, n, *grid))
    disp = rng.normal(size=(b, n * dim, *grid))
    lms = rng.uniform(-1, 12, size=(b, n, dim))
    lms[1, 2] = np.nan  # not annotated
    lms[0, 1, 0] = 20.0  # outside the grid: no positive cell, regression still trained
    w = LossWeights(pos_weight=7.0, regression=0.5)
    loss, _ = landmark_loss(torch.tensor(logits), torch.tensor(disp), torch.tensor(lms), stride, w)
    assert float(loss) == pytest.approx(_reference_loss(logits, disp, lms, stride, w), rel=1e-9)
