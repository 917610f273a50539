"""Model directories: invalid model.json content, inconsistent stage files, and what
LandmarkModel.save leaves in a directory that held another model."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from fastlmk.cli import main
from fastlmk.errors import ModelError
from fastlmk.model import LandmarkModel, ensemble_local, load_model
from test_export import small_model


def _saved(tmp_path: Path, name: str = "m") -> Path:
    return small_model(2).save(tmp_path / name)


def _edit(directory: Path, **fields: object) -> None:
    raw = json.loads((directory / "model.json").read_text())
    raw.update(fields)
    (directory / "model.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("text", ["[1, 2, 3]", '"a model"', "null", "3"])
def test_model_json_that_is_not_an_object(text: str, tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    (directory / "model.json").write_text(text)
    with pytest.raises(ModelError, match="must hold a JSON object"):
        load_model(directory)


def test_invalid_field_values_are_not_called_missing(tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    _edit(directory, dim="two")
    with pytest.raises(ModelError, match=r"invalid value for 'dim': 'two'; expected 2 or 3"):
        load_model(directory)
    _edit(directory, dim=2, landmarks="abc")
    with pytest.raises(ModelError, match="invalid value for 'landmarks'"):
        load_model(directory)
    raw = json.loads((directory / "model.json").read_text())
    del raw["dim"]
    (directory / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="missing the required field"):
        load_model(directory)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("confidence", [0.05]),
        ("intensity", "percentile"),
        ("metadata", 3),
        ("global", [2.0, 2.0]),
        ("local", "fine"),
        ("intensity", {"low": "one"}),
    ],
)
def test_fields_of_the_wrong_type(field: str, value: object, tmp_path: Path) -> None:
    directory = _saved(tmp_path)
    _edit(directory, **{field: value})
    with pytest.raises(ModelError, match=field):
        load_model(directory)


def test_load_model_of_none_says_what_it_expects() -> None:
    for bad in (None, 3):
        with pytest.raises(ModelError, match="bundled model name, a model directory"):
            load_model(bad)  # type: ignore[arg-type]


def test_stage_weights_that_model_json_does_not_describe(tmp_path: Path) -> None:
    """A local2.safetensors (or local.safetensors) that model.json has no stage for would
    be ignored, and the model run without it."""
    directory = _saved(tmp_path)
    shutil.copy(directory / "local.safetensors", directory / "local2.safetensors")
    with pytest.raises(ModelError, match=r"local2\.safetensors.*'local_extra'"):
        load_model(directory)
    (directory / "local2.safetensors").unlink()
    _edit(directory, local=None)
    with pytest.raises(ModelError, match=r"local\.safetensors"):
        load_model(directory)
    (directory / "local.safetensors").unlink()
    assert load_model(directory).config.local_stage is None


def test_save_into_a_file_is_a_model_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "a_file"
    existing.write_text("not a directory")
    model = small_model(2)
    with pytest.raises(ModelError, match="is a file, not a directory"):
        model.save(existing)
    with pytest.raises(ModelError, match="cannot create the directory"):
        model.save(existing / "sub")
    assert existing.read_text() == "not a directory"
    directory = _saved(tmp_path)
    assert main(["ensemble", str(directory), str(directory), "--out", str(existing)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def _perturbed_local(model: LandmarkModel) -> LandmarkModel:
    """``model`` with other local weights (a retrained local stage)."""
    local = copy.deepcopy(model.local_net)
    assert local is not None
    with torch.no_grad():
        local.cls_head.bias += 0.5
    return LandmarkModel(model.config, copy.deepcopy(model.global_net), local)


def test_save_removes_the_onnx_files_of_other_weights(tmp_path: Path) -> None:
    from fastlmk.export import RECORD_FILE, export_onnx, read_onnx_record

    directory = _saved(tmp_path)
    model = load_model(directory)
    export_onnx(model, check=False)
    export_onnx(model, fp16=True, check=False)
    (directory / "local3.int8.onnx").write_bytes(b"an export of another model")
    (directory / "notes.onnx.txt").write_text("kept: not an export")

    # The same weights again: their exports stay; a file no record vouches for goes.
    model.save(directory)
    names = {p.name for p in directory.iterdir()}
    assert {"global.onnx", "local.onnx", "global.fp16.onnx", "local.fp16.onnx"} <= names
    assert "local3.int8.onnx" not in names and "notes.onnx.txt" in names

    # Other local weights: the local exports go, the global ones stay (same network).
    _perturbed_local(model).save(directory)
    names = {p.name for p in directory.iterdir()}
    assert {"global.onnx", "global.fp16.onnx"} <= names
    assert not {"local.onnx", "local.fp16.onnx"} & names
    assert set(read_onnx_record(directory)) == {"global.onnx", "global.fp16.onnx"}

    # float16 storage rounds every weight: no export matches the saved weights any more.
    load_model(directory).save(directory, weights_dtype="float16")
    assert not list(directory.glob("*.onnx")) and not (directory / RECORD_FILE).exists()


def test_save_over_a_model_with_more_stages(tmp_path: Path) -> None:
    """Saving a one-local-stage model over a two-stage one leaves no local2 files."""
    from test_ensemble import _at_spacing

    fine = small_model(2, seed=3)
    two = ensemble_local([fine, _at_spacing(fine, 1.5, seed=4)])
    directory = two.save(tmp_path / "m")
    (directory / "local2.int8.onnx").write_bytes(b"int8 export of local2")
    fine.save(directory)
    assert not (directory / "local2.safetensors").exists()
    assert not (directory / "local2.int8.onnx").exists()
    assert load_model(directory).stage_names == ["global", "local"]
