"""The chosen config with its provenance, as JSON, YAML or TOML.

Rules: `best` is the trial with the best mean CV score; `one-se` is the simplest trial (fewest
parameters, then fewest epochs) whose mean CV score is within one standard error of the best.
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import numpy as np
import optuna
import tomli_w
import yaml
from optuna.trial import FrozenTrial, TrialState

from selector import storage
from selector.errors import RefusedError
from selector.study import Record
from selector.worker import value_of

Rule = Literal["best", "one-se"]
Format = Literal["json", "yaml", "toml"]


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not trials:
        raise RefusedError(
            f"study {study.study_name!r} has no complete trial yet; run `selector run` first"
        )
    return trials


def standard_error(trial: FrozenTrial) -> float:
    scores = trial.user_attrs.get("fold_scores") or []
    if len(scores) < 2:
        return 0.0
    return float(np.std(scores, ddof=1) / math.sqrt(len(scores)))


def choose(study: optuna.Study, rule: Rule) -> FrozenTrial:
    trials = _complete(study)
    best = max(trials, key=lambda t: value_of(t))
    if rule == "best":
        return best
    floor = value_of(best) - standard_error(best)
    near = [t for t in trials if value_of(t) >= floor]
    return min(
        near,
        key=lambda t: (
            t.user_attrs.get("n_params", 0),
            t.user_attrs.get("best_epoch", 0),
            -value_of(t),
        ),
    )


def document(
    study: optuna.Study, rec: Record, rule: Rule, url: str, final: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Everything needed to rebuild and retrain the chosen model, and where it came from."""
    trial = choose(study, rule)
    a = trial.user_attrs
    spec = rec.spec
    return {
        "study": study.study_name,
        "rule": rule,
        "trial": trial.number,
        "params": trial.params,
        "config": {
            **a.get("config", {}),
            "epochs": a.get("best_epoch"),
            "max_epochs": spec.training.max_epochs,
        },
        "cv": {
            "metric": spec.metric,
            "mean": trial.value,
            "std": a.get("cv_std"),
            "standard_error": standard_error(trial),
            "fold_scores": a.get("fold_scores"),
            "folds": len(a.get("fold_scores") or []),
        },
        "train_score": a.get("train_score"),
        "gap": a.get("gap"),
        "diagnosis": a.get("diagnosis"),
        "gradient_health": a.get("gradient_health"),
        "n_params": a.get("n_params"),
        "seed": a.get("seed"),
        "data": {
            **spec.data.model_dump(exclude_none=True),
            "seed": spec.seed,
            "fingerprints": rec.fingerprints,
        },
        "versions": rec.versions,
        "storage": storage.mask(url),
        "test": final,
    }


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_drop_none(v) for v in obj]
    return obj


def dump(doc: dict[str, Any], fmt: Format) -> str:
    if fmt == "yaml":
        return str(yaml.safe_dump(doc, sort_keys=False))
    if fmt == "toml":
        return tomli_w.dumps(_drop_none(doc))
    return json.dumps(doc, indent=2, default=str) + "\n"
