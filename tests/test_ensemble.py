"""Network ensembles (pooled votes), combining local networks, training a local stage
on a frozen global network."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fastlmk import ModelError, load_model, localize
from fastlmk.model import LandmarkModel, ensemble_local
from fastlmk.networks import (
    EnsembleSpec,
    NetworkEnsemble,
    NetworkSpec,
    build_network,
    cell_origin,
    network_spec_from_dict,
)

FINE = NetworkSpec(channels=(8, 8), blocks=(1, 1), pools=1)  # stride 4
COARSE = NetworkSpec(channels=(8, 8, 8), blocks=(1, 1, 1), pools=2)  # stride 8


def _reference_vote(logits: np.ndarray, disp: np.ndarray, stride: int, dim: int):
    """float64 vote of one member: per landmark (position, total weight)."""
    n_lm = logits.shape[0]
    grid = logits.shape[1:]
    prob = 1.0 / (1.0 + np.exp(-logits))
    d = disp.reshape(n_lm, dim, *grid)
    pixels = np.sign(d) * (10.0 ** np.abs(d) - 1.0)
    centres = np.stack(
        np.meshgrid(*[np.arange(n) * stride + cell_origin(stride) for n in grid], indexing="ij")
    )
    votes = centres[None] + pixels  # (L, D, *G)
    w = prob.reshape(n_lm, -1)
    pos = (votes.reshape(n_lm, dim, -1) * w[:, None]).sum(-1) / w.sum(-1)[:, None]
    return pos, w.sum(-1)


@pytest.mark.parametrize("dim", [2, 3])
def test_pooled_vote_is_the_weighted_mean_of_member_votes(dim: int) -> None:
    torch.manual_seed(dim)
    groups = 3
    net = build_network(dim, 1, EnsembleSpec((FINE, COARSE)), groups=groups)
    assert isinstance(net, NetworkEnsemble)
    net.eval()
    for p in net.parameters():  # random, non-trivial outputs
        p.data.normal_(0.0, 0.3)
    size = [16, 24, 32][:dim] if dim == 3 else [24, 32]
    x = torch.randn(1, groups, *size)
    with torch.no_grad():
        logits, disp = net(x)
        members = [m(x) for m in net.members]
    grid = [s // 4 for s in size]
    assert tuple(logits.shape) == (1, groups, *grid[:-1], grid[-1] * 2)
    assert tuple(disp.shape) == (1, groups * dim, *grid[:-1], grid[-1] * 2)

    pooled, pooled_w = _reference_vote(logits[0].double().numpy(), disp[0].double().numpy(), 4, dim)
    # The member votes, combined by their weights: what the pooled vote must equal.
    num, den = 0.0, 0.0
    for (ml, md), stride in zip(members, (4, 8), strict=True):
        pos, w = _reference_vote(ml[0].double().numpy(), md[0].double().numpy(), stride, dim)
        num = num + pos * w[:, None]
        den = den + w
    np.testing.assert_allclose(pooled_w, den, rtol=1e-4)
    np.testing.assert_allclose(pooled, num / den[:, None], atol=2e-3)  # pixels


def test_confident_background_cells_keep_finite_logits(tmp_path: Path) -> None:
    """A coarse member's cells with logits far below -88 (sigmoid underflows in float32)
    still give finite fine-grid logits, logit(sigmoid(x) / 4) ~ x - log 4, in torch and in
    the exported ONNX graph; -inf there made int8 and float32 outputs differ by inf."""
    torch.manual_seed(0)
    net = build_network(2, 1, EnsembleSpec((FINE, COARSE)), groups=2).eval()
    assert isinstance(net, NetworkEnsemble)
    coarse = net.members[1]
    with torch.no_grad():
        coarse.cls_head.weight.zero_()
        coarse.cls_head.bias.copy_(torch.tensor([-150.0, 30.0]))
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        logits, _ = net(x)
    coarse_logits = logits[0, :, :, 8:].double()  # the coarse member's fine-grid cells
    assert torch.isfinite(logits).all()
    np.testing.assert_allclose(coarse_logits[0].numpy(), -150.0 - np.log(4.0), atol=1e-4)
    expected_high = np.log(1 / (1 + np.exp(-30.0)) / 4) - np.log1p(-1 / (1 + np.exp(-30.0)) / 4)
    np.testing.assert_allclose(coarse_logits[1].numpy(), expected_high, atol=1e-5)

    import onnxruntime as ort

    from fastlmk.export import _write_atomically

    path = tmp_path / "ensemble.onnx"
    _write_atomically(net, x, path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_logits = session.run(None, {"image": x.numpy()})[0]
    assert np.isfinite(onnx_logits).all()
    np.testing.assert_allclose(onnx_logits, logits.numpy(), atol=1e-4)


def test_spec_round_trip_and_errors() -> None:
    spec = EnsembleSpec((FINE, COARSE))
    assert network_spec_from_dict(spec.to_dict()) == spec
    assert spec.stride == 4 and spec.input_multiple == 8
    assert network_spec_from_dict(FINE.to_dict()) == FINE
    with pytest.raises(ValueError, match="at least two"):
        EnsembleSpec((FINE,))
    with pytest.raises(ValueError, match="members"):
        network_spec_from_dict({"members": [FINE.to_dict()], "pools": 1})


def test_ensemble_of_a_model_with_itself_gives_its_points(
    model_2d: Path, phantom_2d: Path, tmp_path: Path
) -> None:
    image = phantom_2d / "images" / "phantom060.mha"
    single = load_model(model_2d)
    combined = ensemble_local([single, model_2d], name="twice")
    assert isinstance(combined.local_net, NetworkEnsemble)
    saved = load_model(combined.save(tmp_path / "twice"))
    assert saved.config.name == "twice"
    assert len(saved.config.metadata["local_ensemble_of"]) == 2
    ref = localize(image, single, backend="torch")
    for backend in ("torch", "onnxruntime"):
        got = localize(image, saved, backend=backend)
        # Identical members: the pooled vote is the single vote (float32 rounding only).
        np.testing.assert_allclose(got.points_mm, ref.points_mm, atol=1e-3)
        np.testing.assert_allclose(got.confidence, ref.confidence, atol=1e-3)


def _at_spacing(model: LandmarkModel, spacing: float, seed: int) -> LandmarkModel:
    """A model with ``model``'s global network and a new random local network cropping
    at ``spacing`` mm (a stand-in for a separately trained coarser local stage)."""
    assert model.config.local_stage is not None
    stage = replace(model.config.local_stage, spacing=(spacing,) * model.dim)
    torch.manual_seed(seed)
    other = LandmarkModel.create(replace(model.config, name="coarse", local_stage=stage))
    other.global_net.load_state_dict(model.global_net.state_dict())
    other.global_net.eval()
    return other


@pytest.mark.parametrize("dim", [2, 3])
def test_local_stages_at_two_spacings_average_by_network_count(dim: int, tmp_path: Path) -> None:
    """[fine, fine, coarse]: the fine networks are pooled into stage "local" (identical
    members: its vote is the fine model's), the coarse one becomes stage "local2"; the
    result is (2 x fine + 1 x coarse) / 3 of the two single-stage models' results, for
    every backend available here, also after saving and loading."""
    from fastlmk.backends import available_backends
    from test_export import small_model

    fine = small_model(dim, seed=7)
    coarse = _at_spacing(fine, 1.5, seed=8)
    combined = ensemble_local([fine, fine, coarse], name="two-scales")
    assert list(combined.config.local_stages) == ["local", "local2"]
    assert combined.stage_names == ["global", "local", "local2"]
    assert combined.config.extra_local_stages[0].spacing == (1.5,) * dim
    saved = combined.save(tmp_path / "m")
    assert (saved / "local2.safetensors").is_file()
    assert "local_extra" in (saved / "model.json").read_text()
    loaded = load_model(saved)
    assert loaded.config == combined.config

    rng = np.random.default_rng(dim)
    image = rng.random((40,) * dim).astype(np.float32)
    for backend in available_backends():
        one = localize(image, fine, spacing=1.0, backend=backend)
        two = localize(image, coarse, spacing=1.0, backend=backend)
        expected = (2 * one.points_mm + two.points_mm) / 3
        for model in (combined, loaded):
            got = localize(image, model, spacing=1.0, backend=backend)
            np.testing.assert_allclose(got.points_mm, expected, atol=2e-3, err_msg=backend)
            per_stage = got.details["local_stage_points_mm"]
            np.testing.assert_allclose(per_stage[0], one.points_mm, atol=2e-3)
            np.testing.assert_allclose(per_stage[1], two.points_mm, atol=2e-3)
            # Pooled spread: weighted RMS of each stage's spread and distance to the mean.
            d2 = ((per_stage - got.points_mm) ** 2).sum(-1)
            s2 = np.stack([one.details["local_spread_mm"], two.details["local_spread_mm"]]) ** 2
            w = np.array([2.0, 1.0])[:, None]
            np.testing.assert_allclose(
                got.details["local_spread_mm"],
                np.sqrt((w * (s2 + d2)).sum(0) / 3),
                rtol=1e-3,
            )


def test_onnxruntime_runs_local_stages_side_by_side(tmp_path: Path) -> None:
    """With two local stages and two cores ONNX Runtime runs the stages side by side, one
    core each; the outputs equal the one-after-the-other ones (one session per stage,
    all cores), and the localized points too."""
    pytest.importorskip("onnxruntime")
    from fastlmk.backends import run_local_stages
    from fastlmk.backends.onnxruntime_backend import OnnxRuntimeBackend
    from fastlmk.inference import _localize
    from test_export import small_model

    fine = small_model(2, seed=5)
    model = load_model(ensemble_local([fine, _at_spacing(fine, 1.5, seed=6)]).save(tmp_path / "m"))
    both = OnnxRuntimeBackend(model, threads=2)
    alone = OnnxRuntimeBackend(model, threads=1)
    assert both.threads == {"global": 2, "local": 1, "local2": 1}
    assert alone.threads == {"global": 1, "local": 1, "local2": 1}
    rng = np.random.default_rng(1)
    crops = {
        s: torch.from_numpy(rng.random((1, 3, 16, 16), dtype=np.float32))
        for s in ("local", "local2")
    }
    ref = {s: alone.run_local(x, s) for s, x in crops.items()}
    for _ in range(2):
        got = run_local_stages(both, crops)
        assert set(got) == {"local", "local2"}
        for s in crops:
            for a, b in zip(got[s], ref[s], strict=True):
                np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)
        both._pool_pid = -1  # as in a forked child: the pool must be made anew, not hang
    image = rng.random((40, 40)).astype(np.float32)
    np.testing.assert_allclose(
        _localize(image, model, spacing=1.0, backend=both).points_mm,
        _localize(image, model, spacing=1.0, backend=alone).points_mm,
        atol=1e-4,
    )


def test_two_scale_model_exports_and_quantizes(tmp_path: Path) -> None:
    from fastlmk.export import export_onnx
    from fastlmk.quantize import quantize_int8
    from test_export import small_model

    fine = small_model(2, seed=3)
    model = load_model(ensemble_local([fine, _at_spacing(fine, 1.5, seed=4)]).save(tmp_path / "m"))
    results = export_onnx(model, tmp_path / "m")
    assert [r.stage for r in results] == ["global", "local", "local2"]
    assert all(r.max_abs_diff < 1e-4 for r in results), results
    rng = np.random.default_rng(0)
    images = [rng.random((40, 40)).astype(np.float32) for _ in range(3)]
    q = quantize_int8(model, images, spacing=1.0)
    assert [r.stage for r in q] == ["global", "local", "local2"]
    assert (tmp_path / "m" / "local2.int8.onnx").is_file()
    fresh = load_model(tmp_path / "m")  # new backends, reading the int8 files
    got = localize(images[0], fresh, spacing=1.0, backend="onnxruntime-int8")
    ref = localize(images[0], fresh, spacing=1.0, backend="onnxruntime-fp32")
    assert np.isfinite(got.points_mm).all()
    assert np.abs(got.points_mm - ref.points_mm).max() < 1.0  # mm; int8 moves votes a little


def test_ensemble_errors(model_2d: Path, tmp_path: Path) -> None:
    one = load_model(model_2d)
    other = load_model(model_2d)
    other.config = replace(other.config, landmarks=tuple(f"x{n}" for n in one.names))
    with pytest.raises(ModelError, match="differs in landmarks"):
        ensemble_local([one, other])
    with pytest.raises(ModelError, match="at least two"):
        ensemble_local([one])
    # A damaged model.json: further local stages that are not a list.
    saved = ensemble_local([one, _at_spacing(one, 2.0, seed=1)]).save(tmp_path / "m")
    raw = json.loads((saved / "model.json").read_text())
    raw["local_extra"] = raw["local_extra"][0]
    (saved / "model.json").write_text(json.dumps(raw))
    with pytest.raises(ModelError, match="local_extra"):
        load_model(saved)
    (saved / "model.json").write_text(json.dumps({**raw, "local_extra": []}))
    (saved / "local2.safetensors").unlink()
    assert load_model(saved).config.extra_local_stages == ()  # no stage, no file needed


def test_local_stage_trained_on_a_frozen_global_network(
    phantom_2d: Path, model_2d: Path, tmp_path: Path
) -> None:
    from fastlmk.phantoms import phantom_training_config
    from fastlmk.train import train

    cfg = phantom_training_config(phantom_2d, 2, iterations=4, output=tmp_path / "b")
    cfg["local"]["network"] = {"members": [FINE.to_dict(), COARSE.to_dict()]}
    cfg["train"].update(val_every=2, checkpoint_every=2, batch_size=2, global_from=str(model_2d))
    lines: list[str] = []
    out = train(cfg, log=lines.append)
    trained, source = load_model(out), load_model(model_2d)
    for (k, a), b in zip(
        trained.global_net.state_dict().items(), source.global_net.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b), k  # weights and batch-norm statistics untouched
    assert any("not trained" in line for line in lines)
    assert not any("g_cls" in line for line in lines)
    assert trained.config.metadata["training"]["global_from"] == str(model_2d)
    assert isinstance(trained.local_net, NetworkEnsemble)

    cfg["global"]["spacing"] = [2.0, 2.0]
    from fastlmk.train import TrainConfigError

    with pytest.raises(TrainConfigError, match="must match"):
        train(cfg, output=tmp_path / "c", log=lines.append)


def test_ensemble_command(model_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from fastlmk.cli import main

    out = tmp_path / "ens"
    assert main(["ensemble", str(model_2d), str(model_2d), "--out", str(out), "--name", "e"]) == 0
    assert "local: 2 network(s) at" in capsys.readouterr().out
    model = load_model(out)
    assert model.config.name == "e" and isinstance(model.local_net, NetworkEnsemble)
    assert main(["ensemble", str(model_2d), "--out", str(tmp_path / "one")]) != 0


def test_float16_weights_halve_the_files_and_load_as_float32(
    model_2d: Path, phantom_2d: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from fastlmk.cli import main

    full, half = tmp_path / "full", tmp_path / "half"
    assert main(["ensemble", str(model_2d), str(model_2d), "--out", str(full)]) == 0
    args = ["ensemble", str(model_2d), str(model_2d), "--out", str(half), "--weights", "float16"]
    assert main(args) == 0
    capsys.readouterr()
    for stage in ("global", "local"):
        ratio = (half / f"{stage}.safetensors").stat().st_size / (
            full / f"{stage}.safetensors"
        ).stat().st_size
        assert 0.45 < ratio < 0.6, (stage, ratio)
    a, b = load_model(full), load_model(half)
    for stage in a.stage_names:
        sa, sb = a.network(stage).state_dict(), b.network(stage).state_dict()
        for key, t in sa.items():
            assert sb[key].dtype == t.dtype  # float32 networks again
            if t.is_floating_point():
                # exactly the float32 weight rounded to float16 and back
                assert torch.equal(sb[key], t.half().float()), key
            else:
                assert torch.equal(sb[key], t), key
    image = phantom_2d / "images" / "phantom060.mha"
    pa = localize(image, a, backend="torch").points_mm
    pb = localize(image, b, backend="torch").points_mm
    assert np.abs(pa - pb).max() < 0.05  # mm, on 1 mm pixels
    assert not np.array_equal(pa, pb)  # the rounding did happen

    with pytest.raises(ModelError, match="weights_dtype"):
        a.save(tmp_path / "x", weights_dtype="bfloat16")
    with torch.no_grad():
        next(a.global_net.parameters()).view(-1)[0] = 1e6
    with pytest.raises(ModelError, match="exceeds"):
        a.save(tmp_path / "y", weights_dtype="float16")


def test_a_network_given_twice_is_warned_about(model_2d: Path) -> None:
    with pytest.warns(UserWarning, match="counts twice in the vote"):
        ensemble_local([model_2d, model_2d], name="twice")


def test_models_of_other_orientations_are_not_pooled(model_2d: Path, tmp_path: Path) -> None:
    other = load_model(model_2d)
    other.config = replace(other.config, orientation="RAS")
    other.save(tmp_path / "ras")
    with pytest.raises(ModelError, match="orientation"):
        ensemble_local([model_2d, tmp_path / "ras"])


@pytest.mark.parametrize("dim", [2, 3])
def test_members_of_two_strides_export_with_dynamic_sizes(dim: int, tmp_path: Path) -> None:
    """A local stage pooling a stride-4 and a stride-8 network (as the ISBI model's A and
    B): the ONNX file must match torch at the traced crop size and at another size (the
    second member's cell offsets depend on the first member's output width)."""
    from fastlmk.export import export_onnx
    from test_export import small_model

    fine = small_model(dim, seed=5)
    assert fine.config.local_stage is not None
    stage = replace(fine.config.local_stage, network=COARSE)
    torch.manual_seed(6)
    coarse = LandmarkModel.create(replace(fine.config, name="coarse", local_stage=stage))
    coarse.global_net.load_state_dict(fine.global_net.state_dict())
    model = ensemble_local([fine, coarse])
    assert isinstance(model.config.local_stage.network, EnsembleSpec)
    results = export_onnx(model, tmp_path / "m")
    assert all(r.max_abs_diff < 1e-4 for r in results), results
