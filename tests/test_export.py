"""ONNX export: files, dynamic shapes, agreement with torch, the on-the-fly cache, CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastlmk.cli import main
from fastlmk.export import export_onnx, model_hash, onnx_files
from fastlmk.model import LandmarkModel, ModelConfig, StageSpec, load_model
from fastlmk.networks import NetworkSpec

pytest.importorskip("onnxruntime")


def small_model(dim: int, seed: int = 0) -> LandmarkModel:
    """A random-weight two-stage model with a few landmarks."""
    torch.manual_seed(seed)
    config = ModelConfig(
        name=f"small{dim}d",
        dim=dim,
        landmarks=("a", "b", "c"),
        global_stage=StageSpec(
            (2.0,) * dim, NetworkSpec(channels=(8, 16), blocks=(1, 1), pools=1)
        ),
        local_stage=StageSpec(
            (1.0,) * dim,
            NetworkSpec(channels=(4, 8), blocks=(1, 1), pools=1, stem_kernel=3),
            crop_size=(16,) * dim,
        ),
    )
    model = LandmarkModel.create(config)
    # Non-trivial batch-norm statistics, so that folding them is checked too.
    for net in (model.global_net, model.local_net):
        assert net is not None
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize("dim", [2, 3])
def test_export_matches_torch(dim: int, tmp_path: Path) -> None:
    model = small_model(dim)
    results = export_onnx(model, tmp_path)
    assert [(r.stage, r.path.name) for r in results] == [
        ("global", "global.onnx"),
        ("local", "local.onnx"),
    ]
    for r in results:
        assert r.path.is_file()
        # Two input shapes (two batch sizes, two spatial sizes) per network.
        assert r.max_abs_diff < 1e-4, r


def test_fp16_export_is_close(tmp_path: Path) -> None:
    results = export_onnx(small_model(2), tmp_path, fp16=True)
    assert [r.path.name for r in results] == ["global.fp16.onnx", "local.fp16.onnx"]
    for r in results:
        assert r.max_abs_diff < 5e-2, r


def test_on_the_fly_export_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTLMK_CACHE_DIR", str(tmp_path / "cache"))
    model = small_model(2)
    files = onnx_files(model)
    assert files["global"].parent == tmp_path / "cache" / "onnx" / model_hash(model)
    mtime = files["global"].stat().st_mtime_ns
    assert onnx_files(model)["global"].stat().st_mtime_ns == mtime
    # A model directory with its own ONNX files uses them.
    saved = load_model(model.save(tmp_path / "model"))
    export_onnx(saved)
    assert onnx_files(saved)["local"] == tmp_path / "model" / "local.onnx"


def test_hash_follows_the_weights() -> None:
    a, b = small_model(2), small_model(2)
    assert model_hash(a) == model_hash(b)
    c = small_model(2)
    with torch.no_grad():
        c.global_net.cls_head.bias[0] += 1e-3
    assert model_hash(c) != model_hash(a)


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = small_model(2).save(tmp_path / "m")
    assert main(["export", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "global.onnx" in out and "local.onnx" in out and "max |onnx - torch|" in out
    assert (directory / "global.onnx").is_file()


def test_max_abs_difference_never_hides_broken_outputs() -> None:
    from fastlmk.export import max_abs_difference

    a = np.array([1.0, -np.inf, 3.0], np.float32)
    assert max_abs_difference(a, np.array([1.5, -np.inf, 3.0])) == 0.5  # equal infinities
    assert max_abs_difference(a, np.array([1.0, np.nan, 3.0])) == np.inf
    assert max_abs_difference(a, np.array([1.0, 0.0, 3.0])) == np.inf
    assert max_abs_difference(a, np.array([1.0, np.inf, 3.0])) == np.inf
    assert max_abs_difference(a[:0], a[:0]) == 0.0


def test_export_records_the_network_of_each_file(tmp_path: Path) -> None:
    from fastlmk.export import RECORD_FILE, network_hash, read_onnx_record

    model = small_model(2)
    export_onnx(model, tmp_path, check=False)
    export_onnx(model, tmp_path, fp16=True, check=False)
    assert (tmp_path / RECORD_FILE).is_file()
    assert read_onnx_record(tmp_path) == {
        name: {"stage": stage, "network_hash": network_hash(model, stage)}
        for stage in ("global", "local")
        for name in (f"{stage}.onnx", f"{stage}.fp16.onnx")
    }
    # One stage's hash follows its own network only.
    other = small_model(2)
    assert other.local_net is not None
    with torch.no_grad():
        other.local_net.cls_head.bias[0] += 1e-3
    assert network_hash(other, "global") == network_hash(model, "global")
    assert network_hash(other, "local") != network_hash(model, "local")


def _retrain_local(directory: Path) -> None:
    """Overwrite the local weights of a model directory, as a retraining would, leaving
    its ONNX files as they are."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "local.safetensors"))
    state["cls_head.bias"] = state["cls_head.bias"] + 0.5
    save_file(state, str(directory / "local.safetensors"))


def test_onnx_files_of_other_weights_are_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastlmk.backends import get_backend
    from fastlmk.export import StaleOnnxWarning

    monkeypatch.setenv("FASTLMK_CACHE_DIR", str(tmp_path / "cache"))
    directory = small_model(2).save(tmp_path / "m")
    export_onnx(load_model(directory), check=False)
    _retrain_local(directory)
    model = load_model(directory)
    with pytest.warns(StaleOnnxWarning, match=r"local\.onnx was exported from other weights"):
        files = onnx_files(model)
    assert files["local"] == tmp_path / "cache" / "onnx" / model_hash(model) / "local.onnx"
    # The ONNX Runtime backend runs the current local network, as torch does.
    with pytest.warns(StaleOnnxWarning):
        runner = get_backend(model, "onnxruntime-fp32")
    x = torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(0))
    assert model.local_net is not None
    with torch.inference_mode():
        expected = model.local_net(x)
    for got, ref in zip(runner.run_local(x), expected, strict=True):
        assert (got - ref).abs().max() < 1e-4


def test_unrecorded_onnx_files_are_stale_until_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files without a record (written by an older export) are not trusted; recording
    them declares them exported from the current weights."""
    import warnings

    from fastlmk.export import RECORD_FILE, ExportError, StaleOnnxWarning, record_onnx_files

    monkeypatch.setenv("FASTLMK_CACHE_DIR", str(tmp_path / "cache"))
    directory = small_model(2).save(tmp_path / "m")
    export_onnx(load_model(directory), check=False)
    (directory / RECORD_FILE).unlink()
    model = load_model(directory)
    with pytest.warns(StaleOnnxWarning, match="has no record"):
        files = onnx_files(model)
    assert files["global"].parent == tmp_path / "cache" / "onnx" / model_hash(model)
    assert set(record_onnx_files(model)) == {"global.onnx", "local.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOnnxWarning)
        assert onnx_files(load_model(directory))["global"] == directory / "global.onnx"
    with pytest.raises(ExportError, match="not the ONNX file of a stage"):
        record_onnx_files(model, files=["middle.onnx"])


def test_export_into_a_file_is_an_export_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fastlmk.export import ExportError

    existing = tmp_path / "a_file"
    existing.write_text("not a directory")
    with pytest.raises(ExportError, match="is a file, not a directory"):
        export_onnx(small_model(2), existing, check=False)
    with pytest.raises(ExportError, match="cannot create the directory"):
        export_onnx(small_model(2), existing / "sub", check=False)
    directory = small_model(2).save(tmp_path / "m")
    assert main(["export", str(directory), "--no-check", "--out", str(existing)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert existing.read_text() == "not a directory"
