"""`selector learning-curve`: the chosen config on growing shares of each fold's training rows,
recorded in the study and shown by the report; the verdict's rules on constructed curves."""

from __future__ import annotations

import html
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from selector import data, learning, record, report, selection, spec, study
from selector.cli import app
from selector.errors import SelectorError
from selector.learning import Point
from tests.conftest import ROOT, small_raw, write_study

runner = CliRunner()
SIZES = "0.25,0.5,1.0"


def _sel(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


@dataclass
class Curved:
    """A tiny iris study, its report before and after `learning-curve`, and what it printed."""

    url: str
    before: str  # the report's page before the curve was computed
    after: str  # ... and after
    stale: str  # ... after the study chose another trial
    output: str  # the command's text output
    code: int
    as_json: dict[str, Any]
    stored: dict[str, Any]  # the study system attr after the first run
    test_set_calls: list[str]
    tmp: Path


def _page(url: str) -> str:
    return html.unescape(report.render(url, "iris-small")[0])


@pytest.fixture(scope="module")
def curved(tmp_path_factory: pytest.TempPathFactory) -> Curved:
    tmp = tmp_path_factory.mktemp("learning")
    url = f"sqlite:///{tmp / 'selector.db'}"
    study.run(spec.load(write_study(tmp / "iris.toml", small_raw(n_trials=3))), url)
    before = _page(url)
    calls: list[str] = []

    def sealed(*_: object) -> None:
        calls.append("test_set")
        raise AssertionError("the learning curve opened the test set")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(data, "test_set", sealed)
        code, output = _sel("learning-curve", "iris-small", "--storage", url, "--sizes", SIZES)
        s, _ = record.open_study(url, "iris-small")
        stored = s._storage.get_study_system_attrs(s._study_id)[learning.ATTR]
        _, out_json = _sel(
            "learning-curve", "iris-small", "--storage", url, "--sizes", SIZES, "--json"
        )
    after = _page(url)
    records = record.trials(s)
    other = next(r.number for r in record.complete(records) if r.number != stored["trial"])
    selection.record_choice(url, "iris-small", "best", other, "export")
    return Curved(
        url, before, after, _page(url), output, code, json.loads(out_json), stored, calls, tmp
    )


# --- the command on a real study ---------------------------------------------------------------


def test_curve_of_the_chosen_trial_is_recorded_with_rows_growing_with_size(
    curved: Curved,
) -> None:
    assert curved.code == 0, curved.output
    st = curved.stored
    assert st["sizes"] == [0.25, 0.5, 1.0]
    assert st["rows"] == sorted(st["rows"]) and len(set(st["rows"])) == 3
    assert st["rows"][-1] == 80  # 120 dev rows of iris, 3 folds: 80 training rows each
    for key in ("train_mean", "train_std", "val_mean", "val_std"):
        assert len(st[key]) == 3 and all(0 <= x <= 1 for x in st[key]), key
    assert [len(f) for f in st["val_fold_scores"]] == [3, 3, 3]
    s, _ = record.open_study(curved.url, "iris-small")
    best = record.complete(record.trials(s))[0]
    assert st["trial"] == best.number and st["choice"]["rule"] == "best"


def test_full_share_reproduces_the_chosen_trial_exactly(curved: Curved) -> None:
    s, _ = record.open_study(curved.url, "iris-small")
    trial = next(r for r in record.trials(s) if r.number == curved.stored["trial"])
    np.testing.assert_allclose(curved.stored["val_fold_scores"][-1], trial.fold_scores, atol=1e-6)
    np.testing.assert_allclose(
        curved.stored["train_fold_scores"][-1], trial.train_fold_scores, atol=1e-6
    )


def test_the_test_rows_are_never_touched(curved: Curved) -> None:
    assert curved.code == 0, curved.output
    assert curved.test_set_calls == []


def test_prints_a_table_and_one_verdict(curved: Curved) -> None:
    lines = curved.output.splitlines()
    assert lines[0].startswith(f"learning curve of trial {curved.stored['trial']} (rule best")
    assert [line.split()[:2] for line in lines[2:5]] == [
        ["25%", str(curved.stored["rows"][0])],
        ["50%", str(curved.stored["rows"][1])],
        ["100%", "80"],
    ]
    kinds = ("more data would help:", "the gap is closing:", "the model has saturated:")
    assert sum(lines[5].startswith(k) for k in kinds) == 1, lines[5]
    assert "selector:learning_curve" in lines[6]


def test_a_second_run_records_the_same_curve_and_json_shows_it(curved: Curved) -> None:
    j = curved.as_json
    assert j["study"] == "iris-small"
    for key in ("trial", "sizes", "rows", "val_mean", "val_std", "train_mean", "train_std"):
        assert j[key] == curved.stored[key], key
    assert j["verdict"]["kind"] in (
        "more data would help",
        "the gap is closing",
        "the model has saturated",
    )
    assert j["verdict"]["sentence"].startswith(j["verdict"]["kind"] + ":")


def test_report_hints_at_the_command_before_and_shows_the_curve_after(curved: Curved) -> None:
    assert "Not computed yet: run <code>selector learning-curve iris-small</code>" in curved.before
    assert 'data-name="learning-curve"' not in curved.before
    page = curved.after
    assert "Not computed yet" not in page
    assert f"Learning curve over training-set size: trial {curved.stored['trial']}" in page
    assert 'data-name="learning-curve"' in page and 'id="fig-learning-curve-data"' in page
    assert curved.as_json["verdict"]["sentence"] in page
    fig = json.loads(page.split('id="fig-learning-curve-data">')[1].split("</script>")[0])
    assert [t["name"] for t in fig["data"]] == ["train", "validation"]
    assert fig["data"][1]["x"] == curved.stored["rows"]
    np.testing.assert_allclose(
        fig["data"][1]["error_y"]["array"], curved.stored["val_std"], atol=1e-5
    )


def test_report_says_to_run_again_once_the_study_chooses_another_trial(curved: Curved) -> None:
    assert f"Computed for trial {curved.stored['trial']}; the study now chooses trial" in (
        curved.stale
    )
    assert "Computed for trial" not in curved.after


def test_report_with_a_stored_curve_still_imports_no_torch(curved: Curved) -> None:
    out = curved.tmp / "r.html"
    code = (
        "from selector.cli import main\ntry:\n"
        f"    main(['report', 'iris-small', '--storage', {curved.url!r}, '-o', {str(out)!r}])\n"
        "except SystemExit as e:\n    assert not e.code, e.code\n"
        "import sys\nheavy = [m for m in ('torch', 'selector.engine', 'selector.objective') "
        "if m in sys.modules]\nassert not heavy, heavy\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'data-name="learning-curve"' in out.read_text()


def test_bad_sizes_are_refused_before_the_study_is_read(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'none.db'}"
    for sizes, says in (("0,0.5", "0 is not a share"), ("0.5,1.5", "1.5"), ("1.0", "two")):
        code, out = _sel("learning-curve", "nosuch", "--storage", url, "--sizes", sizes)
        assert code == 2 and "--sizes" in out and says in out, out
    assert not (tmp_path / "none.db").exists()


def test_a_study_without_a_complete_trial_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'selector.db'}"
    study_file = write_study(tmp_path / "iris.toml", small_raw())
    assert _sel("create", str(study_file), "--storage", url)[0] == 0
    code, out = _sel("learning-curve", "iris-small", "--storage", url)
    assert code == 1 and "no complete trial" in out, out


# --- sizes and subsamples ----------------------------------------------------------------------


def test_parse_sizes_sorts_and_drops_repeats() -> None:
    assert learning.parse_sizes("1.0, 0.25,0.5,0.25") == (0.25, 0.5, 1.0)
    for bad in ("a,b", "nan,1", "-0.1,1"):
        with pytest.raises(SelectorError, match="--sizes"):
            learning.parse_sizes(bad)


def test_subsample_is_stratified_seeded_nested_and_in_order() -> None:
    rows = np.arange(100, 400)  # 300 training rows: 200 of class 0, 100 of class 1
    labels = np.array([0, 0, 1] * 100)
    half = learning.subsample(rows, labels, 0.5, seed=1)
    quarter = learning.subsample(rows, labels, 0.25, seed=1)
    assert len(half) == 150 and np.bincount(labels[half - 100]).tolist() == [100, 50]
    assert np.bincount(labels[quarter - 100]).tolist() == [50, 25]
    assert set(quarter) <= set(half)  # nested
    assert np.all(np.diff(half) > 0)  # the rows keep their order
    assert np.array_equal(half, learning.subsample(rows, labels, 0.5, seed=1))
    assert not np.array_equal(half, learning.subsample(rows, labels, 0.5, seed=2))
    assert learning.subsample(rows, labels, 1.0, seed=1) is rows


def test_subsample_keeps_every_class_and_two_regression_rows() -> None:
    rows, labels = np.arange(50), np.array([0] * 48 + [1, 2])
    tiny = learning.subsample(rows, labels, 0.01, seed=0)
    assert sorted(set(labels[tiny])) == [0, 1, 2]
    assert len(learning.subsample(rows, None, 0.01, seed=0)) == learning.MIN_REGRESSION_ROWS


# --- the verdict on constructed curves -----------------------------------------------------------


def _curve(val: list[float], train: list[float], spread: float) -> list[Point]:
    """Points of two folds each, `spread` either side of the mean: the fold spread is `spread`."""
    rows = [10 * (k + 1) for k in range(len(val))]
    return [
        Point(n / rows[-1], n, (t - spread, t + spread), (v - spread, v + spread))
        for n, v, t in zip(rows, val, train, strict=True)
    ]


def test_validation_rising_beyond_the_fold_spread_means_more_data_would_help() -> None:
    v = learning.verdict(_curve([0.6, 0.7, 0.8, 0.9], [1.0, 1.0, 1.0, 1.0], 0.02), "accuracy")
    assert v.kind == "more data would help"
    assert v.sentence.startswith("more data would help: validation accuracy rose by 0.1000")


def test_a_rise_equal_to_the_fold_spread_is_not_enough() -> None:
    points = _curve([0.25, 0.375, 0.5], [0.5, 0.625, 0.75], 0.125)  # exact in binary
    assert learning.verdict(points, "accuracy").kind == "the model has saturated"


def test_a_flat_validation_curve_means_saturated() -> None:
    val = [0.6, 0.8, 0.85, 0.851]
    v = learning.verdict(_curve(val, [x + 0.05 for x in val], 0.02), "accuracy")
    assert v.kind == "the model has saturated"
    assert "changed by +0.0010" in v.sentence and "within the fold spread (0.0200)" in v.sentence


def test_a_shrinking_gap_while_validation_still_rises_means_the_gap_is_closing() -> None:
    v = learning.verdict(_curve([0.70, 0.80, 0.85, 0.86], [1.0, 0.98, 0.96, 0.95], 0.02), "f1")
    assert v.kind == "the gap is closing"
    assert "fell from 0.3000 to 0.0900" in v.sentence


def test_no_closing_gap_when_it_widens_at_the_end_or_validation_stops_rising() -> None:
    widening = _curve([0.70, 0.80, 0.85, 0.86], [1.0, 0.98, 0.96, 0.99], 0.02)
    falling = _curve([0.70, 0.80, 0.86, 0.85], [1.0, 0.98, 0.96, 0.94], 0.02)
    small = _curve([0.80, 0.80, 0.85, 0.86], [0.89, 0.98, 0.96, 0.95], 0.02)  # shrank 0.0 overall
    for points in (widening, falling, small):
        assert learning.verdict(points, "accuracy").kind == "the model has saturated"


def test_a_fall_beyond_the_spread_is_called_saturated_and_says_so() -> None:
    v = learning.verdict(_curve([0.7, 0.9, 0.8], [1.0, 1.0, 1.0], 0.02), "accuracy")
    assert v.kind == "the model has saturated" and "a fall of more than" in v.sentence


def test_verdict_reads_points_by_share_whatever_their_order() -> None:
    points = _curve([0.6, 0.7, 0.8, 0.9], [1.0, 1.0, 1.0, 1.0], 0.02)
    assert learning.verdict(points[::-1], "accuracy") == learning.verdict(points, "accuracy")
    with pytest.raises(ValueError, match="two sizes"):
        learning.verdict(points[:1], "accuracy")


def test_stored_curve_round_trips_through_the_attr() -> None:
    curve = learning.LearningCurve(
        study="s",
        trial=3,
        choice=selection.Choice("one-se", 3, "export", "2026-01-01T00:00:00+00:00"),
        metric="r2",
        points=tuple(_curve([0.5, 0.6], [0.7, 0.65], 0.01)),
        computed_at="2026-01-02T00:00:00+00:00",
        seconds=1.5,
    )
    back = learning.LearningCurve.from_attr("s", json.loads(json.dumps(curve.to_attr())))
    assert back.trial == 3 and back.choice == curve.choice and back.metric == "r2"
    assert [p.rows for p in back.points] == [10, 20]
    np.testing.assert_allclose([p.val for p in back.points], [0.5, 0.6])


def test_a_rise_to_folds_that_all_agree_is_judged_by_the_noise_before_it() -> None:
    # penguins: 0.9964 ± 0.0073 at 75%, then every fold at 1.0: the rise is within the noise
    prev = Point(0.75, 165, (0.99, 0.99, 0.99, 0.99, 0.99), (1.0, 1.0, 0.982, 1.0, 1.0))
    last = Point(1.0, 220, (0.99, 0.99, 0.99, 0.99, 0.99), (1.0, 1.0, 1.0, 1.0, 1.0))
    first = Point(0.5, 110, (0.99, 0.99, 0.99, 0.99, 0.99), (1.0, 0.982, 1.0, 1.0, 1.0))
    assert learning.verdict([first, prev, last], "accuracy").kind == "the model has saturated"
