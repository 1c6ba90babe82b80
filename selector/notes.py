"""What optuna-dashboard shows for each trial: a note and a learning-curve figure.

`trial_note_attrs` runs at the end of each complete trial, inside the objective. It never raises (a
note that cannot be written is logged; the trial goes on) and it is cheap: the figure is a small
hand-written SVG, no plotting library. The note (markdown) holds fold scores, train vs. validation
score, the generalization gap, the diagnosis and gradient health. The SVG goes to Optuna's artifact
store beside a SQLite database (`selector-artifacts/_trials/`) and is shown inside the note; other
storages get the note only (a file beside one worker is not seen by the dashboard elsewhere).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.trial import FrozenTrial

from selector import storage
from selector.diagnose import Diagnosis
from selector.record import TrialRecord

log = logging.getLogger(__name__)

FOOTER = "_Written by selector._"
ARTIFACTS = Path("selector-artifacts") / "_trials"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _f(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _grad_line(norms: np.ndarray, best_epoch: int) -> str:
    if norms.size == 0:
        return "no gradient statistics"
    at = norms[min(max(best_epoch, 1), len(norms)) - 1]
    first, last = norms[0], norms[-1]
    ratio = f"{last[0] / last[-1]:.2g}" if len(last) and last[-1] > 0 else "-"
    return (
        f"per layer, input → output: epoch 1 [{', '.join(_f(x, '.3g') for x in first)}], "
        f"best epoch [{', '.join(_f(x, '.3g') for x in at)}]; first/last layer ratio at the "
        f"end {ratio}"
    )


def trial_note(r: TrialRecord, d: Diagnosis, image: str | None = None) -> str:
    """The note of a complete trial: its record, and its diagnosis against the study now."""
    rows = [
        f"| fold {k + 1} | {_f(v)} | {_f(t)} |"
        for k, (v, t) in enumerate(zip(r.fold_scores, r.train_fold_scores, strict=False))
    ]
    grads = r.curves.grads if r.curves is not None else np.zeros((0, 0))
    lines = [
        f"### Trial {r.number}: {d.label}",
        "",
        "| | validation | train |",
        "|---|---|---|",
        f"| **mean** | **{_f(r.value)}** ± {_f(r.cv_std)} | **{_f(r.train_score)}** |",
        *rows,
        "",
        f"**Generalization gap** (train − validation): {_f(r.gap, '+.4f')} at the "
        f"best epoch {r.best_epoch or '-'} of {r.epochs_run or '-'} run.",
        "",
        f"**Gradients** {d.gradients}: " + _grad_line(grads, r.best_epoch or 1),
        "",
        f"**Model** {_f(r.n_params, ',')} parameters; {_f(r.seconds, '.1f')} s of training.",
    ]
    if image:
        lines += ["", f"![learning curves of every fold]({image})"]
    return "\n".join([*lines, "", FOOTER])


# --- the learning-curve figure ----------------------------------------------------------------


def _points(
    values: list[float], x0: float, y0: float, w: float, h: float, lo: float, hi: float
) -> str:
    n = max(len(values) - 1, 1)
    span = (hi - lo) or 1.0
    return " ".join(
        f"{x0 + w * i / n:.1f},{y0 + h - h * (v - lo) / span:.1f}"
        for i, v in enumerate(values)
        if math.isfinite(v)
    )


def _range(curves: list[list[float]]) -> tuple[float, float]:
    values = [v for c in curves for v in c if math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 or 0.05
    return lo - pad, hi + pad


def _panel(
    curves: list[tuple[list[float], str, float]], y0: float, h: float, label: str
) -> list[str]:
    x0, w = 52.0, 410.0
    lo, hi = _range([c for c, _, _ in curves])
    out = [
        f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#ccc"/>',
        f'<text x="{x0 - 4}" y="{y0 + 10}" text-anchor="end">{hi:.3g}</text>',
        f'<text x="{x0 - 4}" y="{y0 + h}" text-anchor="end">{lo:.3g}</text>',
        f'<text x="{x0}" y="{y0 - 4}" fill="#555">{label}</text>',
    ]
    for values, color, width in curves:
        pts = _points(values, x0, y0, w, h, lo, hi)
        out.append(
            f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{width}"/>'
        )
    return out


def curves_svg(r: TrialRecord, title: str) -> str:
    """Validation score of every fold and their mean, and the training loss, per epoch."""
    c = r.curves
    folds = [list(f) for f in c.folds] if c is not None else []
    mean = list(c.val) if c is not None else []
    loss = list(c.loss) if c is not None else []
    n = max(len(mean), 1)
    best = r.best_epoch or 0
    curves = [(f, PALETTE[k % len(PALETTE)], 1.0) for k, f in enumerate(folds)]
    x_best = 52 + 410 * (best - 1) / max(n - 1, 1)
    body = [
        f'<text x="52" y="14" font-weight="bold">{title}</text>',
        *_panel(
            [*curves, (mean, "#000", 2.2)], 38, 140, "validation score of each fold; mean in black"
        ),
        *_panel([(loss, "#444", 1.5)], 200, 60, "training loss (mean over folds)"),
        f'<line x1="{x_best:.1f}" y1="38" x2="{x_best:.1f}" y2="260" stroke="#888" '
        'stroke-dasharray="4 3"/>',
        f'<text x="52" y="276">epoch 1</text><text x="462" y="276" text-anchor="end">'
        f"epoch {n} (best {best}, dashed)</text>",
    ]
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="480" height="284" '
        'font-family="sans-serif" font-size="11"><rect width="480" height="284" fill="#fff"/>'
        + "".join(body)
        + "</svg>"
    )


# --- writing them ----------------------------------------------------------------------------


def artifact_root(url: str) -> Path | None:
    """Optuna's artifact store for trial figures: beside a SQLite database, else none."""
    path = storage.sqlite_path(url)
    return None if path is None else path.parent / ARTIFACTS


