"""Sampling of (optionally rotated/scaled) patches from images, on any torch device.

One function serves three uses: the local stage's crops around the global estimates
(inference), the crops around true landmarks with random offsets and poses
(local-network training), and the random affine augmentation of whole images
(global-network training).

Convention: a patch of size ``P`` (array order) sampled at centre ``c`` with matrix
``A`` takes its pixel ``o`` from source index ``c + A @ (o - (P - 1) / 2)``; all indices
are continuous pixel indices in array order ((y, x) or (z, y, x)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["patch_offsets", "patch_to_source", "sample_patches", "source_to_patch"]


def patch_offsets(size: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """Offsets ``o - (P - 1) / 2`` of every patch pixel from the patch centre.

    Returns:
        ``(*size, D)`` float32, last axis in array order.
    """
    axes = [torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0 for n in size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def sample_patches(
    images: torch.Tensor,
    centres: torch.Tensor,
    size: Sequence[int],
    matrices: torch.Tensor | None = None,
    mode: str = "bilinear",
) -> torch.Tensor:
    """Sample K patches from each of B images.

    Args:
        images: ``(B, 1, *S)`` float32 images, spatial axes in array order.
        centres: ``(B, K, D)`` patch centres, continuous source index, array order.
        size: Patch size ``P`` (D ints, array order).
        matrices: Optional ``(B, K, D, D)`` linear maps from patch offsets to source
            offsets (rotation and scaling); identity when None.
        mode: ``"bilinear"`` or ``"nearest"`` interpolation.

    Returns:
        ``(B, K, *P)`` float32 patches; zero outside the source image.
    """
    b, k, dim = centres.shape
    src_shape = images.shape[2:]
    if len(src_shape) != dim or len(size) != dim:
        raise ValueError(
            f"sample_patches: images have {len(src_shape)} spatial axes, centres "
            f"{dim} components and size {len(size)}; they must agree"
        )
    offsets = patch_offsets(size, images.device)  # (*P, D)
    expand = (b, k) + (1,) * dim + (dim,)
    if matrices is None:
        src = centres.reshape(expand) + offsets
    else:
        src = torch.einsum("bkij,...j->bk...i", matrices, offsets) + centres.reshape(expand)
    extent = torch.tensor(
        [max(n - 1, 1) for n in src_shape], dtype=torch.float32, device=images.device
    )
    # grid_sample wants normalised coordinates in (x, y[, z]) order: reverse array order.
    grid = (2.0 * src / extent - 1.0).flip(-1)
    grid = grid.reshape(b, k * size[0], *size[1:], dim)
    out = F.grid_sample(images, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out.reshape(b, k, *size)


def patch_to_source(
    points: torch.Tensor,
    centres: torch.Tensor,
    size: Sequence[int],
    matrices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map patch indices ``(B, K, D)`` to source indices (inverse of :func:`source_to_patch`)."""
    half = torch.tensor([(n - 1) / 2.0 for n in size], dtype=points.dtype, device=points.device)
    offset = points - half
    if matrices is not None:
        offset = torch.einsum("bkij,bkj->bki", matrices.to(points.dtype), offset)
    return centres.to(points.dtype) + offset


def source_to_patch(
    points: torch.Tensor,
    centres: torch.Tensor,
    size: Sequence[int],
    matrices: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map source indices ``(B, K, D)`` into patch indices of the patches sampled with
    the same ``centres`` and ``matrices`` (``(B, K, D, D)``, or None for identity)."""
    half = torch.tensor([(n - 1) / 2.0 for n in size], dtype=points.dtype, device=points.device)
    offset = points - centres.to(points.dtype)
    if matrices is not None:
        offset = torch.einsum("bkij,bkj->bki", torch.linalg.inv(matrices.to(points.dtype)), offset)
    return offset + half
