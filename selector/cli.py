"""The `selector` command line. Each command calls one function; a `SelectorError` becomes one
message on stderr and its exit code (2 bad input, 1 refused by a rule), never a traceback."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

try:  # typer vendors click since 0.25
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import UsageError  # type: ignore[no-redef]

from selector.errors import SelectorError
from selector.interrupt import Terminated, deferred, exit_code
from selector.redact import scrub

app = typer.Typer(
    name="selector",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Hyperparameter search and model selection for PyTorch MLPs on tabular data.",
)

StorageOpt = Annotated[
    str | None,
    typer.Option(
        "--storage",
        help="Database URL "
        "(default: $SELECTOR_STORAGE, the study file's `storage`, sqlite:///selector.db)",
    ),
]
StudyArg = Annotated[str, typer.Argument(help="Study name, or a study file (.toml)")]
T = TypeVar("T")


def _err(msg: str) -> None:
    typer.echo(msg, err=True)


def guarded(fn: Callable[[], T]) -> T:
    """Run a command body: selector errors → message (any secret in it masked) + exit code;
    Ctrl-C → exit 130; SIGTERM (where the command defers it, `interrupt.deferred`) → exit 143.
    One line on stderr each."""
    try:
        return fn()
    except SelectorError as e:
        for line in str(e).splitlines():  # a URL or secret `key=value` in it is masked
            _err(f"selector: {scrub(line)}")
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt as e:
        stopped = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        _err(f"selector: {stopped}; finished trials are kept, run again to resume")
        raise typer.Exit(exit_code(e)) from None


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)


def _study_target(study: str, storage_opt: str | None) -> tuple[str, str]:
    """(study name, storage URL) from a study name or a study file."""
    from selector import spec, storage

    if study.endswith(".toml") or Path(study).is_file():
        s = spec.load(study)
        return s.name, storage.resolve_url(storage_opt, s.storage)
    return study, storage.resolve_url(storage_opt)


@app.command()
def create(
    study_file: Annotated[Path, typer.Argument(help="Study file (.toml)")],
    storage: StorageOpt = None,
) -> None:
    """Validate the study file and data, hold back the test set, record the study; run no trial."""

    def body() -> None:
        from selector import spec
        from selector import storage as st

        s = spec.load(study_file)  # before torch is imported: a bad file is refused at once
        from selector import study

        _quiet_optuna()
        url = st.resolve_url(storage, s.storage)
        _, prep, _ = study.create_or_resume(s, url)
        for note in prep.notes:
            typer.echo(f"note: {note}")
        typer.echo(
            f"study {s.name!r} ready in {st.mask(url)}: {len(prep.dev)} dev rows in "
            f"{len(prep.folds)} folds, {len(prep.test)} test rows held back"
        )

    guarded(body)


NTrialsOpt = Annotated[
    int | None,
    typer.Option(
        "--n-trials", min=1, help="Run at most N trials now (never past the study's n_trials)"
    ),
]
TimeoutOpt = Annotated[
    float | None, typer.Option("--timeout", min=0.0, help="Stop starting trials after S seconds")
]
HeartbeatOpt = Annotated[
    int, typer.Option("--heartbeat", min=1, help="Seconds between a running trial's heartbeats")
]
GraceOpt = Annotated[
    int,
    typer.Option(
        "--grace",
        min=1,
        help="Seconds of silence after which a running trial is "
        "stale: failed and retried once (keep it far above the longest epoch)",
    ),
]


ThreadsOpt = Annotated[
    int | None,
    typer.Option(
        "--threads",
        min=1,
        help="Torch threads per worker (default: cores / workers; at most 4 x the cores)",
    ),
]
# More torch threads than this many per core are refused: each worker would oversubscribe the
# machine (a typo such as --threads 400 slows every trial to a crawl) and gains nothing.
MAX_THREADS_PER_CORE = 4


def _check_threads(threads: int | None) -> None:
    cores = os.cpu_count() or 1
    if threads is not None and threads > MAX_THREADS_PER_CORE * cores:
        raise SelectorError(
            f"--threads {threads}: more than {MAX_THREADS_PER_CORE} x the {cores} cores of this "
            f"machine; use at most {MAX_THREADS_PER_CORE * cores}, or leave it out (the cores "
            "are shared among the workers)"
        )


def _heartbeat(interval: int, grace: int) -> Any:
    from selector.storage import Heartbeat

    if grace <= interval:
        raise SelectorError(f"--grace ({grace}) must be longer than --heartbeat ({interval})")
    return Heartbeat(interval=interval, grace=grace)


def _report_run(summary: Any) -> None:
    best = (
        "no complete trial"
        if summary.best_value is None
        else f"best {summary.metric} = {summary.best_value:.4f} (trial {summary.best_trial})"
    )
    total = summary.n_trials or summary.budget
    now = f" ({summary.ran} in this run)" if summary.ran != summary.finished else ""
    typer.echo(f"study {summary.study!r}: {summary.finished}/{total} trials finished{now}; {best}")


@app.command()
def run(
    study_file: Annotated[Path, typer.Argument(help="Study file (.toml)")],
    storage: StorageOpt = None,
    n_trials: NTrialsOpt = None,
    timeout: TimeoutOpt = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            min=1,
            help="Local worker processes, the cores shared out (default: one per core, 1 thread "
            "each, on the CPU; 4 sharing a GPU; --workers 1 repeats a run exactly)",
        ),
    ] = None,
    threads: ThreadsOpt = None,
    heartbeat: HeartbeatOpt = 10,
    grace: GraceOpt = 120,
) -> None:
    """Create or resume the study and run trials until its n_trials are finished."""

    def body() -> None:
        from selector import spec
        from selector import storage as st

        _check_threads(threads)
        s = spec.load(study_file)
        from selector import launch, progress, study, worker

        _quiet_optuna()
        url = st.resolve_url(storage, s.storage)
        hb = _heartbeat(heartbeat, grace)
        n_workers = workers or worker.default_workers(s, n_trials)
        with progress.Bar(s.n_trials) as bar:
            if n_workers == 1:
                worker.use_threads(threads or worker.torch_threads(1))
                summary = study.run(
                    s,
                    url,
                    n_trials=n_trials,
                    timeout=timeout,
                    heartbeat=hb,
                    progress=bar.update,
                )
            else:
                summary = launch.run(
                    s,
                    url,
                    workers=n_workers,
                    n_trials=n_trials,
                    timeout=timeout,
                    heartbeat=hb,
                    threads=threads,  # None: the cores shared out among the workers started
                    progress=bar.update,
                )
        _report_run(summary)

    guarded(lambda: _deferring(body))


def _deferring(body: Callable[[], None]) -> None:
    """A command that runs trials: SIGINT and SIGTERM, from its start, stop it at a safe point."""
    with deferred():
        body()


@app.command()
def worker(
    study: Annotated[str, typer.Argument(help="Name of an existing study")],
    storage: StorageOpt = None,
    n_trials: NTrialsOpt = None,
    timeout: TimeoutOpt = None,
    data: Annotated[
        Path | None,
        typer.Option("--data", help="Where the study's data file is on this machine"),
    ] = None,
    threads: ThreadsOpt = None,
    heartbeat: HeartbeatOpt = 10,
    grace: GraceOpt = 120,
) -> None:
    """Join an existing study from any machine and run trials until its budget is spent."""

    def body() -> None:
        from selector import progress
        from selector import storage as st
        from selector import study as st_study
        from selector import worker as wk

        _check_threads(threads)
        _quiet_optuna()
        url = st.resolve_url(storage)
        hb = _heartbeat(heartbeat, grace)
        if threads is not None:
            wk.use_threads(threads)
        with progress.Bar(None) as bar:
            summary = st_study.work(
                url,
                study,
                data_path=str(data) if data else None,
                n_trials=n_trials,
                timeout=timeout,
                heartbeat=hb,
                progress=bar.update,
            )
        _report_run(summary)

    guarded(lambda: _deferring(body))


@app.command()
def proxy(
    storage: Annotated[str, typer.Option("--storage", help="The database the proxy serves")],
    host: Annotated[str, typer.Option(help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 13000,
) -> None:
    """Serve a PostgreSQL or SQLite storage to many workers over gRPC (grpc://HOST:PORT)."""

    def body() -> None:
        import optuna

        from selector import storage as st

        url = st.resolve_url(storage)
        if st.is_grpc(url):
            raise SelectorError("--storage: the proxy serves a database, not another proxy")
        store = st.open_storage(url, must_exist=True)
        typer.echo(f"serving {st.mask(url)} at grpc://{host}:{port} (Ctrl-C stops)")
        try:
            optuna.storages.run_grpc_proxy_server(store, host=host, port=port)
        except ImportError:
            raise SelectorError(
                "the gRPC server is not installed; pip install 'selector[grpc]'"
            ) from None

    guarded(body)


JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON")]


@app.command()
def status(
    study: StudyArg,
    storage: StorageOpt = None,
    as_json: JsonOpt = False,
    top: Annotated[int, typer.Option(min=0, help="How many top trials to list")] = 5,
) -> None:
    """Show a study's progress, best trials, its choice with the expected test score, and the
    test set's state. Reads only: a stale trial is left for the workers to reap."""

    def body() -> None:
        from selector import summary

        _quiet_optuna()
        name, url = _study_target(study, storage)
        info = summary.status(url, name)
        typer.echo(
            json.dumps(info.as_dict(top), indent=2, default=str)
            if as_json
            else summary.status_text(info, top)
        )

    guarded(body)


@app.command()
def studies(storage: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """List the studies in a storage."""

    def body() -> None:
        from selector import storage as st
        from selector import summary

        _quiet_optuna()
        url = st.resolve_url(storage)
        rows = summary.studies(url)
        typer.echo(
            json.dumps(rows, indent=2, default=str) if as_json else summary.studies_text(rows)
        )

    guarded(body)


RuleOpt = Annotated[
    str | None,
    typer.Option(
        "--rule",
        help="How to choose the trial — best: the highest mean CV score; one-se: the simplest "
        "trial (fewest parameters, then epochs) within one standard error of the best "
        "(default: the study's recorded choice, else best)",
    ),
]


@app.command()
def export(
    study: StudyArg,
    storage: StorageOpt = None,
    rule: RuleOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="json | yaml | toml")] = "json",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File to write")] = None,
) -> None:
    """Export the chosen config with its CV scores, expected test score and provenance; records
    the choice, which `selector final` then evaluates."""

    def body() -> None:
        from selector import export as ex
        from selector import record, selection

        _check_choice("--rule", rule, selection.RULES)
        _check_choice("--format", fmt, ex.FORMATS)
        if output is not None:  # before the choice is recorded: a bad -o changes nothing
            _check_output(output)
        _quiet_optuna()
        name, url = _study_target(study, storage)
        s, rec = record.open_study(url, name)
        records = record.trials(s)
        choice = ex.choose_for_export(url, name, records, rule)  # type: ignore[arg-type]
        estimate = selection.estimate(url, rec, records, choice.rule)
        text = ex.dump(ex.document(s, rec, url, choice, records, estimate), fmt)  # type: ignore[arg-type]
        if output is None:
            typer.echo(text, nl=False)
        else:
            try:
                output.write_text(text)
            except OSError as e:
                raise SelectorError(
                    f"{output}: cannot write the export ({e.strerror or e})"
                ) from None
            typer.echo(f"wrote {output}: {choice.describe()}")

    guarded(body)


