"""Figures of a study (plotly) and a self-contained HTML report.

The report is one file that needs no network: plotly.js is inlined (gzip + base64, about 1.5 MB
instead of 4.8 MB, unpacked by the browser's DecompressionStream) and every figure's data is
embedded as JSON. It reads the database only.

`study_figures` are also what `selector dashboard` publishes to optuna-dashboard: the CV score of
each trial with its fold spread, the generalization gap against model size, and the learning curves
of the top trials.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import gzip
import html
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import FrozenTrial
from plotly.subplots import make_subplots

from selector import __version__, export, learning, metrics, record, summary
from selector.errors import SelectorError
from selector.learning import LearningCurve
from selector.record import StudyRecord
from selector.summary import StudyStatus, TrialView

TOP_CURVES = 5
TOP_ROWS = 10
COLORS = {
    "good fit": "#2ca02c",
    "overfit": "#d62728",
    "underfit": "#ff7f0e",
    "not learning": "#7f7f7f",
    "too noisy to tell": "#9467bd",
}
LAYOUT: dict[str, Any] = {"template": "plotly_white", "height": 420, "margin": {"t": 60}}


def _r(values: list[float], digits: int = 5) -> list[float | None]:
    """Rounded for a smaller file; non-finite values become gaps."""
    return [round(v, digits) if v is not None and math.isfinite(v) else None for v in values]


# --- figures ---------------------------------------------------------------------------------


def _fit(v: TrialView) -> str:
    return v.diagnosis.fit if v.diagnosis else "-"


def _by_fit(views: list[TrialView]) -> dict[str, list[TrialView]]:
    groups: dict[str, list[TrialView]] = {}
    for v in sorted(views, key=lambda v: v.record.number):
        groups.setdefault(_fit(v), []).append(v)
    return groups


def fig_cv_scores(views: list[TrialView], metric: str) -> go.Figure:
    fig = go.Figure()
    for label, group in _by_fit(views).items():
        fig.add_trace(
            go.Scatter(
                x=[v.record.number for v in group],
                y=_r([float(v.record.value) for v in group]),  # type: ignore[arg-type]
                error_y={"type": "data", "array": _r([v.record.cv_std for v in group])},
                mode="markers",
                name=label,
                marker={"color": COLORS.get(label, "#7f7f7f"), "size": 7},
                text=[_hover(v) for v in group],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        title="CV score per trial (error bars: standard deviation over folds)",
        xaxis_title="trial",
        yaxis_title=f"mean validation {metric}",
        **LAYOUT,
    )
    # trial numbers are whole: no ticks at 0.5 (plotly's choice for a few trials)
    last = max((v.record.number for v in views), default=0)
    fig.update_xaxes(tickformat="d", **({"dtick": 1} if last < 20 else {}))
    return fig


def _hover(v: TrialView) -> str:
    r = v.record
    return (
        f"trial {r.number}: {r.value:.4f} ± {r.cv_std:.4f}<br>"
        f"train {r.train_score:.4f}, gap {r.gap:+.4f}"
        f"<br>{v.diagnosis.label if v.diagnosis else '-'}<br>"
        f"{r.n_params or '-'} parameters"
    )


def fig_gap_vs_size(views: list[TrialView], metric: str) -> go.Figure:
    fig = go.Figure()
    for label, group in _by_fit(views).items():
        fig.add_trace(
            go.Scatter(
                x=[v.record.n_params for v in group],
                y=_r([v.record.gap for v in group]),
                mode="markers",
                name=label,
                marker={"color": COLORS.get(label, "#7f7f7f"), "size": 7},
                text=[_hover(v) for v in group],
                hoverinfo="text",
            )
        )
    fig.add_hline(y=0, line={"color": "#888", "dash": "dot"})
    fig.update_layout(
        title="Generalization gap (train − validation) against model size",
        xaxis={"title": "trainable parameters", "type": "log"},
        yaxis_title=f"gap in {metric}",
        **LAYOUT,
    )
    return fig


def fig_top_curves(views: list[TrialView], metric: str, top: int = TOP_CURVES) -> go.Figure:
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.62, 0.38],
        vertical_spacing=0.08,
        subplot_titles=(f"mean validation {metric}", "training loss (mean over folds)"),
    )
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
    for k, v in enumerate(views[:top]):
        r, color = v.record, palette[k % len(palette)]
        val = list(r.curves.val) if r.curves is not None else []
        loss = list(r.curves.loss) if r.curves is not None else []
        name = f"trial {r.number} ({r.value:.4f})"
        epochs = list(range(1, len(val) + 1))
        line = {"color": color}
        fig.add_trace(
            go.Scatter(x=epochs, y=_r(val), name=name, legendgroup=name, line=line, mode="lines"),
            row=1,
            col=1,
        )
        fig.add_trace(
            go.Scatter(
                x=list(range(1, len(loss) + 1)),
                y=_r(loss),
                name=name,
                legendgroup=name,
                showlegend=False,
                line={**line, "dash": "dot"},
                mode="lines",
            ),
            row=2,
            col=1,
        )
        best = r.best_epoch or 0
        if 0 < best <= len(val):
            fig.add_trace(
                go.Scatter(
                    x=[best],
                    y=_r([val[best - 1]]),
                    mode="markers",
                    marker={"color": color, "size": 10, "symbol": "star"},
                    name=f"{name}: best epoch",
                    legendgroup=name,
                    showlegend=False,
                ),
                row=1,
                col=1,
            )
    fig.update_xaxes(title_text="epoch", row=2, col=1)
    fig.update_layout(
        title=f"Learning curves of the top {min(top, len(views))} trials (star: best epoch)",
        **{**LAYOUT, "height": 520},
    )
    return fig


def fig_learning_curve(curve: LearningCurve) -> go.Figure:
    """Train and validation score of the chosen config against the training rows per fold,
    with the fold spread as error bars."""
    fig = go.Figure()
    rows = [p.rows for p in curve.points]
    for name, mean, std, color in (
        ("train", [p.train for p in curve.points], [p.train_std for p in curve.points], "#1f77b4"),
        ("validation", [p.val for p in curve.points], [p.val_std for p in curve.points], "#d62728"),
    ):
        fig.add_trace(
            go.Scatter(
                x=rows,
                y=_r(mean),
                error_y={"type": "data", "array": _r(std)},
                mode="lines+markers",
                name=name,
                line={"color": color},
                text=[f"{p.share:.0%} of the training rows" for p in curve.points],
            )
        )
    fig.update_layout(
        title=f"Learning curve of trial {curve.trial} (error bars: standard deviation over folds)",
        xaxis_title="training rows per fold",
        yaxis_title=f"mean {curve.metric}",
        **LAYOUT,
    )
    return fig


def study_figures(views: list[TrialView], metric: str) -> dict[str, go.Figure]:
    """selector's own figures (what optuna-dashboard lacks) of the complete trials, best first;
    empty before a complete trial."""
    if not views:
        return {}
    return {
        "cv-scores": fig_cv_scores(views, metric),
        "gap-vs-size": fig_gap_vs_size(views, metric),
        "top-curves": fig_top_curves(views, metric),
    }


class _Shared(optuna.Study):
    """A study as Optuna's figures read it: its trials not deep-copied at each read, which only
    reads do. (`plot_param_importances` reads `study.trials` once a parameter for its hover
    text: 0.43 s each at 4,800 trials, 4.3 s for the figure.)"""

    @property
    def trials(self) -> list[FrozenTrial]:
        return self.get_trials(deepcopy=False)


def optuna_figures(study: optuna.Study) -> tuple[dict[str, go.Figure], list[str]]:
    """Optuna's history, parameter importances and parallel coordinates; and why any is missing."""
    from optuna import visualization as vis

    # the same storage, so the trials `open_study` read are not read again
    study = _Shared(study_name=study.study_name, storage=study._storage)

    makers = {
        "history": vis.plot_optimization_history,
        "importances": lambda s: vis.plot_param_importances(
            s, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
        ),
        "parallel": vis.plot_parallel_coordinate,
    }
    figs, missing = {}, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, make in makers.items():
            try:
                figs[key] = make(study).update_layout(**LAYOUT)
            except Exception as e:  # too few trials, a single parameter...
                missing.append(
                    f"{key}: {str(e).splitlines()[0][:160] if str(e) else type(e).__name__}"
                )
    return figs, missing


