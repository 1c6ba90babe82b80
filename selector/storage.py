"""Storage URL → Optuna storage, with the checks that turn a bad URL into one clear line.

Resolution: `--storage` > `$SELECTOR_STORAGE` > the study file's `storage` > `sqlite:///selector.db`.
SQLite files are made absolute, run in WAL mode with a generous busy timeout.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import errno
import functools
import importlib.util
import json
import os
import sqlite3
import stat
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import optuna
import sqlalchemy as sa
from sqlalchemy.engine import URL, make_url

from selector import redact
from selector.errors import ConnectionLost, StorageError

DEFAULT_URL = "sqlite:///selector.db"
SQLITE_TIMEOUT_S = 60
SCHEMES = ("sqlite", "postgresql", "grpc")
# The SQLite files this process opened, in order (a dict as an ordered set): what `retrying`
# names when a full disk reaches it from an engine it did not open.
_SQLITE_FILES: dict[Path, None] = {}


@dataclass(frozen=True)
class Heartbeat:
    """Seconds between a running trial's heartbeats, and the silence after which it is stale
    (failed, then retried once with the same params). The grace period must be far above the
    longest epoch; the heartbeat comes from its own thread."""

    interval: int = 10
    grace: int = 120


def resolve_url(cli: str | None = None, spec_storage: str | None = None) -> str:
    """The storage URL to use. An empty `--storage` (an unset shell variable, most often) is
    refused rather than read as "not given", which would send the study to the default file."""
    if cli is not None and not cli.strip():
        raise StorageError(
            "--storage is empty (an unset shell variable?); give a database URL such as "
            "sqlite:///path/to/file.db, or leave the option out"
        )
    url = cli or os.environ.get("SELECTOR_STORAGE") or spec_storage or DEFAULT_URL
    return _absolute(url)


def mask(url: str) -> str:
    """The URL with every secret it carries hidden (the userinfo password, `?password=`,
    `sslpassword`, `token`, `api_key`, ... in any case), also where it does not parse: for
    every message, output and record (`selector.redact`)."""
    return redact.mask_url(url)


def scrub(text: str, url: str) -> str:
    """A driver's message about `url`, with the secrets of `url` hidden wherever it echoes them."""
    return redact.scrub(text, url)


def _parse(url: str) -> URL:
    try:
        return make_url(url)
    except Exception:
        shown = mask(url)  # its secrets hidden, though it cannot be parsed
        raise StorageError(
            f"storage URL {shown!r} is not a URL; use sqlite:///path/to/file.db or "
            "postgresql://user@host:5432/dbname"
        ) from None