def _check_output(path: Path) -> None:
    """`-o` must name a file in an existing directory."""
    if path.is_dir():
        raise SelectorError(f"{path}: is a directory; give -o a file name")
    if not path.parent.is_dir():
        raise SelectorError(f"{path}: directory {path.parent} does not exist; create it first")


def _check_choice(option: str, value: str | None, allowed: tuple[str, ...]) -> None:
    if value is not None and value not in allowed:
        raise SelectorError(f"{option}: unknown value {value!r}; use one of {', '.join(allowed)}")


@app.command("final")
def final_cmd(
    study: StudyArg,
    storage: StorageOpt = None,
    rule: RuleOpt = None,
    early: Annotated[
        bool,
        typer.Option(
            "--early",
            help="Evaluate before the study's n_trials are finished (the study is sealed: it "
            "runs no more trials)",
        ),
    ] = False,
    as_json: JsonOpt = False,
    resume_crashed: Annotated[
        bool,
        typer.Option(
            "--resume-crashed",
            help="Finish an evaluation whose process died after claiming the test set (recorded)",
        ),
    ] = False,
) -> None:
    """Evaluate the held-out test set, once per study: the recorded choice (or --rule's) is
    refit on all dev rows and scored; the study is sealed."""

    def body() -> None:
        from selector import final, record, selection

        _check_choice("--rule", rule, selection.RULES)
        _quiet_optuna()
        name, url = _study_target(study, storage)
        try:
            done = final.evaluate(
                url,
                name,
                rule,  # type: ignore[arg-type]
                early=early,
                resume_crashed=resume_crashed,
            )
        except SelectorError as e:
            prev = record.stored_final(url, name) if e.exit_code == 1 else None
            if prev is not None and as_json:
                typer.echo(json.dumps(prev.as_dict(), indent=2))
            raise
        result = done.result
        if as_json:
            typer.echo(json.dumps({**result.as_dict(), "choice": done.choice.as_dict()}, indent=2))
            return
        typer.echo(
            f"study {name!r}: {done.choice.describe()}: CV {result.metric} = {result.cv_score:.4f}"
        )
        if done.remark:
            typer.echo(f"note: {done.remark}")
        typer.echo(
            f"test {result.metric} = {result.test_score:.4f} on {result.test_rows} held-out "
            f"rows (evaluated once; the study is sealed; model saved in {result.artifact})"
        )

    guarded(body)


