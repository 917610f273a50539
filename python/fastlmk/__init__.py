"""fastlmk: fast anatomical landmark localization in 2D and 3D medical images.

>>> import fastlmk
>>> model = fastlmk.load_model("path/to/model")                 # doctest: +SKIP
>>> lm = fastlmk.localize("scan.nii.gz", model)                 # doctest: +SKIP
>>> lm.names, lm.points_mm, lm.confidence                       # doctest: +SKIP

Coordinates are physical ITK/LPS millimetres ordered (x, y[, z]).
"""

from .errors import (
    ArgumentError,
    EvaluationError,
    FastlmkError,
    InvalidImageError,
    LandmarkFileError,
    MissingSpacingError,
    ModelError,
)
from .evaluate import evaluate
from .inference import localize
from .io import read_image
from .landmark_files import read_landmarks
from .landmarks import Landmarks
from .model import LandmarkModel, available_models, load_model
from .train import train

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "EvaluationError",
    "FastlmkError",
    "InvalidImageError",
    "LandmarkFileError",
    "LandmarkModel",
    "Landmarks",
    "MissingSpacingError",
    "ModelError",
    "__version__",
    "available_models",
    "evaluate",
    "load_model",
    "localize",
    "read_image",
    "read_landmarks",
    "train",
]
