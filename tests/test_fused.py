"""Fused trials: each member of a group trains exactly as it would alone.

With dropout 0 a member's weights equal its solo stacked run's (`selector.stacked`, itself checked
against the reference engine) to float32 rounding, for every optimizer and knob, with padded
widths, and with members leaving mid-training; its fold scores and train scores are the solo
run's. The one documented loose case is the stacked engine's (`tests/test_stacked.py`): the bias
in front of a batch norm under an adaptive optimizer moves by rounding noise.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
import sqlalchemy as sa
import torch
from optuna.trial import TrialState
from typer.testing import CliRunner

from selector import (
    cli,
    data,
    engine,
    fused,
    fused_optim,
    interrupt,
    metrics,
    objective,
    record,
    stacked,
    storage,
    worker,
)
from selector import spec as spec_mod
from selector import study as study_mod
from selector import summary as summary_mod
from selector.data import FoldData
from selector.errors import SpecError, TrialDiverged
from selector.space import TrialConfig, replay_config, sample_config
from selector.spec import TrainingSpec
from tests.conftest import small_raw, write_study
from tests.test_stacked import ADAPTIVE, NOISY, RTOL, _cut, _rel, stacked_states

CPU = torch.device("cpu")

# One group with every optimizer, padded widths (8 to 32), funnel and residual (identity and
# projection skips), batch norm, every schedule, clipping, weight decay and sigmoid (not 0 at 0).
GROUP = [
    TrialConfig(optimizer="adam", width=32, batch_size=16, lr=1e-2),
    TrialConfig(
        optimizer="sgd", width=16, batch_size=16, lr=5e-2, activation="tanh", weight_decay=1e-3
    ),
    TrialConfig(
        optimizer="momentum",
        nesterov=True,
        width=24,
        batch_size=16,
        lr=1e-2,
        batch_norm=True,
        grad_clip=0.3,
    ),
    TrialConfig(
        optimizer="rmsprop",
        width=32,
        batch_size=16,
        lr=1e-3,
        rho=0.95,
        residual=True,
        shape="funnel",
        activation="sigmoid",
    ),
    TrialConfig(
        optimizer="adagrad",
        width=8,
        batch_size=16,
        lr=1e-2,
        batch_norm=True,
        activation="gelu",
        lr_schedule="cosine",
    ),
    TrialConfig(optimizer="adadelta", width=32, batch_size=16, lr=1.0, rho=0.8, residual=True),
    TrialConfig(
        optimizer="adamw",
        width=20,
        batch_size=16,
        lr=1e-2,
        weight_decay=0.05,
        beta1=0.8,
        lr_schedule="step",
        grad_clip=1.0,
    ),
    TrialConfig(
        optimizer="momentum",
        momentum=0.5,
        width=20,
        batch_size=16,
        lr=1e-2,
        residual=True,
        batch_norm=True,
        activation="leaky_relu",
    ),
]
SEEDS = [11 + i for i in range(len(GROUP))]
# The same group with every activation 0 at 0 (sigmoid's member on GELU): no unit masks.
UNMASKED = [
    dataclasses.replace(c, activation="gelu") if c.activation == "sigmoid" else c for c in GROUP
]


def _run(
    configs: Sequence[TrialConfig],
    folds: Sequence[FoldData],
    seeds: Sequence[int],
    *,
    epochs: int,
    task: str = "classification",
    device: torch.device = CPU,
) -> fused.FusedRun:
    K = len(folds)
    n_out = int(max(f.y_train.max() for f in folds)) + 1 if task == "classification" else 1
    return fused.FusedRun(
        configs,
        folds,
        task=task,  # type: ignore[arg-type]
        n_out=n_out,
        max_epochs=epochs,
        seeds=[[engine.derive_seed(s, k) for k in range(K)] for s in seeds],
        device=device,
    )


def assert_member_matches_solo(
    run: fused.FusedRun,
    member: int,
    config: TrialConfig,
    folds: Sequence[FoldData],
    *,
    seed: int,
    epochs: int,
    task: str = "classification",
) -> None:
    solo = stacked_states(config, folds, epochs=epochs, seed=seed, task=task)
    mine = [{k: v.cpu() for k, v in state.items()} for state in run.state_dicts(member)]
    noisy = config.batch_norm and config.optimizer in ADAPTIVE
    for k, (a, b) in enumerate(zip(solo, mine, strict=True)):
        assert list(a) == list(b)
        for key in a:
            assert a[key].shape == b[key].shape, key
            if key.endswith("num_batches_tracked"):
                assert int(a[key]) == int(b[key]), key
            elif noisy and NOISY.search(key):
                assert float((a[key] - b[key]).abs().max()) < 50 * config.lr, (k, key)
            else:
                assert _rel(b[key], a[key]) < RTOL, (member, k, key, _rel(b[key], a[key]))


# --- the stacked optimizer step --------------------------------------------------------------

KINDS = [
    ("sgd", {}),
    ("momentum", {}),
    ("momentum", {"nesterov": True}),
    ("adagrad", {}),
    ("rmsprop", {}),
    ("adadelta", {}),
    ("adam", {}),
    ("adamw", {}),
]


@pytest.mark.parametrize("kernel", [False, True], ids=["formulas", "fused-kernel"])
def test_optimizer_rows_equal_torch_optim(kernel: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row steps as its own torch.optim optimizer would, each with its own hyperparameters,
    all kinds in one step; a row marked inactive keeps its weights, state and step count."""
    monkeypatch.setattr(fused_optim, "KERNEL_ELEMENTS", 0 if kernel else 1 << 40)
    torch.manual_seed(0)
    configs = [
        TrialConfig(
            optimizer=name,
            lr=1e-2 * (1 + i % 3),
            weight_decay=0.02 * (i % 2),
            momentum=0.6 + 0.1 * (i % 3),
            beta1=0.8 + 0.05 * (i % 3),
            beta2=0.99 + 0.004 * (i % 2),
            rho=0.85 + 0.05 * (i % 2),
            **extra,  # type: ignore[arg-type]
        )
        for name, extra in KINDS
        for i in range(2)
    ]
    p = torch.randn(len(configs), 40)
    refs = [p[i].clone().requires_grad_(True) for i in range(len(configs))]
    torch_opts = [engine.make_optimizer(c, [r]) for c, r in zip(configs, refs, strict=True)]
    opt = fused_optim.FusedOptimizer(p, configs, 1)
    for step in range(6):
        g = torch.randn_like(p)
        active = torch.tensor([not (step == 3 and i % 4 == 1) for i in range(len(configs))])
        opt.step(g, active)
        for i, (r, o) in enumerate(zip(refs, torch_opts, strict=True)):
            if active[i]:
                r.grad = g[i].clone()
                o.step()
    for i, r in enumerate(refs):
        assert torch.allclose(p[i], r.detach(), rtol=1e-5, atol=1e-6), configs[i].optimizer
    assert opt.steps.view(-1).tolist() == [6.0 - (i % 4 == 1) for i in range(len(configs))]


