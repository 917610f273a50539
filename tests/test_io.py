"""fastlmk.io: reading, converting and validating images."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fastlmk import geometry
from fastlmk.errors import FastlmkError, InvalidImageError, MissingSpacingError
from fastlmk.io import as_image, image_to_array, list_images, read_image, write_image


def _shared_data() -> Path:
    env = os.environ.get("FASTLMK_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def _oblique_direction(seed: int = 0) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else q * [1.0, 1.0, -1.0]  # proper rotation


def _volume(dtype: type = np.float32, seed: int = 0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    array: np.ndarray = rng.uniform(-1000, 1000, size=(6, 9, 11)).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing([0.7, 1.3, 2.5])
    image.SetOrigin([-12.5, 40.25, 103.0])
    image.SetDirection(_oblique_direction(seed).ravel().tolist())
    return image


def _assert_same_geometry(a: sitk.Image, b: sitk.Image, atol: float = 1e-5) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=atol)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=atol)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=atol)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".nrrd", ".mha"])
def test_round_trip_keeps_geometry_and_values(tmp_path: Path, suffix: str) -> None:
    original = _volume()
    path = tmp_path / f"vol{suffix}"
    write_image(original, path)
    loaded = read_image(path)
    assert loaded.GetPixelID() == sitk.sitkFloat32
    _assert_same_geometry(loaded, original, atol=1e-4 if suffix.startswith(".nii") else 1e-9)
    np.testing.assert_array_equal(image_to_array(loaded), sitk.GetArrayViewFromImage(original))


def test_spacing_argument_overrides_file_spacing(tmp_path: Path) -> None:
    path = tmp_path / "vol.mha"
    write_image(_volume(), path)
    assert read_image(path, spacing=(1.0, 2.0, 3.0)).GetSpacing() == (1.0, 2.0, 3.0)
    assert read_image(path, spacing=0.5).GetSpacing() == (0.5, 0.5, 0.5)


def _write_dicom_series(image: sitk.Image, directory: Path, series_uid: str) -> None:
    """One int16 file per slice, with the per-slice geometry tags set explicitly.

    ImageSeriesWriter-style slicing keeps only the 2x2 in-plane part of the direction,
    so Image Orientation (Patient) and Image Position (Patient) are written by hand.
    """
    directory.mkdir(parents=True, exist_ok=True)
    direction = np.reshape(image.GetDirection(), (3, 3))
    orientation = "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1]))
    now_date, now_time = time.strftime("%Y%m%d"), time.strftime("%H%M%S")
    series_tags = {
        "0008|0031": now_time,  # Series Time
        "0008|0021": now_date,  # Series Date
        "0008|0060": "CT",  # Modality: keeps the slice geometry tags
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1.1",  # Study Instance UID
        "0020|000e": series_uid,  # Series Instance UID
        "0020|0037": orientation,  # Image Orientation (Patient)
        "0018|0050": str(image.GetSpacing()[2]),  # Slice Thickness
        "0028|0030": f"{image.GetSpacing()[1]}\\{image.GetSpacing()[0]}",  # Pixel Spacing r\c
        "0008|103e": "fastlmk test series",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    int_image = sitk.Cast(image, sitk.sitkInt16)
    for k in range(image.GetDepth()):
        slice_k = int_image[:, :, k]
        for tag, value in series_tags.items():
            slice_k.SetMetaData(tag, value)
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        slice_k.SetMetaData("0020|0032", "\\".join(f"{v:.10f}" for v in position))
        slice_k.SetMetaData("0020|0013", str(k + 1))  # Instance Number
        slice_k.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")  # SOP Instance UID
        writer.SetFileName(str(directory / f"{series_uid.rsplit('.', 1)[-1]}_{k:03d}.dcm"))
        writer.Execute(slice_k)


def test_dicom_series_directory(tmp_path: Path) -> None:
    original = _volume(np.int16, seed=2)
    _write_dicom_series(original, tmp_path / "dicom", "1.2.826.0.1.3680043.2.1125.2.1")
    loaded = read_image(tmp_path / "dicom")
    _assert_same_geometry(loaded, original, atol=1e-4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        idx = [int(rng.integers(n)) for n in original.GetSize()]
        point = original.TransformIndexToPhysicalPoint(idx)
        loaded_idx = loaded.TransformPhysicalPointToIndex(point)
        assert loaded.GetPixel(loaded_idx) == float(original.GetPixel(idx))


def test_dicom_directory_with_two_series_reads_the_largest(tmp_path: Path) -> None:
    big, small = _volume(np.int16, seed=3), _volume(np.int16, seed=4)[:, :, :2]
    _write_dicom_series(big, tmp_path / "d", "1.2.826.0.1.3680043.2.1125.3.1")
    _write_dicom_series(small, tmp_path / "d", "1.2.826.0.1.3680043.2.1125.3.2")
    with pytest.warns(UserWarning, match="2 DICOM series"):
        loaded = read_image(tmp_path / "d")
    assert loaded.GetSize() == big.GetSize()


def test_directory_without_dicom_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidImageError, match="no DICOM series"):
        read_image(tmp_path)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(path))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_2d_grey_rgb_with_spacing(tmp_path: Path, suffix: str) -> None:
    yy, xx = np.mgrid[0:40, 0:60]
    grey = (xx * 3 + yy).astype(np.uint8)
    path = tmp_path / f"img{suffix}"
    _write_rgb(path, np.repeat(grey[..., None], 3, axis=-1))
    image = read_image(path, spacing=(0.1, 0.2))
    assert image.GetSize() == (60, 40)
    assert image.GetNumberOfComponentsPerPixel() == 1
    assert image.GetSpacing() == (0.1, 0.2)
    assert image.GetOrigin() == (0.0, 0.0)
    assert image.GetDirection() == (1.0, 0.0, 0.0, 1.0)
    # physical (x, y) = (column, row) * spacing, origin at the centre of the top-left pixel
    assert image.TransformPhysicalPointToIndex((0.5, 0.4)) == (5, 2)
    atol = 3 if suffix == ".jpg" else 0
    np.testing.assert_allclose(image_to_array(image), grey, atol=atol)


def test_true_colour_becomes_luminance(tmp_path: Path) -> None:
    rgb = np.zeros((5, 6, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 2] = 100
    _write_rgb(tmp_path / "c.png", rgb)
    values = image_to_array(read_image(tmp_path / "c.png", spacing=1.0))
    np.testing.assert_allclose(values, 0.299 * 200 + 0.114 * 100, rtol=1e-6)


def test_2d_formats_need_spacing(tmp_path: Path) -> None:
    _write_rgb(tmp_path / "x.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(MissingSpacingError, match=r"spacing=\.\.\. \(mm per pixel"):
        read_image(tmp_path / "x.png")
    with pytest.raises(MissingSpacingError, match="spacing="):
        as_image(str(tmp_path / "x.png"))


def test_isbi_jpeg_when_available() -> None:
    path = _shared_data() / "isbi2015" / "images" / "001.jpg"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    image = read_image(path, spacing=0.1)
    assert image.GetSize() == (1935, 2400)
    assert image.GetSpacing() == (0.1, 0.1)


def test_numpy_input_geometry_and_order() -> None:
    array = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5)
    direction = _oblique_direction(1)
    image = as_image(array, spacing=(0.5, 1.0, 2.0), origin=(1, 2, 3), direction=direction)
    assert image.GetSize() == (5, 4, 3)
    assert image.GetPixelID() == sitk.sitkFloat32
    assert image.GetPixel(4, 1, 2) == array[2, 1, 4]
    np.testing.assert_allclose(image.GetDirection(), direction.ravel())
    np.testing.assert_allclose(
        geometry.index_to_physical([0.0, 0.0, 0.0], image), [1.0, 2.0, 3.0], atol=1e-12
    )
    assert as_image(np.zeros((4, 5)), spacing=0.3).GetSpacing() == (0.3, 0.3)


def test_numpy_leading_singletons() -> None:
    assert as_image(np.zeros((1, 4, 5)), spacing=1.0).GetSize() == (5, 4)
    assert as_image(np.zeros((1, 4, 5)), spacing=(1.0, 1.0, 2.0)).GetSize() == (5, 4, 1)
    assert as_image(np.zeros((1, 1, 3, 4, 5)), spacing=1.0).GetSize() == (5, 4, 3)


@pytest.mark.parametrize(
    ("array", "kwargs", "error", "message"),
    [
        (np.zeros((4, 5)), {}, MissingSpacingError, "spacing="),
        (np.array([[0.0, np.nan]]), {"spacing": 1.0}, InvalidImageError, "NaN"),
        (np.array([[0.0, np.inf]]), {"spacing": 1.0}, InvalidImageError, "infinite"),
        (np.zeros((0, 5)), {"spacing": 1.0}, InvalidImageError, "empty"),
        (np.zeros((2, 3, 4, 5)), {"spacing": 1.0}, InvalidImageError, "expected"),
        (np.zeros(5), {"spacing": 1.0}, InvalidImageError, "expected"),
        (np.zeros((4, 5)), {"spacing": 0.0}, InvalidImageError, "> 0"),
        (np.zeros((4, 5)), {"spacing": (1.0, -1.0)}, InvalidImageError, "> 0"),
        (np.zeros((4, 5)), {"spacing": (1.0, 1.0, 1.0)}, InvalidImageError, "3 values"),
        (np.zeros((4, 5), bool), {"spacing": 1.0}, InvalidImageError, "bool"),
        (np.zeros((4, 5), complex), {"spacing": 1.0}, InvalidImageError, "complex"),
        (np.zeros((4, 5)), {"spacing": 1.0, "direction": np.zeros((2, 2))}, InvalidImageError,
         "not invertible"),
    ],
)  # fmt: skip
def test_invalid_arrays(
    array: np.ndarray, kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        as_image(array, **kwargs)  # type: ignore[arg-type]


def test_unsupported_type() -> None:
    with pytest.raises(InvalidImageError, match="Unsupported image type"):
        as_image([[1.0, 2.0]])


def test_torch_tensor_input() -> None:
    tensor = torch.arange(24, dtype=torch.float64, requires_grad=True).reshape(1, 1, 2, 3, 4)
    image = as_image(tensor, spacing=(1.0, 2.0, 3.0))
    assert image.GetSize() == (4, 3, 2)
    assert image.GetPixel(3, 2, 1) == 23.0
    assert as_image(torch.zeros(1, 6, 7, dtype=torch.uint8), spacing=0.1).GetSize() == (7, 6)
    assert as_image(torch.zeros(6, 7, dtype=torch.bfloat16), spacing=0.1).GetSize() == (7, 6)
    with pytest.raises(MissingSpacingError):
        as_image(torch.zeros(6, 7))
    with pytest.raises(InvalidImageError, match="bool"):
        as_image(torch.zeros(6, 7, dtype=torch.bool), spacing=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensor_input() -> None:
    image = as_image(torch.ones(5, 6, device="cuda"), spacing=1.0)
    assert image.GetSize() == (6, 5)


def test_itk_image_input() -> None:
    itk = pytest.importorskip("itk")
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    itk_image = itk.image_from_array(array)
    itk_image.SetSpacing([0.5, 1.0, 2.0])
    itk_image.SetOrigin([1.0, 2.0, 3.0])
    image = as_image(itk_image)
    assert image.GetSize() == (5, 4, 3)
    assert image.GetSpacing() == (0.5, 1.0, 2.0)
    assert image.GetOrigin() == (1.0, 2.0, 3.0)
    np.testing.assert_array_equal(image_to_array(image), array)


def test_simpleitk_input_is_validated_and_not_modified() -> None:
    original = _volume(np.int16)
    converted = as_image(original, spacing=(1.0, 1.0, 1.0))
    assert converted.GetPixelID() == sitk.sitkFloat32
    assert converted.GetSpacing() == (1.0, 1.0, 1.0)
    assert original.GetSpacing() == (0.7, 1.3, 2.5)
    assert original.GetPixelID() == sitk.sitkInt16
    vector = sitk.Image([4, 5], sitk.sitkVectorFloat32, 3)
    with pytest.raises(InvalidImageError, match="3 components"):
        as_image(vector)
    nan_image = sitk.GetImageFromArray(np.array([[np.nan, 1.0]], np.float32))
    with pytest.raises(InvalidImageError, match="NaN"):
        as_image(nan_image)


def test_4d_and_multicomponent_files_are_rejected(tmp_path: Path) -> None:
    four_d = sitk.JoinSeries([sitk.Image([5, 4, 3], sitk.sitkFloat32)] * 2)
    sitk.WriteImage(four_d, str(tmp_path / "t.nii.gz"))
    with pytest.raises(InvalidImageError, match="4 dimensions"):
        read_image(tmp_path / "t.nii.gz")
    vector = sitk.GetImageFromArray(np.zeros((3, 4, 5, 2), np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "v.mha"))
    with pytest.raises(InvalidImageError, match="2 components"):
        read_image(tmp_path / "v.mha")


def test_nan_in_file_is_rejected(tmp_path: Path) -> None:
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 2, 3] = np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "inf.nrrd"))
    with pytest.raises(InvalidImageError, match=r"inf\.nrrd.*1 infinite"):
        read_image(tmp_path / "inf.nrrd")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"cut{suffix}"
    write_image(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(20, 30, 40))), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImageError, match=re.escape(str(path))):
        read_image(path)


def test_truncated_jpeg_is_refused_and_trailing_metadata_is_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "x.jpg"
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 255, (300, 200), np.uint8)), path)
    data = path.read_bytes()
    assert data.endswith(b"\xff\xd9")
    whole = sitk.GetArrayFromImage(read_image(path, spacing=0.1))
    # Bytes after the end-of-image marker (appended metadata) are harmless.
    (tmp_path / "tail.jpg").write_bytes(data + b"metadata" * 1000)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(read_image(tmp_path / "tail.jpg", spacing=0.1)), whole
    )
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InvalidImageError, match=r"cut\.jpg: truncated or corrupt JPEG"):
        read_image(tmp_path / "cut.jpg", spacing=0.1)
    # An embedded thumbnail (a whole JPEG, end marker included, in an APP1 segment near
    # the start) does not make a truncated file look complete.
    app1 = b"\xff\xe1" + (len(data) + 2).to_bytes(2, "big") + data
    (tmp_path / "thumb.jpg").write_bytes(data[:2] + app1 + data[2 : len(data) * 2 // 3])
    with pytest.raises(InvalidImageError, match="truncated or corrupt JPEG"):
        read_image(tmp_path / "thumb.jpg", spacing=0.1)


def test_empty_missing_and_garbage_files(tmp_path: Path) -> None:
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        read_image(tmp_path / "empty.nii.gz")
    with pytest.raises(InvalidImageError, match="no such file"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "junk.mha").write_bytes(b"this is not an image\n" * 10)
    with pytest.raises(InvalidImageError, match=r"junk\.mha"):
        read_image(tmp_path / "junk.mha")
    with pytest.raises(InvalidImageError, match="no such file"):
        as_image(tmp_path / "missing.nrrd")


def test_write_image_errors_are_fastlmk_errors(tmp_path: Path) -> None:
    with pytest.raises(FastlmkError, match="cannot write"):
        write_image(_volume(), tmp_path / "no_such_dir" / "x.mha")


def test_errors_are_value_errors() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError):
            as_image(np.zeros((4, 5)))


def test_multi_member_gzip_nifti_is_not_mistaken_for_truncated(tmp_path: Path) -> None:
    import gzip

    array = np.random.default_rng(1).normal(size=(4, 5, 6)).astype(np.float32)
    write_image(sitk.GetImageFromArray(array), tmp_path / "plain.nii")
    raw = (tmp_path / "plain.nii").read_bytes()
    half = len(raw) // 2
    (tmp_path / "multi.nii.gz").write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))
    np.testing.assert_array_equal(image_to_array(read_image(tmp_path / "multi.nii.gz")), array)
    (tmp_path / "short.nii").write_bytes(raw[:-3])
    with pytest.raises(InvalidImageError, match="truncated"):
        read_image(tmp_path / "short.nii")


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16])
def test_keep_integer_keeps_the_pixel_type(tmp_path: Path, dtype: type) -> None:
    array = (np.arange(12 * 10).reshape(12, 10) % 200).astype(dtype)
    expected = sitk.GetImageFromArray(array).GetPixelID()
    kept = as_image(array, spacing=0.5, keep_integer=True)
    assert kept.GetPixelID() == expected
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(kept), array)
    assert as_image(array, spacing=0.5).GetPixelID() == sitk.sitkFloat32
    tensor = as_image(torch.from_numpy(array.astype(np.int16)), spacing=0.5, keep_integer=True)
    assert tensor.GetPixelID() == sitk.sitkInt16
    path = tmp_path / "img.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    assert read_image(path, keep_integer=True).GetPixelID() == expected
    assert read_image(path).GetPixelID() == sitk.sitkFloat32
    assert as_image(sitk.GetImageFromArray(array), keep_integer=True).GetPixelID() == expected


def test_keep_integer_still_checks_float_images() -> None:
    array = np.zeros((8, 8), np.float32)
    array[2, 3] = np.nan
    with pytest.raises(InvalidImageError, match="NaN"):
        as_image(array, spacing=1.0, keep_integer=True)
    assert as_image(array[:4, :2] * 0, spacing=1.0, keep_integer=True).GetPixelID() == (
        sitk.sitkFloat32
    )


def test_list_images_directory_and_glob(tmp_path: Path) -> None:
    for name in ("b.png", "a.nii.gz", "c.MHA", "notes.txt", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "series1").mkdir()
    found = list_images(tmp_path)
    assert found == {
        "a": tmp_path / "a.nii.gz",
        "b": tmp_path / "b.png",
        "c": tmp_path / "c.MHA",
        "series1": tmp_path / "series1",
    }
    assert list(list_images(str(tmp_path / "*.png"))) == ["b"]
    assert list_images(tmp_path / "missing") == {}
