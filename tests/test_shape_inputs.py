"""Bad input to the shape model and realignment: clear errors, nothing half-written."""

from __future__ import annotations

import json
import math
import shutil
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import fastlmk
from fastlmk import align as align_module
from fastlmk.calibration import calibrate_shape, write_calibration, write_shape
from fastlmk.cli import main
from fastlmk.errors import ArgumentError, FastlmkError, InvalidImageError, ModelError
from fastlmk.landmark_files import read_landmark_csv, write_landmark_csv
from fastlmk.model import ModelConfig
from fastlmk.shape import ImplausibleShapeWarning, check_shape, fit_shape_model


def _images(phantom: Path, n: int) -> list[Path]:
    return sorted((phantom / "images").glob("*.mha"))[:n]


def _copy(model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    return out


def test_no_conditional_model_from_fewer_shapes_than_coordinates() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(-50, 50, (12, 2))  # 24 coordinates
    shapes = [base + rng.normal(0, 1, base.shape) for _ in range(24)]
    assert fit_shape_model(shapes).covariance is None
    assert fit_shape_model([*shapes, base + rng.normal(0, 1, base.shape)]).covariance is not None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rotation_deg": -100.0}, "rotation_deg"),
        ({"rotation_deg": math.nan}, "rotation_deg"),
        ({"rotation_deg": math.inf}, "rotation_deg"),
        ({"scale": 1.0}, "scale"),
        ({"scale": 2.0}, "scale"),
        ({"scale": -0.5}, "scale"),
        ({"scale": math.nan}, "scale"),
    ],
)
def test_calibrate_shape_refuses_augmentation_out_of_range(
    model_2d: Path, phantom_2d: Path, kwargs, message
) -> None:
    table = read_landmark_csv(phantom_2d / "landmarks.csv")
    with pytest.raises(FastlmkError, match=message):
        calibrate_shape(model_2d, _images(phantom_2d, 30), table, **kwargs)


@pytest.mark.parametrize(
    ("training", "error"),
    [("x", None), ({"augment": [1, 2]}, None), ({"augment": {"scale": "abc"}}, "scale")],
)
def test_calibrate_shape_with_odd_training_metadata(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, training, error
) -> None:
    model = fastlmk.load_model(model_2d)
    model.config = replace(model.config, metadata={**model.config.metadata, "training": training})
    table = read_landmark_csv(phantom_2d / "landmarks.csv")
    if error is None:  # nothing usable recorded: no augmentation
        spec = calibrate_shape(model, _images(phantom_2d, 30), table)
        assert spec.shapes == 30
    else:
        with pytest.raises(FastlmkError, match=error):
            calibrate_shape(model, _images(phantom_2d, 30), table)


def test_calibrate_shape_checks_its_images(
    model_2d: Path, phantom_2d: Path, tmp_path: Path
) -> None:
    table = read_landmark_csv(phantom_2d / "landmarks.csv")
    images = _images(phantom_2d, 30)
    with pytest.raises(FastlmkError, match="more than once"):
        calibrate_shape(model_2d, [*images, images[3]], table)
    with pytest.raises(InvalidImageError, match="no such file"):
        calibrate_shape(model_2d, [*images, tmp_path / "missing.mha"], table)
    with pytest.warns(UserWarning, match="1 image.*without annotations skipped: extra"):
        sitk.WriteImage(sitk.ReadImage(str(images[0])), str(tmp_path / "extra.mha"))
        calibrate_shape(model_2d, [*images, tmp_path / "extra.mha"], table)
    with pytest.raises(FastlmkError, match="at least 10"):  # one path, not its characters
        calibrate_shape(model_2d, str(images[0]), table)
    volume = tmp_path / "vol" / f"{images[0].name}"
    volume.parent.mkdir()
    sitk.WriteImage(sitk.Image(8, 8, 8, sitk.sitkFloat32), str(volume))
    with pytest.raises(InvalidImageError, match="3D image"):
        calibrate_shape(model_2d, [volume, *images[1:]], table)


def test_calibrate_shape_refuses_annotations_outside_the_image(
    model_2d: Path, phantom_2d: Path
) -> None:
    table = read_landmark_csv(phantom_2d / "landmarks.csv")
    images = _images(phantom_2d, 30)
    pixels = {k: {n: p * 10 for n, p in v.items()} for k, v in table.items()}
    with pytest.raises(FastlmkError, match=r"outside the image.*not pixels"):
        calibrate_shape(model_2d, images, pixels)


def test_bundled_models_are_not_rewritten_in_place(phantom_2d: Path) -> None:
    model = fastlmk.load_model("ceph-isbi2015")
    before = (Path(model.path) / "model.json").read_bytes()
    assert model.config.shape is not None
    with pytest.raises(ModelError, match="bundled with fastlmk"):
        write_shape(model, model.config.shape)
    with pytest.raises(ModelError, match="bundled with fastlmk"):
        from fastlmk.calibration import CalibrationResult

        write_calibration(model, CalibrationResult(model.config.confidence, 1, 1, (1, 1), 1))
    assert (Path(model.path) / "model.json").read_bytes() == before


