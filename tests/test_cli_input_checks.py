"""Command-line and input mistakes that get a one-line error instead of a silent
no-op, a repeated job or a misleading message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fastlmk
from fastlmk.cli import main
from fastlmk.errors import InvalidImageError


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--stages", "global"], "--stages only apply with --int8"),
        (["--calibration", "x.png"], "--calibration only apply with --int8"),
        (["--int8", "--calibration", "x.png", "--stages", "local", "local"], "more than once"),
        (["--int8", "--fp16", "--calibration", "x.png"], "give one of them"),
    ],
)
def test_export_refuses_options_it_would_ignore_or_repeat(
    model_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], flags, message
) -> None:
    out = tmp_path / "out"
    assert main(["export", str(model_2d), "--out", str(out), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # refused before any work


def test_quantize_refuses_a_stage_named_twice(model_2d: Path, tmp_path: Path) -> None:
    from fastlmk.export import ExportError, export_onnx
    from fastlmk.quantize import quantize_int8

    model = fastlmk.load_model(model_2d)
    export_onnx(model, tmp_path, check=False)
    image = np.zeros((96, 96), np.float32)
    with pytest.raises(ExportError, match="more than once"):
        quantize_int8(model, [image], spacing=1.0, directory=tmp_path, stages=["local", "local"])


def test_a_directory_without_dicom_gives_one_line(
    model_2d: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    capfd.readouterr()
    assert main(["localize", str(model_2d), str(empty), "--out", str(tmp_path / "o")]) == 1
    err = capfd.readouterr().err  # file descriptor level: ITK writes there directly
    assert "directory contains no DICOM series" in err
    assert "WARNING" not in err and "GDCMSeriesFileNames" not in err


def test_a_colour_array_is_explained(model_2d: Path) -> None:
    with pytest.raises(InvalidImageError, match=r"shape \(H, W, 3\).*colour image"):
        fastlmk.localize(np.zeros((96, 96, 3), np.float32), model_2d, spacing=1.0)
    with pytest.raises(InvalidImageError) as info:  # a real 3D volume: no colour hint
        fastlmk.localize(np.zeros((20, 96, 96), np.float32), model_2d, spacing=1.0)
    assert "colour" not in str(info.value)
