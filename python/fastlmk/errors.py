"""Exceptions raised by fastlmk.

Every error a user can cause (a bad image, a missing spacing, a malformed landmark
file, an unusable model) is a :class:`FastlmkError`. The concrete classes also derive
from :class:`ValueError`, so code written against the standard library's conventions
(``except ValueError``) keeps working.

Messages follow one pattern: what was wrong, what was expected, what to do.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "EvaluationError",
    "FastlmkError",
    "InvalidImageError",
    "LandmarkFileError",
    "MissingSpacingError",
    "ModelError",
]


class FastlmkError(Exception):
    """Base class of every error raised on purpose by fastlmk."""


class InvalidImageError(FastlmkError, ValueError):
    """An image cannot be used: wrong dimensionality, NaN/Inf values, empty,
    multi-component, unreadable or corrupt file, or invalid geometry."""


class MissingSpacingError(FastlmkError, ValueError):
    """An image has no physical pixel spacing (numpy/torch input, PNG/JPEG files)
    and none was passed."""


class LandmarkFileError(FastlmkError, ValueError):
    """A landmark file (CSV, JSON, .mrk.json, .fcsv) is missing, empty or malformed."""


class ModelError(FastlmkError, ValueError):
    """A model directory or its contents are missing, inconsistent or unsupported."""


class EvaluationError(FastlmkError, ValueError):
    """Predictions and references cannot be compared: no reference, no image id in
    common, or points of different dimensionality (2D against 3D)."""


class ArgumentError(FastlmkError, ValueError):
    """A function argument has the wrong type or is out of range (e.g. ``align``)."""
