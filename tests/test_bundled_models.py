"""Models shipped inside the package load by name and work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import fastlmk
from conftest import shared_data
from fastlmk.evaluate import mean_table
from fastlmk.landmark_files import read_landmark_csv


def test_ceph_model_is_bundled_and_valid() -> None:
    assert "ceph-isbi2015" in fastlmk.available_models()
    model = fastlmk.load_model("ceph-isbi2015")
    assert model.dim == 2 and len(model.names) == 19 and model.names[0] == "sella"
    assert model.config.local_stage is not None
    # Two local networks on the same crops at 0.25 mm, votes pooled, and a second local
    # stage at 0.4 mm (see the README).
    assert len(model.config.local_stage.network.members) == 2  # type: ignore[union-attr]
    assert model.config.local_stage.spacing == (0.25, 0.25)
    assert [(s.spacing, s.network_count) for s in model.config.extra_local_stages] == [
        ((0.4, 0.4), 1)
    ]
    files = list(Path(str(model.path)).iterdir())
    assert sum(f.stat().st_size for f in files) <= 30e6
    assert not [f for f in files if f.suffix in (".pt", ".pth", ".pkl", ".bin")]


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_ceph_model_on_a_test1_cephalogram(backend: str) -> None:
    data = shared_data() / "isbi2015"
    if not (data / "images" / "151.jpg").is_file():
        pytest.skip(f"ISBI 2015 data not found at {data}")
    lm = fastlmk.localize(
        data / "images" / "151.jpg", "ceph-isbi2015", spacing=0.1, backend=backend
    )
    truth = mean_table(
        [
            read_landmark_csv(data / "landmarks_senior.csv"),
            read_landmark_csv(data / "landmarks_junior.csv"),
        ]
    )["151"]
    err = np.array([np.linalg.norm(lm[n] - truth[n]) for n in lm.names])
    # test1 MRE of this model is 1.07 mm; one image's mean stays well below 2.5 mm
    assert err.mean() < 2.5, err.round(2)
    assert not lm.flagged.all()


def test_ceph_model_ships_int8_networks() -> None:
    """The CPU default runs every network in int8 (the local ones quantized one graph per
    landmark; two local stages, at 0.25 and 0.4 mm); on a test1 image the int8 points
    stay close to the float32 ones."""
    pytest.importorskip("onnxruntime")
    from fastlmk.backends import get_backend

    model = fastlmk.load_model("ceph-isbi2015")
    assert get_backend(model, "onnxruntime").precision == {  # type: ignore[attr-defined]
        "global": "int8",
        "local": "int8",
        "local2": "int8",
    }
    data = shared_data() / "isbi2015" / "images" / "151.jpg"
    if not data.is_file():
        pytest.skip(f"ISBI 2015 data not found at {data}")
    image = fastlmk.read_image(data, spacing=0.1)
    a = fastlmk.localize(image, model, backend="onnxruntime")
    b = fastlmk.localize(image, model, backend="onnxruntime-fp32")
    moved = np.linalg.norm(a.points_mm - b.points_mm, axis=1)
    # Points move by a fraction of a 0.25 mm local pixel, none by a whole millimetre.
    assert moved.mean() < 0.15 and moved.max() < 1.0, moved.round(3)
