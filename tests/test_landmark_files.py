"""fastlmk.landmark_files: CSV, JSON, Slicer .mrk.json and .fcsv, RAS <-> LPS."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from fastlmk.errors import LandmarkFileError
from fastlmk.landmark_files import (
    read_fcsv,
    read_landmark_csv,
    read_landmark_json,
    read_landmarks,
    read_slicer_markups,
    write_fcsv,
    write_landmark_csv,
    write_landmark_json,
    write_slicer_markups,
)


def _shared_data() -> Path:
    env = os.environ.get("FASTLMK_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


AFIDS = _shared_data() / "afids-mni152"
ISBI = _shared_data() / "isbi2015"
NAMES = ["AC", "PC", "R superior LMS, lateral"]  # a comma must survive every format
POINTS_3D = np.array([[0.1, -2.5, 3.0], [1e-7, 123456.789012345, -0.3], [-7.0, 8.25, 9.5]])
POINTS_2D = POINTS_3D[:, :2]


@pytest.mark.parametrize("points", [POINTS_2D, POINTS_3D])
def test_csv_round_trip_is_exact(tmp_path: Path, points: np.ndarray) -> None:
    table = {
        "001": dict(zip(NAMES, points, strict=True)),
        "scan b": {"x": points[0] * 2},
    }
    write_landmark_csv(tmp_path / "lm.csv", table)
    back = read_landmark_csv(tmp_path / "lm.csv")
    assert list(back) == ["001", "scan b"]
    assert list(back["001"]) == NAMES
    for image, landmarks in table.items():
        for name, point in landmarks.items():
            np.testing.assert_array_equal(back[image][name], point)
    header = (tmp_path / "lm.csv").read_text().splitlines()[0]
    assert header == ("image,landmark,x,y" if points.shape[1] == 2 else "image,landmark,x,y,z")


def test_csv_accepts_mm_column_names(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("image,landmark,x_mm,y_mm\n001,sella,83.5,99.6\n")
    table = read_landmark_csv(tmp_path / "a.csv")
    np.testing.assert_array_equal(table["001"]["sella"], [83.5, 99.6])


def test_isbi_csv_when_available() -> None:
    path = ISBI / "landmarks_senior.csv"
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    table = read_landmark_csv(path)
    assert "001" in table and "300" in table
    assert len(table) == 300
    assert all(len(landmarks) == 19 for landmarks in table.values())
    assert list(table["001"])[:2] == ["sella", "nasion"]
    np.testing.assert_array_equal(table["001"]["sella"], [83.5, 99.6])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image,landmark,x\n1,a,2\n", r"line 1: .*lacks column\(s\) \['y'\]"),
        ("image,landmark,x,y\n1,a,2,3\n1,b,two,3\n", "line 3: column 'y'|line 3: column 'x'"),
        ("image,landmark,x,y\n1,a,2,3\n1,a,4,5\n", "line 3: duplicate landmark 'a'"),
        ("image,landmark,x,y,z\n1,a,2,3,4\n1,b,2,3,\n", "line 3: 2D landmark, but line 2 is 3D"),
        ("image,landmark,x,y\n1,a,2,inf\n", "line 2: .*finite"),
        ("image,landmark,x,y\n1,a,2\n", "line 2: 3 fields"),
        ("image,landmark,x,y\n", "no landmark rows"),
        ("", "empty"),
        ("  \n\n", "empty"),
    ],
)
def test_malformed_csv(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(LandmarkFileError, match=message) as info:
        read_landmark_csv(path)
    assert str(path) in str(info.value)


def test_csv_writer_rejects_mixed_dimensions(tmp_path: Path) -> None:
    with pytest.raises(LandmarkFileError, match="all"):
        write_landmark_csv(tmp_path / "x.csv", {"a": {"p": [1.0, 2.0], "q": [1.0, 2.0, 3.0]}})


@pytest.mark.parametrize("points", [POINTS_2D, POINTS_3D])
def test_json_round_trip(tmp_path: Path, points: np.ndarray) -> None:
    path = tmp_path / "lm.json"
    write_landmark_json(
        path, NAMES, points, image="scan-7", confidence=[0.9, 0.2, 0.5],
        flagged=[False, True, False], extra={"model": "ceph", "index": [[1, 2]]},
    )  # fmt: skip
    document = json.loads(path.read_text())
    assert document["coordinate_system"] == "LPS"
    assert document["units"] == "mm"
    assert document["landmarks"][1] == {
        "name": NAMES[1], "position": points[1].tolist(), "confidence": 0.2, "flagged": True,
    }  # fmt: skip
    back = read_landmark_json(path)
    assert back.names == NAMES
    assert back.image == "scan-7"
    np.testing.assert_array_equal(back.points_lps, points)
    assert back.confidence is not None and back.flagged is not None
    np.testing.assert_array_equal(back.confidence, [0.9, 0.2, 0.5])
    np.testing.assert_array_equal(back.flagged, [False, True, False])
    assert back.extra == {"model": "ceph", "index": [[1, 2]]}


def test_json_in_ras_is_flipped_to_lps(tmp_path: Path) -> None:
    path = tmp_path / "ras.json"
    path.write_text(json.dumps({
        "coordinate_system": "RAS", "units": "mm",
        "landmarks": [{"name": "a", "position": [1.0, 2.0, 3.0]}],
    }))  # fmt: skip
    np.testing.assert_array_equal(read_landmark_json(path).points_lps, [[-1.0, -2.0, 3.0]])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "line 1: invalid JSON"),
        ('{"landmarks": 3}', "'landmarks' list"),
        ('{"landmarks": [{"name": "a"}]}', "needs 'name' and 'position'"),
        ('{"landmarks": [{"name": "a", "position": [1, "x"]}]}', "finite numbers"),
        ('{"units": "cm", "landmarks": []}', "units 'cm'"),
        ('{"coordinate_system": "XYZ", "landmarks": []}', "coordinate_system 'XYZ'"),
        ('{"landmarks": [{"name": "a", "position": [1, 2]}, '
         '{"name": "b", "position": [1, 2, 3]}]}', "mixes 2D and 3D"),
    ],
)  # fmt: skip
def test_malformed_json(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(LandmarkFileError, match=message) as info:
        read_landmark_json(path)
    assert str(path) in str(info.value)


def test_slicer_markups_round_trip_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "scan-01.mrk.json"
    write_slicer_markups(path, NAMES, POINTS_3D, confidence=[0.9, 0.1, 0.5],
                         flagged=[False, True, False])  # fmt: skip
    document = json.loads(path.read_text())
    assert document["@schema"].endswith("markups-schema-v1.0.3.json#")
    (markup,) = document["markups"]
    assert markup["type"] == "Fiducial"
    assert markup["coordinateSystem"] == "LPS"
    assert markup["coordinateUnits"] == "mm"
    points = markup["controlPoints"]
    assert [p["label"] for p in points] == NAMES
    assert [p["id"] for p in points] == ["1", "2", "3"]
    assert all(p["positionStatus"] == "defined" for p in points)
    assert points[1]["description"].startswith("flagged: low confidence")
    assert "flagged" not in points[0]["description"]
    assert points[0]["position"] == POINTS_3D[0].tolist()  # written in LPS, unchanged
    names, back = read_slicer_markups(path)
    assert names == NAMES
    np.testing.assert_array_equal(back, POINTS_3D)


def test_slicer_markups_2d_points_get_z_zero(tmp_path: Path) -> None:
    write_slicer_markups(tmp_path / "a.mrk.json", NAMES, POINTS_2D)
    _, back = read_slicer_markups(tmp_path / "a.mrk.json")
    assert back.shape == (3, 3)
    np.testing.assert_array_equal(back[:, :2], POINTS_2D)
    np.testing.assert_array_equal(back[:, 2], 0.0)


def test_slicer_markups_in_ras_are_flipped(tmp_path: Path) -> None:
    path = tmp_path / "ras.mrk.json"
    path.write_text(json.dumps({
        "@schema": "x",
        "markups": [{"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
            {"label": "AC", "position": [10.5, -20.0, 3.0]},
            {"label": "PC", "positionStatus": "undefined"},
        ]}],
    }))  # fmt: skip
    names, points = read_slicer_markups(path)
    assert names == ["AC", "PC"]
    np.testing.assert_array_equal(points[0], [-10.5, 20.0, 3.0])  # R -> L, A -> P: negate x, y
    assert np.isnan(points[1]).all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("[1, 2", "invalid JSON"),
        ('{"markups": []}', "no 'markups'"),
        ('{"markups": [{"type": "Fiducial", "coordinateSystem": "XYZ"}]}', "coordinateSystem"),
        ('{"markups": [{"type": "Fiducial", "controlPoints": [{"position": [1, 2]}]}]}',
         "3 finite numbers"),
    ],
)  # fmt: skip
def test_malformed_slicer_markups(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.mrk.json"
    path.write_text(text)
    with pytest.raises(LandmarkFileError, match=message) as info:
        read_slicer_markups(path)
    assert str(path) in str(info.value)


def test_fcsv_round_trip_writes_ras(tmp_path: Path) -> None:
    path = tmp_path / "p.fcsv"
    write_fcsv(path, NAMES, POINTS_3D)
    lines = path.read_text().splitlines()
    assert lines[1] == "# CoordinateSystem = 0"
    first = lines[3].split(",")
    # LPS (0.1, -2.5, 3.0) is RAS (-0.1, 2.5, 3.0)
    assert [float(v) for v in first[1:4]] == [-0.1, 2.5, 3.0]
    assert first[11] == "AC"
    names, back = read_fcsv(path)
    assert names == NAMES
    np.testing.assert_array_equal(back, POINTS_3D)


@pytest.mark.parametrize("system", ["1", "LPS"])
def test_fcsv_in_lps_is_not_flipped(tmp_path: Path, system: str) -> None:
    path = tmp_path / "lps.fcsv"
    path.write_text(
        f"# Markups fiducial file version = 4.11\n# CoordinateSystem = {system}\n"
        "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
        'vtkMRMLMarkupsFiducialNode_0,1,2,3,0,0,0,1,1,1,0,"a, b",,\n'
    )
    names, points = read_fcsv(path)
    assert names == ["a, b"]
    np.testing.assert_array_equal(points, [[1.0, 2.0, 3.0]])


def test_fcsv_name_rule(tmp_path: Path) -> None:
    path = tmp_path / "mixed.fcsv"
    path.write_text(
        "# Markups fiducial file version = 4.6\r\n# CoordinateSystem = RAS\r\n"
        "n0,1,2,3,0,0,0,1,1,1,0,1,AC,vtkMRMLScalarVolumeNode1\r\n"  # number label, name in desc
        "n1,1,2,3,0,0,0,1,1,1,0,PC,,vtkMRMLScalarVolumeNode1\r\n"  # name in label
        "n2,1,2,3,0,0,0,1,1,1,0,3,vtkMRMLScalarVolumeNode1,\r\n"  # desc is a node id
        "n3,1,2,3,0,0,0,1,1,1,0,RMB,right mammillary body,\r\n"  # label wins over desc
    )
    names, points = read_fcsv(path)
    assert names == ["AC", "PC", "3", "RMB"]
    np.testing.assert_array_equal(points[0], [-1.0, -2.0, 3.0])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("# CoordinateSystem = 2\nid,1,2,3\n", "line 1: CoordinateSystem '2'"),
        ("# columns = id,x,y\n", "line 1: columns"),
        ("# CoordinateSystem = 0\nid,1,2\n", "line 2: 3 fields"),
        ("# CoordinateSystem = 0\nid,1,2,z\n", "line 2: column 'z'"),
        ("# CoordinateSystem = 0\n", "no fiducial rows"),
    ],
)
def test_malformed_fcsv(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.fcsv"
    path.write_text(text)
    with pytest.raises(LandmarkFileError, match=message) as info:
        read_fcsv(path)
    assert str(path) in str(info.value)


def test_missing_files_name_the_file(tmp_path: Path) -> None:
    for reader in (read_landmark_csv, read_landmark_json, read_slicer_markups, read_fcsv):
        with pytest.raises(LandmarkFileError, match="no such") as info:
            reader(tmp_path / "missing.x")
        assert "missing.x" in str(info.value)


def _afids(name: str) -> tuple[list[str], np.ndarray]:
    path = AFIDS / name
    if not path.exists():
        pytest.skip(f"shared data not found at {path}")
    return read_fcsv(path)


def test_afids_files_when_available() -> None:
    truth_names, truth = _afids("groundtruth.fcsv")
    # groundtruth.fcsv stores AC in RAS as (-0.2049, 2.7229, -4.8811): LPS negates x and y.
    np.testing.assert_allclose(truth[0], [0.204861407692308, -2.72288076923077, -4.88105282051282])
    raters = [_afids(f"rater0{i}.fcsv") for i in range(1, 5)]
    assert len(truth_names) == 32
    assert truth_names[:3] == ["AC", "PC", "infracollicular sulcus"]
    # The five files spell the names two ways (full names vs abbreviations; one rater
    # writes "Genu" for "GENU"), but all follow the AFIDs protocol order.
    assert raters[0][0] == truth_names
    assert raters[1][0] == raters[3][0]
    assert [n.upper() for n in raters[2][0]] == [n.upper() for n in raters[1][0]]
    assert raters[1][0][:3] == ["AC", "PC", "ICS"]
    distances = [np.linalg.norm(points - truth, axis=1).mean() for _, points in raters]
    assert all(len(names) == 32 for names, _ in raters)
    assert 0.5 < float(np.mean(distances)) < 3.0


def test_read_landmarks_dispatch(tmp_path: Path) -> None:
    write_landmark_csv(tmp_path / "all.csv", {"a": {"p": np.array([1.0, 2.0])}, "b": {}})
    assert list(read_landmarks(tmp_path / "all.csv")) == ["a"]
    assert list(read_landmarks(tmp_path / "all.csv", image="a")) == ["a"]
    with pytest.raises(LandmarkFileError, match="no landmarks for image 'zz'"):
        read_landmarks(tmp_path / "all.csv", image="zz")

    write_slicer_markups(tmp_path / "scan-01.mrk.json", NAMES, POINTS_3D)
    table = read_landmarks(tmp_path / "scan-01.mrk.json")
    assert list(table) == ["scan-01"]
    np.testing.assert_array_equal(table["scan-01"][NAMES[1]], POINTS_3D[1])

    write_landmark_json(tmp_path / "j.json", NAMES, POINTS_2D, image="img-9")
    assert list(read_landmarks(tmp_path / "j.json")) == ["img-9"]
    assert list(read_landmarks(tmp_path / "j.json", image="other")) == ["other"]

    write_fcsv(tmp_path / "f.fcsv", NAMES, POINTS_3D)
    table = read_landmarks(tmp_path / "f.fcsv")
    np.testing.assert_allclose(table["f"]["AC"], POINTS_3D[0])

    write_fcsv(tmp_path / "dup.fcsv", ["a", "a"], POINTS_3D[:2])
    with pytest.raises(LandmarkFileError, match="'a' appears twice"):
        read_landmarks(tmp_path / "dup.fcsv")
    with pytest.raises(LandmarkFileError, match="unknown landmark file type"):
        read_landmarks(tmp_path / "x.txt")


def test_writers_validate_shapes(tmp_path: Path) -> None:
    with pytest.raises(LandmarkFileError, match="expected"):
        write_slicer_markups(tmp_path / "a.mrk.json", ["a", "b"], np.zeros((3, 3)))
    with pytest.raises(LandmarkFileError, match="confidence"):
        write_landmark_json(tmp_path / "a.json", ["a"], np.zeros((1, 3)), confidence=[1, 2])
    with pytest.raises(LandmarkFileError, match="finite"):
        write_fcsv(tmp_path / "a.fcsv", ["a"], [[np.nan, 0.0, 0.0]])