def test_a_failed_calibration_leaves_model_json_unchanged(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys
) -> None:
    model_dir = _copy(model_2d, tmp_path)
    before = (model_dir / "model.json").read_bytes()
    table = read_landmark_csv(phantom_2d / "landmarks.csv")
    blank = tmp_path / "blank"
    blank.mkdir()
    for path in _images(phantom_2d, 12):  # annotated ids, blank pixels
        image = sitk.ReadImage(str(path)) * 0
        sitk.WriteImage(image, str(blank / path.name))
    write_landmark_csv(tmp_path / "lm.csv", table)
    args = ["calibrate", str(model_dir), *map(str, sorted(blank.iterdir()))]
    assert main([*args, "--landmarks", str(tmp_path / "lm.csv")]) == 2
    assert "not images the model localizes well" in capsys.readouterr().err
    assert (model_dir / "model.json").read_bytes() == before


def _spec_doc(model_2d: Path) -> dict:
    return fastlmk.load_model(model_2d).config.to_dict()


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda s: s.update(shapes=math.inf),
        lambda s: s.update(mean_mm=[[0.0, 0.0]] * len(s["mean_mm"])),
        lambda s: s.update(mean_mm=[[float(i), 2.0 * i] for i in range(len(s["mean_mm"]))]),
        lambda s: s.update(max_residual_mm=[math.inf] * len(s["max_residual_mm"])),
        lambda s: s.update(max_conditional_mm=[math.inf] * len(s["max_conditional_mm"])),
        lambda s: s.update(covariance=np.zeros(np.shape(s["covariance"])).tolist()),
        lambda s: s.update(covariance=np.ones(np.shape(s["covariance"])).tolist()),  # rank 1
        lambda s: s.update(covariance=(-np.asarray(s["covariance"])).tolist()),
    ],
)
def test_broken_shape_entries_are_model_errors(model_2d: Path, corrupt) -> None:
    doc = _spec_doc(model_2d)
    assert doc["shape"].get("covariance") is not None
    corrupt(doc["shape"])
    with pytest.raises(ModelError, match="'shape' entry"):
        ModelConfig.from_dict(json.loads(json.dumps(doc)))


def test_check_shape_refuses_points_of_another_shape(model_2d: Path) -> None:
    spec = fastlmk.load_model(model_2d).config.shape
    assert spec is not None
    n, dim = spec.mean_mm.shape
    for bad in (np.zeros((n + 1, dim)), np.zeros((n, 3)), np.zeros(n * dim)):
        with pytest.raises(ValueError, match="check_shape: points of shape"):
            check_shape(bad, spec)
    with pytest.raises(ValueError, match="trusted"):
        check_shape(spec.mean_mm, spec, trusted=np.ones(n + 2, bool))


@pytest.mark.parametrize("bad", ["x", [5], math.nan, math.inf, -1.0, 181])
def test_align_argument_errors(model_2d: Path, bad) -> None:
    with pytest.raises(ArgumentError, match="align must be"):
        fastlmk.localize(np.zeros((96, 96), np.float32), model_2d, spacing=1.0, align=bad)


def test_numpy_bools_mean_on_and_off(model_2d: Path, phantom_2d: Path) -> None:
    model = fastlmk.load_model(model_2d)
    model.config = replace(model.config, align_above_deg=179.0)
    image = sitk.ReadImage(str(_images(phantom_2d, 1)[0]))
    assert "alignment" not in fastlmk.localize(image, model, align=np.False_).details
    # True: the model's threshold (179 degrees: nothing to realign), not 1 degree.
    assert "alignment" not in fastlmk.localize(image, model, align=np.True_).details
    assert "alignment" in fastlmk.localize(image, model, align=np.float64(0.0)).details


def test_cli_align_on_a_model_without_shape_model_fails_once(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys
) -> None:
    model_dir = _copy(model_2d, tmp_path)
    doc = json.loads((model_dir / "model.json").read_text())
    del doc["shape"]
    (model_dir / "model.json").write_text(json.dumps(doc))
    images = [str(p) for p in _images(phantom_2d, 3)]
    assert main(["localize", str(model_dir), *images, "--out", str(tmp_path / "o"), "--align"]) == 2
    err = capsys.readouterr().err
    assert err.count("no shape model") == 1 and not (tmp_path / "o").exists()


