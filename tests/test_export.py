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
