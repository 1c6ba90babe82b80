"""selector's own tables, beside Optuna's in the same database, and the one transaction helper."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa

from selector import storage
from selector.errors import ConnectionLost, StorageError

metadata = sa.MetaData()

studies = sa.Table(
    "selector_studies",
    metadata,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("spec_hash", sa.String(64), nullable=False),
    sa.Column("base_dir", sa.Text, nullable=False),
    sa.Column("data_fp", sa.String(64), nullable=False),
    sa.Column("split_fp", sa.String(64), nullable=False),
    sa.Column("folds_fp", sa.String(64), nullable=False),
    sa.Column("n_trials", sa.Integer, nullable=False),
    sa.Column("versions_json", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)

# One row per study, inserted before any test row is read: the primary key is the lockbox.
final = sa.Table(
    "selector_final",
    metadata,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),  # claimed | finished
    sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("claimed_by", sa.String(256), nullable=False),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("resumed_at", sa.DateTime(timezone=True)),  # set by `final --resume-crashed`
    sa.Column("rule", sa.String(16), nullable=False),
    sa.Column("trial_number", sa.Integer, nullable=False),
    sa.Column("metric", sa.String(64), nullable=False),
    sa.Column("cv_score", sa.Float),
    sa.Column("test_score", sa.Float),
    sa.Column("test_rows", sa.Integer),
    sa.Column("artifact", sa.Text),
)


# Every worker that joins a study gets an id here: it seeds the worker's sampler.
workers = sa.Table(
    "selector_workers",
    metadata,
    sa.Column("worker_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_name", sa.String(512), nullable=False),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("heartbeat_s", sa.Integer),  # the heartbeat and grace the worker runs with
    sa.Column("grace_s", sa.Integer),
)

# The study's choice of trial (rule and trial), recorded by `export` and `final` when they make
# it: what `final` evaluates, and what the report, `predict` and later exports show.
choice = sa.Table(
    "selector_choice",
    metadata,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("rule", sa.String(16), nullable=False),
    sa.Column("trial_number", sa.Integer, nullable=False),
    sa.Column("chosen_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("chosen_by", sa.String(32), nullable=False),  # export | final
)

# Out-of-fold predictions of complete trials (`record.pack_oof`): what the bootstrap
# bias-corrected estimate of the chosen trial's test score resamples.
oof = sa.Table(
    "selector_oof",
    metadata,
    sa.Column("study_name", sa.String(512), primary_key=True),
    sa.Column("trial_number", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(16), nullable=False),  # labels | proba | values
    sa.Column("data", sa.LargeBinary, nullable=False),
)


def _missing_table(e: sa.exc.DBAPIError) -> bool:
    text = str(e.orig).lower()
    return "no such table" in text or ("relation" in text and "does not exist" in text)


def read_all(url: str, stmt: sa.Select[Any]) -> list[sa.Row[Any]]:
    """Rows of a query on selector's tables, for read-only commands: creates nothing, and a
    table that does not exist yet (a storage with no selector study) reads as empty."""
    try:
        with storage.engine(url).connect() as conn:
            return list(conn.execute(stmt))
    except (sa.exc.OperationalError, sa.exc.ProgrammingError) as e:
        if _missing_table(e):
            return []
        raise _storage_error(url, e, transient=storage.dropped(e)) from e  # a worker retries


def _storage_error(url: str, e: sa.exc.DBAPIError, *, transient: bool) -> StorageError:
    """The user's one line for a failed statement on selector's tables, the password masked;
    `ConnectionLost` (retried by `storage.retrying`) where a retry may get past it."""
    first = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
    return (ConnectionLost if transient else StorageError)(f"storage {storage.mask(url)}: {first}")


def read_one(url: str, stmt: sa.Select[Any]) -> sa.Row[Any] | None:
    rows = read_all(url, stmt)
    return rows[0] if rows else None


@functools.cache
def _create_tables(eng: sa.Engine) -> None:
    """selector's tables, created once per engine (a process's first transaction on a URL): the
    check costs a query per table, and trials write through `transaction` as they end."""
    metadata.create_all(eng, checkfirst=True)


@contextmanager
def transaction(url: str) -> Iterator[sa.Connection]:
    """One transaction on selector's tables: commit on success, roll back on error; database
    errors become `StorageError` with the password masked. Creates the tables on first use."""
    eng = storage.engine(url)
    try:
        _create_tables(eng)
        with eng.begin() as conn:
            yield conn
    except sa.exc.IntegrityError:
        raise
    except sa.exc.OperationalError as e:
        # transient, as `storage.retrying` sees a raw OperationalError (a worker's writes)
        raise _storage_error(url, e, transient=True) from e