def storage_url(st: Any) -> str | None:
    """The database URL behind an Optuna storage (None for a gRPC proxy)."""
    backend = getattr(st, "_backend", st)  # Optuna wraps an RDBStorage in a cache
    url = getattr(backend, "url", None)
    return url if isinstance(url, str) else None


class _ArtifactMeta:
    """Takes the artifact meta `optuna.artifacts.upload_artifact` records on the trial, to be
    written with the trial's result in its one transaction instead of a transaction of its own."""

    def __init__(self) -> None:
        self.attrs: dict[str, Any] = {}

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.attrs[key] = value


_FIGURES: dict[int, Path] = {}  # by process id


def _figures_dir() -> Path:
    """A temporary directory for the figures this process uploads, each file removed once
    uploaded, the directory when the process that made it exits (a forked child makes its
    own): one a trial cost a penguins search 0.7% in making and removing it."""
    pid = os.getpid()
    if pid not in _FIGURES:
        _FIGURES[pid] = Path(tempfile.mkdtemp(prefix="selector-figures-"))
        atexit.register(_remove_figures, pid, _FIGURES[pid])
    return _FIGURES[pid]


def _remove_figures(pid: int, path: Path) -> None:
    if os.getpid() == pid:
        shutil.rmtree(path, ignore_errors=True)


def _upload_curves(trial: optuna.Trial, r: TrialRecord, meta: _ArtifactMeta) -> str | None:
    """Upload the SVG to the artifact store (its meta into `meta`); the URL the dashboard
    serves it at, or None."""
    url = storage_url(trial.storage)
    root = artifact_root(url) if url else None
    if root is None:
        return None
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    root.mkdir(parents=True, exist_ok=True)
    path = _figures_dir() / f"trial-{trial.number}-curves.svg"
    path.write_text(curves_svg(r, f"Trial {trial.number}: learning curves"))
    try:
        artifact_id = upload_artifact(
            artifact_store=FileSystemArtifactStore(str(root)),
            file_path=str(path),
            study_or_trial=trial,
            storage=meta,  # type: ignore[arg-type]
            mimetype="image/svg+xml",
        )
    finally:
        path.unlink(missing_ok=True)
    return f"/artifacts/{trial.study._study_id}/{trial._trial_id}/{artifact_id}"


def _try_upload(trial: optuna.Trial, r: TrialRecord, meta: _ArtifactMeta) -> str | None:
    try:
        return _upload_curves(trial, r, meta)
    except Exception as e:
        log.warning("trial %s: learning-curve figure not stored (%s)", trial.number, e)
        return None


def first_note_attrs(trial_id: int, body: str) -> dict[str, Any] | None:
    """The study system attrs of a trial's first dashboard note (`note_attrs` with none
    before): a running trial's first note is written with its result."""
    return note_attrs({}, trial_id, body)


