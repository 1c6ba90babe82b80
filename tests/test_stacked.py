"""The fold-stacked engine against the reference engine: same weights, same scores.

With dropout 0 both engines compute the same arithmetic in a different layout, so weights agree to
float32 rounding. One documented exception: with batch norm and an adaptive optimizer (Adagrad,
RMSprop, Adam, AdamW) the linear bias in front of a batch norm has an analytically zero gradient,
so both engines move it by rounding noise that the optimizer's normalisation blows up to the size of
a step; the reference engine does not reproduce it either (1 vs 2 torch threads differ the same
way). Those biases, and the running means that absorb them, are checked loosely; everything else
is checked to 1e-4 relative.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from selector import engine, metrics, stacked, worker
from selector.data import FoldData
from selector.errors import TrialDiverged
from selector.model import ACTIVATIONS, build_mlp
from selector.space import TrialConfig
from selector.spec import TrainingSpec

OPTIMIZERS = ("sgd", "momentum", "adagrad", "rmsprop", "adadelta", "adam", "adamw")
ADAPTIVE = ("adagrad", "rmsprop", "adam", "adamw")
KNOBS: dict[str, dict[str, object]] = {
    "plain": {},
    "batch_norm": {"batch_norm": True},
    "clip": {"grad_clip": 0.3},
    "residual_funnel": {"residual": True, "shape": "funnel", "depth": 3},
    "all": {
        "residual": True,
        "batch_norm": True,
        "depth": 3,
        "activation": "gelu",
        "grad_clip": 1.0,
        "weight_decay": 0.01,
        "lr_schedule": "cosine",
    },
}
CPU = torch.device("cpu")
RTOL = 1e-4
NOISY = re.compile(r"blocks\.\d+\.(linear\.bias|norm\.running_mean)$")


def _cut(folds: Sequence[FoldData], sizes: Sequence[int]) -> list[FoldData]:
    return [
        FoldData(f.X_train[:n], f.y_train[:n], f.X_val, f.y_val, f.y_mean, f.y_std)
        for f, n in zip(folds, sizes, strict=True)
    ]


@pytest.fixture(scope="module")
def uneven_views(wine_folds: list[FoldData]) -> list[FoldData]:
    """Batch size 16: 6, 5 (the last of 17 rows: a lone row joins its batch) and 4 batches."""
    return _cut(wine_folds, [94, 81, 64])


@pytest.fixture(scope="module")
def uneven_lockstep(wine_folds: list[FoldData]) -> list[FoldData]:
    """Batch size 16: 6 batches each, last batches of 14, 10 and 5 rows."""
    return _cut(wine_folds, [94, 90, 85])


def _n_out(folds: Sequence[FoldData], task: str) -> int:
    return int(max(f.y_train.max() for f in folds)) + 1 if task == "classification" else 1


def reference_states(
    config: TrialConfig, folds: Sequence[FoldData], *, epochs: int, seed: int, task: str
) -> list[dict[str, torch.Tensor]]:
    """Each fold's weights after `epochs` epochs of the reference engine's training loop."""
    runs = [
        engine.FoldRun(
            config,
            f,
            task=task,  # type: ignore[arg-type]
            n_out=_n_out(folds, task),
            max_epochs=epochs,
            seed=engine.derive_seed(seed, k),
            device=CPU,
        )
        for k, f in enumerate(folds)
    ]
    for _ in range(epochs):
        for run in runs:
            run.train_epoch()
    return [run.model.state_dict() for run in runs]


def stacked_states(
    config: TrialConfig,
    folds: Sequence[FoldData],
    *,
    epochs: int,
    seed: int,
    task: str,
    device: torch.device = CPU,
) -> list[dict[str, torch.Tensor]]:
    run = stacked.StackedRun(
        config,
        folds,
        task=task,  # type: ignore[arg-type]
        n_out=_n_out(folds, task),
        max_epochs=epochs,
        seeds=[engine.derive_seed(seed, k) for k in range(len(folds))],
        device=device,
    )
    for _ in range(epochs):
        run.train_epoch()
    return [{key: t.cpu() for key, t in state.items()} for state in run.state_dicts()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def assert_same_weights(
    config: TrialConfig,
    folds: Sequence[FoldData],
    *,
    epochs: int = 3,
    seed: int = 1,
    task: str = "classification",
    device: torch.device = CPU,
) -> None:
    ref = reference_states(config, folds, epochs=epochs, seed=seed, task=task)
    stk = stacked_states(config, folds, epochs=epochs, seed=seed, task=task, device=device)
    noisy = config.batch_norm and config.optimizer in ADAPTIVE
    for k, (a, b) in enumerate(zip(ref, stk, strict=True)):
        assert list(a) == list(b)
        for key in a:
            assert a[key].shape == b[key].shape, key
            if noisy and NOISY.search(key):
                # rounding noise scaled to optimizer steps: bounded by a few steps of size lr
                assert float((a[key] - b[key]).abs().max()) < 50 * config.lr, (k, key)
                continue
            assert _rel(b[key], a[key]) < RTOL, (k, key, _rel(b[key], a[key]))


@pytest.mark.parametrize("knob", list(KNOBS))
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_weights_match_reference(iris_folds: list[FoldData], optimizer: str, knob: str) -> None:
    config = TrialConfig(
        optimizer=optimizer,
        width=32,
        batch_size=16,
        lr=1e-2,
        nesterov=optimizer == "momentum",
        **KNOBS[knob],  # type: ignore[arg-type]
    )
    assert_same_weights(config, iris_folds)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_uneven_folds_step_counts_per_fold(uneven_views: list[FoldData], optimizer: str) -> None:
    """Folds with 6, 5 and 4 batches an epoch: a fold without a batch is not stepped, and Adam's
    bias correction keeps each fold's own step count."""
    config = TrialConfig(
        optimizer=optimizer, width=24, batch_size=16, lr=1e-2, batch_norm=True, grad_clip=1.0
    )
    assert_same_weights(config, uneven_views)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_uneven_last_batches_lockstep(uneven_lockstep: list[FoldData], batch_norm: bool) -> None:
    config = TrialConfig(optimizer="adam", width=24, batch_size=16, lr=1e-2, batch_norm=batch_norm)
    run = stacked.StackedRun(
        config,
        uneven_lockstep,
        task="classification",
        n_out=3,
        max_epochs=1,
        seeds=[1, 2, 3],
        device=CPU,
    )
    assert run.lockstep and not run.steps[-1].uniform
    assert_same_weights(config, uneven_lockstep)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_every_activation(iris_folds: list[FoldData], activation: str) -> None:
    config = TrialConfig(
        activation=activation, width=16, batch_size=32, optimizer="momentum", lr=0.05
    )
    assert_same_weights(config, iris_folds, epochs=2)


