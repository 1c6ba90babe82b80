"""Benchmarks: how fast selector scores one config, against the usual ways to do it.

`python -m bench` (or `make bench`) times one K-fold trial four ways on the same prepared folds,
alternating the contenders so that drift in the machine's speed hits all of them alike:

  (a) a typical Optuna + DataLoader script that trains the folds in turn (the baseline),
  (b) scikit-learn's MLPClassifier with the same network under `cross_val_score` (float32 input),
  (c) selector's reference engine (`selector.engine.cross_validate`),
  (d) selector's fold-stacked engine (`selector.stacked.cross_validate`),

on digits (5 folds, 3 x 256 ReLU, dropout 0.2, AdamW, batch 128, 20 epochs) and on
make_classification 50000 x 100 (5 classes, 5 epochs, same network). Each row gives the median
seconds, the speed-up over (a), the training arithmetic's rate as a share of the machine's float32
matmul ceiling (measured in the same run), and the mean CV accuracy after the last epoch.
"""

from __future__ import annotations

import os
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name

CONSTRAINTS = Path(__file__).resolve().parents[1] / "constraints.txt"
# the packages whose versions decide a benchmark's numbers: the engine's, and a search's path
KEY_PACKAGES = ("torch", "optuna", "numpy", "scipy", "scikit-learn")


def _installed(name: str) -> str | None:
    """The installed version of package `name`, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def pinned(path: Path = CONSTRAINTS) -> dict[str, str]:
    """constraints.txt's `name==version` lines, by canonical package name."""
    out = {}
    for line in path.read_text().splitlines():
        name, sep, version = line.split("#")[0].strip().partition("==")
        if sep:
            out[canonicalize_name(name)] = version.strip()
    return out


def differences(pins: dict[str, str]) -> list[str]:
    """Installed packages whose version is not the pinned one ("numpy 2.4.7, pinned 2.4.6");
    packages not installed are left out (a benchmark does not need the dev tools)."""
    out = []
    for name, version in sorted(pins.items()):
        have = _installed(name)
        if have is None:
            continue
        if "+" not in version:  # a pin without a local label takes any build (2.13.0+cpu)
            have = have.partition("+")[0]
        if have != version:
            out.append(f"{name} {have}, pinned {version}")
    return out


def environment() -> str:
    """One line for a benchmark's header: the machine, its load, the key packages' versions and
    whether every installed package is at the version constraints.txt pins."""
    versions = [f"{name} {_installed(name) or 'not installed'}" for name in KEY_PACKAGES]
    if CONSTRAINTS.exists():
        diff = differences(pinned())
        pins = "as constraints.txt pins" if not diff else "not as pinned: " + "; ".join(diff)
    else:
        pins = "no constraints.txt"
    return (
        f"machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f} (1 min); "
        f"{', '.join(versions)}; packages {pins}"
    )
