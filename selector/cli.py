"""The `selector` command line. Each command calls one function; a `SelectorError` becomes one
message on stderr and its exit code (2 bad input, 1 refused by a rule), never a traceback."""

from __future__ import annotations

import inspect
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
from typer.models import CommandFunctionType

try:  # typer vendors click since 0.25
    from typer._click import Context, Parameter
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover
    from click import Context, Parameter  # type: ignore[no-redef,assignment]
    from click.exceptions import UsageError  # type: ignore[no-redef]

from selector import __version__, metrics
from selector.errors import BudgetSpent, SelectorError
from selector.interrupt import Terminated, deferred, exit_code
from selector.redact import scrub


def _plain(params: list[Parameter]) -> list[Parameter]:
    """Help as a person reads it: a flag without a value placeholder (`--json`, not
    `--json <bool>`), an argument by its name in capitals (`STUDY`, not `{study}`)."""
    for p in params:
        if isinstance(p, TyperArgument) and p.metavar is None and p.name:
            p.metavar = p.name.upper()
        elif isinstance(p, TyperOption) and p.is_flag and p.metavar is None:
            p.metavar = ""
    return params


def _usage(p: Parameter) -> str:
    name = str(p.metavar or p.name or "").upper()
    name = name if p.required else f"[{name}]"
    return name + ("..." if p.nargs != 1 else "")


class _Command(TyperCommand):
    """A command whose help and usage line show flags and arguments plainly (`_plain`)."""

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _plain(super().get_params(ctx))

    def collect_usage_pieces(self, ctx: Context) -> list[str]:
        args = [_usage(p) for p in self.get_params(ctx) if isinstance(p, TyperArgument)]
        return [self.options_metavar, *args] if self.options_metavar else args


class _Group(TyperGroup):
    """The `selector` group: `--help` and `--version` shown as the flags they are."""

    def get_params(self, ctx: Context) -> list[Parameter]:
        return _plain(super().get_params(ctx))


class _App(typer.Typer):
    """Every command of the app is a `_Command`, listed in `selector --help` by its docstring's
    first paragraph as one line of text (rich help keeps a docstring's line breaks there)."""

    def command(  # type: ignore[override]
        self, *args: Any, **kwargs: Any
    ) -> Callable[[CommandFunctionType], CommandFunctionType]:
        kwargs.setdefault("cls", _Command)

        def register(f: CommandFunctionType) -> CommandFunctionType:
            first = inspect.cleandoc(f.__doc__ or "").split("\n\n")[0]
            options = {"short_help": " ".join(first.split()), **kwargs}
            return typer.Typer.command(self, *args, **options)(f)

        return register


app = _App(
    name="selector",
    cls=_Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Hyperparameter search and model selection for PyTorch MLPs on tabular data.",
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"selector {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Print the version and exit"
        ),
    ] = False,
) -> None:
    """Hyperparameter search and model selection for PyTorch MLPs on tabular data."""


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
    """(study name, storage URL) from a study name or a study file, as the API resolves them."""
    from selector import api

    name, url, _ = api.resolve(study, storage_opt)
    return name, url


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


def _heartbeat(interval: int, grace: int) -> Any:
    from selector.storage import Heartbeat

    if grace <= interval:
        raise SelectorError(f"--grace ({grace}) must be longer than --heartbeat ({interval})")
    return Heartbeat(interval=interval, grace=grace)


def _report_run(summary: Any) -> None:
    best = (
        "no complete trial"
        if summary.best_value is None
        else f"best {metrics.shown(summary.metric, summary.best_value)} (trial {summary.best_trial})"
    )
    total = summary.n_trials or summary.budget
    now = f" ({summary.ran} in this run)" if summary.ran != summary.finished else ""
    for note in summary.data_notes:  # as `create` prints them: a run may create the study
        typer.echo(f"note: {note}")
    typer.echo(f"study {summary.study!r}: {summary.finished}/{total} trials finished{now}; {best}")


