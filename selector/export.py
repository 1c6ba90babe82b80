"""The chosen config with its provenance, as JSON, YAML or TOML.

Which trial is chosen is `selector.selection`'s to say; this module writes it down: the params,
the config rebuilt through the search space, the CV scores, the expected test score (the
bias-corrected estimate) and, once `final` ran, the test score of that same trial.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import optuna
import tomli_w
import yaml

from selector import record, selection, storage
from selector.errors import RefusedError, SelectorError
from selector.record import StudyRecord, TrialRecord
from selector.selection import Choice, Rule
from selector.spec import StudySpec

Format = Literal["json", "yaml", "toml"]
FORMATS: tuple[Format, ...] = ("json", "yaml", "toml")
EXTENSIONS: dict[str, Format] = {".json": "json", ".yaml": "yaml", ".yml": "yaml", ".toml": "toml"}
NOT_EVALUATED = {"state": "not evaluated"}  # a TOML export's test block before `final`


def choose_for_export(url: str, name: str, records: list[TrialRecord], rule: Rule | None) -> Choice:
    """The trial to export, recorded as the study's choice. Before `final`: `rule` (or the rule
    recorded earlier, or `best`) applied to the trials now. After `final`: the evaluated trial;
    a `rule` that picks another one is refused."""
    now = selection.current(url, name, records)
    if now is not None and now.evaluated:
        if rule is not None and selection.choose(records, rule, name).number != now.trial:
            raise RefusedError(
                f"study {name!r}: the test set was evaluated on trial {now.trial} (rule "
                f"{now.rule}); rule {rule} picks another trial, which has no unbiased test "
                "score — export without --rule, or create a new study"
            )
        return now
    wanted: Rule = rule or (now.rule if now is not None and now.by else "best")
    chosen = selection.choose(records, wanted, name)
    return selection.record_choice(url, name, wanted, chosen.number, "export")


def document(
    study: optuna.Study,
    rec: StudyRecord,
    url: str,
    choice: Choice,
    records: list[TrialRecord],
    estimate: Any | None = None,
) -> dict[str, Any]:
    """Everything needed to rebuild and retrain the chosen model, and where it came from."""
    trial = next((r for r in records if r.number == choice.trial), None)
    if trial is None or not trial.complete:
        raise RefusedError(f"study {study.study_name!r}: trial {choice.trial} is not complete")
    spec = rec.spec
    final = record.stored_final(url, rec.name)
    test = final.as_dict() if final is not None and final.trial == trial.number else None
    return {
        "study": study.study_name,
        "rule": choice.rule,
        "trial": trial.number,
        "chosen": choice.describe(),
        "params": trial.params,
        "config": {
            **trial.config(spec.space).as_dict(),
            "epochs": trial.best_epoch,
            "max_epochs": spec.training.max_epochs,
        },
        "cv": {
            "metric": spec.metric,
            "mean": trial.value,
            "std": trial.cv_std,
            "standard_error": trial.standard_error,
            "fold_scores": list(trial.fold_scores),
            "folds": len(trial.fold_scores),
        },
        "expected_test": estimate.as_dict() if estimate is not None else None,
        "train_score": trial.train_score,
        "gap": trial.gap,
        "n_params": trial.n_params,
        "seed": trial.seed,
        "data": {
            **spec.data.model_dump(exclude_none=True),
            **_data_file(spec),
            "seed": spec.seed,
            "fingerprints": rec.fingerprints,
        },
        "versions": rec.versions,
        "storage": storage.mask(url),
        "test": test,
    }


def _data_file(spec: StudySpec) -> dict[str, str]:
    """The data file as an absolute path: the export is read far from the study file, whose
    directory a relative `path` is relative to."""
    path = spec.data.file(spec.base_dir)
    return {} if path is None else {"path": str(path)}


def format_for(fmt: Format | None, output: Path | None) -> Format:
    """The export's format: `--format`, else the output file's extension, else JSON. A
    `--format` that the extension contradicts (`-o best.yml --format json`) is refused."""
    implied = EXTENSIONS.get(output.suffix.lower()) if output is not None else None
    if fmt is not None and implied is not None and fmt != implied:
        raise SelectorError(
            f"{output}: the extension says {implied}, --format says {fmt}; "
            "make them agree, or leave --format out"
        )
    return fmt or implied or "json"


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list | tuple):
        return [_drop_none(v) for v in obj]
    return obj


def dump(doc: dict[str, Any], fmt: Format) -> str:
    if fmt == "yaml":
        return str(yaml.safe_dump(doc, sort_keys=False))
    if fmt == "toml":  # TOML has no null: the test block says its state instead of vanishing
        return tomli_w.dumps(_drop_none({**doc, "test": doc.get("test") or NOT_EVALUATED}))
    return json.dumps(doc, indent=2, default=str) + "\n"
