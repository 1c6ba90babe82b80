"""The lockbox: the test set is evaluated once, claimed before any test row is read."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import optuna
import pytest
import sqlalchemy as sa

from selector import data, db, engine, export, final, record, selection, spec, study
from selector.errors import LockboxError, RefusedError
from selector.record import TrialRecord
from tests.conftest import small_raw


@pytest.fixture
def ran(url: str) -> str:
    study.run(spec.parse(small_raw(n_trials=2), origin="t.toml"), url)
    return url


def crash(*_: Any, **__: Any) -> None:
    """Stands in for the refit: the process dies between the claim and the result."""
    raise RuntimeError("power cut")


def _rows(url: str) -> list[Any]:
    with db.transaction(url) as conn:
        return list(conn.execute(sa.select(db.final)))


def test_final_scores_the_test_set_once_and_records_it(ran: str) -> None:
    result = final.evaluate(ran, "iris-small").result
    assert result.state == "finished" and 0.0 <= result.test_score <= 1.0  # type: ignore[operator]
    assert result.test_rows == 30
    assert (final.artifact_dir(ran, "iris-small") / "model.pt").exists()
    assert len(_rows(ran)) == 1


def test_final_refuses_second_evaluation(ran: str) -> None:
    first = final.evaluate(ran, "iris-small").result
    with pytest.raises(LockboxError, match="already evaluated") as err:
        final.evaluate(ran, "iris-small")
    assert err.value.exit_code == 1
    assert f"{first.test_score:.4f}" in str(err.value)
    assert len(_rows(ran)) == 1


def test_claim_happens_before_any_test_row_is_read(
    ran: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, states = data.test_set, []

    def watched(prep: data.Prepared) -> data.Part:
        states.append([r.state for r in _rows(ran)])
        return real(prep)

    monkeypatch.setattr(data, "test_set", watched)
    final.evaluate(ran, "iris-small")
    assert states == [["claimed"]]


def test_crash_after_claim_never_allows_a_silent_second_evaluation(
    ran: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "fit", crash)
    with pytest.raises(RuntimeError):
        final.evaluate(ran, "iris-small")
    monkeypatch.undo()
    with pytest.raises(LockboxError, match="did not finish"):
        final.evaluate(ran, "iris-small")
    assert [r.state for r in _rows(ran)] == ["claimed"]


def test_the_claim_is_marked_in_the_study_for_grpc_workers_and_again_on_resume(
    ran: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`final` marks its claim in the study (read by workers through a gRPC proxy) before any
    test row is read; a process that died between the claim and the mark leaves it to
    `--resume-crashed`, which marks it."""
    s = optuna.load_study(study_name="iris-small", storage=ran)
    attrs = lambda: s._storage.get_study_system_attrs(s._study_id)  # noqa: E731
    marked = record.mark_opened

    def power_cut(*_: Any) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(record, "mark_opened", power_cut)
    with pytest.raises(RuntimeError):
        final.evaluate(ran, "iris-small")
    assert record.ATTR_OPENED not in attrs() and [r.state for r in _rows(ran)] == ["claimed"]
    monkeypatch.setattr(record, "mark_opened", marked)
    done = final.evaluate(ran, "iris-small", resume_crashed=True)
    mark = attrs()[record.ATTR_OPENED]
    assert mark["trial"] == done.result.trial
    assert record.shown_time(mark["claimed_at"]) == record.shown_time(done.result.claimed_at)


def test_final_on_a_regression_study(url: str) -> None:
    raw = small_raw(
        name="diabetes",
        metric="r2",
        n_trials=1,
        data={"source": "sklearn:diabetes"},
        training={"max_epochs": 20, "patience": 20},
        space={"width": 32, "lr": 0.01, "optimizer": "adam"},
    )
    study.run(spec.parse(raw, origin="d.toml"), url)
    result = final.evaluate(url, "diabetes").result
    assert 0.0 < result.test_score < 1.0  # type: ignore[operator]


