"""Export rules and formats; Optuna's own CLI reads our studies."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import optuna
import pytest
import yaml
from typer.testing import CliRunner

from selector import export, final, record, selection, spec, study
from selector.cli import app
from selector.record import TrialRecord
from selector.space import TrialConfig
from tests.conftest import small_raw

runner = CliRunner()


@pytest.fixture
def ran(url: str) -> str:
    study.run(spec.parse(small_raw(n_trials=4), origin="t.toml"), url)
    return url


def _doc(url: str, rule: selection.Rule | None = "best") -> dict:  # type: ignore[type-arg]
    s, rec = record.open_study(url, "iris-small")
    records = record.trials(s)
    choice = export.choose_for_export(url, "iris-small", records, rule)
    return export.document(s, rec, url, choice, records)


def test_best_is_the_trial_with_the_best_cv_mean(ran: str) -> None:
    doc = _doc(ran)
    s = optuna.load_study(study_name="iris-small", storage=ran)
    assert doc["trial"] == s.best_trial.number and doc["params"] == s.best_trial.params
    assert doc["cv"]["mean"] == s.best_value
    TrialConfig(**{k: v for k, v in doc["config"].items() if k not in ("epochs", "max_epochs")})
    assert doc["config"]["epochs"] == s.best_trial.user_attrs["best_epoch"]


def test_one_se_picks_the_simplest_within_one_standard_error(ran: str) -> None:
    s = optuna.load_study(study_name="iris-small", storage=ran)
    doc = _doc(ran, "one-se")
    best = s.best_trial
    floor = best.value - TrialRecord.from_trial(best).standard_error
    chosen = s.trials[doc["trial"]]
    assert chosen.value >= floor
    for t in s.trials:
        if t.value is not None and t.value >= floor:
            assert chosen.user_attrs["n_params"] <= t.user_attrs["n_params"]


def test_export_records_its_choice_which_a_later_export_keeps(ran: str) -> None:
    assert selection.recorded(ran, "iris-small") is None
    doc = _doc(ran, "one-se")
    chosen = selection.recorded(ran, "iris-small")
    assert chosen is not None and chosen.by == "export"
    assert (chosen.rule, chosen.trial) == ("one-se", doc["trial"])
    again = _doc(ran, None)  # no rule: the recorded choice's rule, not best
    assert again["rule"] == "one-se" and again["trial"] == doc["trial"]


def _add_simpler_twin(url: str) -> int:
    """A complete trial as good as the best (same scores) but far smaller: rule one-se picks it,
    rule best keeps the earlier trial. Returns its number."""
    s = optuna.load_study(study_name="iris-small", storage=url)
    best = s.best_trial
    twin = dataclasses.replace(TrialRecord.from_trial(best), n_params=1)
    s.add_trial(
        optuna.trial.create_trial(
            value=best.value,
            params=best.params,
            distributions=best.distributions,
            user_attrs=twin.to_user_attrs(),
            system_attrs=twin.to_system_attrs(),
        )
    )
    return len(s.trials) - 1


def test_after_final_export_ships_the_evaluated_trial_and_refuses_another_rule(
    ran: str, tmp_path: Path
) -> None:
    twin = _add_simpler_twin(ran)
    s, _ = record.open_study(ran, "iris-small")
    assert selection.choose(record.trials(s), "one-se").number == twin
    evaluated = final.evaluate(ran, "iris-small", "best").result.trial
    assert evaluated != twin
    assert _doc(ran, None)["trial"] == evaluated
    assert _doc(ran, "best")["trial"] == evaluated  # the same trial: allowed
    doc = _doc(ran, None)
    assert doc["test"]["trial"] == evaluated and doc["test"]["state"] == "finished"
    r = runner.invoke(app, ["export", "iris-small", "--storage", ran, "--rule", "one-se"])
    assert r.exit_code == 1 and f"evaluated on trial {evaluated}" in r.output, r.output
    chosen = selection.recorded(ran, "iris-small")  # the refusal recorded nothing
    assert chosen is not None and (chosen.rule, chosen.trial) == ("best", evaluated)
    out = tmp_path / "e.json"
    r = runner.invoke(app, ["export", "iris-small", "--storage", ran, "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["trial"] == evaluated


@pytest.mark.parametrize(
    "fmt,load", [("json", json.loads), ("yaml", yaml.safe_load), ("toml", tomllib.loads)]
)
def test_every_format_round_trips(ran: str, fmt: export.Format, load) -> None:  # type: ignore[no-untyped-def]
    doc = _doc(ran)
    back = load(export.dump(doc, fmt))
    assert back["params"] == doc["params"] and back["trial"] == doc["trial"]


def test_optuna_cli_reads_the_study_and_agrees_with_export(ran: str, tmp_path: Path) -> None:
    optuna_cli = Path(sys.executable).with_name("optuna")
    listed = subprocess.run(
        [str(optuna_cli), "studies", "--storage", ran, "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "iris-small" in [s["name"] for s in json.loads(listed.stdout)]
    best = subprocess.run(
        [
            str(optuna_cli),
            "best-trial",
            "--study-name",
            "iris-small",
            "--storage",
            ran,
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(best.stdout)["params"] == _doc(ran)["params"]
