"""The command line's polish (issue 13): help that shows flags as flags and arguments by name,
`--version`, export formats from the file's extension, absolute and normalised data paths, the
final refit's progress, an idempotent `run`, predictions that join back onto their rows, and
scores shown as a person reads them (`RMSE = 20.61`) where JSON keeps the raw ones."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import pandas as pd
import pytest
import typer
import yaml
from optuna_dashboard import wsgi
from typer.core import TyperOption
from typer.testing import CliRunner, Result

from selector import __version__, data, final, metrics, progress, record, selection, spec, summary
from selector.cli import app, main
from tests.conftest import PENGUINS, small_raw, write_study

runner = CliRunner()
WIDE = {"COLUMNS": "200"}  # help on one line per option, whatever the terminal
COMMANDS = sorted(c.name for c in typer.main.get_group(app).commands.values() if c.name)


def _sel(*args: str) -> Result:
    return runner.invoke(app, list(args), env=WIDE)


def _study(tmp: Path, name: str = "iris.toml", **overrides: Any) -> Path:
    return write_study(tmp / name, small_raw(**{"n_trials": 2, **overrides}))


def _run(study_file: Path, url: str, *more: str) -> Result:
    return _sel("run", str(study_file), "--storage", url, "--workers", "1", *more)


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An iris study whose 2 trials are finished, its test set never opened."""
    tmp = tmp_path_factory.mktemp("searched")
    study_file, url = _study(tmp), f"sqlite:///{tmp / 'selector.db'}"
    assert _run(study_file, url).exit_code == 0
    return study_file, url


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Result]:
    """An iris study after `selector final`, with what `final` printed."""
    tmp = tmp_path_factory.mktemp("evaluated")
    study_file, url = _study(tmp), f"sqlite:///{tmp / 'selector.db'}"
    assert _run(study_file, url).exit_code == 0
    done = _sel("final", "iris-small", "--storage", url)
    assert done.exit_code == 0, done.output
    return study_file, url, done


# --- 1. help, flags, --version -----------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_flags_without_a_value_and_arguments_by_name(command: str) -> None:
    r = _sel(command, "--help")
    assert r.exit_code == 0, r.output
    assert "<bool>" not in r.output
    usage = next(line for line in r.output.splitlines() if "Usage:" in line)
    assert "{" not in usage and not re.search(r"\b[a-z_]+\b$", usage.strip()), usage


@pytest.mark.parametrize(
    "command,usage",
    [
        ("create", "selector create [OPTIONS] STUDY_FILE"),
        ("run", "selector run [OPTIONS] STUDY_FILE"),
        ("status", "selector status [OPTIONS] STUDY"),
        ("predict", "selector predict [OPTIONS] STUDY DATA_FILE"),
        ("replay", "selector replay [OPTIONS] STUDY TRIAL"),
        ("dashboard", "selector dashboard [OPTIONS] [STUDY]"),
    ],
)
def test_usage_names_the_arguments_in_capitals(command: str, usage: str) -> None:
    assert f"Usage: {usage}" in _sel(command, "--help").output


def test_every_boolean_option_is_a_flag_with_help() -> None:
    group = typer.main.get_group(app)
    flags = {
        (name, p.opts[0]): p.help
        for name, cmd in group.commands.items()
        for p in cmd.params
        if isinstance(p, TyperOption) and p.is_flag
    }
    assert ("final", "--early") in flags and ("run", "--strict") in flags
    assert ("predict", "--with-input") in flags and ("status", "--json") in flags
    assert all(flags.values()), [k for k, v in flags.items() if not v]


def test_a_flag_takes_no_value() -> None:
    r = _sel("studies", "--json", "true")
    assert r.exit_code == 2 and "true" in r.output


def test_rule_help_says_what_one_se_is() -> None:
    out = _sel("export", "--help").output
    assert "best|one-se" in out
    assert "one-se: the simplest trial (fewest parameters, then epochs) within one standard" in out


def test_the_command_list_shows_each_commands_summary_as_running_text() -> None:
    """A docstring wrapped in the source is not wrapped again in `selector --help`'s list."""
    out = _sel("--help").output
    listed = " ".join(line.strip("│ ").strip() for line in out.splitlines() if line.startswith("│"))
    for name, cmd in typer.main.get_group(app).commands.items():
        summary = " ".join((cmd.help or "").split("\n\n")[0].split())
        assert cmd.short_help == summary, name
        assert f"{name} {summary}" in " ".join(listed.split()), name
    assert "expected test score, and the test set's state" in out  # one line at 200 columns


def test_version_prints_the_package_version_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    r = _sel("--version")
    assert r.exit_code == 0 and r.output == f"selector {__version__}\n"
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == "selector 0.1.0\n"
    assert "--version" in _sel("--help").output


