"""Out of memory: a trial that cannot fit in either engine is refused before anything is
allocated, a failed allocation (CUDA's or the CPU allocator's) is recorded as `oom`, and the study
goes on; a search space that cannot fit even at its smallest config is refused at create time.

Nothing here allocates much: the available-memory reading is patched to a small number."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
import torch
from optuna.trial import TrialState

from selector import engine, objective, spec, stacked, study
from selector.data import FoldData
from selector.errors import SpecError, TrialOutOfMemory
from selector.space import TrialConfig
from selector.spec import TrainingSpec
from tests.conftest import bundled_folds, small_raw

MiB = 1 << 20


@pytest.fixture(scope="module")
def digits_folds() -> list[FoldData]:
    return bundled_folds("digits")


def _trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="iris-small", storage=url).trials


def _real_cpu_allocation_failure() -> RuntimeError:
    """What torch's CPU allocator raises when memory runs out (1 EiB is more than any machine's
    address space, so nothing is allocated)."""
    try:
        torch.empty(1 << 60, dtype=torch.uint8)
    except RuntimeError as e:
        return e
    raise AssertionError("a 1 EiB allocation succeeded")


@pytest.mark.parametrize(
    "error",
    [
        pytest.param(_real_cpu_allocation_failure(), id="cpu-allocator-real"),
        pytest.param(
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:116] data. DefaultCPUAllocator: not enough "
                "memory: you tried to allocate 68719476736 bytes."
            ),
            id="cpu-allocator-not-enough",
        ),
        pytest.param(
            torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), id="cuda"
        ),
        pytest.param(RuntimeError("MPS backend out of memory (MPS allocated: 1 GB)"), id="mps"),
        pytest.param(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED"), id="cublas"),
        pytest.param(MemoryError("Unable to allocate 5.00 GiB for an array"), id="numpy"),
        pytest.param(TrialOutOfMemory("needs 9 GiB", need=9, available=1), id="estimate"),
    ],
)
def test_out_of_memory_errors_are_recognized(error: BaseException) -> None:
    assert engine.is_out_of_memory(error)


@pytest.mark.parametrize(
    "error",
    [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied (32x4 and 5x8)"),
        ValueError("Input contains NaN"),
        KeyboardInterrupt(),
    ],
)
def test_other_errors_are_not_out_of_memory(error: BaseException) -> None:
    assert not engine.is_out_of_memory(error)


def _ram(monkeypatch: pytest.MonkeyPatch, available: int) -> None:
    """Pretend the machine has `available` bytes free, for every engine's memory check."""
    monkeypatch.setattr(engine, "available_memory", lambda device: available)


def test_a_trial_that_fits_in_neither_engine_is_refused_naming_the_knob(
    iris_folds: list[FoldData], monkeypatch: pytest.MonkeyPatch
) -> None:
    _ram(monkeypatch, 64 * MiB)
    huge = TrialConfig(width=16384, depth=2, batch_size=32)
    reference = engine.reference_memory(iris_folds, huge, 3, torch.device("cpu"))
    assert reference.weights > 10 * 2**30
    need = min(reference.total, stacked.memory_estimate(iris_folds, huge, 3))
    with pytest.raises(TrialOutOfMemory) as refused:
        stacked.choose_engine(huge, iris_folds, TrainingSpec(device="cpu"))
    message = str(refused.value)
    assert (
        "width 16384, depth 2, batch size 32" in message and "lower the width or depth" in message
    )
    assert f"({need:,} bytes)" in message and f"({64 * MiB:,} bytes) is available" in message
    small = TrialConfig(width=16, depth=2, batch_size=32)
    assert stacked.choose_engine(small, iris_folds, TrainingSpec(device="cpu")) is (
        stacked.cross_validate
    )


