"""Image input/output: every way an image enters fastlmk ends here as a SimpleITK image.

The result of :func:`read_image` and :func:`as_image` is always a single-component,
2D or 3D, float32 ``SimpleITK.Image`` with finite values and a valid physical
geometry (origin/spacing/direction in mm, ITK/LPS world space; see
:mod:`fastlmk.geometry`).

Axis orders: numpy arrays and torch tensors are in array order, (rows, cols) =
(y, x) for 2D and (z, y, x) for 3D, as SimpleITK's ``GetArrayFromImage`` returns them.
``spacing``, ``origin`` and ``direction`` arguments are in ITK order (x, y[, z]).

2D photographic formats (PNG, JPEG, BMP, TIFF) carry no usable physical spacing, so
reading them needs ``spacing=`` (mm per pixel). Their geometry is then: physical
(x, y) = (column, row) * spacing, origin (0, 0) at the centre of the top-left pixel,
identity direction.
"""

from __future__ import annotations

import glob
import gzip
import math
import os
import struct
import sys
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import SimpleITK as sitk

from fastlmk.errors import FastlmkError, InvalidImageError, MissingSpacingError
from fastlmk.geometry import Geometry, spacing_vector

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageLike",
    "SpacingLike",
    "as_image",
    "image_to_array",
    "list_images",
    "make_output_directory",
    "read_image",
    "write_image",
]

#: Anything :func:`as_image` accepts (``itk.Image`` too, when ``itk`` is installed).
ImageLike: TypeAlias = "str | os.PathLike[str] | np.ndarray | sitk.Image | torch.Tensor"
#: Spacing in mm: one scalar for all axes, or one value per axis in (x, y[, z]) order.
SpacingLike: TypeAlias = float | Sequence[float] | np.ndarray

_PLAIN_2D_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
#: File suffixes read as images (a DICOM series is a directory instead).
IMAGE_SUFFIXES = _PLAIN_2D_SUFFIXES | {".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd"}
# ITU-R BT.601 luma weights, the same as PIL's "L" conversion.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _spacing_message(dim: int | None = None) -> str:
    order = {2: "(x, y)", 3: "(x, y, z)"}.get(dim or 0, "(x, y[, z])")
    return f"pass spacing=... (mm per pixel; one scalar or one value per axis in {order} order)"


def _spacing_vector(spacing: SpacingLike, dim: int) -> np.ndarray:
    return spacing_vector(spacing, dim, hint=_spacing_message(dim))


def _check_image(image: sitk.Image, source: str, keep_integer: bool = False) -> sitk.Image:
    """Validate dimension, components and values; return a float32 image (integer images
    keep their pixel type with ``keep_integer``)."""
    dim = image.GetDimension()
    if dim not in (2, 3):
        raise InvalidImageError(
            f"{source}: image has {dim} dimensions (size {tuple(image.GetSize())}); expected "
            f"a 2D or 3D image. Extract one 2D/3D image first (e.g. one time point)."
        )
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InvalidImageError(
            f"{source}: image has {components} components per pixel; expected a "
            f"single-channel (scalar) image. Select one channel first."
        )
    if image.GetNumberOfPixels() == 0:
        raise InvalidImageError(f"{source}: image is empty (size {tuple(image.GetSize())}).")
    if image.GetPixelID() in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise InvalidImageError(f"{source}: complex images are not supported; pass magnitudes.")
    Geometry.from_sitk(image)
    floating = image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64)
    if not (keep_integer and not floating):
        image = sitk.Cast(image, sitk.sitkFloat32)
    if floating:  # integer voxels are always finite
        _check_finite(sitk.GetArrayViewFromImage(image), source)
    return image


def _check_finite(array: np.ndarray, source: str) -> None:
    if not np.isfinite(array).all():
        n_nan = int(np.isnan(array).sum())
        n_inf = int(np.isinf(array).sum())
        raise InvalidImageError(
            f"{source}: image contains {n_nan} NaN and {n_inf} infinite values; expected "
            f"finite intensities. Replace them (e.g. numpy.nan_to_num) before passing the image."
        )


