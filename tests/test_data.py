"""Split, folds and preprocessing: asserted as invariants, on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from selector import data, spec
from tests.conftest import PENGUINS, small_raw


def _prep(**overrides: object) -> data.Prepared:
    return data.prepare(spec.parse(small_raw(**overrides), origin="t.toml", base_dir="."))


@pytest.mark.parametrize("source", ["iris", "wine", "breast_cancer", "digits", "diabetes"])
def test_split_partitions_rows_and_folds_partition_dev(source: str) -> None:
    metric = "r2" if source == "diabetes" else "accuracy"
    prep = _prep(data={"source": f"sklearn:{source}"}, metric=metric)
    n = len(prep.table.y)
    assert np.intersect1d(prep.dev, prep.test).size == 0
    assert np.array_equal(np.union1d(prep.dev, prep.test), np.arange(n))
    vals = np.concatenate([va for _, va in prep.folds])
    assert np.array_equal(np.sort(vals), np.arange(len(prep.dev)))  # each dev row validated once
    for tr, va in prep.folds:
        assert np.intersect1d(tr, va).size == 0
        assert len(tr) + len(va) == len(prep.dev)


def test_split_is_stratified_for_classification() -> None:
    prep = _prep(data={"source": "sklearn:wine"})
    y = prep.table.y
    full = np.bincount(y) / len(y)
    test = np.bincount(y[prep.test], minlength=len(full)) / len(prep.test)
    assert np.abs(full - test).max() < 0.05


def test_split_and_folds_are_reproducible_and_fingerprinted() -> None:
    a, b = _prep(), _prep()
    assert a.fingerprints == b.fingerprints
    assert np.array_equal(a.test, b.test)
    c = _prep(seed=1)
    assert c.fingerprints.data == a.fingerprints.data
    assert c.fingerprints.split != a.fingerprints.split


def test_dev_set_holds_no_test_row() -> None:
    prep = _prep()
    dev = data.dev_set(prep)
    assert np.intersect1d(dev.rows, prep.test).size == 0
    assert len(dev.X) == len(prep.dev) == len(dev.y)


def test_preprocessing_is_fit_on_fold_training_rows_only() -> None:
    prep = _prep(data={"source": "sklearn:wine"})
    dev = data.dev_set(prep)
    for k, (tr, va) in enumerate(dev.folds):
        fold = data.fold_data(dev, k)
        # standardised with the training rows' statistics: exactly mean 0 / std 1 there only
        np.testing.assert_allclose(fold.X_train.mean(axis=0), 0, atol=1e-5)
        np.testing.assert_allclose(fold.X_train.std(axis=0), 1, atol=1e-4)
        expected = (dev.X.iloc[va] - dev.X.iloc[tr].mean()) / dev.X.iloc[tr].std(ddof=0)
        np.testing.assert_allclose(fold.X_val, expected.to_numpy(), rtol=1e-4, atol=1e-4)


def test_penguins_categoricals_and_missing_values(tmp_path: Path) -> None:
    raw = small_raw(data={"path": str(PENGUINS), "target": "species", "drop": ["year"]})
    raw["data"].pop("source")
    prep = data.prepare(spec.parse(raw, origin="p.toml"))
    assert prep.table.task == "classification"
    assert prep.table.classes == ("Adelie", "Chinstrap", "Gentoo")
    fold = data.fold_data(data.dev_set(prep), 0)
    assert np.isfinite(fold.X_train).all() and np.isfinite(fold.X_val).all()
    # 4 numeric columns + one-hot island (3) + sex (2)
    assert fold.X_train.shape[1] == 9


def test_rows_with_missing_target_are_dropped(tmp_path: Path) -> None:
    df = pd.read_csv(PENGUINS)
    df.loc[:9, "species"] = None
    path = tmp_path / "p.csv"
    df.to_csv(path, index=False)
    table = data.load_table(spec.DataSpec(path=str(path), target="species"), ".")
    assert len(table.y) == len(df) - 10
    assert table.notes == (
        f"{path}: 10 of 344 rows have no value in the target 'species' and were left out "
        "(334 rows remain)",
    )


def test_rows_shorter_than_the_header_are_noted(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    lines = PENGUINS.read_text().splitlines()
    for row in (3, 7, 8):
        lines[row] = ",".join(lines[row].split(",")[:6])
    path.write_text("\n".join(lines) + "\n")
    table = data.load_table(spec.DataSpec(path=str(path), target="species"), ".")
    assert table.notes == (
        f"{path}: 3 rows have fewer fields than the header's 8 (the first is row 3); their "
        "missing fields were read as missing values",
    )


def test_a_complete_csv_gets_no_notes() -> None:
    assert _prep(data={"source": None, "path": str(PENGUINS), "target": "species"}).notes == ()


def test_codes_stored_as_text_stay_categorical(tmp_path: Path) -> None:
    df = pd.read_csv(PENGUINS).dropna()
    df["ring"] = [str(i % 5) for i in range(len(df))]  # numbers as text: a choice of the data
    df["size"] = [("S", "M", "L", "1")[i % 4] for i in range(len(df))]  # mostly text
    df.to_parquet(tmp_path / "p.parquet")
    table = data.load_table(spec.DataSpec(path=str(tmp_path / "p.parquet"), target="species"), ".")
    width, levels = data.encoded_width(table.X)
    assert levels == {"island": 3, "sex": 2, "ring": 5, "size": 4}
    assert width == 5 + 3 + 2 + 5 + 4  # 5 numeric columns (year included) and the levels


def test_encoded_width_is_the_preprocessed_width() -> None:
    prep = _prep(data={"source": None, "path": str(PENGUINS), "target": "species"})
    fold = data.fold_data(data.dev_set(prep), 0)
    assert data.encoded_width(prep.table.X)[0] == fold.X_train.shape[1]


def test_task_inference_and_override() -> None:
    assert _prep(data={"source": "sklearn:diabetes"}, metric="r2").table.task == "regression"
    assert _prep().table.task == "classification"


def test_regression_target_scaled_with_training_rows() -> None:
    prep = _prep(data={"source": "sklearn:diabetes"}, metric="r2")
    dev = data.dev_set(prep)
    tr, _ = dev.folds[0]
    fold = data.fold_data(dev, 0)
    assert fold.y_mean == pytest.approx(dev.y[tr].mean())
    np.testing.assert_allclose(fold.y_train.mean(), 0, atol=1e-5)
