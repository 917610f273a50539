"""Synthetic training data: random deformations and intensity changes of one 3D image.

A model trained on a single annotated image (e.g. a brain template) must learn anatomy,
not the image: every training volume is the image seen through a random smooth spatial
deformation, with a different contrast, bias field and noise, and its landmarks moved by
the same deformation.

Spatial model. The output image is sampled as ``out(x) = in(T(x))`` for every output
point ``x`` (physical LPS mm), with

    T(x) = A(x + u(x)),

``A`` a random affine map (rotation, anisotropic scaling, shear, translation, about the
image centre) and ``u`` a smooth random displacement field (a Gaussian-smoothed random
vector field on a coarse grid, a few mm in amplitude). The anatomy at input point ``p``
therefore appears at output point ``T^{-1}(p)``: landmarks move by the inverse, computed
numerically (:meth:`RandomDeformation.inverse`, fixed-point iteration on ``u``).

``python -m fastlmk.synthesis --help`` writes a training data set (the format
:func:`fastlmk.train` reads) from one image and its landmark file.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import geometry
from .errors import FastlmkError
from .io import image_to_array, read_image
from .landmark_files import read_landmarks, write_landmark_csv

__all__ = [
    "DeformationSpec",
    "IntensityAugmentSpec",
    "RandomDeformation",
    "SynthesisError",
    "augment_intensity",
    "random_deformation",
    "synthesize",
    "write_synthetic_dataset",
]


class SynthesisError(FastlmkError, ValueError):
    """Invalid input to the data synthesis (wrong dimensionality, no landmarks...)."""


@dataclass(frozen=True)
class DeformationSpec:
    """Ranges of the random spatial deformation.

    Attributes:
        rotation_deg: Largest rotation about each axis (uniform in +-).
        scale: Largest relative scaling per axis (uniform in ``1 +- scale``; anisotropic).
        shear: Largest off-diagonal shear coefficient (uniform in +-).
        translation_mm: Largest translation per axis (uniform in +-).
        elastic_mm: Largest displacement of the elastic field ``u`` (mm); the field is
            scaled so its maximum norm is uniform in ``[0.5, 1] * elastic_mm``.
        elastic_sigma_mm: Correlation length of the elastic field (Gaussian sigma, mm).
            Keep ``elastic_mm / elastic_sigma_mm`` well below 1 so the deformation stays
            invertible.
        grid_spacing_mm: Spacing of the grid the field is stored on (linear
            interpolation in between).
    """

    rotation_deg: float = 10.0
    scale: float = 0.1
    shear: float = 0.05
    translation_mm: float = 10.0
    elastic_mm: float = 4.0
    elastic_sigma_mm: float = 12.0
    grid_spacing_mm: float = 4.0


@dataclass(frozen=True)
class IntensityAugmentSpec:
    """Ranges of the random intensity changes (applied to intensities scaled to [0, 1]).

    Attributes:
        contrast_probability: Probability of a random contrast: a piecewise-linear
            remapping of intensities through ``contrast_knots`` random levels, with
            0 kept at 0 so the background stays dark. Teaches the model contrasts it
            never saw (e.g. T2w from a T1w template).
        contrast_knots: Number of interior knots of the random remapping.
        gamma: Log-gamma standard deviation: ``v ** exp(N(0, gamma))``.
        bias: Amplitude of the multiplicative bias field ``exp(b(x))``, ``|b| <= bias``.
        bias_sigma_mm: Smoothness (Gaussian sigma, mm) of the bias field.
        noise: Largest standard deviation of additive Gaussian noise.
    """

    contrast_probability: float = 0.5
    contrast_knots: int = 4
    gamma: float = 0.25
    bias: float = 0.3
    bias_sigma_mm: float = 30.0
    noise: float = 0.03


def _smooth_random_field(
    reference: sitk.Image, components: int, sigma_mm: float, rng: np.random.Generator
) -> np.ndarray:
    """``components`` independent Gaussian-smoothed white-noise fields on ``reference``.

    Returns:
        ``(*S, components)`` float64, array order, each component scaled to max |v| = 1.
    """
    out = []
    for _ in range(components):
        noise = sitk.GetImageFromArray(rng.standard_normal(reference.GetSize()[::-1]))
        noise.CopyInformation(reference)
        smooth = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, sigma_mm))
        out.append(smooth / max(float(np.abs(smooth).max()), 1e-12))
    return np.stack(out, axis=-1)


def _coarse_reference(image: sitk.Image, spacing_mm: float, margin_mm: float) -> sitk.Image:
    """A grid with ``image``'s direction and ``spacing_mm`` covering it plus a margin."""
    geo = geometry.Geometry.from_sitk(image)
    extent = (np.array(geo.size) - 1) * geo.spacing + 2 * margin_mm
    size = [math.ceil(e / spacing_mm) + 1 for e in extent]
    origin = geometry.index_to_physical(-margin_mm / geo.spacing, geo)
    ref = sitk.Image(size, sitk.sitkFloat64)
    ref.SetSpacing([spacing_mm] * image.GetDimension())
    ref.SetOrigin(origin.tolist())
    ref.SetDirection(image.GetDirection())
    return ref