def _run_then_report(
    trials: Callable[[], Any], *, strict: bool, study: tuple[str, str] | None = None
) -> None:
    """Run trials and print the run's summary. A study whose n_trials are all finished has
    nothing to do: one line saying so and exit 0, so that a script may run it again at will;
    with --strict the refusal, exit 1. (A sealed study is refused either way.) Stopped by
    Ctrl-C or SIGTERM, where the study `(url, name)` stands."""
    try:
        summary = trials()
    except BudgetSpent as e:
        if strict:
            raise
        typer.echo(e.nothing_to_do)
        return
    except KeyboardInterrupt:
        if study is not None:
            _report_stopped(*study)
        raise
    _report_run(summary)


def _report_stopped(url: str, name: str) -> None:
    """The study's count when a run stops early: the progress lines of trials that ended with
    the stop may not have been printed. Never hides the stop itself."""
    from optuna.trial import TrialState

    from selector import record

    try:
        counts = record.state_counts(url, name)
        rec = record.find_record(url, name)
    except Exception:
        return
    finished = counts[TrialState.COMPLETE] + counts[TrialState.PRUNED]
    total = f"/{rec.n_trials}" if rec is not None else ""
    typer.echo(
        f"study {name!r}: {finished}{total} trials finished when the run stopped "
        f"({counts[TrialState.FAIL]} failed in all)"
    )


StrictOpt = Annotated[
    bool,
    typer.Option(
        "--strict",
        help="Exit 1 when the study's n_trials are all finished already (default: say there is "
        "nothing to do and exit 0)",
    ),
]


FuseOpt = Annotated[
    str | None,
    typer.Option(
        "--fuse",
        help="The most trials trained together as one fused model: a number (1: one trial at a "
        "time) or 'auto' (from a memory estimate and the measured cost of a step); default: the "
        "study file's [search] fuse, 'auto' unless set",
    ),
]


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
    strict: StrictOpt = False,
    fuse: FuseOpt = None,
) -> None:
    """Create or resume the study and run trials until its n_trials are finished."""

    def body() -> None:
        from selector import api, spec
        from selector import storage as st

        api.check_threads(threads, "--threads")
        fused = spec.fuse_setting(fuse, "--fuse")
        s = spec.load(study_file)
        _quiet_optuna()
        url = st.resolve_url(storage, s.storage)
        hb = _heartbeat(heartbeat, grace)

        def trials() -> Any:  # workers, threads, progress: as the Python API runs a study
            return api.run(
                s,
                storage=url,
                n_trials=n_trials,
                timeout=timeout,
                workers=workers,
                threads=threads,
                heartbeat=hb,
                fuse=fused,
            )

        _run_then_report(trials, strict=strict, study=(url, s.name))

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
    strict: StrictOpt = False,
    fuse: FuseOpt = None,
) -> None:
    """Join an existing study from any machine and run trials until its budget is spent."""

    def body() -> None:
        from selector import api, progress, spec
        from selector import storage as st
        from selector import study as st_study
        from selector import worker as wk

        api.check_threads(threads, "--threads")
        fused = spec.fuse_setting(fuse, "--fuse")
        _quiet_optuna()
        url = st.resolve_url(storage)
        hb = _heartbeat(heartbeat, grace)
        if threads is not None:
            wk.use_threads(threads)

        def trials() -> Any:
            with progress.Bar(None) as bar:
                return st_study.work(
                    url,
                    study,
                    data_path=str(data) if data else None,
                    n_trials=n_trials,
                    timeout=timeout,
                    heartbeat=hb,
                    progress=bar,
                    fuse=fused,
                )

        _run_then_report(trials, strict=strict, study=(url, study))

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
        from selector import api, summary

        _quiet_optuna()
        info = api.status(study, storage=storage)
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
        metavar="best|one-se",
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
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            metavar="json|yaml|toml",
            help="Default: from the -o file's extension (.json, .yaml or .yml, .toml); else json",
        ),
    ] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="File to write")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="onnx: write the final model (saved by `selector final`) as one ONNX graph, "
            "preprocessing included, instead of the config (needs -o)",
        ),
    ] = None,
) -> None:
    """Export the chosen config with its CV scores, expected test score and provenance; records
    the choice, which `selector final` then evaluates. With --model onnx: the final model."""

    def body() -> None:
        if model is not None:
            _export_model(study, storage, model, rule, output)
            return
        from selector import api, selection
        from selector import export as ex

        _check_choice("--rule", rule, selection.RULES)
        _check_choice("--format", fmt, ex.FORMATS)
        kind = ex.format_for(fmt, output)  # type: ignore[arg-type]
        if output is not None:  # before the choice is recorded: a bad -o changes nothing
            _check_output(output)
        _quiet_optuna()
        doc = api.export(study, storage=storage, rule=rule, path=output, format=kind)  # type: ignore[arg-type]
        if output is None:
            typer.echo(ex.dump(doc, kind), nl=False)
        else:
            typer.echo(f"wrote {output}: {doc['chosen']}")

    guarded(body)


