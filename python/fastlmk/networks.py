"""Fully convolutional regression + classification networks (Noothout et al., 2020).

One implementation serves the global network and the batched local networks, in 2D
and 3D. A network maps an image to a coarse grid of cells; for every cell and
landmark it predicts a classification logit (the landmark lies in this cell) and a
displacement from the cell centre to the landmark (in input pixels, through a
signed-log transform).

The L per-landmark local networks are one module with ``groups=L``: every
convolution is grouped, so group ``l`` sees only input channel ``l`` (the crop
around landmark ``l``) and produces only landmark ``l``'s outputs. This runs the L
networks as one call (and exports to one ONNX graph) while keeping their weights
independent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "AnyNetworkSpec",
    "EnsembleSpec",
    "LandmarkFCN",
    "NetworkEnsemble",
    "NetworkSpec",
    "UngroupedFCN",
    "build_network",
    "cell_origin",
    "network_spec_from_dict",
    "split_outputs",
    "ungrouped",
]


@dataclass(frozen=True)
class NetworkSpec:
    """Architecture of a regression + classification FCN.

    Attributes:
        channels: Feature channels of each residual stage (per group).
        blocks: Residual blocks in each stage (same length as ``channels``).
        pools: The first ``pools`` stages end with a 2x average pooling.
        stem_kernel: Kernel size of the stride-2 stem convolution.
        head_channels: Width of an optional hidden 1x1 layer before the heads (0: none).
    """

    channels: tuple[int, ...] = (16, 32, 64, 64)
    blocks: tuple[int, ...] = (1, 1, 2, 1)
    pools: int = 3
    stem_kernel: int = 5
    head_channels: int = 0

    def __post_init__(self) -> None:
        if len(self.channels) != len(self.blocks) or not self.channels:
            raise ValueError(
                f"network spec: channels {self.channels} and blocks {self.blocks} must be "
                "non-empty and of equal length"
            )
        if not 0 <= self.pools <= len(self.channels):
            raise ValueError(
                f"network spec: pools={self.pools} must be in [0, {len(self.channels)}]"
            )
        # Zero or negative sizes otherwise fail deep inside torch (negative tensor
        # dimensions, convolutions without a kernel), far from the setting that caused it.
        if any(c < 1 for c in self.channels):
            raise ValueError(
                f"network spec: channels {self.channels} must all be >= 1; give positive "
                "feature counts"
            )
        if any(b < 0 for b in self.blocks):
            raise ValueError(
                f"network spec: blocks {self.blocks} must all be >= 0; give block counts"
            )
        if self.stem_kernel < 1:
            raise ValueError(
                f"network spec: stem_kernel={self.stem_kernel} must be >= 1; give a kernel "
                "size such as 5"
            )
        if self.head_channels < 0:
            raise ValueError(
                f"network spec: head_channels={self.head_channels} must be >= 0 (0: no "
                "hidden head layer)"
            )

    @property
    def stride(self) -> int:
        """Input pixels per output cell along every axis."""
        return 2 * 2**self.pools

    @property
    def input_multiple(self) -> int:
        """Every input size must be a multiple of this."""
        return self.stride

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["blocks"] = list(self.blocks)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NetworkSpec:
        known = {"channels", "blocks", "pools", "stem_kernel", "head_channels"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(
                f"network spec: unknown keys {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(
            channels=tuple(int(c) for c in d.get("channels", cls.channels)),
            blocks=tuple(int(b) for b in d.get("blocks", cls.blocks)),
            pools=int(d.get("pools", cls.pools)),
            stem_kernel=int(d.get("stem_kernel", cls.stem_kernel)),
            head_channels=int(d.get("head_channels", 0)),
        )


@dataclass(frozen=True)
class EnsembleSpec:
    """Several networks on the same input whose votes are pooled (see
    :class:`NetworkEnsemble`).

    Attributes:
        members: The member architectures (at least two).
    """

    members: tuple[NetworkSpec, ...]

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ValueError("network ensemble: needs at least two members")

    @property
    def stride(self) -> int:
        """Stride of the ensemble's output grid: the finest member stride."""
        return min(m.stride for m in self.members)

    @property
    def input_multiple(self) -> int:
        """Every input size must be a multiple of every member's stride."""
        return max(m.stride for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return {"members": [m.to_dict() for m in self.members]}


#: The architecture of one stage's network.
AnyNetworkSpec = NetworkSpec | EnsembleSpec


def network_spec_from_dict(d: dict[str, Any]) -> AnyNetworkSpec:
    """A :class:`NetworkSpec`, or an :class:`EnsembleSpec` for ``{"members": [...]}``."""
    if "members" in d:
        if set(d) != {"members"} or not isinstance(d["members"], list):
            raise ValueError('network ensemble: expected {"members": [spec, spec, ...]} only')
        return EnsembleSpec(tuple(NetworkSpec.from_dict(m) for m in d["members"]))
    return NetworkSpec.from_dict(d)


def cell_origin(stride: int) -> float:
    """Input-pixel index of the centre of output cell 0 (the cell covers pixels 0..stride-1)."""
    return (stride - 1) / 2.0


def _conv(dim: int) -> type[nn.Conv2d] | type[nn.Conv3d]:
    return nn.Conv2d if dim == 2 else nn.Conv3d


def _norm(dim: int) -> type[nn.Module]:
    return nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d


def _pool(dim: int) -> nn.Module:
    return nn.AvgPool2d(2) if dim == 2 else nn.AvgPool3d(2)


class _ResidualBlock(nn.Module):
    def __init__(self, dim: int, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        conv, norm = _conv(dim), _norm(dim)
        self.conv1 = conv(cin * groups, cout * groups, 3, padding=1, groups=groups, bias=False)
        self.norm1 = norm(cout * groups)
        self.conv2 = conv(cout * groups, cout * groups, 3, padding=1, groups=groups, bias=False)
        self.norm2 = norm(cout * groups)
        self.skip: nn.Module = (
            nn.Identity()
            if cin == cout
            else nn.Sequential(
                conv(cin * groups, cout * groups, 1, groups=groups, bias=False), norm(cout * groups)
            )
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return self.act(y + self.skip(x))


class LandmarkFCN(nn.Module):
    """Regression + classification FCN, optionally ``groups`` independent networks in one.

    Args:
        dim: Spatial dimensionality, 2 or 3.
        n_landmarks: Landmarks predicted by each group (L for the global network, 1 for
            each local network).
        spec: Architecture.
        groups: Number of independent networks run side by side (1 for the global
            network, L for the local networks).

    Input:  ``(B, groups, *S)`` float32, spatial axes in array order ((y, x) or (z, y, x)),
        every spatial size a multiple of ``spec.stride``.
    Output: ``(logits, disp)``: logits ``(B, groups * n_landmarks, *G)`` and displacements
        ``(B, groups * n_landmarks * dim, *G)`` with ``G = S / stride``; displacement
        channel ``(l * dim + k)`` is landmark ``l``'s component along spatial axis ``k``
        (array order), in signed-log10 input pixels.
    """

    def __init__(self, dim: int, n_landmarks: int, spec: NetworkSpec, groups: int = 1) -> None:
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        if n_landmarks < 1 or groups < 1:
            raise ValueError(f"n_landmarks ({n_landmarks}) and groups ({groups}) must be >= 1")
        self.dim, self.n_landmarks, self.groups, self.spec = dim, n_landmarks, groups, spec
        conv, norm = _conv(dim), _norm(dim)
        g = groups
        c0 = spec.channels[0]
        self.stem = nn.Sequential(
            conv(
                g,
                c0 * g,
                spec.stem_kernel,
                stride=2,
                padding=spec.stem_kernel // 2,
                groups=g,
                bias=False,
            ),
            norm(c0 * g),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        cin = c0
        for i, (cout, nblocks) in enumerate(zip(spec.channels, spec.blocks, strict=True)):
            for _ in range(nblocks):
                layers.append(_ResidualBlock(dim, cin, cout, g))
                cin = cout
            if i < spec.pools:
                layers.append(_pool(dim))
        self.body = nn.Sequential(*layers)
        head_in = cin
        self.hidden: nn.Module = nn.Identity()
        if spec.head_channels > 0:
            self.hidden = nn.Sequential(
                conv(cin * g, spec.head_channels * g, 1, groups=g), nn.ReLU(inplace=True)
            )
            head_in = spec.head_channels
        self.cls_head: nn.Conv2d | nn.Conv3d = conv(head_in * g, n_landmarks * g, 1, groups=g)
        self.reg_head: nn.Conv2d | nn.Conv3d = conv(head_in * g, n_landmarks * dim * g, 1, groups=g)
        # A positive cell is rare (one per landmark): start from a low prior probability so
        # the first iterations are not spent unlearning p = 0.5 everywhere.
        assert self.cls_head.bias is not None
        nn.init.constant_(self.cls_head.bias, -4.0)

    @property
    def stride(self) -> int:
        return self.spec.stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.hidden(self.body(self.stem(x)))
        return self.cls_head(features), self.reg_head(features)


class NetworkEnsemble(nn.Module):
    """Member networks on the same input, their outputs laid out as one vote.

    The vote of the outputs is the probability-weighted vote over the cells of all
    members: each member's grid is brought to the finest member stride ``s`` (a cell of
    stride ``k * s`` becomes ``k**D`` cells, each with ``1 / k**D`` of its probability
    and its displacement re-expressed from the new cell centres), and the members'
    grids are placed side by side along the last spatial axis (displacements again
    re-expressed from the shifted cell centres). Positions voted by every cell are
    unchanged, so the pooled vote is the vote-weight-weighted mean of the members'
    votes, and its spread includes their disagreement.

    Args:
        dim: Spatial dimensionality, 2 or 3.
        n_landmarks: Landmarks per group.
        spec: The members.
        groups: As for :class:`LandmarkFCN`.
        members: Ready member modules, one per ``spec.members`` entry, taking the
            ``(B, groups, *S)`` input (default: new :class:`LandmarkFCN` members).

    Input: ``(B, groups, *S)``, every ``S`` a multiple of ``spec.input_multiple``.
    Output: ``(logits, disp)`` of :class:`LandmarkFCN`'s layout on the grid
        ``G = (S_0 / s, ..., S_{D-1} / s * M)`` for ``M`` members.
    """

    def __init__(
        self,
        dim: int,
        n_landmarks: int,
        spec: EnsembleSpec,
        groups: int = 1,
        members: Sequence[nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.dim, self.n_landmarks, self.groups, self.spec = dim, n_landmarks, groups, spec
        if members is None:
            members = [LandmarkFCN(dim, n_landmarks, m, groups=groups) for m in spec.members]
        if len(members) != len(spec.members):
            raise ValueError(f"network ensemble: {len(members)} modules for {spec}")
        self.members = nn.ModuleList(members)

    @property
    def stride(self) -> int:
        return self.spec.stride

    def _to_fine(
        self, logits: torch.Tensor, disp: torch.Tensor, k: int, shift_last: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One member's outputs on the fine grid (factor ``k``), displacements measured
        from fine cell centres shifted by ``shift_last`` pixels along the last axis."""
        dim, s = self.dim, self.spec.stride
        b, c = logits.shape[:2]
        grid = logits.shape[2:]
        d = disp.reshape(b, c, dim, *grid)
        pixels = torch.sign(d) * (torch.pow(10.0, d.abs()) - 1.0)  # inverse signed-log10
        if k > 1:
            # Probability p spread evenly over the k**D fine cells: logit(p / k**D).
            # log(p) as -softplus(-x): log(sigmoid(x)) underflows to -inf below x ~ -88
            # in float32, and int8 and float32 networks would then disagree by inf.
            q = torch.sigmoid(logits) / float(k**dim)
            log_q = -nn.functional.softplus(-logits) - math.log(k**dim)
            logits = log_q - torch.log1p(-q)
            for axis in range(dim):
                logits = logits.repeat_interleave(k, dim=2 + axis)
                pixels = pixels.repeat_interleave(k, dim=3 + axis)
        # Coarse centre minus fine centre, per fine cell r within its coarse cell:
        # (k - 1) * s / 2 - (r mod k) * s, minus the member's shift along the last axis.
        fine = pixels.shape[3:]
        offsets = []
        for axis in range(dim):
            r = torch.arange(fine[axis], device=pixels.device) % k
            o = (k - 1) * s / 2.0 - r.to(pixels.dtype) * s
            if axis == dim - 1:
                o = o - shift_last
            shape = [1] * dim
            shape[axis] = fine[axis]
            offsets.append(o.reshape(shape))
        pixels = pixels + torch.stack(
            [o.expand(*fine) for o in offsets]
        ).reshape(1, 1, dim, *fine)
        out = torch.sign(pixels) * torch.log10(1.0 + pixels.abs())
        return logits, out.reshape(b, c * dim, *fine)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.spec.stride
        all_logits, all_disp = [], []
        shift = 0.0
        for member, mspec in zip(self.members, self.spec.members, strict=True):
            logits, disp = member(x)
            logits, disp = self._to_fine(logits, disp, mspec.stride // s, shift)
            # No float(): traced for ONNX, the width stays a function of the input size
            # (a Python number would freeze the traced shape into the graph).
            shift = shift + logits.shape[-1] * s
            all_logits.append(logits)
            all_disp.append(disp)
        return torch.cat(all_logits, dim=-1), torch.cat(all_disp, dim=-1)


class UngroupedFCN(nn.Module):
    """The ``groups`` networks of a grouped :class:`LandmarkFCN` as separate modules.

    Computes exactly what the grouped network computes (same input and output layout),
    with ordinary (``groups=1``) convolutions: group ``l`` becomes ``parts[l]``, a
    :class:`LandmarkFCN` holding that group's slice of every weight and normalisation
    statistic. Int8 runtimes lack fast grouped convolution kernels and quantize each
    convolution's activations with one scale; as separate graphs, every landmark's
    network gets its own fast kernels and its own activation scales.

    Input / Output: as for :class:`LandmarkFCN`.
    """

    def __init__(self, net: LandmarkFCN) -> None:
        super().__init__()
        self.dim, self.n_landmarks, self.groups, self.spec = (
            net.dim,
            net.n_landmarks,
            net.groups,
            net.spec,
        )
        g = net.groups
        grouped = net.state_dict()
        like = net.cls_head.weight
        self.parts = nn.ModuleList()
        for i in range(g):
            part = LandmarkFCN(net.dim, net.n_landmarks, net.spec, groups=1)
            part = part.to(device=like.device, dtype=like.dtype)
            state = {}
            for key, target in part.state_dict().items():
                t = grouped[key]
                if t.dim() == 0:  # BatchNorm's num_batches_tracked
                    state[key] = t.clone()
                    continue
                n = t.shape[0] // g
                state[key] = t[i * n : (i + 1) * n].clone()
                if state[key].shape != target.shape:
                    raise ValueError(f"cannot ungroup {key}: {tuple(t.shape)} for {g} groups")
            part.load_state_dict(state)
            self.parts.append(part.train(net.training))

    @property
    def stride(self) -> int:
        return self.spec.stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [part(x[:, i : i + 1]) for i, part in enumerate(self.parts)]
        return torch.cat([o[0] for o in outputs], 1), torch.cat([o[1] for o in outputs], 1)


def ungrouped(net: LandmarkFCN | NetworkEnsemble) -> nn.Module:
    """``net`` with every grouped network replaced by its :class:`UngroupedFCN` (the
    same function; the weights are copied). A network of one group is returned as is."""
    if net.groups == 1:
        return net
    if isinstance(net, NetworkEnsemble):
        members = [UngroupedFCN(m) for m in net.members if isinstance(m, LandmarkFCN)]
        return NetworkEnsemble(
            net.dim, net.n_landmarks, net.spec, groups=net.groups, members=members
        ).train(net.training)
    return UngroupedFCN(net)


def build_network(
    dim: int, n_landmarks: int, spec: AnyNetworkSpec | dict[str, Any], groups: int = 1
) -> LandmarkFCN | NetworkEnsemble:
    """Build a :class:`LandmarkFCN` (or a :class:`NetworkEnsemble`) from a spec or its
    dict form."""
    if isinstance(spec, dict):
        spec = network_spec_from_dict(spec)
    if isinstance(spec, EnsembleSpec):
        return NetworkEnsemble(dim, n_landmarks, spec, groups=groups)
    return LandmarkFCN(dim, n_landmarks, spec, groups=groups)


def split_outputs(
    logits: torch.Tensor, disp: torch.Tensor, dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reshape one sample's network outputs to the vote's layout.

    Args:
        logits: ``(L, *G)`` classification logits of one sample.
        disp: ``(L * dim, *G)`` displacements of one sample.
        dim: Spatial dimensionality.

    Returns:
        ``(prob (L, *G), disp (L, dim, *G))`` with prob = sigmoid(logits).
    """
    grid: Sequence[int] = logits.shape[1:]
    return torch.sigmoid(logits), disp.reshape(logits.shape[0], dim, *grid)