@dataclass
class RandomDeformation:
    """A spatial deformation ``T(x) = A(x + u(x))`` (output point -> input point, LPS mm).

    Attributes:
        affine: ``A`` (a SimpleITK affine transform, centre at the image centre).
        field: ``u`` (a SimpleITK displacement field transform, physical mm vectors).
    """

    affine: sitk.AffineTransform
    field: sitk.DisplacementFieldTransform

    @property
    def transform(self) -> sitk.CompositeTransform:
        """``T`` as one SimpleITK transform (composite transforms apply the last added
        first, so ``[A, u]`` is ``A(x + u(x))``)."""
        return sitk.CompositeTransform([self.affine, self.field])

    def forward(self, points: np.ndarray) -> np.ndarray:
        """``T(x)`` for ``(N, 3)`` output points (LPS mm) -> ``(N, 3)`` input points."""
        t = self.transform
        return np.array([t.TransformPoint([float(v) for v in p]) for p in np.atleast_2d(points)])

    def inverse(
        self, points: np.ndarray, *, tol_mm: float = 1e-5, max_iter: int = 200
    ) -> np.ndarray:
        """``T^{-1}(p)``: where the anatomy at input points ``p`` lies in the output.

        Solves ``x + u(x) = A^{-1}(p)`` by the fixed-point iteration
        ``x <- A^{-1}(p) - u(x)``, which converges because ``u`` is a contraction
        (its gradient norm is well below 1 for the ranges of :class:`DeformationSpec`).

        Args:
            points: ``(N, 3)`` input points, LPS mm.
            tol_mm: Stop when no point moves by more than this.
            max_iter: Iteration limit.

        Returns:
            ``(N, 3)`` output points, LPS mm.

        Raises:
            SynthesisError: the iteration did not converge (deformation not invertible).
        """
        inv_affine = self.affine.GetInverse()
        q = np.array(
            [inv_affine.TransformPoint([float(v) for v in p]) for p in np.atleast_2d(points)]
        )
        x = q.copy()
        for _ in range(max_iter):
            u = np.array([self.field.TransformPoint(p.tolist()) for p in x]) - x
            new = q - u
            step = float(np.abs(new - x).max(initial=0.0))
            x = new
            if step < tol_mm:
                return x
        raise SynthesisError(
            "the inverse of the random deformation did not converge; reduce "
            "elastic_mm or increase elastic_sigma_mm in DeformationSpec"
        )

    def resample(self, image: sitk.Image, interpolator: int = sitk.sitkLinear) -> sitk.Image:
        """``out(x) = in(T(x))`` on ``image``'s own grid (float32; 0 outside the input)."""
        return sitk.Resample(image, image, self.transform, interpolator, 0.0, sitk.sitkFloat32)


