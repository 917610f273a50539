"""The public API: names other tools depend on must not disappear."""

from __future__ import annotations

import fastlmk

PUBLIC = {
    "load_model",
    "localize",
    "Landmarks",
    "train",
    "evaluate",
    "read_image",
    "read_landmarks",
    "available_models",
    "LandmarkModel",
    "FastlmkError",
    "InvalidImageError",
    "MissingSpacingError",
    "ModelError",
    "LandmarkFileError",
}


def test_public_names_exist_and_are_listed() -> None:
    assert PUBLIC <= set(fastlmk.__all__)
    for name in fastlmk.__all__:
        assert hasattr(fastlmk, name), name


def test_landmarks_attributes() -> None:
    import numpy as np

    lm = fastlmk.Landmarks(
        names=["a"],
        points_mm=np.zeros((1, 3)),
        index=np.zeros((1, 3)),
        confidence=np.ones(1),
        flagged=np.zeros(1, bool),
    )
    for attr in (
        "names",
        "points_mm",
        "index",
        "confidence",
        "flagged",
        "to_csv",
        "to_json",
        "to_slicer",
        "to_dict",
    ):
        assert hasattr(lm, attr)
    assert lm.to_dict()["coordinate_system"] == "LPS"
