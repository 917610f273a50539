"""The AFIDs files (3D Slicer .fcsv, RAS) round trip; the bundled model on the template.

Needs ``../shared/data/afids-mni152`` (skipped without it: a fresh clone has no data).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import shared_data
from fastlmk.afids import AfidsData, find_afids_data, read_consensus, read_rater
from fastlmk.landmark_files import (
    read_fcsv,
    read_landmarks,
    read_slicer_markups,
    write_fcsv,
    write_slicer_markups,
)
from fastlmk.model import available_models

_DIR = shared_data() / "afids-mni152"
pytestmark = pytest.mark.skipif(
    not (_DIR / "groundtruth.fcsv").is_file(), reason=f"AFIDs data not found at {_DIR}"
)
_FILES = ["groundtruth.fcsv", "rater01.fcsv", "rater02.fcsv", "rater03.fcsv", "rater04.fcsv"]


@pytest.fixture(scope="module")
def data() -> AfidsData:
    return find_afids_data(_DIR)


@pytest.mark.parametrize("name", _FILES)
def test_fcsv_round_trip(name: str, tmp_path: Path) -> None:
    names, points = read_fcsv(_DIR / name)
    assert len(names) == 32 and points.shape == (32, 3)
    write_fcsv(tmp_path / name, names, points)
    names2, points2 = read_fcsv(tmp_path / name)
    assert names2 == names
    np.testing.assert_allclose(points2, points, atol=1e-9)


def test_fcsv_is_ras_and_becomes_lps() -> None:
    """The file stores RAS; fastlmk returns LPS (x and y negated)."""
    names, lps = read_fcsv(_DIR / "groundtruth.fcsv")
    first = (_DIR / "groundtruth.fcsv").read_text().splitlines()[3].split(",")
    assert names[0] == "AC"
    np.testing.assert_allclose(lps[0], [-float(first[1]), -float(first[2]), float(first[3])])


def test_slicer_markups_round_trip(tmp_path: Path) -> None:
    names, points = read_fcsv(_DIR / "groundtruth.fcsv")
    path = tmp_path / "afids.mrk.json"
    write_slicer_markups(path, names, points, confidence=np.linspace(0, 1, 32))
    doc = json.loads(path.read_text())
    assert doc["@schema"].startswith("https://raw.githubusercontent.com/slicer/slicer/")
    (markup,) = doc["markups"]
    assert markup["type"] == "Fiducial"
    assert markup["coordinateSystem"] == "LPS" and markup["coordinateUnits"] == "mm"
    assert [cp["label"] for cp in markup["controlPoints"]] == names
    assert all(cp["positionStatus"] == "defined" for cp in markup["controlPoints"])
    names2, points2 = read_slicer_markups(path)
    assert names2 == names
    np.testing.assert_allclose(points2, points, atol=1e-9)
    table = read_landmarks(path)
    np.testing.assert_allclose(table["afids"]["AC"], points[0], atol=1e-9)


def test_raters_match_consensus_by_order(data: AfidsData) -> None:
    """Raters 02-04 abbreviate names; matched by protocol order they are ~1.3 mm off."""
    _, consensus = read_consensus(data)
    assert len(data.raters) == 4
    errors = np.stack([np.linalg.norm(read_rater(r) - consensus, axis=1) for r in data.raters])
    assert errors.max() < 6.0
    assert 0.8 < errors.mean() < 2.0


@pytest.mark.skipif(
    "afids-mni152" not in available_models(), reason="bundled AFIDs model not installed"
)
def test_bundled_model_on_template(data: AfidsData) -> None:
    import fastlmk

    names, consensus = read_consensus(data)
    lm = fastlmk.localize(data.t1w, "afids-mni152")
    assert lm.names == names
    errors = np.linalg.norm(lm.points_mm - consensus, axis=1)
    assert errors.mean() < 1.5