def test_regression_weights(iris_folds: list[FoldData]) -> None:
    folds = [
        FoldData(
            f.X_train[:, 1:], f.X_train[:, 0].copy(), f.X_val[:, 1:], f.X_val[:, 0].copy(), 1.5, 2.0
        )
        for f in iris_folds
    ]
    config = TrialConfig(width=16, batch_size=16, optimizer="adam", lr=1e-2, residual=True, depth=2)
    assert_same_weights(config, folds, task="regression")


def test_initial_weights_are_the_reference_models(iris_folds: list[FoldData]) -> None:
    config = TrialConfig(depth=3, width=20, shape="funnel", residual=True, batch_norm=True)
    seeds = [11, 12, 13]
    run = stacked.StackedRun(
        config, iris_folds, task="classification", n_out=3, max_epochs=1, seeds=seeds, device=CPU
    )
    for seed, state in zip(seeds, run.state_dicts(), strict=True):
        torch.manual_seed(seed)
        ref = build_mlp(config, 4, 3).state_dict()
        assert list(ref) == list(state)
        for key in ref:
            assert torch.equal(ref[key], state[key]), key


def test_every_row_once_per_epoch(uneven_views: list[FoldData]) -> None:
    """Each fold's batches are the reference's: its own permutation, cut by `batch_bounds`."""
    config = TrialConfig(batch_size=16)
    seeds = [5, 6, 7]
    run = stacked.StackedRun(
        config, uneven_views, task="classification", n_out=3, max_epochs=1, seeds=seeds, device=CPU
    )
    perms = [torch.randperm(n, generator=g) for n, g in zip(run.n_train, run.gens, strict=True)]
    head = torch.stack([p[: run.uniform_rows] for p in perms]) + run.offsets.unsqueeze(1)
    seen: list[list[int]] = [[] for _ in seeds]
    for step in run.steps:
        idx, *_ = run._batch(step, perms, head)
        for k, size in enumerate(step.sizes):
            seen[k].extend((idx[k, :size] - k * run.n_max).tolist())
    for k, (seed, n) in enumerate(zip(seeds, run.n_train, strict=True)):
        expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        assert seen[k] == expected
        bounds = engine.batch_bounds(n, 16)
        assert [s.sizes[k] for s in run.steps if s.sizes[k]] == [b - a for a, b in bounds]


