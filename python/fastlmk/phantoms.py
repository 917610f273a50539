"""Synthetic 2D/3D phantoms with landmarks at known physical positions.

A phantom is a soft elliptical "body" holding a constellation of blobs of distinct
sizes and brightness; each landmark is the centre of one blob. Every phantom has a
random pose (rotation, scale, translation), random intensity scale/offset, a smooth
background gradient and noise, so a model must find the structures rather than
remember positions. Used by the demo and by the tests that prove training works.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from . import geometry

__all__ = ["PHANTOM_LANDMARKS", "make_phantom", "phantom_training_config", "write_phantom_dataset"]

# Canonical blob centres (mm, relative to the body centre), radii (mm) and amplitudes.
_BLOBS: dict[int, list[tuple[tuple[float, ...], float, float]]] = {
    2: [
        ((-18.0, -14.0), 2.5, 1.0),
        ((16.0, -12.0), 4.0, 0.7),
        ((6.0, 18.0), 3.0, 1.3),
        ((-10.0, 8.0), 2.0, 0.5),
    ],
    3: [
        ((-16.0, -12.0, -6.0), 3.0, 1.0),
        ((15.0, -10.0, 4.0), 4.5, 0.7),
        ((5.0, 16.0, -4.0), 3.5, 1.3),
        ((-9.0, 7.0, 12.0), 2.5, 0.6),
        ((2.0, -2.0, -16.0), 3.0, 0.9),
    ],
}
PHANTOM_LANDMARKS: dict[int, tuple[str, ...]] = {
    2: ("apex", "large_blob", "bright_blob", "small_blob"),
    3: ("apex", "large_blob", "bright_blob", "faint_blob", "inferior_blob"),
}
_BODY_RADII = {2: (34.0, 28.0), 3: (30.0, 26.0, 24.0)}
_DEFAULT_SIZE = {2: (96, 96), 3: (44, 44, 40)}
_DEFAULT_SPACING = {2: (1.0, 1.0), 3: (1.6, 1.6, 1.8)}


def _rotation(dim: int, rng: np.random.Generator, max_deg: float) -> np.ndarray:
    if dim == 2:
        a = np.deg2rad(rng.uniform(-max_deg, max_deg))
        return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    r = np.eye(3)
    for axes in ((0, 1), (1, 2), (0, 2)):
        a = np.deg2rad(rng.uniform(-max_deg, max_deg) / 2)
        g = np.eye(3)
        i, j = axes
        g[i, i] = g[j, j] = np.cos(a)
        g[i, j], g[j, i] = -np.sin(a), np.sin(a)
        r = g @ r
    return r


def make_phantom(
    dim: int,
    rng: np.random.Generator,
    *,
    size: tuple[int, ...] | None = None,
    spacing: tuple[float, ...] | None = None,
    max_rotation_deg: float = 25.0,
    max_shift_mm: float = 10.0,
) -> tuple[sitk.Image, dict[str, np.ndarray]]:
    """One random phantom.

    Args:
        dim: 2 or 3.
        rng: Random generator (the phantom is a pure function of its state).
        size: Image size in voxels, (x, y[, z]).
        spacing: Voxel spacing in mm, (x, y[, z]).
        max_rotation_deg: Largest random rotation.
        max_shift_mm: Largest random translation per axis.

    Returns:
        ``(image, landmarks)``: a float32 SimpleITK image (identity direction, random
        origin) and landmark name -> LPS mm position ``(D,)``.
    """
    size = size or _DEFAULT_SIZE[dim]
    spacing = spacing or _DEFAULT_SPACING[dim]
    origin = rng.uniform(-50, 50, dim)
    geo = geometry.Geometry(
        origin=np.asarray(origin, float),
        spacing=np.asarray(spacing, float),
        direction=np.eye(dim),
        size=tuple(size),
    )
    centre = geometry.index_to_physical((np.array(size) - 1) / 2.0, geo)
    centre = centre + rng.uniform(-max_shift_mm, max_shift_mm, dim)
    rot = _rotation(dim, rng, max_rotation_deg)
    scale = rng.uniform(0.9, 1.1)

    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1)
    points = geometry.index_to_physical(grid.reshape(-1, dim).astype(float), geo)
    local = (points - centre) @ rot / scale  # body frame coordinates (mm)

    body = np.sum((local / np.array(_BODY_RADII[dim])) ** 2, axis=1)
    values = 0.4 / (1.0 + np.exp((body - 1.0) * 12.0))
    landmarks: dict[str, np.ndarray] = {}
    for name, (pos, radius, amp) in zip(PHANTOM_LANDMARKS[dim], _BLOBS[dim], strict=True):
        r2 = np.sum((local - np.array(pos)) ** 2, axis=1)
        values = values + amp * np.exp(-0.5 * r2 / radius**2)
        landmarks[name] = centre + scale * (rot @ np.array(pos))
    values = values + 0.1 * (points - centre) @ rng.normal(0, 0.01, dim)
    values = values * rng.uniform(0.5, 2.0) + rng.uniform(-0.5, 0.5)
    values = values + rng.normal(0, 0.04, values.shape)

    # The meshgrid above is (x, y[, z]); SimpleITK's array order is reversed.
    array = values.reshape(size).transpose(tuple(reversed(range(dim)))).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin(tuple(float(o) for o in origin))
    return image, landmarks


def write_phantom_dataset(
    out_dir: str | Path, dim: int, n_train: int, n_val: int, n_test: int, seed: int = 0
) -> Path:
    """Write a phantom data set: ``images/*.mha``, ``landmarks.csv``, ``split.csv``.

    Returns:
        ``out_dir``.
    """
    from .landmark_files import write_landmark_csv

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    table: dict[str, dict[str, np.ndarray]] = {}
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    with open(out / "split.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "split"])
        for i, split in enumerate(splits):
            image_id = f"phantom{i:03d}"
            image, lms = make_phantom(dim, rng)
            sitk.WriteImage(image, str(out / "images" / f"{image_id}.mha"))
            table[image_id] = lms
            writer.writerow([image_id, split])
    write_landmark_csv(out / "landmarks.csv", table)
    return out


def phantom_training_config(
    dataset: str | Path,
    dim: int,
    *,
    iterations: int = 300,
    output: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """A small, fast training configuration for a phantom data set (seconds on a CPU)."""
    dataset = Path(dataset)
    coarse = {2: [3.0, 3.0], 3: [3.2, 3.2, 3.6]}[dim]
    fine = {2: [1.0, 1.0], 3: [1.6, 1.6, 1.8]}[dim]
    return {
        "name": f"phantom-{dim}d",
        "data": {
            "images": str(dataset / "images"),
            "landmarks": [str(dataset / "landmarks.csv")],
            "split": str(dataset / "split.csv"),
        },
        "global": {
            "spacing": coarse,
            "network": {"channels": [16, 24, 32], "blocks": [1, 1, 1], "pools": 1},
            "patch_size": [32] * dim,
        },
        "local": {
            "spacing": fine,
            "crop_size": [16] * dim,
            "network": {"channels": [8, 16], "blocks": [1, 1], "pools": 1},
            "offset_sigma_mm": 3.0,
        },
        "augment": {
            "rotation_deg": 10.0,
            "scale": 0.05,
            "translation_mm": 8.0,
            "intensity_scale": 0.2,
            "intensity_shift": 0.1,
        },
        "train": {
            "iterations": iterations,
            "batch_size": 8,
            "lr": 3e-3,
            "val_every": max(iterations // 3, 1),
            "checkpoint_every": max(iterations // 2, 1),
            "seed": seed,
        },
        "output": str(output) if output else str(dataset / f"model-{dim}d"),
    }
