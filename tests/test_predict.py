"""The final model's files and `selector predict`: the saved preprocessing replays sklearn's exactly,
the weights load with `weights_only=True`, and a fresh process reproduces `final`'s test score."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from selector import artifact, data, spec, study
from selector.cli import app
from tests.conftest import PENGUINS, ROOT, small_raw, write_study

runner = CliRunner()


def _sel(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


def _penguins_raw() -> dict[str, object]:
    """studies/penguins.toml, made small: 2 trials of at most 12 epochs."""
    raw = tomllib.loads((ROOT / "studies" / "penguins.toml").read_text())
    raw["n_trials"] = 2
    raw["data"]["path"] = str(PENGUINS)
    raw["training"] = {**raw["training"], "max_epochs": 12, "patience": 4, "device": "cpu"}
    return raw


def _rows(prep: data.Prepared, which: str) -> pd.DataFrame:
    """The rows of penguins.csv (every column, the target included) in the study's dev or test
    part, as a user would have them."""
    frame = pd.read_csv(PENGUINS)
    frame = frame[frame["species"].notna()].reset_index(drop=True)
    return frame.iloc[prep.test if which == "test" else prep.dev].reset_index(drop=True)


def test_numpy_preprocessing_equals_sklearns_on_the_dev_and_test_rows() -> None:
    s = spec.parse(_penguins_raw(), origin="penguins.toml")
    prep = data.prepare(s)
    dev, test = data.dev_set(prep), data.test_set(prep)
    pre, (x_dev, x_test) = data.fit_transform(dev.X, test.X)
    saved = artifact.from_sklearn(pre, list(dev.X.columns))
    saved = artifact.Preprocess(**json.loads(json.dumps(saved.__dict__)))  # through JSON
    assert dev.X.isna().any().any()  # penguins has missing numbers and categories
    for X, expected in ((dev.X, x_dev), (test.X, x_test)):
        mine, unknown = artifact.transform(saved, X)
        assert mine.dtype == np.float32 and unknown == {}
        np.testing.assert_array_equal(mine, expected)
    assert saved.n_features == x_dev.shape[1]


def test_unknown_category_encodes_as_sklearn_does() -> None:
    s = spec.parse(_penguins_raw(), origin="penguins.toml")
    dev = data.dev_set(data.prepare(s))
    pre, _ = data.fit_transform(dev.X)
    odd = dev.X.head(3).copy()
    odd["island"] = ["Atlantis", None, "Dream"]
    mine, unknown = artifact.transform(artifact.from_sklearn(pre, list(dev.X.columns)), odd)
    np.testing.assert_array_equal(mine, data.transform(pre, odd))
    assert unknown == {"island": ["Atlantis"]}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, float, Path]:
    """A penguins study (the shipped study file, made small), run and finalized through the CLI."""
    tmp = tmp_path_factory.mktemp("penguins")
    study_file = write_study(tmp / "penguins.toml", _penguins_raw())
    url = f"sqlite:///{tmp / 'selector.db'}"
    assert _sel("run", str(study_file), "--storage", url)[0] == 0
    code, out = _sel("final", str(study_file), "--storage", url)
    assert code == 0, out
    printed = float(re.search(r"test accuracy = ([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    prep = data.prepare(spec.load(study_file))
    _rows(prep, "test").to_csv(tmp / "test_rows.csv", index=False)
    return url, printed, tmp


def test_model_files_execute_no_code_when_loaded(finished: tuple[str, float, Path]) -> None:
    _, _, tmp = finished
    out = tmp / "selector-artifacts" / "penguins-mlp"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.json",
        "model.pt",
        "preprocess.json",
    ]
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    meta = json.loads((out / "model.json").read_text())
    assert meta["classes"] == ["Adelie", "Chinstrap", "Gentoo"] and meta["target"] == "species"


def test_predict_in_a_fresh_process_reproduces_the_final_test_score(
    finished: tuple[str, float, Path],
) -> None:
    url, printed, tmp = finished
    cmd = [sys.executable, "-m", "selector", "predict", "penguins-mlp", "test_rows.csv"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*cmd, "--storage", url, "-o", "pred.csv"], cwd=tmp, capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    score = float(re.search(r"accuracy = ([0-9.]+) on 69 rows", proc.stdout).group(1))  # type: ignore[union-attr]
    assert score == printed
    pred = pd.read_csv(tmp / "pred.csv")
    truth = pd.read_csv(tmp / "test_rows.csv")["species"]
    assert round(float((pred["prediction"] == truth).mean()), 4) == printed
    proba = pred[[c for c in pred.columns if c.startswith("proba_")]].to_numpy()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-9)


def test_predict_without_the_target_and_with_an_unknown_category(
    finished: tuple[str, float, Path],
) -> None:
    url, _, tmp = finished
    rows = pd.read_csv(tmp / "test_rows.csv").drop(columns=["species", "year"])
    rows.loc[0, "island"] = "Atlantis"
    rows.to_csv(tmp / "new.csv", index=False)
    code, out = _sel(
        "predict", "penguins-mlp", str(tmp / "new.csv"), "--storage", url, "-o", str(tmp / "p.csv")
    )
    assert code == 0, out
    assert (
        "rows with a known" not in out  # nothing to score without the target
        and "'island' has categories unseen in training ('Atlantis')" in out
    )
    assert len(pd.read_csv(tmp / "p.csv")) == len(rows)


def test_predict_refuses_a_missing_feature_column(finished: tuple[str, float, Path]) -> None:
    url, _, tmp = finished
    pd.read_csv(tmp / "test_rows.csv").drop(columns=["bill_depth_mm"]).to_csv(
        tmp / "short.csv", index=False
    )
    code, out = _sel("predict", "penguins-mlp", str(tmp / "short.csv"), "--storage", url)
    assert code == 2
    assert out.startswith("selector: ") and "column 'bill_depth_mm' is missing" in out
    assert "Traceback" not in out


def test_predict_refuses_text_in_a_numeric_column(finished: tuple[str, float, Path]) -> None:
    url, _, tmp = finished
    rows = pd.read_csv(tmp / "test_rows.csv")
    rows["body_mass_g"] = rows["body_mass_g"].astype(object)
    rows.loc[2, "body_mass_g"] = "heavy"
    rows.to_csv(tmp / "text.csv", index=False)
    code, out = _sel("predict", "penguins-mlp", str(tmp / "text.csv"), "--storage", url)
    assert code == 2 and "'body_mass_g' is numeric in the training data but holds 'heavy'" in out


def test_predict_before_final_is_refused(tmp_path: Path, url: str) -> None:
    study_file = write_study(tmp_path / "iris.toml", small_raw(n_trials=1))
    study.run(spec.load(study_file), url)
    (tmp_path / "rows.csv").write_text("a\n1\n")
    code, out = _sel("predict", str(study_file), str(tmp_path / "rows.csv"), "--storage", url)
    assert code == 1 and "has no final model yet" in out


def test_predict_on_a_regression_study(tmp_path: Path, url: str) -> None:
    from sklearn.datasets import load_diabetes

    raw = small_raw(
        name="diabetes",
        metric="r2",
        n_trials=1,
        data={"source": "sklearn:diabetes"},
        training={"max_epochs": 20, "patience": 20},
        space={"width": 32, "lr": 0.01, "optimizer": "adam"},
    )
    study_file = write_study(tmp_path / "d.toml", raw)
    assert _sel("run", str(study_file), "--storage", url)[0] == 0
    code, out = _sel("final", "diabetes", "--storage", url)
    printed = re.search(r"test r2 = ([-0-9.]+)", out).group(1)  # type: ignore[union-attr]
    prep = data.prepare(spec.load(study_file))
    frame = load_diabetes(as_frame=True).frame.iloc[prep.test]
    frame.to_csv(tmp_path / "rows.csv", index=False)
    code, out = _sel(
        "predict",
        "diabetes",
        str(tmp_path / "rows.csv"),
        "--storage",
        url,
        "-o",
        str(tmp_path / "p.csv"),
    )
    assert code == 0, out
    assert f"r2 = {printed} on {len(frame)} rows" in out


def _json_edit(edit: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def tamper(path: Path) -> None:
        doc = json.loads(path.read_text())
        edit(doc)
        path.write_text(json.dumps(doc))

    return tamper


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _other_network(path: Path) -> None:
    torch.save({"blocks.0.linear.weight": torch.zeros(3, 3)}, path)


WEIGHTS, META, PRE = "model.pt", "model.json", "preprocess.json"
DAMAGED = [
    pytest.param(WEIGHTS, lambda p: p.write_bytes(b""), "cannot load the weights", id="pt-empty"),
    pytest.param(WEIGHTS, _truncate, "cannot load the weights", id="pt-truncated"),
    pytest.param(WEIGHTS, lambda p: torch.save([1, 2], p), "weight tensors", id="pt-not-a-table"),
    pytest.param(WEIGHTS, _other_network, "do not fit the network", id="pt-other-network"),
    pytest.param(META, _truncate, "unreadable", id="json-truncated"),
    pytest.param(META, lambda p: p.write_text("[1, 2]"), "format 1", id="json-not-a-table"),
    pytest.param(
        META, _json_edit(lambda d: d.pop("classes")), "field classes", id="json-missing-key"
    ),
    pytest.param(
        META, _json_edit(lambda d: d.update(n_in="9")), "field n_in", id="json-wrong-type"
    ),
    pytest.param(
        META, _json_edit(lambda d: d["classes"].pop()), "2 classes", id="json-class-removed"
    ),
    pytest.param(
        META,
        _json_edit(lambda d: d["config"].update(activation="swish")),
        "config.activation",
        id="json-unknown-activation",
    ),
    pytest.param(
        META, _json_edit(lambda d: d["config"].update(depth=0)), "config.depth", id="json-depth-0"
    ),
    pytest.param(
        META, _json_edit(lambda d: d.update(y_std=float("nan"))), "scale", id="json-nan-scale"
    ),
    pytest.param(
        PRE,
        _json_edit(lambda d: d["categories"].pop()),
        "categorical columns",
        id="preprocess-category-list-removed",
    ),
    pytest.param(
        PRE, _json_edit(lambda d: d["medians"].__setitem__(0, "x")), "medians.0", id="pre-text"
    ),
    pytest.param(
        PRE, _json_edit(lambda d: d["scales"].__setitem__(0, 0.0)), "not positive", id="pre-0"
    ),
    pytest.param(
        PRE, _json_edit(lambda d: d["numeric"].append("wingspan")), "numeric", id="pre-extra-col"
    ),
    pytest.param(PRE, _json_edit(lambda d: d.update(x=1)), "field x", id="pre-unknown-key"),
]


@pytest.mark.parametrize(("name", "tamper", "says"), DAMAGED)
def test_predict_names_a_damaged_model_file_in_one_line(
    finished: tuple[str, float, Path], name: str, tamper: Callable[[Path], None], says: str
) -> None:
    url, _, tmp = finished
    path = tmp / "selector-artifacts" / "penguins-mlp" / name
    saved = path.read_bytes()
    out_csv = tmp / "damaged.csv"
    try:
        tamper(path)
        code, out = _sel(
            "predict",
            "penguins-mlp",
            str(tmp / "test_rows.csv"),
            "--storage",
            url,
            "-o",
            str(out_csv),
        )
    finally:
        path.write_bytes(saved)
    assert code == 2, out
    assert len(out.splitlines()) == 1 and out.startswith(f"selector: {path}: "), out
    assert says in out and "restore" in out, out
    assert not out_csv.exists()
