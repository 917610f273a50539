"""Landmark files: CSV, fastlmk JSON, 3D Slicer markups (.mrk.json) and legacy .fcsv.

In memory, fastlmk always uses ITK/LPS physical coordinates in millimetres, ordered
(x, y[, z]). RAS <-> LPS conversions (negate x and y) happen in this module and
nowhere else: readers always return LPS, writers take LPS.

Formats:

* **CSV** (the interchange format, many images per file): header
  ``image,landmark,x,y[,z]`` in LPS mm, one row per landmark. The reader also accepts
  ``x_mm,y_mm[,z_mm]`` columns (as in the ISBI 2015 cephalometric files). Image ids are
  kept as strings (``"001"`` stays ``"001"``). Floats are written with ``repr``: the
  shortest text that reads back to the identical float64, so a round trip is exact
  (``%.6f`` would round to 1 nm and still write 6 useless digits for integers).
* **fastlmk JSON** (one image per file)::

      {"format": "fastlmk-landmarks", "version": 1,
       "coordinate_system": "LPS", "units": "mm", "image": "scan-01",
       "landmarks": [{"name": "AC", "position": [x, y, z],
                      "confidence": 0.93, "flagged": false}, ...],
       "extra": {...}}

  ``position`` has 2 or 3 numbers (the same for every landmark); ``confidence``,
  ``flagged``, ``image`` and ``extra`` are optional.
* **3D Slicer markups JSON** (``.mrk.json``, schema v1.0.3): one ``Fiducial`` markup,
  written with ``"coordinateSystem": "LPS"``; read in either ``LPS`` or ``RAS``.
  Slicer points are always 3D: a 2D landmark is written with z = 0 and every point
  reads back as (x, y, z).
* **Slicer .fcsv** (legacy CSV markups): read with ``# CoordinateSystem`` = ``0``/``RAS``
  or ``1``/``LPS`` (Slicer's numbering: 0 = RAS, 1 = LPS; RAS when absent); written as
  RAS with ``# CoordinateSystem = 0``, which every Slicer version reads correctly
  (Slicer < 4.11 parses the value with ``atoi``, so it would read ``LPS`` as 0 = RAS).
"""

from __future__ import annotations

import csv
import io as _stdio
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastlmk.errors import LandmarkFileError

__all__ = [
    "LandmarkSet",
    "LandmarkTable",
    "read_fcsv",
    "read_landmark_csv",
    "read_landmark_json",
    "read_landmarks",
    "read_slicer_markups",
    "write_fcsv",
    "write_landmark_csv",
    "write_landmark_json",
    "write_slicer_markups",
]

#: image id -> landmark name -> (D,) float64 LPS point in mm; insertion order is kept.
LandmarkTable = dict[str, dict[str, np.ndarray]]

PathLike = str | os.PathLike[str]

SLICER_MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/main/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)
_JSON_FORMAT = "fastlmk-landmarks"
_JSON_VERSION = 1
_FCSV_COLUMNS = (
    "id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label", "desc",
    "associatedNodeID",
)  # fmt: skip
# Flipping x and y converts between RAS and LPS (in both directions).
_RAS_LPS_FLIP = np.array([-1.0, -1.0, 1.0])
_NUMERIC_LABEL = re.compile(r"^\s*[+-]?\d+(\.\d*)?\s*$")