def _cv(
    fn: stacked.CrossValidate, config: TrialConfig, folds: Sequence[FoldData], **kw: object
) -> engine.CVResult:
    n_classes = _n_out(folds, "classification")
    return fn(
        config,
        folds,
        task="classification",
        n_classes=n_classes,
        metric=metrics.get(str(kw.get("metric", "accuracy"))),
        training=TrainingSpec(
            max_epochs=int(kw.get("epochs", 5)), patience=int(kw.get("patience", 2)), device="cpu"
        ),  # type: ignore[call-overload]
        seed=int(kw.get("seed", 3)),  # type: ignore[call-overload]
        on_epoch=kw.get("on_epoch"),  # type: ignore[arg-type]
    )


def assert_same_result(a: engine.CVResult, b: engine.CVResult, *, exact: bool = True) -> None:
    assert (a.best_epoch, a.epochs_run, a.stopped_early, a.seeds) == (
        b.best_epoch,
        b.epochs_run,
        b.stopped_early,
        b.seeds,
    )
    if exact:
        assert a.fold_scores == b.fold_scores
        assert a.fold_curves == b.fold_curves
        assert a.train_scores == b.train_scores
        assert a.value == b.value
    else:
        np.testing.assert_allclose(a.fold_curves, b.fold_curves, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a.train_scores, b.train_scores, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.train_loss_curve, b.train_loss_curve, rtol=RTOL)
    np.testing.assert_allclose(a.grad_norms, b.grad_norms, rtol=RTOL)


@pytest.mark.parametrize(
    "config",
    [
        TrialConfig(
            optimizer="adamw",
            width=32,
            batch_size=16,
            lr=3e-2,
            weight_decay=0.01,
            residual=True,
            depth=3,
        ),
        TrialConfig(
            optimizer="momentum",
            width=32,
            batch_size=16,
            lr=5e-2,
            grad_clip=0.5,
            shape="funnel",
            depth=2,
        ),
        TrialConfig(
            optimizer="adadelta",
            width=16,
            batch_size=16,
            lr=1.0,
            batch_norm=True,
            lr_schedule="step",
        ),
    ],
)
def test_cv_result_matches_reference(wine_folds: list[FoldData], config: TrialConfig) -> None:
    ref = _cv(engine.cross_validate, config, wine_folds, epochs=6, patience=2)
    stk = _cv(stacked.cross_validate, config, wine_folds, epochs=6, patience=2)
    assert_same_result(ref, stk)


def test_cv_uneven_folds_and_proba_metric(uneven_views: list[FoldData]) -> None:
    config = TrialConfig(optimizer="sgd", width=16, batch_size=16, lr=0.1, batch_norm=True)
    kw = {"metric": "neg_log_loss", "epochs": 4}
    assert_same_result(
        _cv(engine.cross_validate, config, uneven_views, **kw),
        _cv(stacked.cross_validate, config, uneven_views, **kw),
        exact=False,
    )


def test_on_epoch_prunes_like_reference(iris_folds: list[FoldData]) -> None:
    calls: list[tuple[int, float]] = []

    def prune_at_2(epoch: int, value: float) -> None:
        calls.append((epoch, value))
        if epoch == 2:
            raise RuntimeError("pruned")

    config = TrialConfig(width=16, batch_size=16)
    for fn in (engine.cross_validate, stacked.cross_validate):
        with pytest.raises(RuntimeError, match="pruned"):
            _cv(fn, config, iris_folds, on_epoch=prune_at_2)
    assert [e for e, _ in calls] == [1, 2, 1, 2]
    assert calls[:2] == calls[2:]


def test_divergence_is_reported_like_reference(iris_folds: list[FoldData]) -> None:
    folds = [
        FoldData(f.X_train, f.X_train[:, 0] * 1e6, f.X_val, f.X_val[:, 0], 0.0, 1.0)
        for f in iris_folds
    ]
    config = TrialConfig(optimizer="sgd", lr=10.0, width=16, batch_size=8)
    errors = []
    for fn in (engine.cross_validate, stacked.cross_validate):
        with pytest.raises(TrialDiverged) as info:
            fn(
                config,
                folds,
                task="regression",
                n_classes=0,
                metric=metrics.get("r2"),
                training=TrainingSpec(max_epochs=5, device="cpu"),
                seed=0,
            )
        errors.append((info.value.epoch, info.value.fold))
    assert errors[0] == errors[1]


