"""A long study in one worker: memory, open files and connections stay flat."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from selector import spec, study
from tests.conftest import small_raw


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.slow
def test_300_trials_in_one_worker_keep_memory_files_and_connections_flat(url: str) -> None:
    raw = small_raw(
        n_trials=300,
        training={"max_epochs": 2, "patience": 2, "device": "cpu"},
        search={"sampler": "tpe", "pruner": "median"},
        space={"width": [8, 16], "lr": {"low": 1e-3, "high": 1e-1, "log": True}},
    )
    samples: dict[int, tuple[float, int]] = {}

    def sample(s: Any, trial: Any) -> None:
        samples[trial.number] = (_rss_mb(), _open_files())

    summary = study.run(spec.parse(raw, origin="long.toml"), url, progress=sample)
    assert summary.finished == 300
    (rss0, files0), (rss1, files1) = samples[49], samples[max(samples)]
    print(
        f"\n300 trials: RSS {rss0:.0f} MB at trial 50, {rss1:.0f} MB at trial 300 "
        f"({rss1 - rss0:+.1f} MB); open files {files0} -> {files1}"
    )
    assert rss1 - rss0 < 100
    assert files1 <= files0 + 1