def note_attrs(system_attrs: Mapping[str, Any], trial_id: int, body: str) -> dict[str, Any] | None:
    """A trial's dashboard note as the study system attrs that write it, in optuna-dashboard's
    own format, as its `save_note` writes them (the version one more, the body's chunks, older
    chunks beyond them cleared), from the study's attrs already read (None if its helpers
    move). `save_note` reads every study system attr twice a note: 50 ms a note at 1,000
    trials, 0.5 s beside 4,800."""
    try:
        from optuna_dashboard._note import note_str_key_prefix, note_ver_key, split_body
    except ImportError:
        return None
    prefix = note_str_key_prefix(trial_id)
    chunks = split_body(body, trial_id)
    old = 0  # a note's chunks are numbered from 0 (cleared ones stay, empty)
    while f"{prefix}{old}" in system_attrs:
        old += 1
    version = int(system_attrs.get(note_ver_key(trial_id), 0)) + 1
    cleared = {f"{prefix}{i}": "" for i in range(len(chunks), old)}
    return {note_ver_key(trial_id): version, **chunks, **cleared}


@dataclass(frozen=True)
class NoteAttrs:
    """A complete trial's first dashboard note as attributes to write with its result: the
    note (study system attrs, optuna-dashboard's format) and its figure's artifact meta (trial
    system attrs, Optuna's format)."""

    study: dict[str, Any] = field(default_factory=dict)
    trial: dict[str, Any] = field(default_factory=dict)


def trial_note_attrs(trial: optuna.Trial, r: TrialRecord, d: Diagnosis) -> NoteAttrs:
    """A complete trial's first dashboard note, with its figure (uploaded now), as the
    attributes to write in the transaction that records its result. Never raises: a failure
    is logged and gives none (where optuna-dashboard's helpers moved, `save_note` writes it)."""
    meta = _ArtifactMeta()
    try:
        body = trial_note(r, d, _try_upload(trial, r, meta))
        attrs = first_note_attrs(trial._trial_id, body)
        if attrs is None:
            from optuna_dashboard import save_note

            save_note(trial, body)
            return NoteAttrs(trial=meta.attrs)
        return NoteAttrs(attrs, meta.attrs)
    except Exception as e:  # a note must never fail a trial
        log.warning("trial %s: dashboard note not written (%s)", trial.number, e)
        return NoteAttrs(trial=meta.attrs)


def annotate_finished(
    study: optuna.Study,
    trial: FrozenTrial,
    d: Diagnosis,
    system_attrs: Mapping[str, Any] | None = None,
) -> None:
    """The note of a finished trial, written anew (its figure, if any, stays), from the study's
    system attrs when they were read already (the dashboard rewrites many notes from one
    read). `study` should be loaded with a sampler that has no `before_trial` side effect."""
    figure = _figure_of(study._study_id, trial)
    body = trial_note(TrialRecord.from_trial(trial), d, figure)
    store = study._storage
    if system_attrs is None:
        system_attrs = store.get_study_system_attrs(study._study_id)
    attrs = note_attrs(system_attrs, trial._trial_id, body)
    if attrs is None:
        from optuna_dashboard import save_note

        save_note(optuna.Trial(study, trial._trial_id), body)
        return
    storage.write_study_system_attrs(store, study._study_id, attrs)


def _figure_of(study_id: int, trial: FrozenTrial) -> str | None:
    """The learning-curve figure an earlier note of the trial showed (Optuna's artifact meta)."""
    for key, value in trial.system_attrs.items():
        if not key.startswith("artifacts:"):
            continue
        meta = json.loads(value) if isinstance(value, str) else value
        if isinstance(meta, dict) and str(meta.get("filename", "")).endswith("-curves.svg"):
            return f"/artifacts/{study_id}/{trial._trial_id}/{meta['artifact_id']}"
    return None


def note_label(system_attrs: dict[str, Any], trial_id: int) -> str | None:
    """The diagnosis a trial's note shows now (its heading), or None when it has no note. The
    heading is in the note's first chunk, read by its key: optuna-dashboard's
    `get_note_from_system_attrs` scans every study system attr for a note's chunks, which for
    every trial of a 4,800-trial study took 5 s."""
    from optuna_dashboard._note import note_str_key_prefix

    if not has_note(system_attrs, trial_id):
        return None
    body = str(system_attrs.get(f"{note_str_key_prefix(trial_id)}0", ""))
    first = body.split("\n", 1)[0]
    return first.split(": ", 1)[1] if first.startswith("### Trial") and ": " in first else None


def has_note(system_attrs: dict[str, Any], trial_id: int) -> bool:
    return f"dashboard:{trial_id}:note_ver" in system_attrs
