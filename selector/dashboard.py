"""optuna-dashboard on a study's storage, with pre-checks, and selector's notes and figures in it.

Before serving, and then every `refresh` seconds while it serves, each selector study in the storage
gets (in Optuna's study system attrs, where optuna-dashboard reads them):

- the figures optuna-dashboard lacks (`report.study_figures`), under fixed ids, so a refresh
  replaces them;
- a study note: progress, best trial, diagnosis counts and the lockbox state (sealed / evaluated,
  score, when). A note someone edited in the dashboard is left alone;
- a note for each complete trial that has none (trials that ran before notes existed; new trials
  write their own from inside the objective, see `notes.trial_note_attrs`), and a new note for
  each trial whose diagnosis changed since its note was written (labels are measured against
  the study as it is now, `selector.diagnose`).

Trials themselves are never changed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref import simple_server

import optuna
from optuna.trial import TrialState

from selector import notes, record, report, selection, storage, summary
from selector.errors import SelectorError, StudyError
from selector.summary import StudyStatus

log = logging.getLogger(__name__)

STUDY_FOOTER = "_Written by selector dashboard; it is refreshed while the dashboard runs (edit it to stop that)._"


@dataclass(frozen=True)
class Published:
    study: str
    figures: int
    trial_notes: int
    study_note: bool


def studies(url: str, only: str | None = None) -> tuple[optuna.storages.BaseStorage, list[str]]:
    """The storage, checked and opened, and its study names; a clear error when there are none
    or `only` is not among them. Never creates a database file."""
    st = storage.open_storage(url, must_exist=True)
    names = sorted(s.study_name for s in st.get_all_studies())
    if not names:
        raise StudyError(
            f"storage {storage.mask(url)} holds no study yet; "
            f"run `selector run STUDY_FILE --storage {storage.mask(url)}` first"
        )
    if only is not None and only not in names:
        raise StudyError(
            f"no study {only!r} in {storage.mask(url)}; studies here: {', '.join(names)}"
        )
    return st, names


def study_note(st: StudyStatus) -> str:
    s, best = st.states, st.best
    fits = st.counts("fit")
    grads = st.counts("gradients")
    lines = [
        f"## {st.study}",
        "",
        f"**Data** {st.data} · **metric** {st.metric} (maximize)",
        "",
        f"**Trials** {st.finished}/{st.n_trials} finished: {s['complete']} complete, "
        f"{s['pruned']} pruned, {s['fail']} failed, {s['running']} running",
        "",
        "**Best** "
        + (
            "no complete trial yet"
            if best is None
            else f"trial {best.record.number}: {best.record.value:.4f} ± "
            f"{best.record.cv_std:.4f}, {best.diagnosis.label if best.diagnosis else '-'}"
        ),
        "",
        "**Chosen** "
        + (st.choice.describe() if st.choice else "-")
        + f" · {summary.estimate_line(st)}",
        "",
        "**Diagnosis** "
        + (", ".join(f"{k} {v}" for k, v in fits.most_common()) or "-")
        + " · **gradients** "
        + (", ".join(f"{k} {v}" for k, v in grads.most_common()) or "-"),
        "",
        "**Test set** " + _lockbox_line(st),
        "",
        "Figures below: CV score per trial with fold spread, generalization gap against model "
        "size, learning curves of the top trials.",
        "",
        STUDY_FOOTER,
    ]
    return "\n".join(lines)


def _lockbox_line(st: StudyStatus) -> str:
    f = st.final
    line = summary.lockbox_line(st)
    if f is None or f.state != "finished" or f.cv_score is None or f.test_score is None:
        return line
    return f"{line}; optimism (CV − test) {f.cv_score - f.test_score:+.4f}"


def publish(url: str, st: optuna.storages.BaseStorage, name: str) -> Published | None:
    """selector's figures and notes for study `name` (None when it is not a selector study)."""
    from optuna_dashboard import get_note, save_note, save_plotly_graph_object

    rec = record.find_record(url, name)
    if rec is None:
        return None
    # a sampler whose before_trial does nothing: trial handles for notes change no trial
    study = optuna.load_study(study_name=name, storage=st, sampler=optuna.samplers.RandomSampler())
    status = summary.status(url, name)
    figures = report.study_figures(status.ranked, rec.spec.metric)
    for key, fig in figures.items():
        save_plotly_graph_object(study, fig, graph_object_id=f"selector-{key}")
    system = st.get_study_system_attrs(study._study_id)
    record.refresh(study)  # selector's reader fills the cache: Optuna's ORM took 5 s at 4,800
    frozen = {t.number: t for t in study.get_trials(deepcopy=False)}
    stale = [
        v
        for v in status.ranked
        if v.diagnosis is not None
        and notes.note_label(system, frozen[v.record.number]._trial_id) != v.diagnosis.label
    ]
    for v in stale:  # each from the one read of the study's attrs above
        assert v.diagnosis is not None
        notes.annotate_finished(study, frozen[v.record.number], v.diagnosis, system)
    text, current = study_note(status), get_note(study)
    write = current != text and (not current or STUDY_FOOTER in current)
    if write:
        save_note(study, text)
    return Published(name, len(figures), len(stale), write)


