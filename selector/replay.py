"""Re-run one finished trial from its stored params and seed, and compare its fold scores.
A fused trial is re-run with the members it trained with as one model, as it ran (`_part`,
`_replay_group`); one that trained alone, alone.

The config is rebuilt through the search space (`TrialRecord.config`), the folds from the
study's recorded spec and data (fingerprints checked), the training seed from the trial's attrs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from optuna.trial import TrialState

from selector import data, objective, record
from selector.engine import CVResult
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


def _part(
    trial: record.TrialRecord,
    trials: list[record.TrialRecord],
    spec: Any,
    dev: data.DevSet,
    folds: list[data.FoldData],
) -> list[record.TrialRecord]:
    """The trials `trial` trained with as one model, as recorded (`fused_model`), or itself
    alone. Trials that an earlier version recorded without it are cut from their claim
    (`group`) as this version's worker would cut it (`fused.split_claim`)."""
    if (trial.group_size or 1) <= 1:
        return [trial]
    claim = [t for t in trials if t.group == trial.group]
    if trial.fused_model is not None:
        return [t for t in claim if t.fused_model == trial.fused_model]
    from selector import engine, fused

    parts = fused.split_claim(
        [t.config(spec.space) for t in claim],
        folds=len(folds),
        n_in=folds[0].X_train.shape[1],
        n_out=dev.n_classes if dev.task == "classification" else 1,
        device=engine.resolve_device(spec.training.device).type,
    )
    at = next(i for i, t in enumerate(claim) if t.number == trial.number)
    return [claim[i] for i in next(p for p in parts if at in p)]


def _replay_group(
    study: Any,
    spec: Any,
    dev: data.DevSet,
    folds: list[data.FoldData],
    members: list[record.TrialRecord],
) -> dict[int, tuple[list[float], list[float]]]:
    """Re-run the members of one fused model as it ran: the same members, seeds and order, each
    pruned member leaving at the epoch it was pruned (the others stop early or diverge on their
    own), so every step has the shapes it had. Each member's curve and final fold scores."""
    from selector import fused, metrics

    frozen = study.get_trials(deepcopy=False)
    pruned_at = {
        i: len(frozen[m.number].intermediate_values)
        for i, m in enumerate(members)
        if m.state == TrialState.PRUNED
    }
    curves: dict[int, list[float]] = {i: [] for i in range(len(members))}

    def on_epoch(epoch: int, values: dict[int, float]) -> dict[int, Exception]:
        for i, v in values.items():
            curves[i].append(v)
        return {i: RefusedError("pruned") for i in values if pruned_at.get(i) == epoch}

    out = fused.cross_validate_group(
        [m.config(spec.space) for m in members],
        folds,
        task=dev.task,
        n_classes=dev.n_classes,
        metric=metrics.get(spec.metric),
        training=spec.training,
        seeds=[int(m.seed or 0) for m in members],
        on_epoch=on_epoch,
    )
    result: dict[int, tuple[list[float], list[float]]] = {}
    for i, m in enumerate(members):
        got = out.get(i)
        scores = list(got.fold_scores) if isinstance(got, CVResult) else []
        result[m.number] = (curves[i], scores)
    return result


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
    folds = list(data.iter_folds(dev))
    members = _part(trial, trials, rec.spec, dev, folds)
    if len(members) > 1:
        curves = _replay_group(study, rec.spec, dev, folds, members)
        replayed_curve, fold_scores = curves[trial.number]
        stored = list(trial.fold_scores) if trial.state == TrialState.COMPLETE else curve
        replayed = fold_scores if trial.state == TrialState.COMPLETE else replayed_curve
    else:
        result = objective.train(spec, dev, folds, config, int(trial.seed or 0), on_epoch=None)
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
