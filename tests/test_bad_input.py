"""Bad input: every malformed study file, data file and storage URL ends in exit code 2 and one
`selector: ...` line per problem naming the file, field or URL at fault, with no traceback, the
password masked, and nothing written to the database.

Each case drives the real CLI in-process (`typer.testing.CliRunner`); two more run the installed
console script in a real process, and hypothesis fuzzes the study-file parser."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from selector import spec, storage
from selector.cli import app
from selector.errors import SpecError, StorageError

PENGUINS = Path(__file__).resolve().parents[1] / "data" / "penguins.csv"
PASSWORD = "s3cr3t-pw"
PG_URL = f"postgresql://u:{PASSWORD}@127.0.0.1:1/db"
DELETE = object()  # a change that removes the key

# Valid bases: the cases below break one thing each. `test_bases_are_valid` proves they are valid.
IRIS: dict[str, Any] = {
    "name": "bad-input",
    "metric": "accuracy",
    "n_trials": 1,
    "seed": 0,
    "data": {"source": "sklearn:iris"},
    "cv": {"folds": 3},
    "training": {"max_epochs": 1, "patience": 1, "device": "cpu"},
    "search": {"sampler": "random", "pruner": "none"},
    "space": {"depth": 1, "width": 8, "batch_size": 32},
}
CSV = {**IRIS, "data": {"path": "penguins.csv", "target": "species", "drop": ["year"]}}


# --- workspace ---------------------------------------------------------------------------------


class Work:
    """A temporary directory with the study files, data files and sqlite URL of one case."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.db = root / "s.db"
        self.cleanups: list[Callable[[], None]] = []
        self.monkeypatch = monkeypatch

    def created(self, changes: dict[str, Any] | None = None) -> str:
        """A study file whose study `selector create` recorded in the case's database."""
        s = self.study(changes)
        result = CliRunner().invoke(app, ["create", s, "--storage", self.url])
        assert result.exit_code == 0, result.output
        return s

    @property
    def url(self) -> str:
        return f"sqlite:///{self.db}"

    def study(self, changes: dict[str, Any] | None = None, *, base: dict[str, Any] = IRIS) -> str:
        """Write `base` with dotted-key `changes` applied as study.toml; return its path."""
        raw = copy.deepcopy(base)
        for dotted, value in (changes or {}).items():
            *parents, last = dotted.split(".")
            node = raw
            for p in parents:
                node = node.setdefault(p, {})
            if value is DELETE:
                node.pop(last, None)
            else:
                node[last] = value
        return self.write("study.toml", tomli_w.dumps(raw))

    def write(self, name: str, content: str | bytes) -> str:
        path = self.root / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        return str(path)

    def penguins(
        self,
        edit: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
        changes: dict[str, Any] | None = None,
        *,
        csv: str = "penguins.csv",
    ) -> tuple[str, str]:
        """A penguins CSV (after `edit`) and a study file reading it: (study path, CSV path)."""
        df = pd.read_csv(PENGUINS)
        df = edit(df) if edit else df
        path = self.root / csv
        df.to_csv(path, index=False)
        return self.study({"data.path": csv, **(changes or {})}, base=CSV), str(path)

    def unwritable_dir(self) -> Path:
        """A directory in which this process cannot create a file (root ignores mode bits, so
        root gets an immutable directory instead)."""
        d = self.root / "readonly"
        d.mkdir()
        if os.geteuid() != 0:
            d.chmod(0o555)
            self.cleanups.append(lambda: d.chmod(0o755))
            return d
        chattr = shutil.which("chattr")
        if chattr is None or subprocess.run([chattr, "+i", str(d)], capture_output=True).returncode:
            pytest.skip("running as root without chattr +i: no directory is read-only")
        self.cleanups.append(lambda: subprocess.run([chattr, "-i", str(d)], check=False))
        return d


@dataclass
class Call:
    """What to run, what the message must name, and how many problems it reports."""

    args: list[str]
    names: list[str]
    lines: int = 1
    env: dict[str, str] | None = None


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Work]:
    monkeypatch.delenv("SELECTOR_STORAGE", raising=False)
    monkeypatch.chdir(tmp_path)  # a stray default `sqlite:///selector.db` would land here
    w = Work(tmp_path.resolve(), monkeypatch)
    yield w
    for undo in reversed(w.cleanups):
        undo()


def run(w: Work, study: str, *extra: str) -> list[str]:
    return ["run", study, "--storage", w.url, "--n-trials", "1", *extra]


# --- what "nothing written" means ----------------------------------------------------------------

SIDECARS = ("-wal", "-shm", "-journal")


