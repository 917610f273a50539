"""The AFIDs brain template data: where to find it, its consensus and its raters.

The MNI152NLin2009cAsym 1 mm T1w/T2w templates with the 32 AFIDs anatomical fiducials
(Lau et al., 2019): the consensus (``groundtruth.fcsv``) and, where available, four
individual raters (``rater01-04.fcsv``). Found in a data directory (the project's
``../shared/data/afids-mni152``) or in the PyPI wheel ``autoafids==0.1.4``
(``pip install --no-deps autoafids==0.1.4``), which ships the templates and the
consensus but no raters.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import FastlmkError
from .landmark_files import read_fcsv

__all__ = ["AfidsData", "AfidsDataError", "find_afids_data", "read_consensus", "read_rater"]

_T1W = "tpl-MNI152NLin2009cAsym_res-01_T1w.nii.gz"
_T2W = "tpl-MNI152NLin2009cAsym_res-01_T2w.nii.gz"
_WHEEL_GROUNDTRUTH = "tpl-MNI152NLin2009cAsym_res-01_desc-groundtruth_afids.fcsv"
N_FIDUCIALS = 32


class AfidsDataError(FastlmkError, FileNotFoundError):
    """The AFIDs template data cannot be found or read."""


@dataclass(frozen=True)
class AfidsData:
    """Paths of the AFIDs template data.

    Attributes:
        t1w: T1w template (NIfTI, 1 mm).
        t2w: T2w template (NIfTI, 1 mm), same grid as ``t1w``.
        groundtruth: Consensus fiducials (.fcsv, RAS).
        raters: The individual raters' .fcsv files (empty when not available).
        source: Where the files were found (a directory, or "autoafids wheel").
    """

    t1w: Path
    t2w: Path
    groundtruth: Path
    raters: tuple[Path, ...]
    source: str


def _from_directory(d: Path) -> AfidsData | None:
    if not (d / _T1W).is_file() or not (d / "groundtruth.fcsv").is_file():
        return None
    return AfidsData(
        d / _T1W, d / _T2W, d / "groundtruth.fcsv", tuple(sorted(d.glob("rater*.fcsv"))), str(d)
    )


def _from_autoafids() -> AfidsData | None:
    # find_spec locates the package without importing it: autoafids installed with
    # --no-deps cannot be imported, but its resource files are all we need.
    spec = importlib.util.find_spec("autoafids")
    if spec is None or not spec.submodule_search_locations:
        return None
    res = Path(next(iter(spec.submodule_search_locations))) / "resources"
    if not (res / _T1W).is_file() or not (res / _WHEEL_GROUNDTRUTH).is_file():
        return None
    return AfidsData(res / _T1W, res / _T2W, res / _WHEEL_GROUNDTRUTH, (), "autoafids wheel")


def find_afids_data(directory: str | Path | None = None) -> AfidsData:
    """Locate the AFIDs template data.

    Looks in, in order: ``directory``; ``$FASTLMK_SHARED_DATA/afids-mni152``;
    ``../shared/data/afids-mni152`` beside the current directory and beside the
    source checkout; the installed ``autoafids`` wheel.

    Args:
        directory: A directory holding the templates, ``groundtruth.fcsv`` and
            optionally ``rater*.fcsv``.

    Returns:
        The paths found.

    Raises:
        AfidsDataError: none of the places holds the data.
    """
    candidates = []
    if directory is not None:
        candidates.append(Path(directory))
    if os.environ.get("FASTLMK_SHARED_DATA"):
        candidates.append(Path(os.environ["FASTLMK_SHARED_DATA"]) / "afids-mni152")
    candidates.append(Path.cwd().parent / "shared" / "data" / "afids-mni152")
    candidates.append(Path(__file__).resolve().parents[3] / "shared" / "data" / "afids-mni152")
    for d in candidates:
        found = _from_directory(d)
        if found is not None:
            return found
    found = _from_autoafids()
    if found is not None:
        return found
    raise AfidsDataError(
        "AFIDs template data not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + " and the autoafids package); run `pip install --no-deps autoafids==0.1.4` "
        "or pass the data directory"
    )


def read_consensus(data: AfidsData) -> tuple[list[str], np.ndarray]:
    """The consensus fiducials: 32 canonical names and ``(32, 3)`` LPS mm points.

    Raises:
        AfidsDataError: the file does not hold 32 fiducials.
    """
    names, points = read_fcsv(data.groundtruth)
    if len(names) != N_FIDUCIALS:
        raise AfidsDataError(
            f"{data.groundtruth}: {len(names)} fiducials, expected the {N_FIDUCIALS} AFIDs"
        )
    return names, points


def read_rater(path: str | Path) -> np.ndarray:
    """One rater's fiducials as ``(32, 3)`` LPS mm points, in the consensus order.

    Raters name fiducials differently (some abbreviate: "ICS" for "infracollicular
    sulcus"), but all list the 32 AFIDs in protocol order, so rows are matched by
    position, not by name.

    Raises:
        AfidsDataError: the file does not hold 32 fiducials.
    """
    names, points = read_fcsv(path)
    if len(names) != N_FIDUCIALS:
        raise AfidsDataError(
            f"{path}: {len(names)} fiducials, expected the {N_FIDUCIALS} AFIDs in protocol order"
        )
    return points
