"""The final model's files, none of which runs code when loaded.

- `model.pt`: the refit network's state_dict, loaded back with `torch.load(weights_only=True)`;
- `preprocess.json`: the statistics of the preprocessing fit on all dev rows (medians, means,
  scales, fill values, categories, column order), replayed in numpy by `transform`;
- `model.json`: what rebuilds the network and reads its output (config, task, classes, target
  column and scaling, metric).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.compose import ColumnTransformer

from selector.errors import DataError, SelectorError
from selector.metrics import Task
from selector.model import MLP, build_mlp
from selector.space import TrialConfig

FORMAT = 1
WEIGHTS, PREPROCESS, META = "model.pt", "preprocess.json", "model.json"


@dataclass(frozen=True)
class Preprocess:
    """Median imputation + standard scaling of numeric columns, most-frequent imputation + one-hot
    encoding of categorical ones (an unknown category encodes as all zeros)."""

    columns: list[str]  # the input feature columns, in the order the study read them
    numeric: list[str]
    medians: list[float]
    means: list[float]
    scales: list[float]
    categorical: list[str]
    fills: list[Any]
    categories: list[list[Any]]

    @property
    def n_features(self) -> int:
        return len(self.numeric) + sum(len(c) for c in self.categories)


@dataclass(frozen=True)
class Meta:
    task: Task
    metric: str
    target: str | None
    classes: list[str]
    n_in: int
    n_out: int
    y_mean: float
    y_std: float
    config: dict[str, Any]
    study: str
    trial: int


@dataclass(frozen=True)
class Bundle:
    model: MLP
    pre: Preprocess
    meta: Meta


def _py(value: Any) -> Any:
    """A JSON scalar for a numpy scalar."""
    return value.item() if isinstance(value, np.generic) else value


def _fitted(pre: ColumnTransformer, name: str) -> tuple[Any, list[str]] | None:
    for tname, trans, cols in pre.transformers_:
        if tname == name and len(cols) > 0:
            return trans, [str(c) for c in cols]
    return None


def from_sklearn(pre: ColumnTransformer, columns: list[str]) -> Preprocess:
    """The statistics of `data.make_preprocessor`'s fitted ColumnTransformer, as plain values."""
    numeric, medians, means, scales = [], [], [], []
    if (num := _fitted(pre, "num")) is not None:
        pipe, cols = num
        stats = pipe.named_steps["impute"].statistics_
        kept = [c for c, m in zip(cols, stats, strict=True) if not math.isnan(m)]
        scaler = pipe.named_steps["scale"]
        numeric, medians = kept, [float(m) for m in stats if not math.isnan(m)]
        means, scales = [float(m) for m in scaler.mean_], [float(s) for s in scaler.scale_]
    categorical: list[str] = []
    fills: list[Any] = []
    categories: list[list[Any]] = []
    if (cat := _fitted(pre, "cat")) is not None:
        pipe, categorical = cat
        fills = [_py(v) for v in pipe.named_steps["impute"].statistics_]
        categories = [[_py(v) for v in c] for c in pipe.named_steps["onehot"].categories_]
    return Preprocess(columns, numeric, medians, means, scales, categorical, fills, categories)


def missing_columns(pre: Preprocess, X: pd.DataFrame) -> list[str]:
    return [c for c in pre.columns if c not in X.columns]


def _numeric(X: pd.DataFrame, col: str) -> np.ndarray:
    s = X[col]
    try:
        values = pd.to_numeric(s, errors="raise")
    except (ValueError, TypeError):
        bad = s[pd.to_numeric(s, errors="coerce").isna() & s.notna()].iloc[0]
        raise DataError(
            f"column {col!r} is numeric in the training data but holds {str(bad)!r} here"
        ) from None
    return np.asarray(values, dtype=np.float64)


def transform(pre: Preprocess, X: pd.DataFrame) -> tuple[np.ndarray, dict[str, list[Any]]]:
    """The model's input for the rows of `X` (float32), and the unknown categories per column.

    Equal to the fitted ColumnTransformer's output on the same rows."""
    missing = missing_columns(pre, X)
    if missing:
        raise DataError(f"feature column {missing[0]!r} is missing (the model needs {pre.columns})")
    parts: list[np.ndarray] = []
    for col, median, mean, scale in zip(
        pre.numeric, pre.medians, pre.means, pre.scales, strict=True
    ):
        x = _numeric(X, col)
        parts.append(((np.where(np.isnan(x), median, x) - mean) / scale)[:, None])
    unknown: dict[str, list[Any]] = {}
    for col, fill, cats in zip(pre.categorical, pre.fills, pre.categories, strict=True):
        raw = X[col].astype(object)
        values = np.asarray(raw.where(raw.notna(), fill), dtype=object)
        onehot = np.stack([values == c for c in cats], axis=1).astype(np.float64)
        seen = onehot.sum(axis=1) > 0
        if not seen.all():
            unknown[col] = sorted({str(v) for v in values[~seen]})
        parts.append(onehot)
    if not parts:
        return np.zeros((len(X), 0), dtype=np.float32), unknown
    return np.concatenate(parts, axis=1).astype(np.float32), unknown


def save(out: Path, model: torch.nn.Module, pre: Preprocess, meta: Meta) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, out / WEIGHTS)
    (out / PREPROCESS).write_text(json.dumps({"format": FORMAT, **asdict(pre)}, indent=1))
    (out / META).write_text(json.dumps({"format": FORMAT, **asdict(meta)}, indent=1))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise SelectorError(f"{path}: missing; the final model's files are incomplete") from None
    except (OSError, ValueError) as e:
        raise SelectorError(f"{path}: unreadable ({e})") from None
    if not isinstance(doc, dict) or doc.pop("format", None) != FORMAT:
        raise SelectorError(f"{path}: not a selector model file of format {FORMAT}")
    return doc


def load(out: Path) -> Bundle:
    """The final model from its directory, executing no code stored there."""
    try:
        pre = Preprocess(**_read_json(out / PREPROCESS))
        meta = Meta(**_read_json(out / META))
    except TypeError as e:
        raise SelectorError(
            f"{out}: model files do not match this selector version ({e})"
        ) from None
    model = build_mlp(TrialConfig(**meta.config), meta.n_in, meta.n_out)
    try:
        state = torch.load(out / WEIGHTS, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except FileNotFoundError:
        raise SelectorError(
            f"{out / WEIGHTS}: missing; the final model's files are incomplete"
        ) from None
    except (RuntimeError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:200]
        raise SelectorError(f"{out / WEIGHTS}: cannot load the weights ({first})") from None
    model.eval()
    return Bundle(model, pre, meta)
