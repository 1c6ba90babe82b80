"""selector's own tables, beside Optuna's in the same database, and the one transaction helper."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from selector import storage
from selector.errors import StorageError

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
)


@contextmanager
def transaction(url: str) -> Iterator[sa.Connection]:
    """One transaction on selector's tables: commit on success, roll back on error; database
    errors become `StorageError` with the password masked. Creates the tables on first use."""
    eng = storage.engine(url)
    try:
        metadata.create_all(eng, checkfirst=True)
        with eng.begin() as conn:
            yield conn
    except sa.exc.IntegrityError:
        raise
    except sa.exc.OperationalError as e:
        first = str(e.orig).strip().splitlines()[0] if e.orig else str(e)
        raise StorageError(f"storage {storage.mask(url)}: {first}") from None
