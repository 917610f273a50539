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
            :class:`fastlmk.model.ConfidenceSpec`). Flagged points are still reported
            (NaN where no estimate exists at all).
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

    def to_csv(self, path: str | Path) -> Path:
        """Write the interchange CSV ``image,landmark,x,y[,z]`` (LPS mm)."""
        table = {self.image or Path(path).stem: dict(zip(self.names, self.points_mm, strict=True))}
        landmark_files.write_landmark_csv(path, table)
        return Path(path)

    def to_json(self, path: str | Path) -> Path:
        """Write JSON with positions, voxel indices, confidence and flags."""
        landmark_files.write_landmark_json(
            path,
            self.names,
            self.points_mm,
            image=self.image or None,
            confidence=self.confidence,
            flagged=self.flagged,
            extra={"index": self.index.tolist()},
        )
        return Path(path)

    def to_slicer(self, path: str | Path) -> Path:
        """Write a 3D Slicer markups file (``.mrk.json``, coordinate system LPS)."""
        landmark_files.write_slicer_markups(
            path, self.names, self.points_mm, confidence=self.confidence, flagged=self.flagged
        )
        return Path(path)

    def __repr__(self) -> str:
        rows = [
            f"Landmarks(image={self.image!r}, n={len(self)}, flagged={int(self.flagged.sum())})"
        ]
        for n, p, c, f in zip(
            self.names, self.points_mm, self.confidence, self.flagged, strict=True
        ):
            coords = ", ".join(f"{v:8.2f}" for v in p)
            rows.append(f"  {n:<28s} ({coords}) mm  conf {c:.2f}{'  FLAGGED' if f else ''}")
        return "\n".join(rows)


def _floats(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]
