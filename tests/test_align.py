"""Realignment of tilted anatomy (fastlmk.align): geometry, equivariance, settings."""

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
from conftest import shared_data
from fastlmk import geometry
from fastlmk.errors import ModelError
from fastlmk.inference import errors_mm
from fastlmk.landmark_files import read_fcsv, read_landmark_csv
from fastlmk.model import ModelConfig
from fastlmk.shape import ImplausibleShapeWarning


def _turned_2d(image: sitk.Image, degrees: float) -> tuple[sitk.Image, sitk.Transform]:
    """``image`` turned in plane about its centre, same grid; the transform maps a point
    of the result to the point of ``image`` it shows."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    turn = sitk.Euler2DTransform(centre, math.radians(degrees))
    return sitk.Resample(image, image, turn, sitk.sitkLinear, 0.0), turn


def _test_phantom(phantom: Path) -> tuple[sitk.Image, dict[str, np.ndarray]]:
    table = read_landmark_csv(phantom / "landmarks.csv")
    image_id = sorted(table)[-1]
    return sitk.ReadImage(str(phantom / "images" / f"{image_id}.mha")), table[image_id]


def test_a_turned_image_is_realigned_and_its_points_mapped_back(
    model_2d: Path, phantom_2d: Path
) -> None:
    model = fastlmk.load_model(model_2d)
    image, truth = _test_phantom(phantom_2d)
    upright = fastlmk.localize(image, model, align=False)
    turned, turn = _turned_2d(image, 45.0)  # beyond the phantoms' +-25 degrees
    inverse = turn.GetInverse()
    moved = {n: np.array(inverse.TransformPoint(p.tolist())) for n, p in truth.items()}
    lm = fastlmk.localize(turned, model, align=True)
    alignment = lm.details["alignment"]
    # The first pass's points are turned by about 45 degrees against the mean shape (it
    # sits in the phantoms' average pose, within 25 degrees of this one's).
    assert 20 < alignment["rotation_deg"] < 70 and 1 <= alignment["passes"] <= 3
    assert abs(lm.details["shape"].rotation_deg) < 5  # the last pass saw it upright
    assert np.mean(errors_mm(lm, moved)) < np.mean(errors_mm(upright, truth)) + 1.0
    # Index and physical points agree in the turned image's own geometry.
    np.testing.assert_allclose(
        geometry.index_to_physical(lm.index, geometry.Geometry.from_sitk(turned)),
        lm.points_mm,
        atol=1e-9,
    )
    # The points kept in details are in the original space too.
    np.testing.assert_allclose(
        lm.details["global_points_mm"], lm.points_mm, atol=3 * model.config.global_stage.spacing[0]
    )


@pytest.mark.slow
def test_realignment_does_not_depend_on_the_direction_matrix(
    model_3d: Path, phantom_3d: Path
) -> None:
    """Same voxels, direction and origin rotated by R about the centre c: realigned
    landmarks p must come back at c + R (p - c), as without realignment."""
    model = fastlmk.load_model(model_3d)
    image, _ = _test_phantom(phantom_3d)
    axis = np.array([0.3, -0.4, 1.0]) / np.linalg.norm([0.3, -0.4, 1.0])
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rot = np.eye(3) + math.sin(0.35) * k + (1 - math.cos(0.35)) * k @ k  # 20 degrees
    geo = geometry.Geometry.from_sitk(image)
    c = geometry.index_to_physical((np.array(geo.size) - 1) / 2.0, geo)
    rotated = sitk.Image(image)
    rotated.SetDirection((rot @ geo.direction).ravel().tolist())
    rotated.SetOrigin((c + rot @ (geo.origin - c)).tolist())
    before = fastlmk.localize(image, model, align=0.0)  # realign at any tilt
    after = fastlmk.localize(rotated, model, align=0.0)
    assert before.details["alignment"]["passes"] >= 1
    np.testing.assert_allclose(
        after.details["alignment"]["matrix"], before.details["alignment"]["matrix"], atol=1e-9
    )
    np.testing.assert_allclose(after.points_mm, c + (before.points_mm - c) @ rot.T, atol=1e-6)


def test_no_realignment_below_the_threshold_or_when_off(model_2d: Path, phantom_2d: Path) -> None:
    model = fastlmk.load_model(model_2d)
    image, _ = _test_phantom(phantom_2d)
    off = fastlmk.localize(image, model, align=False)
    high = fastlmk.localize(image, model, align=179.0)
    assert "alignment" not in off.details and "alignment" not in high.details
    np.testing.assert_array_equal(off.points_mm, high.points_mm)
    # The model's own setting is used by default.
    model.config = replace(model.config, align_above_deg=0.0)
    assert "alignment" in fastlmk.localize(image, model).details
    assert "alignment" not in fastlmk.localize(image, model, align=False).details


def test_an_image_the_networks_do_not_see_is_not_realigned(model_2d: Path) -> None:
    # Every estimate flagged by the vote checks: any fitted "tilt" would be noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImplausibleShapeWarning)
        lm = fastlmk.localize(np.full((96, 96), 7.0, np.float32), model_2d, spacing=1.0, align=0.0)
    assert lm.details["vote_flagged"].all() and "alignment" not in lm.details


def test_a_wrong_spacing_is_not_taken_for_a_tilt(model_2d: Path, phantom_2d: Path) -> None:
    image, _ = _test_phantom(phantom_2d)
    turned, _ = _turned_2d(image, 45.0)
    turned.SetSpacing([s * 0.5 for s in turned.GetSpacing()])
    with pytest.warns(ImplausibleShapeWarning, match="pixel spacing"):
        lm = fastlmk.localize(turned, model_2d, align=True)
    assert "alignment" not in lm.details and lm.flagged.all()


def test_align_settings_are_checked(model_2d: Path, phantom_2d: Path, tmp_path: Path) -> None:
    model = fastlmk.load_model(model_2d)
    image, _ = _test_phantom(phantom_2d)
    with pytest.raises(ValueError, match="degrees in"):
        fastlmk.localize(image, model, align=-1.0)
    no_shape = fastlmk.load_model(model_2d)
    no_shape.config = replace(no_shape.config, shape=None)
    with pytest.raises(ModelError, match="no shape model"):
        fastlmk.localize(image, no_shape, align=True)
    assert "alignment" not in fastlmk.localize(image, no_shape).details
    doc = model.config.to_dict()
    doc["align_above_deg"] = 12
    assert ModelConfig.from_dict(doc).align_above_deg == 12.0
    assert ModelConfig.from_dict(json.loads(json.dumps(doc))).to_dict()["align_above_deg"] == 12
    for bad in (-3, 200, "12", True):
        doc["align_above_deg"] = bad
        with pytest.raises(ModelError, match="align_above_deg"):
            ModelConfig.from_dict(doc)
    doc["align_above_deg"] = 12
    del doc["shape"]
    with pytest.raises(ModelError, match="align_above_deg"):
        ModelConfig.from_dict(doc)
    model_dir = tmp_path / "m"
    shutil.copytree(model_2d, model_dir)
    saved = json.loads((model_dir / "model.json").read_text())
    assert "align_above_deg" not in saved  # trained models do not realign unless told


def test_cli_align_options(model_2d: Path, phantom_2d: Path, tmp_path: Path) -> None:
    from fastlmk.cli import main

    image, _ = _test_phantom(phantom_2d)
    turned, _ = _turned_2d(image, 45.0)
    path = tmp_path / "turned.mha"
    sitk.WriteImage(turned, str(path))
    for flags, realigned in (([], False), (["--align"], True), (["--align", "179"], False)):
        out = tmp_path / f"out{len(flags)}{flags[-1] if flags else ''}"
        assert main(["localize", str(model_2d), str(path), "--out", str(out), *flags]) == 0
        doc = json.loads((out / "turned.json").read_text())
        assert ("alignment" in doc["extra"]) == realigned, flags
    assert doc["extra"].get("alignment") is None


@pytest.mark.skipif(
    not (shared_data() / "afids-mni152" / "groundtruth.fcsv").is_file(),
    reason="AFIDs data not found in ../shared/data",
)
def test_bundled_afids_model_realigns_a_tilted_head() -> None:
    data = shared_data() / "afids-mni152"
    image = fastlmk.read_image(data / "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz")
    names, points = read_fcsv(data / "groundtruth.fcsv")
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
    turn = sitk.Euler3DTransform(centre, math.radians(20), math.radians(10), 0.0)
    tilted = sitk.Resample(image, image, turn, sitk.sitkLinear, 0.0)
    inverse = turn.GetInverse()
    truth = {
        n: np.array(inverse.TransformPoint(p.tolist())) for n, p in zip(names, points, strict=True)
    }
    lm = fastlmk.localize(tilted, "afids-mni152")
    plain = fastlmk.localize(tilted, "afids-mni152", align=False)
    assert lm.details["alignment"]["passes"] >= 1
    assert np.mean(errors_mm(lm, truth)) < 1.0  # the upright template: 0.64 mm
    assert np.mean(errors_mm(plain, truth)) > 3.0