def _absolute(url: str) -> str:
    u = _parse(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        return u.set(database=str(Path(u.database).expanduser().resolve())).render_as_string(
            hide_password=False
        )
    return url


def _with_driver(url: str) -> str:
    """The URL to connect with: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, while the
    [postgres] extra installs psycopg2; use psycopg2 when it is the one installed."""
    u = _parse(url)
    if u.drivername == "postgresql" and not _installed("psycopg") and _installed("psycopg2"):
        return u.set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
    return url


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def sqlite_path(url: str) -> Path | None:
    u = _parse(url)
    if u.get_backend_name() != "sqlite" or not u.database or u.database == ":memory:":
        return None
    return Path(u.database)


def check(url: str, *, must_exist: bool) -> None:
    """Fail with a clear message unless `url` names a reachable database (an existing one if
    `must_exist`). Never creates anything."""
    u = _parse(url)
    backend = u.get_backend_name()
    if backend not in SCHEMES:
        raise StorageError(
            f"storage {mask(url)}: unknown scheme {backend!r}; use sqlite:///path.db or "
            "postgresql://user@host:5432/dbname"
        )
    path = sqlite_path(url)
    if backend == "sqlite" and path is None:
        raise StorageError(
            f"storage {mask(url)}: names no database file (an in-memory database is lost when "
            "the command ends); use sqlite:///path/to/file.db"
        )
    if path is not None:
        _check_sqlite(path, must_exist=must_exist)
        _watch_sqlite(engine(url), path)
    elif backend == "postgresql":
        _check_server(url)
    elif backend == "grpc":
        _check_grpc(url)


def _check_sqlite(path: Path, *, must_exist: bool) -> None:
    if must_exist and not path.exists():
        raise StorageError(
            f"storage sqlite:///{path}: no such database; run the study first (`selector run "
            "STUDY_FILE`, or `Study.run()` in Python), or name the storage it ran in"
        )
    if path.is_dir():
        raise StorageError(f"storage sqlite:///{path}: is a directory; name a database file")
    if path.exists():
        _check_sqlite_file(path)
    parent = path.parent
    if not parent.is_dir():
        raise StorageError(f"storage sqlite:///{path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise StorageError(
            f"storage sqlite:///{path}: not writable; choose a writable directory with --storage"
        )


def _check_sqlite_file(path: Path) -> None:
    """An existing database file must be a regular, readable file that starts as SQLite files
    do (an empty one becomes a new database). Pages garbled further in are caught when read
    (`_sqlite_failed`)."""
    if not stat.S_ISREG(path.stat().st_mode):
        raise StorageError(
            f"storage sqlite:///{path}: not a regular file (a pipe or device); name a database file"
        )
    if not os.access(path, os.R_OK):
        raise StorageError(
            f"storage sqlite:///{path}: not readable; check the file's permissions, or choose "
            "another file with --storage"
        )
    if path.stat().st_size and _not_sqlite(path):
        raise _sqlite_error(path, "corrupt")


def _not_sqlite(path: Path) -> bool:
    """Whether SQLite refuses the file as a database ("file is not a database").

    Read through SQLite, never with a plain `open()`: closing any descriptor of a database
    file drops every POSIX lock this process holds on it, SQLite's connections' included. A
    worker that checked its database that way lost its shared lock; another process's last
    connection then took the file for its own, checkpointed and deleted the WAL, and the
    worker's later commits (a terminated trial's FAIL) went to the deleted file."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            conn.execute("PRAGMA schema_version").fetchone()
    except sqlite3.DatabaseError as e:
        return "not a database" in str(e).lower() or "malformed" in str(e).lower()
    except sqlite3.Error:
        return False
    return False


def _sqlite_failure(
    e: BaseException, path: Path | None = None
) -> Literal["full", "corrupt"] | None:
    """Whether a chain of exceptions (Optuna's, SQLAlchemy's, sqlite3's) ends in a full disk
    or a damaged database file. Only sqlite3's and the OS's own errors are read, never the
    statement or parameters a message may quote. SQLite reports a full disk as an I/O error
    where its shared-memory file cannot grow: that counts as full where `path`'s disk is."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            return "full"
        if isinstance(x, sqlite3.Error):
            text = str(x).lower()
            if "database or disk is full" in text:
                return "full"
            if "malformed" in text or "not a database" in text:
                return "corrupt"
            if "disk i/o error" in text and path is not None and _no_space(path):
                return "full"
        todo += [x.__cause__, x.__context__, getattr(x, "orig", None)]
    return None


def _no_space(path: Path) -> bool:
    try:
        return os.statvfs(path.parent).f_bavail == 0
    except OSError:
        return False


def _damaged(path: Path) -> Literal["corrupt"] | None:
    """SQLite's own check of every page, for when a file failed to open for another stated
    reason (garbled pages can read back as nonsense, e.g. an impossible schema version)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            ok = conn.execute("PRAGMA quick_check(1)").fetchone() == ("ok",)
    except sqlite3.Error:
        ok = False
    return None if ok else "corrupt"


def _sqlite_error(path: Path | None, kind: Literal["full", "corrupt"]) -> StorageError:
    where = f"storage sqlite:///{path}" if path is not None else "the SQLite database"
    if kind == "full":
        return StorageError(
            f"{where}: the disk is full (database or disk is full); free space on it and run "
            "again (finished trials are kept)"
        )
    return StorageError(
        f"{where}: the file is not a SQLite database or is corrupt; restore it from a backup, "
        "or give another file with --storage"
    )


def _sqlite_failed(ctx: Any) -> None:
    """SQLAlchemy's `handle_error` hook on SQLite engines: a full disk or a corrupt file becomes
    one `StorageError` naming the file, wherever the failing statement came from (Optuna's own
    calls included), instead of a retried "transient" error and a traceback."""
    database = ctx.engine.url.database if ctx.engine is not None else None
    path = Path(database) if database else None
    kind = _sqlite_failure(ctx.original_exception, path)
    if kind is not None:
        raise _sqlite_error(path, kind) from None


def _watch_sqlite(eng: sa.Engine, path: Path) -> None:
    """Hook `_sqlite_failed` into `eng` (once), and remember `path` for `retrying`."""
    if not sa.event.contains(eng, "handle_error", _sqlite_failed):
        sa.event.listen(eng, "handle_error", _sqlite_failed)
    _SQLITE_FILES[path] = None


def _check_server(url: str) -> None:
    try:
        with engine(url).connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except ModuleNotFoundError as e:
        raise StorageError(
            f"storage {mask(url)}: driver {e.name!r} is not installed; "
            "pip install 'selector[postgres]'"
        ) from None
    except sa.exc.SQLAlchemyError as e:
        first = scrub(str(getattr(e, "orig", e)).strip().splitlines()[0], url)
        if dropped(e):  # connected, then lost: `retrying` retries
            raise ConnectionLost(f"storage {mask(url)}: connection lost ({first})") from e
        raise StorageError(f"storage {mask(url)}: cannot connect ({first})") from None


def _heartbeat_kwargs(heartbeat: Heartbeat | None) -> dict[str, Any]:
    if heartbeat is None:
        return {}
    return {
        "heartbeat_interval": heartbeat.interval,
        "grace_period": heartbeat.grace,
        "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
            max_retry=1
        ),
    }


def _engine_kwargs(url: str) -> dict[str, Any]:
    if sqlite_path(url) is not None:
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    return {"pool_pre_ping": True, "pool_size": 1, "max_overflow": 2, "pool_recycle": 300}


@functools.cache
def engine(url: str) -> sa.Engine:
    """One SQLAlchemy engine per URL for selector's own tables."""
    eng = sa.create_engine(_with_driver(url), **_engine_kwargs(url))
    if sqlite_path(url) is not None:
        sa.event.listen(eng, "connect", _sqlite_pragmas)
    return eng


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_TIMEOUT_S * 1000}")
    # In WAL mode, NORMAL syncs at checkpoints, not at every commit: a crashed process loses
    # nothing, a power cut at most the last commits; each trial's many small writes get cheap.
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def is_postgres(url: str) -> bool:
    return _parse(url).get_backend_name() == "postgresql"


def is_grpc(url: str) -> bool:
    return _parse(url).get_backend_name() == "grpc"


def _grpc_proxy(url: str) -> optuna.storages.BaseStorage:
    u = _parse(url)
    if not u.host or not u.port:
        raise StorageError(f"storage {mask(url)}: a gRPC proxy URL is grpc://host:port")
    try:
        return optuna.storages.GrpcStorageProxy(host=u.host, port=u.port)
    except ImportError:
        raise StorageError(
            f"storage {mask(url)}: the gRPC client is not installed; pip install 'selector[grpc]'"
        ) from None


def _check_grpc(url: str) -> None:
    proxy = _grpc_proxy(url)
    try:
        proxy.get_all_studies()
    except Exception as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        first = scrub(first, url)
        raise StorageError(
            f"storage {mask(url)}: no gRPC storage proxy answers ({first})"
        ) from None


@functools.cache
def _rdb_storage(url: str, heartbeat: Heartbeat | None) -> optuna.storages.RDBStorage:
    """One Optuna storage (one connection pool) per URL and heartbeat setting in a process."""
    with warnings.catch_warnings():  # heartbeats are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        store = optuna.storages.RDBStorage(
            _with_driver(url), engine_kwargs=_engine_kwargs(url), **_heartbeat_kwargs(heartbeat)
        )
    if sqlite_path(url) is not None:  # Optuna's own connections get the same settings as ours
        sa.event.listen(store.engine, "connect", _sqlite_pragmas)
        store.engine.dispose()
    return store


