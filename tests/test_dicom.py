"""Physical space end to end: DICOM series and oblique NIfTI give the same physical points.

A phantom is resampled onto an oblique, anisotropic grid and written both as NIfTI and
as a DICOM series (int16, as scanners write them); localizing either must give the same
physical landmarks. A physically rotated copy (same voxels, rotated direction and
origin) must give the rotated landmarks.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fastlmk import geometry
from fastlmk.inference import errors_mm, localize
from fastlmk.io import read_image
from fastlmk.landmark_files import read_landmark_csv
from fastlmk.model import load_model

pytestmark = pytest.mark.slow

_TEST_IMAGES = [f"phantom{i:03d}" for i in range(44, 54)]  # the test split of phantom_3d


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation matrix about ``axis`` (Rodrigues), determinant +1."""
    k = axis / np.linalg.norm(axis)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    a = np.deg2rad(degrees)
    return np.eye(3) + np.sin(a) * kx + (1 - np.cos(a)) * kx @ kx


def _oblique_int16(image: sitk.Image) -> sitk.Image:
    """``image`` resampled onto an oblique grid with spacing (1.4, 1.7, 2.1) mm, as int16.

    The grid is centred on the image centre and covers it; values are scaled by 1000 so
    the int16 quantization is negligible.
    """
    geo = geometry.Geometry.from_sitk(image)
    centre = geometry.index_to_physical((np.array(geo.size) - 1) / 2.0, geo)
    direction = _rotation(np.array([1.0, 0.5, 0.2]), 12.0)
    spacing = np.array([1.4, 1.7, 2.1])
    size = np.ceil(np.array(geo.size) * geo.spacing / spacing).astype(int) + 4
    origin = centre - direction @ (spacing * (size - 1) / 2.0)
    ref = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    ref.SetSpacing(spacing.tolist())
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(direction.ravel().tolist())
    out = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.Cast(sitk.Round(out * 1000.0), sitk.sitkInt16)


def _write_dicom_series(image: sitk.Image, directory: Path) -> None:
    """Write a 3D int16 image as a DICOM series, one file per slice (z index)."""
    directory.mkdir(parents=True)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    # ImageOrientationPatient: the LPS directions of the row (x) and column (y) axes.
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    uid = "1.2.826.0.1.3680043.2.1125." + time.strftime("%Y%m%d%H%M%S")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": "MR",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0020|000d": uid + ".1",
            "0020|000e": uid + ".2",
            "0008|0018": f"{uid}.3.{k + 1}",
            "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.10f}" for v in position),
            "0020|0013": str(k + 1),
            "0018|0050": f"{image.GetSpacing()[2]:.10f}",
        }
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer.SetFileName(str(directory / f"slice{k:04d}.dcm"))
        writer.Execute(sl)


@pytest.fixture(scope="module")
def oblique_case(phantom_3d: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The first test phantom, oblique and anisotropic, as NIfTI and as a DICOM series."""
    out = tmp_path_factory.mktemp("oblique")
    volume = _oblique_int16(read_image(phantom_3d / "images" / f"{_TEST_IMAGES[0]}.mha"))
    sitk.WriteImage(volume, str(out / "volume.nii.gz"))
    _write_dicom_series(volume, out / "dicom")
    return out / "volume.nii.gz", out / "dicom"


def test_dicom_series_geometry_matches_nifti(oblique_case: tuple[Path, Path]) -> None:
    nifti, dicom = (read_image(p) for p in oblique_case)
    assert dicom.GetSize() == nifti.GetSize()
    np.testing.assert_allclose(dicom.GetSpacing(), nifti.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(dicom.GetOrigin(), nifti.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(dicom.GetDirection(), nifti.GetDirection(), atol=1e-5)
    assert np.abs(np.array(dicom.GetDirection()) - np.eye(3).ravel()).max() > 0.1  # oblique
    np.testing.assert_array_equal(sitk.GetArrayFromImage(dicom), sitk.GetArrayFromImage(nifti))


def test_dicom_series_localizes_same_points_as_nifti(
    oblique_case: tuple[Path, Path], model_3d: Path, phantom_3d: Path
) -> None:
    model = load_model(model_3d)
    from_nifti = localize(oblique_case[0], model)
    from_dicom = localize(oblique_case[1], model)
    np.testing.assert_allclose(from_dicom.points_mm, from_nifti.points_mm, atol=0.05)
    truth = read_landmark_csv(phantom_3d / "landmarks.csv")[_TEST_IMAGES[0]]
    assert np.mean(errors_mm(from_dicom, truth)) < 3.0


def test_rotated_nifti_gives_rotated_landmarks(
    model_3d: Path, phantom_3d: Path, tmp_path: Path
) -> None:
    """Same voxels, direction and origin rotated by R about the centre c: every
    landmark p must come back at c + R (p - c)."""
    model = load_model(model_3d)
    truth = read_landmark_csv(phantom_3d / "landmarks.csv")
    rot = _rotation(np.array([0.3, -0.4, 1.0]), 30.0)
    for image_id in _TEST_IMAGES[:3]:
        image = read_image(phantom_3d / "images" / f"{image_id}.mha")
        geo = geometry.Geometry.from_sitk(image)
        c = geometry.index_to_physical((np.array(geo.size) - 1) / 2.0, geo)
        rotated = sitk.Image(image)
        rotated.SetDirection((rot @ geo.direction).ravel().tolist())
        rotated.SetOrigin((c + rot @ (geo.origin - c)).tolist())
        path = tmp_path / f"{image_id}-rotated.nii.gz"
        sitk.WriteImage(rotated, str(path))

        before = localize(image, model)
        after = localize(path, model)
        expected = c + (before.points_mm - c) @ rot.T
        np.testing.assert_allclose(after.points_mm, expected, atol=0.05)
        moved = {n: c + rot @ (p - c) for n, p in truth[image_id].items()}
        assert np.mean(errors_mm(after, moved)) < 3.0
