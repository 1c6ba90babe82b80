"""The Python API: what the command line does, as functions and a `Study` handle for notebooks
and scripts, returning objects (`RunSummary`, `StudyStatus`, `TrialRecord`s, pandas frames)
instead of printing.

The CLI's `run`, `status` and `export` call these functions, so there is one implementation of
each: the same storage rules (`storage=` > `$SELECTOR_STORAGE` > the study's `storage` >
`sqlite:///selector.db`), the same workers (one in this process, `study.run`; several as
processes, `launch.run`), the same budget and the same lockbox.

A study is named by its study file (a path), its table (a dict, as a study file would hold it),
a `StudySpec`, or the name of a study already in the storage. Reading a study (`status`,
`trials`, `trials_frame`, `curves`, `export`, `report`) imports neither torch nor the engine: the
run side is imported by the functions that need it.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeAlias

from selector import spec as specs
from selector import storage as stores
from selector.errors import SelectorError
from selector.spec import StudySpec

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    import plotly.graph_objects as go
    from optuna.trial import FrozenTrial

    from selector.final import Evaluated
    from selector.record import RunSummary, TrialRecord
    from selector.report import Written
    from selector.storage import Heartbeat
    from selector.summary import StudyStatus

StudySource: TypeAlias = "Study | StudySpec | Mapping[str, Any] | str | os.PathLike[str]"
Progress: TypeAlias = Callable[["optuna.Study", "FrozenTrial"], None]
Rule = Literal["best", "one-se"]
Format = Literal["json", "yaml", "toml"]


# --- naming a study ----------------------------------------------------------------------------


def load_study_spec(source: StudySpec | Mapping[str, Any] | str | os.PathLike[str]) -> StudySpec:
    """A validated `StudySpec` from a study file (TOML) or from a dict laid out as a study file
    is (relative data paths are then relative to the current directory). Every problem is
    reported at once (`SpecError`), as for a study file."""
    if isinstance(source, StudySpec):
        return source
    if isinstance(source, Mapping):
        raw = _plain(source)
        return specs.parse(raw, origin="study dict", base_dir=str(Path.cwd()))
    return specs.load(Path(source))


def _plain(value: Any) -> Any:
    """A study table as TOML would give it: dicts and lists (a tuple of choices is a list), so
    that it validates, hashes and is recorded as the same file would be."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _is_study_file(source: str | os.PathLike[str]) -> bool:
    """A study file rather than a study's name: a path object, a `.toml` name, or a file."""
    return not isinstance(source, str) or source.endswith(".toml") or Path(source).is_file()


def resolve(source: StudySource, storage: str | None = None) -> tuple[str, str, StudySpec | None]:
    """(study name, storage URL, the spec if one was given) for a study file, table, spec or
    name: the storage from `storage`, else `$SELECTOR_STORAGE`, the spec's `storage`, or
    `sqlite:///selector.db` (made absolute). A `Study` handle keeps the storage it was made
    with."""
    if isinstance(source, Study):
        return source.name, source._url, source._spec
    if isinstance(source, StudySpec | Mapping) or _is_study_file(source):
        s = load_study_spec(source)
        return s.name, stores.resolve_url(storage, s.storage), s
    return str(source), stores.resolve_url(storage), None


def _spec_to_run(name: str, url: str, given: StudySpec | None) -> StudySpec:
    """The spec to run: the one given, else the one the study recorded when it was created."""
    if given is not None:
        return given
    from selector import record

    return record.load_record(url, name).spec


# --- running -----------------------------------------------------------------------------------