def _to_single_channel(image: sitk.Image) -> sitk.Image:
    """RGB(A)/grey+alpha to one channel: the first channel if colour channels are equal,
    else BT.601 luminance. Alpha is dropped."""
    components = image.GetNumberOfComponentsPerPixel()
    if components == 1:
        return image
    array = sitk.GetArrayViewFromImage(image)  # (..., components)
    colour = array[..., : 3 if components >= 3 else 1]
    if components < 3 or (
        np.array_equal(colour[..., 0], colour[..., 1])
        and np.array_equal(colour[..., 0], colour[..., 2])
    ):
        grey = np.asarray(colour[..., 0], dtype=np.float32)
    else:
        grey = colour.astype(np.float32) @ _LUMA_WEIGHTS
    out = sitk.GetImageFromArray(grey, isVector=False)
    out.CopyInformation(image)
    return out


def _read_dicom_series(directory: Path) -> sitk.Image:
    # ITK prints a multi-line warning on stderr for a directory without a series; the
    # error below says it in one line.
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(directory))
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    if not series_ids:
        raise InvalidImageError(
            f"{directory}: directory contains no DICOM series. Pass a DICOM series "
            f"directory or an image file (NIfTI, NRRD, MHA/MHD, PNG, JPEG, ...)."
        )
    files_per_series = {
        sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(directory), sid)
        for sid in series_ids
    }
    chosen = max(series_ids, key=lambda sid: len(files_per_series[sid]))
    if len(series_ids) > 1:
        warnings.warn(
            f"{directory}: contains {len(series_ids)} DICOM series; reading the largest "
            f"({chosen}, {len(files_per_series[chosen])} files). Put each series in its own "
            f"directory to choose another.",
            stacklevel=3,
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files_per_series[chosen])
    return reader.Execute()


def _nifti_layout(header: bytes) -> tuple[int, int] | None:
    """(voxel data offset, voxel data bytes) from a NIfTI-1/-2 header; None if not NIfTI."""
    for endian in "<>":
        if len(header) < 4:
            return None
        (header_size,) = struct.unpack(f"{endian}i", header[:4])
        if header_size == 348 and len(header) >= 348:
            dims = struct.unpack(f"{endian}8h", header[40:56])
            (bitpix,) = struct.unpack(f"{endian}h", header[72:74])
            (offset,) = struct.unpack(f"{endian}f", header[108:112])
        elif header_size == 540 and len(header) >= 540:
            (bitpix,) = struct.unpack(f"{endian}h", header[14:16])
            dims = struct.unpack(f"{endian}8q", header[16:80])
            (offset,) = struct.unpack(f"{endian}q", header[168:176])
        else:
            continue
        ndim = dims[0]
        if not 1 <= ndim <= 7 or bitpix <= 0 or not math.isfinite(offset):
            return None
        voxels = math.prod(max(int(d), 1) for d in dims[1 : ndim + 1])
        return max(int(offset), header_size), voxels * bitpix // 8
    return None


