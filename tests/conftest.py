"""Shared fixtures: small real studies on bundled data, seeded, each in its own SQLite file."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import torch

from selector import spec

ROOT = Path(__file__).resolve().parents[1]
PENGUINS = ROOT / "data" / "penguins.csv"


# Tiny networks: one intra-op thread is fastest, and immune to a loaded machine.
torch.set_num_threads(1)
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    optuna.logging.set_verbosity(optuna.logging.ERROR)


@pytest.fixture(autouse=True)
def _no_env_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SELECTOR_STORAGE", raising=False)


def small_raw(**overrides: Any) -> dict[str, Any]:
    """A fast iris study: 3 folds, a few epochs, a small space."""
    raw: dict[str, Any] = {
        "name": "iris-small",
        "metric": "accuracy",
        "n_trials": 3,
        "seed": 0,
        "data": {"source": "sklearn:iris", "test_size": 0.2},
        "cv": {"folds": 3},
        "training": {"max_epochs": 6, "patience": 3, "device": "cpu"},
        "search": {"sampler": "random", "pruner": "none"},
        "space": {
            "depth": {"low": 1, "high": 2},
            "width": [8, 16],
            "optimizer": ["adam", "momentum"],
            "lr": {"low": 1e-3, "high": 3e-2, "log": True},
            "batch_size": 32,
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return raw


def write_study(path: Path, raw: dict[str, Any]) -> Path:
    import tomli_w

    path.write_text(tomli_w.dumps(raw))
    return path


@pytest.fixture
def small_spec() -> spec.StudySpec:
    return spec.parse(small_raw(), origin="small.toml")


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'selector.db'}"
