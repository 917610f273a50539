from __future__ import annotations

import pytest
import torch

from fastlmk.networks import LandmarkFCN, NetworkSpec, split_outputs


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
