"""fastlmk.geometry against SimpleITK's own index <-> physical transforms."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from fastlmk import geometry
from fastlmk.errors import InvalidImageError
from fastlmk.geometry import Geometry


def _rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))  # a random orthonormal matrix (det +-1)


def _direction(kind: str, dim: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "identity":
        return np.eye(dim)
    if kind == "permuted_flipped":
        eye = np.eye(dim)[:, rng.permutation(dim)]
        flips = np.array([-1.0, 1.0, -1.0][:dim])
        return eye * flips
    return _rotation(dim, rng)


def _image(dim: int, kind: str, seed: int, size: tuple[int, ...] | None = None) -> sitk.Image:
    rng = np.random.default_rng(seed)
    size = size or ((17, 23) if dim == 2 else (11, 13, 7))
    image = sitk.Image(list(size), sitk.sitkFloat32)
    image.SetSpacing(rng.uniform(0.3, 2.5, dim).tolist())
    image.SetOrigin(rng.uniform(-100, 100, dim).tolist())
    image.SetDirection(_direction(kind, dim, rng).ravel().tolist())
    return image


CASES = [(d, k) for d in (2, 3) for k in ("identity", "permuted_flipped", "oblique")]


@pytest.mark.parametrize(("dim", "kind"), CASES)
def test_index_to_physical_matches_simpleitk(dim: int, kind: str) -> None:
    image = _image(dim, kind, seed=dim * 10 + len(kind))
    rng = np.random.default_rng(0)
    index = rng.uniform(-5, 30, size=(50, dim))
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(i.tolist()) for i in index])
    np.testing.assert_allclose(geometry.index_to_physical(index, image), expected, atol=1e-9)
    g = Geometry.from_sitk(image)
    np.testing.assert_allclose(geometry.index_to_physical(index, g), expected, atol=1e-9)
    single = geometry.index_to_physical(index[0], g)
    assert single.shape == (dim,)
    np.testing.assert_allclose(single, expected[0], atol=1e-9)


@pytest.mark.parametrize(("dim", "kind"), CASES)
def test_physical_to_index_matches_simpleitk(dim: int, kind: str) -> None:
    image = _image(dim, kind, seed=dim * 7 + len(kind))
    rng = np.random.default_rng(1)
    points = rng.uniform(-150, 150, size=(50, dim))
    expected = np.array([image.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
    result = geometry.physical_to_index(points, Geometry.from_sitk(image))
    np.testing.assert_allclose(result, expected, atol=1e-8)
    np.testing.assert_allclose(geometry.index_to_physical(result, image), points, atol=1e-9)


def test_point_shape_must_match_dimension() -> None:
    g = Geometry.from_sitk(_image(3, "identity", 0))
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        geometry.index_to_physical(np.zeros((4, 2)), g)
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        geometry.physical_to_index(np.zeros((2, 2, 3)), g)


def test_array_order_flip_addresses_the_same_voxel() -> None:
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6))
    array = sitk.GetArrayViewFromImage(image)
    for idx_xyz in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        idx_zyx = geometry.itk_index_to_array(np.array(idx_xyz))
        assert array[tuple(idx_zyx)] == image.GetPixel(idx_xyz)
        np.testing.assert_array_equal(geometry.array_index_to_itk(idx_zyx), idx_xyz)
    batch = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_array_equal(geometry.itk_index_to_array(batch), [[2.0, 1.0], [4.0, 3.0]])


def test_geometry_round_trip_through_simpleitk() -> None:
    image = _image(3, "oblique", 5)
    g = Geometry.from_sitk(image)
    assert g.dim == 3
    assert g.size == image.GetSize()
    reference = g.to_sitk_reference()
    assert Geometry.from_sitk(reference) == g
    assert hash(Geometry.from_sitk(reference)) == hash(g)
    np.testing.assert_array_equal(g.direction.ravel(), image.GetDirection())
    assert not g.origin.flags.writeable


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"spacing": [1.0, 0.0]}, "finite and > 0"),
        ({"spacing": [1.0, -2.0]}, "finite and > 0"),
        ({"spacing": [1.0, np.nan]}, "finite and > 0"),
        ({"spacing": [1.0, 1.0, 1.0]}, "shape"),
        ({"origin": [np.inf, 0.0]}, "finite"),
        ({"direction": [[1.0, 2.0], [2.0, 4.0]]}, "not invertible"),
        ({"size": (3, 4, 5, 6)}, "2D or 3D"),
        ({"size": (3, 0)}, "no voxels"),
    ],
)
def test_invalid_geometry_raises(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "origin": [0.0, 0.0],
        "spacing": [1.0, 1.0],
        "direction": np.eye(2),
        "size": (3, 4),
    }
    args.update(kwargs)
    with pytest.raises(InvalidImageError, match=message):
        Geometry(**args)  # type: ignore[arg-type]


def _blob(dim: int, kind: str, seed: int, size: tuple[int, ...]) -> tuple[sitk.Image, np.ndarray]:
    """A Gaussian dot at a random physical point inside an oblique, anisotropic image."""
    image = _image(dim, kind, seed, size)
    g = Geometry.from_sitk(image)
    rng = np.random.default_rng(seed)
    centre_index = (np.array(size) - 1) * rng.uniform(0.35, 0.65, dim)
    centre = geometry.index_to_physical(centre_index, g)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1)
    points = geometry.index_to_physical(grid.reshape(-1, dim).astype(float), g)
    values = np.exp(-np.sum((points - centre) ** 2, axis=1) / (2 * 4.0**2))
    array_xyz = values.reshape(size)
    blob = sitk.GetImageFromArray(array_xyz.transpose().astype(np.float32))
    blob.CopyInformation(image)
    return blob, centre


def _physical_centroid(image: sitk.Image) -> np.ndarray:
    array = sitk.GetArrayFromImage(image).astype(np.float64)
    idx_zyx = np.argwhere(np.ones_like(array, dtype=bool))
    points = geometry.index_to_physical(geometry.array_index_to_itk(idx_zyx).astype(float), image)
    weights = array.ravel()
    return (points * weights[:, None]).sum(0) / weights.sum()


@pytest.mark.parametrize(
    ("dim", "kind", "new_spacing"),
    [(2, "oblique", 1.7), (3, "oblique", 2.1), (3, "permuted_flipped", 1.3), (2, "identity", 0.4)],
)
def test_resample_keeps_physical_position_of_a_dot(dim: int, kind: str, new_spacing: float) -> None:
    size = (60, 52) if dim == 2 else (34, 30, 28)
    blob, centre = _blob(dim, kind, seed=dim + 11, size=size)
    before = _physical_centroid(blob)
    np.testing.assert_allclose(before, centre, atol=0.05)
    out = geometry.resample_to_spacing(blob, [new_spacing] * dim)
    assert out.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(out.GetSpacing(), [new_spacing] * dim)
    np.testing.assert_allclose(out.GetOrigin(), blob.GetOrigin())
    np.testing.assert_allclose(out.GetDirection(), blob.GetDirection())
    after = _physical_centroid(out)
    assert np.linalg.norm(after - before) < 0.1 * new_spacing


def test_resample_size_covers_extent_and_maps_indices() -> None:
    image = sitk.Image([101, 41, 10], sitk.sitkFloat32)
    image.SetSpacing([0.1, 0.5, 3.0])
    out = geometry.resample_to_spacing(image, [0.3, 0.2, 3.0])
    # floor((n - 1) * s / s') + 1; 100 * 0.1 / 0.3 = 33.33 -> 34 voxels.
    assert out.GetSize() == (34, 101, 10)
    k_new = np.array([[3.0, 7.0, 2.0]])
    original_index = geometry.physical_to_index(geometry.index_to_physical(k_new, out), image)
    np.testing.assert_allclose(original_index, k_new * np.array([0.3, 0.2, 3.0]) / [0.1, 0.5, 3.0])


def test_resample_matches_a_direct_simpleitk_resample() -> None:
    rng = np.random.default_rng(3)
    image = sitk.GetImageFromArray(rng.normal(size=(20, 30, 40)).astype(np.float32))
    image.SetSpacing([0.7, 0.9, 1.4])
    image.SetDirection(_rotation(3, rng).ravel().tolist())
    out = geometry.resample_to_spacing(image, [1.9, 0.5, 2.3], antialias=False)
    reference = sitk.Resample(image, out, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(
        sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(reference), atol=1e-4
    )


def test_resample_antialias_suppresses_aliasing() -> None:
    checker = (np.indices((200, 200)).sum(0) % 2 * 2 - 1).astype(np.float32)
    image = sitk.GetImageFromArray(checker)
    aliased = geometry.resample_to_spacing(image, 2.5, antialias=False)
    smoothed = geometry.resample_to_spacing(image, 2.5)
    assert sitk.GetArrayViewFromImage(aliased).std() > 0.3
    assert sitk.GetArrayViewFromImage(smoothed).std() < 0.1


def test_resample_rejects_bad_arguments() -> None:
    image = sitk.Image([8, 8], sitk.sitkFloat32)
    with pytest.raises(InvalidImageError, match="> 0"):
        geometry.resample_to_spacing(image, [1.0, 0.0])
    with pytest.raises(InvalidImageError, match="expected 2"):
        geometry.resample_to_spacing(image, [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="interpolator"):
        geometry.resample_to_spacing(image, 2.0, interpolator="cubic")


@pytest.mark.parametrize("orientation", ["LPS", "RAS", "PIR"])
def test_orient_to_keeps_physical_points(orientation: str) -> None:
    rng = np.random.default_rng(7)
    image = sitk.GetImageFromArray(rng.normal(size=(7, 9, 11)).astype(np.float32))
    image.SetSpacing([0.8, 1.1, 2.0])
    image.SetOrigin([10.0, -20.0, 30.0])
    image.SetDirection((np.eye(3)[:, [2, 0, 1]] * [-1.0, 1.0, -1.0]).ravel().tolist())
    out = geometry.orient_to(image, orientation)
    if orientation == "LPS":
        np.testing.assert_allclose(np.reshape(out.GetDirection(), (3, 3)), np.eye(3), atol=1e-12)
    for idx in [(0, 0, 0), (10, 8, 6), (3, 5, 2)]:
        point = image.TransformIndexToPhysicalPoint(idx)
        new_idx = out.TransformPhysicalPointToIndex(point)
        assert out.GetPixel(new_idx) == image.GetPixel(idx)
        np.testing.assert_allclose(out.TransformIndexToPhysicalPoint(new_idx), point, atol=1e-9)


def test_orient_to_2d_and_invalid_codes() -> None:
    image = sitk.Image([4, 5], sitk.sitkFloat32)
    assert geometry.orient_to(image) is image
    volume = sitk.Image([4, 5, 6], sitk.sitkFloat32)
    for bad in ("LPX", "LLS", "LP"):
        with pytest.raises(ValueError, match="orientation"):
            geometry.orient_to(volume, bad)


def test_inside_image_is_half_a_voxel_around_the_centres() -> None:
    from fastlmk.geometry import inside_image

    index = np.array([[-0.5, 0.0], [-0.51, 0.0], [9.5, 4.5], [9.5, 4.51], [np.nan, 1.0]])
    assert inside_image(index, (10, 5)).tolist() == [True, False, True, False, False]
