"""Re-run one finished trial from its stored params and seed, and compare its fold scores.

The config is rebuilt through the search space (`TrialRecord.config`), the folds from the
study's recorded spec and data (fingerprints checked), the training seed from the trial's attrs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from optuna.trial import TrialState

from selector import data, objective, record
from selector.errors import RefusedError, StudyError

TOLERANCE = 1e-6


@dataclass
class Replay:
    study: str
    trial: int
    state: str
    stored: list[float]
    replayed: list[float]
    max_difference: float
    identical: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def replay(url: str, name: str, number: int) -> Replay:
    study, rec = record.open_study(url, name)
    trials = record.trials(study)
    if not 0 <= number < len(trials):
        raise StudyError(f"study {name!r} has no trial {number} (trials 0..{len(trials) - 1})")
    trial = trials[number]
    if trial.state not in (TrialState.COMPLETE, TrialState.PRUNED):
        raise RefusedError(
            f"trial {number} is {trial.state.name.lower()}; only complete and "
            "pruned trials can be replayed"
        )
    prep = data.prepare(rec.spec)
    if prep.fingerprints.as_dict() != rec.fingerprints:
        raise StudyError(f"study {name!r}: the data differ from the study's; cannot replay")
    dev = data.dev_set(prep)
    config = trial.config(rec.spec.space)
    frozen = study.get_trials(deepcopy=False)[number]
    curve = [frozen.intermediate_values[e] for e in sorted(frozen.intermediate_values)]
    spec = rec.spec
    if trial.state == TrialState.PRUNED:  # re-run the epochs it had before it was pruned
        training = spec.training.model_copy(update={"max_epochs": len(curve)})
        spec = spec.model_copy(update={"training": training})
    result = objective.train(
        spec,
        dev,
        list(data.iter_folds(dev)),
        config,
        int(trial.seed or 0),
        on_epoch=None,
    )
    if trial.state == TrialState.COMPLETE:
        stored, replayed = list(trial.fold_scores), result.fold_scores
    else:
        stored, replayed = curve, result.val_curve[: len(curve)]
    diff = (
        float(np.max(np.abs(np.subtract(stored, replayed))))
        if len(stored) == len(replayed)
        else float("inf")
    )
    return Replay(
        study=name,
        trial=number,
        state=trial.state.name.lower(),
        stored=stored,
        replayed=list(replayed),
        max_difference=diff,
        identical=diff <= TOLERANCE,
    )