def test_the_formulas_adagrad_equals_torch_optim_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without weight decay (whose term rounds otherwise: `grad + wd * p` here, one
    `add(alpha=)` in torch), Adagrad through the formulas is torch.optim.Adagrad's update
    exactly, zeros of padded units included: the formulas keep torch's own `sqrt`, as
    torch.optim does (numpy's, correctly rounded and faster on zeros, left 8% of the numbers
    1 ulp off after 200 steps)."""
    monkeypatch.setattr(fused_optim, "KERNEL_ELEMENTS", 1 << 40)
    torch.manual_seed(0)
    configs = [
        TrialConfig(optimizer="adagrad", lr=1e-2 * (1 + i), weight_decay=0.0) for i in range(3)
    ]
    p = torch.randn(len(configs), 400)
    p[:, 300:] = 0.0  # padded units: zero weights, zero gradients
    refs = [p[i].clone().requires_grad_(True) for i in range(len(configs))]
    torch_opts = [engine.make_optimizer(c, [r]) for c, r in zip(configs, refs, strict=True)]
    opt = fused_optim.FusedOptimizer(p, configs, 1)
    for _ in range(200):
        g = torch.randn_like(p)
        g[:, 300:] = 0.0
        opt.step(g)
        for i, (r, o) in enumerate(zip(refs, torch_opts, strict=True)):
            r.grad = g[i].clone()
            o.step()
    assert torch.equal(p, torch.stack([r.detach() for r in refs]))
    assert torch.equal(p[:, 300:], torch.zeros(len(configs), 100))


def test_segments_and_kinds() -> None:
    kinds = [fused_optim.kind(c) for c in GROUP]
    assert "nesterov" in kinds and "momentum" in kinds
    segs = fused_optim.segments(["adam", "adam", "sgd", "adam"])
    assert [(s.kind, s.start, s.stop) for s in segs] == [
        ("adam", 0, 2),
        ("sgd", 2, 3),
        ("adam", 3, 4),
    ]


# --- members train as they would alone --------------------------------------------------------


@pytest.mark.parametrize("group", [GROUP, UNMASKED], ids=["masked", "unmasked"])
@pytest.mark.parametrize("kernel", [False, True], ids=["formulas", "fused-kernel"])
def test_every_member_matches_its_solo_run(
    iris_folds: list[FoldData],
    kernel: bool,
    group: list[TrialConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(fused_optim, "KERNEL_ELEMENTS", 0 if kernel else 1 << 40)
    run = _run(group, iris_folds, SEEDS, epochs=3)
    for _ in range(3):
        run.train_epoch()
    for m, config in enumerate(group):
        assert_member_matches_solo(run, m, config, iris_folds, seed=SEEDS[m], epochs=3)


@pytest.mark.parametrize("group", [GROUP, UNMASKED], ids=["masked", "unmasked"])
def test_padded_units_stay_exactly_zero(
    iris_folds: list[FoldData], group: list[TrialConfig]
) -> None:
    """Weights, gradients and optimizer state of padded units (and of parameters a member does
    not have) are exactly zero after training: behind a unit mask where an activation is not 0
    at 0 (sigmoid), by their zero weights alone where every activation is."""
    run = _run(group, iris_folds, SEEDS, epochs=2)
    masks = [u is not None for u in run.model.unit]
    assert masks == ([True] * len(masks) if group is GROUP else [False] * len(masks))
    for _ in range(2):
        run.train_epoch()
    model = run.model
    real = torch.zeros_like(model.flat, dtype=torch.bool)
    for pos, m in enumerate(run.members):
        for k, state in enumerate(run.state_dicts(m)):
            row = pos * run.K + k
            for key, t in state.items():
                if key in model.slots:
                    view = model._view(real, key)[row]
                    view[tuple(slice(0, n) for n in t.shape)] = True
    assert bool((model.flat[~real] == 0).all())
    assert bool((model.grad[~real] == 0).all())
    for name, t in run.opt.state.items():
        assert bool((t[~real] == 0).all()), name


def test_uneven_folds_match_solo(wine_folds: list[FoldData]) -> None:
    """Folds with different batch counts: each row keeps its own step count."""
    folds = _cut(wine_folds, [94, 81, 64])
    configs = [
        TrialConfig(optimizer="adam", width=16, batch_size=16, lr=1e-2),
        TrialConfig(optimizer="adagrad", width=24, batch_size=16, lr=1e-2, batch_norm=True),
        TrialConfig(optimizer="rmsprop", width=8, batch_size=16, lr=1e-3),
    ]
    run = _run(configs, folds, [1, 2, 3], epochs=2)
    for _ in range(2):
        run.train_epoch()
    for m, c in enumerate(configs):
        assert_member_matches_solo(run, m, c, folds, seed=m + 1, epochs=2)


def test_regression_members(iris_folds: list[FoldData]) -> None:
    folds = [
        FoldData(f.X_train, f.y_train.astype(np.float32), f.X_val, f.y_val.astype(np.float32))
        for f in iris_folds
    ]
    configs = [GROUP[0], GROUP[1], GROUP[5]]
    run = _run(configs, folds, [5, 6, 7], epochs=2, task="regression")
    for _ in range(2):
        run.train_epoch()
    for m, c in enumerate(configs):
        assert_member_matches_solo(run, m, c, folds, seed=m + 5, epochs=2, task="regression")


def test_leaving_members_do_not_change_the_others(iris_folds: list[FoldData]) -> None:
    run = _run(GROUP, iris_folds, SEEDS, epochs=3)
    run.train_epoch()
    run.leave([1, 4])
    run.train_epoch()
    run.leave([0, 7])
    run.train_epoch()
    assert sorted(run.members) == [2, 3, 5, 6]
    for m in run.members:
        assert_member_matches_solo(run, m, GROUP[m], iris_folds, seed=SEEDS[m], epochs=3)


# --- whole cross-validations ------------------------------------------------------------------

TRAINING = TrainingSpec(max_epochs=12, patience=3)


def _solo(config: TrialConfig, folds: Sequence[FoldData], seed: int) -> engine.CVResult:
    """The member's solo cross-validation (the stacked engine), as the group scores it."""
    return stacked.cross_validate(
        config,
        folds,
        task="classification",
        n_classes=3,
        metric=metrics.get("neg_log_loss"),
        training=TRAINING,
        seed=seed,
    )