def _signature(url: str, st: optuna.storages.BaseStorage, name: str) -> tuple[Any, ...]:
    counts = record.state_counts(url, name)  # one query, not every trial read
    prev = record.stored_final(url, name)
    choice = selection.recorded(url, name)
    return (
        tuple(counts.get(s, 0) for s in TrialState),
        prev.state if prev else "sealed",
        choice.as_dict() if choice else None,
    )


class Refresher(threading.Thread):
    """Publishes again every `every` seconds, for the studies whose trials or lockbox changed."""

    def __init__(
        self, url: str, st: optuna.storages.BaseStorage, names: list[str], every: float
    ) -> None:
        super().__init__(daemon=True, name="selector-dashboard-refresh")
        self.url, self.st, self.names, self.every = url, st, names, every
        self.seen: dict[str, tuple[Any, ...]] = {}
        self.stopped = threading.Event()

    def publish_changed(self) -> list[Published]:
        out = []
        for name in self.names:
            try:
                sig = _signature(self.url, self.st, name)
                if self.seen.get(name) != sig:
                    if (p := publish(self.url, self.st, name)) is not None:
                        out.append(p)
                    self.seen[name] = sig
            except Exception as e:  # the dashboard goes on serving what is there
                log.warning("study %s: figures and notes not refreshed (%s)", name, e)
        return out

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.publish_changed()


class _Server(ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def artifact_store(url: str) -> Any:
    root = notes.artifact_root(url)
    if root is None:
        return None
    from optuna.artifacts import FileSystemArtifactStore

    return FileSystemArtifactStore(str(root))


def make_server(
    url: str, st: optuna.storages.BaseStorage, host: str, port: int
) -> simple_server.WSGIServer:
    """optuna-dashboard's WSGI app on a threaded server bound to host:port (a clear error when
    the port is taken)."""
    from optuna_dashboard import wsgi

    app = wsgi(st, artifact_store=artifact_store(url))
    try:
        return simple_server.make_server(
            host, port, app, server_class=_Server, handler_class=_QuietHandler
        )
    except OSError as e:
        raise SelectorError(
            f"cannot listen on {host}:{port} ({e.strerror or e}); choose another --port or --host"
        ) from None


def page_url(st: optuna.storages.BaseStorage, host: str, port: int, only: str | None) -> str:
    shown = f"[{host}]" if ":" in host else host
    base = f"http://{shown}:{port}/dashboard"
    return base if only is None else f"{base}/studies/{st.get_study_id_from_name(only)}"


def serve(
    url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    only: str | None = None,
    refresh: float = 30.0,
    echo: Callable[[str], None] = print,
) -> None:
    """Check the storage, publish figures and notes, then serve until Ctrl-C."""
    st, names = studies(url, only)
    server = make_server(url, st, host, port)
    refresher = Refresher(url, st, names, refresh)
    for p in refresher.publish_changed():
        echo(f"study {p.study!r}: {p.figures} figures, {p.trial_notes} trial notes written")
    if refresh > 0:
        refresher.start()
    echo(
        f"optuna-dashboard for {storage.mask(url)} at {page_url(st, host, port, only)} (Ctrl-C stops)"
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        echo("dashboard stopped")
    finally:
        refresher.stopped.set()
        server.server_close()


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exposure_warning(host: str) -> str | None:
    """A warning when the dashboard would be reachable from other machines: it has no login."""
    if host in LOOPBACK or host.startswith("127."):
        return None
    return (
        f"warning: --host {host} makes the dashboard reachable from other machines; it has no "
        "authentication, and anyone who reaches it can read and edit the studies"
    )
