"""BBC-CV (`selector.estimate`): unbiased on noise, exact against a per-sample reference."""

from __future__ import annotations

import subprocess
import sys
import warnings
from collections.abc import Sequence

import numpy as np
import pytest

from selector import estimate, metrics
from selector.estimate import Candidate, Selection, bbc_cv


def _noise_candidates(rng: np.random.Generator, n: int, count: int) -> list[Candidate]:
    return [Candidate(i, rng.integers(0, 2, n), 100, 10) for i in range(count)]


def _labels_right_on(y: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Binary predictions that are right exactly where `right` is True."""
    return np.where(right, y, 1 - y)


# --- the slow reference: scikit-learn, one bootstrap sample and one candidate at a time -------


def _score(metric: str, y: np.ndarray, pred: np.ndarray) -> float:
    m = metrics.get(metric)
    if m.needs == "labels" and pred.ndim == 2:
        pred = pred.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return m.score(y, pred, pred.shape[1] if pred.ndim == 2 else 0)


def _reference_choice(
    metric: str,
    candidates: Sequence[Candidate],
    y: np.ndarray,
    fold_of_row: np.ndarray,
    at: np.ndarray,
    rule: str,
) -> int:
    """`export.choose` on the rows `at` (repeats allowed): each candidate's score on them, and
    for one-se the best's per-fold scores on each fold's rows among them."""
    scores = [_score(metric, y[at], c.oof[at]) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: scores[i])
    if rule == "best":
        return best
    folds = [at[fold_of_row[at] == k] for k in np.unique(fold_of_row)]
    per_fold = [_score(metric, y[f], candidates[best].oof[f]) for f in folds if len(f)]
    se = np.std(per_fold, ddof=1) / np.sqrt(len(per_fold)) if len(per_fold) > 1 else 0.0
    near = [i for i in range(len(candidates)) if scores[i] >= scores[best] - se]
    return min(near, key=lambda i: (candidates[i].n_params, candidates[i].best_epoch, -scores[i]))


def _reference_oob(
    metric: str,
    candidates: Sequence[Candidate],
    y: np.ndarray,
    fold_of_row: np.ndarray,
    counts: np.ndarray,
    rule: str,
) -> tuple[list[int], list[float]]:
    rows = np.arange(len(y))
    chosen, oob = [], []
    for w in counts:
        c = _reference_choice(metric, candidates, y, fold_of_row, np.repeat(rows, w), rule)
        chosen.append(c)
        out = rows[w == 0]
        oob.append(_score(metric, y[out], candidates[c].oof[out]))
    return chosen, oob


def _classification(
    seed: int, n: int = 90, count: int = 8, classes: int = 3
) -> tuple[list[Candidate], np.ndarray]:
    """Candidates of varied skill: probabilities leaning towards the true class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    out = []
    for i in range(count):
        logits = rng.normal(size=(n, classes)) + (0.5 + 0.3 * i) * np.eye(classes)[y]
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        out.append(Candidate(i, p, int(rng.integers(1, 4)) * 100, int(rng.integers(1, 4))))
    return out, y


def _regression(seed: int, n: int = 90, count: int = 8) -> tuple[list[Candidate], np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.normal(3.0, 2.0, n)
    out = [
        Candidate(i, y + rng.normal(0.0, 1.0 + 0.2 * i, n), int(rng.integers(1, 4)), 1)
        for i in range(count)
    ]
    return out, y


@pytest.mark.parametrize("rule", ["best", "one-se"])
@pytest.mark.parametrize(
    "metric",
    [
        "accuracy",
        "balanced_accuracy",
        "neg_log_loss",
        "r2",
        "neg_root_mean_squared_error",
        "neg_mean_squared_error",
        "neg_mean_absolute_error",
    ],
)
def test_vectorized_path_equals_per_sample_sklearn_on_the_same_draws(
    metric: str, rule: str
) -> None:
    make = _regression if metrics.get(metric).task == "regression" else _classification
    candidates, y = make(seed=1)
    fold_of_row = np.arange(len(y)) % 5
    counts = estimate.bootstrap_counts(len(y), 25, seed=3)
    scorer = estimate.make_scorer(metric, [c.oof for c in candidates], y)
    assert not isinstance(scorer, estimate.SklearnScorer)
    chosen, oob = estimate.oob_scores(scorer, counts, rule, Selection.of(candidates, fold_of_row))
    ref_chosen, ref_oob = _reference_oob(metric, candidates, y, fold_of_row, counts, rule)
    assert chosen.tolist() == ref_chosen
    np.testing.assert_allclose(oob, ref_oob, rtol=1e-9, atol=1e-12)


def test_fallback_path_equals_the_reference_on_the_same_draws() -> None:
    candidates, y = _classification(seed=2, count=5)
    fold_of_row = np.arange(len(y)) % 4
    counts = estimate.bootstrap_counts(len(y), 6, seed=0)
    scorer = estimate.make_scorer("f1_macro", [c.oof for c in candidates], y)
    assert isinstance(scorer, estimate.SklearnScorer)
    sel = Selection.of(candidates, fold_of_row)
    chosen, oob = estimate.oob_scores(scorer, counts, "one-se", sel)
    ref_chosen, ref_oob = _reference_oob("f1_macro", candidates, y, fold_of_row, counts, "one-se")
    assert chosen.tolist() == ref_chosen
    np.testing.assert_allclose(oob, ref_oob, rtol=1e-12)


def test_fallback_metrics_use_fewer_bootstraps_and_only_the_top_candidates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(estimate, "FALLBACK_BOOTSTRAPS", 20)  # ~1 ms a scikit-learn call
    candidates, y = _classification(seed=4, n=60, count=35, classes=2)
    est = bbc_cv(candidates, y, np.arange(60) % 3, "roc_auc", n_boot=1000)
    assert (est.n_boot, est.n_candidates) == (20, estimate.FALLBACK_CANDIDATES)
    assert est.low <= est.value <= est.high <= est.raw_best + 0.1
    assert est.chosen == max(candidates, key=lambda c: _score("roc_auc", y, c.oof)).trial


# --- the estimate ------------------------------------------------------------------------------


def test_on_shuffled_labels_the_raw_best_is_optimistic_and_bbc_sits_at_chance() -> None:
    rng = np.random.default_rng(0)
    y = rng.permutation(np.repeat([0, 1], 100))
    fold_of_row = rng.permutation(np.arange(200) % 5)
    est = bbc_cv(_noise_candidates(rng, 200, 100), y, fold_of_row, "accuracy", seed=0)
    assert est.raw_best > 0.56
    assert abs(est.value - 0.5) < 0.03
    assert est.low < 0.5 < est.high
    assert (est.n_candidates, est.n_boot, est.rule) == (100, 1000, "best")


def test_one_candidate_estimates_its_own_accuracy() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    right = rng.permutation(np.arange(500) < 400)  # exactly 80% right
    only = Candidate(7, _labels_right_on(y, right), 50, 3)
    est = bbc_cv([only], y, np.arange(500) % 5, "accuracy", n_boot=500, seed=2)
    assert est.raw_best == pytest.approx(0.8)
    assert est.chosen == 7
    assert est.value == pytest.approx(0.8, abs=0.01)
    assert est.low < 0.8 < est.high


def test_the_estimate_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 150)
    candidates = _noise_candidates(rng, 150, 20)
    fold_of_row = np.arange(150) % 5
    first = bbc_cv(candidates, y, fold_of_row, "accuracy", n_boot=200, seed=5)
    assert bbc_cv(candidates, y, fold_of_row, "accuracy", n_boot=200, seed=5) == first
    assert bbc_cv(candidates, y, fold_of_row, "accuracy", n_boot=200, seed=6) != first
    assert first.as_dict()["value"] == first.value


def _one_se_candidates() -> tuple[list[Candidate], np.ndarray, np.ndarray]:
    """Five folds of 100 rows. Big: 85% right, its errors uneven over the folds (75..95%), so one
    standard error is 3.5 points; small: 83% right, well within it; tiny: 70%, well outside."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 500)
    fold_of_row = np.repeat(np.arange(5), 100)
    within = np.tile(np.arange(100), 5)
    big = within < np.repeat([75, 80, 85, 90, 95], 100)
    small = rng.permutation(np.arange(500) < 415)
    tiny = rng.permutation(np.arange(500) < 350)
    candidates = [
        Candidate(0, _labels_right_on(y, big), 10_000, 30),
        Candidate(1, _labels_right_on(y, small), 500, 30),
        Candidate(2, _labels_right_on(y, tiny), 100, 5),
    ]
    return candidates, y, fold_of_row


def test_one_se_picks_the_simpler_candidate_within_one_standard_error() -> None:
    candidates, y, fold_of_row = _one_se_candidates()
    best = bbc_cv(candidates, y, fold_of_row, "accuracy", rule="best", n_boot=300)
    one_se = bbc_cv(candidates, y, fold_of_row, "accuracy", rule="one-se", n_boot=300)
    assert (best.chosen, one_se.chosen) == (0, 1)
    assert best.raw_best == one_se.raw_best == pytest.approx(0.85)
    assert one_se.value == pytest.approx(0.83, abs=0.015)
    assert best.value > one_se.value


def test_one_se_prefers_fewer_epochs_at_equal_size_and_the_better_score_at_equal_keys() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 400)
    fold_of_row = np.arange(400) % 4
    right = [rng.permutation(np.arange(400) < k) for k in (340, 336, 335, 334)]
    keys = [(900, 9), (100, 20), (100, 8), (100, 8)]
    candidates = [
        Candidate(10 + i, _labels_right_on(y, r), p, e)
        for i, (r, (p, e)) in enumerate(zip(right, keys, strict=True))
    ]
    assert bbc_cv(candidates, y, fold_of_row, "accuracy", rule="one-se", n_boot=10).chosen == 12


def test_one_se_copes_with_folds_missing_from_a_bootstrap_sample() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 101)
    fold_of_row = np.r_[np.arange(100) % 4, 4]  # fold 4 is one row: out of ~37% of the samples
    est = bbc_cv(_noise_candidates(rng, 101, 10), y, fold_of_row, "accuracy", rule="one-se")
    assert np.isfinite([est.value, est.low, est.high]).all()
    se = estimate.standard_error(np.array([[0.5, np.nan, 0.7], [0.5, np.nan, np.nan]]))
    np.testing.assert_allclose(se, [np.std([0.5, 0.7], ddof=1) / np.sqrt(2), 0.0])


def test_regression_selection_bias_is_removed() -> None:
    """Fifty equally good regressors (errors N(0, 1)): the best RMSE on all rows is luck; the
    BBC estimate is back at the common RMSE of 1."""
    rng = np.random.default_rng(6)
    y = rng.normal(size=300)
    candidates = [Candidate(i, y + rng.normal(size=300), 10, 1) for i in range(50)]
    fold_of_row = np.arange(300) % 5
    est = bbc_cv(candidates, y, fold_of_row, "neg_root_mean_squared_error", seed=1)
    assert est.raw_best > -0.95
    assert est.value == pytest.approx(-1.0, abs=0.05)
    assert est.low < -1.0 < est.high
    r2 = bbc_cv(candidates, y, fold_of_row, "r2", seed=1)
    assert r2.raw_best > 0.1 > r2.value


def test_label_metrics_accept_probabilities_as_their_argmax() -> None:
    candidates, y = _classification(seed=7)
    labels = [
        Candidate(c.trial, c.oof.argmax(axis=1), c.n_params, c.best_epoch) for c in candidates
    ]
    fold_of_row = np.arange(len(y)) % 3
    assert bbc_cv(candidates, y, fold_of_row, "balanced_accuracy", n_boot=50) == bbc_cv(
        labels, y, fold_of_row, "balanced_accuracy", n_boot=50
    )


# --- the bootstrap and the inputs --------------------------------------------------------------


def test_every_bootstrap_sample_leaves_a_row_out_and_draws_n_rows() -> None:
    counts = estimate.bootstrap_counts(2, 200, seed=0)  # half of all draws of 2 rows take both
    assert (counts == 0).any(axis=1).all()
    assert (counts.sum(axis=1) == 2).all()
    wide = estimate.bootstrap_counts(50, 40, seed=1)
    assert (wide.sum(axis=1) == 50).all()
    with pytest.raises(ValueError, match="at least 2 rows"):
        estimate.bootstrap_counts(1, 10)


def test_metric_table_matches_selector_metrics() -> None:
    assert {name: m.needs for name, m in metrics.METRICS.items()} == estimate.NEEDS
    assert set(estimate.VECTORIZED) <= set(estimate.NEEDS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"metric": "auc"}, "unknown metric"),
        ({"rule": "two-se"}, "unknown rule"),
        ({"fold_of_row": np.zeros(9)}, "fold_of_row"),
        ({"candidates": []}, "no candidates"),
        ({"metric": "neg_log_loss"}, "probabilities"),
        ({"n_boot": 0}, "n_boot"),
    ],
)
def test_bad_input_is_refused_with_a_reason(change: dict[str, object], message: str) -> None:
    y = np.arange(10) % 2
    args: dict[str, object] = {
        "candidates": [Candidate(0, y, 1, 1)],
        "y": y,
        "fold_of_row": np.arange(10) % 2,
        "metric": "accuracy",
    }
    args.update(change)
    with pytest.raises(ValueError, match=message):
        bbc_cv(**args)  # type: ignore[arg-type]


def test_importing_the_module_loads_neither_sklearn_nor_torch() -> None:
    code = (
        "import sys, selector.estimate; "
        "print(sorted(m for m in ('sklearn', 'torch', 'selector.metrics') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
