"""localize(): input handling, bad input, flags, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import fastlmk
from fastlmk import InvalidImageError, MissingSpacingError, ModelError, load_model, localize
from fastlmk.landmark_files import read_landmark_csv, read_slicer_markups
from fastlmk.model import LandmarkModel


@pytest.fixture(scope="module")
def model(model_2d: Path) -> LandmarkModel:
    return load_model(model_2d)


@pytest.fixture(scope="module")
def image(phantom_2d: Path) -> sitk.Image:
    return sitk.ReadImage(str(phantom_2d / "images" / "phantom060.mha"))


def test_every_input_type_gives_the_same_points(
    model: LandmarkModel, image: sitk.Image, phantom_2d: Path
) -> None:
    ref = localize(phantom_2d / "images" / "phantom060.mha", model)
    array = sitk.GetArrayFromImage(image)
    spacing, origin = image.GetSpacing(), image.GetOrigin()
    # a numpy array / tensor with the image's geometry, and a SimpleITK image
    for other in (
        localize(image, model),
        localize(array, model, spacing=spacing) if origin == (0.0, 0.0) else None,
        localize(
            fastlmk.io.as_image(torch.from_numpy(array), spacing=spacing, origin=origin), model
        ),
        localize(str(phantom_2d / "images" / "phantom060.mha"), model, backend="torch"),
    ):
        if other is not None:
            np.testing.assert_allclose(other.points_mm, ref.points_mm, atol=1e-6)
    # the index is the continuous voxel index of the input image, (x, y) order
    for p, idx in zip(ref.points_mm, ref.index, strict=True):
        np.testing.assert_allclose(image.TransformContinuousIndexToPhysicalPoint(idx), p, atol=1e-9)
    assert ref.image == "phantom060"


def test_spacing_override_scales_points(model: LandmarkModel, image: sitk.Image) -> None:
    array = sitk.GetArrayFromImage(image)
    a = localize(array, model, spacing=1.0)
    b = localize(array, model, spacing=(1.0, 1.0))
    np.testing.assert_allclose(a.points_mm, b.points_mm)
    np.testing.assert_allclose(a.index, b.index)


@pytest.mark.parametrize(
    ("bad", "kwargs", "error", "match"),
    [
        (
            np.zeros((4, 5, 6, 7), np.float32),
            {"spacing": 1.0},
            InvalidImageError,
            "shape .4, 5, 6, 7.",
        ),
        (np.zeros((0, 10), np.float32), {"spacing": 1.0}, InvalidImageError, "empty"),
        (np.full((40, 40), np.nan, np.float32), {"spacing": 1.0}, InvalidImageError, "NaN|finite"),
        (np.full((40, 40), np.inf, np.float32), {"spacing": 1.0}, InvalidImageError, "Inf|finite"),
        (np.ones((40, 40), np.float32), {"spacing": 0.0}, InvalidImageError, "spacing"),
        (np.ones((40, 40), np.float32), {"spacing": -1.0}, InvalidImageError, "spacing"),
        (np.ones((40, 40), np.float32), {}, MissingSpacingError, "spacing"),
        (np.ones((20, 30, 30), np.float32), {"spacing": 1.0}, InvalidImageError, "3D"),
    ],
)
def test_bad_input_raises_a_clear_error(
    model: LandmarkModel, bad: np.ndarray, kwargs: dict, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        localize(bad, model, **kwargs)


def test_unreadable_files(model: LandmarkModel, tmp_path: Path, image: sitk.Image) -> None:
    with pytest.raises(InvalidImageError, match=r"(?i)no such file"):
        localize(tmp_path / "missing.nii.gz", model)
    empty = tmp_path / "empty.mha"
    empty.write_bytes(b"")
    with pytest.raises(InvalidImageError, match="empty"):
        localize(empty, model)
    full = tmp_path / "full.nii"
    sitk.WriteImage(image, str(full))
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(InvalidImageError, match="truncated"):
        localize(truncated, model)
    with pytest.raises(MissingSpacingError, match="spacing"):
        png = tmp_path / "x.png"
        sitk.WriteImage(sitk.Cast(sitk.RescaleIntensity(image), sitk.sitkUInt8), str(png))
        localize(png, model)


def test_unknown_model_and_backend(model: LandmarkModel, image: sitk.Image) -> None:
    with pytest.raises(ModelError, match="no model named"):
        load_model("no-such-model")
    with pytest.raises(fastlmk.FastlmkError, match="unknown backend"):
        localize(image, model, backend="quantum")


def _copy(model: LandmarkModel) -> LandmarkModel:
    clone = LandmarkModel.create(model.config)
    clone.global_net.load_state_dict(model.global_net.state_dict())
    assert clone.local_net is not None and model.local_net is not None
    clone.local_net.load_state_dict(model.local_net.state_dict())
    return clone


def test_confident_on_good_input(model: LandmarkModel, image: sitk.Image) -> None:
    lm = localize(image, model)
    assert not lm.flagged.any() and (lm.confidence > 0.5).all()


def test_near_zero_vote_weight_is_flagged(model: LandmarkModel, image: sitk.Image) -> None:
    broken = _copy(model)
    with torch.no_grad():
        broken.global_net.cls_head.bias[1] = -40.0  # landmark 1: no cell votes
    lm = localize(image, broken)
    assert lm.flagged[1] and lm.confidence[1] < 0.1
    assert not lm.flagged[[0, 2, 3]].any()


def test_estimate_outside_the_image_is_flagged(model: LandmarkModel, image: sitk.Image) -> None:
    broken = _copy(model)
    assert broken.local_net is not None
    with torch.no_grad():  # global and local displacements of landmark 2 point far away
        broken.global_net.reg_head.bias[4:6] = 3.0
        broken.local_net.reg_head.bias[4:6] = 3.0
    lm = localize(image, broken)
    assert lm.flagged[2] and not lm.details["inside_image"][2]
    assert not lm.flagged[[0, 1, 3]].any()


def test_outputs_round_trip(model: LandmarkModel, image: sitk.Image, tmp_path: Path) -> None:
    lm = localize(image, model)
    lm.image = "case1"
    table = read_landmark_csv(lm.to_csv(tmp_path / "a.csv"))
    np.testing.assert_allclose(np.array(list(table["case1"].values())), lm.points_mm)
    names, pts = read_slicer_markups(lm.to_slicer(tmp_path / "a.mrk.json"))
    assert names == lm.names
    np.testing.assert_allclose(pts[:, :2], lm.points_mm, atol=1e-9)
    doc = json.loads(lm.to_json(tmp_path / "a.json").read_text())
    assert doc["coordinate_system"] == "LPS" and len(doc["landmarks"]) == len(lm)
    assert lm[lm.names[0]].shape == (2,)
    with pytest.raises(KeyError, match="no landmark named"):
        lm["nope"]


def test_nearly_constant_image_gets_a_unit_intensity_range() -> None:
    """Float noise (e.g. left by smoothing a blank image) is not stretched to full contrast."""
    from fastlmk.model import IntensitySpec
    from fastlmk.preprocess import intensity_range

    noise = 100.0 + 1e-9 * np.random.default_rng(0).standard_normal(1000)
    lo, hi = intensity_range(noise, IntensitySpec())
    assert hi - lo == pytest.approx(1.0)


def test_blank_image_gives_a_result_with_confidences(model: LandmarkModel) -> None:
    lm = localize(np.full((96, 96), 7.0, np.float32), model, spacing=1.0)
    assert lm.points_mm.shape == (4, 2) and np.isfinite(lm.confidence).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32])
def test_integer_images_give_the_points_of_their_float_copy(
    model: LandmarkModel, image: sitk.Image, dtype: type
) -> None:
    # Integer images reach the pipeline in their own type (no float32 copy up front);
    # the result must be that of the same values given as float32.
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    lo, hi = np.percentile(array, [0, 100])
    info = np.iinfo(dtype)
    top = min(float(info.max), 250.0)
    base = -100.0 if info.min < 0 else 0.0
    ints = np.round(base + (array - lo) / (hi - lo) * (top - base)).astype(dtype)
    spacing = image.GetSpacing()
    as_int = localize(ints, model, spacing=spacing)
    as_float = localize(ints.astype(np.float32), model, spacing=spacing)
    np.testing.assert_allclose(as_int.points_mm, as_float.points_mm, atol=1e-4)
    np.testing.assert_allclose(as_int.confidence, as_float.confidence, atol=1e-5)


@pytest.mark.parametrize(
    ("lo", "hi"), [((0, 0), (48, 96)), ((48, 0), (96, 96)), ((0, 0), (96, 48)), ((0, 48), (96, 96))]
)
def test_landmark_cut_off_by_the_field_of_view_is_flagged(
    model: LandmarkModel, image: sitk.Image, lo: tuple[int, int], hi: tuple[int, int]
) -> None:
    full = localize(image, model)
    cut = localize(image[lo[0] : hi[0], lo[1] : hi[1]], model)
    outside = ~((full.index >= lo) & (full.index < hi)).all(axis=1)
    assert outside.any()
    assert cut.flagged[outside].all(), (cut.details["global_weight"], cut.confidence)


def test_zeroed_global_network_flags_every_landmark(
    model: LandmarkModel, image: sitk.Image
) -> None:
    broken = _copy(model)
    with torch.no_grad():
        for p in broken.global_net.parameters():
            p.zero_()
    lm = localize(image, broken)
    assert lm.flagged.all()
    # Every cell votes a little: far more weight than the calibrated maximum.
    assert (lm.details["global_weight"] > model.config.confidence.max_weight).all()


def test_calibrated_thresholds_bracket_the_votes(model: LandmarkModel, phantom_2d: Path) -> None:
    from fastlmk.calibration import calibrate_confidence

    images = [phantom_2d / "images" / f"phantom{i:03d}.mha" for i in range(48, 52)]
    result = calibrate_confidence(model, images, backend="torch")
    low, high = result.weight_range
    assert result.images == 4 and result.points == 16
    assert result.spec.min_weight == pytest.approx(low / 2)
    assert result.spec.max_weight == pytest.approx(high * 2)
    assert result.spec.max_spread_mm <= 2 * result.spread_high_mm + 1e-9
    for path in images:
        d = localize(path, model).details
        for w in (d["global_weight"], d["local_weight"]):
            assert (w > result.spec.min_weight).all() and (w < result.spec.max_weight).all()
    # The model trained by the fixture was calibrated the same way, on these images.
    assert model.config.confidence.min_weight == pytest.approx(result.spec.min_weight, rel=1e-4)
    assert model.config.metadata["confidence_calibration"]["images"] == 4
    with pytest.raises(fastlmk.FastlmkError, match="at least one image"):
        calibrate_confidence(model, [])


@pytest.mark.parametrize(
    ("spacing", "message"), [(1e-6, "smaller than one cell"), (1e3, "far beyond")]
)
def test_an_absurd_spacing_is_refused_before_any_work(
    model: LandmarkModel, spacing: float, message: str
) -> None:
    with pytest.raises(InvalidImageError, match=message):
        localize(np.zeros((96, 96), np.float32), model, spacing=spacing)
