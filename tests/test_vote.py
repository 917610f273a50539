"""fastlmk.ops.vote (the compiled C++/CUDA kernel) against a numpy float64 reference."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

from fastlmk import _C
from fastlmk.ops import VoteResult, vote

HAS_CUDA = _C.cuda_compiled() and torch.cuda.is_available()
NO_CUDA_REASON = ("needs a CUDA GPU and fastlmk built with CUDA "
                  f"(cuda_compiled={_C.cuda_compiled()}, "
                  f"torch.cuda.is_available={torch.cuda.is_available()})")
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)]),
]

# The kernel reads float32 but accumulates in float64, so against a float64
# reference on the same float32 values only summation order differs.
POS_TOL = {"rtol": 1e-9, "atol": 1e-9}
SPREAD_TOL = {"rtol": 1e-8, "atol": 1e-9}


def vote_reference(prob, disp, stride, origin, transform, min_prob):
    """The vote written as plain numpy in float64 (two-pass spread)."""
    p = np.asarray(prob, np.float64)
    t = np.asarray(disp, np.float64)
    n_landmarks, *grid = p.shape
    dims = len(grid)
    stride = np.broadcast_to(np.asarray(stride, np.float64), (dims,))
    origin = np.broadcast_to(np.asarray(origin, np.float64), (dims,))
    axes = [origin[k] + stride[k] * np.arange(n) for k, n in enumerate(grid)]
    centres = np.stack(np.meshgrid(*axes, indexing="ij"))
    d = t if transform == "linear" else np.sign(t) * np.expm1(np.abs(t) * np.log(10.0))
    votes = (centres[None] + d).reshape(n_landmarks, dims, -1)
    with np.errstate(invalid="ignore"):
        w = np.where((p > 0) & (p >= min_prob), p, 0.0).reshape(n_landmarks, -1)
    voting = w > 0
    weight = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        position = np.where(voting[:, None], w[:, None] * votes, 0.0).sum(-1) / weight[:, None]
        r2 = ((votes - position[:, :, None]) ** 2).sum(1)
        spread = np.sqrt(np.where(voting, w * r2, 0.0).sum(-1) / weight)
    position[weight == 0] = np.nan
    spread[weight == 0] = np.nan
    return position, weight, spread


def random_inputs(n_landmarks, grid, transform, seed=0):
    rng = np.random.default_rng(seed)
    dims = len(grid)
    prob = (rng.random((n_landmarks, *grid)) ** 4).astype(np.float32)
    if transform == "linear":
        disp = rng.normal(0.0, 20.0, (n_landmarks, dims, *grid)).astype(np.float32)
    else:
        disp = rng.normal(0.0, 1.0, (n_landmarks, dims, *grid)).astype(np.float32)
    return prob, disp


def with_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """The same values as `a` in another memory layout (a view, not a copy)."""
    if layout == "contiguous":
        return np.ascontiguousarray(a)
    if layout == "transposed":
        order = tuple(reversed(range(a.ndim)))
        return np.ascontiguousarray(a.transpose(order)).transpose(order)
    if layout == "sliced":
        big = np.full(tuple(2 * s + 1 for s in a.shape), np.nan, a.dtype)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view[...] = a
        return view
    if layout == "flipped":
        return np.ascontiguousarray(a[..., ::-1])[..., ::-1]
    raise AssertionError(layout)


def to_torch(a: np.ndarray, device: str, layout: str = "contiguous") -> torch.Tensor:
    """A tensor on `device` with the values of `a` in the given memory layout."""
    if layout == "contiguous":
        return torch.from_numpy(np.ascontiguousarray(a)).to(device)
    if layout == "transposed":
        order = tuple(reversed(range(a.ndim)))
        return torch.from_numpy(np.ascontiguousarray(a.transpose(order))).to(device).permute(order)
    if layout == "sliced":
        big = torch.full(tuple(2 * s + 1 for s in a.shape), math.nan, device=device)
        view = big[tuple(slice(1, None, 2) for _ in a.shape)]
        view.copy_(torch.from_numpy(a))
        return view
    raise AssertionError(layout)


def assert_matches(result: VoteResult, expected) -> None:
    position, weight, spread = (np.asarray(torch.as_tensor(r).cpu()) if isinstance(
        r, torch.Tensor) else r for r in result)
    ref_position, ref_weight, ref_spread = expected
    assert position.dtype == weight.dtype == spread.dtype == np.float64
    assert position.shape == ref_position.shape
    assert weight.shape == spread.shape == ref_weight.shape
    np.testing.assert_allclose(weight, ref_weight, rtol=1e-12, atol=0)
    np.testing.assert_allclose(position, ref_position, **POS_TOL)
    np.testing.assert_allclose(spread, ref_spread, **SPREAD_TOL)


class Case(NamedTuple):
    n_landmarks: int
    grid: tuple[int, ...]
    transform: str
    stride: float | tuple[float, ...]
    origin: float | tuple[float, ...]
    min_prob: float = 0.0


CASES = {
    "2d-L1-linear": Case(1, (5, 7), "linear", 8, 3.5),
    "2d-ceph": Case(19, (75, 60), "signed_log10", 32, 15.5),
    "2d-min-prob": Case(3, (33, 41), "signed_log10", (4, 2), (1.5, 0.5), 0.3),
    "2d-one-row": Case(2, (1, 50), "linear", 2, 0),
    "3d-small": Case(4, (8, 9, 10), "signed_log10", (4, 2, 2), (1.5, 0.5, 0.5)),
    "3d-linear-min-prob": Case(5, (6, 20, 3), "linear", 2.5, -1.0, 0.05),
    "3d-large": Case(32, (40, 40, 40), "signed_log10", 8, 3.5),
    # More cells than one kernel chunk per landmark, with a single landmark.
    "3d-L1-chunks": Case(1, (30, 35, 40), "linear", 2, 0.5, 0.01),
}
LAYOUTS = ["contiguous", "transposed", "sliced", "flipped"]


@pytest.mark.parametrize(("name", "layout"), [
    (name, layout) for name in CASES for layout in LAYOUTS
    if name != "3d-large" or layout in ("contiguous", "transposed")])
def test_numpy_matches_reference(name: str, layout: str) -> None:
    case = CASES[name]
    prob, disp = random_inputs(case.n_landmarks, case.grid, case.transform)
    result = vote(with_layout(prob, layout), with_layout(disp, layout), stride=case.stride,
                  origin=case.origin, transform=case.transform, min_prob=case.min_prob)
    assert all(isinstance(r, np.ndarray) for r in result)
    assert_matches(result, vote_reference(prob, disp, case.stride, case.origin, case.transform,
                                          case.min_prob))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CASES))
def test_torch_matches_reference(name: str, device: str, layout: str) -> None:
    case = CASES[name]
    prob, disp = random_inputs(case.n_landmarks, case.grid, case.transform, seed=1)
    prob_t = to_torch(prob, device, layout)
    disp_t = to_torch(disp, device, layout)
    result = vote(prob_t, disp_t, stride=case.stride, origin=case.origin,
                  transform=case.transform, min_prob=case.min_prob)
    for r in result:
        assert isinstance(r, torch.Tensor)
        assert r.dtype == torch.float64 and r.device.type == device
    assert_matches(result, vote_reference(prob, disp, case.stride, case.origin, case.transform,
                                          case.min_prob))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dims", [2, 3])
def test_zero_weight_gives_nan(device: str, dims: int) -> None:
    prob, disp = random_inputs(3, (6, 5, 4)[:dims], "linear")
    prob[0] = 0.0
    prob[2] = -1.0  # negative probabilities do not vote
    prob[2, (0,) * dims] = np.nan  # nor do NaN ones
    result = vote(to_torch(prob, device), to_torch(disp, device), stride=2, origin=0.5,
                  transform="linear")
    position, weight, spread = (r.cpu().numpy() for r in result)
    assert np.isnan(position[[0, 2]]).all() and np.isnan(spread[[0, 2]]).all()
    np.testing.assert_array_equal(weight[[0, 2]], 0.0)
    assert np.isfinite(position[1]).all() and weight[1] > 0 and np.isfinite(spread[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transform", ["linear", "signed_log10"])
@pytest.mark.parametrize("dims", [2, 3])
def test_single_cell_is_exact(device: str, transform: str, dims: int) -> None:
    grid = (7, 9, 11)[:dims]
    cell = (3, 5, 2)[:dims]
    d = np.array([2.5, -10.0, 0.25][:dims])
    t = (d if transform == "linear" else np.sign(d) * np.log10(1 + np.abs(d))).astype(np.float32)
    if transform == "signed_log10":  # the displacement the float32 encoding holds
        d = np.sign(t) * np.expm1(np.abs(t.astype(np.float64)) * np.log(10.0))
    prob = np.zeros((1, *grid), np.float32)
    disp = np.full((1, dims, *grid), np.nan, np.float32)  # non-voting cells are never read
    prob[(0, *cell)] = 0.75
    disp[(0, slice(None), *cell)] = t
    stride = np.array([4.0, 2.0, 8.0][:dims])
    origin = np.array([1.5, 0.5, 3.5][:dims])
    result = vote(to_torch(prob, device), to_torch(disp, device), stride=tuple(stride),
                  origin=tuple(origin), transform=transform)
    position, weight, spread = (r.cpu().numpy() for r in result)
    expected = origin + np.array(cell) * stride + d
    np.testing.assert_allclose(position[0], expected, rtol=1e-14, atol=1e-14)
    assert weight[0] == np.float32(0.75)
    assert 0.0 <= spread[0] <= 1e-12


def test_min_prob_excludes_cells() -> None:
    # p == min_prob votes; exact binary fractions keep float32 == float64 here.
    prob = np.array([[[0.25, 0.875], [0.5, 0.125]]], np.float32)
    disp = np.zeros((1, 2, 2, 2), np.float32)
    disp[0, :, 1, 1] = np.nan  # below min_prob: never read
    result = vote(prob, disp, stride=1, origin=0, transform="linear", min_prob=0.25)
    w = np.array([0.25, 0.875, 0.5])
    centres = np.array([[0, 0], [0, 1], [1, 0]], np.float64)
    np.testing.assert_allclose(result.weight, [w.sum()], rtol=1e-12)
    np.testing.assert_allclose(result.position[0], w @ centres / w.sum(), rtol=1e-12)


def test_tight_cluster_far_from_origin_keeps_its_spread() -> None:
    """Catches a one-pass E[v^2] - E[v]^2 spread, which cancels catastrophically here."""
    rng = np.random.default_rng(3)
    grid = (50, 60, 70)
    prob = rng.random((2, *grid)).astype(np.float32)
    # Every cell votes for (almost) the same point, 1e6 pixels from index 0.
    axes = np.meshgrid(*[np.arange(n) * 0.5 for n in grid], indexing="ij")
    target = np.array([30.0, 20.0, 10.0])
    disp = np.stack([target[k] - axes[k] for k in range(3)])[None].repeat(2, 0)
    disp += rng.normal(0.0, 1e-3, disp.shape)
    disp = disp.astype(np.float32)
    args = {"stride": 0.5, "origin": 1e6, "transform": "linear"}
    result = vote(prob, disp, **args)
    ref = vote_reference(prob, disp, args["stride"], args["origin"], "linear", 0.0)
    assert 1e-4 < ref[2].min() < 1e-1
    np.testing.assert_allclose(result.spread, ref[2], rtol=1e-6)
    np.testing.assert_allclose(result.position, ref[0], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.dtype(">f4")])
def test_other_float_dtypes_are_converted_to_float32(dtype) -> None:
    prob, disp = (a.astype(dtype) for a in random_inputs(3, (12, 13), "signed_log10"))
    expected = vote(prob.astype(np.float32), disp.astype(np.float32), stride=4, origin=1.5)
    result = vote(prob, disp, stride=4, origin=1.5)
    for r, e in zip(result, expected, strict=True):
        np.testing.assert_array_equal(r, e)


def test_float64_torch_is_converted() -> None:
    prob, disp = random_inputs(2, (10, 11, 12), "linear")
    expected = vote(prob, disp, stride=2, origin=0.5, transform="linear")
    result = vote(torch.from_numpy(prob).double().requires_grad_(),
                  torch.from_numpy(disp).double(), stride=2, origin=0.5, transform="linear")
    for r, e in zip(result, expected, strict=True):
        np.testing.assert_array_equal(r.numpy(), e)


def test_scalar_and_sequence_parameters_agree() -> None:
    prob, disp = random_inputs(2, (9, 8, 7), "linear")
    a = vote(prob, disp, stride=3, origin=1, transform="linear")
    b = vote(prob, disp, stride=[3.0, 3.0, 3.0], origin=np.array([1, 1, 1]), transform="linear")
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


def test_result_is_deterministic() -> None:
    prob, disp = random_inputs(4, (64, 64, 64), "signed_log10")
    a = vote(prob, disp, stride=2, origin=0.5)
    b = vote(prob, disp, stride=2, origin=0.5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("shape", [(0, 5, 6), (3, 0, 6), (2, 4, 0, 3)])
def test_empty_inputs(shape: tuple[int, ...]) -> None:
    dims = len(shape) - 1
    prob = np.zeros(shape, np.float32)
    disp = np.zeros((shape[0], dims, *shape[1:]), np.float32)
    result = vote(prob, disp, stride=1, origin=0)
    assert result.position.shape == (shape[0], dims)
    assert result.weight.shape == result.spread.shape == (shape[0],)
    np.testing.assert_array_equal(result.weight, 0.0)
    assert np.isnan(result.position).all() and np.isnan(result.spread).all()


def _good_inputs() -> dict:
    prob, disp = random_inputs(2, (4, 5), "linear")
    return {"prob": prob, "disp": disp, "stride": 2, "origin": 0.5}


BAD_INPUTS = {
    "prob-1-grid-axis": ({"prob": np.zeros((2, 4), np.float32)}, ValueError,
                         r"prob must have shape \(L, \*grid\) with 2 or 3 grid axes"),
    "prob-4-grid-axes": ({"prob": np.zeros((2, 3, 3, 3, 3), np.float32)}, ValueError,
                         r"prob must have shape.*ndim=5"),
    "disp-shape": ({"disp": np.zeros((2, 2, 5, 4), np.float32)}, ValueError,
                   r"disp must have shape \(L, D, \*grid\) = \(2, 2, 4, 5\)"),
    "disp-missing-D": ({"disp": np.zeros((2, 4, 5), np.float32)}, ValueError,
                       r"disp must have shape"),
    "prob-int": ({"prob": np.zeros((2, 4, 5), np.int32)}, TypeError,
                 r"prob must be a floating-point array.*int32"),
    "disp-bool": ({"disp": np.zeros((2, 2, 4, 5), bool)}, TypeError,
                  r"disp must be a floating-point array.*bool"),
    "prob-list": ({"prob": [[[0.0]]]}, TypeError, r"prob must be a numpy array or a torch"),
    "mixed-types": ({"prob": torch.zeros(2, 4, 5)}, TypeError,
                    r"prob and disp must both be numpy arrays or both torch tensors"),
    "stride-zero": ({"stride": 0}, ValueError, r"stride must be positive and finite"),
    "stride-negative": ({"stride": (2, -1)}, ValueError, r"stride must be positive"),
    "stride-nan": ({"stride": math.nan}, ValueError, r"stride must be positive and finite"),
    "stride-length": ({"stride": (1, 2, 3)}, ValueError,
                      r"stride must be one number or 2 numbers"),
    "stride-text": ({"stride": "wide"}, TypeError, r"stride must be a number or a sequence"),
    "origin-inf": ({"origin": (0, math.inf)}, ValueError, r"origin must be finite"),
    "transform": ({"transform": "log"}, ValueError, r"transform must be one of"),
    "min-prob-negative": ({"min_prob": -0.1}, ValueError, r"min_prob must be >= 0"),
    "min-prob-nan": ({"min_prob": math.nan}, ValueError, r"min_prob must be >= 0"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_messages(name: str) -> None:
    override, error, match = BAD_INPUTS[name]
    kwargs = {**_good_inputs(), **override}
    with pytest.raises(error, match=match):
        vote(**kwargs)


def test_int_tensor_rejected() -> None:
    with pytest.raises(TypeError, match=r"prob must be a floating-point tensor.*int64"):
        vote(torch.zeros(2, 4, 5, dtype=torch.int64), torch.zeros(2, 2, 4, 5), stride=1,
             origin=0)


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.cuda
def test_different_devices_rejected() -> None:
    with pytest.raises(ValueError, match=r"prob and disp must be on the same device"):
        vote(torch.zeros(2, 4, 5, device="cuda"), torch.zeros(2, 2, 4, 5), stride=1, origin=0)


@pytest.mark.skipif(not torch.cuda.is_available() or _C.cuda_compiled(),
                    reason="needs a CUDA GPU and a fastlmk built without CUDA")
def test_cuda_tensor_without_cuda_build() -> None:
    with pytest.raises(ValueError, match=r"fastlmk was built without CUDA support; rebuild"):
        vote(torch.zeros(2, 4, 5, device="cuda"), torch.zeros(2, 2, 4, 5, device="cuda"),
             stride=1, origin=0)


@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.cuda
def test_cuda_runs_on_the_current_stream() -> None:
    prob, disp = random_inputs(8, (32, 33, 34), "signed_log10")
    ref = vote_reference(prob, disp, 2, 0.5, "signed_log10", 0.0)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        prob_t = torch.from_numpy(prob).cuda()
        disp_t = torch.from_numpy(disp).cuda()
        result = vote(prob_t, disp_t, stride=2, origin=0.5)
    stream.synchronize()
    assert_matches(result, ref)


def test_compiled_module_contract() -> None:
    assert isinstance(_C.cuda_compiled(), bool)
    count = _C.cuda_device_count()
    assert isinstance(count, int) and count >= 0
    prob = np.zeros((1, 2, 2), np.float64)
    with pytest.raises(TypeError, match=r"prob must be a native float32 array"):
        _C.vote_cpu(prob, prob[:, None].repeat(2, 1), stride=[1.0], origin=[0.0],
                    transform="linear", min_prob=0.0)
    out = _C.vote_cpu(np.ones((1, 2, 2), np.float32), np.zeros((1, 2, 2, 2), np.float32),
                      stride=[1.0], origin=[0.0], transform="linear", min_prob=0.0)
    np.testing.assert_allclose(out, [[0.5, 0.5, 4.0, math.sqrt(0.5)]])
    if not _C.cuda_compiled():
        with pytest.raises(RuntimeError, match=r"built without CUDA support"):
            _C.vote_cuda(prob_ptr=0, prob_shape=[1, 2, 2], prob_strides=[4, 2, 1], disp_ptr=0,
                         disp_shape=[1, 2, 2, 2], disp_strides=[8, 4, 2, 1], stride=[1.0],
                         origin=[0.0], transform="linear", min_prob=0.0, out_ptr=0, device=0,
                         stream=0)
