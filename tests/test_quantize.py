"""Int8 ONNX networks: calibration, per-stage precision choice, accuracy vs float32, CLI."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from fastlmk.backends import get_backend
from fastlmk.cli import main
from fastlmk.errors import ModelError
from fastlmk.export import ExportError, export_onnx
from fastlmk.inference import errors_mm, localize
from fastlmk.landmark_files import read_landmark_csv
from fastlmk.model import load_model
from fastlmk.quantize import calibration_inputs, quantize_int8

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _ids(dataset: Path, split: str) -> list[str]:
    with open(dataset / "split.csv", newline="") as f:
        return [r["image"] for r in csv.DictReader(f) if r["split"] == split]


@pytest.fixture()
def model_copy(model_2d: Path, tmp_path: Path) -> Path:
    """The trained 2D phantom model with its float32 ONNX files, in a private directory."""
    d = tmp_path / "model"
    shutil.copytree(model_2d, d)
    export_onnx(load_model(d), d, check=False)
    return d


def test_calibration_records_each_networks_inputs(model_copy: Path, phantom_2d: Path) -> None:
    model = load_model(model_copy)
    images = [phantom_2d / "images" / f"{i}.mha" for i in _ids(phantom_2d, "train")[:3]]
    inputs = calibration_inputs(model, images)
    assert len(inputs["global"]) == 3 and len(inputs["local"]) == 3
    crop = model.config.local_stage.crop_size  # type: ignore[union-attr]
    assert all(x.shape[:2] == (1, 1) and x.dtype == np.float32 for x in inputs["global"])
    assert all(x.shape == (1, len(model.names), *crop) for x in inputs["local"])
    # Normalised intensities, not raw voxels: calibration must see what the network sees.
    assert 0.5 < max(float(x.max()) for x in inputs["global"]) < 3.0


def test_int8_keeps_accuracy_and_is_chosen_per_stage(
    model_copy: Path, phantom_2d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = load_model(model_copy)
    train_images = [phantom_2d / "images" / f"{i}.mha" for i in _ids(phantom_2d, "train")[:12]]
    results = quantize_int8(model, train_images)
    assert [(r.stage, r.path.name) for r in results] == [
        ("global", "global.int8.onnx"),
        ("local", "local.int8.onnx"),
    ]
    assert all(r.calibration_batches == 12 for r in results)
    # Int8 changes the numbers a little, never wildly (heads stay float32).
    assert all(0 < r.max_abs_diff < 2.0 for r in results), results
    # The local networks are quantized as one graph per landmark (int8 runtimes have no
    # fast grouped kernels); the heads and everything after them stay float32.
    graph = onnx.load(str(model_copy / "local.int8.onnx")).graph
    convs = [n for n in graph.node if n.op_type in ("Conv", "QLinearConv")]
    groups = [a.i for n in convs for a in n.attribute if a.name == "group"]
    assert convs and all(g == 1 for g in groups)
    heads = [n for n in convs if "cls_head" in n.name or "reg_head" in n.name]
    assert len(heads) == 2 * len(model.names) and all(n.op_type == "Conv" for n in heads)
    body = [n for n in convs if "/body/" in n.name]
    assert body and all(n.op_type == "QLinearConv" for n in body)

    model = load_model(model_copy)
    assert get_backend(model, "onnxruntime").precision == {"global": "int8", "local": "int8"}  # type: ignore[attr-defined]
    assert get_backend(model, "onnxruntime-fp32").precision == {  # type: ignore[attr-defined]
        "global": "fp32",
        "local": "fp32",
    }
    truth = read_landmark_csv(phantom_2d / "landmarks.csv")
    err = {"onnxruntime-fp32": [], "onnxruntime-int8": []}  # type: dict[str, list[np.ndarray]]
    moved = []
    for i in _ids(phantom_2d, "test"):
        image = phantom_2d / "images" / f"{i}.mha"
        lms = {b: localize(image, model, backend=b) for b in err}
        for b, lm in lms.items():
            err[b].append(errors_mm(lm, truth[i]))
        moved.append(
            np.linalg.norm(
                lms["onnxruntime-int8"].points_mm - lms["onnxruntime-fp32"].points_mm, axis=1
            )
        )
    e32, e8 = np.mean(err["onnxruntime-fp32"]), np.mean(err["onnxruntime-int8"])
    # 1 mm pixels: int8 moves points by a fraction of a pixel and costs little accuracy.
    assert np.mean(moved) < 0.3, np.round(moved, 2)
    assert e8 < e32 + 0.15, (e32, e8)

    # Int8 files for every stage (as bundled): no float32 export is needed at all.
    int8_only = tmp_path / "int8-only"
    fp32_files = shutil.ignore_patterns("global.onnx", "local.onnx")
    shutil.copytree(model_copy, int8_only, ignore=fp32_files)
    monkeypatch.setenv("FASTLMK_CACHE_DIR", str(tmp_path / "cache"))
    backend = get_backend(load_model(int8_only), "onnxruntime")
    assert backend.precision == {"global": "int8", "local": "int8"}  # type: ignore[attr-defined]
    assert not list((tmp_path / "cache").rglob("*.onnx"))
    get_backend(load_model(int8_only), "onnxruntime-fp32")  # exported on demand
    assert {p.name for p in (tmp_path / "cache").rglob("*.onnx")} == {"global.onnx", "local.onnx"}

    # Only the global network in int8: the local one runs in float32.
    (model_copy / "local.int8.onnx").unlink()
    model = load_model(model_copy)
    assert get_backend(model, "onnxruntime").precision == {"global": "int8", "local": "fp32"}  # type: ignore[attr-defined]


def test_int8_errors(model_copy: Path, phantom_2d: Path) -> None:
    model = load_model(model_copy)
    with pytest.raises(ModelError, match="no int8 networks"):
        get_backend(model, "onnxruntime-int8")
    with pytest.raises(ExportError, match="at least one image"):
        quantize_int8(model, [])
    image = phantom_2d / "images" / f"{_ids(phantom_2d, 'train')[0]}.mha"
    with pytest.raises(ExportError, match="stage"):
        quantize_int8(model, [image], stages=("middle",))


def test_cli_int8_export(
    model_copy: Path, phantom_2d: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = [str(phantom_2d / "images" / f"{i}.mha") for i in _ids(phantom_2d, "train")[:4]]
    argv = ["export", str(model_copy), "--int8", "--stages", "global", "--calibration", *images]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "global.int8.onnx" in out and "calibrated on 4 inputs" in out
    assert (model_copy / "global.int8.onnx").is_file()
    assert not (model_copy / "local.int8.onnx").exists()
    assert main(["export", str(model_copy), "--int8"]) == 2
    assert "--calibration" in capsys.readouterr().err
    assert main(["export", str(model_copy), "--int8", "--calibration", "/nonexistent.mha"]) == 2
    assert "not found" in capsys.readouterr().err


def test_calibration_directory_lists_its_images(phantom_2d: Path, tmp_path: Path) -> None:
    from fastlmk.errors import FastlmkError
    from fastlmk.quantize import check_calibration_images

    found = check_calibration_images([phantom_2d / "images"])
    assert len(found) == len(list((phantom_2d / "images").glob("*.mha"))) > 0
    assert found == sorted(found)
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(FastlmkError, match="no calibration images"):
        check_calibration_images([tmp_path])
    one = sorted((phantom_2d / "images").glob("*.mha"))[0]
    assert check_calibration_images([one]) == [one]
    pattern = phantom_2d / "images" / "phantom00*.mha"
    expected = sorted((phantom_2d / "images").glob(pattern.name))
    assert check_calibration_images([str(pattern)]) == expected
    with pytest.raises(FastlmkError, match="not found"):
        check_calibration_images([tmp_path / "missing.png"])


def test_int8_files_of_other_weights_are_not_used(
    model_copy: Path, phantom_2d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An int8 file is run only while its record matches the stage's weights; a stale one
    is left out with a warning and its stage runs in float32 from the weights."""
    import torch
    from safetensors.torch import load_file, save_file

    from fastlmk.export import StaleOnnxWarning, network_hash, read_onnx_record

    monkeypatch.setenv("FASTLMK_CACHE_DIR", str(tmp_path / "cache"))
    images = [phantom_2d / "images" / f"{i}.mha" for i in _ids(phantom_2d, "train")[:3]]
    quantize_int8(load_model(model_copy), images)
    record = read_onnx_record(model_copy)
    model = load_model(model_copy)
    for stage in ("global", "local"):
        assert record[f"{stage}.int8.onnx"] == {
            "stage": stage,
            "network_hash": network_hash(model, stage),
        }

    state = load_file(str(model_copy / "local.safetensors"))
    state["cls_head.bias"] = state["cls_head.bias"] + 0.5
    save_file(state, str(model_copy / "local.safetensors"))
    model = load_model(model_copy)
    with pytest.warns(StaleOnnxWarning, match="was exported from other weights") as caught:
        runner = get_backend(model, "onnxruntime")
    # The float32 local.onnx beside it is of the old weights too.
    assert sorted(Path(str(w.message).split()[0]).name for w in caught) == [
        "local.int8.onnx",
        "local.onnx",
    ]
    assert runner.precision == {"global": "int8", "local": "fp32"}  # type: ignore[attr-defined]
    x = torch.rand((1, len(model.names), 16, 16), generator=torch.Generator().manual_seed(0))
    assert model.local_net is not None
    with torch.inference_mode():
        expected = model.local_net(x)
    for got, ref in zip(runner.run_local(x), expected, strict=True):
        assert (got - ref).abs().max() < 1e-3

    # No int8 file belongs to the weights any more: int8 cannot be had.
    state = load_file(str(model_copy / "global.safetensors"))
    save_file({k: v * 2 for k, v in state.items()}, str(model_copy / "global.safetensors"))
    with (
        pytest.warns(StaleOnnxWarning),
        pytest.raises(ModelError, match="no int8 networks exported from its current weights"),
    ):
        get_backend(load_model(model_copy), "onnxruntime-int8")


def test_int8_into_a_file_is_an_export_error(model_copy: Path, phantom_2d: Path) -> None:
    existing = model_copy / "a_file"
    existing.write_text("not a directory")
    image = phantom_2d / "images" / f"{_ids(phantom_2d, 'train')[0]}.mha"
    with pytest.raises(ExportError, match="is a file, not a directory"):
        quantize_int8(load_model(model_copy), [image], directory=existing)