MODEL_FORMATS = ("onnx",)


def _export_model(
    study: str, storage: str | None, kind: str, rule: str | None, output: Path | None
) -> None:
    """`export --model onnx`: the model `selector final` saved, as one ONNX file."""
    _check_choice("--model", kind, MODEL_FORMATS)
    if rule is not None:
        raise SelectorError(
            "--rule: --model exports the model `selector final` evaluated, whose trial is "
            "chosen already; leave --rule out"
        )
    if output is None:
        raise SelectorError(
            f"--model {kind} writes a binary file: give it -o FILE (e.g. -o model.onnx)"
        )
    _check_output(output)
    from selector import api, onnx_export

    _quiet_optuna()
    name, url = _study_target(study, storage)
    for line in onnx_export.describe(api.export_onnx(name, output, storage=url)):
        typer.echo(line)


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
        from selector import final, progress, record, selection

        _check_choice("--rule", rule, selection.RULES)
        _quiet_optuna()
        name, url = _study_target(study, storage)
        try:
            with progress.RefitBar() as bar:
                done = final.evaluate(
                    url,
                    name,
                    rule,  # type: ignore[arg-type]
                    early=early,
                    resume_crashed=resume_crashed,
                    progress=bar,
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
            f"study {name!r}: {done.choice.describe()}: "
            f"CV {metrics.shown(result.metric, result.cv_score)}"
        )
        if done.remark:
            typer.echo(f"note: {done.remark}")
        typer.echo(
            f"test {metrics.shown(result.metric, result.test_score)} on {result.test_rows} "
            f"held-out rows (evaluated once; the study is sealed; model saved in {result.artifact})"
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
        started = time.perf_counter()  # the seconds printed are the command's, imports included
        if sys.stderr.isatty():
            _err(f"writing {output}...")
        from selector import report as rp

        _quiet_optuna()
        name, url = _study_target(study, storage)
        w = rp.write(url, name, output)
        typer.echo(
            f"wrote {w.path}: {w.bytes / 1e6:.1f} MB, {w.trials} trials, {w.figures} figures "
            f"({time.perf_counter() - started:.1f} s)"
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
    with_input: Annotated[
        bool,
        typer.Option(
            "--with-input",
            help="Write every input column too, between `row` and the predictions",
        ),
    ] = False,
) -> None:
    """Apply the final model (saved by `selector final`) to new rows. The CSV starts with `row`,
    the input row's position (0-based), to join the predictions back on."""

    def body() -> None:
        from selector import predict as pr

        _quiet_optuna()
        name, url = _study_target(study, storage)
        result = pr.predict_file(url, name, data_file, with_input=with_input)
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


@app.command("learning-curve")
def learning_curve(
    study: StudyArg,
    storage: StorageOpt = None,
    sizes: Annotated[
        str,
        typer.Option(
            "--sizes",
            help="Shares of each fold's training rows to train on, comma-separated, in (0, 1] "
            "(the validation rows stay whole)",
        ),
    ] = "0.1,0.25,0.5,0.75,1.0",
    as_json: JsonOpt = False,
) -> None:
    """Cross-validate the chosen trial's config on growing shares of each fold's training rows
    and record the curve in the study (the report shows it): would more data help? Dev rows
    only; the test set stays sealed."""

    def body() -> None:
        from selector import api, learning

        shares = learning.parse_sizes(sizes)  # a bad --sizes is refused before anything is read
        _quiet_optuna()
        name, url = _study_target(study, storage)
        curve = api.learning_curve(name, shares, storage=url)
        typer.echo(json.dumps(curve.as_dict(), indent=2) if as_json else learning.text(curve))

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