def random_deformation(
    image: sitk.Image, spec: DeformationSpec, rng: np.random.Generator
) -> RandomDeformation:
    """A random :class:`RandomDeformation` for a 3D image's physical extent.

    Args:
        image: The 3D image to deform (its geometry sets the centre and field domain).
        spec: Deformation ranges.
        rng: Random generator; the deformation is a pure function of its state.

    Returns:
        The deformation.

    Raises:
        SynthesisError: ``image`` is not 3D.
    """
    if image.GetDimension() != 3:
        raise SynthesisError(f"random deformations need a 3D image, got {image.GetDimension()}D")
    geo = geometry.Geometry.from_sitk(image)
    centre = geometry.index_to_physical((np.array(geo.size) - 1) / 2.0, geo)

    rot = np.eye(3)
    for i, j in ((0, 1), (1, 2), (0, 2)):
        a = math.radians(rng.uniform(-spec.rotation_deg, spec.rotation_deg))
        g = np.eye(3)
        g[i, i] = g[j, j] = math.cos(a)
        g[i, j], g[j, i] = -math.sin(a), math.sin(a)
        rot = g @ rot
    shear = np.eye(3) + np.triu(rng.uniform(-spec.shear, spec.shear, (3, 3)), 1)
    scale = np.diag(1.0 + rng.uniform(-spec.scale, spec.scale, 3))
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre.tolist())
    affine.SetMatrix((rot @ shear @ scale).ravel().tolist())
    affine.SetTranslation(rng.uniform(-spec.translation_mm, spec.translation_mm, 3).tolist())

    ref = _coarse_reference(image, spec.grid_spacing_mm, margin_mm=2 * spec.elastic_sigma_mm)
    u = _smooth_random_field(ref, 3, spec.elastic_sigma_mm, rng)
    norm = float(np.linalg.norm(u, axis=-1).max())
    u *= rng.uniform(0.5, 1.0) * spec.elastic_mm / max(norm, 1e-12)
    field_image = sitk.GetImageFromArray(u.astype(np.float64), isVector=True)
    field_image.CopyInformation(ref)
    return RandomDeformation(affine, sitk.DisplacementFieldTransform(field_image))


def _random_contrast(v: np.ndarray, knots: int, rng: np.random.Generator) -> np.ndarray:
    """Piecewise-linear remapping of ``v`` in [0, 1] through random levels (0 -> 0)."""
    xs = np.concatenate([[0.0], np.sort(rng.uniform(0.05, 0.95, knots)), [1.0]])
    ys = np.concatenate([[0.0], rng.uniform(0.0, 1.0, knots + 1)])
    return np.interp(v, xs, ys)