def run(
    source: StudySource,
    *,
    storage: str | None = None,
    n_trials: int | None = None,
    timeout: float | None = None,
    workers: int | None = None,
    threads: int | None = None,
    heartbeat: Heartbeat | None = None,
    progress: bool | Progress = True,
    fuse: int | str | None = None,
) -> RunSummary:
    """Create or resume the study and run trials until its n_trials are finished (`n_trials`:
    at most that many now; `timeout`: start none after that many seconds). One worker runs in
    this process (`workers=1` repeats a run exactly); more run as processes sharing the cores
    (default: one per core on the CPU, 4 on a GPU, never more than the trials left).
    `progress`: a bar (True: on a terminal or in Jupyter, one line per trial elsewhere), none
    (False), or a function told of each finished trial. `fuse`: the most trials trained as one
    fused group (an int, or "auto"; default the study's `[search] fuse`). Ctrl-C stops at the next epoch, the
    running trial recorded as interrupted, and raises `KeyboardInterrupt`."""
    from selector import interrupt, launch, worker
    from selector import study as studies
    from selector.storage import Heartbeat

    fuse = _check_run(
        n_trials=n_trials, timeout=timeout, workers=workers, threads=threads, fuse=fuse
    )
    name, url, given = resolve(source, storage)
    s = _spec_to_run(name, url, given)
    beat = heartbeat or Heartbeat()
    n_workers = workers or worker.default_workers(s, n_trials)
    with interrupt.deferred(), _progress(progress, s.n_trials) as tell:
        if n_workers == 1:
            with _torch_threads(threads or worker.torch_threads(1)):
                return studies.run(
                    s,
                    url,
                    n_trials=n_trials,
                    timeout=timeout,
                    heartbeat=beat,
                    progress=tell,
                    fuse=fuse,
                )
        return launch.run(
            s,
            url,
            workers=n_workers,
            n_trials=n_trials,
            timeout=timeout,
            heartbeat=beat,
            threads=threads,  # None: the cores shared out among the workers started
            progress=tell,
            fuse=fuse,
        )


@contextlib.contextmanager
def _progress(progress: bool | Progress, total: int) -> Iterator[Progress | None]:
    if progress is False:
        yield None
    elif progress is True:
        from selector.progress import Bar

        with Bar(total) as bar:
            yield bar
    else:
        yield progress


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Torch's intra-op threads for a run in this process, restored afterwards: a notebook's
    own torch code keeps its setting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- reading -----------------------------------------------------------------------------------


def status(source: StudySource, *, storage: str | None = None) -> StudyStatus:
    """The study's state, read once (`selector status`): trials with their diagnoses now, the
    choice and its expected test score, the test set's state. Reads only."""
    from selector import summary

    name, url, _ = resolve(source, storage)
    return summary.status(url, name)


def trials(source: StudySource, *, storage: str | None = None) -> list[TrialRecord]:
    """Every trial of the study as a `TrialRecord` (fold scores, train scores, epochs, curves),
    in trial-number order."""
    from selector import record

    name, url, _ = resolve(source, storage)
    return record.read_trials(url, name)[1]


FRAME_COLUMNS = (
    "number",
    "state",
    "value",
    "cv_std",
    "train_score",
    "gap",
    "diagnosis",
    "best_epoch",
    "epochs_run",
    "pruned_at_epoch",
    "n_params",
    "seconds",
    "fail_reason",
)


def trials_frame(source: StudySource, *, storage: str | None = None) -> pd.DataFrame:
    """One row per trial: `number`, `state`, `value` (the mean CV score at the best epoch),
    `cv_std`, `train_score`, `gap`, `diagnosis` (against the study as it is now), `best_epoch`,
    `epochs_run`, `pruned_at_epoch`, `n_params`, `seconds`, `fail_reason`, each fold's score
    `fold_0..` and train score `train_fold_0..`, and each param as `param_NAME`. Scores a trial
    did not reach are NaN."""
    import pandas as pd

    from selector import summary

    name, url, _ = resolve(source, storage)
    views = summary.status(url, name, estimate=False).trials
    rows = [_frame_row(v) for v in views]
    frame = pd.DataFrame(rows)
    if frame.empty:
        return pd.DataFrame(columns=list(FRAME_COLUMNS))
    params = sorted(c for c in frame.columns if c.startswith("param_"))
    ordered = [
        *FRAME_COLUMNS,
        *_numbered("fold_", frame.columns),
        *_numbered("train_fold_", frame.columns),
        *params,
    ]
    return frame[ordered]


