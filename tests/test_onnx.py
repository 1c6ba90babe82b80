"""`selector export --model onnx`: one ONNX graph, preprocessing included, whose outputs under
onnxruntime equal `selector predict`'s on the same raw rows (test rows, rows with missing values
and an unseen category, a single row), for classification and regression, with and without batch
norm and residual links."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from typer.testing import CliRunner

from selector import artifact, data, final, onnx_export, predict, spec, study
from selector.cli import app
from selector.errors import SelectorError
from selector.model import build_mlp
from selector.space import TrialConfig
from tests.conftest import PENGUINS, ROOT, small_raw, write_study

runner = CliRunner()
# On the scale the network predicts in: probabilities, or the standardised target. ONNX Runtime and
# torch run the same float32 network and may differ by a few float32 steps of its output (1.2e-7
# near 1); on diabetes' original scale (y_std 78) one step is 9.3e-6 already.
TOLERANCE = 1e-5
MEASURED: dict[str, str] = {}  # case → max abs difference, printed at the end (pytest -s)


def _sel(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


def _penguins(architecture: dict[str, Any]) -> dict[str, Any]:
    """studies/penguins.toml made small (2 trials, 5 epochs), its architecture fixed."""
    raw = tomllib.loads((ROOT / "studies" / "penguins.toml").read_text())
    raw["n_trials"] = 2
    raw["data"]["path"] = str(PENGUINS)
    raw["cv"] = {"folds": 3}
    raw["training"] = {"max_epochs": 5, "patience": 5, "device": "cpu"}
    raw["space"] = {**raw["space"], "depth": 2, "width": [8, 16], **architecture}
    return raw


def _diabetes(architecture: dict[str, Any]) -> dict[str, Any]:
    return small_raw(
        name="diabetes",
        metric="r2",
        n_trials=2,
        data={"source": "sklearn:diabetes"},
        training={"max_epochs": 8, "patience": 8},
        space={"depth": 3, "width": 16, "lr": 0.01, "optimizer": "adam", **architecture},
    )


PLAIN = {"batch_norm": False, "residual": False, "dropout": 0.0}
DEEP = {"batch_norm": True, "residual": True, "dropout": 0.2, "activation": "gelu"}
CASES = {
    "penguins-plain": _penguins(PLAIN),
    "penguins-bn-residual": _penguins(DEEP),
    "diabetes-plain": _diabetes(PLAIN),
    "diabetes-bn-residual-funnel": _diabetes({**DEEP, "shape": "funnel"}),  # projection skips
}


@dataclass(frozen=True)
class Case:
    id: str
    url: str
    name: str
    onnx_path: Path
    printed: str
    bundle: artifact.Bundle
    test_rows: pd.DataFrame


def _test_rows(s: spec.StudySpec) -> pd.DataFrame:
    """The study's held-out rows as a user has them (raw columns, missing values included)."""
    prep = data.prepare(s)
    if s.data.path is not None:
        frame = pd.read_csv(PENGUINS)
        frame = frame[frame["species"].notna()].reset_index(drop=True)
    else:
        from sklearn.datasets import load_diabetes

        frame = load_diabetes(as_frame=True).frame
    return frame.iloc[prep.test].reset_index(drop=True)


@pytest.fixture(scope="module", params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """A study run for 2 trials, finalized early, and exported through the CLI."""
    tmp = tmp_path_factory.mktemp(request.param)
    study_file = write_study(tmp / "study.toml", CASES[request.param])
    s = spec.load(study_file)
    url = f"sqlite:///{tmp / 'selector.db'}"
    study.run(s, url)
    final.evaluate(url, s.name, early=True)
    path = tmp / "model.onnx"
    code, out = _sel("export", s.name, "--storage", url, "--model", "onnx", "-o", str(path))
    assert code == 0, out
    bundle = artifact.load(predict.model_dir(url, s.name))
    for key, value in CASES[request.param]["space"].items():  # the architecture was fixed
        if key in ("batch_norm", "residual", "shape"):
            assert bundle.meta.config[key] == value
    return Case(request.param, url, s.name, path, out, bundle, _test_rows(s))


def _run(path: Path, pre: artifact.Preprocess, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, onnx_export.feeds(pre, rows)), strict=True))


def _max_difference(case: Case, rows: pd.DataFrame, what: str | None = None) -> float:
    """The largest |ONNX − predict| over the rows' probabilities, or over their predictions
    divided by the target's scale; the labels must be the same. Recorded under `what`."""
    got = _run(case.onnx_path, case.bundle.pre, rows)
    want = predict.apply(case.bundle, rows).table
    if case.bundle.meta.task == "regression":
        assert got["prediction"].shape == (len(rows),) and got["prediction"].dtype == np.float64
        diff = float(np.abs(got["prediction"] - want["prediction"].to_numpy()).max())
        y_std = case.bundle.meta.y_std
        if what is not None:
            MEASURED[f"{case.id}, {what}"] = f"{diff:.3g} ({diff / y_std:.3g} x y_std {y_std:.1f})"
        return diff / y_std
    proba = want[[f"proba_{c}" for c in case.bundle.meta.classes]].to_numpy()
    assert got["probabilities"].shape == proba.shape
    assert list(got["label"]) == list(want["prediction"])
    np.testing.assert_allclose(got["probabilities"].sum(axis=1), 1.0, atol=1e-12)
    diff = float(np.abs(got["probabilities"] - proba).max())
    if what is not None:
        MEASURED[f"{case.id}, {what}"] = f"{diff:.3g}"
    return diff


