"""PNG overlays of localized landmarks, for a quick visual check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

from .io import image_to_array
from .landmarks import Landmarks

__all__ = ["write_overlay"]

_OK, _FLAGGED = (40, 220, 60), (255, 60, 40)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(array, [0.5, 99.5])
    scaled = (array - lo) / (hi - lo if hi > lo else 1.0)
    return (np.clip(scaled, 0, 1) * 255).astype(np.uint8)


def _mark(
    draw: ImageDraw.ImageDraw,
    x: float,
    y: float,
    r: float,
    colour: tuple[int, int, int],
    label: str | None,
) -> None:
    draw.ellipse([x - r, y - r, x + r, y + r], outline=colour, width=max(1, int(r / 3)))
    draw.line([x - r / 2, y, x + r / 2, y], fill=colour)
    draw.line([x, y - r / 2, x, y + r / 2], fill=colour)
    if label:
        draw.text((x + r + 2, y - r), label, fill=colour)


def _overlay_2d(array: np.ndarray, lm: Landmarks, spacing: tuple[float, ...]) -> Image.Image:
    img = Image.fromarray(_to_uint8(array)).convert("RGB")
    # Show pixels at their physical aspect ratio, and small images large enough to read.
    width, height = img.width * spacing[0], img.height * spacing[1]
    f = max(512 / max(width, height), 1.0 / min(spacing))
    fx, fy = f * spacing[0], f * spacing[1]
    if abs(fx - 1) > 1e-3 or abs(fy - 1) > 1e-3:
        img = img.resize((max(1, round(img.width * fx)), max(1, round(img.height * fy))))
    draw = ImageDraw.Draw(img)
    r = max(4.0, min(img.size) / 120)
    for name, idx, flag in zip(lm.names, lm.index, lm.flagged, strict=True):
        if np.isfinite(idx).all():
            x, y = (float(idx[0]) + 0.5) * fx - 0.5, (float(idx[1]) + 0.5) * fy - 0.5
            _mark(draw, x, y, r, _FLAGGED if flag else _OK, name)
    return img


def _overlay_3d(
    array: np.ndarray, lm: Landmarks, spacing: tuple[float, ...], panel: int = 160
) -> Image.Image:
    sx, sy, sz = spacing
    nz = array.shape[0]
    rows = []
    for name, idx, flag in zip(lm.names, lm.index, lm.flagged, strict=True):
        if not np.isfinite(idx).all():
            continue
        x, y, z = (
            int(np.clip(round(float(v)), 0, n - 1))
            for v, n in zip(idx, array.shape[::-1], strict=True)
        )
        # axial (y, x); coronal (z, x) and sagittal (z, y) with superior up.
        # Each view: slice, marker (column, row), (column, row) spacing in mm.
        views = [
            (array[z], idx[0], idx[1], (sx, sy)),
            (array[:, y, :][::-1], idx[0], nz - 1 - idx[2], (sx, sz)),
            (array[:, :, x][::-1], idx[1], nz - 1 - idx[2], (sy, sz)),
        ]
        tiles = []
        for sl, u, v, (su, sv) in views:
            tile = Image.fromarray(_to_uint8(sl)).convert("RGB")
            f = panel / max(tile.width * su, tile.height * sv)
            fu, fv = f * su, f * sv
            tile = tile.resize((max(1, int(tile.width * fu)), max(1, int(tile.height * fv))))
            colour = _FLAGGED if flag else _OK
            _mark(ImageDraw.Draw(tile), float(u) * fu, float(v) * fv, 5, colour, None)
            tiles.append(tile)
        row = Image.new("RGB", (3 * panel + 150, panel))
        for k, t in enumerate(tiles):
            row.paste(t, (150 + k * panel, 0))
        ImageDraw.Draw(row).text(
            (4, 4), name + (" (flagged)" if flag else ""), fill=_FLAGGED if flag else _OK
        )
        rows.append(row)
    sheet = Image.new("RGB", (3 * panel + 150, panel * max(1, len(rows))))
    for k, row in enumerate(rows):
        sheet.paste(row, (0, k * panel))
    return sheet


def write_overlay(image: sitk.Image, lm: Landmarks, path: str | Path) -> Path:
    """Draw ``lm`` on ``image`` and save a PNG.

    2D: the landmarks on the whole image. 3D: for each landmark a row of three
    orthogonal slices (voxel axes) through its nearest voxel. Flagged landmarks are red.
    """
    array = image_to_array(image)
    spacing = tuple(float(v) for v in image.GetSpacing())
    if image.GetDimension() == 2:
        img = _overlay_2d(array, lm, spacing)
    else:
        img = _overlay_3d(array, lm, spacing)
    path = Path(path)
    img.save(path)
    return path
