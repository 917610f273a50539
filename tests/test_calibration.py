"""``fastlmk calibrate``: thresholds written to model.json, nothing else touched."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from fastlmk import load_model
from fastlmk.cli import main


def _digests(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in directory.iterdir()
        if p.is_file() and p.name != "model.json"
    }


def test_calibrate_rewrites_only_the_thresholds(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(model_2d, model_dir)
    doc = json.loads((model_dir / "model.json").read_text())
    # An earlier, tighter spread threshold must not hold the new one down.
    doc["confidence"].update(min_weight=0.05, max_weight=None, max_spread_mm=0.01)
    (model_dir / "model.json").write_text(json.dumps(doc))
    before = _digests(model_dir)

    images = [str(phantom_2d / "images" / f"phantom{i:03d}.mha") for i in range(52, 56)]
    assert main(["calibrate", str(model_dir), *images]) == 0
    assert "written to" in capsys.readouterr().out
    assert _digests(model_dir) == before
    after = json.loads((model_dir / "model.json").read_text())
    low, high = after["metadata"]["confidence_calibration"]["weight_range"]
    assert after["confidence"]["min_weight"] == pytest.approx(low / 2)
    assert after["confidence"]["max_weight"] == pytest.approx(high * 2)
    spread = after["metadata"]["confidence_calibration"]["spread_high_mm"]
    local = doc["local"]  # the cap: half the local crop (16 pixels of 1 mm here)
    sizes = zip(local["crop_size"], local["spacing"][::-1], strict=True)
    half_crop = min(c * sp for c, sp in sizes) / 2
    assert after["confidence"]["max_spread_mm"] == pytest.approx(min(half_crop, 2 * spread))
    assert after["metadata"]["confidence_calibration"]["images"] == 4
    assert {k: v for k, v in after.items() if k not in ("confidence", "metadata")} == {
        k: v for k, v in doc.items() if k not in ("confidence", "metadata")
    }
    spec = load_model(model_dir).config.confidence
    assert spec.min_weight == pytest.approx(low / 2) and spec.max_weight == pytest.approx(high * 2)


def test_calibrate_needs_readable_images(
    model_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(model_2d, model_dir)
    before = (model_dir / "model.json").read_text()
    bad = tmp_path / "bad.mha"
    bad.write_text("not an image")
    assert main(["calibrate", str(model_dir), str(bad)]) == 2
    assert "bad.mha" in capsys.readouterr().err
    assert (model_dir / "model.json").read_text() == before


def test_images_the_model_does_not_localize_are_refused(
    model_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np
    import SimpleITK as sitk

    model_dir = tmp_path / "model"
    shutil.copytree(model_2d, model_dir)
    before = (model_dir / "model.json").read_text()
    blank = tmp_path / "blank.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((96, 96), np.float32)), str(blank))
    assert main(["calibrate", str(model_dir), str(blank)]) == 2
    assert "would switch the flags off" in capsys.readouterr().err
    assert (model_dir / "model.json").read_text() == before


def test_calibrate_wants_a_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["calibrate", "ceph-isbi2015", str(tmp_path / "x.jpg")]) == 2
    assert "give a model directory" in capsys.readouterr().err