@dataclass
class LandmarkSet:
    """Landmarks of one image, as stored in a fastlmk JSON file.

    Attributes:
        names: L landmark names, in file order.
        points_lps: (L, D) float64 physical points, LPS, mm, (x, y[, z]).
        image: image id, or None.
        confidence: (L,) float64 confidences, or None.
        flagged: (L,) bool flags (e.g. low confidence), or None.
        extra: free-form JSON-serialisable metadata.
    """

    names: list[str]
    points_lps: np.ndarray
    image: str | None = None
    confidence: np.ndarray | None = None
    flagged: np.ndarray | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _read_text(path: PathLike, what: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise LandmarkFileError(f"{path}: no such {what} file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LandmarkFileError(f"{path}: cannot read {what} file as UTF-8 text: {exc}") from exc
    if not text.strip():
        raise LandmarkFileError(f"{path}: {what} file is empty.")
    return text


def _load_json(path: PathLike, what: str) -> Any:
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise LandmarkFileError(
            f"{path}, line {exc.lineno}: invalid JSON in {what} file: {exc.msg}."
        ) from exc


def _check_points(
    names: Sequence[str], points: Any, dims: tuple[int, ...] = (2, 3)
) -> tuple[list[str], np.ndarray]:
    names = [str(n) for n in names]
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] != len(names) or array.shape[1] not in dims:
        raise LandmarkFileError(
            f"points_lps has shape {array.shape}; expected ({len(names)}, D) with D in {dims}: "
            f"one (x, y[, z]) LPS mm row per name."
        )
    if not np.isfinite(array).all():
        raise LandmarkFileError("points_lps contains NaN or infinite values; expected finite mm.")
    return names, array


def _optional_per_point(values: Any, n: int, name: str, dtype: type) -> np.ndarray | None:
    if values is None:
        return None
    array: np.ndarray = np.asarray(values, dtype=dtype)
    if array.shape != (n,):
        raise LandmarkFileError(f"{name} has shape {array.shape}; expected ({n},), one per point.")
    return array


def _number(text: str, path: PathLike, line: int, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LandmarkFileError(
            f"{path}, line {line}: column {column!r} holds {text!r}, expected a number (mm)."
        ) from None
    if not math.isfinite(value):
        raise LandmarkFileError(
            f"{path}, line {line}: column {column!r} holds {text!r}, expected a finite number."
        )
    return value


def _json_point(position: Any, lengths: tuple[int, ...], where: str) -> list[float]:
    valid = (
        isinstance(position, list)
        and len(position) in lengths
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in position)
        and all(math.isfinite(v) for v in position)
    )
    if not valid:
        expected = " or ".join(f"{n} finite numbers" for n in lengths)
        raise LandmarkFileError(f"{where}: position {position!r}; expected {expected} (mm).")
    return [float(v) for v in position]


def _write_text(path: PathLike, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8", newline="")


# ------------------------------------------------------------------------------- CSV


def read_landmark_csv(path: PathLike) -> LandmarkTable:
    """Read a landmark CSV file (``image,landmark,x,y[,z]``, LPS mm).

    Column names ``x_mm,y_mm[,z_mm]`` are accepted instead of ``x,y[,z]``; other
    columns are ignored. A row with an empty ``z`` is a 2D landmark; a file must not
    mix 2D and 3D landmarks.

    Args:
        path: CSV file.

    Returns:
        LandmarkTable: image id (string, as written) -> landmark name -> (D,) float64
        LPS point in mm, in file order.

    Raises:
        LandmarkFileError: missing/empty file, missing columns, non-numeric or
            non-finite coordinates, duplicate (image, landmark), mixed 2D/3D; the message
            names the file and line.
    """
    text = _read_text(path, "landmark CSV")
    reader = csv.reader(_stdio.StringIO(text, newline=""))
    header = [h.strip() for h in next(reader)]
    columns: dict[str, int] = {}
    for key in ("image", "landmark", "x", "y", "z"):
        for candidate in (key, f"{key}_mm"):
            if candidate in header:
                columns[key] = header.index(candidate)
                break
    missing = [k for k in ("image", "landmark", "x", "y") if k not in columns]
    if missing:
        raise LandmarkFileError(
            f"{path}, line 1: header {header} lacks column(s) {missing}; expected "
            f"image,landmark,x,y[,z] (or x_mm,y_mm[,z_mm]) in LPS mm."
        )
    table: LandmarkTable = {}
    dim_seen: tuple[int, int] | None = None  # (dim, line)
    for row in reader:
        line = reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise LandmarkFileError(
                f"{path}, line {line}: {len(row)} fields, expected {len(header)} ({header})."
            )
        image, name = row[columns["image"]].strip(), row[columns["landmark"]].strip()
        if not image or not name:
            raise LandmarkFileError(f"{path}, line {line}: empty image id or landmark name.")
        axes = ["x", "y"]
        if "z" in columns and row[columns["z"]].strip():
            axes.append("z")
        point = np.array(
            [_number(row[columns[a]].strip(), path, line, header[columns[a]]) for a in axes]
        )
        if dim_seen is None:
            dim_seen = (len(axes), line)
        elif dim_seen[0] != len(axes):
            raise LandmarkFileError(
                f"{path}, line {line}: {len(axes)}D landmark, but line {dim_seen[1]} is "
                f"{dim_seen[0]}D; a file holds either 2D or 3D landmarks."
            )
        landmarks = table.setdefault(image, {})
        if name in landmarks:
            raise LandmarkFileError(
                f"{path}, line {line}: duplicate landmark {name!r} for image {image!r}."
            )
        landmarks[name] = point
    if not table:
        raise LandmarkFileError(f"{path}: no landmark rows after the header.")
    return table


def write_landmark_csv(path: PathLike, table: Mapping[str, Mapping[str, Any]]) -> None:
    """Write a landmark table as CSV ``image,landmark,x,y[,z]`` (LPS mm).

    Coordinates are written with ``repr`` (shortest exact float64 text), so
    :func:`read_landmark_csv` gives back identical values.

    Args:
        path: destination CSV file.
        table: image id -> landmark name -> (D,) LPS point in mm; all points 2D or all 3D.

    Raises:
        LandmarkFileError: mixed dimensionality, non-finite values or an empty table.
    """
    dims = {np.asarray(p).shape for lms in table.values() for p in lms.values()}
    if not dims:
        raise LandmarkFileError(f"{path}: nothing to write, the landmark table is empty.")
    if len(dims) != 1 or next(iter(dims)) not in ((2,), (3,)):
        raise LandmarkFileError(
            f"{path}: points have shapes {sorted(dims)}; expected all (2,) or all (3,)."
        )
    dim = next(iter(dims))[0]
    buffer = _stdio.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "landmark", *"xyz"[:dim]])
    for image, landmarks in table.items():
        for name, point in landmarks.items():
            values = np.asarray(point, dtype=np.float64)
            if not np.isfinite(values).all():
                raise LandmarkFileError(
                    f"{path}: landmark {name!r} of image {image!r} is {values.tolist()}; "
                    f"expected finite mm."
                )
            writer.writerow([image, name, *(repr(float(v)) for v in values)])
    _write_text(path, buffer.getvalue())


