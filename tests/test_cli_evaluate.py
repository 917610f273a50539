"""``fastlmk evaluate`` on inputs that do not fit together: clear messages, strict JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastlmk.cli import main
from fastlmk.landmark_files import write_fcsv, write_landmark_csv

REF = {
    "155": {"sella": np.array([73.7, 103.4]), "nasion": np.array([134.1, 93.6])},
    "156": {"sella": np.array([70.0, 100.0]), "nasion": np.array([130.0, 90.0])},
}


def _pred(shift: float = 1.0) -> dict[str, dict[str, np.ndarray]]:
    return {i: {n: p + np.array([shift, 0.0]) for n, p in pts.items()} for i, pts in REF.items()}


def _csv(path: Path, table: dict[str, dict[str, np.ndarray]]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_landmark_csv(path, table)
    return str(path)


def _evaluate(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["evaluate", *args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _error_line(err: str) -> str:
    """The CLI's single ``error:`` line (and nothing that looks like a traceback)."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_no_shared_image_id_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred = {f"0{i}": pts for i, pts in _pred().items()}
    args = ["--pred", _csv(tmp_path / "p.csv", pred), "--ref", _csv(tmp_path / "ref.csv", REF)]
    rc, _, err = _evaluate(args, capsys)
    line = _error_line(err)
    assert rc == 2
    assert "no image id" in line and "'0155', '0156'" in line and "'155', '156'" in line
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = _evaluate(["--pred", str(empty), "--ref", str(tmp_path / "ref.csv")], capsys)
    assert rc == 2 and "no .csv file" in _error_line(err)


def test_one_prediction_image_and_one_reference_file_are_paired(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # `fastlmk localize` keys the prediction by the image name; a single-image .fcsv
    # is keyed by its own file name.
    truth = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    write_fcsv(tmp_path / "groundtruth.fcsv", ["AC", "PC"], truth)
    pred = {"tpl_T1w": {"AC": truth[0] + [0.0, 0.0, 2.0], "PC": truth[1]}}
    out = tmp_path / "m.json"
    args = ["--pred", _csv(tmp_path / "tpl_T1w.csv", pred)]
    args += ["--ref", str(tmp_path / "groundtruth.fcsv"), "--out", str(out)]
    rc, printed, err = _evaluate(args, capsys)
    assert rc == 0, err
    assert "note:" in err and "'groundtruth'" in err and "'tpl_T1w'" in err
    assert "reference: groundtruth  (1 images, 2 points, 0 missed)" in printed
    m = json.loads(out.read_text())["references"]["groundtruth"]
    assert m["mre_mm"] == pytest.approx(1.0)
    assert m["paired_images"] == {"groundtruth": "tpl_T1w"}

    # Two CSV files name their images: one image each under other ids is not paired.
    ref156 = _csv(tmp_path / "ref156.csv", {"156": {"AC": truth[0], "PC": truth[1]}})
    rc, _, err = _evaluate(["--pred", _csv(tmp_path / "p155.csv", pred), "--ref", ref156], capsys)
    assert rc == 2 and "no image id is in both" in err


def test_3d_predictions_against_a_2d_reference_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred = {i: {n: np.r_[p, 5.0] for n, p in pts.items()} for i, pts in REF.items()}
    args = ["--pred", _csv(tmp_path / "p.csv", pred), "--ref", _csv(tmp_path / "ref.csv", REF)]
    rc, _, err = _evaluate(args, capsys)
    line = _error_line(err)
    assert rc == 2
    assert "'155'" in line and "'sella'" in line and "3D" in line and "2D" in line


def test_out_is_strict_json_with_null_for_a_missed_landmark(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred = _pred()
    del pred["155"]["nasion"], pred["156"]["nasion"]
    out = tmp_path / "metrics.json"
    args = ["--pred", _csv(tmp_path / "p.csv", pred), "--ref", _csv(tmp_path / "ref.csv", REF)]
    rc, _, _ = _evaluate([*args, "--out", str(out)], capsys)
    assert rc == 0

    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    m = json.loads(out.read_text(), parse_constant=reject)["references"]["ref"]
    assert m["per_image"] == {"155": None, "156": None}
    assert m["per_landmark"]["nasion"]["mre_mm"] is None
    assert m["per_landmark"]["sella"]["mre_mm"] == pytest.approx(1.0)
    assert m["missed"] == 2

    rc, _, err = _evaluate([*args, "--out", str(tmp_path / "no" / "dir" / "m.json")], capsys)
    assert rc == 2 and "cannot write the metrics" in _error_line(err)


def test_references_with_the_same_file_name_are_both_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    far = {i: {n: p + np.array([20.0, 0.0]) for n, p in pts.items()} for i, pts in REF.items()}
    r1 = _csv(tmp_path / "r1" / "ref.csv", REF)
    r2 = _csv(tmp_path / "r2" / "ref.csv", far)
    out = tmp_path / "m.json"
    args = ["--pred", _csv(tmp_path / "p.csv", _pred()), "--ref", r1, "--ref", r2]
    rc, printed, _ = _evaluate([*args, "--out", str(out)], capsys)
    assert rc == 0
    for name in ("r1/ref", "r2/ref", "mean"):
        assert f"reference: {name}  (" in printed
    refs = json.loads(out.read_text())["references"]
    assert refs["r1/ref"]["mre_mm"] == pytest.approx(1.0)
    assert refs["r2/ref"]["mre_mm"] == pytest.approx(19.0)
    assert refs["mean"]["mre_mm"] == pytest.approx(9.0)


def test_landmark_names_only_on_one_side_are_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pred = _pred()
    for pts in pred.values():
        pts["Sella"] = pts.pop("sella")
    pred["155"]["foo"] = np.zeros(2)
    out = tmp_path / "m.json"
    args = ["--pred", _csv(tmp_path / "p.csv", pred), "--ref", _csv(tmp_path / "ref.csv", REF)]
    rc, _, err = _evaluate([*args, "--out", str(out)], capsys)
    assert rc == 0
    warning = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1
    assert "only in the predictions (not evaluated): 'Sella', 'foo'" in warning[0]
    assert "only in the reference (counted as missed): 'sella'" in warning[0]
    m = json.loads(out.read_text())["references"]["ref"]
    assert m["unmatched_landmarks"] == {
        "only_in_predictions": ["Sella", "foo"],
        "only_in_reference": ["sella"],
    }
    assert m["missed"] == 2 and m["mre_mm"] == pytest.approx(1.0)
    # Matching names: no warning.
    args = ["--pred", _csv(tmp_path / "ok.csv", _pred()), "--ref", str(tmp_path / "ref.csv")]
    rc, _, err = _evaluate(args, capsys)
    assert rc == 0 and "warning" not in err
