from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fastlmk.errors import EvaluationError, FastlmkError
from fastlmk.evaluate import (
    evaluate,
    format_report,
    mean_table,
    reference_names,
    result_to_json,
    systematic_offset,
)


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


def test_no_common_images_is_a_fastlmk_error_listing_ids() -> None:
    p = np.zeros(2)
    pred = {"0155": {"p": p}, "0156": {"p": p}}
    ref = {"155": {"p": p}, "156": {"p": p}}
    with pytest.raises(EvaluationError, match="no image id") as info:
        evaluate(pred, {"senior": ref})
    # Caught by the CLI (FastlmkError) and by `except ValueError` code alike.
    assert isinstance(info.value, FastlmkError) and isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "'0155', '0156'" in msg and "'155', '156'" in msg and "'senior'" in msg
    with pytest.raises(EvaluationError, match="at least one reference"):
        evaluate(pred, {})


def test_one_image_each_is_paired_despite_different_ids() -> None:
    # A one-image annotation file is keyed by its file name ("groundtruth"), the
    # prediction by the image's name: with one image on each side they belong together.
    pred = {"tpl-T1w": {"p": np.array([1.0, 0.0, 0.0])}}
    refs = {
        "groundtruth": {"groundtruth": {"p": np.zeros(3)}},
        "rater01": {"rater01": {"p": np.array([3.0, 0.0, 0.0])}},
    }
    out = evaluate(pred, refs, pair_single_image=True)["references"]
    assert out["groundtruth"]["mre_mm"] == pytest.approx(1.0)
    assert out["groundtruth"]["paired_images"] == {"groundtruth": "tpl-T1w"}
    assert out["rater01"]["per_image"] == {"tpl-T1w": pytest.approx(2.0)}
    assert out["mean"]["mre_mm"] == pytest.approx(0.5)
    # Matching ids are not a pairing; with pairing off, different ids are an error.
    same = evaluate(pred, {"r": {"tpl-T1w": {"p": np.zeros(3)}}}, pair_single_image=True)
    assert same["references"]["r"]["paired_images"] == {}
    # By default ids must match: ids written in a CSV name their image.
    with pytest.raises(EvaluationError, match="'groundtruth'"):
        evaluate(pred, {"g": refs["groundtruth"]})


def test_2d_against_3d_names_image_landmark_and_dimensionalities() -> None:
    ref = {"155": {"sella": np.array([1.0, 2.0]), "nasion": np.array([3.0, 4.0])}}
    pred = {"155": {"sella": np.array([1.0, 2.0, 5.0]), "nasion": np.array([3.0, 4.0, 5.0])}}
    with pytest.raises(EvaluationError) as info:
        evaluate(pred, {"r": ref})
    msg = str(info.value)
    assert "'155'" in msg and "'sella'" in msg and "3D" in msg and "2D" in msg
    with pytest.raises(EvaluationError, match="prediction is 2D and the reference 3D"):
        evaluate(ref, {"r": pred})
    with pytest.raises(EvaluationError, match="'nasion'"):
        systematic_offset(pred, ref, "nasion")


def test_result_to_json_is_strict_and_the_result_keeps_inf_and_nan() -> None:
    ref = {"a": {"p": np.zeros(2), "q": np.zeros(2)}}
    pred = {"a": {"p": np.array([1.0, 0.0])}}  # q is missed
    result = evaluate(pred, {"r": ref})
    m = result["references"]["r"]
    # In memory, unchanged: a missed point's image mean is inf, its statistics NaN.
    assert m["per_image"]["a"] == np.inf and np.isnan(m["per_landmark"]["q"]["mre_mm"])

    def reject(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant}")

    back = json.loads(result_to_json(result), parse_constant=reject)
    r = back["references"]["r"]
    assert r["per_image"] == {"a": None}
    assert r["per_landmark"]["q"]["mre_mm"] is None
    assert r["per_landmark"]["q"]["systematic"]["offset_norm_mm"] is None
    assert r["per_landmark"]["p"]["mre_mm"] == pytest.approx(1.0)
    assert r["missed"] == 1 and r["sdr_percent"]["2"] == pytest.approx(50.0)


def test_unmatched_landmark_names_are_reported_and_metrics_unchanged() -> None:
    ref = {"a": {"sella": np.zeros(2), "nasion": np.zeros(2)}}
    pred = {
        "a": {"Sella": np.zeros(2), "nasion": np.array([1.0, 0.0]), "foo": np.zeros(2)},
        "b": {"bar": np.zeros(2)},  # not in the reference: its names are not counted
    }
    m = evaluate(pred, {"r": ref})["references"]["r"]
    assert m["unmatched_landmarks"] == {
        "only_in_predictions": ["Sella", "foo"],
        "only_in_reference": ["sella"],
    }
    assert m["n"] == 2 and m["missed"] == 1 and m["mre_mm"] == pytest.approx(1.0)
    clean = evaluate(ref, {"r": ref})["references"]["r"]["unmatched_landmarks"]
    assert clean == {"only_in_predictions": [], "only_in_reference": []}


def test_reference_names_never_collide(tmp_path: Path) -> None:
    assert reference_names(["a/senior.csv", "b/junior.csv", "c/rater01.mrk.json"]) == [
        "senior",
        "junior",
        "rater01",
    ]
    assert reference_names(["r1/ref.csv", "r2/ref.csv", "other.csv"]) == [
        "r1/ref",
        "r2/ref",
        "other",
    ]
    # The same file twice, and "mean" (the key of the references' mean).
    assert reference_names(["r1/ref.csv", "r1/ref.csv"]) == ["r1/ref", "r1/ref (2)"]
    assert reference_names(["x/mean.csv", "y/b.csv"]) == ["x/mean", "b"]
    assert reference_names(["mean.csv"]) == ["mean"]
    names = reference_names([tmp_path / "mean.csv", tmp_path / "mean.csv", "b.csv"])
    assert len(set(names)) == 3 and "mean" not in names


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


def test_mean_table_keeps_what_any_annotator_has() -> None:
    a = {"1": {"p": np.array([0.0, 0.0])}}
    b = {"1": {"p": np.array([2.0, 0.0]), "q": np.array([5.0, 5.0])}, "2": {"p": np.ones(2)}}
    m = mean_table([a, b])
    np.testing.assert_allclose(m["1"]["p"], [1.0, 0.0])
    np.testing.assert_allclose(m["1"]["q"], [5.0, 5.0])  # only b has it
    np.testing.assert_allclose(m["2"]["p"], [1.0, 1.0])  # only b has image 2
    with pytest.raises(EvaluationError, match="dimensionality"):
        mean_table([a, {"1": {"p": np.zeros(3)}}])
