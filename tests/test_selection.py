"""One chosen trial from export to predict, a sealed study, the expected test score, and read
commands that never load the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from selector import export, final, record, selection, spec, study, summary
from selector.cli import main
from selector.errors import RefusedError
from tests.conftest import ROOT, small_raw, write_study


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


@pytest.fixture
def done(url: str) -> str:
    """A finished 4-trial iris study whose rules pick different trials."""
    study.run(spec.parse(small_raw(n_trials=4), origin="t.toml"), url)
    return url


def _records(url: str) -> list[record.TrialRecord]:
    s, _ = record.open_study(url, "iris-small")
    return record.trials(s)


def test_export_records_its_choice_and_final_evaluates_that_trial(
    done: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    records = _records(done)
    one_se = selection.choose(records, "one-se").number
    code, out, _ = _cli(capsys, "export", "iris-small", "--storage", done, "--rule", "one-se")
    assert code == 0 and json.loads(out)["trial"] == one_se
    assert selection.recorded(done, "iris-small") == selection.Choice(
        "one-se",
        one_se,
        "export",
        selection.recorded(done, "iris-small").at,  # type: ignore[union-attr]
    )
    code, out, _ = _cli(capsys, "final", "iris-small", "--storage", done)
    assert code == 0
    assert f"trial {one_se} (rule one-se, recorded by export" in out
    prev = record.stored_final(done, "iris-small")
    assert prev is not None and prev.trial == one_se and prev.rule == "one-se"
    # every later view shows the evaluated trial with its test score
    code, out, _ = _cli(capsys, "export", "iris-small", "--storage", done)
    doc = json.loads(out)
    assert doc["trial"] == one_se and doc["test"]["trial"] == one_se
    assert doc["test"]["test_score"] == prev.test_score
    st = summary.status(done, "iris-small")
    assert st.choice is not None and st.choice.trial == one_se and st.choice.evaluated
    page = (tmp_path / "r.html").resolve()
    assert _cli(capsys, "report", "iris-small", "--storage", done, "-o", str(page))[0] == 0
    assert f"Chosen config: trial {one_se} (rule one-se, evaluated on the test set)" in (
        page.read_text()
    )
    rows = tmp_path / "rows.csv"
    from sklearn.datasets import load_iris

    frame = load_iris(as_frame=True).frame.drop(columns="target")
    frame.to_csv(rows, index=False)
    code, out, _ = _cli(
        capsys, "predict", "iris-small", str(rows), "--storage", done, "-o", str(tmp_path / "p.csv")
    )
    assert code == 0 and f"trial {one_se}" in out


def test_after_final_an_export_by_another_rule_is_refused(
    done: str, capsys: pytest.CaptureFixture[str]
) -> None:
    records = _records(done)
    best = selection.choose(records, "best").number
    other = next(r.number for r in record.complete(records) if r.number != best)
    selection.record_choice(done, "iris-small", "one-se", other, "export")  # as if one-se chose it
    assert final.evaluate(done, "iris-small").result.trial == other
    code, _, err = _cli(capsys, "export", "iris-small", "--storage", done, "--rule", "best")
    assert code == 1 and f"evaluated on trial {other}" in err
    with pytest.raises(RefusedError, match="new study"):
        selection.record_choice(done, "iris-small", "best", best, "export")


def test_final_with_a_rule_chooses_anew_and_records_it(done: str) -> None:
    export.choose_for_export(done, "iris-small", _records(done), "one-se")
    result = final.evaluate(done, "iris-small", "best")
    best = selection.choose(_records(done), "best").number
    assert result.choice.trial == best == result.result.trial
    assert selection.recorded(done, "iris-small").by == "final"  # type: ignore[union-attr]


def test_final_refuses_while_the_budget_is_not_spent_unless_early(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    study.run(spec.parse(small_raw(n_trials=4), origin="t.toml"), url, n_trials=2)
    code, _, err = _cli(capsys, "final", "iris-small", "--storage", url)
    assert code == 1
    assert "2 of its n_trials = 4" in err and "--early" in err
    assert record.stored_final(url, "iris-small") is None
    assert _cli(capsys, "final", "iris-small", "--storage", url, "--early")[0] == 0


def test_a_sealed_study_runs_no_more_trials(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_study(tmp_path / "s.toml", small_raw(n_trials=4))
    study.run(spec.load(path), url, n_trials=2)
    final.evaluate(url, "iris-small", early=True)
    code, _, err = _cli(capsys, "run", str(path), "--storage", url, "--workers", "1")
    assert code == 1 and "sealed" in err and "new name" in err
    code, _, err = _cli(capsys, "worker", "iris-small", "--storage", url)
    assert code == 1 and "sealed" in err
    s, _ = record.open_study(url, "iris-small")
    assert record.count(s) == 2
    with pytest.raises(RefusedError, match="sealed"):
        study.run(spec.load(path), url)


def test_status_json_lists_every_trial_the_choice_and_the_estimate(
    done: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _cli(capsys, "status", "iris-small", "--storage", done, "--json")
    info = json.loads(out)
    assert code == 0 and len(info["trials"]) == 4
    for t in info["trials"]:
        assert {"number", "state", "value", "train_score", "diagnosis"} <= set(t)
    complete = [t for t in info["trials"] if t["state"] == "complete"]
    assert complete and all(t["diagnosis"] for t in complete)
    assert info["choice"]["rule"] == "best" and info["choice"]["by"] is None
    est = info["estimate"]
    assert est["low"] <= est["value"] <= est["high"] and est["n_candidates"] == len(complete)


def test_status_never_writes(done: str) -> None:
    db_file = Path(done.removeprefix("sqlite:///"))
    before = db_file.read_bytes()
    summary.status(done, "iris-small")
    summary.studies(done)
    assert db_file.read_bytes() == before


@pytest.mark.parametrize("command", ["status", "studies", "export", "report", "dashboard"])
def test_read_commands_import_neither_torch_nor_the_engine(
    done: str, command: str, tmp_path: Path
) -> None:
    args = {
        "status": ["status", "iris-small"],
        "studies": ["studies"],
        "export": ["export", "iris-small"],
        "report": ["report", "iris-small", "-o", str(tmp_path / "r.html")],
    }.get(command)
    call = (
        f"from selector.cli import main\ntry:\n    main({[*args, '--storage', done]!r})\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        if args is not None
        else "from selector import dashboard\nfrom selector import storage\n"
        f"st, names = dashboard.studies({done!r})\n"
        f"assert dashboard.publish({done!r}, st, names[0]) is not None\n"
    )
    code = (
        call + "import sys\nheavy = [m for m in ('torch', 'selector.engine', 'selector.stacked', "
        "'selector.objective', 'selector.worker', 'selector.study', 'selector.final') "
        "if m in sys.modules]\nassert not heavy, heavy\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_on_shuffled_labels_the_estimate_sits_at_chance_while_the_best_cv_does_not(
    tmp_path: Path, url: str
) -> None:
    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame(rng.normal(size=(n, 6)), columns=[f"x{i}" for i in range(6)])
    frame["label"] = rng.permutation(np.repeat(["a", "b"], n // 2))
    frame.to_csv(tmp_path / "noise.csv", index=False)
    raw = small_raw(
        name="noise",
        n_trials=24,
        cv={"folds": 4},
        training={"max_epochs": 10, "patience": 10},
        space={
            "depth": 1,
            "width": [4, 8, 16, 32],
            "optimizer": "adam",
            "lr": {"low": 1e-3, "high": 1e-1, "log": True},
            "batch_size": 16,
        },
    )
    raw["data"] = {"path": str(tmp_path / "noise.csv"), "target": "label", "test_size": 0.2}
    study.run(spec.parse(raw, origin="noise.toml", base_dir=str(tmp_path)), url)
    st = summary.status(url, "noise")
    assert st.estimate is not None and st.best is not None
    raw_best = float(st.best.record.value)  # type: ignore[arg-type]
    assert raw_best > 0.56  # the maximum of 24 noisy scores is optimistic
    assert abs(st.estimate.value - 0.5) < 0.05
    assert st.estimate.low <= 0.5 <= st.estimate.high
    assert st.estimate.value < raw_best - 0.03
