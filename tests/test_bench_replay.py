"""bench.replay end to end: it records a short search and its children, one per core, replay the
recorded groups with this checkout and a revision of it (a child is started as `-m bench.replay`
from the repository root, so that it imports `bench` and each tree's `selector`)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_replay_times_both_trees_on_every_core() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.replay", "penguins", "--seconds", "4", "--groups", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("machine: ")
    assert re.search(r"penguins: 1 groups of a 4 s search, \d+ fused parts", out.stdout)
    cores = re.findall(r"core (\d+): this checkout [\d.]+ s, HEAD \(\w+\) [\d.]+ s", out.stdout)
    assert len(cores) == len(set(cores)) >= 1, out.stdout
