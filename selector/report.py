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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import FrozenTrial, TrialState
from plotly.subplots import make_subplots

from selector import __version__, export, final, summary
from selector.errors import SelectorError
from selector.study import Record, open_study

TOP_CURVES = 5
TOP_ROWS = 10
COLORS = {"good fit": "#2ca02c", "overfit": "#d62728", "underfit": "#ff7f0e"}
LAYOUT: dict[str, Any] = {"template": "plotly_white", "height": 420, "margin": {"t": 60}}


def complete_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Complete trials that carry selector's user attrs, best first."""
    trials = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.value is not None and "fold_scores" in t.user_attrs
    ]
    return sorted(trials, key=lambda t: -float(t.value))  # type: ignore[arg-type]


def _r(values: list[float], digits: int = 5) -> list[float | None]:
    """Rounded for a smaller file; non-finite values become gaps."""
    return [round(v, digits) if v is not None and math.isfinite(v) else None for v in values]


# --- figures ---------------------------------------------------------------------------------


def fig_cv_scores(trials: list[FrozenTrial], metric: str) -> go.Figure:
    fig = go.Figure()
    by_label: dict[str, list[FrozenTrial]] = {}
    for t in sorted(trials, key=lambda t: t.number):
        by_label.setdefault(str(t.user_attrs.get("diagnosis", "-")), []).append(t)
    for label, group in by_label.items():
        fig.add_trace(
            go.Scatter(
                x=[t.number for t in group],
                y=_r([float(t.value) for t in group]),  # type: ignore[arg-type]
                error_y={"type": "data", "array": _r([t.user_attrs["cv_std"] for t in group])},
                mode="markers",
                name=label,
                marker={"color": COLORS.get(label, "#7f7f7f"), "size": 7},
                text=[_hover(t) for t in group],
                hoverinfo="text",
            )
        )
    fig.update_layout(
        title="CV score per trial (error bars: standard deviation over folds)",
        xaxis_title="trial",
        yaxis_title=f"mean validation {metric}",
        **LAYOUT,
    )
    return fig


def _hover(t: FrozenTrial) -> str:
    a = t.user_attrs
    return (
        f"trial {t.number}: {t.value:.4f} ± {a.get('cv_std', 0):.4f}<br>"
        f"train {a.get('train_score', float('nan')):.4f}, gap {a.get('gap', float('nan')):+.4f}"
        f"<br>{a.get('diagnosis', '-')}, gradients {a.get('gradient_health', '-')}<br>"
        f"{a.get('n_params', '-')} parameters"
    )


def fig_gap_vs_size(trials: list[FrozenTrial], metric: str) -> go.Figure:
    fig = go.Figure()
    groups: dict[str, list[FrozenTrial]] = {}
    for t in trials:
        groups.setdefault(str(t.user_attrs.get("diagnosis", "-")), []).append(t)
    for label, group in groups.items():
        fig.add_trace(
            go.Scatter(
                x=[t.user_attrs.get("n_params") for t in group],
                y=_r([t.user_attrs.get("gap", float("nan")) for t in group]),
                mode="markers",
                name=label,
                marker={"color": COLORS.get(label, "#7f7f7f"), "size": 7},
                text=[_hover(t) for t in group],
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


def fig_top_curves(trials: list[FrozenTrial], metric: str, top: int = TOP_CURVES) -> go.Figure:
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        row_heights=[0.62, 0.38],
        vertical_spacing=0.08,
        subplot_titles=(f"mean validation {metric}", "training loss (mean over folds)"),
    )
    palette = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
    for k, t in enumerate(trials[:top]):
        a, color = t.user_attrs, palette[k % len(palette)]
        val, loss = a.get("val_curve") or [], a.get("train_loss_curve") or []
        name = f"trial {t.number} ({t.value:.4f})"
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
        best = int(a.get("best_epoch") or 0)
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
        title=f"Learning curves of the top {min(top, len(trials))} trials (star: best epoch)",
        **{**LAYOUT, "height": 520},
    )
    return fig


def study_figures(trials: list[FrozenTrial], metric: str) -> dict[str, go.Figure]:
    """selector's own figures (what optuna-dashboard lacks); empty before a complete trial."""
    if not trials:
        return {}
    return {
        "cv-scores": fig_cv_scores(trials, metric),
        "gap-vs-size": fig_gap_vs_size(trials, metric),
        "top-curves": fig_top_curves(trials, metric),
    }


def optuna_figures(study: optuna.Study) -> tuple[dict[str, go.Figure], list[str]]:
    """Optuna's history, parameter importances and parallel coordinates; and why any is missing."""
    from optuna import visualization as vis

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


