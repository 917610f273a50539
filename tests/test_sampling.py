from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastlmk.sampling import patch_to_source, sample_patches, source_to_patch


@pytest.mark.parametrize("dim", [2, 3])
def test_integer_centres_give_exact_crops_with_zero_outside(dim: int) -> None:
    torch.manual_seed(0)
    shape = (13, 11, 9)[:dim]
    img = torch.randn(1, 1, *shape, dtype=torch.float64).float()
    size = (4, 5, 3)[:dim]
    starts = [[1] * dim, [n - 2 for n in shape]]  # the second crop runs off the image
    centres = torch.tensor(
        [[[s + (n - 1) / 2 for s, n in zip(st, size, strict=True)] for st in starts]]
    )
    crops = sample_patches(img, centres, size)
    for k in range(2):
        start = starts[k]
        for pos in np.ndindex(*size):
            src = tuple(int(s) + p for s, p in zip(start, pos, strict=True))
            inside = all(0 <= v < n for v, n in zip(src, shape, strict=True))
            expected = float(img[(0, 0, *src)]) if inside else 0.0
            assert float(crops[(0, k, *pos)]) == pytest.approx(expected, abs=1e-6)


def test_rotated_patch_moves_a_dot_where_source_to_patch_says() -> None:
    img = torch.zeros(1, 1, 41, 41)
    img[0, 0, 12, 27] = 1.0
    angle, scale = math.radians(30), 0.8
    m = scale * torch.tensor(
        [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]]
    )
    centres = torch.tensor([[[20.0, 20.0]]])
    size = (41, 41)
    patch = sample_patches(img, centres, size, m[None, None])
    peak = np.unravel_index(int(patch[0, 0].argmax()), size)
    expected = source_to_patch(torch.tensor([[[12.0, 27.0]]]), centres, size, m[None, None])[0, 0]
    assert np.allclose(peak, expected.numpy(), atol=1.0)
    back = patch_to_source(expected[None, None], centres, size, m[None, None])
    assert torch.allclose(back, torch.tensor([[[12.0, 27.0]]]), atol=1e-5)