def test_realignment_of_a_model_with_ras_orientation(model_3d: Path, phantom_3d: Path) -> None:
    """A model working in RAS sees the same voxels as its LPS twin when given the same
    array with the RAS direction; the realigned points must be the LPS twin's points
    with x and y mirrored about the origin (exactly: one computation in the grid frame)."""
    lps = fastlmk.load_model(model_3d)
    ras = fastlmk.load_model(model_3d)
    ras.config = replace(ras.config, orientation="RAS")
    image = sitk.ReadImage(str(sorted((phantom_3d / "images").glob("*.mha"))[-1]))
    flip = np.diag([-1.0, -1.0, 1.0])
    mirrored = sitk.Image(image)
    mirrored.SetDirection((flip @ np.array(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    origin = np.array(image.GetOrigin())
    a = fastlmk.localize(image, lps, align=0.0)
    b = fastlmk.localize(mirrored, ras, align=0.0)
    assert "alignment" in a.details and "alignment" in b.details
    np.testing.assert_allclose(b.points_mm, origin + (a.points_mm - origin) @ flip, atol=1e-6)


def test_a_realignment_that_does_not_help_flags_everything(
    model_2d: Path, phantom_2d: Path, monkeypatch
) -> None:
    def second_pass_sees_nothing(lm, number):
        if number > 1:  # the turned image: every vote check fails
            lm.details["vote_flagged"] = np.ones(len(lm.names), bool)
            lm = replace(lm, flagged=np.ones(len(lm.names), bool))
        return lm

    calls = _edit_passes(monkeypatch, second_pass_sees_nothing)
    image = sitk.ReadImage(str(_images(phantom_2d, 1)[0]))
    plain = fastlmk.localize(image, model_2d, align=False)
    with pytest.warns(ImplausibleShapeWarning, match="turned image gave no reliable result"):
        lm = fastlmk.localize(image, model_2d, align=0.0)
    assert len(calls) == 2 and lm.flagged.all() and "alignment" not in lm.details
    np.testing.assert_array_equal(lm.points_mm, plain.points_mm)  # the first pass's points
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplausibleShapeWarning)
        fastlmk.localize(image, model_2d, align=False)


def test_too_few_trusted_landmarks_make_the_whole_result_implausible(model_2d: Path) -> None:
    spec = fastlmk.load_model(model_2d).config.shape
    assert spec is not None
    n = len(spec.mean_mm)  # 4 phantom landmarks, 2D: D + 2 = 4
    check = check_shape(spec.mean_mm, spec, trusted=np.arange(n) < 1)
    assert not check.plausible and "only 1 of the 4 landmarks" in check.problems[-1]
    assert check_shape(spec.mean_mm, spec, trusted=np.arange(n) < 3).plausible  # 3 >= half


def test_a_tilt_that_cannot_be_measured_flags_everything(
    model_2d: Path, phantom_2d: Path, monkeypatch
) -> None:
    def one_vote_flag(lm, number):
        lm.details["vote_flagged"] = np.arange(len(lm.names)) == 0  # 3 of 4 trusted < D + 2
        return lm

    calls = _edit_passes(monkeypatch, one_vote_flag)
    image = sitk.ReadImage(str(_images(phantom_2d, 1)[0]))
    with pytest.warns(ImplausibleShapeWarning, match="too few to realign"):
        lm = fastlmk.localize(image, model_2d, align=0.0)
    assert len(calls) == 1 and lm.flagged.all() and "alignment" not in lm.details


def test_collinear_annotations_give_no_shape_model() -> None:
    rng = np.random.default_rng(1)
    line = np.column_stack([np.linspace(-40, 40, 8), np.zeros(8)])
    shapes = [line * rng.uniform(0.9, 1.1) + rng.normal(0, 1e-9, line.shape) for _ in range(20)]
    with pytest.raises(ValueError, match="one line"):
        fit_shape_model(shapes)


def test_a_turned_image_with_one_landmark_less_trusted_is_kept(
    model_2d: Path, phantom_2d: Path, monkeypatch
) -> None:
    def second_pass_loses_one(lm, number):
        if number > 1:  # 3 of 4 still trusted: at least half
            lm.details["vote_flagged"] = np.arange(len(lm.names)) == 0
        return lm

    _edit_passes(monkeypatch, second_pass_loses_one)
    image = sitk.ReadImage(str(_images(phantom_2d, 1)[0]))
    lm = fastlmk.localize(image, model_2d, align=0.0)
    assert "alignment" in lm.details


def _edit_passes(monkeypatch, edit) -> list[int]:
    """Run every localization pass of fastlmk.align through ``edit(lm, pass_number)``
    (1: the first pass, 2...: turned images); returns the list of pass numbers run."""
    real = align_module._quiet_localize
    calls: list[int] = []

    def edited(image, model, backend):
        lm, caught = real(image, model, backend)
        calls.append(len(calls) + 1)
        return edit(lm, calls[-1]), caught

    monkeypatch.setattr(align_module, "_quiet_localize", edited)
    return calls