def files(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            st_ = p.stat()
            out[str(p.relative_to(root))] = (st_.st_size, st_.st_mtime_ns)
    return out


def db_contents(path: Path) -> Any:
    """The studies and trials in an sqlite file (Optuna's and selector's tables)."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}

            def rows(sql: str, table: str) -> list[Any]:
                return conn.execute(sql).fetchall() if table in tables else []

            return (
                rows("SELECT study_name FROM studies ORDER BY 1", "studies"),
                rows("SELECT count(*) FROM trials", "trials"),
                rows("SELECT study_name FROM selector_studies ORDER BY 1", "selector_studies"),
                rows("SELECT study_name FROM selector_final", "selector_final"),
            )
    except sqlite3.DatabaseError:
        return ("not a database", path.read_bytes())


def is_sqlite(path: Path) -> bool:
    return path.suffix == ".db" and path.is_file()


def invoke(w: Work, call: Call) -> Result:
    dbs = {p: db_contents(p) for p in w.root.rglob("*.db") if is_sqlite(p)}
    before = files(w.root)
    result = CliRunner().invoke(app, call.args, env=call.env)
    after = files(w.root)
    new = sorted(
        f
        for f in set(after) - set(before)
        if not (f.endswith(SIDECARS) and f.rsplit("-", 1)[0] in before)
    )
    assert not new, f"bad input created {new}\n{result.output}"
    changed = [
        f for f in before if after.get(f) != before[f] and not f.endswith((".db", *SIDECARS))
    ]
    assert not changed, f"bad input changed or removed {changed}"
    for p, contents in dbs.items():
        assert db_contents(p) == contents, f"bad input wrote to {p}"
    return result


def assert_refused(result: Result, call: Call) -> None:
    out = result.output
    shown = "".join(traceback.format_exception(result.exception)) if result.exception else ""
    assert isinstance(result.exception, SystemExit), f"uncaught exception:\n{shown}\n{out}"
    assert result.exit_code == 2, out
    assert "Traceback" not in out
    assert result.stdout == "", "errors go to stderr; stdout stays clean"
    lines = out.splitlines()
    assert lines, "no message"
    assert all(line.startswith("selector: ") for line in lines), out
    assert len(lines) == call.lines, out
    for name in call.names:
        assert name in out, f"the message does not name {name!r}:\n{out}"
    assert PASSWORD not in out


# --- study files ------------------------------------------------------------------------------


def study_case(changes: dict[str, Any], *names: str, lines: int = 1) -> Callable[[Work], Call]:
    def make(w: Work) -> Call:
        s = w.study(changes)
        return Call(run(w, s), [s, *names], lines)

    return make


def text_case(content: str | bytes, *names: str, lines: int = 1) -> Callable[[Work], Call]:
    def make(w: Work) -> Call:
        s = w.write("study.toml", content)
        return Call(run(w, s), [s, *names], lines)

    return make


def study_is_directory(w: Work) -> Call:
    d = w.root / "studies.toml"
    d.mkdir()
    return Call(run(w, str(d)), [str(d), "directory"])


def study_is_fifo(w: Work) -> Call:
    """A FIFO would block the read for ever."""
    fifo = w.root / "study.toml"
    os.mkfifo(fifo)
    return Call(run(w, str(fifo)), [str(fifo), "not a regular file"])


def study_missing(w: Work) -> Call:
    s = str(w.root / "nope.toml")
    return Call(run(w, s), [s, "no such study file"])


STUDY_CASES = [
    pytest.param(study_case({"name": DELETE}, "name", "missing"), id="study-missing-name"),
    pytest.param(
        study_case({"name": "my study!"}, "name", "use letters, digits, '_', '.' and '-'"),
        id="study-name-with-space",
    ),
    pytest.param(
        study_case({"name": "../evil"}, "name", "a letter or digit first", "'../evil'"),
        id="study-name-like-a-path",
    ),
    pytest.param(
        study_case({"name": "a" * 300}, "name", "at most 100 characters", "'" + "a" * 50),
        id="study-name-too-long",
    ),
    pytest.param(
        study_case({"space.lr": {"low": 0.1, "high": 0.001}}, "space.lr", "greater than high"),
        id="study-range-low-above-high",
    ),
    pytest.param(
        study_case({"space.optimizer": ["adam", "rmsprob"]}, "space.optimizer", "'rmsprop'"),
        id="study-unknown-optimizer",
    ),
    pytest.param(
        study_case({"space.activation": "leakyrelu"}, "space.activation", "'leaky_relu'"),
        id="study-unknown-activation",
    ),
    pytest.param(
        study_case({"metric": "acuracy"}, "metric", "'accuracy'"), id="study-unknown-metric"
    ),
    pytest.param(
        study_case({"metric": "brier"}, "metric", "roc_auc"), id="study-unknown-scorer-lists-known"
    ),
    pytest.param(
        study_case({"n_trails": 5}, "n_trails", "unknown key", "'n_trials'"),
        id="study-unknown-key-did-you-mean",
    ),
    pytest.param(
        study_case({"cv.fold": 5}, "cv.fold", "'folds'"), id="study-unknown-key-in-section"
    ),
    pytest.param(
        study_case({"space.dropuot": 0.1}, "space.dropuot", "'dropout'"),
        id="study-unknown-space-key",
    ),
    pytest.param(
        study_case({"trainig.max_epochs": 5}, "trainig", "'training'"), id="study-unknown-section"
    ),
    pytest.param(study_case({"n_trials": "ten"}, "n_trials", "'ten'"), id="study-wrong-type-str"),
    pytest.param(study_case({"cv.folds": 2.5}, "cv.folds"), id="study-wrong-type-float-folds"),
    pytest.param(
        study_case({"space.batch_norm": "yes"}, "space.batch_norm", "bool"),
        id="study-wrong-type-bool",
    ),
    pytest.param(
        study_case({"space.depth": 1.5}, "space.depth", "int"), id="study-wrong-type-depth"
    ),
    pytest.param(study_case({"data": "iris"}, "data"), id="study-wrong-type-section"),
    pytest.param(study_case({"cv.folds": 1}, "cv.folds", "2"), id="study-folds-below-2"),
    pytest.param(
        study_case({"data.test_size": -0.1}, "data.test_size"), id="study-test-size-negative"
    ),
    pytest.param(
        study_case({"data.test_size": 1.5}, "data.test_size"), id="study-test-size-above-1"
    ),
    pytest.param(study_case({"space.lr": -0.01}, "space.lr", "> 0"), id="study-negative-lr"),
    pytest.param(
        study_case({"space.lr": {"low": -1e-3, "high": 1e-2}}, "space.lr"),
        id="study-negative-lr-range",
    ),
    pytest.param(study_case({"space.lr": float("nan")}, "space.lr", "finite"), id="study-lr-nan"),
    pytest.param(
        study_case({"space.weight_decay": float("inf")}, "space.weight_decay", "finite"),
        id="study-weight-decay-inf",
    ),
    pytest.param(study_case({"space.depth": 10**400}, "space.depth"), id="study-huge-integer"),
    pytest.param(
        study_case({"space.batch_size": 0}, "space.batch_size", ">= 1"), id="study-batch-0"
    ),
    pytest.param(
        study_case({"space.batch_size": [0, 32]}, "space.batch_size"), id="study-batch-0-in-choice"
    ),
    pytest.param(study_case({"space.dropout": 1.0}, "space.dropout", "< 1"), id="study-dropout-1"),
    pytest.param(
        study_case({"space.dropout": {"low": 0.0, "high": 1.5}}, "space.dropout"),
        id="study-dropout-range-above-1",
    ),
    pytest.param(
        study_case({"space.weight_decay": {"low": 0.0, "high": 0.01, "log": True}}, "log"),
        id="study-log-range-from-0",
    ),
    pytest.param(
        study_case({"space.depth": {"low": 1, "hi": 3}}, "space.depth", "'hi'"),
        id="study-range-unknown-key",
    ),
    pytest.param(
        study_case({"space.activation": {"low": 1, "high": 2}}, "space.activation"),
        id="study-range-on-text-param",
    ),
    pytest.param(study_case({"space.optimizer": []}, "space.optimizer"), id="study-empty-choice"),
    pytest.param(
        study_case({"space.batch_size": [32, 32]}, "space.batch_size", "repeated"),
        id="study-repeated-choice",
    ),
    pytest.param(study_case({"direction": "minimize"}, "direction"), id="study-direction-minimize"),
    pytest.param(
        study_case({"search.sampler": "tpe2"}, "search.sampler"), id="study-unknown-sampler"
    ),
    pytest.param(
        study_case({"training.device": "gpu"}, "training.device"), id="study-unknown-device"
    ),
    pytest.param(study_case({"raw": {}}, "raw", "unknown key"), id="study-reserved-key"),
    pytest.param(
        study_case({"bad\nkey": 1}, "'bad\\nkey': unknown key"), id="study-key-with-line-break"
    ),
    pytest.param(
        study_case({"data.source": "sklearn:titanic"}, "data", "sklearn:titanic"),
        id="study-unknown-sklearn-source",
    ),
    pytest.param(
        study_case({"data": {"path": "penguins.csv"}}, "data", "target"),
        id="study-path-without-target",
    ),
    pytest.param(
        study_case({"data.path": "penguins.csv", "data.target": "species"}, "data", "exactly one"),
        id="study-source-and-path",
    ),
    pytest.param(
        study_case({"cv.folds": 1, "space.lr": -1.0}, "cv.folds", "space.lr", lines=2),
        id="study-every-problem-at-once",
    ),
    pytest.param(
        text_case('name = "x"\n[cv\nfolds 3\n', "not valid TOML", "line"), id="study-not-toml"
    ),
    pytest.param(text_case("", "name", "metric", "data", lines=3), id="study-empty-file"),
    pytest.param(text_case(bytes(range(256)) * 4, "not a text file"), id="study-binary-garbage"),
    pytest.param(text_case("x = " + "[" * 5000 + "]" * 5000, "nested"), id="study-nested-too-deep"),
    pytest.param(
        text_case("n_trials = " + "9" * 5000, "not valid TOML"), id="study-int-5000-digits"
    ),
    pytest.param(
        study_case(
            {"space.batch_size": [1, 32], "space.batch_norm": [False, True]},
            "batch_size can be 1",
            "batch_norm",
        ),
        id="study-batch-1-with-batch-norm",
    ),
    pytest.param(
        study_case(
            {"space.batch_size": {"low": 1, "high": 64}, "space.batch_norm": True},
            "batch_size can be 1",
            "batch_norm",
        ),
        id="study-batch-range-from-1-with-batch-norm",
    ),
    pytest.param(study_case({"storage": ""}, "storage", "empty"), id="study-empty-storage"),
    pytest.param(study_is_directory, id="study-is-a-directory"),
    pytest.param(study_missing, id="study-missing-file"),
    pytest.param(study_is_fifo, id="study-file-is-a-fifo"),
]


# --- data --------------------------------------------------------------------------------------


def data_case(
    edit: Callable[[pd.DataFrame], pd.DataFrame] | None = None,
    changes: dict[str, Any] | None = None,
    *names: str,
    csv: str = "penguins.csv",
) -> Callable[[Work], Call]:
    def make(w: Work) -> Call:
        s, path = w.penguins(edit, changes, csv=csv)
        return Call(run(w, s), [path, *names])

    return make


def raw_data_case(
    content: str | bytes, *names: str, csv: str = "data.csv"
) -> Callable[[Work], Call]:
    def make(w: Work) -> Call:
        path = w.write(csv, content)
        s = w.study({"data.path": csv}, base=CSV)
        return Call(run(w, s), [path, *names])

    return make


def data_missing(w: Work) -> Call:
    s = w.study({"data.path": "nope.csv"}, base=CSV)
    return Call(run(w, s), [str(w.root / "nope.csv"), "data.path", "no such data file"])


def data_is_directory(w: Work) -> Call:
    (w.root / "tables.csv").mkdir()
    s = w.study({"data.path": "tables.csv"}, base=CSV)
    return Call(run(w, s), [str(w.root / "tables.csv"), "directory"])


def with_text(df: pd.DataFrame) -> pd.DataFrame:
    df["bill_length_mm"] = df["bill_length_mm"].astype(object)
    df.loc[[3, 10], "bill_length_mm"] = "about 40"
    return df


def with_inf(df: pd.DataFrame) -> pd.DataFrame:
    df.loc[5, "bill_depth_mm"] = np.inf
    return df


def rare_class(n: int) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        chin = df.index[df["species"] == "Chinstrap"]
        return df.drop(chin[n:]).reset_index(drop=True)

    return edit


def assign(**cols: Any) -> Callable[[pd.DataFrame], pd.DataFrame]:
    return lambda df: df.assign(**cols)


def at(col: str, row: int, value: Any) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """Set one cell; `row` counts from 1 after the header, as the messages do."""

    def edit(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[row - 1, col] = value
        return df

    return edit


def with_id(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(id=[f"penguin-{i:04d}" for i in range(len(df))])


def third_text(df: pd.DataFrame) -> pd.DataFrame:
    """A third of a numeric column's values written with their unit: hundreds of text levels."""
    col = df["bill_length_mm"].astype(object)
    every_third = df.index % 3 == 0
    col[every_third] = [f"{v}mm" for v in col[every_third]]
    return df.assign(bill_length_mm=col)


def groups_with_gaps(df: pd.DataFrame) -> pd.DataFrame:
    colony = pd.Series(np.arange(len(df)) % 7, dtype=float)
    colony[[4, 20]] = np.nan
    return df.assign(colony=colony)


def create_case(
    edit: Callable[[pd.DataFrame], pd.DataFrame], *names: str, memory: int | None = None
) -> Callable[[Work], Call]:
    """`selector create` on an edited penguins CSV, with `memory` bytes in the machine if given."""

    def make(w: Work) -> Call:
        if memory is not None:
            w.monkeypatch.setattr("selector.data._memory_bytes", lambda: memory)
        s, path = w.penguins(edit)
        return Call(["create", s, "--storage", w.url], [path, *names])

    return make


def data_fifo(w: Work) -> Call:
    """A FIFO as the data file would block the read for ever."""
    os.mkfifo(w.root / "rows.csv")
    s = w.study({"data.path": "rows.csv"}, base=CSV)
    return Call(run(w, s), [str(w.root / "rows.csv"), "data.path", "not a regular file"])


def data_device(w: Work) -> Call:
    """/dev/zero as the data file would be read until the memory runs out."""
    s = w.study({"data.path": "/dev/zero"}, base=CSV)
    return Call(run(w, s), ["/dev/zero", "not a regular file"])


DATA_CASES = [
    pytest.param(data_missing, id="data-missing-csv"),
    pytest.param(raw_data_case("", "empty file"), id="data-empty-csv"),
    pytest.param(
        raw_data_case("species,island,year\n", "'species'", "no values"), id="data-header-only"
    ),
    pytest.param(raw_data_case(bytes(range(256)) * 64, "CSV"), id="data-binary-garbage"),
    pytest.param(
        raw_data_case("not parquet at all\n", csv="data.parquet"), id="data-parquet-garbage"
    ),
    pytest.param(raw_data_case("a,b\n1,2\n", ".xlsx", csv="data.xlsx"), id="data-unknown-type"),
    pytest.param(
        raw_data_case(
            "species;bill;mass\nAdelie;39,1;3750\nGentoo;47,2;5200\n",
            "seems to use ';' between fields",
            "save it with ',' between fields",
        ),
        id="data-semicolon-separated-csv",
    ),
    pytest.param(
        raw_data_case(
            "species,bill\nAdelie,39.1\n", "use ',' between fields", "name it .csv", csv="d.tsv"
        ),
        id="data-commas-in-a-tsv",
    ),
    pytest.param(data_is_directory, id="data-path-is-directory"),
    pytest.param(
        data_case(None, {"data.target": "specie"}, "data.target", "'species'"),
        id="data-target-missing",
    ),
    pytest.param(
        data_case(assign(species="Adelie"), None, "'species'", "constant"),
        id="data-constant-target",
    ),
    pytest.param(
        data_case(assign(species=np.nan), None, "'species'", "no values"),
        id="data-target-all-missing",
    ),
    pytest.param(
        data_case(with_text, None, "'bill_length_mm'", "about 40"), id="data-text-in-numeric"
    ),
    pytest.param(
        data_case(assign(sex=np.nan), None, "'sex'", "missing", 'drop = ["year", "sex"] in [data]'),
        id="data-all-nan-column",
    ),
    pytest.param(data_case(with_inf, None, "'bill_depth_mm'", "infinite"), id="data-inf-values"),
    pytest.param(
        data_case(
            lambda df: df.dropna().head(8),
            {
                "cv.folds": 5,
                "data.target": "body_mass_g",
                "data.task": "regression",
                "metric": "r2",
            },
            "cv.folds",
            "too few",
        ),
        id="data-fewer-rows-than-folds",
    ),
    pytest.param(
        data_case(rare_class(5), {"cv.folds": 5}, "'Chinstrap'", "cv.folds"),
        id="data-folds-above-smallest-class",
    ),
    pytest.param(
        data_case(rare_class(1), None, "'Chinstrap'", "data.test_size"),
        id="data-class-with-one-row",
    ),
    pytest.param(
        data_case(None, {"data.drop": ["yr"]}, "data.drop", "'year'"), id="data-drop-missing"
    ),
    pytest.param(
        data_case(None, {"data.groups": "colony"}, "data.groups", "'colony'"),
        id="data-groups-missing",
    ),
    pytest.param(
        data_case(None, {"data.groups": "species"}, "data.groups", "target"),
        id="data-groups-is-target",
    ),
    pytest.param(
        data_case(None, {"data.target": "island", "data.task": "regression"}, "'island'"),
        id="data-regression-on-text-target",
    ),
    pytest.param(
        data_case(None, {"metric": "r2"}, "metric", "'r2'", "classification"),
        id="data-metric-for-other-task",
    ),
    pytest.param(
        data_case(None, {"metric": "f1"}, "metric", "'f1'", "3 classes"),
        id="data-binary-metric-on-3-classes",
    ),
    pytest.param(
        create_case(with_id, "'id'", "344 distinct values", 'drop = ["year", "id"] in [data]'),
        id="data-unique-id-column-refused-at-create",
    ),
    pytest.param(
        create_case(
            assign(site=[f"site-{i % 150}" for i in range(344)]),
            "'site'",
            "GiB",
            'drop = ["year", "site"]',
            memory=2**20,
        ),
        id="data-one-hot-beyond-the-memory-share",
    ),
    pytest.param(
        data_case(at("bill_depth_mm", 8, 1e308), None, "'bill_depth_mm'", "1e+308", "row 8"),
        id="data-feature-overflows-float32",
    ),
    pytest.param(
        data_case(at("bill_depth_mm", 8, -np.inf), None, "'bill_depth_mm'", "row 8"),
        id="data-inf-names-the-row",
    ),
    pytest.param(
        data_case(
            at("body_mass_g", 5, -1e300),
            {"data.target": "body_mass_g", "data.task": "regression", "metric": "r2"},
            "target 'body_mass_g'",
            "row 5",
        ),
        id="data-regression-target-overflows-float32",
    ),
    pytest.param(
        data_case(third_text, None, "'bill_length_mm'", "'39.1mm'", "row 1"),
        id="data-numeric-column-with-a-third-text",
    ),
    pytest.param(
        data_case(assign(colony="north"), {"data.groups": "colony"}, "'colony'", "constant"),
        id="data-groups-constant",
    ),
    pytest.param(
        data_case(groups_with_gaps, {"data.groups": "colony"}, "'colony'", "missing", "row 5"),
        id="data-groups-with-missing-values",
    ),
    pytest.param(data_fifo, id="data-file-is-a-fifo"),
    pytest.param(data_device, id="data-file-is-a-device"),
]


# --- storage -----------------------------------------------------------------------------------


def storage_case(
    url: Callable[[Work], str], *names: str, cmd: str = "run"
) -> Callable[[Work], Call]:
    def make(w: Work) -> Call:
        u = url(w)
        args = ["run", w.study(), "--n-trials", "1"] if cmd == "run" else [cmd]
        if cmd in ("status", "final", "export"):
            args.append("bad-input")
        return Call([*args, "--storage", u], list(names))

    return make


def readonly_dir(w: Work) -> Call:
    d = w.unwritable_dir()
    return Call(["run", w.study(), "--storage", f"sqlite:///{d}/s.db"], [str(d), "writable"])


def not_a_database(w: Work) -> Call:
    w.write("s.db", b"this is not a database\n" * 200)
    return Call(run(w, w.study()), [str(w.db)])


def garbled_database(w: Work) -> Call:
    """A study's database with its pages after the schema overwritten (seeded, so each run
    garbles the same bytes)."""
    s = w.created()
    data = bytearray(w.db.read_bytes())
    page = 4096
    data[2 * page :] = random.Random(0).randbytes(len(data) - 2 * page)
    w.db.write_bytes(bytes(data))
    return Call(run(w, s), [str(w.db), "not a SQLite database or is corrupt"])


def unreadable_database(w: Work) -> Call:
    s = w.created()
    if os.geteuid() != 0:
        w.db.chmod(0o200)
        w.cleanups.append(lambda: w.db.chmod(0o644))
    else:  # root reads any file: deny it as the permission bits would
        real = os.access
        w.monkeypatch.setattr(
            os, "access", lambda p, mode: real(p, mode) and not (Path(p) == w.db and mode & os.R_OK)
        )
    return Call(run(w, s), [str(w.db), "not readable"])


def linked_budget_lock(w: Work) -> Call:
    """A symbolic link planted where the budget lock file goes: never followed."""
    s = w.created()
    target = w.root / "elsewhere.txt"
    target.write_text("not selector's\n")
    lock = Path(f"{w.db}.bad-input.lock")
    lock.symlink_to(target)
    return Call(run(w, s, "--workers", "1"), [str(lock), "symbolic link"])


def status_missing_db(w: Work) -> Call:
    return Call(["status", "bad-input", "--storage", w.url], [str(w.db), "no such database"])


def status_study_file_missing_db(w: Work) -> Call:
    return Call(["status", w.study(), "--storage", w.url], [str(w.db), "no such database"])


def status_unknown_study(w: Work) -> Call:
    created = CliRunner().invoke(app, ["create", w.study(), "--storage", w.url])
    assert created.exit_code == 0, created.output
    return Call(["status", "nope", "--storage", w.url], ["'nope'", "bad-input"])


def env_storage(w: Work) -> Call:
    args = ["run", w.study(), "--n-trials", "1"]
    return Call(args, ["unknown scheme", "'mysql'"], env={"SELECTOR_STORAGE": "mysql://h/db"})


def study_file_storage(w: Work) -> Call:
    s = w.study({"storage": f"redis://u:{PASSWORD}@h/0"})
    return Call(["run", s, "--n-trials", "1"], ["redis", "u:***@h"])


MASKED = "postgresql://u:***@127.0.0.1:1/db"
STORAGE_CASES = [
    pytest.param(
        storage_case(lambda w: PG_URL, MASKED, "cannot connect"), id="storage-postgres-unreachable"
    ),
    pytest.param(
        storage_case(lambda w: PG_URL, MASKED, cmd="studies"), id="storage-studies-unreachable"
    ),
    pytest.param(
        storage_case(lambda w: PG_URL, MASKED, cmd="status"), id="storage-status-unreachable"
    ),
    pytest.param(
        storage_case(
            lambda w: f"mysql://u:{PASSWORD}@h/db", "unknown scheme", "'mysql'", "u:***@h"
        ),
        id="storage-unknown-scheme",
    ),
    pytest.param(
        storage_case(lambda w: f"postgresql//u:{PASSWORD}@h/db", "not a URL", "postgresql//"),
        id="storage-not-a-url",
    ),
    pytest.param(
        storage_case(lambda w: "postgresql://u@h:port/db", "not a URL", "postgresql://u@h:port"),
        id="storage-port-not-a-number",
    ),
    pytest.param(readonly_dir, id="storage-read-only-directory"),
    pytest.param(
        storage_case(lambda w: f"sqlite:///{w.root}/no/such/dir/s.db", "no/such/dir", "does not"),
        id="storage-sqlite-directory-missing",
    ),
    pytest.param(
        storage_case(lambda w: f"sqlite:///{w.root}", "is a directory"),
        id="storage-sqlite-path-is-directory",
    ),
    pytest.param(
        storage_case(lambda w: "sqlite://", "sqlite://", "no database file"),
        id="storage-sqlite-in-memory",
    ),
    pytest.param(not_a_database, id="storage-sqlite-not-a-database"),
    pytest.param(status_missing_db, id="storage-status-missing-db-not-created"),
    pytest.param(status_study_file_missing_db, id="storage-status-file-missing-db-not-created"),
    pytest.param(
        storage_case(lambda w: w.url, "s.db", "no such database", cmd="final"),
        id="storage-final-missing-db-not-created",
    ),
    pytest.param(
        storage_case(lambda w: w.url, "s.db", "no such database", cmd="export"),
        id="storage-export-missing-db-not-created",
    ),
    pytest.param(status_unknown_study, id="storage-status-unknown-study"),
    pytest.param(env_storage, id="storage-env-unknown-scheme"),
    pytest.param(storage_case(lambda w: "", "--storage", "empty"), id="storage-empty-option"),
    pytest.param(garbled_database, id="storage-sqlite-garbled-pages"),
    pytest.param(unreadable_database, id="storage-sqlite-unreadable"),
    pytest.param(linked_budget_lock, id="storage-budget-lock-is-a-symlink"),
    pytest.param(study_file_storage, id="storage-study-file-unknown-scheme-masked"),
]


def bad_option(w: Work) -> Call:
    return Call(["export", "bad-input", "--rule", "worst", "--storage", w.url], ["--rule", "worst"])


def export_to(target: Callable[[Work], Path], *names: str) -> Callable[[Work], Call]:
    def make(w: Work) -> Call:
        w.created()
        out = target(w)
        return Call(["export", "bad-input", "--storage", w.url, "-o", str(out)], [str(out), *names])

    return make


def a_directory(w: Work) -> Path:
    (w.root / "out").mkdir()
    return w.root / "out"


def too_many_threads(w: Work) -> Call:
    threads = str(4 * (os.cpu_count() or 1) + 1)
    return Call(run(w, w.study(), "--threads", threads), [f"--threads {threads}", "cores"])


CLI_CASES = [
    pytest.param(bad_option, id="cli-export-unknown-rule"),
    pytest.param(
        export_to(lambda w: w.root / "no" / "such" / "best.json", "does not exist"),
        id="cli-export-into-a-missing-directory",
    ),
    pytest.param(export_to(a_directory, "is a directory"), id="cli-export-onto-a-directory"),
    pytest.param(too_many_threads, id="cli-threads-far-above-the-cores"),
]


@pytest.mark.parametrize("case", STUDY_CASES + DATA_CASES + STORAGE_CASES + CLI_CASES)
def test_bad_input_is_refused_with_one_clear_line(work: Work, case: Callable[[Work], Call]) -> None:
    call = case(work)
    result = invoke(work, call)
    assert_refused(result, call)


@pytest.mark.parametrize("base", [IRIS, CSV], ids=["iris", "penguins-csv"])
def test_bases_are_valid(work: Work, base: dict[str, Any]) -> None:
    """The bases the cases break are themselves accepted (create: validate, split, record)."""
    shutil.copy(PENGUINS, work.root / "penguins.csv")
    result = CliRunner().invoke(app, ["create", work.study(base=base), "--storage", work.url])
    assert result.exit_code == 0, result.output
    assert db_contents(work.db)[2] == [("bad-input",)]


def test_create_says_what_was_done_to_the_data(work: Work) -> None:
    """Rows left out for a missing target and short rows padded are each one `note:` line."""
    s, path = work.penguins(at("species", 3, np.nan))
    lines = Path(path).read_text().splitlines()
    lines[6] = ",".join(lines[6].split(",")[:5])  # data row 6 loses its last 3 fields
    Path(path).write_text("\n".join(lines) + "\n")
    want = [
        f"note: {path}: 1 rows have fewer fields than the header's 8 (the first is row 6); "
        "their missing fields were read as missing values",
        f"note: {path}: 1 of 344 rows have no value in the target 'species' and were left out "
        "(343 rows remain)",
    ]
    result = CliRunner().invoke(app, ["create", s, "--storage", work.url])
    assert result.exit_code == 0, result.output
    assert [line for line in result.stdout.splitlines() if line.startswith("note: ")] == want
    # `run` says the same, before its summary line: a user may never call `create`
    ran = CliRunner().invoke(app, [*run(work, s), "--workers", "1"])
    assert ran.exit_code == 0, ran.output
    lines = ran.stdout.splitlines()
    assert [line for line in lines if line.startswith("note: ")] == want
    assert lines[-1].startswith("study 'bad-input': 1/")


def test_final_refuses_a_symlink_planted_at_the_model_directory(work: Work) -> None:
    s = work.study()
    ran = CliRunner().invoke(app, [*run(work, s), "--workers", "1"])
    assert ran.exit_code == 0, ran.output
    elsewhere = work.root / "elsewhere"
    elsewhere.mkdir()
    link = work.root / "selector-artifacts" / "bad-input"  # the trial notes made the parent
    link.symlink_to(elsewhere)
    result = CliRunner().invoke(app, ["final", "bad-input", "--storage", work.url])
    assert_refused(result, Call([], [str(link), "symbolic link", "remove the link"]))
    assert list(elsewhere.iterdir()) == [], "final wrote through the link"


class DiskFull:
    """Every write to a trial's rows fails as SQLite fails on a full disk (the error raised by
    sqlite3, wrapped by SQLAlchemy as it wraps the real one), for all engines in the process;
    only `ask` still gets its new trial row in, so the disk fills during the trial."""

    def __call__(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        head = " ".join(statement.split()).upper()
        if head.startswith(("INSERT INTO TRIAL_", "UPDATE TRIAL")):
            raise sqlite3.OperationalError("database or disk is full")

    def __enter__(self) -> DiskFull:
        sa.event.listen(sa.engine.Engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *_: object) -> None:
        sa.event.remove(sa.engine.Engine, "before_cursor_execute", self)


def assert_disk_full_reported(result: Result, db: Path) -> None:
    out = result.output
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, out
    assert "Traceback" not in out
    last = out.splitlines()[-1]
    assert last.startswith(f"selector: storage sqlite:///{db}: the disk is full"), out
    assert "free space" in last
    assert not [line for line in out.splitlines() if line.startswith("selector: ")][:-1], out
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db_contents(db)[0] == [("bad-input",)]


def test_a_full_disk_during_run_is_one_line_naming_the_database(work: Work) -> None:
    s = work.created({"n_trials": 3})
    with DiskFull():
        result = CliRunner().invoke(app, [*run(work, s), "--workers", "1"])
    assert_disk_full_reported(result, work.db)


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, where root may mount one."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root allowed to mount a tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_really_full_disk_during_run_is_one_line_naming_the_database(
    work: Work, tiny_disk: Path
) -> None:
    work.db = tiny_disk / "s.db"
    s = work.created({"n_trials": 200})
    disk = os.statvfs(tiny_disk)
    # leaves 2 MiB: a few trials' worth (a fused group's members end together, with their
    # figures beside the database)
    with (tiny_disk / "filler").open("wb") as fh:
        fh.write(b"\0" * (disk.f_bavail * disk.f_frsize - 2048 * 1024))
    result = CliRunner().invoke(app, ["run", s, "--storage", work.url, "--workers", "1"])
    assert "trial 0: " in result.output, "the disk filled before the first trial"
    assert_disk_full_reported(result, work.db)


def test_retrying_turns_a_full_disk_into_one_storage_error_at_once(work: Work) -> None:
    """A full disk is not transient: no retries, one `StorageError` naming the database."""
    storage.check(work.url, must_exist=False)  # the SQLite file this process opened
    calls = []

    def write() -> None:
        calls.append(1)
        orig = sqlite3.OperationalError("database or disk is full")
        raise sa.exc.OperationalError("INSERT INTO trial_values ...", {}, orig)

    with pytest.raises(StorageError, match=f"storage sqlite:///{work.db}: the disk is full"):
        storage.retrying(write)
    assert calls == [1]


@pytest.mark.parametrize(
    "space",
    [
        {"batch_size": {"low": 2, "high": 64}, "batch_norm": [False, True]},
        {"batch_size": [1, 32], "batch_norm": False},
    ],
    ids=["batches-of-2-or-more-with-batch-norm", "batches-of-1-without-batch-norm"],
)
def test_batch_norm_and_batch_size_that_can_train_are_accepted(space: dict[str, Any]) -> None:
    parsed = spec.parse({**IRIS, "space": space}, origin="s.toml")
    assert parsed.space.batch_size.kind in ("int", "choice")


# --- a real process ----------------------------------------------------------------------------


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("selector")
    found = str(script) if script.exists() else shutil.which("selector")
    if found is None:
        pytest.skip("the `selector` console script is not installed")
    return [found]


def _run_process(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SELECTOR_STORAGE"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _assert_process_refused(proc: subprocess.CompletedProcess[str], *names: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert lines and all(line.startswith("selector: ") for line in lines), proc.stderr
    for name in names:
        assert name in proc.stderr
    assert PASSWORD not in proc.stderr


def test_console_script_refuses_a_bad_study_file(tmp_path: Path) -> None:
    study = tmp_path / "study.toml"
    study.write_text(tomli_w.dumps({**IRIS, "cv": {"folds": 1}}))
    proc = _run_process([*_console_script(), "run", str(study), "--n-trials", "1"], tmp_path)
    _assert_process_refused(proc, str(study), "cv.folds")
    assert list(tmp_path.iterdir()) == [study]


def test_python_m_selector_refuses_unreachable_storage(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "selector", "status", "some-study", "--storage", PG_URL]
    proc = _run_process(cmd, tmp_path)
    _assert_process_refused(proc, MASKED)
    assert list(tmp_path.iterdir()) == []


# --- fuzzing the study-file parser ---------------------------------------------------------------

KEYS = [
    *spec.StudySpec.model_fields,
    *spec.SPACE_RULES,
    "source", "path", "target", "drop", "groups", "task", "test_size", "folds", "repeats",
    "max_epochs", "patience", "device", "sampler", "pruner", "max_failures", "low", "high", "log",
]  # fmt: skip
WORDS = [
    "sklearn:iris", "sklearn:nope", "accuracy", "r2", "adam", "relu", "maximize", "minimize",
    "cpu", "tpe", "median", "x.csv", "", "a b", "-1",
]  # fmt: skip
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(WORDS)
    | st.dates()
    | st.datetimes()
    | st.times()
)
keys = st.sampled_from(KEYS) | st.text(max_size=10)
values = st.recursive(
    leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=5),
    max_leaves=25,
)
tables = st.dictionaries(keys, values, max_size=8)
# near-valid files get past the top level and into every section's validation
space_values = (
    leaves
    | st.lists(leaves, max_size=4)
    | st.dictionaries(st.sampled_from(["low", "high", "log", "step"]), leaves, max_size=3)
)
near_valid = st.fixed_dictionaries(
    {"name": st.just("fuzz") | st.text(max_size=6), "metric": st.sampled_from(WORDS)},
    optional={
        "data": st.fixed_dictionaries(
            {"source": st.sampled_from(WORDS)},
            optional={k: leaves for k in ("path", "target", "test_size", "task", "drop")},
        ),
        "cv": st.dictionaries(st.sampled_from(["folds", "repeats", "fold"]), leaves, max_size=2),
        "training": st.dictionaries(st.sampled_from(KEYS), leaves, max_size=3),
        "search": st.dictionaries(st.sampled_from(KEYS), leaves, max_size=3),
        "space": st.dictionaries(st.sampled_from(list(spec.SPACE_RULES)), space_values, max_size=6),
        "n_trials": leaves,
        "seed": leaves,
        "direction": leaves,
    },
)
FRAGMENTS = [
    'name = "fuzz"', 'metric = "accuracy"', "[data]", 'source = "sklearn:iris"', "[cv]",
    "folds = 3", "folds = 1", "[space]", "lr = { low = 1e-4, high = 1e-1, log = true }",
    "lr = nan", "depth = [1, 2, 2]", "dropout = inf", "[[space]]", "x = [[[1]]]", "= 1", "[",
    'name = """', "a.b.c = 1", "depth = 99999999999999999999999", "test_size = 1979-05-27",
]  # fmt: skip