def _check_nifti_complete(path: Path) -> None:
    """Raise if a NIfTI file holds less voxel data than its header promises.

    ITK's NIfTI reader silently zero-fills truncated files (NRRD and MetaImage readers
    raise). For .nii.gz the gzip trailer (uncompressed size mod 2**32) is compared
    first; only when it disagrees (a truncated file, or a multi-member gzip) is the
    stream decompressed to count the bytes.
    """
    name = path.name.lower()
    try:
        if name.endswith(".nii"):
            with path.open("rb") as f:
                layout = _nifti_layout(f.read(540))
            available = path.stat().st_size
        elif name.endswith(".nii.gz"):
            with gzip.open(path, "rb") as f:
                layout = _nifti_layout(f.read(540))
            if layout is None:
                return
            with path.open("rb") as f:
                f.seek(-4, os.SEEK_END)
                trailer_size = int.from_bytes(f.read(4), "little")
            if trailer_size == sum(layout) % 2**32:
                return
            available = 0
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    available += len(chunk)
        else:
            return
    except (OSError, EOFError, zlib.error) as exc:
        raise InvalidImageError(
            f"{path}: truncated or corrupt file ({exc}). Re-export or re-download it."
        ) from exc
    if layout is not None and available < sum(layout):
        raise InvalidImageError(
            f"{path}: truncated file: the header promises {sum(layout)} bytes, the file holds "
            f"{available}. Re-export or re-download it."
        )


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether JPEG bytes reach their end-of-image marker (0xFF 0xD9).

    Walks the marker segments from the start: each header segment carries its length;
    after a start-of-scan segment the compressed data runs until the next marker (inside
    it, 0xFF is always followed by 0x00 or a restart marker 0xD0-0xD7). Bytes after the
    end-of-image marker (appended metadata, a second image) do not matter.
    """
    pos, n = 2, len(data)
    while pos + 1 < n:
        if data[pos] != 0xFF:
            return False  # not at a marker: corrupt
        marker = data[pos + 1]
        if marker == 0xD9:
            return True
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        if pos + 3 >= n:
            return False
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:  # start of scan: skip the entropy-coded data
            while True:
                pos = data.find(b"\xff", pos)
                if pos < 0 or pos + 1 >= n:
                    return False
                following = data[pos + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    pos += 2
                    continue
                break
    return False


def make_output_directory(
    directory: str | os.PathLike[str], error: type[FastlmkError], what: str
) -> Path:
    """Create an output directory (and its parents), or raise ``error`` saying why not.

    Args:
        directory: The directory; it may exist already.
        error: The FastlmkError subclass to raise.
        what: What the directory is for, for the message (e.g. "the model").

    Returns:
        The directory as a Path.

    Raises:
        error: it exists as a file, a parent is a file, or it cannot be created.
    """
    out = Path(directory)
    if out.exists() and not out.is_dir():
        raise error(
            f"cannot write {what} into {out}: it is a file, not a directory; pass a "
            "directory (new or existing)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise error(
            f"cannot create the directory {out} for {what}: {exc.strerror or exc}; pass a "
            "directory path that can be created"
        ) from exc
    return out


def _check_jpeg_complete(path: Path) -> None:
    """Raise if a JPEG file ends before its end-of-image marker (a truncated copy).

    The JPEG reader only prints "Premature end of JPEG file" and fills the missing rows
    with grey, which would be localized as if it were anatomy.
    """
    if path.suffix.lower() not in (".jpg", ".jpeg"):
        return
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidImageError(f"{path}: cannot read file ({exc}).") from exc
    if data[:2] == b"\xff\xd8" and not _jpeg_is_complete(data):
        raise InvalidImageError(
            f"{path}: truncated or corrupt JPEG file (it ends before its end-of-image "
            "marker). Re-export or re-download it."
        )


def read_image(
    path: str | os.PathLike[str],
    *,
    spacing: SpacingLike | None = None,
    keep_integer: bool = False,
) -> sitk.Image:
    """Read an image file or DICOM series directory as a float32 single-channel image.

    Supported: 2D PNG/JPEG/BMP/TIFF (RGB with identical channels becomes one channel,
    true colour becomes BT.601 luminance, alpha is dropped); 2D/3D NIfTI (.nii,
    .nii.gz), NRRD, MHA/MHD and anything else SimpleITK reads; a directory holding a
    DICOM series (if it holds several, the one with most files is read, with a warning).

    Args:
        path: image file, or a directory containing a DICOM series.
        spacing: mm per pixel, one scalar or one value per axis in (x, y[, z]) order.
            Required for PNG/JPEG/BMP/TIFF, which carry no physical spacing; for
            other formats it overrides the spacing stored in the file.
        keep_integer: Return integer images with their stored pixel type (e.g. uint8,
            int16) instead of float32; a consumer that converts the voxels itself then
            avoids a full-size float32 copy.

    Returns:
        float32 (integer with ``keep_integer``) SimpleITK image, 2D or 3D. For
        PNG/JPEG/BMP/TIFF: origin (0, 0) at the centre of the top-left pixel, identity
        direction, the given spacing.

    Raises:
        MissingSpacingError: a PNG/JPEG/BMP/TIFF file was read without ``spacing``.
        InvalidImageError: missing, empty, truncated or corrupt file; empty image;
            NaN/Inf values; 4D or multi-component image; invalid geometry or spacing.

    Example:
        >>> img = read_image("001.jpg", spacing=0.1)  # doctest: +SKIP
        >>> img.GetSize(), img.GetSpacing()  # doctest: +SKIP
        ((1935, 2400), (0.1, 0.1))
    """
    path = Path(path)
    if not path.exists():
        raise InvalidImageError(f"{path}: no such file or directory.")
    plain_2d = path.suffix.lower() in _PLAIN_2D_SUFFIXES
    if plain_2d and spacing is None:
        raise MissingSpacingError(
            f"{path}: {path.suffix} files carry no physical pixel spacing; {_spacing_message(2)}, "
            f"e.g. read_image(path, spacing=0.1) for 0.1 mm pixels."
        )
    try:
        if path.is_dir():
            image = _read_dicom_series(path)
        else:
            if path.stat().st_size == 0:
                raise InvalidImageError(f"{path}: file is empty (0 bytes).")
            _check_nifti_complete(path)
            _check_jpeg_complete(path)
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()
        detail = next((line for line in reversed(reason) if line.strip()), "unknown error")
        raise InvalidImageError(
            f"{path}: cannot read image (unreadable, truncated or corrupt file, or an "
            f"unsupported format): {detail.strip()}"
        ) from exc
    if plain_2d:
        image = _to_single_channel(image)
        if image.GetDimension() == 3 and image.GetSize()[2] == 1:
            image = image[:, :, 0]
        image.SetOrigin((0.0,) * image.GetDimension())
        image.SetDirection(np.eye(image.GetDimension()).ravel().tolist())
    image = _check_image(image, str(path), keep_integer)
    if spacing is not None:
        image.SetSpacing(_spacing_vector(spacing, image.GetDimension()).tolist())
    return image


def _image_suffix(path: Path) -> str:
    """The image suffix of a file name, lower case (``.nii.gz`` counts as one)."""
    name = path.name.lower()
    return "".join(path.suffixes[-2:]).lower() if name.endswith(".gz") else path.suffix.lower()


def list_images(spec: str | os.PathLike[str]) -> dict[str, Path]:
    """Image files of a directory or a glob pattern, by image id.

    A file counts when its suffix is one of :data:`IMAGE_SUFFIXES` (``.nii.gz`` is one
    suffix); a sub-directory counts as a DICOM series. Hidden entries are skipped.

    Args:
        spec: A directory, or a glob pattern such as ``"images/*.png"``.

    Returns:
        Image id (the name without its image suffix) -> path, sorted by path. Empty when
        nothing matches.

    Example:
        >>> list_images("images")  # doctest: +SKIP
        {'001': PosixPath('images/001.jpg'), '002': PosixPath('images/002.jpg')}
    """
    p = Path(spec)
    files = sorted(p.iterdir()) if p.is_dir() else sorted(Path(f) for f in glob.glob(str(spec)))
    out: dict[str, Path] = {}
    for f in files:
        if f.name.startswith("."):
            continue
        suffix = _image_suffix(f)
        if f.is_dir():
            out[f.name] = f
        elif suffix in IMAGE_SUFFIXES:
            out[f.name[: len(f.name) - len(suffix)]] = f
    return out


def _squeeze_leading(array: np.ndarray, spacing: SpacingLike | None) -> np.ndarray:
    """Drop leading singleton axes (batch/channel) down to 3D, and (1, H, W) to 2D
    unless a 3-value spacing says it is a one-slice volume."""
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    spacing_len = None if spacing is None else np.asarray(spacing).size
    if array.ndim == 3 and array.shape[0] == 1 and spacing_len != 3:
        array = array[0]
    return array


def _image_from_array(
    array: np.ndarray,
    source: str,
    spacing: SpacingLike | None,
    origin: Sequence[float] | np.ndarray | None,
    direction: Sequence[float] | np.ndarray | None,
    keep_integer: bool = False,
) -> sitk.Image:
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.complexfloating):
        raise InvalidImageError(
            f"{source}: dtype {array.dtype} is not supported; pass real-valued intensities "
            f"(integer or floating point)."
        )
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise InvalidImageError(
            f"{source}: dtype {array.dtype} is not supported; pass a numeric array."
        )
    array = _squeeze_leading(array, spacing)
    if array.ndim not in (2, 3):
        raise InvalidImageError(
            f"{source}: array has shape {array.shape}; expected (rows, cols) = (y, x) for 2D or "
            f"(z, y, x) for 3D, optionally with leading singleton axes."
        )
    if array.size == 0:
        raise InvalidImageError(f"{source}: array of shape {array.shape} is empty.")
    if spacing is None:
        raise MissingSpacingError(
            f"{source}: arrays carry no physical spacing; {_spacing_message(array.ndim)}."
        )
    integer = np.issubdtype(array.dtype, np.integer)
    data = np.ascontiguousarray(array, dtype=None if keep_integer and integer else np.float32)
    if not integer:  # integer voxels are always finite
        _check_finite(data, source)
    dim = data.ndim
    geometry = Geometry(
        origin=np.zeros(dim) if origin is None else np.asarray(origin, dtype=np.float64),
        spacing=_spacing_vector(spacing, dim),
        direction=np.eye(dim) if direction is None else np.reshape(direction, (dim, dim)),
        size=data.shape[::-1],
    )
    return geometry.apply_to(sitk.GetImageFromArray(data, isVector=False))


def _is_torch_tensor(obj: object) -> bool:
    torch_module = sys.modules.get("torch")
    return torch_module is not None and isinstance(obj, torch_module.Tensor)


def _is_itk_image(obj: object) -> bool:
    return "itk" in sys.modules and type(obj).__name__.startswith("itkImage")


def _override_geometry(
    image: sitk.Image,
    spacing: SpacingLike | None,
    origin: Sequence[float] | np.ndarray | None,
    direction: Sequence[float] | np.ndarray | None,
) -> sitk.Image:
    dim = image.GetDimension()
    if spacing is None and origin is None and direction is None:
        return image
    current = Geometry.from_sitk(image)
    return Geometry(
        origin=current.origin if origin is None else np.asarray(origin, dtype=np.float64),
        spacing=current.spacing if spacing is None else _spacing_vector(spacing, dim),
        direction=current.direction if direction is None else np.reshape(direction, (dim, dim)),
        size=current.size,
    ).apply_to(image)


def as_image(
    image: ImageLike | Any,
    *,
    spacing: SpacingLike | None = None,
    origin: Sequence[float] | np.ndarray | None = None,
    direction: Sequence[float] | np.ndarray | None = None,
    keep_integer: bool = False,
) -> sitk.Image:
    """Convert any supported image input to a validated float32 SimpleITK image.

    Accepted inputs:

    * a path (``str`` / ``os.PathLike``): read with :func:`read_image`;
    * a numpy array in array order, (rows, cols) = (y, x) or (z, y, x), optionally with
      leading singleton axes, e.g. (1, H, W) or (1, 1, D, H, W);
    * a torch tensor (CPU or CUDA) with the same shapes; it is detached and copied
      to the CPU;
    * a ``SimpleITK.Image`` (its geometry is kept);
    * an ``itk.Image`` when the ``itk`` package is installed (geometry kept).

    A (1, H, W) input is taken as a 2D image (a channel axis) unless ``spacing`` has
    three values, in which case it is a one-slice volume.

    Args:
        image: the input, see above.
        spacing: mm per pixel, one scalar or one value per axis in (x, y[, z]) order.
            Required for numpy/torch input and PNG/JPEG files; overrides the image's
            own spacing otherwise.
        origin: (D,) physical LPS position (mm) of the centre of voxel 0, (x, y[, z]);
            default: kept from the input, or zeros for arrays.
        direction: (D, D) or flattened row-major direction cosines (column k =
            direction of index axis k); default: kept from the input, or identity.
        keep_integer: Keep integer inputs in their own pixel type instead of float32
            (see :func:`read_image`).

    Returns:
        float32 (or, with ``keep_integer``, the input's integer type), single-component,
        2D or 3D SimpleITK image with finite values. The caller's SimpleITK image is
        never modified.

    Raises:
        MissingSpacingError: array/tensor input (or PNG/JPEG) without ``spacing``.
        InvalidImageError: unsupported type or dtype (bool, complex), wrong
            dimensionality, empty, NaN/Inf values, invalid spacing/origin/direction,
            or an unreadable file.

    Example:
        >>> img = as_image(np.zeros((240, 193), np.uint8), spacing=(0.1, 0.1))
        >>> img.GetSize(), img.GetSpacing()
        ((193, 240), (0.1, 0.1))
    """
    if isinstance(image, str | os.PathLike):
        result = read_image(image, spacing=spacing, keep_integer=keep_integer)
        return _override_geometry(result, None, origin, direction)
    if isinstance(image, sitk.Image):
        source = "SimpleITK image"
        override = not (spacing is None and origin is None and direction is None)
        # Copy only to change the geometry: a SimpleITK copy shares the pixels until they
        # are accessed, and then copies them all (80 ms for a CT volume).
        result = _check_image(sitk.Image(image) if override else image, source, keep_integer)
        return _override_geometry(result, spacing, origin, direction)
    if isinstance(image, np.ndarray):
        return _image_from_array(
            image, "numpy array", spacing, origin, direction, keep_integer
        )
    if _is_torch_tensor(image):
        import torch

        tensor = image.detach()
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise InvalidImageError(
                f"torch tensor: dtype {tensor.dtype} is not supported; pass real-valued "
                f"intensities (integer or floating point)."
            )
        integer = not (tensor.is_floating_point() or tensor.is_complex())
        dtype = None if keep_integer and integer else torch.float32
        array = tensor.to(device="cpu", dtype=dtype).numpy()
        return _image_from_array(
            array, "torch tensor", spacing, origin, direction, keep_integer
        )
    if _is_itk_image(image):
        return _from_itk(image, spacing, origin, direction, keep_integer)
    raise InvalidImageError(
        f"Unsupported image type {type(image).__module__}.{type(image).__qualname__}; expected "
        f"a path, numpy array, torch tensor, SimpleITK.Image or itk.Image."
    )


def _from_itk(
    image: Any,
    spacing: SpacingLike | None,
    origin: Sequence[float] | np.ndarray | None,
    direction: Sequence[float] | np.ndarray | None,
    keep_integer: bool = False,
) -> sitk.Image:
    import itk

    source = "itk image"
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidImageError(
            f"{source}: image has {image.GetNumberOfComponentsPerPixel()} components per pixel; "
            f"expected a single-channel image."
        )
    array = np.array(itk.array_view_from_image(image), copy=True)
    dim = array.ndim
    return _image_from_array(
        array,
        source,
        np.array(image.GetSpacing(), dtype=np.float64) if spacing is None else spacing,
        np.array(image.GetOrigin(), dtype=np.float64) if origin is None else origin,
        np.asarray(itk.array_from_matrix(image.GetDirection())).reshape(dim, dim)
        if direction is None
        else direction,
        keep_integer,
    )


def write_image(image: sitk.Image, path: str | os.PathLike[str]) -> None:
    """Write a SimpleITK image; the format follows the file extension.

    NIfTI, NRRD and MHA keep the full geometry (origin, spacing, direction). PNG/JPEG
    store neither geometry nor float pixels: cast to uint8/uint16 first.

    Args:
        image: the image to write.
        path: destination file (parent directory must exist).

    Raises:
        FastlmkError: the image cannot be written in that format or location.
    """
    try:
        sitk.WriteImage(image, str(path), useCompression=True)
    except RuntimeError as exc:
        raise FastlmkError(
            f"{path}: cannot write a {image.GetPixelIDTypeAsString()} image there "
            f"(check the directory exists and the format supports this pixel type; PNG/JPEG "
            f"need uint8/uint16): {str(exc).strip().splitlines()[-1]}"
        ) from exc


def image_to_array(image: sitk.Image) -> np.ndarray:
    """Voxel values as a float32 numpy array in array order.

    Args:
        image: a SimpleITK image.

    Returns:
        (y, x) for 2D or (z, y, x) for 3D float32 array (a copy).
    """
    return sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
