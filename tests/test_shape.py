"""The shape plausibility check (fastlmk.shape) and its use in localize, train, calibrate."""

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
from fastlmk.calibration import calibrate_shape, write_shape
from fastlmk.cli import main
from fastlmk.errors import FastlmkError, ModelError
from fastlmk.landmark_files import read_landmark_csv
from fastlmk.model import ModelConfig
from fastlmk.shape import (
    MIN_SHAPES,
    ImplausibleShapeWarning,
    ShapeSpec,
    check_shape,
    fit_shape_model,
    similarity_fit,
)


def _rotation(dim: int, rng: np.random.Generator, max_deg: float) -> np.ndarray:
    if dim == 2:
        a = math.radians(rng.uniform(-max_deg, max_deg))
        return np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    a = math.radians(rng.uniform(0, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * k @ k  # Rodrigues


def _population(dim: int, n: int, seed: int, noise: float = 1.0) -> tuple[np.ndarray, list]:
    """A base shape (12 landmarks spread over ~100 mm) and n noisy, posed copies of it."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(99).uniform(-50, 50, (12, dim))
    shapes = []
    for _ in range(n):
        s = rng.uniform(0.9, 1.1)
        shape = s * (base + rng.normal(0, noise, base.shape)) @ _rotation(dim, rng, 10).T
        shapes.append(shape + rng.uniform(-30, 30, dim))
    return base, shapes


@pytest.mark.parametrize("dim", [2, 3])
def test_similarity_fit_recovers_a_known_transform(dim: int) -> None:
    rng = np.random.default_rng(dim)
    source = rng.normal(0, 20, (9, dim))
    rot = _rotation(dim, rng, 170)
    target = 1.37 * source @ rot.T + rng.normal(0, 10, dim)
    scale, rotation, shift = similarity_fit(source, target)
    assert scale == pytest.approx(1.37, rel=1e-9)
    np.testing.assert_allclose(rotation, rot, atol=1e-9)
    np.testing.assert_allclose(scale * source @ rotation.T + shift, target, atol=1e-8)


@pytest.mark.parametrize("dim", [2, 3])
def test_similarity_fit_never_mirrors(dim: int) -> None:
    rng = np.random.default_rng(5)
    source = rng.normal(0, 20, (9, dim))
    mirrored = source * np.r_[-1.0, np.ones(dim - 1)]
    _, rotation, _ = similarity_fit(source, mirrored)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    # The best proper rotation cannot reproduce a mirror image.
    scale, rotation, shift = similarity_fit(source, mirrored)
    assert np.abs(scale * source @ rotation.T + shift - mirrored).max() > 5


@pytest.mark.parametrize("dim", [2, 3])
def test_fit_shape_model_finds_the_mean_shape_and_the_ranges(dim: int) -> None:
    base, shapes = _population(dim, 60, seed=1)
    spec = fit_shape_model(shapes, rotation_deg=8, scale=0.05, localization_mm=0.5)
    assert spec.mean_mm.shape == (12, dim) and spec.shapes == 60
    np.testing.assert_allclose(spec.mean_mm.mean(axis=0), 0, atol=1e-9)
    # The mean is the base shape up to a similarity transform (noise 1 mm per point).
    s, r, t = similarity_fit(base, spec.mean_mm)
    assert np.abs(s * base @ r.T + t - spec.mean_mm).max() < 1.0
    assert s == pytest.approx(1.0, abs=0.05)  # the training shapes' mean size
    low, high = spec.scale_range
    assert 0.9 * 0.95 / 1.1 - 0.03 < low < 0.9 * 0.95 / 1.1 + 0.03
    assert 1.1 * 1.05 * 1.1 - 0.04 < high < 1.1 * 1.05 * 1.1 + 0.04
    # Training rotations up to 10 degrees about the mean's pose, +8 augmentation, +5 margin.
    assert 18 < spec.max_rotation_deg < 10 + 10 + 8 + 5
    # Noise of 1 mm per coordinate: distances rarely beyond 3-4 mm; twice that plus 0.5.
    assert np.all((spec.max_residual_mm > 3) & (spec.max_residual_mm < 12))


def test_fit_shape_model_refuses_too_few_or_sparse_shapes() -> None:
    _, shapes = _population(2, MIN_SHAPES - 1, seed=2)
    with pytest.raises(ValueError, match="at least 10 shapes"):
        fit_shape_model(shapes)
    _, shapes = _population(2, 20, seed=2)
    for shape in shapes[:12]:
        shape[3] = np.nan
    with pytest.raises(ValueError, match=r"landmarks \[3\]"):
        fit_shape_model(shapes)
    with pytest.raises(ValueError, match="at least"):
        fit_shape_model([np.zeros((3, 2))] * 20)  # 3 landmarks in 2D: no redundancy


@pytest.mark.parametrize("dim", [2, 3])
def test_check_shape_accepts_new_shapes_of_the_same_kind(dim: int) -> None:
    _, shapes = _population(dim, 80, seed=3)
    spec = fit_shape_model(shapes[:60], localization_mm=0.5)
    for shape in shapes[60:]:
        check = check_shape(shape, spec)
        assert check.plausible, check.problems
        assert not check.outlier.any()
        assert 0.85 < check.scale < 1.15


@pytest.mark.parametrize("dim", [2, 3])
def test_check_shape_reports_wrong_scale_rotation_and_one_misplaced_landmark(dim: int) -> None:
    _, shapes = _population(dim, 61, seed=4)
    spec = fit_shape_model(shapes[:60], rotation_deg=5, localization_mm=0.5)
    shape = shapes[60]
    centre = shape.mean(axis=0)

    doubled = check_shape(2.0 * (shape - centre), spec)  # a spacing twice too large
    assert not doubled.plausible
    assert doubled.scale == pytest.approx(2.0 * check_shape(shape, spec).scale, rel=1e-9)
    assert "pixel spacing" in doubled.problems[0]

    turned = check_shape((shape - centre) @ _rotation(dim, np.random.default_rng(0), 0).T, spec)
    assert turned.plausible
    quarter = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])[:dim, :dim]
    rotated = check_shape((shape - centre) @ quarter.T, spec)
    # 90 degrees on top of the shape's own pose (within 10 degrees of the mean's).
    assert not rotated.plausible and 78 < abs(rotated.rotation_deg) < 102
    assert "degrees against the mean training shape" in rotated.problems[0]

    moved = shape.copy()
    moved[5] += 40.0  # one landmark on a structure 40 * sqrt(D) mm away
    check = check_shape(moved, spec)
    assert check.plausible  # the other eleven agree with one placement
    assert check.outlier.tolist() == [i == 5 for i in range(12)]
    assert check.residual_mm[5] == pytest.approx(40 * math.sqrt(dim), abs=5)


def test_check_shape_ignores_missing_landmarks_and_needs_enough_of_them() -> None:
    _, shapes = _population(2, 61, seed=5)
    spec = fit_shape_model(shapes[:60], localization_mm=0.5)
    shape = shapes[60].copy()
    shape[[0, 7]] = np.nan
    check = check_shape(shape, spec)
    assert check.plausible and not check.outlier.any()
    assert np.isnan(check.residual_mm[[0, 7]]).all() and np.isfinite(check.residual_mm).sum() == 10
    few = np.full_like(shape, np.nan)
    few[:3] = shapes[60][:3]  # 3 points in 2D: any shape fits them
    check = check_shape(few, spec)
    assert check.plausible and math.isnan(check.scale)


def test_check_shape_when_most_landmarks_are_scattered() -> None:
    _, shapes = _population(2, 61, seed=6)
    spec = fit_shape_model(shapes[:60], localization_mm=0.5)
    scattered = np.random.default_rng(1).uniform(-200, 200, (12, 2))
    check = check_shape(scattered, spec)
    assert not check.plausible
    assert check.outlier.sum() >= 6


def test_shape_spec_round_trip_and_validation() -> None:
    _, shapes = _population(3, 20, seed=7)
    spec = fit_shape_model(shapes)
    names = [f"p{i}" for i in range(12)]
    back = ShapeSpec.from_dict(json.loads(json.dumps(spec.to_dict())), names, 3)
    np.testing.assert_allclose(back.mean_mm, spec.mean_mm, atol=1e-4)
    np.testing.assert_allclose(back.max_residual_mm, spec.max_residual_mm, atol=1e-4)
    assert back.scale_range == spec.scale_range and back.shapes == 20
    with pytest.raises(ModelError, match="does not fit the model"):
        ShapeSpec.from_dict(spec.to_dict(), names[:11], 3)
    with pytest.raises(ModelError, match="does not fit the model"):
        ShapeSpec.from_dict(spec.to_dict(), names, 2)
    with pytest.raises(ModelError, match="invalid 'shape' entry"):
        ShapeSpec.from_dict({"mean_mm": []}, names, 3)
    bad = {**spec.to_dict(), "scale_range": [1.2, 1.5]}
    with pytest.raises(ModelError, match="out of range"):
        ShapeSpec.from_dict(bad, names, 3)


def test_model_json_keeps_the_shape_and_rejects_a_broken_one(model_2d: Path) -> None:
    model = fastlmk.load_model(model_2d)
    assert model.config.shape is not None  # trained on 48 phantoms: a shape model
    doc = model.config.to_dict()
    again = ModelConfig.from_dict(json.loads(json.dumps(doc)))
    assert again.shape is not None
    np.testing.assert_allclose(again.shape.mean_mm, model.config.shape.mean_mm, atol=1e-4)
    doc["shape"]["max_residual_mm"] = doc["shape"]["max_residual_mm"][:-1]
    with pytest.raises(ModelError, match="'shape' entry"):
        ModelConfig.from_dict(doc)
    doc["shape"] = None  # no shape check
    assert ModelConfig.from_dict(doc).shape is None
    training = model.config.metadata["training"]
    assert training["augment"]["rotation_deg"] > 0  # recorded for calibrate_shape


def _phantom_test_image(phantom: Path) -> tuple[sitk.Image, dict[str, np.ndarray]]:
    table = read_landmark_csv(phantom / "landmarks.csv")
    image_id = sorted(table)[-1]  # a test image
    return sitk.ReadImage(str(phantom / "images" / f"{image_id}.mha")), table[image_id]


def test_localize_flags_every_landmark_of_a_wrongly_scaled_image(
    model_2d: Path, phantom_2d: Path
) -> None:
    image, _ = _phantom_test_image(phantom_2d)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplausibleShapeWarning)
        good = fastlmk.localize(image, model_2d)
    assert good.details["shape"].plausible and not good.flagged.any()
    bad = sitk.Image(image)
    bad.SetSpacing([s * 0.5 for s in image.GetSpacing()])  # the body looks half as large
    with pytest.warns(ImplausibleShapeWarning, match="pixel spacing"):
        lm = fastlmk.localize(bad, model_2d)
    assert lm.flagged.all() and (lm.confidence <= 0.5).all()
    assert lm.details["shape"].scale < 0.7
    # Without a shape model the same points pass unflagged: the check is what catches it.
    model = fastlmk.load_model(model_2d)
    model.config = replace(model.config, shape=None)
    plain = fastlmk.localize(bad, model)
    assert "shape" not in plain.details and not plain.flagged.all()


def test_landmarks_json_reports_the_shape_check(
    model_2d: Path, phantom_2d: Path, tmp_path: Path
) -> None:
    image, _ = _phantom_test_image(phantom_2d)
    lm = fastlmk.localize(image, model_2d)
    doc = json.loads(lm.to_json(tmp_path / "a.json").read_text())
    shape = doc["extra"]["shape"]
    assert shape["problems"] == [] and 0.8 < shape["scale"] < 1.25
    assert isinstance(shape["rotation_deg"], float)


def test_calibrate_shape_from_annotated_images(
    model_2d: Path, phantom_2d: Path, tmp_path: Path
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(model_2d, model_dir)
    images = sorted((phantom_2d / "images").glob("*.mha"))
    table = read_landmark_csv(phantom_2d / "landmarks.csv")
    spec = calibrate_shape(model_dir, images[:30], table, rotation_deg=0.0, scale=0.0)
    assert spec.shapes == 30
    # The phantoms are rigid copies of one shape rotated +-25 degrees, scaled 0.9..1.1.
    assert 0.9 / 1.1 - 0.01 < spec.scale_range[0] < 0.9 and 1.1 < spec.scale_range[1] < 1.22
    # Rotations are measured from the average pose: up to 25 degrees, plus the 5 margin.
    assert 25 < spec.max_rotation_deg < 31
    model = fastlmk.load_model(model_dir)
    write_shape(model, spec)
    assert fastlmk.load_model(model_dir).config.shape.shapes == 30
    with pytest.raises(FastlmkError, match="at least 10 annotated images"):
        calibrate_shape(model_dir, images[:5], table)
    with pytest.raises(FastlmkError, match="at least 10 annotated images"):
        calibrate_shape(model_dir, images[:30], {})
    with pytest.raises(FastlmkError, match="image files"):
        calibrate_shape(model_dir, [sitk.Image(8, 8, sitk.sitkFloat32)], table)


def test_cli_calibrate_shape_only(model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(model_2d, model_dir)
    before = json.loads((model_dir / "model.json").read_text())
    del before["shape"]
    (model_dir / "model.json").write_text(json.dumps(before))
    images = [str(p) for p in sorted((phantom_2d / "images").glob("*.mha"))[:20]]
    landmarks = str(phantom_2d / "landmarks.csv")
    assert main(["calibrate", str(model_dir), *images, "--shape-only"]) == 2
    assert "--shape-only needs --landmarks" in capsys.readouterr().err
    assert (
        main(["calibrate", str(model_dir), *images, "--landmarks", landmarks, "--shape-only"]) == 0
    )
    assert "shape model from 20 annotated images" in capsys.readouterr().out
    after = json.loads((model_dir / "model.json").read_text())
    assert after["shape"]["shapes"] == 20
    assert after["confidence"] == before["confidence"]  # --shape-only: votes untouched


@pytest.mark.skipif(
    not (shared_data() / "isbi2015" / "images" / "155.jpg").is_file(),
    reason="ISBI 2015 data not found in ../shared/data",
)
def test_bundled_ceph_model_flags_a_wrong_spacing() -> None:
    path = shared_data() / "isbi2015" / "images" / "155.jpg"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ImplausibleShapeWarning)
        lm = fastlmk.localize(path, "ceph-isbi2015", spacing=0.1)
    assert not lm.flagged.any()
    with pytest.warns(ImplausibleShapeWarning, match="155: every landmark flagged.*spacing"):
        lm = fastlmk.localize(path, "ceph-isbi2015", spacing=0.15)
    assert lm.flagged.all()


def test_check_shape_fits_only_the_trusted_landmarks() -> None:
    _, shapes = _population(2, 61, seed=8)
    spec = fit_shape_model(shapes[:60], localization_mm=0.5)
    shape = shapes[60].copy()
    centre = shape.mean(axis=0)
    # Seven landmarks squeezed towards the centre, as when the field of view cuts them
    # off and the networks put them at its edge.
    shape[:7] = centre + 0.2 * (shape[:7] - centre)
    trusted = np.arange(12) >= 7
    check = check_shape(shape, spec, trusted=trusted)
    # The fit is the one on the trusted landmarks alone ...
    alone = shape.copy()
    alone[:7] = np.nan
    reference = check_shape(alone, spec)
    assert check.scale == pytest.approx(reference.scale, rel=1e-12)
    assert check.rotation_deg == pytest.approx(reference.rotation_deg, abs=1e-9)
    np.testing.assert_allclose(check.residual_mm[7:], reference.residual_mm[7:], rtol=1e-12)
    # ... and the others are measured against it.
    moved = np.linalg.norm(shape - shapes[60], axis=1) > 2 * spec.max_residual_mm
    assert moved.sum() >= 4 and check.outlier[moved].all() and not check.outlier[7:].any()
    assert check.plausible and 0.85 < check.scale < 1.15
    # Too few trusted landmarks to fit on: all found ones are used.
    few = check_shape(shapes[60], spec, trusted=np.arange(12) < 3)
    assert few.scale == pytest.approx(check_shape(shapes[60], spec).scale, rel=1e-12)


def test_cli_localize_reports_an_implausible_shape_on_one_line(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys
) -> None:
    image, _ = _phantom_test_image(phantom_2d)
    image.SetSpacing([s * 0.5 for s in image.GetSpacing()])
    path = tmp_path / "half.mha"
    sitk.WriteImage(image, str(path))
    capsys.readouterr()
    assert main(["localize", str(model_2d), str(path), "--out", str(tmp_path / "out")]) == 0
    captured = capsys.readouterr()
    assert f"warning: {path}: every landmark flagged: the landmarks span" in captured.err
    assert "ImplausibleShapeWarning" not in captured.err  # no Python warning text
    assert "4 flagged" in captured.out
    doc = json.loads((tmp_path / "out" / "half.json").read_text())
    assert "pixel spacing" in doc["extra"]["shape"]["problems"][0]


def test_calibrate_shape_refuses_annotations_of_another_dimensionality(
    model_2d: Path, phantom_2d: Path
) -> None:
    images = sorted((phantom_2d / "images").glob("*.mha"))[:12]
    table = read_landmark_csv(phantom_2d / "landmarks.csv")
    first = images[0].name.split(".")[0]
    table[first] = {n: np.append(p, 0.0) for n, p in table[first].items()}  # 3D points
    with pytest.raises(FastlmkError, match="not 2D"):
        calibrate_shape(model_2d, images, table)
    name = next(iter(table[first]))
    table[first][name] = table[first][name][:2]  # one 2D point among 3D ones
    with pytest.raises(FastlmkError, match="not 2D"):
        calibrate_shape(model_2d, images, table)


def _reference_conditional(x, mean, cov, given, dim):
    """Textbook conditional Gaussian, one landmark at a time, float64 solves."""
    out = np.full(len(given), np.nan)
    for k in range(len(given)):
        t = np.arange(k * dim, (k + 1) * dim)
        others = [i for i in range(len(x)) if given[i // dim] and i // dim != k]
        gain = cov[np.ix_(t, others)] @ np.linalg.inv(cov[np.ix_(others, others)])
        predicted = mean[t] + gain @ (x[others] - mean[others])
        out[k] = np.linalg.norm(x[t] - predicted)
    return out


@pytest.mark.parametrize("dim", [2, 3])
def test_conditional_residuals_match_the_textbook_formula(dim: int) -> None:
    from fastlmk.shape import _conditional_residuals

    rng = np.random.default_rng(dim)
    n = 7 * dim
    a = rng.normal(size=(n, n))
    cov = a @ a.T + 0.5 * np.eye(n)
    mean, x = rng.normal(size=n), rng.normal(size=n) * 3
    given = np.array([True, True, False, True, True, False, True])
    got = _conditional_residuals(x, mean, cov, given, dim)
    np.testing.assert_allclose(got, _reference_conditional(x, mean, cov, given, dim), rtol=1e-9)


def _linked_population(n: int, seed: int) -> list[np.ndarray]:
    """Twelve 2D landmarks in four triangles of side 3 mm; each triangle moves by about
    5 mm (sd) as one, so a landmark is far from the mean shape but close to where its
    two partners put it."""
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(7).uniform(-60, 60, (4, 2))
    triangle = np.array([[0.0, 0.0], [3.0, 0.0], [1.5, 2.6]])
    shapes = []
    for _ in range(n):
        groups = base + rng.normal(0, 5, base.shape)
        shape = np.repeat(groups, 3, axis=0) + np.tile(triangle, (4, 1))
        shape += rng.normal(0, 0.2, shape.shape)
        angle = math.radians(rng.uniform(-10, 10))
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        shapes.append(rng.uniform(0.9, 1.1) * shape @ rot.T + rng.uniform(-20, 20, 2))
    return shapes


def test_the_conditional_model_catches_what_the_mean_shape_cannot() -> None:
    shapes = _linked_population(81, seed=9)
    spec = fit_shape_model(shapes[:80], localization_mm=0.5)
    assert spec.covariance is not None and spec.max_conditional_mm is not None
    # Triangles vary by 5 mm about the mean shape, partners by 0.2 mm about each other.
    assert spec.max_residual_mm.min() > 10 and spec.max_conditional_mm.max() < 4
    shape = shapes[80].copy()
    assert not check_shape(shape, spec).outlier.any()
    shape[4] += [5.0, 5.0]  # 7 mm away from where its two partners put it
    check = check_shape(shape, spec)
    assert check.outlier.tolist() == [i == 4 for i in range(12)]
    assert check.residual_mm[4] == pytest.approx(7.07, abs=1.0)
    mean_only = replace(spec, covariance=None, max_conditional_mm=None)
    assert not check_shape(shape, mean_only).outlier.any()  # within the triangles' motion


def test_the_conditional_check_does_not_depend_on_pose() -> None:
    shapes = _linked_population(81, seed=10)
    spec = fit_shape_model(shapes[:80], localization_mm=0.5)
    shape = shapes[80].copy()
    shape[7] += [6.0, -4.0]
    a = math.radians(17)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    posed = 1.08 * shape @ rot.T + [40.0, -25.0]
    one, two = check_shape(shape, spec), check_shape(posed, spec)
    assert one.outlier.tolist() == two.outlier.tolist() and one.outlier[7]
    np.testing.assert_allclose(two.residual_mm, 1.08 * one.residual_mm, rtol=1e-6)


def test_shape_spec_with_covariance_round_trips_and_is_checked() -> None:
    shapes = _linked_population(40, seed=11)
    spec = fit_shape_model(shapes)
    names = [f"p{i}" for i in range(12)]
    doc = json.loads(json.dumps(spec.to_dict()))
    back = ShapeSpec.from_dict(doc, names, 2)
    assert back.covariance is not None and back.max_conditional_mm is not None
    np.testing.assert_allclose(back.covariance, spec.covariance, rtol=1e-5, atol=1e-9)
    probe = shapes[0].copy()
    probe[3] += 9.0
    np.testing.assert_allclose(
        check_shape(probe, back).residual_mm, check_shape(probe, spec).residual_mm, atol=1e-3
    )  # mm: model.json keeps six significant digits
    bad = dict(doc, covariance=[row[:-1] for row in doc["covariance"]])
    with pytest.raises(ModelError, match="does not fit the model"):
        ShapeSpec.from_dict(bad, names, 2)
    with pytest.raises(ModelError, match="does not fit the model"):
        ShapeSpec.from_dict({k: v for k, v in doc.items() if k != "covariance"}, names, 2)
