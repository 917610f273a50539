"""The command line, end to end: train from a TOML file, localize, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastlmk.cli import main
from fastlmk.landmark_files import read_landmark_csv


def _toml(d: dict, indent: str = "") -> str:
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    lines = [f"{k} = {json.dumps(v)}" for k, v in scalars.items()]
    for k, v in tables.items():
        lines.append(f"[{indent}{k}]")
        lines.append(_toml(v, indent=f"{indent}{k}."))
    return "\n".join(lines)


@pytest.mark.slow
def test_train_localize_evaluate(
    phantom_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastlmk.phantoms import phantom_training_config

    cfg = phantom_training_config(phantom_2d, 2, iterations=40, output=tmp_path / "model")
    cfg["train"].update(val_every=20, checkpoint_every=20)
    # tables must come after scalars in TOML: put nested tables last
    cfg["global"]["network"] = cfg["global"].pop("network")
    cfg["local"]["network"] = cfg["local"].pop("network")
    config = tmp_path / "train.toml"
    config.write_text(_toml(cfg))
    assert main(["train", "--config", str(config)]) == 0
    assert (tmp_path / "model" / "model.json").is_file()

    images = [str(phantom_2d / "images" / f"phantom0{i}.mha") for i in (60, 61)]
    out = tmp_path / "pred"
    assert main(["localize", str(tmp_path / "model"), *images, "--out", str(out), "--overlay"]) == 0
    for stem in ("phantom060", "phantom061"):
        for suffix in (".csv", ".json", ".mrk.json", ".png"):
            assert (out / f"{stem}{suffix}").is_file(), suffix
    table = read_landmark_csv(out / "landmarks.csv")
    assert set(table) == {"phantom060", "phantom061"}

    metrics = tmp_path / "metrics.json"
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(out / "landmarks.csv"),
                "--ref",
                str(phantom_2d / "landmarks.csv"),
                "--out",
                str(metrics),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "MRE" in printed and "ALL" in printed
    result = json.loads(metrics.read_text())["references"]["landmarks"]
    assert result["images"] == 2 and np.isfinite(result["mre_mm"])


def test_cli_reports_bad_input_without_traceback(
    model_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not an image")
    assert main(["localize", str(model_2d), str(bad), "--out", str(tmp_path / "o")]) == 1
    assert "bad.nii.gz" in capsys.readouterr().err
    assert main(["localize", "no-such-model", str(bad), "--out", str(tmp_path / "o")]) == 2