@app.command()
def report(
    study: StudyArg,
    storage: StorageOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="HTML file to write")] = Path(
        "report.html"
    ),
) -> None:
    """Write a self-contained HTML report: summary, top trials, diagnosis, figures, config."""

    def body() -> None:
        from selector import report as rp

        _quiet_optuna()
        name, url = _study_target(study, storage)
        w = rp.write(url, name, output)
        typer.echo(
            f"wrote {w.path}: {w.bytes / 1e6:.1f} MB, {w.trials} trials, {w.figures} figures "
            f"({w.seconds:.1f} s)"
        )

    guarded(body)


@app.command()
def dashboard(
    study: Annotated[
        str | None,
        typer.Argument(help="Study name or study file: its storage, and the page to open"),
    ] = None,
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option(help="Address to bind (127.0.0.1: this machine only)")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on")] = 8080,
    refresh: Annotated[
        float,
        typer.Option(min=0.0, help="Seconds between refreshes of selector's figures (0: never)"),
    ] = 30.0,
) -> None:
    """Start optuna-dashboard on the study's storage, with selector's figures and notes."""

    def body() -> None:
        from selector import dashboard as dash
        from selector import storage as st

        _quiet_optuna()
        name, url = (
            (None, st.resolve_url(storage)) if study is None else _study_target(study, storage)
        )
        warning = dash.exposure_warning(host)
        if warning:
            _err(f"selector: {warning}")
        dash.serve(url, host=host, port=port, only=name, refresh=refresh, echo=typer.echo)

    guarded(body)