def augment_intensity(
    image: sitk.Image, spec: IntensityAugmentSpec, rng: np.random.Generator
) -> sitk.Image:
    """Random contrast, gamma, bias field and noise; geometry unchanged.

    Intensities are first scaled to [0, 1] by the image's 0.5 and 99.5 percentiles
    (clipped); the result is float32 in about [0, 1].

    Args:
        image: A 2D or 3D scalar image.
        spec: Intensity change ranges.
        rng: Random generator.

    Returns:
        A new float32 image with ``image``'s origin, spacing and direction.
    """
    array = image_to_array(image).astype(np.float64)
    lo, hi = np.percentile(array, [0.5, 99.5])
    v = np.clip((array - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    if rng.uniform() < spec.contrast_probability:
        v = _random_contrast(v, spec.contrast_knots, rng)
    v = v ** math.exp(rng.normal(0.0, spec.gamma))
    if spec.bias > 0:
        b = _smooth_random_field(image, 1, spec.bias_sigma_mm, rng)[..., 0]
        v = v * np.exp(spec.bias * rng.uniform(0.3, 1.0) * b)
    if spec.noise > 0:
        v = v + rng.normal(0.0, rng.uniform(0.0, spec.noise), v.shape)
    out = sitk.GetImageFromArray(v.astype(np.float32))
    out.CopyInformation(image)
    return out


def synthesize(
    image: sitk.Image,
    points_mm: np.ndarray,
    rng: np.random.Generator,
    deformation: DeformationSpec | None = DeformationSpec(),
    intensity: IntensityAugmentSpec | None = IntensityAugmentSpec(),
) -> tuple[sitk.Image, np.ndarray]:
    """One synthetic training pair from an image and its landmarks.

    Args:
        image: A 3D image.
        points_mm: ``(L, 3)`` landmarks in ``image``, LPS mm.
        rng: Random generator.
        deformation: Spatial deformation ranges, or None for none.
        intensity: Intensity change ranges, or None for none.

    Returns:
        ``(image, points)``: the new image (``image``'s grid, float32) and the ``(L, 3)``
        landmarks moved by the same deformation, LPS mm.
    """
    points = np.asarray(points_mm, dtype=np.float64)
    out = sitk.Cast(image, sitk.sitkFloat32)
    if deformation is not None:
        d = random_deformation(image, deformation, rng)
        out, points = d.resample(out), d.inverse(points)
    if intensity is not None:
        out = augment_intensity(out, intensity, rng)
    return out, points


def write_synthetic_dataset(
    image: sitk.Image | str | Path,
    names: Sequence[str],
    points_mm: np.ndarray,
    out_dir: str | Path,
    *,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    test_seed: int | None = None,
    deformation: DeformationSpec = DeformationSpec(),
    intensity: IntensityAugmentSpec = IntensityAugmentSpec(),
    log: bool = False,
) -> Path:
    """Write a data set of synthetic deformations in the format :func:`fastlmk.train` reads.

    ``images/<id>.nii.gz`` (float32), ``landmarks.csv`` (``image,landmark,x,y,z``, LPS mm)
    and ``split.csv`` (``image,split``: ``train`` / ``val`` / ``test``). Training and
    validation volume ``i`` come from the random stream ``(seed, i)``, test volumes from
    ``(test_seed, i)`` (default ``seed + 1``), so test deformations are never drawn from
    the training stream and any one volume can be regenerated alone.

    Args:
        image: The source 3D image, or its path.
        names: L landmark names.
        points_mm: ``(L, 3)`` landmarks in the source image, LPS mm.
        out_dir: Output directory (created).
        n_train, n_val, n_test: Number of volumes per split.
        seed: Seed of the training and validation volumes.
        test_seed: Seed of the test volumes.
        deformation: Spatial deformation ranges.
        intensity: Intensity change ranges.
        log: Print progress to stderr.

    Returns:
        ``out_dir``.

    Raises:
        SynthesisError: ``names`` and ``points_mm`` do not match.
    """
    src = read_image(image) if isinstance(image, str | Path) else image
    points = np.asarray(points_mm, dtype=np.float64)
    if points.shape != (len(names), 3):
        raise SynthesisError(
            f"points_mm has shape {points.shape}; expected ({len(names)}, 3) for {len(names)} "
            "names, LPS mm"
        )
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    test_seed = seed + 1 if test_seed is None else test_seed
    jobs = (
        [(f"train{i:03d}", "train", seed, i) for i in range(n_train)]
        + [(f"val{i:03d}", "val", seed, n_train + i) for i in range(n_val)]
        + [(f"test{i:03d}", "test", test_seed, i) for i in range(n_test)]
    )
    table: dict[str, dict[str, np.ndarray]] = {}
    t0 = time.perf_counter()
    for k, (image_id, _, s, i) in enumerate(jobs):
        img, pts = synthesize(src, points, np.random.default_rng([s, i]), deformation, intensity)
        sitk.WriteImage(img, str(out / "images" / f"{image_id}.nii.gz"))
        table[image_id] = dict(zip(names, pts, strict=True))
        if log:
            rate = (time.perf_counter() - t0) / (k + 1)
            print(f"[{k + 1}/{len(jobs)}] {image_id} ({rate:.1f} s/volume)", file=sys.stderr)
    write_landmark_csv(out / "landmarks.csv", table)
    with open(out / "split.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "split"])
        writer.writerows([image_id, split] for image_id, split, _, _ in jobs)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastlmk.synthesis``: write a synthetic data set from one image."""
    parser = argparse.ArgumentParser(
        prog="python -m fastlmk.synthesis", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--image", required=True, help="source 3D image")
    parser.add_argument("--landmarks", required=True, help=".fcsv / .mrk.json / .csv (one image)")
    parser.add_argument("--out", required=True, help="output data set directory")
    parser.add_argument("--train", type=int, default=100)
    parser.add_argument("--val", type=int, default=4)
    parser.add_argument("--test", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-seed", type=int, default=None)
    args = parser.parse_args(argv)
    table = read_landmarks(args.landmarks)
    if len(table) != 1:
        raise SynthesisError(f"{args.landmarks}: expected the landmarks of one image")
    (lms,) = table.values()
    write_synthetic_dataset(
        args.image,
        list(lms),
        np.array(list(lms.values())),
        args.out,
        n_train=args.train,
        n_val=args.val,
        n_test=args.test,
        seed=args.seed,
        test_seed=args.test_seed,
        log=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
