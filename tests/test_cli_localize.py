"""``fastlmk localize`` and ``fastlmk bench``: output names, kept tables, bad arguments."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
    assert "written as 'scan-2'" in capsys.readouterr().out
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
