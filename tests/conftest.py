"""Shared fixtures: small real studies on bundled data, seeded, each in its own SQLite file."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import sqlalchemy as sa
import torch

from selector import data, spec, storage

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


def bundled_folds(source: str, k: int = 3) -> list[data.FoldData]:
    """The prepared folds of a scikit-learn bundled data set, as a trial sees them."""
    s = spec.parse(
        {
            "name": "t",
            "metric": "accuracy",
            "data": {"source": f"sklearn:{source}"},
            "cv": {"folds": k},
        },
        origin="t",
    )
    return list(data.iter_folds(data.dev_set(data.prepare(s))))


@pytest.fixture(scope="module")
def iris_folds() -> list[data.FoldData]:
    return bundled_folds("iris")


@pytest.fixture(scope="module")
def wine_folds() -> list[data.FoldData]:
    return bundled_folds("wine")


@pytest.fixture
def small_spec() -> spec.StudySpec:
    return spec.parse(small_raw(), origin="small.toml")


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'selector.db'}"


PG_ADMIN = os.environ.get(
    "SELECTOR_TEST_POSTGRES", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
)


def _pg_available() -> bool:
    try:
        with sa.create_engine(PG_ADMIN).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
        return True
    except Exception:
        return False


@pytest.fixture
def pg_url() -> Iterator[str]:
    if not _pg_available():
        if os.environ.get("SELECTOR_REQUIRE_POSTGRES") == "1":
            pytest.fail(
                f"PostgreSQL required (SELECTOR_REQUIRE_POSTGRES=1) but {PG_ADMIN} is unreachable"
            )
        pytest.skip(f"no PostgreSQL server at {PG_ADMIN}")
    name = f"selector_test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(PG_ADMIN).set(database=name).render_as_string(hide_password=False)
    yield url
    storage.clear_caches()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
    admin.dispose()
