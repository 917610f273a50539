"""The result of :func:`fastlmk.localize`: named landmarks in physical space."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import landmark_files

__all__ = ["Landmarks"]


@dataclass
class Landmarks:
    """Landmarks found in one image.

    Attributes:
        names: Landmark names, in model order (L).
        points_mm: ``(L, D)`` float64 physical ITK/LPS coordinates in mm, (x, y[, z]).
        index: ``(L, D)`` float64 continuous voxel index in the input image, (x, y[, z]).
        confidence: ``(L,)`` float64 in [0, 1].
        flagged: ``(L,)`` bool: True where the estimate is unreliable: a stage's vote
            weight outside the model's usual range (too low: the landmark is not seen,
            e.g. outside the field of view; too high: seen everywhere), a large spread or
            a point outside the image (see
            :class:`fastlmk.model.ConfidenceSpec`), or, for models with a shape model,
            a landmark far from where the other landmarks put it, and every landmark
            when their configuration has a scale or rotation outside the training
            range (:mod:`fastlmk.shape`; ``details["shape"]`` holds the check). Flagged
            points are still reported (NaN where no estimate exists at all).
        image: Identifier of the image (file stem), or "".
        details: Per-stage diagnostics (vote weights and spreads).
    """

    names: list[str]
    points_mm: np.ndarray
    index: np.ndarray
    confidence: np.ndarray
    flagged: np.ndarray
    image: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.points_mm.shape[1])

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, name: str) -> np.ndarray:
        """Physical position (mm) of the landmark called ``name``."""
        try:
            return self.points_mm[self.names.index(name)]
        except ValueError:
            raise KeyError(f"no landmark named {name!r}; names: {self.names}") from None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (coordinate system LPS, units mm)."""
        return {
            "image": self.image,
            "coordinate_system": "LPS",
            "units": "mm",
            "landmarks": [
                {
                    "name": n,
                    "position": _floats(p),
                    "index": _floats(i),
                    "confidence": float(c),
                    "flagged": bool(f),
                }
                for n, p, i, c, f in zip(
                    self.names,
                    self.points_mm,
                    self.index,
                    self.confidence,
                    self.flagged,
                    strict=True,
                )
            ],
        }

    def _found(self) -> np.ndarray:
        """``(L,)`` bool: the landmarks that have an estimate (finite position)."""
        return np.isfinite(self.points_mm).all(axis=1)

    def not_found(self) -> list[str]:
        """Names of the landmarks without any estimate (NaN position, always flagged)."""
        return [n for n, ok in zip(self.names, self._found(), strict=True) if not ok]

    def to_csv(self, path: str | Path) -> Path:
        """Write the interchange CSV ``image,landmark,x,y[,z]`` (LPS mm).

        Landmarks without an estimate have no row (:meth:`not_found` lists them; the
        JSON file names them too); with none found the file holds the header only.
        """
        found = self._found()
        table = {
            self.image or Path(path).stem: {
                n: p for n, p, ok in zip(self.names, self.points_mm, found, strict=True) if ok
            }
        }
        if found.any():
            landmark_files.write_landmark_csv(path, table)
        else:
            Path(path).write_text("image,landmark," + ",".join("xyz"[: self.dim]) + "\n")
        return Path(path)

    def to_json(self, path: str | Path) -> Path:
        """Write JSON with positions, voxel indices, confidence and flags.

        Landmarks without an estimate are listed under ``extra.not_found`` instead;
        ``extra.shape`` holds the shape check's scale, rotation and problems (models
        with a shape model), ``extra.alignment`` the rotation of a realigned image
        (:mod:`fastlmk.align`; the matrix acts in the oriented image's grid frame).
        """
        ok = self._found()
        check = self.details.get("shape")
        extra: dict[str, Any] = {"shape": _shape_dict(check)} if check is not None else {}
        alignment = self.details.get("alignment")
        if alignment is not None:
            extra["alignment"] = {
                "rotation_deg": float(alignment["rotation_deg"]),
                "matrix": np.asarray(alignment["matrix"], dtype=float).tolist(),
                "passes": int(alignment["passes"]),
            }
        landmark_files.write_landmark_json(
            path,
            [n for n, keep in zip(self.names, ok, strict=True) if keep],
            self.points_mm[ok],
            image=self.image or None,
            confidence=self.confidence[ok],
            flagged=self.flagged[ok],
            extra={"index": self.index[ok].tolist(), "not_found": self.not_found(), **extra},
        )
        return Path(path)

    def to_slicer(self, path: str | Path) -> Path:
        """Write a 3D Slicer markups file (``.mrk.json``, coordinate system LPS).

        Landmarks without an estimate are left out.
        """
        ok = self._found()
        landmark_files.write_slicer_markups(
            path,
            [n for n, keep in zip(self.names, ok, strict=True) if keep],
            self.points_mm[ok],
            confidence=self.confidence[ok],
            flagged=self.flagged[ok],
        )
        return Path(path)


def _floats(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def _shape_dict(check: Any) -> dict[str, Any]:
    d = dict(check.to_dict())
    for key in ("scale", "rotation_deg"):  # NaN when too few landmarks were found
        d[key] = float(d[key]) if np.isfinite(d[key]) else None
    return d