def _numbered(prefix: str, columns: Any) -> list[str]:
    """The columns `PREFIX0, PREFIX1, ...` in number order (fold_10 after fold_9)."""
    found = [c for c in columns if c.startswith(prefix) and c[len(prefix) :].isdigit()]
    return sorted(found, key=lambda c: int(c[len(prefix) :]))


def _frame_row(view: Any) -> dict[str, Any]:
    r, d = view.record, view.diagnosis
    scored = bool(r.fold_scores)
    nan = float("nan")
    row: dict[str, Any] = {
        "number": r.number,
        "state": r.state.name.lower(),
        "value": r.value if r.value is not None else nan,
        "cv_std": r.cv_std if scored else nan,
        "train_score": r.train_score if scored else nan,
        "gap": r.gap if scored else nan,
        "diagnosis": d.label if d is not None else None,
        "best_epoch": r.best_epoch,
        "epochs_run": r.epochs_run,
        "pruned_at_epoch": r.pruned_at_epoch,
        "n_params": r.n_params,
        "seconds": r.seconds,
        "fail_reason": r.fail_reason,
    }
    row |= {f"fold_{k}": x for k, x in enumerate(r.fold_scores)}
    row |= {f"train_fold_{k}": x for k, x in enumerate(r.train_fold_scores)}
    row |= {f"param_{k}": v for k, v in r.params.items()}
    return row


def curves(source: StudySource, trial: int, *, storage: str | None = None) -> pd.DataFrame:
    """A trial's learning curves, one row per epoch (index `epoch`, from 1): each fold's
    validation score `fold_0..`, their mean `val` (what early stopping and the pruner watched),
    the mean training loss `loss`, and each layer's gradient norm `grad_0..` (input layer
    first). Empty for a trial that recorded none (it failed before its first epoch)."""
    import pandas as pd

    record = next((r for r in trials(source, storage=storage) if r.number == trial), None)
    if record is None:
        name, url, _ = resolve(source, storage)
        raise SelectorError(f"study {name!r} in {stores.mask(url)} has no trial {trial}")
    c = record.curves
    if c is None:
        return pd.DataFrame(columns=["val", "loss"], index=pd.Index([], name="epoch"))
    columns: dict[str, Any] = {f"fold_{k}": c.folds[k] for k in range(c.folds.shape[0])}
    columns |= {"val": c.val, "loss": c.loss}
    layers = c.grads.shape[1] if c.grads.ndim == 2 else 0
    columns |= {f"grad_{j}": c.grads[:, j] for j in range(layers)}
    epochs = pd.RangeIndex(1, c.loss.shape[0] + 1, name="epoch")
    return pd.DataFrame(columns, index=epochs)


# More torch threads than this many per core are refused: each worker would oversubscribe the
# machine (a typo such as threads=400 slows every trial to a crawl) and gains nothing.
MAX_THREADS_PER_CORE = 4


def max_threads() -> int:
    """The most torch threads a worker may take: `MAX_THREADS_PER_CORE` x this machine's cores."""
    return MAX_THREADS_PER_CORE * (os.cpu_count() or 1)


def check_threads(threads: int | None, name: str) -> None:
    """Torch threads per worker: at most `max_threads()`."""
    most = max_threads()
    if threads is not None and threads > most:
        raise SelectorError(
            f"{name} {threads}: more than {MAX_THREADS_PER_CORE} x the {most // MAX_THREADS_PER_CORE} "
            f"cores of this machine; use at most {most}, or leave it out (the cores are shared "
            "among the workers)"
        )


def _check_run(
    *,
    n_trials: int | None,
    timeout: float | None,
    workers: int | None,
    threads: int | None,
    fuse: int | str | None,
) -> int | str | None:
    """`run`'s arguments checked as the command line checks its options (no type check guards
    a Python caller), before the study is opened; returns the fuse setting."""
    for field, value in (("n_trials", n_trials), ("workers", workers), ("threads", threads)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            raise SelectorError(f"{field}: give a whole number >= 1 (or None), got {value!r}")
    check_threads(threads, "threads")
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not (math.isfinite(timeout) and timeout >= 0)
    ):
        raise SelectorError(f"timeout: give seconds >= 0 (or None), got {timeout!r}")
    return specs.fuse_setting(fuse, "fuse")