def clear_caches() -> None:
    """Forget pooled connections (after a database was dropped, in tests)."""
    _rdb_storage.cache_clear()
    engine.cache_clear()


def open_storage(
    url: str, *, must_exist: bool, heartbeat: Heartbeat | None = None
) -> optuna.storages.BaseStorage:
    """Check `url`, then open it as an Optuna storage (creating Optuna's tables when new).

    With `heartbeat`, running trials beat and stale ones are failed and retried once."""
    check(url, must_exist=must_exist)
    if is_grpc(url):
        return _grpc_proxy(url)
    path = sqlite_path(url)
    if path is not None:
        try:
            with engine(url).connect():
                pass  # the connect hook switches the file to WAL before Optuna opens it
        except sa.exc.SQLAlchemyError as e:
            first = scrub(str(getattr(e, "orig", e)).strip().splitlines()[0][:200], url)
            raise StorageError(f"storage {mask(url)}: cannot open ({first})") from None
    try:
        store = _rdb_storage(url, heartbeat)
    except Exception as e:
        if path is not None and (kind := _sqlite_failure(e, path) or _damaged(path)) is not None:
            raise _sqlite_error(path, kind) from None
        first = scrub(str(getattr(e, "orig", e)).strip().splitlines()[0][:200], url)
        if dropped(e):  # a connection that dropped while Optuna opened it: `retrying` retries
            raise ConnectionLost(f"storage {mask(url)}: connection lost ({first})") from e
        raise StorageError(
            f"storage {mask(url)}: cannot open as an Optuna storage ({first})"
        ) from None
    if path is not None:
        _watch_sqlite(store.engine, path)
    return store