# ------------------------------------------------------------------------------ JSON


def write_landmark_json(
    path: PathLike,
    names: Sequence[str],
    points_lps: Any,
    *,
    image: str | None = None,
    confidence: Any = None,
    flagged: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write one image's landmarks as fastlmk JSON (schema in the module docstring).

    Args:
        path: destination ``.json`` file.
        names: L landmark names.
        points_lps: (L, D) LPS points in mm, D = 2 or 3, (x, y[, z]).
        image: optional image id stored in the file.
        confidence: optional (L,) confidences.
        flagged: optional (L,) booleans (e.g. low-confidence flag).
        extra: optional JSON-serialisable metadata, stored under ``"extra"``.

    Raises:
        LandmarkFileError: shapes do not match or values are not finite.
    """
    names, points = _check_points(names, points_lps)
    conf = _optional_per_point(confidence, len(names), "confidence", float)
    flags = _optional_per_point(flagged, len(names), "flagged", bool)
    landmarks = []
    for i, (name, point) in enumerate(zip(names, points, strict=True)):
        entry: dict[str, Any] = {"name": name, "position": [float(v) for v in point]}
        if conf is not None:
            entry["confidence"] = float(conf[i])
        if flags is not None:
            entry["flagged"] = bool(flags[i])
        landmarks.append(entry)
    document: dict[str, Any] = {
        "format": _JSON_FORMAT,
        "version": _JSON_VERSION,
        "coordinate_system": "LPS",
        "units": "mm",
    }
    if image is not None:
        document["image"] = str(image)
    document["landmarks"] = landmarks
    if extra:
        document["extra"] = dict(extra)
    _write_text(path, json.dumps(document, indent=2) + "\n")


def read_landmark_json(path: PathLike) -> LandmarkSet:
    """Read a fastlmk landmark JSON file.

    ``"coordinate_system": "RAS"`` is accepted and converted to LPS.

    Args:
        path: ``.json`` file written by :func:`write_landmark_json` (or by hand).

    Returns:
        LandmarkSet with (L, D) LPS mm points.

    Raises:
        LandmarkFileError: missing/empty file, invalid JSON, missing keys, unknown
            units or coordinate system, inconsistent point dimensions.
    """
    document = _load_json(path, "landmark JSON")
    if not isinstance(document, dict) or not isinstance(document.get("landmarks"), list):
        raise LandmarkFileError(
            f"{path}: expected a JSON object with a 'landmarks' list (fastlmk landmark JSON)."
        )
    system = str(document.get("coordinate_system", "LPS")).upper()
    if system not in ("LPS", "RAS"):
        raise LandmarkFileError(f"{path}: coordinate_system {system!r}; expected 'LPS' or 'RAS'.")
    units = document.get("units", "mm")
    if units != "mm":
        raise LandmarkFileError(f"{path}: units {units!r}; expected 'mm'.")
    names: list[str] = []
    rows: list[list[float]] = []
    confidence: list[float] = []
    flagged: list[bool] = []
    for i, entry in enumerate(document["landmarks"]):
        where = f"{path}: landmarks[{i}]"
        if not isinstance(entry, dict) or "name" not in entry or "position" not in entry:
            raise LandmarkFileError(f"{where} needs 'name' and 'position'.")
        rows.append(_json_point(entry["position"], (2, 3), where))
        names.append(str(entry["name"]))
        if "confidence" in entry:
            confidence.append(float(entry["confidence"]))
        if "flagged" in entry:
            flagged.append(bool(entry["flagged"]))
    if len({len(r) for r in rows}) > 1:
        raise LandmarkFileError(f"{path}: mixes 2D and 3D positions.")
    points = np.array(rows, dtype=np.float64).reshape(len(rows), -1 if rows else 3)
    if system == "RAS":
        points = points * _RAS_LPS_FLIP[: points.shape[1]]
    n = len(names)
    for values, key in ((confidence, "confidence"), (flagged, "flagged")):
        if values and len(values) != n:
            raise LandmarkFileError(f"{path}: '{key}' given for some landmarks but not all.")
    image = document.get("image")
    extra = document.get("extra", {})
    return LandmarkSet(
        names=names,
        points_lps=points,
        image=None if image is None else str(image),
        confidence=np.array(confidence, dtype=np.float64) if confidence else None,
        flagged=np.array(flagged, dtype=bool) if flagged else None,
        extra=extra if isinstance(extra, dict) else {"extra": extra},
    )


# ------------------------------------------------------------- 3D Slicer .mrk.json


def write_slicer_markups(
    path: PathLike,
    names: Sequence[str],
    points_lps: Any,
    *,
    confidence: Any = None,
    flagged: Any = None,
) -> None:
    """Write landmarks as a 3D Slicer markups point list (``.mrk.json``), in LPS.

    One ``Fiducial`` markup with one control point per landmark (``id`` = 1-based
    index, ``label`` = name, ``positionStatus`` = ``"defined"``), ``"coordinateSystem":
    "LPS"``, ``"coordinateUnits": "mm"``. Confidence goes into each point's
    ``description``; flagged points get ``"flagged: low confidence ..."`` there.
    2D points are written with z = 0.

    Args:
        path: destination file, conventionally ``*.mrk.json``.
        names: L landmark names.
        points_lps: (L, 2) or (L, 3) LPS points in mm.
        confidence: optional (L,) confidences.
        flagged: optional (L,) booleans.

    Raises:
        LandmarkFileError: shapes do not match or values are not finite.
    """
    names, points = _check_points(names, points_lps)
    if points.shape[1] == 2:
        points = np.concatenate([points, np.zeros((len(names), 1))], axis=1)
    conf = _optional_per_point(confidence, len(names), "confidence", float)
    flags = _optional_per_point(flagged, len(names), "flagged", bool)
    control_points = []
    for i, (name, point) in enumerate(zip(names, points, strict=True)):
        notes = []
        if flags is not None and flags[i]:
            notes.append("flagged: low confidence")
        if conf is not None:
            notes.append(f"confidence={conf[i]:.3f}")
        control_points.append(
            {
                "id": str(i + 1),
                "label": name,
                "description": "; ".join(notes),
                "associatedNodeID": "",
                "position": [float(v) for v in point],
                "selected": True,
                "locked": False,
                "visibility": True,
                "positionStatus": "defined",
            }
        )
    document = {
        "@schema": SLICER_MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(names),
                "controlPoints": control_points,
            }
        ],
    }
    _write_text(path, json.dumps(document, indent=2) + "\n")


def read_slicer_markups(path: PathLike) -> tuple[list[str], np.ndarray]:
    """Read the control points of a 3D Slicer markups file (``.mrk.json``).

    Reads the first markup of type ``Fiducial`` (or the first markup if there is none).
    ``coordinateSystem`` ``RAS`` is converted to LPS; absent means LPS (the schema
    default). Points whose ``positionStatus`` is ``"undefined"`` (placeholders without
    a position) are returned as NaN rows so names and rows stay aligned.

    Args:
        path: ``.mrk.json`` file.

    Returns:
        (names, points): L labels (``label``, else ``id``, else ``F-<i>``) and (L, 3)
        float64 LPS points in mm. 2D landmarks come back with their stored z (0).

    Raises:
        LandmarkFileError: missing/empty file, invalid JSON, no markups or control
            points, bad positions or an unknown coordinate system.
    """
    document = _load_json(path, "Slicer markups")
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list) or not markups:
        raise LandmarkFileError(
            f"{path}: no 'markups' list; expected a 3D Slicer .mrk.json markups file."
        )
    markup = next((m for m in markups if isinstance(m, dict) and m.get("type") == "Fiducial"), None)
    markup = markup if markup is not None else markups[0]
    if not isinstance(markup, dict):
        raise LandmarkFileError(f"{path}: markups[0] is not an object.")
    system = str(markup.get("coordinateSystem", "LPS")).upper()
    if system in ("0", "RAS"):
        flip = _RAS_LPS_FLIP
    elif system in ("1", "LPS"):
        flip = np.ones(3)
    else:
        raise LandmarkFileError(f"{path}: coordinateSystem {system!r}; expected 'LPS' or 'RAS'.")
    control_points = markup.get("controlPoints", [])
    if not isinstance(control_points, list):
        raise LandmarkFileError(f"{path}: 'controlPoints' is not a list.")
    names: list[str] = []
    points = np.full((len(control_points), 3), np.nan)
    for i, cp in enumerate(control_points):
        if not isinstance(cp, dict):
            raise LandmarkFileError(f"{path}: controlPoints[{i}] is not an object.")
        label = str(cp.get("label") or cp.get("id") or f"F-{i + 1}")
        names.append(label)
        if cp.get("positionStatus") == "undefined":
            continue
        points[i] = _json_point(cp.get("position"), (3,), f"{path}: controlPoints[{i}] ({label!r})")
    return names, points * flip


# ------------------------------------------------------------------------ Slicer .fcsv


def _fcsv_name(fields: dict[str, str]) -> str:
    """The landmark name of an .fcsv row.

    Slicer puts the name in ``label``. Some tools (and the AFIDs templates) put a
    running number in ``label`` and the name in ``desc``; then ``desc`` wins, unless
    it is empty or a node id such as ``vtkMRMLScalarVolumeNode1``.
    """
    label = fields.get("label", "").strip()
    desc = fields.get("desc", "").strip()
    desc_is_name = bool(desc) and not desc.startswith("vtkMRML")
    if desc_is_name and (not label or _NUMERIC_LABEL.match(label)):
        return desc
    return label or fields.get("id", "").strip()


def read_fcsv(path: PathLike) -> tuple[list[str], np.ndarray]:
    """Read a 3D Slicer ``.fcsv`` fiducial file.

    Handles ``# CoordinateSystem = 0 | RAS | 1 | LPS`` (0 = RAS, 1 = LPS; RAS if the line
    is absent), a ``# columns = ...`` header (else Slicer's fixed column order), quoted
    fields, CRLF line ends, and the name rule of :func:`_fcsv_name` (``label``, or
    ``desc`` when ``label`` is empty or a number).

    Args:
        path: ``.fcsv`` file.

    Returns:
        (names, points): L names and (L, 3) float64 LPS points in mm.

    Raises:
        LandmarkFileError: missing/empty file, unknown coordinate system, missing
            x/y/z columns or non-numeric coordinates (message names file and line).
    """
    text = _read_text(path, "Slicer .fcsv")
    columns = list(_FCSV_COLUMNS)
    flip = _RAS_LPS_FLIP
    names: list[str] = []
    rows: list[list[float]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip(), value.strip()
            if key == "CoordinateSystem":
                if value.upper() in ("0", "RAS"):
                    flip = _RAS_LPS_FLIP
                elif value.upper() in ("1", "LPS"):
                    flip = np.ones(3)
                else:
                    raise LandmarkFileError(
                        f"{path}, line {line_number}: CoordinateSystem {value!r}; expected "
                        f"0/RAS or 1/LPS."
                    )
            elif key == "columns":
                columns = [c.strip() for c in value.split(",")]
                if not {"x", "y", "z"} <= set(columns):
                    raise LandmarkFileError(
                        f"{path}, line {line_number}: columns {columns} lack x, y or z."
                    )
            continue
        cells = next(csv.reader([line]))
        fields = dict(zip(columns, cells, strict=False))
        if not {"x", "y", "z"} <= fields.keys():
            raise LandmarkFileError(
                f"{path}, line {line_number}: {len(cells)} fields, expected at least "
                f"{columns.index('z') + 1} ({', '.join(columns)})."
            )
        rows.append([_number(fields[a].strip(), path, line_number, a) for a in "xyz"])
        names.append(_fcsv_name(fields) or f"F-{len(names) + 1}")
    if not rows:
        raise LandmarkFileError(f"{path}: no fiducial rows found.")
    return names, np.array(rows) * flip


def write_fcsv(path: PathLike, names: Sequence[str], points_lps: Any) -> None:
    """Write landmarks as a 3D Slicer ``.fcsv`` file, in RAS (``# CoordinateSystem = 0``).

    The numeric RAS header is what every Slicer version reads correctly. Names go in
    ``label`` (quoted if they contain commas or quotes); ``desc`` is empty. 2D points
    are written with z = 0.

    Args:
        path: destination ``.fcsv`` file.
        names: L landmark names.
        points_lps: (L, 2) or (L, 3) LPS points in mm.

    Raises:
        LandmarkFileError: shapes do not match or values are not finite.
    """
    names, points = _check_points(names, points_lps)
    if points.shape[1] == 2:
        points = np.concatenate([points, np.zeros((len(names), 1))], axis=1)
    ras = points * _RAS_LPS_FLIP
    buffer = _stdio.StringIO()
    buffer.write("# Markups fiducial file version = 4.11\n")
    buffer.write("# CoordinateSystem = 0\n")
    buffer.write(f"# columns = {','.join(_FCSV_COLUMNS)}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    for i, (name, point) in enumerate(zip(names, ras, strict=True)):
        writer.writerow(
            [f"vtkMRMLMarkupsFiducialNode_{i}", *(repr(float(v)) for v in point),
             0, 0, 0, 1, 1, 1, 0, name, "", ""]
        )  # fmt: skip
    _write_text(path, buffer.getvalue())


# --------------------------------------------------------------------------- dispatch


def _single_image_id(path: Path, image: str | None) -> str:
    if image is not None:
        return image
    name = path.name
    for suffix in (".mrk.json", ".fcsv", ".json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _as_table(path: Path, image_id: str, names: list[str], points: np.ndarray) -> LandmarkTable:
    landmarks: dict[str, np.ndarray] = {}
    for name, point in zip(names, points, strict=True):
        if name in landmarks:
            raise LandmarkFileError(
                f"{path}: landmark name {name!r} appears twice; names must be unique."
            )
        landmarks[name] = point
    return {image_id: landmarks}


def read_landmarks(path: PathLike, *, image: str | None = None) -> LandmarkTable:
    """Read any supported landmark file into a LandmarkTable (LPS mm).

    Dispatches on the extension: ``.csv`` (:func:`read_landmark_csv`), ``.mrk.json``
    (:func:`read_slicer_markups`), ``.json`` (:func:`read_landmark_json`), ``.fcsv``
    (:func:`read_fcsv`). Single-image formats are keyed by ``image``, else by the
    image id stored in the JSON, else by the file name without its extension
    (``scan-01.mrk.json`` -> ``"scan-01"``). For CSV, ``image`` selects one image.

    Args:
        path: landmark file.
        image: image id (see above).

    Returns:
        LandmarkTable: image id -> landmark name -> (D,) float64 LPS mm point.
        Slicer formats always give D = 3.

    Raises:
        LandmarkFileError: unknown extension, malformed file, duplicate names, or
            ``image`` not present in a CSV file.
    """
    path = Path(path)
    lower = path.name.lower()
    if lower.endswith(".csv"):
        table = read_landmark_csv(path)
        if image is None:
            return table
        if image not in table:
            raise LandmarkFileError(f"{path}: no landmarks for image {image!r}.")
        return {image: table[image]}
    if lower.endswith(".mrk.json"):
        names, points = read_slicer_markups(path)
    elif lower.endswith(".json"):
        contents = read_landmark_json(path)
        names, points = contents.names, contents.points_lps
        image = image if image is not None else contents.image
    elif lower.endswith(".fcsv"):
        names, points = read_fcsv(path)
    else:
        raise LandmarkFileError(
            f"{path}: unknown landmark file type; expected .csv, .json, .mrk.json or .fcsv."
        )
    return _as_table(path, _single_image_id(path, image), names, points)