def test_dropout_masks() -> None:
    torch.manual_seed(0)
    mask = stacked.dropout_mask((4, 64, 256), 0.25, CPU)
    values = torch.unique(mask).tolist()
    assert values[0] == 0.0 and values[1] == pytest.approx(1 / 0.75) and len(values) == 2
    assert abs(float((mask > 0).float().mean()) - 0.75) < 0.01
    assert not torch.equal(mask[0], mask[1])  # independent per fold


@pytest.mark.parametrize("p", [0.05, 0.2, 0.5, 0.9])
def test_dropout_mask_rates_on_the_cpu(p: float) -> None:
    """The CPU mask takes four elements from each 64-bit draw: each of the four drops at rate p
    (within 4 standard errors and the 2^-16 rounding), neighbours do not correlate, the mean is 1."""
    n = 1_000_003  # not a multiple of 4: the last word serves three elements
    mask = stacked.dropout_mask((n,), p, CPU, np.random.PCG64(1))
    quarter = n // 4
    se = 4 * np.sqrt(p * (1 - p) / quarter) + 2.0**-stacked.DROP_BITS
    lanes = [(mask[i : 4 * quarter : 4] == 0).double() for i in range(4)]  # the 4 parts of a word
    for lane in lanes:
        assert abs(float(lane.mean()) - p) < se
    for a, b in itertools.pairwise(lanes):
        corr = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
        assert abs(corr) < 4 / np.sqrt(quarter)
    assert abs(float(mask.double().mean()) - 1.0) < 4 * np.sqrt(p / (1 - p) / n)
    again = stacked.dropout_mask((n,), p, CPU, np.random.PCG64(1))
    assert torch.equal(again, mask)  # seeded


def test_dropout_score_distribution_matches(wine_folds: list[FoldData]) -> None:
    """With dropout the masks differ from the reference's; the mean CV score over seeds agrees."""
    config = TrialConfig(dropout=0.3, width=32, batch_size=16, optimizer="adam", lr=3e-3)
    ref, stk = [], []
    for seed in range(6):
        ref.append(
            _cv(
                engine.cross_validate, config, wine_folds, epochs=3, patience=5, seed=seed
            ).val_curve[-1]
        )
        stk.append(
            _cv(
                stacked.cross_validate, config, wine_folds, epochs=3, patience=5, seed=seed
            ).val_curve[-1]
        )
    se = np.sqrt((np.var(ref, ddof=1) + np.var(stk, ddof=1)) / len(ref))
    assert abs(np.mean(ref) - np.mean(stk)) < 4 * se + 0.02
    assert ref != stk  # the masks are not the reference's: only the distribution is compared


def test_fits_and_choose_engine(iris_folds: list[FoldData]) -> None:
    config = TrialConfig(width=32)
    need = stacked.memory_estimate(iris_folds, config, 3)
    assert need > len(iris_folds) * sum(f.X_train.nbytes for f in iris_folds) // len(iris_folds)
    assert stacked.fits(iris_folds, config, budget=need, device="cpu")
    assert not stacked.fits(iris_folds, config, budget=need // 2, device="cpu")
    training = TrainingSpec(device="cpu")
    assert stacked.choose_engine(config, iris_folds, training) is stacked.cross_validate
    assert stacked.choose_engine(config, iris_folds, training, budget=1) is engine.cross_validate
    bigger = stacked.memory_estimate(iris_folds, TrialConfig(width=64, depth=3), 3)
    assert bigger > need


def test_torch_threads() -> None:
    cores = worker.torch_threads(1)
    assert cores >= 1
    assert worker.torch_threads(cores) == 1
    assert worker.torch_threads(10 * cores) == 1
    assert worker.torch_threads(2) == max(1, cores // 2)


def test_auto_cross_validate_runs_the_chosen_engine(iris_folds: list[FoldData]) -> None:
    config = TrialConfig(width=16, batch_size=16)
    auto = _cv(stacked.auto_cross_validate, config, iris_folds)
    assert_same_result(auto, _cv(stacked.cross_validate, config, iris_folds))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_reference_on_cpu(wine_folds: list[FoldData]) -> None:
    config = TrialConfig(optimizer="momentum", width=32, batch_size=16, lr=1e-2, batch_norm=True)
    kw = {"task": "classification", "n_classes": 3, "metric": metrics.get("accuracy"), "seed": 1}
    cpu = engine.cross_validate(
        config, wine_folds, training=TrainingSpec(max_epochs=4, device="cpu"), **kw
    )  # type: ignore[arg-type]
    gpu = stacked.cross_validate(
        config, wine_folds, training=TrainingSpec(max_epochs=4, device="cuda"), **kw
    )  # type: ignore[arg-type]
    assert_same_result(cpu, gpu, exact=False)
