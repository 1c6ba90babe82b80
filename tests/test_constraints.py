"""constraints.txt: the pinned versions `make install` installs, and the benchmarks' check of them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bench import differences, environment, pinned

ROOT = Path(__file__).resolve().parents[1]


def test_every_dependency_make_install_installs_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = [*project["dependencies"], *extras["dev"], *extras["postgres"]]
    pins = pinned(ROOT / "constraints.txt")
    missing = sorted({canonicalize_name(Requirement(r).name) for r in wanted} - set(pins))
    assert not missing, f"not in constraints.txt (run `make lock`): {missing}"
    assert pins["torch"].startswith("2.13.0"), "the Makefile's TORCH wheel"


def test_pins_are_read_by_canonical_name_and_comments_skipped(tmp_path: Path) -> None:
    path = tmp_path / "constraints.txt"
    path.write_text("# a comment==1\nScikit_Learn==1.9.1\n\ntorch==2.13.0+cpu  # the CPU wheel\n")
    assert pinned(path) == {"scikit-learn": "1.9.1", "torch": "2.13.0+cpu"}


def test_differences_name_each_package_not_at_its_pin_and_skip_those_not_installed() -> None:
    import optuna
    import torch

    pins = {"numpy": np.__version__, "optuna": "0.0.1", "no-such-package-here": "1.0"}
    assert differences(pins) == [f"optuna {optuna.__version__}, pinned 0.0.1"]
    # a pin without a local label takes the CPU or the CUDA build of its version
    assert differences({"torch": torch.__version__.partition("+")[0]}) == []
    assert differences({"torch": "2.13.0+cu999"}) == [
        f"torch {torch.__version__}, pinned 2.13.0+cu999"
    ]


def test_the_benchmark_header_names_the_key_versions() -> None:
    line = environment()
    assert line.startswith("machine: ") and "(1 min)" in line
    assert f"numpy {np.__version__}" in line
    assert "packages as constraints.txt pins" in line or "packages not as pinned: " in line


def test_the_gpu_machines_wheels_are_pinned_packages() -> None:
    # bench/gpu-wheels.sh downloads these at constraints.txt's versions
    script = (ROOT / "bench" / "gpu-wheels.sh").read_text()
    need = re.search(r'NEED="([^"]*)"', script)
    assert need
    pins = pinned(ROOT / "constraints.txt")
    assert {"optuna", "sqlalchemy", "pydantic", "pydantic-core"} <= set(need.group(1).split())
    assert set(need.group(1).split()) <= set(pins)
