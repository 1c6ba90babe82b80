"""The scores a study optimises equal scikit-learn's, including the fast paths."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import roc_auc_score

from selector import metrics


def _proba(rng: np.random.Generator, n: int, k: int, decimals: int) -> np.ndarray:
    p = rng.random((n, k)).round(decimals) + 1e-3  # rounded: many ties
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("k", [2, 3, 10])
@pytest.mark.parametrize("decimals", [1, 2, 8])
def test_roc_auc_equals_scikit_learns(k: int, decimals: int) -> None:
    rng = np.random.default_rng(k * 10 + decimals)
    auc = metrics.get("roc_auc")
    for n in (k + 3, 91, 400):
        y = np.concatenate([np.arange(k), rng.integers(0, k, n - k)])
        p = _proba(rng, n, k, decimals)
        if k == 2:
            want = roc_auc_score(y, p[:, 1])
        else:
            want = roc_auc_score(y, p, multi_class="ovr", labels=np.arange(k))
        assert metrics._ranked_roc_auc(y, p, k) is not None  # the fast path is the one tested
        assert auc.of_predictions(y, p, k) == pytest.approx(want, abs=1e-12)


def test_roc_auc_leaves_what_scikit_learn_objects_to_it() -> None:
    """Where scikit-learn's checks object (one class only, a NaN score, probabilities that do
    not sum to 1), its own call decides: the same warning and value, or the same error."""
    auc = metrics.get("roc_auc")
    p = np.full((4, 2), 0.5)
    one_class = np.zeros(4, dtype=int)
    assert metrics._ranked_roc_auc(one_class, p, 2) is None
    with pytest.warns(UndefinedMetricWarning):
        assert np.isnan(auc.of_predictions(one_class, p, 2))
    bad = p.copy()
    bad[0, 1] = np.nan
    assert metrics._ranked_roc_auc(np.array([0, 1, 0, 1]), bad, 2) is None
    with pytest.raises(ValueError, match="NaN"):
        auc.of_predictions(np.array([0, 1, 0, 1]), bad, 2)
    three = np.array([[0.5, 0.2, 0.2], [0.2, 0.5, 0.2], [0.2, 0.2, 0.5]])  # rows sum to 0.9
    assert metrics._ranked_roc_auc(np.array([0, 1, 2]), three, 3) is None
    with pytest.raises(ValueError, match="sum up to 1"):
        auc.of_predictions(np.array([0, 1, 2]), three, 3)