def test_concurrent_finals_evaluate_exactly_once(ran: str) -> None:
    """Invariant 4 under a race: six processes, one evaluation, five refusals, one row."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "selector", "final", "iris-small", "--storage", ran]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(6)
    ]
    outs = [(p.wait(timeout=180), p.stderr.read() if p.stderr else "") for p in procs]
    codes = sorted(code for code, _ in outs)
    assert codes == [0, 1, 1, 1, 1, 1], outs
    assert all("Traceback" not in err for _, err in outs)
    assert len(_rows(ran)) == 1 and _rows(ran)[0].state == "finished"


def test_resume_crashed_finishes_once_on_the_record(
    ran: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(LockboxError, match="no evaluation was started"):
        final.evaluate(ran, "iris-small", resume_crashed=True)
    monkeypatch.setattr(engine, "fit", crash)
    with pytest.raises(RuntimeError):
        final.evaluate(ran, "iris-small", "one-se")
    with pytest.raises(RuntimeError):  # the one resume is used up even if it crashes too
        final.evaluate(ran, "iris-small", resume_crashed=True)
    monkeypatch.undo()
    with pytest.raises(LockboxError, match="already resumed once"):
        final.evaluate(ran, "iris-small", resume_crashed=True)


def test_resume_crashed_records_the_resumed_evaluation(
    ran: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine, "fit", crash)
    with pytest.raises(RuntimeError):
        final.evaluate(ran, "iris-small", "one-se")
    monkeypatch.undo()
    result = final.evaluate(ran, "iris-small", resume_crashed=True).result
    assert result.state == "finished" and result.resumed_at is not None
    assert result.rule == "one-se"  # the claimed rule and trial, not the command line's
    with pytest.raises(LockboxError, match="already evaluated"):
        final.evaluate(ran, "iris-small", resume_crashed=True)


def test_final_refuses_before_the_budget_is_spent_unless_early(url: str) -> None:
    s = spec.parse(small_raw(n_trials=3), origin="t.toml")
    study.run(s, url, n_trials=2)
    with pytest.raises(RefusedError, match="2 of its n_trials = 3 finished trials") as err:
        final.evaluate(url, "iris-small")
    assert err.value.exit_code == 1 and "--early" in str(err.value)
    assert _rows(url) == []  # nothing claimed
    done = final.evaluate(url, "iris-small", early=True)
    assert done.result.state == "finished"
    # the study is sealed: no trial runs after the test set was opened
    with pytest.raises(RefusedError, match="is sealed") as err:
        study.run(s, url)
    assert err.value.exit_code == 1
    with pytest.raises(RefusedError, match="is sealed"):
        study.work(url, "iris-small")
    assert record.count(optuna.load_study(study_name="iris-small", storage=url)) == 2


def _export(url: str, rule: selection.Rule | None) -> selection.Choice:
    s, _ = record.open_study(url, "iris-small")
    return export.choose_for_export(url, "iris-small", record.trials(s), rule)


def _add_better_trial(url: str) -> int:
    """A complete trial better than every other (the best one's record, higher scores)."""
    s = optuna.load_study(study_name="iris-small", storage=url)
    best = s.best_trial
    r = TrialRecord.from_trial(best)
    better = dataclasses.replace(r, fold_scores=tuple(min(1.0, x + 0.5) for x in r.fold_scores))
    s.add_trial(
        optuna.trial.create_trial(
            value=float(np.mean(better.fold_scores)),
            params=best.params,
            distributions=best.distributions,
            user_attrs=better.to_user_attrs(),
        )
    )
    return len(s.trials) - 1


def test_final_evaluates_the_choice_export_recorded(ran: str) -> None:
    exported = _export(ran, "one-se")
    assert exported.by == "export"
    newer = _add_better_trial(ran)  # finished after the export: the recorded choice stands
    done = final.evaluate(ran, "iris-small")
    assert (done.choice.rule, done.choice.trial) == ("one-se", exported.trial)
    assert (done.result.rule, done.result.trial) == ("one-se", exported.trial)
    assert newer != exported.trial
    chosen = selection.recorded(ran, "iris-small")  # evaluating it changed no record
    assert chosen is not None and (chosen.by, chosen.trial) == ("export", exported.trial)


def test_final_remarks_when_the_recorded_rule_now_picks_another_trial(ran: str) -> None:
    exported = _export(ran, "best")
    newer = _add_better_trial(ran)
    done = final.evaluate(ran, "iris-small")
    assert done.choice.trial == exported.trial == done.result.trial
    assert done.remark is not None and f"rule best now picks trial {newer}" in done.remark


def test_final_with_a_rule_chooses_anew_and_records_it(ran: str) -> None:
    _export(ran, "best")
    newer = _add_better_trial(ran)
    done = final.evaluate(ran, "iris-small", "best")
    assert done.choice.trial == newer == done.result.trial and done.remark is None
    chosen = selection.recorded(ran, "iris-small")
    assert chosen is not None and (chosen.by, chosen.trial) == ("final", newer)
