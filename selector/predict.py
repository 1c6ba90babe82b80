"""The final model on new rows: `selector predict STUDY DATA_FILE -o predictions.csv`.

Reads only the files `selector final` saved (located through the study's row in `selector_final`);
no trial is replayed and no training data is read. Rows need the study's feature columns; the target
column may be missing (when present, the predictions are scored with the study's metric).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from selector import artifact, data, engine, final, metrics, record, storage
from selector.errors import DataError, RefusedError, SelectorError
from selector.record import FinalResult

ROW = "row"  # the first column of the predictions: the input row's position, 0-based


@dataclass
class Predictions:
    table: pd.DataFrame  # one row per input row: the prediction (and class probabilities)
    meta: artifact.Meta
    score: float | None = None  # when the target column is present
    scored_rows: int = 0
    unknown: dict[str, list[Any]] = field(default_factory=dict)  # unseen categories per column
    final: FinalResult | None = None  # the evaluation that made the model


def model_dir(url: str, name: str) -> Path:
    """Where `selector final` saved the study's model; a clear refusal before it ran."""
    return Path(_evaluated(url, name).artifact)  # type: ignore[arg-type]


def _evaluated(url: str, name: str) -> FinalResult:
    """The study's finished evaluation; a clear refusal before it ran."""
    storage.check(url, must_exist=True)
    record.load_record(url, name)
    prev = record.stored_final(url, name)
    if prev is None:
        raise RefusedError(
            f"study {name!r} has no final model yet; `selector final {name}` refits the chosen "
            "config and saves it (evaluating the test set, once)"
        )
    if prev.state != "finished" or prev.artifact is None:
        raise RefusedError(final.refusal(prev))
    return prev


def read_rows(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    frame = data._read_file(path, "DATA_FILE")
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _encode_target(values: pd.Series, classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Class codes of the rows whose target is a known class, and which rows those are."""
    index = {c: i for i, c in enumerate(classes)}

    def code(v: Any) -> int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)  # a class 2 read back as 2.0
        return index.get(str(v), -1)

    codes = np.array([code(v) if pd.notna(v) else -1 for v in values], dtype=np.int64)
    keep = codes >= 0
    return codes[keep], keep


def _score(meta: artifact.Meta, rows: pd.DataFrame, pred: np.ndarray) -> tuple[float | None, int]:
    if meta.target is None or meta.target not in rows.columns:
        return None, 0
    metric = metrics.get(meta.metric)
    if meta.task == "regression":
        y = pd.to_numeric(rows[meta.target], errors="coerce").to_numpy(dtype=float)
        keep = np.isfinite(y)
        y_true = y[keep]
    else:
        y_true, keep = _encode_target(rows[meta.target], meta.classes)
    if keep.sum() == 0:
        return None, 0
    return engine.score(metric, y_true, pred[keep], len(meta.classes)), int(keep.sum())


def _table(meta: artifact.Meta, pred: np.ndarray) -> pd.DataFrame:
    """`row` (the input row's position, 0-based, to join on), the prediction and, for a
    classifier, each class's probability."""
    out = pd.DataFrame({ROW: np.arange(len(pred))})
    if meta.task == "regression":
        out["prediction"] = pred
        return out
    out["prediction"] = np.asarray(meta.classes, dtype=object)[pred.argmax(axis=1)]
    for k, c in enumerate(meta.classes):
        out[f"proba_{c}"] = pred[:, k]
    return out


def beside_input(table: pd.DataFrame, rows: pd.DataFrame, path: Path) -> pd.DataFrame:
    """`row`, then every input column as read, then the predictions: `--with-input`. An input
    column named like an output column is refused rather than written twice."""
    clash = [c for c in rows.columns if c in table.columns]
    if clash:
        raise DataError(
            f"{path}: column {clash[0]!r} has the name of an output column; rename it in the "
            "file, or leave out --with-input"
        )
    inputs = rows.reset_index(drop=True)
    return pd.concat([table[[ROW]], inputs, table.drop(columns=[ROW])], axis=1)


def apply(bundle: artifact.Bundle, rows: pd.DataFrame) -> Predictions:
    """Predictions of the final model for `rows` (any extra columns are ignored)."""
    x, unknown = artifact.transform(bundle.pre, rows)
    m = bundle.meta
    pred = engine.predict(
        bundle.model, torch.as_tensor(x), task=m.task, y_mean=m.y_mean, y_std=m.y_std
    )
    score, n = _score(m, rows, pred)
    return Predictions(_table(m, pred), m, score, n, unknown)


def predict_file(url: str, name: str, path: Path, *, with_input: bool = False) -> Predictions:
    """The final model's predictions for the rows of `path`; with `with_input`, beside them."""
    evaluated = _evaluated(url, name)
    bundle = artifact.load(Path(evaluated.artifact))  # type: ignore[arg-type]
    rows = read_rows(path)
    try:
        result = apply(bundle, rows)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    result.final = evaluated
    if with_input:
        result.table = beside_input(result.table, rows, path)
    return result


def write(result: Predictions, path: Path) -> None:
    try:
        result.table.to_csv(path, index=False)
    except OSError as e:
        raise SelectorError(f"{path}: cannot write the predictions ({e.strerror or e})") from None


def describe(result: Predictions, path: Path) -> list[str]:
    """What `selector predict` prints."""
    m = result.meta
    f = result.final
    tested = (
        f"; rule {f.rule}, test {metrics.shown(f.metric, f.test_score)} on {f.test_rows} "
        "held-out rows"
        if f is not None and f.test_score is not None
        else ""
    )
    lines = [
        f"wrote {path}: {len(result.table)} predictions of the final model "
        f"(study {m.study!r}, trial {m.trial}{tested})"
    ]
    if result.score is not None:
        lines.append(
            f"{metrics.shown(m.metric, result.score)} on {result.scored_rows} rows with a known "
            f"{m.target!r}"
        )
    for col, values in result.unknown.items():
        shown = ", ".join(repr(v) for v in values[:5]) + (", ..." if len(values) > 5 else "")
        lines.append(
            f"note: column {col!r} has categories unseen in training ({shown}); "
            "they are encoded as none of the known ones"
        )
    return lines