# --- choosing, evaluating, applying ------------------------------------------------------------


def export(
    source: StudySource,
    *,
    storage: str | None = None,
    rule: Rule | None = None,
    path: str | os.PathLike[str] | None = None,
    format: Format | None = None,
) -> dict[str, Any]:
    """The chosen config with its CV scores, expected test score and provenance, as a dict
    (`selector export`); written to `path` too when given (`format`: json, yaml or toml; by
    default from the file's extension, else json). Records the choice, which `final` then
    evaluates; `rule` (best, one-se) chooses anew before the test set is opened."""
    from selector import export as ex
    from selector import record, selection

    selection.check_rule(rule)
    _check_one_of("format", format, ex.FORMATS)
    out = Path(path) if path is not None else None
    kind = ex.format_for(format, out)
    if out is not None:  # before the choice is recorded: a bad path changes nothing
        _check_writable(out)
    name, url, _ = resolve(source, storage)
    study, rec = record.open_study(url, name)
    records = record.trials(study)
    choice = ex.choose_for_export(url, name, records, rule)
    estimate = selection.estimate(url, rec, records, choice.rule)
    doc = ex.document(study, rec, url, choice, records, estimate)
    if out is not None:
        try:
            out.write_text(ex.dump(doc, kind))
        except OSError as e:
            raise SelectorError(f"{out}: cannot write the export ({e.strerror or e})") from None
    return doc


