"""The fit label: overfit and underfit each need a gap beyond the same tolerance."""

from __future__ import annotations

import pytest

from selector import diagnose


@pytest.mark.parametrize(
    ("train", "val", "std", "best", "label"),
    [
        (0.99, 0.95, 0.005, 0.96, "overfit"),  # gap 0.04 > max(0.01, 0.02)
        (0.99, 0.98, 0.005, 0.98, "good fit"),
        (0.9927, 1.0, 0.0, 1.0, "good fit"),  # penguins' best trial: not underfit
        (0.90, 0.89, 0.005, 0.98, "underfit"),  # 0.08 short of the study's best
        (0.95, 0.94, 0.02, 0.98, "good fit"),  # 0.03 short, within 2 x fold std = 0.04
    ],
)
def test_fit_label_on_a_bounded_metric(
    train: float, val: float, std: float, best: float, label: str
) -> None:
    got = diagnose.fit_label(train=train, val=val, fold_std=std, study_best=best, metric="accuracy")
    assert got == label


def test_error_metrics_use_a_relative_margin() -> None:
    # neg RMSE (greater is better): margin 10% of |validation score|
    kw = {"fold_std": 0.0, "metric": "neg_root_mean_squared_error"}
    assert diagnose.fit_label(train=-1.0, val=-1.05, study_best=-1.0, **kw) == "good fit"  # type: ignore[arg-type]
    assert diagnose.fit_label(train=-0.5, val=-1.0, study_best=-1.0, **kw) == "overfit"  # type: ignore[arg-type]
    assert diagnose.fit_label(train=-2.0, val=-2.0, study_best=-1.0, **kw) == "underfit"  # type: ignore[arg-type]
