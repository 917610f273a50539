from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image

from fastlmk import load_model, localize
from fastlmk.overlay import write_overlay


def test_3d_overlay_has_a_row_of_three_views_per_landmark(
    model_3d: Path, phantom_3d: Path, tmp_path: Path
) -> None:
    image = sitk.ReadImage(str(phantom_3d / "images" / "phantom050.mha"))
    lm = localize(image, load_model(model_3d))
    png = Image.open(write_overlay(image, lm, tmp_path / "o.png"))
    assert png.height == 160 * len(lm) and png.width == 3 * 160 + 150
    # a green marker is drawn in every row
    pixels = np.asarray(png)
    for row in range(len(lm)):
        band = pixels[row * 160 : (row + 1) * 160, 150:]
        assert ((band[..., 1] > 200) & (band[..., 0] < 100)).any()


def test_2d_overlay_marks_landmarks_at_their_pixels(
    model_2d: Path, phantom_2d: Path, tmp_path: Path
) -> None:
    image = sitk.ReadImage(str(phantom_2d / "images" / "phantom060.mha"))
    lm = localize(image, load_model(model_2d))
    png = np.asarray(Image.open(write_overlay(image, lm, tmp_path / "o.png")))
    scale = png.shape[1] / image.GetSize()[0]
    for idx in lm.index:
        x, y = (round(float(v + 0.5) * scale - 0.5) for v in idx)
        window = png[max(y - 8, 0) : y + 9, max(x - 8, 0) : x + 9]
        assert ((window[..., 1] > 200) & (window[..., 0] < 100)).any()
