"""`device = "cuda"`: both engines on a GPU give the CPU reference engine's results, and a whole
study (search, final, predict on the CPU) runs there. Every test here skips without a CUDA device.

The tolerances are the CPU equivalence tests' own: cuBLAS sums in another order than the CPU's
BLAS, so weights agree to float32 rounding, not bit for bit.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from selector import engine, metrics, stacked
from selector.cli import app
from selector.data import FoldData
from selector.space import TrialConfig
from selector.spec import TrainingSpec
from tests.conftest import small_raw, write_study
from tests.test_fused import GROUP, SEEDS, _run, assert_member_matches_solo
from tests.test_stacked import OPTIMIZERS, _cut, assert_same_result, assert_same_weights

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")
KW = {"task": "classification", "metric": metrics.get("accuracy"), "seed": 1}


@pytest.mark.parametrize("knob", ["plain", "batch_norm", "clip", "residual"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_stacked_on_cuda_matches_the_cpu_reference(
    iris_folds: list[FoldData], optimizer: str, knob: str
) -> None:
    extra = {
        "plain": {},
        "batch_norm": {"batch_norm": True},
        "clip": {"grad_clip": 0.3},
        "residual": {"residual": True, "shape": "funnel", "depth": 3},
    }[knob]
    config = TrialConfig(optimizer=optimizer, width=32, batch_size=16, lr=1e-2, **extra)  # type: ignore[arg-type]
    assert_same_weights(config, iris_folds, device=CUDA)


@pytest.mark.parametrize("kernel", [False, True], ids=["formulas", "fused-kernel"])
def test_fused_members_on_cuda_match_their_cpu_solo_runs(
    iris_folds: list[FoldData], kernel: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fused group (every optimizer, padded widths, every knob) on the GPU: each member's
    weights are its solo CPU run's, to float32 rounding."""
    from selector import fused_optim

    monkeypatch.setattr(fused_optim, "KERNEL_ELEMENTS", 0 if kernel else 1 << 40)
    run = _run(GROUP, iris_folds, SEEDS, epochs=3, device=CUDA)
    for _ in range(3):
        run.train_epoch()
    for m, config in enumerate(GROUP):
        assert_member_matches_solo(run, m, config, iris_folds, seed=SEEDS[m], epochs=3)


def test_uneven_folds_on_cuda(wine_folds: list[FoldData]) -> None:
    """Folds with 6, 5 and 4 batches an epoch: per-fold optimizer views on the GPU."""
    config = TrialConfig(optimizer="adam", width=24, batch_size=16, lr=1e-2, grad_clip=1.0)
    assert_same_weights(config, _cut(wine_folds, [94, 81, 64]), device=CUDA)


@pytest.mark.parametrize("fn", [engine.cross_validate, stacked.cross_validate])
def test_cv_result_on_cuda_matches_cpu(
    wine_folds: list[FoldData], fn: stacked.CrossValidate
) -> None:
    config = TrialConfig(optimizer="momentum", width=32, batch_size=16, lr=1e-2, batch_norm=True)
    cpu = engine.cross_validate(
        config, wine_folds, n_classes=3, training=TrainingSpec(max_epochs=4, device="cpu"), **KW
    )  # type: ignore[arg-type]
    gpu = fn(
        config, wine_folds, n_classes=3, training=TrainingSpec(max_epochs=4, device="cuda"), **KW
    )  # type: ignore[arg-type]
    assert_same_result(cpu, gpu, exact=False)


def test_dropout_on_cuda_scores_like_cpu(wine_folds: list[FoldData]) -> None:
    """With dropout the masks differ between devices; the scores' distribution over seeds must not."""
    config = TrialConfig(width=64, batch_size=16, lr=1e-2, dropout=0.3, optimizer="adam")

    def scores(device: str) -> list[float]:
        return [
            stacked.cross_validate(
                config,
                wine_folds,
                task="classification",
                n_classes=3,
                metric=metrics.get("accuracy"),
                training=TrainingSpec(max_epochs=6, device=device),  # type: ignore[arg-type]
                seed=s,
            ).value
            for s in range(6)
        ]

    cpu, gpu = scores("cpu"), scores("cuda")
    assert abs(np.mean(cpu) - np.mean(gpu)) < 0.03, (cpu, gpu)


def test_the_engine_is_chosen_by_the_gpus_free_memory(iris_folds: list[FoldData]) -> None:
    config = TrialConfig(width=16, batch_size=16)
    training = TrainingSpec(device="cuda")
    assert stacked.choose_engine(config, iris_folds, training) is stacked.cross_validate
    assert stacked.choose_engine(config, iris_folds, training, budget=1) is engine.cross_validate


def test_a_study_on_cuda_end_to_end(tmp_path: Path) -> None:
    """Search and final on the GPU; `selector predict` in a fresh CPU-only process gives the test
    score `final` printed."""
    study_end_to_end(tmp_path, "cuda")


def study_end_to_end(tmp_path: Path, device: str) -> None:
    raw = small_raw(n_trials=4, training={"device": device, "max_epochs": 8})
    study_file = write_study(tmp_path / "iris.toml", raw)
    url = f"sqlite:///{tmp_path / 'selector.db'}"
    runner = CliRunner()
    r = runner.invoke(app, ["run", str(study_file), "--storage", url])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["final", str(study_file), "--storage", url])
    assert r.exit_code == 0, r.output
    printed = float(re.search(r"test accuracy = ([0-9.]+)", r.output).group(1))  # type: ignore[union-attr]

    import pandas as pd
    from sklearn.datasets import load_iris

    from selector import data, spec

    prep = data.prepare(spec.load(study_file))
    frame = load_iris(as_frame=True).frame.iloc[prep.test]
    frame.to_csv(tmp_path / "test_rows.csv", index=False)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "selector",
            "predict",
            "iris-small",
            "test_rows.csv",
            "--storage",
            url,
            "-o",
            "pred.csv",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    score = float(re.search(r"accuracy = ([0-9.]+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert score == printed, (proc.stdout, r.output)
    assert len(pd.read_csv(tmp_path / "pred.csv")) == len(frame)