T = TypeVar("T")
TRANSIENT = (
    optuna.exceptions.StorageInternalError,
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    ConnectionLost,
)


def dropped(e: BaseException | None) -> bool:
    """Whether `e`, or an error that caused it, is a database connection lost mid-use (SQLAlchemy
    marks those `connection_invalidated`): a terminated backend, a restarted server. A server
    that refuses to connect at all is not: a worker starting against it fails at once."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, sa.exc.DBAPIError) and e.connection_invalidated:
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


RETRIES = 6


def retrying(fn: Callable[[], T]) -> T:
    """Call `fn`, retrying transient database errors (a dropped connection, a restarted server)
    with exponential backoff; the pool's pre-ping then hands out a fresh connection.

    A full disk or a corrupt SQLite file is not transient: it fails at once, as one
    `StorageError` naming the SQLite file this process opened last (engines opened through
    `open_storage` raise it themselves, naming their own file)."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except TRANSIENT as e:
            last = next(reversed(_SQLITE_FILES), None)
            if (kind := _sqlite_failure(e, last)) is not None:
                raise _sqlite_error(last, kind) from None
            if attempt == RETRIES - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _rdb_behind(store: Any) -> optuna.storages.RDBStorage | None:
    """The RDB storage a study talks to, through Optuna's cache in front of it; None for others
    (the gRPC proxy)."""
    store = getattr(store, "_backend", store)
    return store if isinstance(store, optuna.storages.RDBStorage) else None


def orphaned_trial_ids(study: optuna.Study) -> list[int]:
    """Running trials that never recorded a heartbeat and started more than twice the grace
    period ago: their worker was lost between Optuna's `ask` creating the trial and the trial's
    first beat (a connection dropped mid-`ask`, a kill). Optuna's stale check passes over trials
    without a heartbeat, so they would hold a place in the budget for ever. The start time is the
    creating machine's clock, hence the margin. SQL storages with heartbeats only."""
    rdb = _rdb_behind(study._storage)
    if rdb is None or rdb.heartbeat_interval is None:
        return []
    from optuna.storages._rdb import models

    grace = rdb.grace_period or 2 * rdb.heartbeat_interval
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)  # Optuna stores naive UTC
    cutoff = now - datetime.timedelta(seconds=2 * grace)
    trials, beats = models.TrialModel, models.TrialHeartbeatModel
    query = sa.select(trials.trial_id).where(
        trials.study_id == study._study_id,
        trials.state == optuna.trial.TrialState.RUNNING,
        trials._datetime_start_utc < cutoff,
        ~sa.exists().where(beats.trial_id == trials.trial_id),
    )
    with rdb.engine.connect() as conn:
        return [int(tid) for tid in conn.execute(query).scalars()]