def _group(
    configs: Sequence[TrialConfig], folds: Sequence[FoldData], seeds: Sequence[int], **kw: object
) -> dict[int, engine.CVResult | Exception]:
    return fused.cross_validate_group(
        configs,
        folds,
        task="classification",
        n_classes=3,
        metric=metrics.get("neg_log_loss"),
        training=TRAINING,
        seeds=seeds,
        **kw,  # type: ignore[arg-type]
    )


def test_cv_results_equal_solo_runs(iris_folds: list[FoldData]) -> None:
    """Scores, best epochs (members stop early at different epochs), train scores and out-of-
    fold predictions equal each member's solo cross-validation."""
    configs = [c for c in GROUP if not (c.batch_norm and c.optimizer in ADAPTIVE)]
    seeds = SEEDS[: len(configs)]
    done: list[int] = []
    out = _group(configs, iris_folds, seeds, on_done=lambda left: done.extend(m for m, _ in left))
    assert sorted(done) == list(range(len(configs)))
    for m, c in enumerate(configs):
        solo = _solo(c, iris_folds, seeds[m])
        got = out[m]
        assert isinstance(got, engine.CVResult)
        assert got.best_epoch == solo.best_epoch and got.epochs_run == solo.epochs_run, m
        assert got.stopped_early == solo.stopped_early
        assert got.seeds == solo.seeds
        np.testing.assert_allclose(got.fold_scores, solo.fold_scores, rtol=1e-4)
        np.testing.assert_allclose(got.train_scores, solo.train_scores, rtol=1e-4)
        np.testing.assert_allclose(got.val_curve, solo.val_curve, rtol=1e-4)
        np.testing.assert_allclose(got.train_loss_curve, solo.train_loss_curve, rtol=1e-4)
        np.testing.assert_allclose(
            np.asarray(got.grad_norms), np.asarray(solo.grad_norms), rtol=1e-3
        )
        for a, b in zip(got.oof, solo.oof, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _separable_folds(k: int = 3) -> list[FoldData]:
    """Three well separated blobs: folds that a small network scores perfectly."""
    from sklearn.datasets import make_blobs
    from sklearn.model_selection import StratifiedKFold

    X, y = make_blobs(n_samples=150, centers=3, n_features=4, cluster_std=1.0, random_state=0)
    X = ((X - X.mean(0)) / X.std(0)).astype(np.float32)
    y = y.astype(np.int64)
    return [
        FoldData(X[tr], y[tr], X[va], y[va])
        for tr, va in StratifiedKFold(k, shuffle=True, random_state=0).split(X, y)
    ]


def test_a_perfect_score_ends_training_with_the_result_training_on_gives() -> None:
    """A trial whose mean CV score is perfect (accuracy 1) stops at that epoch, alone and as a
    fused member alike: only a strictly better mean replaces the best epoch, so its result is
    the one training on to its patience gives, without the epochs after."""
    folds = _separable_folds()
    accuracy = metrics.get("accuracy")
    never = dataclasses.replace(accuracy, perfect=float("inf"))  # training on, as before
    training = TrainingSpec(max_epochs=25, patience=25)
    configs = [
        TrialConfig(optimizer="adam", width=32, batch_size=16, lr=1e-2),
        TrialConfig(optimizer="sgd", width=8, batch_size=16, lr=1e-3),
    ]
    seeds = [5, 6]

    def solo(c: TrialConfig, seed: int, metric: metrics.Metric) -> engine.CVResult:
        return stacked.cross_validate(
            c, folds, task="classification", n_classes=3, metric=metric,
            training=training, seed=seed,
        )  # fmt: skip

    together = fused.cross_validate_group(
        configs,
        folds,
        task="classification",
        n_classes=3,
        metric=accuracy,
        training=training,
        seeds=seeds,
    )
    perfect = []
    for m, c in enumerate(configs):
        stopped, full = solo(c, seeds[m], accuracy), solo(c, seeds[m], never)
        assert (stopped.value, stopped.best_epoch) == (full.value, full.best_epoch)
        assert stopped.fold_scores == full.fold_scores
        assert stopped.train_scores == full.train_scores
        assert stopped.val_curve == full.val_curve[: stopped.epochs_run]
        if stopped.value >= 1.0:
            perfect.append(m)
            assert stopped.epochs_run == stopped.best_epoch < full.epochs_run == 25
        else:
            assert stopped.epochs_run == full.epochs_run == 25
        got = together[m]
        assert isinstance(got, engine.CVResult)
        assert (got.best_epoch, got.epochs_run) == (stopped.best_epoch, stopped.epochs_run)
        np.testing.assert_allclose(got.fold_scores, stopped.fold_scores)
    assert perfect == [0]  # one member stops at its perfect score, the other trains on


def test_pruned_member_leaves_and_the_others_go_on(iris_folds: list[FoldData]) -> None:
    configs, seeds = GROUP[:4], SEEDS[:4]
    seen: dict[int, list[int]] = {m: [] for m in range(4)}

    def on_epoch(epoch: int, values: dict[int, float]) -> dict[int, Exception]:
        for m in values:
            seen[m].append(epoch)
        return {1: optuna.TrialPruned("pruned")} if epoch == 2 and 1 in values else {}

    out = _group(configs, iris_folds, seeds, on_epoch=on_epoch)
    assert isinstance(out[1], optuna.TrialPruned)
    assert seen[1] == [1, 2]
    for m in (0, 2, 3):
        got = out[m]
        assert isinstance(got, engine.CVResult)
        solo = _solo(configs[m], iris_folds, seeds[m])
        np.testing.assert_allclose(got.fold_scores, solo.fold_scores, rtol=1e-4)
        assert seen[m] == list(range(1, got.epochs_run + 1))


def test_a_diverging_member_fails_alone(iris_folds: list[FoldData]) -> None:
    configs = [GROUP[0], TrialConfig(optimizer="sgd", width=32, batch_size=16, lr=1e6), GROUP[1]]
    out = _group(configs, iris_folds, [1, 2, 3])
    assert isinstance(out[1], TrialDiverged)
    for m in (0, 2):
        got = out[m]
        assert isinstance(got, engine.CVResult)
        solo = _solo(configs[m], iris_folds, [1, 2, 3][m])
        np.testing.assert_allclose(got.fold_scores, solo.fold_scores, rtol=1e-4)


def test_a_stop_from_on_epoch_stops_the_group(iris_folds: list[FoldData]) -> None:
    def on_epoch(epoch: int, values: dict[int, float]) -> dict[int, Exception]:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _group(GROUP[:2], iris_folds, SEEDS[:2], on_epoch=on_epoch)


def test_dropout_members_differ_by_rate(iris_folds: list[FoldData]) -> None:
    """Per-member dropout p: a member with p = 0 gets an all-ones mask."""
    configs = [GROUP[0], TrialConfig(optimizer="adam", width=32, batch_size=16, dropout=0.3)]
    run = _run(configs, iris_folds, [1, 2], epochs=1)
    mask = run.model._dropout_mask((2 * 3, 32, 1000), 0, 6, np.random.PCG64(0))
    pos = {m: i for i, m in enumerate(run.members)}
    plain = mask[pos[0] * 3 : pos[0] * 3 + 3]
    dropped = mask[pos[1] * 3 : pos[1] * 3 + 3]
    assert bool((plain == 1).all())
    assert abs(float((dropped == 0).float().mean()) - 0.3) < 0.01
    assert abs(float(dropped.mean()) - 1.0) < 0.02
    # Row by row, the mask `stacked.dropout_mask` draws from the same stream (32,000 draws a
    # row, a whole number of 64-bit words), to the bit.
    again = np.random.PCG64(0)
    for row, config in enumerate(run.model.row_configs):
        alone = stacked.dropout_mask((32, 1000), config.dropout, torch.device("cpu"), again)
        assert torch.equal(mask[row], alone)


# --- sizes: memory and cost -------------------------------------------------------------------


def test_cost_model_sizes() -> None:
    small = TrialConfig(depth=2, width=32, batch_size=32)
    big = TrialConfig(depth=3, width=1024, batch_size=256)
    assert fused.cost_size(small, folds=5, n_in=10, n_out=3, device="cpu") == 32
    assert fused.cost_size(big, folds=5, n_in=100, n_out=5, device="cpu") == 1
    assert fused.cost_size(big, folds=5, n_in=100, n_out=5, device="cuda") > 1


def test_members_that_fit_follow_the_memory_estimate(
    iris_folds: list[FoldData], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrialConfig(width=64)
    shape = engine.fold_shape(iris_folds, 3)
    three = fused.group_need([config] * 3, **shape).total
    monkeypatch.setattr(engine, "available_memory", lambda device: int(three / fused.MEMORY_SHARE))
    assert fused.members_that_fit(config, iris_folds, 3, CPU, 8) == 3
    monkeypatch.setattr(engine, "available_memory", lambda device: 0)
    assert fused.members_that_fit(config, iris_folds, 3, CPU, 8) == 1


def test_a_claim_trains_as_one_model_per_depth_and_batch_size() -> None:
    """`split_claim`: each part one key, every member in exactly one part; members of one key
    and like widths stay together, a narrow one is cut from a wider one where padding costs
    more, and one whose step is mostly its own arithmetic trains alone."""
    configs = [
        TrialConfig(depth=2, width=32, batch_size=16),
        TrialConfig(depth=1, width=32, batch_size=16),
        TrialConfig(depth=2, width=30, batch_size=16),
        TrialConfig(depth=2, width=32, batch_size=64),
        TrialConfig(depth=1, width=34, batch_size=16),
        TrialConfig(depth=2, width=4, batch_size=64),
        TrialConfig(depth=2, width=200, batch_size=64),
        TrialConfig(depth=2, width=2048, batch_size=64),
    ]
    parts = fused.split_claim(configs, folds=5, n_in=10, n_out=3, device="cpu")
    assert sorted(m for part in parts for m in part) == list(range(len(configs)))
    assert all(len({fused.group_key(configs[m]) for m in part}) == 1 for part in parts)
    assert [0, 2] in parts and [1, 4] in parts
    assert not any({5, 6} <= set(part) for part in parts)
    assert fused.cost_size(configs[7], folds=5, n_in=10, n_out=3, device="cpu") == 1
    assert [7] in parts
    cuda = fused.split_claim(configs, folds=5, n_in=10, n_out=3, device="cuda")
    assert [7] not in cuda  # on a GPU the wide one is fused too


def test_the_memory_check_takes_the_largest_member_a_claim_can_hold() -> None:
    space = _fused_spec().space  # depth 1 to 2, width 8 to 32, batch size 16 or 32
    big = fused.largest(TrialConfig(depth=1, width=8, batch_size=16, shape="funnel"), space)
    assert (big.depth, big.width, big.batch_size, big.shape) == (2, 32, 32, "constant")
    assert big.lr == TrialConfig().lr  # the rest is the member's own


# --- members are ordinary Optuna trials -------------------------------------------------------


def _fused_spec(**overrides: object) -> spec_mod.StudySpec:
    raw = small_raw(
        n_trials=8,
        search={"sampler": "tpe", "pruner": "median", "fuse": 4},
        space={
            "depth": {"low": 1, "high": 2},
            "width": {"low": 8, "high": 32, "log": True},
            "optimizer": ["adam", "momentum", "sgd", "rmsprop"],
            "activation": ["relu", "tanh"],
            "batch_norm": [False, True],
            "lr": {"low": 1e-3, "high": 3e-2, "log": True},
            "batch_size": [16, 32],
        },
        training={"max_epochs": 8, "patience": 3, "device": "cpu"},
    )
    for key, value in overrides.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return spec_mod.parse(raw, origin="fused.toml")


def _all_trials(url: str, name: str = "iris-small") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def test_a_fused_study_records_every_member_as_its_own_trial(url: str) -> None:
    s = _fused_spec()
    summary = study_mod.run(s, url)
    assert summary.finished == 8
    trials = _all_trials(url)
    assert len(trials) == 8 and all(t.state.is_finished() for t in trials)
    groups: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:
        groups.setdefault(t.user_attrs["group"], []).append(t)
    assert max(len(g) for g in groups.values()) == 4
    for leader, members in groups.items():
        assert {t.user_attrs["group_size"] for t in members} == {len(members)}
        assert leader == min(t.number for t in members)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert complete
    for t in complete:  # the typed record reads back as for any trial
        rec = record.TrialRecord.from_trial(t)
        assert rec.fold_scores and rec.curves is not None
        assert rec.epochs_run == len(t.intermediate_values)
    st = summary_mod.status(url, "iris-small")
    assert len(st.trials) == 8


def test_replay_reruns_each_member_with_the_model_it_trained_in(url: str) -> None:
    """A claim of 4 with members of several depths and batch sizes (TPE's random start-up)
    trained as one model a key; `selector replay` re-runs each member's own model as it ran."""
    from selector import replay

    s = _fused_spec()
    study_mod.run(s, url)
    trials = _all_trials(url)
    claims: dict[int, set[tuple[int, int]]] = {}
    for t in trials:
        claims.setdefault(t.user_attrs["group"], set()).add(
            (t.params["depth"], t.params["batch_size"])
        )
    assert any(len(keys) > 1 for keys in claims.values())
    models: dict[int, list[optuna.trial.FrozenTrial]] = {}
    for t in trials:  # each member records the model it trained in: one key a model
        models.setdefault(t.user_attrs["fused_model"], []).append(t)
    assert all(
        len({(t.params["depth"], t.params["batch_size"]) for t in ts}) == 1
        for ts in models.values()
    )
    for t in trials:
        r = replay.replay(url, "iris-small", t.number)
        assert r.identical, r


def test_replay_takes_the_recorded_model_and_cuts_older_records_as_the_worker_does(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The members of a trial's model are the ones it recorded, whatever the cut rule is now;
    a trial recorded without it (an earlier version) gets its claim cut by `split_claim`."""
    from selector import replay

    s = _fused_spec()
    study_mod.run(s, url)
    study, rec = record.open_study(url, "iris-small")
    trials = record.trials(study)
    dev = data.dev_set(data.prepare(rec.spec))
    folds = list(data.iter_folds(dev))
    recorded = {t.number: replay._part(t, trials, rec.spec, dev, folds) for t in trials}
    older = [dataclasses.replace(t, fused_model=None) for t in trials]
    for t in older:
        assert [m.number for m in replay._part(t, older, rec.spec, dev, folds)] == [
            m.number for m in recorded[t.number]
        ]

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the recorded model is read, not cut again")

    monkeypatch.setattr(fused, "split_claim", refuse)
    for t in trials:
        assert replay._part(t, trials, rec.spec, dev, folds) == recorded[t.number]


def test_fused_members_score_as_their_solo_runs(url: str, tmp_path: Path) -> None:
    """The same trial numbers and params run with --fuse 1 give the same values."""
    s = _fused_spec(search={"pruner": "none", "fuse": 4})
    study_mod.run(s, url)
    fused_trials = {t.number: t for t in _all_trials(url)}
    dev = objective.Objective(s, data.dev_set(data.prepare(s)))
    for t in fused_trials.values():
        config = replay_config(t.params, s.space)
        solo = objective.train(s, dev.dev, dev.folds, config, engine.derive_seed(s.seed, t.number))
        if config.batch_norm and config.optimizer in ADAPTIVE:
            continue  # the stacked engine's own rounding noise (see tests/test_stacked.py)
        assert t.value == pytest.approx(solo.value, abs=1e-6), t.number
        assert t.user_attrs["fold_scores"] == pytest.approx(solo.fold_scores, abs=1e-6)


def test_fuse_one_is_one_trial_at_a_time(url: str) -> None:
    study_mod.run(_fused_spec(search={"fuse": 1}), url)
    assert all("group" not in t.user_attrs for t in _all_trials(url))


def test_the_budget_stays_exact_when_groups_do_not_divide_it(url: str) -> None:
    s = _fused_spec(n_trials=7)
    study_mod.run(s, url)
    assert len(_all_trials(url)) == 7
    sizes = sorted({t.user_attrs.get("group_size", 1) for t in _all_trials(url)})
    assert sizes == [3, 4]


def test_a_stop_records_every_running_member(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    original = interrupt.check

    def stop_at_the_third_epoch() -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise interrupt.Terminated
        original()

    monkeypatch.setattr(interrupt, "check", stop_at_the_third_epoch)
    with pytest.raises(interrupt.Terminated):
        study_mod.run(_fused_spec(search={"pruner": "none", "fuse": 4}), url)
    trials = _all_trials(url)
    assert trials and all(t.state == TrialState.FAIL for t in trials)
    assert {t.user_attrs["fail_reason"] for t in trials} == {"terminated"}


def test_a_member_reaped_meanwhile_keeps_its_result_and_the_others_end(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members that leave together end in one transaction; where one of them was reaped as
    stale meanwhile that end is refused whole, and each is told as a lone trial: the others are
    recorded as usual, the reaped one keeps its result as a late result."""
    s = _fused_spec(n_trials=3, search={"pruner": "none", "fuse": 3})
    own = objective.Objective.endings
    reaped: list[int] = []

    def reap_first(self: objective.Objective, left: list) -> list:  # type: ignore[type-arg]
        if not reaped:
            trial = left[0][0].trial
            trial.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            reaped.append(trial.number)
        return own(self, left)

    monkeypatch.setattr(objective.Objective, "endings", reap_first)
    study_mod.run(s, url)
    trials = {t.number: t for t in _all_trials(url)}
    assert trials[reaped[0]].state == TrialState.FAIL  # its place in the budget freed: 4 ran
    late = optuna.load_study(study_name=s.name, storage=url).user_attrs
    assert f"late_result:{reaped[0]}" in late
    others = [t for n, t in trials.items() if n != reaped[0]]
    assert len(others) == 3
    assert all(t.state == TrialState.COMPLETE and "best_epoch" in t.user_attrs for t in others)


def test_progress_counts_members_that_end_together_in_order(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Members that end at one epoch share their completion time; the progress lines still
    count 1, 2, 3... (one line per trial where stderr is not a terminal)."""
    from selector import progress

    s = _fused_spec(search={"pruner": "none", "fuse": 4})
    study_mod.run(s, url)
    st = optuna.load_study(study_name=s.name, storage=url)
    ended = sorted(st.get_trials(), key=lambda t: (t.datetime_complete, t.number))
    assert len({t.datetime_complete for t in ended}) < len(ended)  # some ended together
    capsys.readouterr()
    with progress.Bar(8) as bar:
        for t in ended:
            bar.update(st, t)
    counts = [line.split("]")[0] for line in capsys.readouterr().err.splitlines()]
    assert counts == [f"[{k}/8" for k in range(1, 9)]
    with progress.Bar(8) as bar:  # told of them at once, as a worker tells of a group
        bar.update_all(st, ended)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("]")[0] for line in lines] == counts

    again = s.model_copy(update={"name": "again"})
    with progress.Bar(None) as bar:  # a worker's run: each group's members told at once
        study_mod.run(again, url, progress=bar)
    counts = [line.split("]")[0] for line in capsys.readouterr().err.splitlines()]
    assert counts == [f"[{k}/8" for k in range(1, 9)]


def test_progress_says_when_a_perfect_score_stopped_a_trial(url: str) -> None:
    """A complete trial whose score is the study metric's perfect one (accuracy 1) reads
    "stopped on a perfect score" in its progress line; the others do not."""
    import copy

    from selector import progress

    s = _fused_spec(search={"pruner": "none", "fuse": 4})
    study_mod.run(s, url)
    st = optuna.load_study(study_name=s.name, storage=url)
    perfect = progress._perfect(st)
    assert perfect == 1.0  # accuracy's
    done = [t for t in st.get_trials() if t.state == TrialState.COMPLETE]
    assert done and all(t.value is not None and t.value < 1.0 for t in done)
    scored = copy.deepcopy(done[0])
    scored.values = [1.0]
    assert "stopped on a perfect score" in progress.Bar._line(scored, perfect)
    assert "stopped on a perfect score" not in progress.Bar._line(done[0], perfect)
    assert "stopped on a perfect score" not in progress.Bar._line(scored, None)


def test_heartbeats_cover_every_member(url: str) -> None:
    """A killed worker's members are reaped like any stale trial: each one beats."""
    s = _fused_spec(search={"pruner": "none", "fuse": 4})
    study_mod.run(s, url, heartbeat=storage.Heartbeat(1, 5))
    with sa.create_engine(url).connect() as conn:
        beats = conn.execute(sa.text("SELECT COUNT(DISTINCT trial_id) FROM trial_heartbeats"))
        assert beats.scalar() == 8


def test_claimed_members_each_draw_every_parameter(url: str) -> None:
    """Every member of a claim is the sampler's own draw, depth and batch size included (the
    claim is cut into one model a key afterwards): in TPE's random start-up, four members
    come with more than one key."""
    s = _fused_spec()
    study_mod.create_or_resume(s, url)
    st = optuna.load_study(
        study_name=s.name, storage=url, sampler=worker.make_sampler(s, 0, fusing=True)
    )
    dev = objective.Objective(s, data.dev_set(data.prepare(s)))
    claimed = worker.claim_group(st, url, 8, 4, dev)
    assert len(claimed) == 4
    configs = [c for _, c in claimed]
    assert all(c is not None for c in configs)
    assert len({fused.group_key(c) for c in configs if c is not None}) > 1
    assert len({c.lr for c in configs if c is not None}) == 4
    assert worker.claim_group(st, url, 5, 4, dev)[0][1] is None  # one place left: a lone trial
    assert worker.claim_group(st, url, 5, 4, dev) == []


def test_a_claim_cut_short_by_a_lost_connection_fails_what_it_created(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A connection lost after the leader was created: the claim is retried from the start, so
    the leader (never trained) is failed at once instead of running, unbeaten, for ever."""
    s = _fused_spec()
    study_mod.create_or_resume(s, url)
    st = optuna.load_study(
        study_name=s.name, storage=url, sampler=worker.make_sampler(s, 0, fusing=True)
    )
    dev = objective.Objective(s, data.dev_set(data.prepare(s)))
    lost = sa.exc.OperationalError("UPDATE", {}, Exception("server closed the connection"))
    lost.connection_invalidated = True

    def drop(study: optuna.Study, n: int) -> None:
        raise lost

    with monkeypatch.context() as m:
        m.setattr(storage, "new_trials", drop)
        with pytest.raises(sa.exc.OperationalError):
            worker.claim_group(st, url, 8, 4, dev)
    (leader,) = st.get_trials()
    assert leader.state == TrialState.FAIL and record.failure_reason(leader) == "stale"
    claimed = storage.retrying(lambda: worker.claim_group(st, url, 8, 4, dev))
    assert len(claimed) == 4 and worker.count(st, worker.ACTIVE) == 4

    @contextlib.contextmanager
    def lost_at_release(url: str, name: str) -> Iterator[None]:
        yield  # the lock's connection lost: its commit fails after the group was claimed
        raise lost

    with monkeypatch.context() as m:
        m.setattr(worker, "budget_lock", lost_at_release)
        with pytest.raises(sa.exc.OperationalError):
            worker.claim_group(st, url, 8, 4, dev)
    states = [t.state for t in sorted(st.get_trials(), key=lambda t: t.number)]
    assert states == [TrialState.FAIL, *[TrialState.RUNNING] * 4, *[TrialState.FAIL] * 4]


def _tpe_history(n: int = 40) -> optuna.Study:
    """An in-memory study past TPE's start-up: `n` finished trials of the fused test space."""
    space = _fused_spec().space
    history = optuna.create_study(direction="maximize")
    rng = np.random.default_rng(0)
    for _ in range(n):
        t = history.ask(
            {
                "optimizer": optuna.distributions.CategoricalDistribution(
                    ["adam", "momentum", "sgd", "rmsprop"]
                )
            }
        )
        c = sample_config(t, space)
        history.tell(t, -abs(np.log10(c.lr) + 2) - 0.1 * c.depth + 0.01 * rng.normal())
    return history


def test_follower_proposals_are_tpe_proposals_from_one_fit() -> None:
    """With no running trial, a follower proposed from the group's one fit is exactly what TPE
    proposes for the next trial (the same candidates from its seed, the same l/g)."""
    history = _tpe_history()
    study = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=7, constant_liar=True)
    )
    study.add_trials(history.get_trials())
    proposed = worker.follower_proposals(study, study.sampler, 1)
    assert proposed is not None
    twin = optuna.create_study(
        direction="maximize", sampler=optuna.samplers.TPESampler(seed=7, constant_liar=True)
    )
    twin.add_trials(history.get_trials())
    trial = twin.ask()
    sample_config(trial, _fused_spec().space)
    assert proposed[0] == trial.params

    several = worker.follower_proposals(study, study.sampler, 6)
    assert several is not None and len(several) == 6
    assert all(p.keys() == proposed[0].keys() for p in several)  # depth and batch size too
    assert len({p["lr"] for p in several}) == 6  # each from its own candidates


def test_follower_proposals_fall_back_where_tpe_does_not_fit() -> None:
    fresh = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=1))
    assert worker.follower_proposals(fresh, fresh.sampler, 3) is None  # start-up trials
    history = _tpe_history()
    rand = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    rand.add_trials(history.get_trials())
    assert worker.follower_proposals(rand, rand.sampler, 3) is None


def test_a_claimed_group_past_start_up_takes_the_planned_proposals(url: str) -> None:
    """Past TPE's start-up, claim_group's followers carry params that are recorded in the
    study as the configs they train."""
    s = _fused_spec(n_trials=100)
    study_mod.create_or_resume(s, url)
    st = optuna.load_study(
        study_name=s.name, storage=url, sampler=worker.make_sampler(s, 0, fusing=True)
    )
    st.add_trials(_tpe_history().get_trials())
    dev = objective.Objective(s, data.dev_set(data.prepare(s)))
    claimed = worker.claim_group(st, url, 100, 5, dev)
    assert len(claimed) == 5
    configs = [c for _, c in claimed]
    assert len({c.lr for c in configs if c is not None}) == 5
    stored = {t.number: t.params for t in st.get_trials(states=(TrialState.RUNNING,))}
    for trial, config in claimed:
        assert replay_config(stored[trial.number], s.space) == config


def test_cli_fuse_option(tmp_path: Path) -> None:
    f = write_study(tmp_path / "s.toml", small_raw(n_trials=4))
    url = f"sqlite:///{tmp_path / 's.db'}"
    bad = CliRunner().invoke(cli.app, ["run", str(f), "--storage", url, "--fuse", "0"])
    assert bad.exit_code == 2
    assert "--fuse 0: give a whole number from 1 to 64, or auto" in bad.output
    ok = CliRunner().invoke(
        cli.app, ["run", str(f), "--storage", url, "--fuse", "2", "--workers", "1"]
    )
    assert ok.exit_code == 0, ok.output
    assert {t.user_attrs.get("group_size") for t in _all_trials(url)} == {2}


def test_fuse_in_the_study_file_is_checked(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="fuse"):
        spec_mod.parse(small_raw(search={"fuse": 0}), origin="t.toml")
    assert spec_mod.parse(small_raw(), origin="t.toml").search.fuse == "auto"


# --- the fused path's reads and writes of Optuna's tables ----------------------------------------


def test_core_reads_equal_optuna_reads(url: str) -> None:
    """`record.frozen_trials` reads trials (complete, pruned, running, with params, attrs and
    intermediate values) exactly as Optuna's storage does; `refresh` fills its cache the same."""
    s = _fused_spec(n_trials=6)
    study_mod.run(s, url)
    store = storage.open_storage(url, must_exist=True)
    st = optuna.load_study(study_name=s.name, storage=store)
    running = st.ask()
    running.suggest_float("lr", 1e-3, 1e-1, log=True)
    running.report(0.5, 1)
    running.set_user_attr("note", {"a": [1, 2]})
    theirs = st._storage._backend.get_all_trials(st._study_id, deepcopy=False)
    with storage.engine(url).connect() as conn:
        ours = record.frozen_trials(conn, [t._trial_id for t in theirs])
    assert ours == theirs
    fresh = optuna.load_study(study_name=s.name, storage=storage.open_storage(url, must_exist=True))
    record.refresh(fresh)
    with record.one_read(fresh):
        assert fresh.get_trials(deepcopy=False) == theirs


def test_a_resumed_study_is_first_read_with_selectors_reader(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker that resumes a study, and `open_study`, read its trials first with
    `record.refresh` (12x faster than Optuna's ORM at 8,800 trials): Optuna's storage is
    never asked for every trial (trial ids above -1), only for what changed since."""
    s = _fused_spec(n_trials=6)
    study_mod.run(s, url)
    asked: list[int] = []
    own = optuna.storages.RDBStorage._get_trials

    def get_trials(
        self: Any, study_id: int, states: Any, included_trial_ids: Any, trial_id_greater_than: int
    ) -> Any:
        asked.append(trial_id_greater_than)
        return own(self, study_id, states, included_trial_ids, trial_id_greater_than)

    monkeypatch.setattr(optuna.storages.RDBStorage, "_get_trials", get_trials)
    more = s.model_copy(update={"n_trials": 10})
    study_mod.run(more, url)
    opened, _ = record.open_study(url, s.name)
    assert len(opened.get_trials(deepcopy=False)) == 10
    assert asked and -1 not in asked, asked


def test_trials_a_worker_ended_are_cached_as_stored_and_not_read_back(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`worker.end_trials` puts the trials it ended into Optuna's cache as they were written:
    the next `refresh(running=False)` reads their states only, and the study then reads as a
    fresh reader of the database reads it."""
    from selector import worker

    s = _fused_spec(n_trials=6)
    study_mod.create_or_resume(s, url)
    st = optuna.load_study(study_name=s.name, storage=storage.open_storage(url, must_exist=True))
    trials = [st.ask() for _ in range(3)]
    for t in trials:
        t.suggest_float("lr", 1e-3, 1e-1, log=True)
    record.refresh(st, running=False)  # they are cached as running, with their params
    ends = [
        (TrialState.COMPLETE, 0.75, [(1, 0.5), (2, 0.75)]),
        (TrialState.PRUNED, 0.25, [(1, 0.25)]),
        (TrialState.FAIL, None, [(1, 0.5)]),
    ]
    worker.end_trials(
        st,
        [
            storage.TrialWrite(t, {"seconds": 1.5}, {"k": 1}, scores, {}, state, value)
            for t, (state, value, scores) in zip(trials, ends, strict=True)
        ],
    )
    read: list[list[int]] = []
    own = record.frozen_trials
    monkeypatch.setattr(
        record, "frozen_trials", lambda conn, ids: read.append(ids) or own(conn, ids)
    )
    with record.one_read(st, running=False):
        ours = st.get_trials(deepcopy=False)
    assert read == []  # nothing read back
    fresh = optuna.load_study(study_name=s.name, storage=url).get_trials(deepcopy=False)
    assert ours == fresh
    assert [t.state for t in ours] == [state for state, _, _ in ends]


def test_refresh_of_finished_trials_only_keeps_running_ones_as_cached(url: str) -> None:
    """`refresh(running=False)`: trials that finished elsewhere, new trials and a running trial
    whose params were not yet written when first read are read in full; a running trial already
    cached with its params is not read again (its newer intermediate values are left stale)."""
    s = _fused_spec(n_trials=6)
    study_mod.create_or_resume(s, url)

    def handle() -> optuna.Study:
        return optuna.load_study(
            study_name=s.name, storage=storage.open_storage(url, must_exist=True)
        )

    ours, theirs = handle(), handle()
    running = theirs.ask()
    running.suggest_float("lr", 1e-3, 1e-1, log=True)
    done = theirs.ask()
    done.suggest_float("lr", 1e-3, 1e-1, log=True)
    bare = theirs.ask()  # no params yet
    record.refresh(ours, running=False)
    with record.one_read(ours, running=False):
        seen = {t.number: t for t in ours.get_trials(deepcopy=False)}
    assert seen[running.number].params.keys() == {"lr"} and not seen[bare.number].params

    running.report(0.5, 1)
    theirs.tell(done, 0.7)
    bare.suggest_float("lr", 1e-3, 1e-1, log=True)
    late = theirs.ask()
    late.suggest_float("lr", 1e-3, 1e-1, log=True)
    with record.one_read(ours, running=False):
        seen = {t.number: t for t in ours.get_trials(deepcopy=False)}
    assert seen[done.number].state == TrialState.COMPLETE and seen[done.number].value == 0.7
    assert seen[bare.number].params.keys() == {"lr"}  # read again: it had no params
    assert seen[late.number].params.keys() == {"lr"}  # new
    assert seen[running.number].intermediate_values == {}  # cached, not read again
    with record.one_read(ours):  # in full: as Optuna reads it
        assert ours.get_trials(deepcopy=False) == theirs.get_trials(deepcopy=False)
    theirs.tell(running, 0.6)  # finished after a read that kept it: still found
    with record.one_read(ours, running=False):
        again = {t.number: t for t in ours.get_trials(deepcopy=False)}
    assert again[running.number].state == TrialState.COMPLETE
    assert again[running.number].intermediate_values == {1: 0.5}


def test_buffered_params_are_written_once_and_read_back(url: str) -> None:
    s = _fused_spec()
    study_mod.create_or_resume(s, url)
    st = optuna.load_study(study_name=s.name, storage=storage.open_storage(url, must_exist=True))
    with storage.buffered_params(st):
        trial = st.ask()
        config = sample_config(trial, s.space)
    again = optuna.load_study(study_name=s.name, storage=url).get_trials()[-1]
    assert again.params == trial.params and again.distributions == trial.distributions
    assert replay_config(again.params, s.space) == config


def test_members_schedules_are_each_ones_own() -> None:
    """Members sharing a stand-in optimizer per kind of schedule get, epoch by epoch, exactly
    the rates their own optimizer and scheduler give alone."""
    configs = [
        TrialConfig(lr=0.1, lr_schedule="cosine"),
        TrialConfig(lr=0.003, lr_schedule="step"),
        TrialConfig(lr=0.02),
        TrialConfig(lr=0.0007, lr_schedule="cosine"),
        TrialConfig(lr=0.05, lr_schedule="step"),
    ]
    shared = fused._Schedules(configs, 12)
    alone = []
    for c in configs:
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=c.lr)
        alone.append((opt, engine.make_schedule(c, opt, 12)))
    for _ in range(12):
        shared.step()
        for m, (opt, schedule) in enumerate(alone):
            if schedule is not None:
                opt.step()
                schedule.step()
            assert shared.lr[m] == opt.param_groups[0]["lr"]