# --- 2. export formats, the test block in TOML, data paths --------------------------------------


@pytest.mark.parametrize(
    "name,load",
    [
        ("best.yml", yaml.safe_load),
        ("best.yaml", yaml.safe_load),
        ("best.toml", tomllib.loads),
        ("best.json", json.loads),
        ("best.cfg", json.loads),  # no known extension: JSON, as before
    ],
)
def test_export_takes_the_format_from_the_file_extension(
    searched: tuple[Path, str], tmp_path: Path, name: str, load: Any
) -> None:
    _, url = searched
    out = tmp_path / name
    r = _sel("export", "iris-small", "--storage", url, "-o", str(out))
    assert r.exit_code == 0, r.output
    assert load(out.read_text())["study"] == "iris-small"
    if name.endswith((".yml", ".yaml", ".toml")):
        with pytest.raises(json.JSONDecodeError):
            json.loads(out.read_text())


def test_export_refuses_a_format_the_extension_contradicts(tmp_path: Path, url: str) -> None:
    study_file = _study(tmp_path)
    assert _run(study_file, url).exit_code == 0
    out = tmp_path / "best.yml"
    r = _sel("export", "iris-small", "--storage", url, "-o", str(out), "--format", "json")
    assert r.exit_code == 2
    assert r.stderr == (
        f"selector: {out}: the extension says yaml, --format says json; make them agree, "
        "or leave --format out\n"
    )
    assert not out.exists() and selection.recorded(url, "iris-small") is None
    agreed = _sel("export", "iris-small", "--storage", url, "-o", str(out), "--format", "yaml")
    assert agreed.exit_code == 0 and yaml.safe_load(out.read_text())["trial"] >= 0


def test_toml_export_keeps_the_test_block_before_and_after_final(
    searched: tuple[Path, str], evaluated: tuple[Path, str, Result]
) -> None:
    before = _sel("export", "iris-small", "--storage", searched[1], "--format", "toml")
    assert tomllib.loads(before.stdout)["test"] == {"state": "not evaluated"}
    assert json.loads(_sel("export", "iris-small", "--storage", searched[1]).stdout)["test"] is None

    url = evaluated[1]
    as_json = json.loads(_sel("export", "iris-small", "--storage", url).stdout)["test"]
    toml_test = tomllib.loads(
        _sel("export", "iris-small", "--storage", url, "--format", "toml").stdout
    )["test"]
    assert toml_test == {k: v for k, v in as_json.items() if v is not None}
    assert toml_test["state"] == "finished" and toml_test["test_score"] == as_json["test_score"]