def _check_one_of(field: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise SelectorError(f"{field}: unknown value {value!r}; use one of {', '.join(allowed)}")


def _check_writable(path: Path) -> None:
    if path.is_dir():
        raise SelectorError(f"{path}: is a directory; give a file name")
    if not path.parent.is_dir():
        raise SelectorError(f"{path}: directory {path.parent} does not exist; create it first")


def final(
    source: StudySource,
    *,
    storage: str | None = None,
    rule: Rule | None = None,
    early: bool = False,
    progress: bool = True,
) -> Evaluated:
    """Evaluate the held-out test set, once per study (`selector final`): the recorded choice
    (or `rule`'s) is refit on all dev rows and scored; the model is saved and the study sealed.
    Refused while the study's n_trials are not finished, unless `early`; refused for a study
    without a test set (`data.test_size = 0`)."""
    from selector import final as lockbox
    from selector.progress import RefitBar

    name, url, _ = resolve(source, storage)
    if not progress:
        return lockbox.evaluate(url, name, rule, early=early)
    with RefitBar() as bar:
        return lockbox.evaluate(url, name, rule, early=early, progress=bar)


def predict(source: StudySource, rows: pd.DataFrame, *, storage: str | None = None) -> pd.DataFrame:
    """The final model's predictions (saved by `final`) for `rows`, a frame with the study's
    feature columns (extra columns, the target among them, are ignored): one row per input row,
    `row` (its position), `prediction` and, for a classifier, `proba_CLASS` per class."""
    from selector import artifact
    from selector import predict as applying

    name, url, _ = resolve(source, storage)
    bundle = artifact.load(applying.model_dir(url, name))
    frame = rows.copy()
    frame.columns = [str(c) for c in frame.columns]
    return applying.apply(bundle, frame).table


def report(
    source: StudySource,
    path: str | os.PathLike[str] = "report.html",
    *,
    storage: str | None = None,
) -> Written:
    """Write the self-contained HTML report (`selector report`): summary, top trials,
    diagnosis, figures, config."""
    from selector import report as reporting

    name, url, _ = resolve(source, storage)
    return reporting.write(url, name, Path(path))


def figures(source: StudySource, *, storage: str | None = None) -> dict[str, go.Figure]:
    """The report's figures as plotly figures, to show in a notebook: the CV score of each
    trial with its fold spread, the generalization gap against model size, the learning curves
    of the top trials, and Optuna's history, parameter importances and parallel coordinates
    (where the study has enough trials for them)."""
    from selector import record, summary
    from selector import report as reporting

    name, url, _ = resolve(source, storage)
    st = summary.status(url, name)
    study, rec = record.open_study(url, name)
    more = reporting.optuna_figures(study)[0] if st.ranked else {}
    return {**reporting.study_figures(st.ranked, rec.spec.metric), **more}


def export_onnx(
    source: StudySource, path: str | os.PathLike[str], *, storage: str | None = None
) -> Any:
    """Write the model `final` saved as one ONNX file, preprocessing included (`selector export
    --model onnx`): a service feeds it the raw feature columns. Returns what was written
    (`onnx_export.Exported`: the path, the inputs and the outputs)."""
    from selector import onnx_export

    out = Path(path)
    _check_writable(out)
    name, url, _ = resolve(source, storage)
    return onnx_export.export_final(url, name, out)


def learning_curve(
    source: StudySource,
    sizes: Sequence[float] | None = None,
    *,
    storage: str | None = None,
) -> Any:
    """The chosen config's CV score at shares of each fold's training rows (`selector
    learning-curve`; dev rows only), recorded in the study for the report. Returns a
    `learning.LearningCurve` (`.points`, `.verdict`, `as_dict()`)."""
    from selector import learning

    shares = learning.check_sizes(sizes, "sizes") if sizes is not None else learning.DEFAULT_SIZES
    name, url, _ = resolve(source, storage)
    return learning.compute(url, name, shares)


# --- a handle ----------------------------------------------------------------------------------


class Study:
    """A study to run and read, named once: by its study file, its table (a dict), a
    `StudySpec`, or the name of a study in the storage. The storage is resolved once, when the
    handle is made, by the rules of the command line.

        study = selector.Study("studies/penguins.toml")
        study.run(workers=1)
        study.trials_frame().sort_values("value", ascending=False).head()
    """

    def __init__(self, source: StudySource, *, storage: str | None = None) -> None:
        self.name, self._url, self._spec = resolve(source, storage)

    @property
    def storage(self) -> str:
        """The storage URL, any secret in it masked."""
        return stores.mask(self._url)

    @property
    def spec(self) -> StudySpec:
        """The spec given, else the one the study recorded."""
        if self._spec is None:
            self._spec = _spec_to_run(self.name, self._url, None)
        return self._spec

    def __repr__(self) -> str:
        return f"Study({self.name!r}, storage={self.storage!r})"

    def run(
        self,
        *,
        n_trials: int | None = None,
        timeout: float | None = None,
        workers: int | None = None,
        threads: int | None = None,
        progress: bool | Progress = True,
        fuse: int | str | None = None,
    ) -> RunSummary:
        """Run trials until the study's n_trials are finished (see `selector.api.run`)."""
        return run(
            self,
            n_trials=n_trials,
            timeout=timeout,
            workers=workers,
            threads=threads,
            progress=progress,
            fuse=fuse,
        )

    def status(self) -> StudyStatus:
        return status(self)

    def trials(self) -> list[TrialRecord]:
        return trials(self)

    def trials_frame(self) -> pd.DataFrame:
        return trials_frame(self)

    def curves(self, trial: int) -> pd.DataFrame:
        return curves(self, trial)

    def export(
        self,
        *,
        rule: Rule | None = None,
        path: str | os.PathLike[str] | None = None,
        format: Format | None = None,
    ) -> dict[str, Any]:
        return export(self, rule=rule, path=path, format=format)

    def final(
        self, *, rule: Rule | None = None, early: bool = False, progress: bool = True
    ) -> Evaluated:
        return final(self, rule=rule, early=early, progress=progress)

    def predict(self, rows: pd.DataFrame) -> pd.DataFrame:
        return predict(self, rows)

    def report(self, path: str | os.PathLike[str] = "report.html") -> Written:
        return report(self, path)

    def figures(self) -> dict[str, go.Figure]:
        return figures(self)

    def export_onnx(self, path: str | os.PathLike[str]) -> Any:
        return export_onnx(self, path)

    def learning_curve(self, sizes: Sequence[float] | None = None) -> Any:
        return learning_curve(self, sizes)