def test_where_the_stacked_engine_does_not_fit_the_reference_engine_is_checked_too(
    iris_folds: list[FoldData], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrialConfig(width=256, depth=2, batch_size=32)
    ref = engine.reference_memory(iris_folds, config, 3, torch.device("cpu")).total
    training = TrainingSpec(device="cpu")
    _ram(monkeypatch, 2 * ref)  # the reference fits; the stacked engine is refused by budget=1
    assert stacked.choose_engine(config, iris_folds, training, budget=1) is engine.cross_validate
    _ram(monkeypatch, ref // 2)
    with pytest.raises(TrialOutOfMemory):
        stacked.choose_engine(config, iris_folds, training, budget=1)


def test_a_stacked_trial_that_fits_only_past_its_preferred_share_still_runs(
    digits_folds: list[FoldData], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wide layers on many rows: the reference engine (every row at once through the layers)
    needs more than the stacked one (in chunks); the stacked engine runs where only it fits."""
    config = TrialConfig(width=4096, depth=1, batch_size=32)
    ref = engine.reference_memory(digits_folds, config, 10, torch.device("cpu")).total
    stk = stacked.memory_estimate(digits_folds, config, 10)
    assert stk < ref
    _ram(monkeypatch, int(stk / engine.REFERENCE_SHARE) + 1)  # above MEMORY_SHARE, below ref
    training = TrainingSpec(device="cpu")
    assert stacked.choose_engine(config, digits_folds, training) is stacked.cross_validate


def test_a_batch_size_that_cannot_fit_names_the_batch_size(
    iris_folds: list[FoldData], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = TrialConfig(width=4096, depth=1, batch_size=100_000)
    need = engine.reference_memory(iris_folds, config, 3, torch.device("cpu"))
    _ram(monkeypatch, need.total // 2)
    with pytest.raises(TrialOutOfMemory, match="lower the batch size or width"):
        stacked.choose_engine(config, iris_folds, TrainingSpec(device="cpu"))


def test_the_reference_estimate_grows_with_width_depth_and_optimizer_state(
    iris_folds: list[FoldData],
) -> None:
    def need(**kw: Any) -> int:
        return engine.reference_memory(iris_folds, TrialConfig(**kw), 3, torch.device("cpu")).total

    assert need(width=64) < need(width=128) < need(width=128, depth=3)
    assert need(width=512, optimizer="sgd") < need(width=512, optimizer="momentum")
    assert need(width=512, optimizer="momentum") < need(width=512, optimizer="adam")
    on_cpu = engine.reference_memory(iris_folds, TrialConfig(), 3, torch.device("cpu"))
    on_gpu = engine.reference_memory(iris_folds, TrialConfig(), 3, torch.device("cuda"))
    assert on_cpu.data == 0 < on_gpu.data  # on the CPU the tensors share the folds' arrays


def test_a_trial_too_big_for_memory_fails_as_oom_and_the_next_one_completes(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _ram(monkeypatch, 64 * MiB)
    s = spec.parse(
        small_raw(n_trials=3, space={"width": [16, 16384], "depth": 2}), origin="oom.toml"
    )
    summary = study.run(s, url)
    assert summary.finished == 3  # the study went on to its budget
    trials = _trials(url)
    huge = [t for t in trials if t.params["width"] == 16384]
    small = [t for t in trials if t.params["width"] == 16]
    assert huge and small, [t.params for t in trials]
    assert all(t.state == TrialState.FAIL for t in huge)
    assert {t.user_attrs["fail_reason"] for t in huge} == {"oom"}
    assert all("width 16384" in t.user_attrs["error"] for t in huge)
    assert all(t.state == TrialState.COMPLETE for t in small)
    assert max(t.number for t in small) > min(t.number for t in huge)  # completed after an oom


def test_a_failed_cpu_allocation_during_training_is_recorded_as_oom(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real, calls = stacked.auto_cross_validate, []

    def runs_out(*a: Any, **kw: Any) -> engine.CVResult:
        calls.append(1)
        if len(calls) == 1:
            torch.empty(1 << 60, dtype=torch.uint8)  # the CPU allocator refuses
        return real(*a, **kw)

    monkeypatch.setattr(objective.stacked, "auto_cross_validate", runs_out)
    assert study.run(spec.parse(small_raw(n_trials=2), origin="t.toml"), url).finished == 2
    first, *rest = _trials(url)
    assert first.state == TrialState.FAIL and first.user_attrs["fail_reason"] == "oom"
    assert "DefaultCPUAllocator: can't allocate memory" in first.user_attrs["error"]
    assert [t.state for t in rest] == [TrialState.COMPLETE, TrialState.COMPLETE]


def test_the_smallest_config_of_a_space_is_its_lightest() -> None:
    s = spec.parse(
        small_raw(
            space={
                "width": {"low": 32, "high": 4096, "log": True},
                "depth": [3, 1, 2],
                "batch_size": [256, 64],
                "shape": ["constant", "funnel"],
                "optimizer": ["adam", "sgd"],
                "batch_norm": [True, False],
                "residual": True,
            }
        ),
        origin="t.toml",
    )
    config = stacked.smallest_config(s.space)
    assert (config.width, config.depth, config.batch_size) == (32, 1, 64)
    assert (config.shape, config.optimizer, config.batch_norm, config.residual) == (
        "funnel",
        "sgd",
        False,
        True,
    )


def test_a_space_that_cannot_fit_even_at_its_smallest_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    wide = spec.parse(
        small_raw(space={"width": [8192, 16384], "depth": {"low": 2, "high": 4}}), origin="t.toml"
    )
    _ram(monkeypatch, 256 * MiB)
    with pytest.raises(SpecError) as refused:
        stacked.check_space_fits(wide, n_features=4, n_rows=120, n_out=3)
    message = str(refused.value)
    assert message.startswith("space: even the smallest config needs about")
    assert "width 8192, depth 2" in message and "lower the width or depth" in message
    stacked.check_space_fits(spec.parse(small_raw(), origin="t.toml"), 4, 120, 3)  # fits


def test_available_memory_is_capped_by_the_containers_cgroup_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "memory.max").write_text(f"{512 * MiB}\n")
    (tmp_path / "memory.current").write_text(f"{200 * MiB}\n")
    (tmp_path / "memory.stat").write_text(f"anon 1\ninactive_file {8 * MiB}\n")
    files = ((str(tmp_path / "memory.max"), str(tmp_path / "memory.current"), "inactive_file"),)
    monkeypatch.setattr(engine, "CGROUP_FILES", files)
    assert engine.available_memory(torch.device("cpu")) == 320 * MiB
    (tmp_path / "memory.max").write_text("max\n")
    assert 0 < engine.available_memory(torch.device("cpu")) < engine.UNLIMITED


def test_create_refuses_a_space_that_cannot_fit_and_writes_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from selector.cli import main
    from tests.conftest import write_study

    path = write_study(
        tmp_path / "wide.toml",
        small_raw(space={"width": [8192, 16384], "depth": {"low": 2, "high": 4}}),
    )
    _ram(monkeypatch, 256 * MiB)
    with pytest.raises(SystemExit) as exit_:
        main(["create", str(path), "--storage", f"sqlite:///{tmp_path / 's.db'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert "space: even the smallest config needs about" in err[0]
    with sa.create_engine(f"sqlite:///{tmp_path / 's.db'}").connect() as conn:
        assert not conn.execute(sa.text("SELECT * FROM studies")).all()
