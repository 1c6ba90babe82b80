"""The study files shipped in studies/ are valid and their data load."""

from __future__ import annotations

from pathlib import Path

import pytest

from selector import data, spec
from tests.conftest import ROOT

STUDIES = sorted((ROOT / "studies").glob("*.toml"))


def test_the_five_studies_are_there() -> None:
    names = {p.stem for p in STUDIES}
    assert {"digits", "breast_cancer", "wine", "diabetes", "penguins"} <= names


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_study_file_loads_and_its_data_splits(path: Path) -> None:
    s = spec.load(path)
    prep = data.prepare(s)
    assert len(prep.folds) == s.cv.folds * s.cv.repeats
    assert len(prep.test) > 0
