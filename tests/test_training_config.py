"""Bad training configurations are refused early, with a TrainConfigError that names the
setting, instead of a traceback, a wasted run or a silently wrong model."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from fastlmk.networks import NetworkSpec
from fastlmk.train import TrainConfigError, load_training_config, train

pytestmark = pytest.mark.slow


def _config(dataset: Path, out: Path, iterations: int = 2) -> dict[str, Any]:
    from fastlmk.phantoms import phantom_training_config

    cfg = phantom_training_config(dataset, 2, iterations=iterations, output=out)
    cfg["train"].update(val_every=100, checkpoint_every=100, batch_size=2)
    return cfg


def _quiet(msg: str) -> None:
    pass


def _refused(cfg: dict[str, Any], match: str) -> list[str]:
    """Train ``cfg``, expect a TrainConfigError matching ``match``; the log lines."""
    lines: list[str] = []
    with pytest.raises(TrainConfigError, match=match):
        train(cfg, log=lines.append)
    return lines


# -- 1. landmark names ---------------------------------------------------------------


def test_configured_landmark_missing_from_the_files_is_refused(
    phantom_2d: Path, tmp_path: Path
) -> None:
    cfg = _config(phantom_2d, tmp_path / "m")
    cfg["landmarks"] = ["apex", "nosuch"]
    lines = _refused(cfg, r"\['nosuch'\] are not annotated.*'apex'")
    assert not any(line.startswith("prepared") for line in lines)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("apex", "expected a non-empty list"),
        ([], "expected a non-empty list"),
        (["apex", "apex"], r"\['apex'\] more than once"),
        (["apex", ""], "not landmark names"),
        (["apex", 5], "not landmark names"),
    ],
)
def test_landmarks_must_be_a_list_of_unique_names(
    phantom_2d: Path, tmp_path: Path, value: Any, match: str
) -> None:
    cfg = _config(phantom_2d, tmp_path / "m")
    cfg["landmarks"] = value
    _refused(cfg, match)


def test_empty_list_of_landmark_files_is_refused(phantom_2d: Path, tmp_path: Path) -> None:
    cfg = _config(phantom_2d, tmp_path / "m")
    cfg["data"]["landmarks"] = []
    _refused(cfg, r"\[data\] landmarks")


# -- 2. output ---------------------------------------------------------------------


@pytest.mark.parametrize("below", [False, True])
def test_output_that_is_a_file_is_refused_before_training(
    phantom_2d: Path, tmp_path: Path, below: bool
) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    cfg = _config(phantom_2d, afile / "sub" if below else afile)
    lines = _refused(cfg, "is a file" if not below else "below the file")
    assert not any(line.startswith("prepared") for line in lines)


# -- 3. divergence -------------------------------------------------------------------


def test_diverging_run_stops_at_the_first_non_finite_loss(phantom_2d: Path, tmp_path: Path) -> None:
    cfg = _config(phantom_2d, tmp_path / "m", iterations=4)
    cfg["train"].update(lr=1e30, checkpoint_every=1)
    _refused(cfg, r"diverged.*at iteration 2.*lower \[train\] lr.*checkpoint")
    state = json.loads((tmp_path / "m" / "checkpoint" / "state.json").read_text())
    assert state["iteration"] == 1  # the last good checkpoint stays
    assert not (tmp_path / "m" / "model.json").exists()


# -- 4. resume -----------------------------------------------------------------------


@pytest.fixture
def checkpointed(phantom_2d: Path, tmp_path: Path) -> dict[str, Any]:
    """The configuration of a finished 2-iteration run with its checkpoint on disk."""
    cfg = _config(phantom_2d, tmp_path / "m")
    train(cfg, log=_quiet)
    assert (tmp_path / "m" / "checkpoint" / "state.json").is_file()
    cfg["train"]["iterations"] = 3
    return cfg


def test_resume_with_other_landmarks_is_refused(checkpointed: dict[str, Any]) -> None:
    checkpointed["landmarks"] = ["small_blob", "bright_blob", "large_blob", "apex"]
    with pytest.raises(TrainConfigError, match=r"another model configuration.*landmarks"):
        train(checkpointed, resume=True, log=_quiet)


def test_resume_with_other_spacing_or_stages_is_refused(checkpointed: dict[str, Any]) -> None:
    checkpointed["local"]["spacing"] = [0.5, 0.5]
    with pytest.raises(TrainConfigError, match=r"local\.spacing"):
        train(checkpointed, resume=True, log=_quiet)
    del checkpointed["local"]
    with pytest.raises(TrainConfigError, match=r"another model configuration.*local"):
        train(checkpointed, resume=True, log=_quiet)


def test_resume_of_an_unrecorded_other_architecture_is_a_config_error(
    checkpointed: dict[str, Any],
) -> None:
    """Checkpoints written before the configuration was recorded: the load error."""
    state = Path(checkpointed["output"]) / "checkpoint" / "state.json"
    meta = json.loads(state.read_text())
    del meta["model_config"]
    state.write_text(json.dumps(meta))
    checkpointed["local"]["network"]["channels"] = [8, 24]
    with pytest.raises(TrainConfigError, match="does not fit this configuration"):
        train(checkpointed, resume=True, log=_quiet)


def test_resume_from_a_damaged_state_file_is_a_config_error(
    checkpointed: dict[str, Any],
) -> None:
    state = Path(checkpointed["output"]) / "checkpoint" / "state.json"
    state.write_text('{"iteration": 2, "hist')
    with pytest.raises(TrainConfigError, match=r"state\.json is unreadable or damaged"):
        train(checkpointed, resume=True, log=_quiet)


def test_resume_of_the_same_configuration_still_works(checkpointed: dict[str, Any]) -> None:
    lines: list[str] = []
    train(checkpointed, resume=True, log=lines.append)
    assert any("resumed from" in line and "iteration 2" in line for line in lines)


# -- 5. split ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-0.5, 1.0, 1.5, "abc", True, float("nan")])
def test_val_fraction_must_be_in_0_1(phantom_2d: Path, tmp_path: Path, value: Any) -> None:
    cfg = _config(phantom_2d, tmp_path / "m")
    del cfg["data"]["split"]
    cfg["data"]["val_fraction"] = value
    _refused(cfg, r"\[data\] val_fraction")


def test_missing_split_file_is_refused(phantom_2d: Path, tmp_path: Path) -> None:
    cfg = _config(phantom_2d, tmp_path / "m")
    cfg["data"]["split"] = str(tmp_path / "nosplit.csv")
    _refused(cfg, r"split file .*nosplit.csv cannot be read")


def test_split_file_without_image_and_split_columns_is_refused(
    phantom_2d: Path, tmp_path: Path
) -> None:
    (tmp_path / "split.csv").write_text("id,set\nphantom000,train\n")
    cfg = _config(phantom_2d, tmp_path / "m")
    cfg["data"]["split"] = str(tmp_path / "split.csv")
    _refused(cfg, r"columns \['id', 'set'\].*'image' and 'split'")


def test_split_ids_without_an_image_are_reported(phantom_2d: Path, tmp_path: Path) -> None:
    with (phantom_2d / "split.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    rows += [["ghost1", "train"], ["ghost2", "val"]]
    with (tmp_path / "split.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    cfg = _config(phantom_2d, tmp_path / "m")
    cfg["data"]["split"] = str(tmp_path / "split.csv")
    lines: list[str] = []
    train(cfg, log=lines.append)
    warning = [line for line in lines if "split file" in line]
    assert warning and "2 image id(s)" in warning[0] and "ghost1, ghost2" in warning[0]


# -- 6. value types and ranges -----------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("train", "iterations", "abc", r"\[train\] iterations"),
        ("train", "iterations", 2.7, r"\[train\] iterations = 2.7 .*integer"),
        ("train", "batch_size", "eight", r"\[train\] batch_size"),
        ("train", "threads", "x", r"\[train\] threads"),
        ("train", "lr", "fast", r"\[train\] lr"),
        ("train", "lr", -1.0, r"\[train\] lr"),
        ("train", "lr", float("nan"), r"\[train\] lr"),
        ("train", "lr", float("inf"), r"\[train\] lr"),
        ("train", "weight_decay", "x", r"\[train\] weight_decay"),
        ("train", "val_every", 0, r"\[train\] val_every"),
        ("train", "checkpoint_every", 0, r"\[train\] checkpoint_every"),
        ("train", "checkpoint_every", "3", r"\[train\] checkpoint_every"),
        ("train", "channels_last", "no", r"\[train\] channels_last .*true or false"),
        ("augment", "rotation_deg", "ten", r"\[augment\] rotation_deg"),
        ("augment", "scale", 1.0, r"\[augment\] scale"),
        ("local", "offset_sigma_mm", "x", r"\[local\] offset_sigma_mm"),
        ("local", "crop_size", 16, r"\[local\] crop_size .*list"),
        ("local", "crop_size", [0, 0], r"\[local\] crop_size entry"),
        ("local", "crop_size", [-16, -16], r"\[local\] crop_size entry"),
        ("global", "patch_size", [0, 0], r"\[global\] patch_size entry"),
        ("global", "patch_size", [-32, -32], r"\[global\] patch_size entry"),
        ("global", "patch_size", "32", r"\[global\] patch_size .*list"),
        ("global", "spacing", "abc", r"\[global\] spacing"),
        ("global", "spacing", [0.0, 1.0], r"\[global\] spacing"),
    ],
)
def test_wrong_value_types_and_ranges_are_config_errors(
    phantom_2d: Path, tmp_path: Path, section: str, key: str, value: Any, match: str
) -> None:
    cfg = _config(phantom_2d, tmp_path / "m")
    cfg[section][key] = value
    lines = _refused(cfg, match)
    assert not any(line.startswith("prepared") for line in lines)


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("global", "channels", 16, r"channels = 16 .*list"),
        ("global", "channels", [-16, 24, 32], r"channels entry"),
        ("local", "channels", [0, 16], r"channels entry"),
        ("global", "stem_kernel", 0, r"stem_kernel"),
        ("local", "channels", [8.5, 16], r"channels entry"),
    ],
)
def test_wrong_network_settings_are_config_errors(
    phantom_2d: Path, tmp_path: Path, section: str, key: str, value: Any, match: str
) -> None:
    cfg = _config(phantom_2d, tmp_path / "m")
    cfg[section]["network"][key] = value
    _refused(cfg, match)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"channels": (0, 16), "blocks": (1, 1), "pools": 1}, "channels"),
        ({"channels": (16, -1), "blocks": (1, 1), "pools": 1}, "channels"),
        ({"stem_kernel": 0}, "stem_kernel"),
        ({"blocks": (1, -1, 1, 1)}, "blocks"),
        ({"head_channels": -1}, "head_channels"),
    ],
)
def test_network_spec_refuses_non_positive_sizes(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NetworkSpec(**fields)


@pytest.mark.parametrize("section", ["train", "augment", "intensity", "data"])
def test_section_that_is_not_a_table_is_refused(
    phantom_2d: Path, tmp_path: Path, section: str
) -> None:
    cfg = _config(phantom_2d, tmp_path / "m")
    cfg[section] = "x"
    _refused(cfg, rf"\[{section}\] must be a table")


def test_toml_with_a_scalar_landmark_file_list_entry_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[data]\nimages = "i"\nlandmarks = 5\n')
    with pytest.raises(TrainConfigError, match=r"\[data\] landmarks = 5"):
        load_training_config(path)


# -- 7. global_from --------------------------------------------------------------------


def test_global_from_keeps_a_bundled_model_name(tmp_path: Path) -> None:
    from fastlmk.model import available_models

    name = available_models()[0]
    path = tmp_path / "c.toml"
    path.write_text(f'[train]\nglobal_from = "{name}"\n')
    assert load_training_config(path)["train"]["global_from"] == name
    path.write_text('[train]\nglobal_from = "runs/other"\n')
    assert load_training_config(path)["train"]["global_from"] == str(tmp_path / "runs/other")


def test_global_from_a_model_of_another_orientation_is_refused(
    phantom_2d: Path, tmp_path: Path
) -> None:
    source = train(_config(phantom_2d, tmp_path / "src"), log=_quiet)
    cfg = _config(phantom_2d, tmp_path / "m")
    cfg["train"]["global_from"] = str(source)
    cfg["orientation"] = "RAS"
    _refused(cfg, r"global_from: .* trained on LPS oriented images.*'RAS'")