def _damaged(rows: pd.DataFrame, pre: artifact.Preprocess) -> pd.DataFrame:
    """The rows with missing values in every encoded column (a different row each) and, in each
    categorical column, a category never seen in training."""
    odd = rows.copy()
    for k, col in enumerate([*pre.numeric, *pre.categorical]):
        odd[col] = odd[col].astype(object if col in pre.categorical else float)
        odd.loc[k % len(odd), col] = np.nan
    for k, col in enumerate(pre.categorical):
        odd.loc[(k + 7) % len(odd), col] = "Atlantis"
    return odd


def test_onnx_equals_predict_on_the_test_rows(case: Case) -> None:
    assert _max_difference(case, case.test_rows, "test rows") <= TOLERANCE


def test_onnx_equals_predict_with_missing_values_and_an_unseen_category(case: Case) -> None:
    rows = _damaged(case.test_rows, case.bundle.pre)
    unknown = predict.apply(case.bundle, rows).unknown
    assert unknown == {c: ["Atlantis"] for c in case.bundle.pre.categorical}
    assert _max_difference(case, rows, "missing values, unseen category") <= TOLERANCE


def test_onnx_runs_a_single_row_without_the_target(case: Case) -> None:
    row = case.test_rows.head(1).drop(columns=[str(case.bundle.meta.target)])
    assert _max_difference(case, row) <= TOLERANCE


def test_the_graph_is_checked_and_has_one_input_per_column(case: Case) -> None:
    model = onnx.load(case.onnx_path)
    onnx.checker.check_model(model, full_check=True)
    pre, meta = case.bundle.pre, case.bundle.meta
    inputs = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    string, double = onnx.TensorProto.STRING, onnx.TensorProto.DOUBLE
    assert inputs == {
        **dict.fromkeys(pre.numeric, double),
        **dict.fromkeys(pre.categorical, string),
    }
    outputs = [o.name for o in model.graph.output]
    assert outputs == (["prediction"] if meta.task == "regression" else ["probabilities", "label"])
    assert f"wrote {case.onnx_path}" in case.printed
    for col in [*pre.numeric, *pre.categorical]:
        assert f"  {col}: " in case.printed


def test_export_onnx_before_final_is_refused_and_writes_nothing(tmp_path: Path, url: str) -> None:
    study_file = write_study(tmp_path / "iris.toml", small_raw(n_trials=1))
    study.run(spec.load(study_file), url)
    path = tmp_path / "model.onnx"
    code, out = _sel(
        "export", str(study_file), "--storage", url, "--model", "onnx", "-o", str(path)
    )
    assert code == 1 and "has no final model yet" in out and len(out.splitlines()) == 1
    assert not path.exists()


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--model", "pickle", "-o", "m.onnx"], "--model: unknown value 'pickle'; use one of onnx"),
        (["--model", "onnx"], "give it -o FILE"),
        (["--model", "onnx", "--rule", "best", "-o", "m.onnx"], "--rule: "),
    ],
    ids=["unknown-format", "no-output", "with-rule"],
)
def test_export_onnx_refuses_bad_options_in_one_line(
    tmp_path: Path, url: str, args: list[str], says: str
) -> None:
    code, out = _sel("export", "iris-small", "--storage", url, *args)
    assert code == 2 and out.startswith("selector: ") and says in out, out
    assert len(out.splitlines()) == 1


def _preprocess() -> artifact.Preprocess:
    """Preprocessing statistics with a boolean and an integer categorical column."""
    return artifact.Preprocess(
        columns=["a", "flag", "b", "colour", "size"],
        numeric=["a", "b"],
        medians=[1.5, -2.0],
        means=[1.25, -1.5],
        scales=[0.5, 3.0],
        categorical=["flag", "colour", "size"],
        fills=[True, "red", 2],
        categories=[[False, True], ["blue", "red"], [1, 2, 3]],
    )


def test_the_preprocessing_graph_is_bit_identical_to_transform() -> None:
    pre = _preprocess()
    nodes, inits = onnx_export.preprocess_nodes(pre, "features")
    graph = onnx.helper.make_graph(
        nodes,
        "pre",
        [onnx_export.value_info(p) for p in onnx_export.input_ports(pre)],
        [
            onnx.helper.make_tensor_value_info(
                "features", onnx.TensorProto.FLOAT, ["N", pre.n_features]
            )
        ],
        initializer=inits,
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)])
    onnx.checker.check_model(model, full_check=True)
    rng = np.random.default_rng(0)
    n = 40
    rows = pd.DataFrame(
        {
            "a": np.where(rng.random(n) < 0.2, np.nan, rng.normal(size=n)),
            "flag": rng.choice(np.array([True, False, None], dtype=object), n),
            "b": rng.normal(size=n) * 100,
            "colour": rng.choice(np.array(["blue", "red", "green", None], dtype=object), n),
            "size": rng.choice(np.array([1, 2, 3, 4, None], dtype=object), n),
        }
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, onnx_export.feeds(pre, rows))
    want, unknown = artifact.transform(pre, rows)
    assert set(unknown) == {"colour", "size"}  # 'green' and 4 encode as all zeros
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)


def test_a_column_named_like_an_output_is_refused() -> None:
    pre = artifact.Preprocess(["label"], ["label"], [0.0], [0.0], [1.0], [], [], [])
    meta = artifact.Meta("classification", "accuracy", "y", ["a", "b"], 1, 2, 0.0, 1.0, {}, "s", 0)
    bundle = artifact.Bundle(build_mlp(TrialConfig(depth=1, width=4), 1, 2).eval(), pre, meta)
    with pytest.raises(SelectorError, match="feature column 'label': its name is taken"):
        onnx_export.to_onnx(bundle)


def teardown_module() -> None:
    """The measured differences, for the record (shown with `pytest -s`)."""
    for key, diff in sorted(MEASURED.items()):
        print(f"onnx vs predict, {key}: max abs difference {diff}")
