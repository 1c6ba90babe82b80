"""Storage URLs, SQLite settings, and the same study on a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest

from selector import final, spec, storage, study
from tests.conftest import small_raw


def test_resolution_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    assert storage.resolve_url() == f"sqlite:///{tmp_path / 'selector.db'}"
    assert storage.resolve_url(None, "sqlite:///from_file.db").endswith("/from_file.db")
    monkeypatch.setenv("SELECTOR_STORAGE", "sqlite:///env.db")
    assert storage.resolve_url(None, "sqlite:///from_file.db").endswith("/env.db")
    assert storage.resolve_url("sqlite:///cli.db", "sqlite:///f.db").endswith("/cli.db")


def test_password_is_masked() -> None:
    masked = storage.mask("postgresql://user:s3cret@db.example:5432/x")
    assert "s3cret" not in masked and "user" in masked


def test_sqlite_runs_in_wal_mode(url: str, tmp_path: Path) -> None:
    study.create_or_resume(spec.parse(small_raw(), origin="t.toml"), url)
    with sqlite3.connect(tmp_path / "selector.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.postgres
def test_a_study_runs_and_is_evaluated_on_postgresql(pg_url: str) -> None:
    s = spec.parse(small_raw(n_trials=2), origin="t.toml")
    assert study.run(s, pg_url).finished == 2
    assert len(optuna.load_study(study_name="iris-small", storage=pg_url).trials) == 2
    result = final.evaluate(pg_url, "iris-small")
    assert result.state == "finished"
    with pytest.raises(final.LockboxError):
        final.evaluate(pg_url, "iris-small")