@pytest.fixture
def penguins_beside(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A study file in studies/ whose data is `../data/penguins.csv`, as in the repository."""
    (tmp_path / "studies").mkdir()
    (tmp_path / "data").mkdir()
    csv = tmp_path / "data" / "penguins.csv"
    shutil.copy(PENGUINS, csv)
    raw = small_raw(name="penguins-small", n_trials=1, training={"max_epochs": 2})
    raw["data"] = {"path": "../data/penguins.csv", "target": "species", "drop": ["year"]}
    yield write_study(tmp_path / "studies" / "p.toml", raw), csv


def test_data_paths_are_absolute_and_normalised_everywhere(
    penguins_beside: tuple[Path, Path], url: str, tmp_path: Path
) -> None:
    study_file, csv = penguins_beside
    resolved = str(csv.resolve())
    s = spec.load(study_file)
    assert data.load_table(s.data, s.base_dir).origin == resolved
    assert _run(study_file, url).exit_code == 0
    assert record.read_trials(url, "penguins-small")[0]["data"] == resolved  # the study attr
    status = _sel("status", "penguins-small", "--storage", url).output
    assert f"data       {resolved} " in status and ".." not in status
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = elsewhere / "best.json"
    assert _sel("export", "penguins-small", "--storage", url, "-o", str(out)).exit_code == 0
    exported = json.loads(out.read_text())["data"]
    assert exported["path"] == resolved and Path(exported["path"]).is_file()


# --- 3. progress of final and report ------------------------------------------------------------


class Heard:
    """A `final.RefitProgress` that keeps what it is told."""

    def __init__(self) -> None:
        self.started: tuple[int, int, int] | None = None
        self.epochs: list[int] = []

    def start(self, trial: int, rows: int, epochs: int) -> None:
        self.started = (trial, rows, epochs)

    def epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)


def test_final_tells_its_progress_which_trial_it_refits_and_each_epoch(
    tmp_path: Path, url: str
) -> None:
    assert _run(_study(tmp_path), url).exit_code == 0
    heard = Heard()
    done = final.evaluate(url, "iris-small", progress=heard)
    records = record.trials(record.open_study(url, "iris-small")[0])
    chosen = next(r for r in records if r.number == done.result.trial)
    assert heard.started == (done.result.trial, 120, chosen.best_epoch)  # 150 rows, 30 held out
    assert heard.epochs == list(range(1, int(chosen.best_epoch or 0) + 1))


def test_final_prints_the_refit_line_on_stderr_and_keeps_stdout(
    evaluated: tuple[Path, str, Result],
) -> None:
    done = evaluated[2]
    assert re.fullmatch(
        r"refitting trial \d+ on all 120 dev rows for \d+ epochs\.\.\.\n", done.stderr
    ), done.stderr
    assert done.stdout.startswith("study 'iris-small': trial ")


def _tty_stderr(monkeypatch: pytest.MonkeyPatch, tty: bool) -> io.StringIO:
    err = io.StringIO()
    err.isatty = lambda: tty  # type: ignore[method-assign]
    monkeypatch.setattr(sys, "stderr", err)
    return err


@pytest.mark.parametrize("tty", [True, False])
def test_refit_bar_draws_epochs_only_on_a_terminal(
    monkeypatch: pytest.MonkeyPatch, tty: bool
) -> None:
    err = _tty_stderr(monkeypatch, tty)
    with progress.RefitBar() as bar:
        bar.start(3, 120, 4)
        for epoch in range(1, 5):
            bar.epoch(epoch)
        drawn = bar.bar
        assert (drawn is not None and drawn.n == 4) if tty else drawn is None
    lines = err.getvalue()
    assert lines.startswith("refitting trial 3 on all 120 dev rows for 4 epochs...\n")
    assert ("0/4 [" in lines) if tty else lines.count("\n") == 1  # tqdm drew its bar


def test_report_prints_the_seconds_of_the_whole_command(
    searched: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import selector.cli as cli

    slow_target = cli._study_target

    def slowly(study: str, storage: str | None) -> tuple[str, str]:
        time.sleep(1.0)  # silence before the report is written, which the old count left out
        return slow_target(study, storage)

    monkeypatch.setattr(cli, "_study_target", slowly)
    r = _sel("report", "iris-small", "--storage", searched[1], "-o", str(tmp_path / "r.html"))
    assert r.exit_code == 0, r.output
    seconds = float(re.search(r"\(([0-9.]+) s\)$", r.stdout.strip()).group(1))  # type: ignore[union-attr]
    assert seconds >= 1.0 and "writing" not in r.stderr  # the note is for a terminal only


# --- 4. a finished study: nothing to do ---------------------------------------------------------


def test_running_a_finished_study_again_has_nothing_to_do_and_exits_0(
    searched: tuple[Path, str],
) -> None:
    study_file, url = searched
    again = _run(study_file, url)
    assert again.exit_code == 0
    assert again.stdout == "study 'iris-small': nothing to do, all 2 trials finished\n"
    worker = _sel("worker", "iris-small", "--storage", url)
    assert worker.exit_code == 0 and "nothing to do" in worker.stdout
    strict = _run(study_file, url, "--strict")
    assert strict.exit_code == 1 and "already has 2 of its n_trials = 2" in strict.stderr
    assert record.count(record.open_study(url, "iris-small")[0]) == 2


def test_a_sealed_study_is_refused_even_without_strict(evaluated: tuple[Path, str, Result]) -> None:
    study_file, url, _ = evaluated
    r = _run(study_file, url)
    assert r.exit_code == 1 and "is sealed" in r.stderr and "nothing to do" not in r.output


# --- 5. predictions join back onto their rows ---------------------------------------------------


@pytest.fixture(scope="module")
def new_rows(evaluated: tuple[Path, str, Result], tmp_path_factory: pytest.TempPathFactory) -> Path:
    s = spec.load(evaluated[0])
    rows = data.prepare(s).table.X.sample(n=7, random_state=1)
    path = tmp_path_factory.mktemp("rows") / "new.csv"
    rows.assign(note=[f"r{i}" for i in range(7)]).to_csv(path, index=False)
    return path


def test_predictions_start_with_the_row_position(
    evaluated: tuple[Path, str, Result], new_rows: Path, tmp_path: Path
) -> None:
    out = tmp_path / "p.csv"
    r = _sel("predict", "iris-small", str(new_rows), "--storage", evaluated[1], "-o", str(out))
    assert r.exit_code == 0, r.output
    pred = pd.read_csv(out)
    assert list(pred.columns[:2]) == ["row", "prediction"] and list(pred["row"]) == list(range(7))
    assert "note" not in pred.columns


def test_with_input_writes_the_input_columns_before_the_predictions(
    evaluated: tuple[Path, str, Result], new_rows: Path, tmp_path: Path
) -> None:
    out, plain = tmp_path / "p.csv", tmp_path / "plain.csv"
    url = evaluated[1]
    assert (
        _sel("predict", "iris-small", str(new_rows), "--storage", url, "-o", str(plain)).exit_code
        == 0
    )
    r = _sel(
        "predict", "iris-small", str(new_rows), "--storage", url, "-o", str(out), "--with-input"
    )
    assert r.exit_code == 0, r.output
    rows, pred, alone = pd.read_csv(new_rows), pd.read_csv(out), pd.read_csv(plain)
    assert list(pred.columns) == ["row", *rows.columns, *alone.columns[1:]]
    pd.testing.assert_frame_equal(pred[list(rows.columns)], rows)
    pd.testing.assert_frame_equal(pred[list(alone.columns)], alone)


def test_with_input_refuses_an_input_column_named_like_an_output(
    evaluated: tuple[Path, str, Result], new_rows: Path, tmp_path: Path
) -> None:
    clash = tmp_path / "clash.csv"
    pd.read_csv(new_rows).assign(prediction=1).to_csv(clash, index=False)
    r = _sel("predict", "iris-small", str(clash), "--storage", evaluated[1], "--with-input")
    assert r.exit_code == 2 and r.stderr.count("\n") == 1
    assert f"{clash}: column 'prediction' has the name of an output column" in r.stderr


# --- 6. the metric's name: optuna-dashboard and the printed scores -----------------------------


def _dashboard_get(url: str, path: str) -> dict[str, Any]:
    """GET `path` from optuna-dashboard's WSGI app on the study's storage, in this process."""
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []
    body = b"".join(wsgi(url)(environ, lambda s, h, *_: status.append(s)))  # type: ignore[arg-type]
    assert status == ["200 OK"], status
    return json.loads(body)  # type: ignore[no-any-return]


def test_optuna_dashboard_names_the_objective_after_the_metric(searched: tuple[Path, str]) -> None:
    url = searched[1]
    study = optuna.load_study(study_name="iris-small", storage=url)
    assert study.metric_names == ["accuracy"]
    served = _dashboard_get(url, f"/api/studies/{study._study_id}")
    assert served["objective_names"] == ["accuracy"]


@pytest.mark.parametrize(
    "name,score,text",
    [
        ("neg_root_mean_squared_error", -20.6058, "RMSE = 20.61"),
        ("neg_mean_absolute_error", -16.4249, "MAE = 16.42"),
        ("neg_mean_squared_error", -424.6, "MSE = 424.6"),
        ("neg_mean_squared_error", -12345.6, "MSE = 12346"),
        ("neg_log_loss", -0.052341, "log loss = 0.05234"),
        ("accuracy", 0.98551, "accuracy = 0.9855"),
        ("r2", -0.25, "r2 = -0.2500"),
        ("accuracy", None, "accuracy = -"),
    ],
)
def test_scores_are_shown_with_the_errors_sign_undone(
    name: str, score: float | None, text: str
) -> None:
    assert metrics.shown(name, score) == text


def test_an_error_interval_is_shown_lowest_first() -> None:
    assert metrics.shown_range("neg_mean_absolute_error", -21.0, -19.0) == "19.00, 21.00"
    assert metrics.shown_range("accuracy", 0.9, 0.95) == "0.9000, 0.9500"


def test_a_regression_study_prints_rmse_and_its_json_keeps_the_raw_score(
    tmp_path: Path, url: str
) -> None:
    study_file = write_study(
        tmp_path / "diabetes.toml",
        small_raw(
            name="diabetes-small",
            n_trials=1,
            metric="neg_root_mean_squared_error",
            data={"source": "sklearn:diabetes", "test_size": 0.2},
        ),
    )
    ran = _run(study_file, url)
    assert re.search(r"best RMSE = \d+\.\d+ \(trial 0\)", ran.stdout), ran.output
    done = _sel("final", "diabetes-small", "--storage", url)
    assert re.search(r"CV RMSE = \d+\.\d+\n", done.stdout), done.output
    assert re.search(r"^test RMSE = \d+\.\d+ on 89 held-out rows", done.stdout, re.M)
    status = _sel("status", "diabetes-small", "--storage", url).stdout
    assert re.search(r"estimate   CV RMSE = \d+\.\d+, expected test \d+\.\d+ \[90% ", status)
    assert re.search(r"test set   evaluated at .*: RMSE = \d+\.\d+ on 89 rows", status)
    assert "neg_root_mean_squared_error =" not in ran.stdout + done.stdout + status
    raw = json.loads(_sel("status", "diabetes-small", "--storage", url, "--json").stdout)
    assert raw["best"]["value"] < 0 and raw["test_set"]["test_score"] < 0
    shown = float(re.search(r"test RMSE = ([0-9.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    assert shown == pytest.approx(-raw["test_set"]["test_score"], abs=0.01)
    assert summary.status(url, "diabetes-small").metric == "neg_root_mean_squared_error"
