"""Shared fixtures: real data location, small phantom data sets and trained models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def shared_data() -> Path:
    """``../shared/data`` beside the repository (override: FASTLMK_SHARED_DATA)."""
    env = os.environ.get("FASTLMK_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def phantom_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastlmk.phantoms import write_phantom_dataset

    return write_phantom_dataset(
        tmp_path_factory.mktemp("ph2"), 2, n_train=48, n_val=4, n_test=12, seed=3
    )


@pytest.fixture(scope="session")
def phantom_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastlmk.phantoms import write_phantom_dataset

    return write_phantom_dataset(
        tmp_path_factory.mktemp("ph3"), 3, n_train=40, n_val=4, n_test=10, seed=4
    )


@pytest.fixture(scope="session")
def model_2d(phantom_2d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastlmk.phantoms import phantom_training_config
    from fastlmk.train import train

    cfg = phantom_training_config(
        phantom_2d, 2, iterations=300, output=tmp_path_factory.mktemp("m2") / "model"
    )
    return train(cfg, log=lambda m: None)


@pytest.fixture(scope="session")
def model_3d(phantom_3d: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fastlmk.phantoms import phantom_training_config
    from fastlmk.train import train

    cfg = phantom_training_config(
        phantom_3d, 3, iterations=250, output=tmp_path_factory.mktemp("m3") / "model"
    )
    return train(cfg, log=lambda m: None)
