"""The Python API: what the command line does, returning objects and frames, by one
implementation (the CLI's run, status and export call it)."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml
from sklearn.datasets import load_iris
from typer.testing import CliRunner

import selector
from selector import api, progress, record, study, summary
from selector.cli import app
from selector.errors import RefusedError, SelectorError, SpecError
from tests.conftest import ROOT, small_raw, write_study


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> selector.Study:
    """A finished 2-trial iris study, run through the API in this process."""
    url = f"sqlite:///{tmp_path_factory.mktemp('api') / 'selector.db'}"
    s = selector.Study(small_raw(n_trials=2), storage=url)
    summary = s.run(workers=1, progress=False)
    assert summary.finished == 2 and summary.ran == 2
    return s


def test_load_study_spec_gives_the_same_spec_from_a_file_or_a_dict(tmp_path: Path) -> None:
    raw = small_raw()
    from_file = selector.load_study_spec(write_study(tmp_path / "iris.toml", raw))
    from_dict = selector.load_study_spec(raw)
    as_tuples = selector.load_study_spec({**raw, "space": {**raw["space"], "width": (8, 16)}})
    assert isinstance(from_dict, selector.StudySpec)
    assert from_file.spec_hash() == from_dict.spec_hash() == as_tuples.spec_hash()
    assert from_file.space == from_dict.space and from_dict.base_dir == str(Path.cwd())


def test_a_bad_dict_is_refused_with_every_problem_named() -> None:
    raw = {**small_raw(metric="acuracy"), "space": {"depht": 2}}
    with pytest.raises(SpecError) as e:
        selector.load_study_spec(raw)
    lines = str(e.value).splitlines()
    assert lines == [
        "study dict: metric: metric 'acuracy' is not supported (did you mean 'accuracy'?); "
        + lines[0].split("; ", 1)[1],
        "study dict: space.depht: unknown key (did you mean 'depth'?)",
    ]


def test_the_storage_follows_the_command_lines_rules(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert selector.Study(small_raw()).storage == f"sqlite:///{tmp_path / 'selector.db'}"
    in_file = small_raw(storage="sqlite:///from-file.db")
    assert selector.Study(in_file).storage == f"sqlite:///{tmp_path / 'from-file.db'}"
    monkeypatch.setenv("SELECTOR_STORAGE", "sqlite:///from-env.db")
    assert selector.Study(in_file).storage == f"sqlite:///{tmp_path / 'from-env.db'}"
    given = selector.Study(in_file, storage="sqlite:///given.db")
    assert given.storage == f"sqlite:///{tmp_path / 'given.db'}"


@pytest.mark.parametrize(
    ("arguments", "says"),
    [
        ({"n_trials": 0}, "n_trials: give a whole number >= 1 (or None), got 0"),
        ({"n_trials": -1}, "n_trials: give a whole number >= 1 (or None), got -1"),
        ({"workers": 0}, "workers: give a whole number >= 1"),
        ({"threads": 2.5}, "threads: give a whole number >= 1 (or None), got 2.5"),
        ({"threads": 10_000}, "threads 10000: more than 4 x the"),
        ({"timeout": -5}, "timeout: give seconds >= 0 (or None), got -5"),
        ({"timeout": float("nan")}, "timeout: give seconds >= 0"),
        ({"fuse": "bogus"}, "fuse bogus: give a whole number from 1 to 64, or auto"),
        ({"fuse": 0}, "fuse 0: give a whole number from 1 to 64, or auto"),
        ({"fuse": True}, "fuse True: give a whole number"),
    ],
)
def test_run_refuses_arguments_the_command_line_would(
    url: str, arguments: dict[str, Any], says: str
) -> None:
    """Checked as the command line checks its options, before the study is created: a typo
    such as n_trials=-1 once ran nothing and reported a budget of -1."""
    s = selector.Study(small_raw(n_trials=1), storage=url)
    with pytest.raises(SelectorError) as refused:
        s.run(progress=False, **arguments)
    assert says in str(refused.value)
    assert not Path(url.removeprefix("sqlite:///")).exists()  # nothing created


def test_learning_curve_sizes_are_shares_checked_as_the_commands() -> None:
    with pytest.raises(SelectorError, match=r"sizes: 2 is not a share of the training rows"):
        api.learning_curve("any", [0.5, 2.0], storage="sqlite:///never.db")
    with pytest.raises(SelectorError, match=r"sizes \['a'\]: give numbers"):
        api.learning_curve("any", ["a"], storage="sqlite:///never.db")  # type: ignore[list-item]
    with pytest.raises(SelectorError, match="at least two different shares"):
        api.learning_curve("any", [0.5, 0.5], storage="sqlite:///never.db")


def test_a_status_prints_as_the_command_shows_it(ran: selector.Study) -> None:
    """In a notebook or at a prompt a status reads as `selector status` prints it; its repr is
    one line, and a trial's repr leaves its curves' arrays out."""
    status = ran.status()
    assert str(status) == summary.status_text(status)
    assert repr(status).startswith(f"<StudyStatus {ran.name!r}: ") and "\n" not in repr(status)
    printed: list[str] = []  # IPython's printer, as `_repr_pretty_` is called with it
    status._repr_pretty_(types.SimpleNamespace(text=printed.append), False)
    assert printed == [str(status)]
    record = status.trials[0].record
    assert "Curves(folds=3, epochs=" in repr(record) and "array(" not in repr(record)


def test_results_read_back_as_objects(ran: selector.Study) -> None:
    st = ran.status()
    assert isinstance(st, selector.StudyStatus) and st.finished == 2
    assert st.choice is not None and st.estimate is not None and st.lockbox == "sealed"
    records = ran.trials()
    assert [r.number for r in records] == [0, 1]
    assert all(isinstance(r, selector.TrialRecord) and r.complete for r in records)
    by_name = selector.Study("iris-small", storage=ran._url)
    assert by_name.spec.spec_hash() == ran.spec.spec_hash()  # the spec the study recorded


def test_trials_frame_has_one_row_per_trial_with_folds_and_params(ran: selector.Study) -> None:
    frame = ran.trials_frame()
    records = ran.trials()
    assert list(frame["number"]) == [r.number for r in records]
    assert list(frame.columns[: len(api.FRAME_COLUMNS)]) == list(api.FRAME_COLUMNS)
    folds = frame[["fold_0", "fold_1", "fold_2"]].to_numpy()
    assert folds.tolist() == [list(r.fold_scores) for r in records]
    assert frame["value"].tolist() == [r.value for r in records]
    assert frame["param_width"].tolist() == [r.params["width"] for r in records]
    assert frame["diagnosis"].notna().all() and (frame["state"] == "complete").all()
    assert (frame["gap"] == frame["train_score"] - frame["value"]).all()


def test_curves_of_a_trial_one_row_per_epoch(ran: selector.Study) -> None:
    r = ran.trials()[1]
    curves = ran.curves(1)
    assert len(curves) == r.epochs_run and curves.index[0] == 1
    folds = curves[["fold_0", "fold_1", "fold_2"]]
    assert (folds.mean(axis=1) - curves["val"]).abs().max() < 1e-12
    assert {"loss", "grad_0"} <= set(curves.columns)
    with pytest.raises(SelectorError, match="has no trial 9"):
        ran.curves(9)


def test_export_returns_the_document_writes_it_and_records_the_choice(
    ran: selector.Study, tmp_path: Path
) -> None:
    out = tmp_path / "best.yaml"
    doc = ran.export(rule="one-se", path=out)
    assert yaml.safe_load(out.read_text()) == json.loads(json.dumps(doc, default=str))
    assert doc["rule"] == "one-se" and doc["cv"]["fold_scores"]
    choice = ran.status().choice
    assert choice is not None and (choice.rule, choice.by) == ("one-se", "export")
    with pytest.raises(SelectorError, match="rule: unknown value 'worst'"):
        ran.export(rule="worst")  # type: ignore[arg-type]


def test_final_predict_and_report_take_and_give_frames(url: str, tmp_path: Path) -> None:
    s = selector.Study(small_raw(n_trials=1), storage=url)
    s.run(workers=1, progress=False)
    # a rule no type check caught is refused before the lockbox is touched: nothing chosen,
    # recorded or opened (it once ran the evaluation and left a choice `status` could not read)
    with pytest.raises(SelectorError, match="rule: unknown value 'worst'; use one of best"):
        s.final(rule="worst", progress=False)  # type: ignore[arg-type]
    before = s.status()
    assert before.lockbox == "sealed" and before.choice is not None and before.choice.by is None
    done = s.final(progress=False)
    assert done.result.test_rows == 30 and 0.0 <= done.result.test_score <= 1.0  # type: ignore[operator]
    X, y = load_iris(return_X_y=True, as_frame=True)
    X.columns = [str(c) for c in X.columns]
    pred = s.predict(X.assign(target=y))
    assert len(pred) == len(X) and list(pred["row"]) == list(range(len(X)))
    proba = pred[[c for c in pred.columns if c.startswith("proba_")]]
    assert proba.shape[1] == 3 and (proba.sum(axis=1) - 1).abs().max() < 1e-9
    written = s.report(tmp_path / "r.html")
    assert written.trials == 1 and "iris-small" in (tmp_path / "r.html").read_text()
    with pytest.raises(RefusedError, match="already evaluated"):
        s.final(progress=False)


def test_a_study_without_a_test_set_holds_back_no_rows_and_final_refuses_it(url: str) -> None:
    spec = selector.load_study_spec(small_raw(data={"source": "sklearn:iris", "test_size": 0}))
    _, prep, _ = study.create_or_resume(spec, url)
    assert len(prep.test) == 0 and len(prep.dev) == 150
    with pytest.raises(RefusedError, match=r"holds back no test set \(data.test_size = 0\)"):
        selector.Study("iris-small", storage=url).final(progress=False)
    from selector import summary

    st = selector.Study("iris-small", storage=url).status()
    assert st.lockbox == "no test set" and "holds back no test rows" in summary.status_text(st)


def test_the_bar_is_drawn_in_a_jupyter_kernel(
    ran: selector.Study, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert not progress.interactive()  # pytest captures stderr: one line per trial
    kernel = types.SimpleNamespace(config={"IPKernelApp": {}})
    fake = types.ModuleType("IPython")
    fake.get_ipython = lambda: kernel  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert progress.interactive()
    optuna_study, _ = record.open_study(ran._url, ran.name)
    with progress.Bar(None) as bar:
        for t in optuna_study.get_trials():
            bar.update(optuna_study, t)
        assert bar.bar is not None and (bar.bar.n, bar.bar.total) == (2, 2)


def test_the_cli_calls_the_api(ran: selector.Study, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    for name in ("status", "export"):
        real = getattr(api, name)
        monkeypatch.setattr(
            api, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k)
        )
    runner = CliRunner()
    for command in ("status", "export"):
        r = runner.invoke(app, [command, ran.name, "--storage", ran._url])
        assert r.exit_code == 0, r.output
    assert calls == ["status", "export"]


def test_import_selector_is_light_and_reading_imports_no_torch(ran: selector.Study) -> None:
    code = (
        "import sys, inspect\n"
        "import selector\n"
        "assert not {'torch', 'optuna', 'sklearn'} & set(sys.modules), 'heavy at import'\n"
        "from selector import export\n"
        "assert inspect.ismodule(export)\n"
        f"s = selector.Study({ran.name!r}, storage={ran._url!r})\n"
        "assert s.status().finished == 2 and len(s.trials_frame()) == 2\n"
        "assert 'torch' not in sys.modules, 'torch imported by reading'\n"
        "assert sorted(selector.__all__) == sorted(n for n in selector.__all__ "
        "if hasattr(selector, n))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_empty_study_has_an_empty_frame(url: str) -> None:
    spec = selector.load_study_spec(small_raw())
    study.create_or_resume(spec, url)
    frame = selector.Study(spec, storage=url).trials_frame()
    assert frame.empty and list(frame.columns) == list(api.FRAME_COLUMNS)
    assert isinstance(frame, pd.DataFrame)


def test_a_notebook_runs_a_study_looks_at_a_frame_and_a_figure_and_ships_onnx(
    url: str, tmp_path: Path
) -> None:
    """The whole notebook path, no shell: run, a DataFrame, a figure, the test set once, an
    ONNX file that gives the final model's probabilities, and the learning curve."""
    import numpy as np
    import onnxruntime as ort

    from selector import onnx_export

    s = selector.Study(small_raw(n_trials=2), storage=url)
    s.run(workers=1, progress=False)
    frame = s.trials_frame()
    assert len(frame) == 2 and frame["diagnosis"].notna().any()
    figs = s.figures()
    assert {"cv-scores", "gap-vs-size", "top-curves"} <= set(figs)
    assert figs["cv-scores"].to_dict()["data"]  # a plotly figure, ready to show
    s.final(progress=False)
    done = s.export_onnx(tmp_path / "model.onnx")
    assert Path(done.path).stat().st_size > 0
    X, _ = load_iris(return_X_y=True, as_frame=True)
    X.columns = [str(c) for c in X.columns]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"))
    from selector import artifact, predict

    bundle = artifact.load(predict.model_dir(url, "iris-small"))
    got = session.run(["probabilities"], onnx_export.feeds(bundle.pre, X))[0]
    want = s.predict(X)[[f"proba_{c}" for c in bundle.meta.classes]].to_numpy()
    assert np.abs(got - want).max() <= 1e-5
    curve = s.learning_curve([0.5, 1.0])
    assert [round(p.share, 2) for p in curve.points] == [0.5, 1.0]