def stale_trial_ids(study: optuna.Study) -> list[int]:
    """Running trials silent for longer than the grace period their own worker runs with (the
    trial's `selector:heartbeat` system attr; this storage's grace for a trial without one).
    A worker started with a longer grace is never reaped by one with a shorter grace.
    SQL storages with heartbeats only; elsewhere Optuna's own check, with this storage's grace."""
    rdb = _rdb_behind(study._storage)
    if rdb is None or rdb.heartbeat_interval is None:
        if rdb is None:
            return []
        return list(rdb._get_stale_trial_ids(study._study_id))
    from optuna.storages._rdb import models

    default = rdb.grace_period or 2 * rdb.heartbeat_interval
    trials, beats, sys = (
        models.TrialModel,
        models.TrialHeartbeatModel,
        models.TrialSystemAttributeModel,
    )
    query = (
        sa.select(trials.trial_id, beats.heartbeat, sys.value_json, sa.func.now())
        .join(beats, beats.trial_id == trials.trial_id)
        .outerjoin(sys, (sys.trial_id == trials.trial_id) & (sys.key == "selector:heartbeat"))
        .where(trials.study_id == study._study_id, trials.state == optuna.trial.TrialState.RUNNING)
    )
    with rdb.engine.connect() as conn:
        rows = list(conn.execute(query))
    out = []
    for trial_id, beat, recorded, now in rows:
        grace = json.loads(recorded).get("grace", default) if recorded else default
        silent = now.replace(tzinfo=None) - beat.replace(tzinfo=None)
        if silent > datetime.timedelta(seconds=float(grace)):
            out.append(int(trial_id))
    return out


@dataclass(frozen=True)
class TrialWrite:
    """What `write_trials` records for one running trial; with a `state`, its last write: the
    trial ends in that state with `value`, as `Study.tell` records it."""

    trial: optuna.Trial
    user_attrs: Mapping[str, Any] = field(default_factory=dict)
    system_attrs: Mapping[str, Any] = field(default_factory=dict)
    intermediate: Sequence[tuple[int, float]] = ()
    study_system_attrs: Mapping[str, Any] = field(default_factory=dict)  # its dashboard note
    state: optuna.trial.TrialState | None = None
    value: float | None = None
    heartbeat: bool = False  # record the trial's heartbeat too (as `record_heartbeat` does)


def writes_in_one(study: optuna.Study) -> bool:
    """Whether `write_trials` writes in one transaction (SQLite and PostgreSQL), and so can end
    trials; through a gRPC proxy it makes one call per value, and trials end by `tell`."""
    rdb = _rdb_behind(study._storage)
    return rdb is not None and rdb.engine.name in ("sqlite", "postgresql")


def write_trial(
    trial: optuna.Trial,
    *,
    user_attrs: Mapping[str, Any] | None = None,
    system_attrs: Mapping[str, Any] | None = None,
    intermediate: Sequence[tuple[int, float]] = (),
    study_system_attrs: Mapping[str, Any] | None = None,
) -> None:
    """Record a running trial's user attrs, system attrs and intermediate values (step, value)
    together, with `study_system_attrs` (`write_trials` for one trial)."""
    write_trials(
        [
            TrialWrite(
                trial, user_attrs or {}, system_attrs or {}, intermediate, study_system_attrs or {}
            )
        ]
    )


