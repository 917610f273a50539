"""Every available backend against float64 torch references: networks and whole pipeline."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from fastlmk import FastlmkError, load_model, localize
from fastlmk.backends import (
    BackendUnavailableError,
    available_backends,
    get_backend,
    resolve_backend,
)
from fastlmk.backends.torch_backend import CudaGraphRunner, TorchBackend
from fastlmk.inference import pad_to_multiple
from fastlmk.model import LandmarkModel
from fastlmk.networks import cell_origin, split_outputs
from fastlmk.ops import vote
from fastlmk.preprocess import orient, stage_image
from fastlmk.sampling import patch_to_source, sample_patches
from test_export import small_model

BACKENDS = available_backends()
HAVE_CUDA = torch.cuda.is_available()


def test_registry() -> None:
    with pytest.raises(FastlmkError, match="unknown backend"):
        resolve_backend("tensorflow")
    expected = (
        "tensorrt"
        if HAVE_CUDA and importlib.util.find_spec("tensorrt")
        else "torch-cuda"
        if HAVE_CUDA
        else "onnxruntime"
        if importlib.util.find_spec("onnxruntime")
        else "torch"
    )
    assert resolve_backend("auto") == expected
    model = small_model(2)
    assert get_backend(model, "torch") is get_backend(model, "torch")


@pytest.mark.skipif(HAVE_CUDA, reason="checks the error raised without a GPU")
def test_gpu_backends_say_what_is_missing() -> None:
    for name in ("torch-cuda", "torch-cuda-graphs", "tensorrt"):
        with pytest.raises(BackendUnavailableError, match=r"GPU|TensorRT"):
            get_backend(small_model(2), name)


@pytest.mark.skipif(
    not (HAVE_CUDA and importlib.util.find_spec("tensorrt")),
    reason="TensorRT backend needs the tensorrt package and a CUDA GPU (not on this machine)",
)
def test_tensorrt_is_available_where_it_can_run() -> None:
    assert "tensorrt" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [2, 3])
def test_networks_match_float64(backend: str, dim: int) -> None:
    model = small_model(dim, seed=5)
    runner = get_backend(model, backend)
    gen = torch.Generator().manual_seed(1)
    stride = model.global_net.stride
    cases = [
        (runner.run_global, model.global_net, (1, 1, *[stride * (5 + k) for k in range(dim)])),
        (runner.run_local, model.local_net, (1, 3, *[16] * dim)),
        (runner.run_local, model.local_net, (2, 3, *[24] * dim)),
    ]
    for run, net, shape in cases:
        x = torch.rand(shape, generator=gen)
        with torch.inference_mode():
            ref = copy.deepcopy(net).double()(x.double())
        got = run(x.to(runner.device))
        for a, b in zip(got, ref, strict=True):
            assert a.shape == b.shape
            assert (a.double().cpu() - b).abs().max() < 1e-3


def test_cuda_graphs_need_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        TorchBackend(small_model(2), torch.device("cpu"), cuda_graphs=True)
    with pytest.raises(ValueError, match="max_graphs"):
        CudaGraphRunner(torch.nn.Identity(), max_graphs=0)


@pytest.mark.skipif(not HAVE_CUDA, reason="CUDA graphs need a CUDA GPU (not on this machine)")
def test_cuda_graph_replay_matches_eager_and_keeps_its_outputs() -> None:
    """Replays on fresh data match eager float64; returned tensors are not overwritten
    by the next replay; a shape beyond ``max_graphs`` evicts the least recently used."""
    model = small_model(2, seed=3)
    assert model.local_net is not None
    net = copy.deepcopy(model.local_net).cuda().eval()
    runner = CudaGraphRunner(net, max_graphs=2)
    ref_net = copy.deepcopy(model.local_net).double()
    gen = torch.Generator().manual_seed(4)
    shapes = [(1, 3, 16, 16), (1, 3, 16, 16), (2, 3, 24, 24), (1, 3, 16, 16), (1, 3, 32, 16)]
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for shape in shapes:
        x = torch.rand(shape, generator=gen)
        with torch.inference_mode():
            got = runner(x.cuda())
            ref = ref_net(x.double())
        for a, b in zip(got, ref, strict=True):
            assert (a.double().cpu() - b).abs().max() < 1e-3
        kept.append((x, got[0].clone(), got[0]))
    for _x, snapshot, returned in kept:
        assert torch.equal(snapshot, returned)  # later replays left earlier results alone
    assert runner.captured_shapes == [(1, 3, 16, 16), (1, 3, 32, 16)]


def reference_points(model: LandmarkModel, image: sitk.Image) -> np.ndarray:
    """(L, D) LPS mm by the reference path: SimpleITK preprocessing of whole images,
    sample_patches crops, float64 networks, numpy votes."""
    cfg = model.config
    oriented = orient(image, cfg.orientation)
    gspec, lspec = cfg.global_stage, cfg.local_stage
    assert lspec is not None and model.local_net is not None
    coarse, value_range = stage_image(oriented, gspec.spacing, None, cfg.intensity)

    def run(net: torch.nn.Module, x: torch.Tensor, stride: int, min_prob: float) -> np.ndarray:
        with torch.inference_mode():
            logits, disp = copy.deepcopy(net).double()(x.double())
        prob, d = split_outputs(logits[0], disp[0], cfg.dim)
        v = vote(prob.numpy(), d.numpy(), stride=stride, origin=cell_origin(stride),
                 min_prob=min_prob)
        return np.asarray(v.position)

    stride = gspec.network.stride
    x = pad_to_multiple(torch.from_numpy(coarse.array)[None, None], stride)
    points = coarse.index_to_physical(run(model.global_net, x, stride, gspec.vote_min_prob))
    fine, _ = stage_image(oriented, lspec.spacing, value_range, cfg.intensity)
    centres = torch.from_numpy(fine.physical_to_index(points))[None]
    crops = sample_patches(
        torch.from_numpy(fine.array)[None, None], centres.float(), lspec.crop_size
    )
    local = run(model.local_net, crops, lspec.network.stride, lspec.vote_min_prob)
    pos = patch_to_source(torch.from_numpy(local)[None], centres, lspec.crop_size)[0]
    return fine.index_to_physical(pos.numpy())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [2, 3])
def test_random_model_matches_the_reference_pipeline(backend: str, dim: int) -> None:
    """As below, without training: random weights, anisotropic spacing, a shifted origin."""
    model = small_model(dim, seed=3)
    shape = (90, 110) if dim == 2 else (40, 50, 45)
    image = sitk.GetImageFromArray(
        (np.random.default_rng(0).random(shape) * 100).astype(np.float32)
    )
    image.SetSpacing([0.9, 0.8, 1.1][:dim])
    image.SetOrigin([5.0, -3.0, 2.0][:dim])
    got = localize(image, model, backend=backend).points_mm
    np.testing.assert_allclose(got, reference_points(model, image), atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [2, 3])
def test_localize_matches_the_reference_pipeline(
    backend: str, dim: int, request: pytest.FixtureRequest
) -> None:
    """The inference path (torch resampling of crops only, any backend) lands where the
    reference path (whole-image SimpleITK resampling, float64 networks) does."""
    model = load_model(request.getfixturevalue(f"model_{dim}d"))
    images = Path(request.getfixturevalue(f"phantom_{dim}d")) / "images"
    for path in sorted(images.glob("*.mha"))[-3:]:
        image = sitk.ReadImage(str(path))
        expected = reference_points(model, image)
        got = localize(image, model, backend=backend).points_mm
        assert np.isfinite(expected).all()
        # 0.01 mm is 1/100 of a phantom pixel: any real preprocessing or network error
        # (a half-pixel shift, a wrong crop, a wrong weight) moves points much further.
        np.testing.assert_allclose(got, expected, atol=0.01)


@pytest.mark.skipif("onnxruntime" not in BACKENDS, reason="onnxruntime is not installed")
def test_bundled_models_run_their_shipped_onnx_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ONNX files shipped with the bundled models are recorded as exported from their
    weights: they are used as they are, with no warning and nothing exported."""
    import warnings

    from fastlmk.backends.onnxruntime_backend import OnnxRuntimeBackend
    from fastlmk.export import StaleOnnxWarning, onnx_files

    monkeypatch.setenv("FASTLMK_CACHE_DIR", str(tmp_path / "cache"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleOnnxWarning)
        ceph = load_model("ceph-isbi2015")
        runner = OnnxRuntimeBackend(ceph)
        here = Path(str(ceph.path))
        assert runner.files == {s: here / f"{s}.int8.onnx" for s in ("global", "local", "local2")}
        assert set(runner.precision.values()) == {"int8"}
        afids = load_model("afids-mni152")
        here = Path(str(afids.path))
        assert onnx_files(afids) == {s: here / f"{s}.onnx" for s in ("global", "local")}
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif("onnxruntime" not in BACKENDS, reason="onnxruntime is not installed")
def test_int8_files_of_replaced_weights_are_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy of the cephalometric model whose global weights are zeroed (a stand-in for
    retrained ones) while its global.int8.onnx stays: the default backend must not give
    the intact model's answer, but the answer of the weights in the directory."""
    import shutil

    from safetensors.torch import load_file, save_file

    from conftest import shared_data
    from fastlmk import read_image
    from fastlmk.export import StaleOnnxWarning

    path = shared_data() / "isbi2015" / "images" / "155.jpg"
    if not path.is_file():
        pytest.skip(f"ISBI 2015 data not found at {path}")
    monkeypatch.setenv("FASTLMK_CACHE_DIR", str(tmp_path / "cache"))
    directory = tmp_path / "ceph"
    shutil.copytree(Path(str(load_model("ceph-isbi2015").path)), directory)
    weights = str(directory / "global.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in load_file(weights).items()}, weights)
    image = read_image(path, spacing=0.1)
    intact = localize(image, "ceph-isbi2015").points_mm

    model = load_model(directory)
    with pytest.warns(StaleOnnxWarning, match=r"global\.int8\.onnx was exported from other"):
        runner = get_backend(model, "onnxruntime")
    # The global network runs in float32, exported from the zeroed weights; the local
    # int8 files still belong to the local weights, which did not change.
    assert runner.precision == {"global": "fp32", "local": "int8", "local2": "int8"}  # type: ignore[attr-defined]
    assert runner.files["global"].is_relative_to(tmp_path / "cache")  # type: ignore[attr-defined]
    got = localize(image, model).points_mm
    assert np.linalg.norm(got - intact, axis=1).min() > 10.0  # mm: not the old answer
    torch_points = localize(image, model, backend="torch").points_mm
    ort_points = localize(image, model, backend="onnxruntime-fp32").points_mm
    np.testing.assert_allclose(ort_points, torch_points, atol=1e-3)


@pytest.mark.skipif("onnxruntime" not in BACKENDS, reason="onnxruntime is not installed")
@pytest.mark.parametrize("damage", ["truncated", "random"])
def test_damaged_onnx_file_is_a_model_error(damage: str, tmp_path: Path) -> None:
    from fastlmk.errors import ModelError
    from fastlmk.export import export_onnx

    directory = small_model(2).save(tmp_path / "m")
    export_onnx(load_model(directory), check=False)
    target = directory / "global.onnx"
    data = target.read_bytes()
    target.write_bytes(
        data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(4000)
    )
    with pytest.raises(ModelError, match=r"global\.onnx.*re-export it with `fastlmk export"):
        get_backend(load_model(directory), "onnxruntime-fp32")
