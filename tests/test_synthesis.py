"""Synthetic deformations: landmarks move with the anatomy, inverse accuracy, seeds."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fastlmk import geometry
from fastlmk.landmark_files import read_landmark_csv
from fastlmk.synthesis import (
    DeformationSpec,
    IntensityAugmentSpec,
    SynthesisError,
    augment_intensity,
    random_deformation,
    synthesize,
    write_synthetic_dataset,
)

_SPEC = DeformationSpec(
    rotation_deg=12.0, scale=0.1, shear=0.05, translation_mm=5.0, elastic_mm=3.0
)


def _oblique_image(size: tuple[int, int, int] = (48, 44, 40)) -> sitk.Image:
    """An empty float32 volume with anisotropic spacing and an oblique direction."""
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing((1.5, 1.2, 1.8))
    image.SetOrigin((-30.0, 12.0, 5.0))
    a = np.deg2rad(20.0)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    image.SetDirection(rot.ravel().tolist())
    return image


def _with_dot(image: sitk.Image, p: np.ndarray, sigma_mm: float = 2.0) -> sitk.Image:
    """``image``'s grid holding a Gaussian blob centred at physical point ``p`` (LPS mm)."""
    geo = geometry.Geometry.from_sitk(image)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in geo.size], indexing="ij"), -1)
    pts = geometry.index_to_physical(grid.reshape(-1, 3).astype(float), geo)
    values = np.exp(-0.5 * np.sum((pts - p) ** 2, axis=1) / sigma_mm**2)
    out = sitk.GetImageFromArray(values.reshape(geo.size).transpose(2, 1, 0).astype(np.float32))
    out.CopyInformation(image)
    return out


def _centroid_mm(image: sitk.Image) -> np.ndarray:
    """Intensity-weighted centroid of a non-negative image, LPS mm."""
    a = sitk.GetArrayFromImage(image).astype(np.float64)
    idx_zyx = np.stack(np.nonzero(a > 0.05 * a.max()), -1)
    w = a[tuple(idx_zyx.T)]
    centre_zyx = (idx_zyx * w[:, None]).sum(0) / w.sum()
    return geometry.index_to_physical(geometry.array_index_to_itk(centre_zyx), image)


def _centre(image: sitk.Image) -> np.ndarray:
    geo = geometry.Geometry.from_sitk(image)
    return geometry.index_to_physical((np.array(geo.size) - 1) / 2.0, geo)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bright_dot_lands_at_inverse(seed: int) -> None:
    ref = _oblique_image()
    p = _centre(ref) + np.array([6.0, -4.0, 3.0])
    image = _with_dot(ref, p)
    d = random_deformation(image, _SPEC, np.random.default_rng(seed))
    out = d.resample(image)
    expected = d.inverse(p[None])[0]
    assert np.linalg.norm(expected - p) > 2.0  # the deformation really moved it
    assert np.linalg.norm(_centroid_mm(out) - expected) < 0.3


def test_inverse_accuracy() -> None:
    image = _oblique_image()
    d = random_deformation(image, _SPEC, np.random.default_rng(7))
    rng = np.random.default_rng(8)
    points = _centre(image) + rng.uniform(-20, 20, (50, 3))
    back = d.forward(d.inverse(points))
    assert np.abs(back - points).max() < 0.01


def test_forward_matches_composition() -> None:
    """``T(x) = A(x + u(x))``: the composite transform applies the field first."""
    image = _oblique_image()
    d = random_deformation(image, _SPEC, np.random.default_rng(3))
    x = _centre(image) + np.array([3.0, 2.0, -5.0])
    u = np.array(d.field.TransformPoint(x.tolist())) - x
    assert np.linalg.norm(u) > 0.1
    expected = np.array(d.affine.TransformPoint((x + u).tolist()))
    np.testing.assert_allclose(d.forward(x[None])[0], expected, atol=1e-9)


def test_reproducible_by_seed() -> None:
    ref = _oblique_image((24, 22, 20))
    image = _with_dot(ref, _centre(ref))
    pts = _centre(ref)[None] + np.array([[1.0, 2.0, 3.0], [-4.0, 0.0, 1.0]])
    a_img, a_pts = synthesize(image, pts, np.random.default_rng(11))
    b_img, b_pts = synthesize(image, pts, np.random.default_rng(11))
    _, c_pts = synthesize(image, pts, np.random.default_rng(12))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a_img), sitk.GetArrayFromImage(b_img))
    np.testing.assert_array_equal(a_pts, b_pts)
    assert not np.allclose(a_pts, c_pts)


def test_intensity_changes_keep_geometry() -> None:
    ref = _oblique_image((24, 22, 20))
    p = _centre(ref)
    image = _with_dot(ref, p)
    spec = IntensityAugmentSpec(contrast_probability=1.0, bias=0.0, noise=0.0)
    out = augment_intensity(image, spec, np.random.default_rng(0))
    assert out.GetSize() == image.GetSize()
    assert out.GetOrigin() == image.GetOrigin()
    assert out.GetSpacing() == image.GetSpacing()
    assert out.GetDirection() == image.GetDirection()
    # Without bias and noise the change is voxel-wise: shuffling the voxels first gives
    # the same values, shuffled the same way.
    before = sitk.GetArrayFromImage(image)
    perm = np.random.default_rng(5).permutation(before.size)
    shuffled = sitk.GetImageFromArray(before.ravel()[perm].reshape(before.shape))
    shuffled.CopyInformation(image)
    out_shuffled = augment_intensity(shuffled, spec, np.random.default_rng(0))
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(out_shuffled).ravel(),
        sitk.GetArrayFromImage(out).ravel()[perm],
        atol=1e-6,
    )
    full = augment_intensity(image, IntensityAugmentSpec(), np.random.default_rng(1))
    assert full.GetDirection() == image.GetDirection()
    assert not np.array_equal(sitk.GetArrayFromImage(full), before)


def test_dataset_format(tmp_path: Path) -> None:
    ref = _oblique_image((24, 22, 20))
    image = _with_dot(ref, _centre(ref))
    pts = _centre(ref)[None] + np.array([[1.0, 2.0, 3.0], [-4.0, 0.0, 1.0]])
    out = write_synthetic_dataset(
        image, ["a", "b"], pts, tmp_path / "ds", n_train=2, n_val=1, n_test=1, seed=5
    )
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "test000.nii.gz",
        "train000.nii.gz",
        "train001.nii.gz",
        "val000.nii.gz",
    ]
    table = read_landmark_csv(out / "landmarks.csv")
    assert set(table) == {"train000", "train001", "val000", "test000"}
    assert set(table["test000"]) == {"a", "b"}
    with open(out / "split.csv", newline="") as f:
        splits = {r["image"]: r["split"] for r in csv.DictReader(f)}
    assert splits == {"train000": "train", "train001": "train", "val000": "val", "test000": "test"}
    # Test volumes come from another random stream than training volume 0.
    assert not np.allclose(table["test000"]["a"], table["train000"]["a"])


def test_rejects_2d() -> None:
    with pytest.raises(SynthesisError, match="3D"):
        random_deformation(sitk.Image([8, 8], sitk.sitkFloat32), _SPEC, np.random.default_rng(0))
