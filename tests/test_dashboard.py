"""`selector dashboard`: pre-checks, the notes and figures selector writes for optuna-dashboard, and
the command itself in a real process. What a browser shows is in test_browser.py."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from optuna_dashboard import get_note, save_note
from typer.testing import CliRunner

from selector import dashboard, diagnose, final, notes, record, spec, storage, study, summary
from selector.cli import app
from selector.record import TrialRecord
from tests.conftest import small_raw

runner = CliRunner()


def _sel(*args: str) -> tuple[int, str]:
    r = runner.invoke(app, list(args))
    return r.exit_code, r.output


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def ran(url: str) -> str:
    study.run(spec.parse(small_raw(n_trials=3), origin="t.toml"), url)
    return url


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """One study for the tests that only read it."""
    tmp = tmp_path_factory.mktemp("shared")
    url = f"sqlite:///{tmp / 'selector.db'}"
    study.run(spec.parse(small_raw(n_trials=3), origin="t.toml"), url)
    return url, tmp


def _trial_notes(url: str, name: str = "iris-small") -> dict[int, str]:
    st = storage.open_storage(url, must_exist=True)  # psycopg2 for a bare postgresql:// URL
    s = optuna.load_study(study_name=name, storage=st, sampler=optuna.samplers.RandomSampler())
    return {
        t.number: get_note(optuna.Trial(s, t._trial_id))
        for t in s.get_trials(states=(TrialState.COMPLETE,))
    }


def _labels(url: str, name: str = "iris-small") -> tuple[dict[int, str | None], dict[int, str]]:
    """Each complete trial's note heading, and its diagnosis against the study now."""
    st = storage.open_storage(url, must_exist=True)
    s = optuna.load_study(study_name=name, storage=st)
    system = st.get_study_system_attrs(s._study_id)
    ids = {t.number: t._trial_id for t in s.get_trials(deepcopy=False)}
    now = {
        v.record.number: v.diagnosis.label
        for v in summary.status(url, name).ranked
        if v.diagnosis is not None
    }
    return {n: notes.note_label(system, ids[n]) for n in now}, now


def _relabelled(url: str) -> int:
    shown, now = _labels(url)
    return sum(shown[n] != now[n] for n in now)


# --- pre-checks ------------------------------------------------------------------------------


def test_a_missing_sqlite_file_is_refused_and_not_created(tmp_path: Path) -> None:
    db = tmp_path / "nope.db"
    code, out = _sel("dashboard", "--storage", f"sqlite:///{db}")
    assert code == 2 and "no such database" in out and not db.exists()


def test_a_database_without_a_study_says_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.storages.RDBStorage(url)  # Optuna's tables, no study
    code, out = _sel("dashboard", "--storage", url)
    assert code == 2 and "holds no study yet; run `selector run STUDY_FILE" in out


def test_an_unknown_study_is_named(shared: tuple[str, Path]) -> None:
    code, out = _sel("dashboard", "wine", "--storage", shared[0])
    assert code == 2 and "no study 'wine'" in out and "iris-small" in out


def test_a_missing_driver_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(storage, "_installed", lambda module: False)  # neither psycopg installed
    code, out = _sel("dashboard", "--storage", "postgresql://me:secret@127.0.0.1:5432/db")
    assert code == 2
    assert "is not installed; pip install 'selector[postgres]'" in out and "secret" not in out