def _summary(info: dict[str, Any], study: optuna.Study) -> str:
    st = info["states"]
    best = info["best"]
    rows = [
        ["data", info["data"]],
        ["metric", f"{info['metric']} ({info['direction']})"],
        ["folds", study.user_attrs.get("folds", "-")],
        [
            "dev rows / test rows held out",
            f"{study.user_attrs.get('dev_rows', '-')} / "
            f"{study.user_attrs.get('test_rows_held_out', '-')}",
        ],
        [
            "trials",
            f"{info['finished']}/{info['n_trials']} finished: {st['complete']} complete, "
            f"{st['pruned']} pruned, {st['fail']} failed, {st['running']} running",
        ],
        [
            "best",
            "-"
            if best is None
            else f"trial {best['trial']}: {_fmt(best['value'])} ± "
            f"{_fmt(best['cv_std'])}, {best['diagnosis']}, gradients {best['gradients']}",
        ],
        ["storage", info["storage"]],
    ]
    return "<h2>Summary</h2>" + _pairs(rows)


def _test_set(box: dict[str, Any]) -> str:
    if box["state"] != "evaluated":
        return (
            f"<h2>Test set</h2><p class=sealed>{_e(box['state'])}: the held-out rows are "
            "evaluated once, by <code>selector final</code>.</p>"
        )
    optimism = None
    if box.get("cv_score") is not None and box.get("test_score") is not None:
        optimism = box["cv_score"] - box["test_score"]
    rows = [
        ["test score", f"{box['metric']} = {_fmt(box['test_score'])} on {box['test_rows']} rows"],
        ["chosen trial", f"{box['trial']} (rule {box['rule']}), CV {_fmt(box['cv_score'])}"],
        ["optimism (CV − test)", _fmt(optimism, "+.4f")],
        ["evaluated at", box["finished_at"]],
        ["model", box.get("artifact") or "-"],
    ]
    return "<h2>Test set (evaluated once)</h2>" + _pairs(rows)


def _diagnosis(trials: list[FrozenTrial], info: dict[str, Any]) -> str:
    fits = Counter(str(t.user_attrs.get("diagnosis")) for t in trials)
    grads = Counter(str(t.user_attrs.get("gradient_health")) for t in trials)
    rows = [
        ["fit", ", ".join(f"{k} {v}" for k, v in fits.most_common()) or "-"],
        ["gradients", ", ".join(f"{k} {v}" for k, v in grads.most_common()) or "-"],
        ["failed trials", ", ".join(f"{k} {v}" for k, v in info["failures"].items()) or "none"],
    ]
    return "<h2>Diagnosis of the complete trials</h2>" + _pairs(rows)


def _top(trials: list[FrozenTrial]) -> str:
    rows = []
    for t in trials[:TOP_ROWS]:
        a = t.user_attrs
        cfg = a.get("config", {})
        rows.append(
            [
                t.number,
                f"{_fmt(t.value)} ± {_fmt(a.get('cv_std'))}",
                " ".join(_fmt(s, ".3f") for s in a.get("fold_scores", [])),
                _fmt(a.get("train_score")),
                _fmt(a.get("gap"), "+.4f"),
                a.get("best_epoch", "-"),
                a.get("n_params", "-"),
                f"{a.get('diagnosis', '-')}, {a.get('gradient_health', '-')}",
                f"{cfg.get('depth')}×{cfg.get('width')} {cfg.get('activation')}, "
                f"{cfg.get('optimizer')} lr {_fmt(cfg.get('lr'), '.2g')}",
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


def _figure_divs(figs: dict[str, go.Figure]) -> str:
    out = []
    for k, (key, fig) in enumerate(figs.items()):
        data = pio.to_json(fig, validate=False).replace("</", "<\\/")
        out.append(
            f'<div class="figure" id="fig-{k}" data-name="{_e(key)}"></div>'
            f'<script type="application/json" id="fig-{k}-data">{data}</script>'
        )
    return "\n".join(out)


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


def _config(url: str, study: optuna.Study, rec: Record) -> str:
    prev = final.stored(url, study.study_name)
    try:
        doc = export.document(study, rec, "best", url, prev.as_dict() if prev else None)
        text = export.dump(doc, "json")
    except SelectorError as e:
        text = str(e)
    return f"<h2>Exported config (rule <code>best</code>)</h2><pre>{_e(text)}</pre>"


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
    study, rec = open_study(url, name)
    info = summary.status(url, name, top=0)
    trials = complete_trials(study)
    more, missing = optuna_figures(study) if trials else ({}, [])
    figs = {**study_figures(trials, rec.spec.metric), **more}
    sections = [
        _summary(info, study),
        _test_set(info["test_set"]),
        _diagnosis(trials, info),
        _top(trials),
        _figures_section(figs, missing),
        _config(url, study, rec),
    ]
    return _page(name, sections), len(study.get_trials(deepcopy=False)), len(figs)


def write(url: str, name: str, path: Path) -> Written:
    start = time.perf_counter()
    page, n_trials, n_figs = render(url, name)
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as e:
        raise SelectorError(f"{path}: cannot write the report ({e.strerror})") from None
    return Written(path, len(page.encode()), n_trials, n_figs, time.perf_counter() - start)