def write_trials(writes: Sequence[TrialWrite]) -> None:
    """Record running trials' user attrs, system attrs and intermediate values (step, value),
    and the study system attrs that go with them (a complete trial's dashboard note).

    On SQLite and PostgreSQL this is one transaction for all of them (each trial's state check,
    one multi-row insert of the values, one multi-row upsert per kind of attrs) into Optuna's
    own tables, with the row formats `report` and `set_user_attr` write. One call per value costs
    a commit each: 20 epochs and 20 attrs took about 65 ms on SQLite that way; a fused group's
    members write their epoch together. A write with a `state` ends its trial in the same
    transaction (state, completion time and value, as `RDBStorage.set_trial_state_values`
    writes them; a trial already finished, reaped as stale, fails the whole write with
    `UpdateFinishedTrialError`). With `heartbeat`, the trial's heartbeat is recorded in it
    too. Each trial's own cached copy is updated as theirs is.
    Other storages get one call per value and cannot end trials. Steps already reported are
    skipped, as `report` skips them."""
    if not writes:
        return
    pending = []
    for w in writes:
        cached = w.trial._cached_frozen_trial
        values = dict(
            (int(s), float(v))
            for s, v in w.intermediate
            if int(s) not in cached.intermediate_values
        )
        pending.append((w, values, dict(w.user_attrs), dict(w.system_attrs)))
    rdb = _rdb_behind(writes[0].trial.study._storage)
    if rdb is None or rdb.engine.name not in ("sqlite", "postgresql"):
        if any(w.state is not None for w in writes):
            raise ValueError("trials end in one transaction only on SQLite and PostgreSQL")
        for w, values, attrs, system in pending:
            trial = w.trial
            for step, value in values.items():
                trial.report(value, step)
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            for key, value in system.items():
                trial.storage.set_trial_system_attr(trial._trial_id, key, value)
            for key, value in w.study_system_attrs.items():
                trial.storage.set_study_system_attr(trial.study._study_id, key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    rows: list[dict[str, Any]] = []
    user: list[dict[str, Any]] = []
    sys_rows: list[dict[str, Any]] = []
    study_rows: list[dict[str, Any]] = []
    ended_rows: list[dict[str, Any]] = []
    value_rows: list[dict[str, Any]] = []
    ended = datetime.datetime.now()  # Optuna's clock for datetime_complete: local, naive
    for w, values, attrs, system in pending:
        tid = w.trial._trial_id
        if w.state is not None:  # as RDBStorage.set_trial_state_values records it
            ended_rows.append({"tid": tid, "state": w.state, "ended": ended})
            if w.value is not None:
                end, end_type = models.TrialValueModel.value_to_stored_repr(w.value)
                value_rows.append(
                    {"trial_id": tid, "objective": 0, "value": end, "value_type": end_type}
                )
        for step, value in values.items():
            stored, kind = models.TrialIntermediateValueModel.intermediate_value_to_stored_repr(
                value
            )
            rows.append(
                {
                    "trial_id": tid,
                    "step": step,
                    "intermediate_value": stored,
                    "intermediate_value_type": kind,
                }
            )
        user += _attr_rows(tid, attrs)
        sys_rows += _attr_rows(tid, system)
        study_rows += _attr_rows(w.trial.study._study_id, w.study_system_attrs, "study_id")
    trials = models.TrialModel.__table__
    with _create_scoped_session(rdb.scoped_session, True) as session:
        # Core statements on Optuna's tables, not its ORM models: the same rows, without
        # building an ORM object per row and flushing them (about a quarter of this write's time)
        ids = [w.trial._trial_id for w, *_ in pending]
        query = sa.select(trials.c.trial_id, trials.c.number, trials.c.state).where(
            trials.c.trial_id.in_(ids)
        )
        if ended_rows:
            query = query.with_for_update()
        found = {row.trial_id: row for row in session.execute(query)}  # one read for all
        for tid in ids:
            row = found.get(tid)
            if row is None:
                raise KeyError(models.NOT_FOUND_MSG)
            if row.state.is_finished():  # not Optuna's check: its read-back commits the session
                raise optuna.exceptions.UpdateFinishedTrialError(
                    f"Trial#{row.number} has already finished and can not be updated."
                )
        if ended_rows:
            session.execute(_end_trial(), ended_rows)
        if value_rows:
            session.execute(sa.insert(models.TrialValueModel.__table__), value_rows)
        if rows:
            session.execute(sa.insert(models.TrialIntermediateValueModel.__table__), rows)
        beats = [{"trial_id": w.trial._trial_id} for w, *_ in pending if w.heartbeat]
        if beats:  # the heartbeat column's default is the database's clock, as Optuna's
            session.execute(_heartbeat_upsert(rdb.engine.name), beats)
        for table, pairs in (
            (models.TrialUserAttributeModel, user),
            (models.TrialSystemAttributeModel, sys_rows),
            (models.StudySystemAttributeModel, study_rows),
        ):
            if pairs:
                session.execute(_upsert(rdb.engine.name, table), pairs)
    for w, values, attrs, system in pending:
        cached = w.trial._cached_frozen_trial
        cached.intermediate_values.update(values)
        cached.user_attrs.update(attrs)
        cached.system_attrs.update(system)
        if w.state is not None:
            cached.state = w.state
            cached.values = None if w.value is None else [w.value]
            cached.datetime_complete = ended


def write_study_system_attrs(
    store: optuna.storages.BaseStorage, study_id: int, attrs: Mapping[str, Any]
) -> None:
    """A study's system attrs set together (a dashboard note written anew): one upsert on
    SQLite and PostgreSQL, in the row format `set_study_system_attr` writes; elsewhere one
    call a key."""
    if not attrs:
        return
    rdb = _rdb_behind(store)
    if rdb is None or rdb.engine.name not in ("sqlite", "postgresql"):
        for key, value in attrs.items():
            store.set_study_system_attr(study_id, key, value)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(rdb.scoped_session, True) as session:
        session.execute(
            _upsert(rdb.engine.name, models.StudySystemAttributeModel),
            _attr_rows(study_id, attrs, "study_id"),
        )


@contextlib.contextmanager
def created_trials(study: optuna.Study) -> Iterator[list[int]]:
    """The ids of the trials `study`'s storage creates while the block runs. Optuna's `ask`
    creates its trial, then samples, reading the database again: a connection lost there leaves
    a trial created that nobody will run, which its caller must end."""
    store: Any = study._storage
    made: list[int] = []
    create = store.create_new_trial

    def recording(study_id: int, template_trial: optuna.trial.FrozenTrial | None = None) -> int:
        trial_id = create(study_id, template_trial)
        made.append(trial_id)
        return int(trial_id)

    store.create_new_trial = recording
    try:
        yield made
    finally:
        del store.create_new_trial


def new_trials(study: optuna.Study, n: int) -> list[int] | None:
    """Create `n` running trials in one transaction, as `n` calls of Optuna's `create_new_trial`
    would (the study's row locked, each numbered by the trials before it: the first's count,
    then one more each), and keep each one's
    first read-back (`optuna.Trial` reads a new trial by id) to be served from memory
    (`record.core_trial_reads`): Optuna spends a transaction and a read per trial, about 3.5 ms.
    None where this cannot be done so (no SQL storage behind Optuna's cache, or trials are
    waiting in the queue, which `Study.ask` takes first): the caller asks one by one."""
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import FrozenTrial, TrialState

    store: Any = study._storage
    rdb = _rdb_behind(store)
    if rdb is None or n <= 0 or not hasattr(store, "_add_trials_to_cache"):
        return None
    if store.get_all_trials(study._study_id, deepcopy=False, states=(TrialState.WAITING,)):
        return None
    with _create_scoped_session(rdb.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study._study_id, session, for_update=True)
        now = datetime.datetime.now()
        rows = [
            models.TrialModel(
                study_id=study._study_id, number=None, state=TrialState.RUNNING, datetime_start=now
            )
            for _ in range(n)
        ]
        session.add_all(rows)
        session.flush()  # their ids, in order; no other trial of the study while it is locked
        rows.sort(key=lambda row: row.trial_id)
        first = rows[0].count_past_trials(session)
        for j, row in enumerate(rows):
            row.number = first + j
        created = [
            FrozenTrial(
                number=row.number,
                state=TrialState.RUNNING,
                value=None,
                values=None,
                datetime_start=row.datetime_start,
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs={},
                system_attrs={},
                intermediate_values={},
                trial_id=row.trial_id,
            )
            for row in rows
        ]
    with store._lock:
        store._add_trials_to_cache(study._study_id, created)
    fresh = store.__dict__.setdefault(_FRESH, {})
    for frozen in created:
        fresh[frozen._trial_id] = copy.deepcopy(frozen)
    return [frozen._trial_id for frozen in created]


# Where `new_trials` keeps its trials' first read-backs, on Optuna's cached storage.
_FRESH = "_selector_fresh"


def take_fresh(store: Any, trial_id: int) -> Any:
    """The first read-back `new_trials` kept for `trial_id` (a FrozenTrial), once; else None."""
    return store.__dict__.get(_FRESH, {}).pop(trial_id, None)


def forget_fresh(study: optuna.Study) -> None:
    """Drop the read-backs `new_trials` kept that were not read (a claim that stopped midway):
    later reads go to the database."""
    study._storage.__dict__.pop(_FRESH, None)


@contextlib.contextmanager
def buffered_params(study: optuna.Study) -> Iterator[None]:
    """Within the block, the params a trial's `suggest_*` calls record are kept back, and
    written at its end in one transaction (SQLite and PostgreSQL): Optuna writes each in its
    own, about 2.5 ms apiece, a dozen per trial. The trial's own cached copy has them at once,
    as with Optuna's writes; nothing is written if the block raises."""
    store: Any = study._storage
    rdb = _rdb_behind(store)
    if (
        rdb is None
        or rdb.engine.name not in ("sqlite", "postgresql")
        or not hasattr(store, "_studies")
    ):
        yield
        return
    pending: list[tuple[int, str, float, Any]] = []

    def keep(trial_id: int, name: str, value: float, distribution: Any) -> None:
        pending.append((trial_id, name, value, distribution))
        with store._lock:
            study_id, _ = store._trial_id_to_study_id_and_number[trial_id]
            store._studies[study_id].param_distribution.setdefault(name, distribution)

    store.set_trial_param = keep
    try:
        yield
    finally:
        del store.set_trial_param
    if pending:
        _write_params(rdb, pending)


def _write_params(
    rdb: optuna.storages.RDBStorage, pending: list[tuple[int, str, float, Any]]
) -> None:
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    rows = [
        {
            "trial_id": tid,
            "param_name": name,
            "param_value": value,
            "distribution_json": distribution_to_json(dist),
        }
        for tid, name, value, dist in pending
    ]
    with _create_scoped_session(rdb.scoped_session, True) as session:
        for tid in {t for t, *_ in pending}:
            row = models.TrialModel.find_or_raise_by_id(tid, session)
            rdb.check_trial_is_updatable(tid, row.state)  # type: ignore[arg-type]
        session.execute(sa.insert(models.TrialParamModel), rows)


@functools.cache
def _end_trial() -> Any:
    """UPDATE of a trial's state and completion time, for many trials at once (`tid`, `state`,
    `ended`)."""
    from optuna.storages._rdb import models

    trials = models.TrialModel.__table__
    return (
        sa.update(trials)
        .where(trials.c.trial_id == sa.bindparam("tid"))
        .values(state=sa.bindparam("state"), datetime_complete=sa.bindparam("ended"))
    )


@functools.cache  # built once: a statement's construction cost more than its execution
def _upsert(dialect: str, table: Any) -> Any:
    """INSERT ... ON CONFLICT (trial_id or study_id, key) DO UPDATE for an Optuna attribute
    table."""
    stmt = _insert(dialect, table)
    owner = table.trial_id if hasattr(table, "trial_id") else table.study_id
    return stmt.on_conflict_do_update(
        index_elements=[owner, table.key], set_={"value_json": stmt.excluded.value_json}
    )


@functools.cache
def _heartbeat_upsert(dialect: str) -> Any:
    """INSERT ... ON CONFLICT (trial_id) DO UPDATE of a trial's heartbeat: now, by the
    database's clock (the column's default, as `RDBStorage.record_heartbeat` records it)."""
    from optuna.storages._rdb import models

    table = models.TrialHeartbeatModel
    return _insert(dialect, table).on_conflict_do_update(
        index_elements=[table.trial_id], set_={"heartbeat": sa.func.current_timestamp()}
    )


def _insert(dialect: str, table: Any) -> Any:
    """The dialect's INSERT (SQLite's or PostgreSQL's), which can take ON CONFLICT."""
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    return insert(table)


def _attr_rows(
    owner: int, pairs: Mapping[str, Any], column: str = "trial_id"
) -> list[dict[str, Any]]:
    return [{column: owner, "key": k, "value_json": json.dumps(v)} for k, v in pairs.items()]