def test_a_taken_port_is_refused(shared: tuple[str, Path]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = _sel("dashboard", "--storage", shared[0], "--port", str(port))
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in out


# --- notes and figures -----------------------------------------------------------------------


def test_each_trial_writes_its_note_and_learning_curve_figure(shared: tuple[str, Path]) -> None:
    ran, tmp_path = shared
    written = _trial_notes(ran)
    assert len(written) == 3
    t = optuna.load_study(study_name="iris-small", storage=ran).trials[0]
    note = written[t.number]
    # written when it finished: its diagnosis against the study then (trial 0: itself alone)
    r, rec = TrialRecord.from_trial(t), record.load_record(ran, "iris-small")
    ctx = diagnose.context(
        [r],
        metric=rec.spec.metric,
        baseline=optuna.load_study(study_name="iris-small", storage=ran).user_attrs[
            record.ATTR_BASELINE
        ],
        max_epochs=rec.spec.training.max_epochs,
    )
    d = diagnose.diagnose(r, ctx)
    assert f"### Trial {t.number}: {d.label}" in note
    assert f"**{t.value:.4f}** ± {r.cv_std:.4f}" in note
    assert f"{r.gap:+.4f}" in note and f"**Gradients** {d.gradients}: per layer" in note
    artifact = next(k for k in t.system_attrs if k.startswith("artifacts:"))
    artifact_id = artifact.removeprefix("artifacts:")
    assert f"/artifacts/1/{t._trial_id}/{artifact_id})" in note
    svg = (tmp_path / "selector-artifacts" / "_trials" / artifact_id).read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") == 3 + 1 + 1  # folds, mean, loss


def test_a_first_note_reads_back_as_optuna_dashboards_own(url: str) -> None:
    """The note written without `save_note`'s reads is what `get_note` returns, for a long body
    in several chunks too, and a later `save_note` on the same trial goes on from version 1."""
    s = optuna.create_study(storage=storage.open_storage(url, must_exist=False))
    trial = s.ask()
    body = "### Trial 0\n" + "x" * 5000
    storage.write_trial(trial, study_system_attrs=notes.first_note_attrs(trial._trial_id, body))
    assert get_note(trial) == body
    save_note(trial, "edited")
    assert get_note(trial) == "edited"
    assert (
        s._storage.get_study_system_attrs(s._study_id)[f"dashboard:{trial._trial_id}:note_ver"] == 2
    )


def test_a_failing_note_never_fails_a_trial(
    url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(notes, "trial_note", broken)
    with caplog.at_level(logging.WARNING, logger="selector.notes"):
        study.run(spec.parse(small_raw(n_trials=2), origin="t.toml"), url)
    trials = optuna.load_study(study_name="iris-small", storage=url).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert "dashboard note not written (disk full)" in caplog.text


def test_publish_writes_figures_the_study_note_and_missing_trial_notes(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        notes, "trial_note_attrs", lambda *_: notes.NoteAttrs()
    )  # trials from before notes
    study.run(spec.parse(small_raw(n_trials=2), origin="t.toml"), url)
    monkeypatch.undo()
    st, _ = dashboard.studies(url)
    published = dashboard.publish(url, st, "iris-small")
    assert published == dashboard.Published("iris-small", 3, 2, True)
    attrs = st.get_study_system_attrs(st.get_study_id_from_name("iris-small"))
    for key in ("cv-scores", "gap-vs-size", "top-curves"):
        figure = "".join(v for k, v in sorted(attrs.items()) if f":selector-{key}:" in k)
        assert json.loads(figure)["data"], key  # figure chunks concatenate to plotly JSON
    assert all(note.startswith("### Trial") for note in _trial_notes(url).values())
    s = optuna.load_study(study_name="iris-small", storage=url)
    assert "**Test set** sealed" in get_note(s)
    assert dashboard.publish(url, st, "iris-small").study_note is False  # nothing changed
    result = final.evaluate(url, "iris-small").result
    dashboard.publish(url, st, "iris-small")
    assert f"accuracy = {result.test_score:.4f} on 30 rows" in get_note(s)


def test_a_notes_label_is_its_whole_bodys_heading(url: str) -> None:
    """Read from the note's first chunk by key (a scan of every study system attr for each
    trial took the dashboard's start 5 s at 4,800 trials): the same heading as the whole body's,
    for notes over several chunks, rewritten shorter, without a heading, and none."""
    s = optuna.create_study(study_name="notes", storage=url)
    bodies = [
        "### Trial 0: overfit\n" + "x" * 5000,  # three chunks
        "### Trial 1: good fit\n" + "y" * 3000,
        "a note someone wrote",
        None,
    ]
    for body in bodies:
        trial = s.ask()
        if body is not None:
            save_note(trial, body)
        s.tell(trial, 1.0)
    save_note(optuna.Trial(s, s.trials[1]._trial_id), "### Trial 1: underfit\nshorter")
    system = s._storage.get_study_system_attrs(s._study_id)
    labels = [notes.note_label(system, t._trial_id) for t in s.trials]
    assert labels == ["overfit", "underfit", None, None]
    for t, label in zip(s.trials, labels, strict=True):
        first = get_note(optuna.Trial(s, t._trial_id)).split("\n", 1)[0]
        assert (first.split(": ", 1)[1] if first.startswith("### Trial") else None) == label


def test_a_note_written_from_attrs_read_once_is_what_save_note_writes(url: str) -> None:
    """`notes.note_attrs` + one upsert write what optuna-dashboard's `save_note` writes (which
    reads every study attr twice a note: 0.5 s a note beside 4,800 trials), over a note's
    versions: longer, shorter (older chunks cleared), longer again."""
    bodies = ["### Trial 0: overfit\n" + "x" * 5000, "### Trial 0: good fit\nshort", "y" * 2500]
    store = storage.open_storage(url, must_exist=False)
    written = {}
    for how in ("save_note", "note_attrs"):
        s = optuna.create_study(study_name=how, storage=store)
        trial = s.ask()
        for body in bodies:
            if how == "save_note":
                save_note(trial, body)
            else:
                system = store.get_study_system_attrs(s._study_id)
                attrs = notes.note_attrs(system, trial._trial_id, body)
                assert attrs is not None
                storage.write_study_system_attrs(store, s._study_id, attrs)
            assert get_note(trial) == body
        own = f"dashboard:{trial._trial_id}:"
        written[how] = {
            k.replace(own, "dashboard:T:"): v
            for k, v in store.get_study_system_attrs(s._study_id).items()
            if k.startswith(own)
        }
    assert written["note_attrs"] == written["save_note"]
    assert written["save_note"]["dashboard:T:note_ver"] == 3


def test_a_trial_note_is_rewritten_when_its_diagnosis_changes(ran: str) -> None:
    st, _ = dashboard.studies(ran)
    dashboard.publish(ran, st, "iris-small")
    shown, now = _labels(ran)
    assert shown == now  # every note shows the diagnosis against the study now
    s = optuna.load_study(
        study_name="iris-small", storage=st, sampler=optuna.samplers.RandomSampler()
    )
    trial = s.trials[0]
    before = _trial_notes(ran)[trial.number]
    figure = before[before.index("![learning curves") :].split("\n")[0]
    # as if written when the study stood elsewhere: another label than the one now
    other = next(f for f in diagnose.FITS if not now[trial.number].startswith(f))
    notes.annotate_finished(s, trial, diagnose.Diagnosis(other, "healthy", False))
    assert _labels(ran)[0][trial.number] == other
    assert dashboard.publish(ran, st, "iris-small").trial_notes == 1
    after = _trial_notes(ran)[trial.number]
    assert after.startswith(f"### Trial {trial.number}: {now[trial.number]}\n")
    assert figure in after  # the figure stays
    assert _labels(ran)[0] == now
    assert dashboard.publish(ran, st, "iris-small").trial_notes == 0


def test_a_study_note_edited_by_someone_is_left_alone(ran: str) -> None:
    st, _ = dashboard.studies(ran)
    s = optuna.load_study(study_name="iris-small", storage=ran)
    save_note(s, "my own notes")
    dashboard.publish(ran, st, "iris-small")
    assert get_note(s) == "my own notes"


# --- the command -----------------------------------------------------------------------------


def test_dashboard_command_serves_the_study_until_ctrl_c(
    shared: tuple[str, Path], tmp_path: Path
) -> None:
    ran, port = shared[0], free_port()
    relabel = _relabelled(ran)  # notes whose trial's diagnosis changed since they were written
    errors = (tmp_path / "stderr").open("w+")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "selector",
            "dashboard",
            "iris-small",
            "--storage",
            ran,
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert f"study 'iris-small': 3 figures, {relabel} trial notes written" in lines[0], lines
        assert f"at http://127.0.0.1:{port}/dashboard/studies/1 (Ctrl-C stops)" in lines[1]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=10) as r:
            summaries = json.load(r)["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["iris-small"]
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "dashboard stopped" in out
    errors.seek(0)
    assert "Traceback" not in errors.read()


def test_refresher_publishes_only_what_changed(ran: str) -> None:
    st, names = dashboard.studies(ran)
    refresher = dashboard.Refresher(ran, st, names, every=0.05)
    assert [p.study for p in refresher.publish_changed()] == ["iris-small"]
    assert refresher.publish_changed() == []
    final.evaluate(ran, "iris-small")
    refresher.start()
    deadline = time.monotonic() + 10
    s = optuna.load_study(study_name="iris-small", storage=ran)
    while "evaluated at" not in get_note(s) and time.monotonic() < deadline:
        time.sleep(0.05)
    refresher.stopped.set()
    assert "evaluated at" in get_note(s)


@pytest.mark.postgres
def test_notes_figures_report_and_predict_on_postgresql_with_a_bare_url(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bare postgresql:// URL goes through selector.storage (psycopg2), for every new command."""
    bare = pg_url.replace("postgresql+psycopg2://", "postgresql://")
    monkeypatch.chdir(tmp_path)  # the final model goes to ./selector-artifacts without a file db
    study.run(spec.parse(small_raw(n_trials=2), origin="t.toml"), bare)
    assert all(
        n.startswith("### Trial") and "/artifacts/" not in n for n in _trial_notes(bare).values()
    )
    st, _ = dashboard.studies(bare)
    relabel = _relabelled(bare)
    assert dashboard.publish(bare, st, "iris-small") == dashboard.Published(
        "iris-small", 3, relabel, True
    )
    assert _relabelled(bare) == 0
    assert _sel("report", "iris-small", "--storage", bare, "-o", "r.html")[0] == 0
    code, out = _sel("final", "iris-small", "--storage", bare)
    assert code == 0, out
    from sklearn.datasets import load_iris

    load_iris(as_frame=True).frame.to_csv("rows.csv", index=False)
    code, out = _sel("predict", "iris-small", "rows.csv", "--storage", bare, "-o", "p.csv")
    assert code == 0 and "accuracy = " in out and "on 150 rows" in out, out
