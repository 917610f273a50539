from __future__ import annotations

import pytest
import torch

from fastlmk.networks import (
    EnsembleSpec,
    LandmarkFCN,
    NetworkEnsemble,
    NetworkSpec,
    UngroupedFCN,
    split_outputs,
    ungrouped,
)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("pools", [0, 1, 2])
def test_output_shapes_follow_stride(dim: int, pools: int) -> None:
    spec = NetworkSpec(channels=(4, 8, 8), blocks=(1, 1, 1), pools=pools)
    net = LandmarkFCN(dim, 3, spec).eval()
    size = 4 * spec.stride
    logits, disp = net(torch.randn(2, 1, *([size] * dim)))
    assert spec.stride == 2 * 2**pools
    assert logits.shape == (2, 3, *([4] * dim))
    assert disp.shape == (2, 3 * dim, *([4] * dim))
    prob, d = split_outputs(logits[0], disp[0], dim)
    assert prob.shape == (3, *([4] * dim)) and d.shape == (3, dim, *([4] * dim))
    assert torch.equal(d[1, 0], disp[0, dim])  # channel l*dim + k is landmark l, axis k


@pytest.mark.parametrize("dim", [2, 3])
def test_grouped_networks_are_independent(dim: int) -> None:
    """Group l's outputs depend on input channel l only: L networks in one call."""
    spec = NetworkSpec(channels=(4, 8), blocks=(1, 1), pools=1)
    torch.manual_seed(0)
    net = LandmarkFCN(dim, 1, spec, groups=3).eval()
    for m in net.modules():  # non-trivial running statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, *([16] * dim))
    y = x.clone()
    y[:, 1] = torch.randn_like(y[:, 1])
    (la, da), (lb, db) = net(x), net(y)
    assert torch.equal(la[:, 0], lb[:, 0]) and torch.equal(la[:, 2], lb[:, 2])
    assert not torch.allclose(la[:, 1], lb[:, 1])
    assert torch.equal(da[:, :dim], db[:, :dim]) and not torch.allclose(
        da[:, dim : 2 * dim], db[:, dim : 2 * dim]
    )


def test_spec_validation_and_round_trip() -> None:
    spec = NetworkSpec(channels=(4, 8), blocks=(2, 1), pools=2, head_channels=16)
    assert NetworkSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="equal length"):
        NetworkSpec(channels=(4, 8), blocks=(1,))
    with pytest.raises(ValueError, match="pools"):
        NetworkSpec(channels=(4,), blocks=(1,), pools=3)
    with pytest.raises(ValueError, match="unknown keys"):
        NetworkSpec.from_dict({"chanels": [4]})


def _randomise_statistics(net: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial normalisation statistics, so slicing them wrongly would show."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d | torch.nn.BatchNorm3d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen))


@pytest.mark.parametrize("dim", [2, 3])
def test_ungrouped_network_computes_the_grouped_one(dim: int) -> None:
    gen = torch.Generator().manual_seed(dim)
    spec = NetworkSpec(channels=(4, 6), blocks=(1, 1), pools=1, stem_kernel=3)
    grouped = LandmarkFCN(dim, 1, spec, groups=3).double().eval()
    _randomise_statistics(grouped, gen)
    flat = ungrouped(grouped).double().eval()
    assert isinstance(flat, UngroupedFCN) and len(flat.parts) == 3
    convs = [m for m in flat.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Conv3d)]
    assert convs and all(c.groups == 1 for c in convs)
    x = torch.rand(2, 3, *([8] * dim), generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        for a, b in zip(grouped(x), flat(x), strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
        # Group 1's outputs depend on input channel 1 only, as in the grouped network.
        y = x.clone()
        y[:, 1] += 1.0
        changed = (flat(y)[0] - flat(x)[0]).abs().amax(dim=(0, *range(2, 2 + dim)))
    assert changed[1] > 0 and changed[0] == 0 and changed[2] == 0


def test_ungrouped_ensemble_and_single_group() -> None:
    gen = torch.Generator().manual_seed(5)
    spec = EnsembleSpec(
        (
            NetworkSpec(channels=(4,), blocks=(1,), pools=0, stem_kernel=3),
            NetworkSpec(channels=(4, 4), blocks=(1, 1), pools=1, stem_kernel=3),
        )
    )
    grouped = NetworkEnsemble(2, 1, spec, groups=2).double().eval()
    _randomise_statistics(grouped, gen)
    flat = ungrouped(grouped).double().eval()
    assert isinstance(flat, NetworkEnsemble) and flat.groups == 2
    assert all(isinstance(m, UngroupedFCN) for m in flat.members)
    x = torch.rand(1, 2, 16, 16, generator=gen, dtype=torch.float64)
    with torch.inference_mode():
        for a, b in zip(grouped(x), flat(x), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    single = LandmarkFCN(2, 4, NetworkSpec())
    assert ungrouped(single) is single
