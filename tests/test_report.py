"""`selector report`: one self-contained HTML file with real values; fast and small at 200 trials."""

from __future__ import annotations

import dataclasses
import html
import math
import random
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial
from typer.testing import CliRunner

from selector import final, record, report, spec, study, summary
from selector.cli import app
from selector.model import count_params
from selector.record import TrialRecord
from selector.spec import SpaceSpec
from tests.conftest import small_raw, write_study

runner = CliRunner()


def _sel(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


@pytest.fixture
def ran(tmp_path: Path, url: str) -> tuple[Path, str]:
    study_file = write_study(tmp_path / "iris.toml", small_raw(n_trials=3))
    study.run(spec.load(study_file), url)
    return study_file, url


def _figures(page: str) -> list[str]:
    return re.findall(r'<div class="figure" id="fig-\d+" data-name="([a-z-]+)">', page)


def test_report_is_one_self_contained_file(ran: tuple[Path, str], tmp_path: Path) -> None:
    study_file, url = ran
    code, out = _sel("report", str(study_file), "--storage", url, "-o", str(tmp_path / "r.html"))
    assert code == 0, out
    assert re.match(r"wrote .*r\.html: \d\.\d MB, 3 trials, 6 figures", out)
    page = html.unescape((tmp_path / "r.html").read_text())
    assert not re.search(r"<(script|link|img|iframe)[^>]+(src|href)=", page)  # no network
    assert 'id="plotly-js"' in page and "DecompressionStream" in page
    assert _figures(page) == [
        "cv-scores",
        "gap-vs-size",
        "top-curves",
        "history",
        "importances",
        "parallel",
    ]
    for text in (
        "Top 3 trials",
        "Diagnosis of the complete trials",
        "fold scores",
        "Chosen config: trial ",
        '"rule": "best"',
        "expected test score",
        "sealed",
    ):
        assert text in page, text


def test_report_shows_the_test_score_and_the_optimism_once_final_ran(
    ran: tuple[Path, str], tmp_path: Path
) -> None:
    _, url = ran
    result = final.evaluate(url, "iris-small").result
    report.write(url, "iris-small", tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    assert f"accuracy = {result.test_score:.4f} on 30 rows" in page
    optimism = result.cv_score - result.test_score  # type: ignore[operator]
    assert f"<th>optimism (CV − test)</th><td>{optimism:+.4f}</td>" in page


def test_an_error_metrics_scores_read_as_errors_wherever_the_summary_shows_them(
    tmp_path: Path, url: str
) -> None:
    """RMSE, not neg_root_mean_squared_error: the test score, the chosen trial's CV, the
    expected test score and the trivial predictor, as the summary's estimate line already read
    (a report once showed `RMSE = 52.48` and `neg_root_mean_squared_error = -57.8399` on one
    page). The top-trials table keeps the raw score."""
    raw = small_raw(
        name="diabetes-small",
        metric="neg_root_mean_squared_error",
        n_trials=2,
        data={"source": "sklearn:diabetes", "test_size": 0.2},
    )
    s = spec.load(write_study(tmp_path / "diabetes.toml", raw))
    study.run(s, url)
    result = final.evaluate(url, "diabetes-small").result
    report.write(url, "diabetes-small", tmp_path / "r.html")
    page = html.unescape((tmp_path / "r.html").read_text())
    assert result.test_score is not None and result.cv_score is not None
    assert f"RMSE = {-result.test_score:.4g} on {result.test_rows} rows" in page
    assert f"CV {-result.cv_score:.4g}" in page
    assert "neg_root_mean_squared_error =" not in page
    optimism = result.cv_score - result.test_score
    assert f"<th>optimism (test − CV error)</th><td>{optimism:+.4f}</td>" in page
    baseline = summary.status(url, "diabetes-small").baseline
    assert baseline is not None and f"<td>RMSE = {-baseline:.4g}</td>" in page


def test_optunas_figures_are_drawn_from_trials_read_once(ran: tuple[Path, str]) -> None:
    """The figures Optuna draws from the study itself, drawn from a view of it whose trials
    are not deep-copied at each read (the importances read them once a parameter)."""
    from optuna import visualization as vis

    _, url = ran
    s, _ = record.open_study(url, "iris-small")
    figs, missing = report.optuna_figures(s)
    assert missing == []
    expected = {
        "history": vis.plot_optimization_history(s),
        "importances": vis.plot_param_importances(
            s, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
        ),
        "parallel": vis.plot_parallel_coordinate(s),
    }
    for key, fig in expected.items():
        assert figs[key].to_json() == fig.update_layout(**report.LAYOUT).to_json(), key


def test_figures_hold_the_trials_real_values(ran: tuple[Path, str]) -> None:
    _, url = ran
    s = optuna.load_study(study_name="iris-small", storage=url)
    views = summary.status(url, "iris-small").ranked
    figs = report.study_figures(views, "accuracy")
    axis = figs["cv-scores"].layout.xaxis  # three trials: a tick per trial, none at 0.5
    assert (axis.tickformat, axis.dtick) == ("d", 1)
    points = {
        (x, y, e)
        for tr in figs["cv-scores"].data
        for x, y, e in zip(tr.x, tr.y, tr.error_y.array, strict=True)
    }
    trials = s.get_trials(states=(TrialState.COMPLETE,))
    expected = {
        (t.number, round(float(t.value), 5), round(float(np.std(t.user_attrs["fold_scores"])), 5))  # type: ignore[arg-type]
        for t in trials
    }
    assert points == expected and len(points) == 3
    best = views[0].record
    assert best.number == s.best_trial.number
    curve = figs["top-curves"].data[0]
    assert best.curves is not None
    assert list(curve.y) == [round(v, 5) for v in best.curves.val]
    stored = s.best_trial.intermediate_values  # the per-epoch mean CV score, as reported
    assert list(curve.y) == pytest.approx([stored[e] for e in sorted(stored)], abs=2e-5)


def test_report_of_a_study_without_a_complete_trial(tmp_path: Path, url: str) -> None:
    study_file = write_study(tmp_path / "iris.toml", small_raw())
    assert _sel("create", str(study_file), "--storage", url)[0] == 0
    code, out = _sel("report", "iris-small", "--storage", url, "-o", str(tmp_path / "r.html"))
    assert code == 0, out
    page = (tmp_path / "r.html").read_text()
    assert "<h2>Figures</h2><p>No complete trial yet.</p>" in page
    assert "<h2>Chosen config</h2><p>No complete trial yet.</p>" in page
    assert "<td>no complete trial yet</td>" in page  # no expected test score either


def test_report_bad_input_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    code, out = _sel("report", "x", "--storage", f"sqlite:///{missing}")
    assert code == 2 and "no such database" in out and not missing.exists()


# --- 200 trials ------------------------------------------------------------------------------


def _sample(dist: Any, rng: random.Random) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return rng.choice(dist.choices)
    lo, hi = dist.low, dist.high
    x = math.exp(rng.uniform(math.log(lo), math.log(hi))) if dist.log else rng.uniform(lo, hi)
    return round(x) if isinstance(dist, IntDistribution) else float(x)


def _clone(
    src: TrialRecord, space: SpaceSpec, dists: dict[str, Any], rng: random.Random
) -> FrozenTrial:
    """A trial like `src` (what our objective records) with other params and scores."""
    params = {k: _sample(d, rng) for k, d in dists.items()}
    n_params = count_params(dataclasses.replace(src, params=params).config(space), 4, 3)
    state = rng.choices([TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL], [80, 17, 3])[0]
    if state != TrialState.COMPLETE:
        attrs: dict[str, Any] = {"seed": src.seed, "n_params": n_params, "seconds": src.seconds}
        attrs |= (
            {"pruned_at_epoch": 4} if state == TrialState.PRUNED else {"fail_reason": "diverged"}
        )
        return create_trial(state=state, params=params, distributions=dists, user_attrs=attrs)
    shift = rng.uniform(-0.3, 0.0)
    assert src.curves is not None
    clone = dataclasses.replace(
        src,
        params=params,
        n_params=n_params,
        fold_scores=tuple(min(1.0, max(0.0, v + shift)) for v in src.fold_scores),
        curves=dataclasses.replace(src.curves, folds=np.clip(src.curves.folds + shift, 0.0, 1.0)),
    )
    return create_trial(
        value=float(np.mean(clone.fold_scores)),
        params=params,
        distributions=dists,
        user_attrs=clone.to_user_attrs(),
        system_attrs=clone.to_system_attrs(),
    )


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> str:
    """200 trials: 3 real ones (30 epochs of curves, gradient norms, fold scores), and 197 made
    from them through Optuna's API with other params and scores (complete, pruned, failed).
    Only the real ones carry intermediate values: the report does not read them, and they are
    most of the cost of adding a trial."""
    url = f"sqlite:///{tmp_path_factory.mktemp('big') / 'selector.db'}"
    raw = small_raw(
        name="big",
        training={"max_epochs": 30, "patience": 30},
        space={
            "optimizer": ["adam", "sgd", "adamw"],
            "dropout": {"low": 0.0, "high": 0.4},
            "activation": ["relu", "tanh", "gelu"],
        },
    )
    big_spec = spec.parse(raw, origin="big.toml")
    study.run(big_spec, url)
    s = optuna.load_study(study_name="big", storage=url)
    real = s.get_trials(states=(TrialState.COMPLETE,))
    records = [TrialRecord.from_trial(t) for t in real]
    rng = random.Random(0)
    s.add_trials(
        [
            _clone(records[k % len(real)], big_spec.space, real[0].distributions, rng)
            for k in range(197)
        ]
    )
    return url


def test_report_of_200_trials_takes_under_10_s_and_5_mb(big: str, tmp_path: Path) -> None:
    start = time.perf_counter()
    written = report.write(big, "big", tmp_path / "r.html")
    seconds = time.perf_counter() - start
    assert written.trials == 200 and written.figures == 6
    page = (tmp_path / "r.html").read_text()
    assert "Top 10 trials" in page and "Learning curves of the top 5 trials" in page
    assert seconds < 10, seconds
    assert (tmp_path / "r.html").stat().st_size < 5_000_000
