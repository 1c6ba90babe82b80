"""The training engine: lock-step folds, early stopping, divergence, clipping, refit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from selector import data, engine, metrics, spec
from selector.errors import TrialDiverged
from selector.space import TrialConfig
from tests.conftest import small_raw


@pytest.fixture(scope="module")
def iris() -> tuple[data.DevSet, list[data.FoldData]]:
    prep = data.prepare(spec.parse(small_raw(), origin="t.toml"))
    dev = data.dev_set(prep)
    return dev, list(data.iter_folds(dev))


def _cv(
    iris: tuple[data.DevSet, list[data.FoldData]],
    config: TrialConfig,
    *,
    max_epochs: int = 8,
    patience: int = 100,
    seed: int = 0,
    on_epoch: engine.EpochCallback | None = None,
) -> engine.CVResult:
    dev, folds = iris
    training = spec.TrainingSpec(max_epochs=max_epochs, patience=patience, device="cpu")
    return engine.cross_validate(
        config,
        folds,
        task=dev.task,
        n_classes=dev.n_classes,
        metric=metrics.get("accuracy"),
        training=training,
        seed=seed,
        on_epoch=on_epoch,
    )


def test_value_is_mean_fold_score_at_best_epoch(iris) -> None:  # type: ignore[no-untyped-def]
    r = _cv(iris, TrialConfig(width=16, lr=0.01))
    assert r.value == pytest.approx(np.mean(r.fold_scores))
    assert r.value == max(r.val_curve)
    assert r.val_curve[r.best_epoch - 1] == r.value
    assert [c[r.best_epoch - 1] for c in r.fold_curves] == r.fold_scores
    assert len(r.grad_norms) == r.epochs_run and len(r.grad_norms[0]) == 3  # 2 hidden + head
    assert r.value > 0.6


def test_epochs_are_reported_in_order_with_the_mean(iris) -> None:  # type: ignore[no-untyped-def]
    seen: list[tuple[int, float]] = []
    r = _cv(iris, TrialConfig(width=16), on_epoch=lambda e, v: seen.append((e, v)))
    assert [e for e, _ in seen] == list(range(1, r.epochs_run + 1))
    assert [v for _, v in seen] == r.val_curve


def test_early_stopping_stops_after_patience(iris) -> None:  # type: ignore[no-untyped-def]
    r = _cv(iris, TrialConfig(width=8, lr=1e-6), max_epochs=50, patience=2)
    assert r.stopped_early and r.epochs_run == r.best_epoch + 2


def test_non_finite_loss_raises_diverged(iris) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(TrialDiverged):
        _cv(iris, TrialConfig(optimizer="sgd", lr=1e12, width=64, depth=3))


def test_same_seed_same_result(iris) -> None:  # type: ignore[no-untyped-def]
    c = TrialConfig(width=16, dropout=0.2)
    a, b = _cv(iris, c, seed=3), _cv(iris, c, seed=3)
    assert a.fold_scores == b.fold_scores and a.train_loss_curve == b.train_loss_curve
    assert a.seeds == b.seeds and len(set(a.seeds)) == len(a.seeds)


@pytest.mark.parametrize(
    "optimizer", ["sgd", "momentum", "adagrad", "rmsprop", "adadelta", "adam", "adamw"]
)
@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_every_optimizer_and_schedule_trains(iris, optimizer: str, schedule: str) -> None:  # type: ignore[no-untyped-def]
    lr = 1.0 if optimizer == "adadelta" else 0.05
    r = _cv(
        iris,
        TrialConfig(
            width=16,
            optimizer=optimizer,
            lr=lr,
            lr_schedule=schedule,
            grad_clip=1.0,
            batch_norm=True,
            residual=True,
        ),
        max_epochs=4,
    )
    assert math.isfinite(r.value) and r.train_loss_curve[-1] < r.train_loss_curve[0] * 1.5


def test_batch_bounds_cover_every_row_once() -> None:
    for n in range(1, 70):
        for bs in (1, 2, 7, 32):
            bounds = engine.batch_bounds(n, bs)
            rows = [i for a, b in bounds for i in range(a, b)]
            assert rows == list(range(n))
            assert all(b - a >= 2 for a, b in bounds) or n == 1 or bs == 1


def test_gradient_clipping_bounds_the_update(iris) -> None:  # type: ignore[no-untyped-def]
    _dev, folds = iris
    cfg = TrialConfig(width=16, optimizer="sgd", lr=1.0, grad_clip=1e-3)
    run = engine.FoldRun(
        cfg,
        folds[0],
        task="classification",
        n_out=3,
        max_epochs=1,
        seed=0,
        device=engine.resolve_device("cpu"),
    )
    before = [p.detach().clone() for p in run.model.parameters()]
    run.config = TrialConfig(width=16, optimizer="sgd", lr=1.0, grad_clip=1e-3, batch_size=10**6)
    run.train_epoch()  # one batch: one step of lr x (clipped gradient)
    params = [p.detach() for p in run.model.parameters()]
    step = sum(float((p - b).pow(2).sum()) for p, b in zip(params, before, strict=True))
    assert math.sqrt(step) <= 1e-3 * 1.0001


def test_refit_gives_a_working_model(iris) -> None:  # type: ignore[no-untyped-def]
    _dev, folds = iris
    model = engine.fit(
        TrialConfig(width=16, lr=0.05),
        folds[0],
        task="classification",
        n_classes=3,
        epochs=10,
        max_epochs=10,
        seed=0,
        device="cpu",
    )
    import torch

    pred = engine.predict(model, torch.as_tensor(folds[0].X_val), task="classification")
    np.testing.assert_allclose(pred.sum(axis=1), 1.0)
    assert engine.score(metrics.get("accuracy"), folds[0].y_val, pred, 3) > 0.5


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=2, max_value=12).flatmap(
        lambda k: st.lists(
            st.tuples(st.integers(0, k - 1), st.integers(0, k - 1)), min_size=1, max_size=3000
        )
    )
)
def test_accuracy_is_sklearns_to_the_bit(pairs: list[tuple[int, int]]) -> None:
    y, pred = (np.array(col, dtype=np.int64) for col in zip(*pairs, strict=True))
    mine = metrics.get("accuracy").score(y, pred)
    assert mine == skm.accuracy_score(y, pred) and type(mine) is float


def test_accuracy_of_other_label_kinds_goes_to_sklearn() -> None:
    y, pred = np.array(["a", "b", "a"]), np.array(["a", "a", "a"])
    assert metrics.get("accuracy").score(y, pred) == skm.accuracy_score(y, pred)
    big = np.random.default_rng(0).integers(0, 3, size=(2, 1_000_001))
    assert metrics.get("accuracy").score(big[0], big[1]) == skm.accuracy_score(big[0], big[1])