# --- the HTML report -------------------------------------------------------------------------


@dataclass(frozen=True)
class Written:
    path: Path
    bytes: int
    trials: int
    figures: int
    seconds: float


@functools.cache
def _plotly_js_packed() -> str:
    from plotly.offline import get_plotlyjs

    packed = gzip.compress(get_plotlyjs().encode(), compresslevel=9, mtime=0)
    return base64.b64encode(packed).decode("ascii")


def _e(x: Any) -> str:
    return html.escape(str(x))


def _fmt(x: Any, spec: str = ".4f") -> str:
    return "-" if x is None else format(x, spec)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _pairs(rows: list[list[Any]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _summary(st: StudyStatus) -> str:
    s = st.states
    best = st.best
    rows: list[list[Any]] = [
        ["data", st.data],
        ["metric", f"{st.metric} (maximize)"],
        ["folds", st.folds or "-"],
        ["dev rows / test rows held out", f"{st.dev_rows or '-'} / {st.test_rows or '-'}"],
        [
            "trials",
            f"{st.finished}/{st.n_trials} finished: {s['complete']} complete, "
            f"{s['pruned']} pruned, {s['fail']} failed, {s['running']} running",
        ],
        [
            "best",
            "-"
            if best is None
            else f"trial {best.record.number}: {metrics.shown(st.metric, best.record.value)} ± "
            f"{_fmt(best.record.cv_std)}, {best.diagnosis.label if best.diagnosis else '-'}",
        ],
        ["chosen", st.choice.describe() if st.choice else "-"],
        ["expected test score", summary.estimate_line(st)],
        [
            "trivial predictor (CV)",
            "-" if st.baseline is None else metrics.shown(st.metric, st.baseline),
        ],
        ["storage", st.storage],
    ]
    return "<h2>Summary</h2>" + _pairs(rows)


def _test_set(st: StudyStatus) -> str:
    f = st.final
    if f is None or f.state != "finished":
        return (
            f"<h2>Test set</h2><p class=sealed>{_e(st.lockbox)}: the held-out rows are "
            "evaluated once, by <code>selector final</code>.</p>"
        )
    est = st.estimate
    optimism = None
    if f.cv_score is not None and f.test_score is not None:
        optimism = f.cv_score - f.test_score
    m = f.metric  # scores as a person reads them (an error's sign undone), as the summary shows
    gap = "optimism (test − CV error)" if m in metrics.ERROR_NAMES else "optimism (CV − test)"
    rows: list[list[Any]] = [
        ["test score", f"{metrics.shown(m, f.test_score)} on {f.test_rows} rows"],
        ["chosen trial", f"{f.trial} (rule {f.rule}), CV {metrics.shown_value(m, f.cv_score)}"],
        [
            "expected test score (bias-corrected CV)",
            "-"
            if est is None
            else f"{metrics.shown_value(m, est.value)} "
            f"[90% {metrics.shown_range(m, est.low, est.high)}]",
        ],
        [gap, _fmt(optimism, "+.4f")],
        ["evaluated at", f.finished_at],
        ["model", f.artifact or "-"],
    ]
    return "<h2>Test set (evaluated once)</h2>" + _pairs(rows)


def _diagnosis(st: StudyStatus) -> str:
    rows: list[list[Any]] = [
        ["fit", ", ".join(f"{k} {v}" for k, v in st.counts("fit").most_common()) or "-"],
        [
            "gradients",
            ", ".join(f"{k} {v}" for k, v in st.counts("gradients").most_common()) or "-",
        ],
        [
            "stopped while improving",
            sum(1 for v in st.ranked if v.diagnosis and v.diagnosis.still_improving),
        ],
        ["failed trials", ", ".join(f"{k} {v}" for k, v in st.failures.items()) or "none"],
    ]
    return "<h2>Diagnosis of the complete trials (against the study now)</h2>" + _pairs(rows)


def _top(st: StudyStatus, rec: StudyRecord) -> str:
    rows = []
    for v in st.ranked[:TOP_ROWS]:
        r = v.record
        cfg = r.config(rec.spec.space)
        rows.append(
            [
                r.number,
                f"{_fmt(r.value)} ± {_fmt(r.cv_std)}",
                " ".join(_fmt(x, ".3f") for x in r.fold_scores),
                _fmt(r.train_score),
                _fmt(r.gap, "+.4f"),
                r.best_epoch or "-",
                r.n_params or "-",
                v.diagnosis.label if v.diagnosis else "-",
                f"{cfg.depth}×{cfg.width} {cfg.activation}, {cfg.optimizer} lr {cfg.lr:.2g}",
            ]
        )
    header = [
        "trial",
        "CV mean ± std",
        "fold scores",
        "train",
        "gap",
        "best epoch",
        "params",
        "diagnosis",
        "network",
    ]
    return f"<h2>Top {len(rows)} trials</h2>" + _table(header, rows)


def _figure_div(div_id: str, key: str, fig: go.Figure) -> str:
    """A figure's div and its data, which the loader draws (`div.id + '-data'`)."""
    data = pio.to_json(fig, validate=False).replace("</", "<\\/")
    return (
        f'<div class="figure" id="{div_id}" data-name="{_e(key)}"></div>'
        f'<script type="application/json" id="{div_id}-data">{data}</script>'
    )


def _figure_divs(figs: dict[str, go.Figure]) -> str:
    return "\n".join(_figure_div(f"fig-{k}", key, fig) for k, (key, fig) in enumerate(figs.items()))


LOADER = """
(async () => {
  const packed = document.getElementById('plotly-js').textContent.trim();
  const bytes = Uint8Array.from(atob(packed), c => c.charCodeAt(0));
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream('gzip'));
  const code = await new Response(stream).text();
  const s = document.createElement('script');
  s.textContent = code;
  document.head.appendChild(s);
  for (const div of document.querySelectorAll('div.figure')) {
    const fig = JSON.parse(document.getElementById(div.id + '-data').textContent);
    await Plotly.newPlot(div, fig.data, fig.layout, {responsive: true, displaylogo: false});
  }
  document.body.dataset.figures = 'drawn';
})().catch(e => {
  document.getElementById('load-error').textContent =
    'The figures could not be drawn (' + e + '); open this file in a current browser.';
  document.body.dataset.figures = 'failed';
  console.error(e);
});
"""

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
table{border-collapse:collapse;margin:.5rem 0 1.5rem;font-size:.9rem}
td,th{border-bottom:1px solid #ddd;padding:.25rem .6rem;text-align:left;vertical-align:top}
th{background:#f4f4f4} pre{background:#f7f7f7;padding:1rem;overflow:auto;font-size:.8rem}
.figure{height:auto;min-height:420px;margin:1rem 0} .sealed{color:#555} #load-error{color:#b00}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0}
"""


def _figures_section(figs: dict[str, go.Figure], missing: list[str]) -> str:
    notes = "".join(f"<li>{_e(m)}</li>" for m in missing)
    return (
        "<h2>Figures</h2>"
        + (_figure_divs(figs) if figs else "<p>No complete trial yet.</p>")
        + (f"<ul>{notes}</ul>" if notes else "")
    )


def _learning_curve(curve: LearningCurve | None, st: StudyStatus) -> str:
    """The stored learning curve of the chosen trial (the report never trains); how to compute
    it when there is none, and a hint when the study has since chosen another trial."""
    command = f"<code>selector learning-curve {_e(st.study)}</code>"
    if curve is None:
        return (
            "<h2>Learning curve over training-set size</h2><p>Not computed yet: run "
            f"{command} to cross-validate the chosen config on 10-100% of each fold's training "
            "rows; this report then shows it.</p>"
        )
    rows = [
        [
            f"{p.share:.0%}",
            p.rows,
            f"{_fmt(p.train)} ± {_fmt(p.train_std)}",
            f"{_fmt(p.val)} ± {_fmt(p.val_std)}",
            _fmt(p.gap, "+.4f"),
        ]
        for p in curve.points
    ]
    table = _table(["share", "training rows", "train", "validation", "gap"], rows)
    stale = ""
    if st.choice is not None and st.choice.trial != curve.trial:
        stale = (
            f"<p class=sealed>Computed for trial {curve.trial}; the study now chooses "
            f"{_e(st.choice.describe())}: run {command} again.</p>"
        )
    return (
        f"<h2>Learning curve over training-set size: trial {curve.trial}</h2>{stale}"
        f"<p><b>{_e(learning.verdict(curve.points, curve.metric).sentence)}</b></p>"
        + _figure_div("fig-learning-curve", "learning-curve", fig_learning_curve(curve))
        + table
        + f"<p class=sealed>Computed at {_e(record.shown_time(curve.computed_at))} by {command} "
        "(dev rows only; each fold's validation part whole).</p>"
    )


def _config(url: str, study: optuna.Study, rec: StudyRecord, st: StudyStatus) -> str:
    if st.choice is None:
        return "<h2>Chosen config</h2><p>No complete trial yet.</p>"
    try:
        records = [v.record for v in st.trials]
        doc = export.document(study, rec, url, st.choice, records, st.estimate)
        text = export.dump(doc, "json")
    except SelectorError as e:
        text = str(e)
    return f"<h2>Chosen config: {_e(st.choice.describe())}</h2><pre>{_e(text)}</pre>"


def _page(name: str, sections: list[str]) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    head = (
        f"<h1>Study {_e(name)}</h1><p class=sub>selector {__version__} report, {when}</p>"
        '<p id="load-error"></p>'
    )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(name)}: '
        f"selector report</title><style>{CSS}</style></head><body>{head}"
        + "\n".join(sections)
        + f'<script id="plotly-js" type="application/octet-stream">{_plotly_js_packed()}</script>'
        f"<script>{LOADER}</script></body></html>"
    )


def render(url: str, name: str) -> tuple[str, int, int]:
    """The report's HTML, the number of trials and of figures."""
    study, rec = record.open_study(url, name)
    st = summary.status(url, name)
    more, missing = optuna_figures(study) if st.ranked else ({}, [])
    figs = {**study_figures(st.ranked, rec.spec.metric), **more}
    curve = learning.stored(study)
    sections = [
        _summary(st),
        _test_set(st),
        _diagnosis(st),
        _top(st, rec),
        _figures_section(figs, missing),
        _learning_curve(curve, st),
        _config(url, study, rec, st),
    ]
    return _page(name, sections), len(st.trials), len(figs) + (curve is not None)


def write(url: str, name: str, path: Path) -> Written:
    start = time.perf_counter()
    page, n_trials, n_figs = render(url, name)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as e:
        raise SelectorError(f"{path}: cannot write the report ({e.strerror})") from None
    return Written(path, len(page.encode()), n_trials, n_figs, time.perf_counter() - start)
