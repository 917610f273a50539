"""``fastlmk localize`` and ``fastlmk bench``: output names, kept tables, bad arguments."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastlmk import load_model
from fastlmk.cli import _image_id, main
from fastlmk.landmark_files import read_landmark_csv


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        ("scans/155.jpg", "155"),
        ("ct.nii.gz", "ct"),
        ("CT.NII.GZ", "CT"),
        ("155.v2.jpg", "155.v2"),
        ("dicom_dir", "dicom_dir"),
        (".jpg", "image"),
    ],
)
def test_image_id_removes_only_the_format_suffix(item: str, expected: str) -> None:
    assert _image_id(item) == expected


def test_same_names_and_repeated_runs_lose_nothing(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = phantom_2d / "images" / "phantom060.mha"
    other = phantom_2d / "images" / "phantom061.mha"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    shutil.copy(src, tmp_path / "a" / "scan.mha")
    shutil.copy(other, tmp_path / "b" / "scan.mha")
    shutil.copy(other, tmp_path / "scan.v2.mha")
    out = tmp_path / "out"
    items = [str(tmp_path / "a" / "scan.mha"), str(tmp_path / "b" / "scan.mha")]
    assert main(["localize", str(model_2d), *items, "--out", str(out)]) == 0
    assert "written as 'scan-2'" in capsys.readouterr().err
    first = read_landmark_csv(out / "scan.csv")
    second = read_landmark_csv(out / "scan-2.csv")
    assert set(read_landmark_csv(out / "landmarks.csv")) == {"scan", "scan-2"}
    # The two inputs are different images: their own files must differ too.
    name = next(iter(first["scan"]))
    assert (first["scan"][name] != second["scan-2"][name]).any()

    # A second run into the same directory adds to the table instead of replacing it.
    assert main(["localize", str(model_2d), str(tmp_path / "scan.v2.mha"), "--out", str(out)]) == 0
    assert set(read_landmark_csv(out / "landmarks.csv")) == {"scan", "scan-2", "scan.v2"}
    assert (out / "scan.v2.csv").is_file() and (out / "scan.csv").is_file()


def test_out_that_is_a_file_or_an_unreadable_table_is_refused(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(phantom_2d / "images" / "phantom060.mha")
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    assert main(["localize", str(model_2d), image, "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert a_file.read_text() == "keep me"

    out = tmp_path / "out"
    out.mkdir()
    (out / "landmarks.csv").write_text("not,a,landmark,table\n")
    assert main(["localize", str(model_2d), image, "--out", str(out)]) == 2
    assert "cannot be read" in capsys.readouterr().err
    assert (out / "landmarks.csv").read_text() == "not,a,landmark,table\n"


@pytest.mark.parametrize("flags", [["--repeats", "0"], ["--warmup", "-1"]])
def test_bench_rejects_impossible_counts(flags: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "some-model", str(tmp_path / "x.png"), *flags])
    assert exc.value.code == 2


def test_a_table_this_model_did_not_write_is_kept_and_refused(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(phantom_2d / "images" / "phantom060.mha")
    for text in ("image,landmark,x,y\nA,sella,1.0,2.0\n", "image,landmark,x,y,z\nA,apex,1,2,3\n"):
        out = tmp_path / f"out{len(text)}"
        out.mkdir()
        (out / "landmarks.csv").write_text(text)
        assert main(["localize", str(model_2d), image, "--out", str(out)]) == 2
        assert "not a previous result of this model" in capsys.readouterr().err
        assert (out / "landmarks.csv").read_text() == text
        assert sorted(p.name for p in out.iterdir()) == ["landmarks.csv"]


def test_out_below_a_file_is_a_one_line_error(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a_file").write_text("x")
    image = str(phantom_2d / "images" / "phantom060.mha")
    assert main(["localize", str(model_2d), image, "--out", str(tmp_path / "a_file" / "o")]) == 2
    err = capsys.readouterr().err
    assert "cannot create the directory" in err and "Traceback" not in err


def test_ids_that_differ_only_in_case_do_not_share_files(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(phantom_2d / "images" / "phantom060.mha", tmp_path / "Scan.mha")
    shutil.copy(phantom_2d / "images" / "phantom061.mha", tmp_path / "scan.mha")
    items = [str(tmp_path / "Scan.mha"), str(tmp_path / "scan.mha")]
    assert main(["localize", str(model_2d), *items, "--out", str(tmp_path / "o")]) == 0
    assert set(read_landmark_csv(tmp_path / "o" / "landmarks.csv")) == {"Scan", "scan-2"}


def test_a_landmark_without_estimate_does_not_stop_the_run(
    model_2d: Path,
    phantom_2d: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import fastlmk.inference

    real = fastlmk.inference.localize

    def losing_the_first(*args: object, **kwargs: object) -> object:
        lm = real(*args, **kwargs)  # type: ignore[arg-type]
        lm.points_mm[0] = np.nan
        lm.index[0] = np.nan
        lm.flagged[0] = True
        return lm

    monkeypatch.setattr(fastlmk.inference, "localize", losing_the_first)
    images = [str(phantom_2d / "images" / f"phantom06{i}.mha") for i in (0, 1)]
    out = tmp_path / "o"
    assert main(["localize", str(model_2d), *images, "--out", str(out)]) == 0
    first = load_model(model_2d).names[0]
    assert f"not found: {first}" in capsys.readouterr().out
    table = read_landmark_csv(out / "landmarks.csv")
    assert set(table) == {"phantom060", "phantom061"}
    assert first not in table["phantom060"] and len(table["phantom060"]) == 3
    doc = json.loads((out / "phantom061.json").read_text())
    assert doc["extra"]["not_found"] == [first] and len(doc["landmarks"]) == 3