@app.command()
def predict(
    study: StudyArg,
    data_file: Annotated[Path, typer.Argument(help="CSV or Parquet file with the feature columns")],
    storage: StorageOpt = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="CSV file to write")] = Path(
        "predictions.csv"
    ),
) -> None:
    """Apply the final model (saved by `selector final`) to new rows."""

    def body() -> None:
        from selector import predict as pr

        _quiet_optuna()
        name, url = _study_target(study, storage)
        result = pr.predict_file(url, name, data_file)
        pr.write(result, output)
        for line in pr.describe(result, output):
            typer.echo(line)

    guarded(body)


@app.command()
def replay(
    study: StudyArg,
    trial: Annotated[int, typer.Argument(help="Trial number", min=0)],
    storage: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-run one trial from its stored params and seed; exit 1 if its fold scores differ."""

    def body() -> None:
        from selector import replay as rp

        _quiet_optuna()
        name, url = _study_target(study, storage)
        r = rp.replay(url, name, trial)
        if as_json:
            typer.echo(json.dumps(r.as_dict(), indent=2))
        else:
            typer.echo(f"trial {r.trial} ({r.state}) of {r.study!r}")
            typer.echo("  stored    " + " ".join(f"{x:.4f}" for x in r.stored))
            typer.echo("  replayed  " + " ".join(f"{x:.4f}" for x in r.replayed))
            verdict = "identical" if r.identical else f"DIFFERENT (max {r.max_difference:.2e})"
            typer.echo(f"  {verdict}")
        if not r.identical:
            raise typer.Exit(1)

    guarded(body)


def main(argv: list[str] | None = None) -> None:
    """The console script: usage errors too become one `selector:` line and exit code 2."""
    args = (argv if argv is not None else sys.argv[1:]) or ["--help"]
    try:
        code = app(args=args, prog_name="selector", standalone_mode=False)
    except UsageError as e:
        name = e.ctx.command.name if e.ctx else None
        where = f"selector {name}" if name and name != "selector" else "selector"
        _err(f"selector: {e.format_message()} (see `{where} --help`)")
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
