"""Export rules and formats; Optuna's own CLI reads our studies."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import optuna
import pytest
import yaml

from selector import export, spec, study
from selector.space import TrialConfig
from tests.conftest import small_raw


@pytest.fixture
def ran(url: str) -> str:
    study.run(spec.parse(small_raw(n_trials=4), origin="t.toml"), url)
    return url


def _doc(url: str, rule: export.Rule = "best") -> dict:  # type: ignore[type-arg]
    s, rec = study.open_study(url, "iris-small")
    return export.document(s, rec, rule, url)


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
    floor = best.value - export.standard_error(best)
    chosen = s.trials[doc["trial"]]
    assert chosen.value >= floor
    for t in s.trials:
        if t.value is not None and t.value >= floor:
            assert chosen.user_attrs["n_params"] <= t.user_attrs["n_params"]


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
