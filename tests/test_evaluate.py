from __future__ import annotations

import numpy as np
import pytest

from fastlmk.evaluate import evaluate, format_report, mean_table, systematic_offset


def test_metrics_on_known_errors() -> None:
    ref = {
        "a": {"p": np.array([0.0, 0.0]), "q": np.array([10.0, 0.0])},
        "b": {"p": np.array([0.0, 0.0]), "q": np.array([0.0, 0.0])},
    }
    pred = {
        "a": {"p": np.array([1.0, 0.0]), "q": np.array([10.0, 3.0])},
        "b": {"p": np.array([0.0, 2.5]), "q": np.array([np.nan, np.nan])},
    }
    m = evaluate(pred, {"r": ref})["references"]["r"]
    assert m["n"] == 4 and m["missed"] == 1
    assert m["mre_mm"] == pytest.approx((1 + 3 + 2.5) / 3)
    assert m["median_mm"] == pytest.approx(2.5)
    assert m["sdr_percent"] == {"2": 25.0, "2.5": 50.0, "3": 75.0, "4": 75.0}
    assert m["per_landmark"]["p"]["mre_mm"] == pytest.approx(1.75)
    assert m["per_landmark"]["q"]["missed"] == 1
    assert "ALL" in format_report(evaluate(pred, {"r": ref}))


def test_several_references_and_their_mean() -> None:
    r1 = {"a": {"p": np.array([0.0, 0.0, 0.0])}}
    r2 = {"a": {"p": np.array([2.0, 0.0, 0.0])}}
    pred = {"a": {"p": np.array([1.0, 0.0, 0.0])}}
    out = evaluate(pred, {"senior": r1, "junior": r2})["references"]
    assert out["senior"]["mre_mm"] == pytest.approx(1.0)
    assert out["mean"]["mre_mm"] == pytest.approx(0.0)
    np.testing.assert_allclose(mean_table([r1, r2])["a"]["p"], [1.0, 0.0, 0.0])


def test_no_common_images_is_an_error() -> None:
    with pytest.raises(ValueError, match="no image"):
        evaluate({"x": {}}, {"r": {"y": {"p": np.zeros(2)}}})


def test_systematic_offset_separates_a_constant_shift_from_scatter() -> None:
    ref = {
        "a": {"p": np.array([0.0, 0.0])},
        "b": {"p": np.array([5.0, 5.0])},
        "c": {"p": np.array([1.0, 1.0])},
    }
    # Offsets (1, 1) and (1, -1): mean (1, 0), mean squared error 2 -> half of it is
    # the constant shift. Image c has no finite prediction and is left out.
    pred = {
        "a": {"p": np.array([1.0, 1.0])},
        "b": {"p": np.array([6.0, 4.0])},
        "c": {"p": np.array([np.nan, 0.0])},
    }
    s = systematic_offset(pred, ref, "p")
    np.testing.assert_allclose(s["offset_mm"], [1.0, 0.0])
    assert s["offset_norm_mm"] == pytest.approx(1.0)
    assert s["offset_share"] == pytest.approx(0.5)
    assert s["n"] == 2
    per = evaluate(pred, {"r": ref})["references"]["r"]["per_landmark"]["p"]
    assert per["systematic"]["offset_share"] == pytest.approx(0.5)
    # Pure scatter around the reference has no systematic part; no pairs gives NaN.
    sym = {"a": {"p": np.array([1.0, 0.0])}, "b": {"p": np.array([4.0, 5.0])}}
    assert systematic_offset(sym, ref, "p")["offset_share"] == pytest.approx(0.0)
    assert np.isnan(systematic_offset({}, ref, "p")["offset_norm_mm"])