def _accepts_or_spec_error(raw: Any) -> None:
    try:
        parsed = spec.parse(raw, origin="fuzz.toml")
    except SpecError as e:
        lines = str(e).splitlines()
        assert lines and all(line.startswith("fuzz.toml: ") for line in lines), str(e)
    else:
        assert isinstance(parsed, spec.StudySpec)


@settings(max_examples=300, deadline=None)
@given(raw=tables | values)
def test_fuzz_parse_random_tables_raise_only_spec_error(raw: Any) -> None:
    _accepts_or_spec_error(raw)


@settings(max_examples=300, deadline=None)
@given(raw=near_valid)
def test_fuzz_parse_near_valid_tables_raise_only_spec_error(raw: dict[str, Any]) -> None:
    _accepts_or_spec_error(raw)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.binary(max_size=200)
    | st.text(max_size=200).map(str.encode)
    | st.lists(st.sampled_from(FRAGMENTS), max_size=12).map(lambda xs: "\n".join(xs).encode())
)
def test_fuzz_load_random_bytes_raise_only_spec_error(fuzz_dir: Path, content: bytes) -> None:
    path = fuzz_dir / "fuzz.toml"
    path.write_bytes(content)
    try:
        parsed = spec.load(path)
    except SpecError as e:
        lines = str(e).splitlines()
        assert lines and all(line.startswith(f"{path}: ") for line in lines), str(e)
    else:
        assert isinstance(parsed, spec.StudySpec)
