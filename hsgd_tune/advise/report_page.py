"""The report's interactive page: Optuna's plotly views where they fit, our own where Optuna has none.

Optuna draws what every tuning tool shows (Pareto front, optimisation history, contour and slice over
learning rate × batch size, parameter importance); we add what only this tool has: the bound's terms,
the twin trajectories with their distance D, and the certificates beside the test-free estimates. Every
figure hovers with the trial number, and every trial links to its MLflow run.

The page is one self-contained HTML file (plotly.js inlined once): it opens from disk, from an MLflow
artifact, or on a machine with no internet.

Readability rules, applied everywhere: a value axis spanning more than :data:`LOG_SPAN` is drawn on a
log scale (one outlier must not flatten the rest), text labels are drawn only for the few trials that
matter (the rest is in the hover), and the recommended trial is the red star throughout.
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Callable

import numpy as np
import optuna
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from optuna.trial import FrozenTrial
from plotly.subplots import make_subplots

#: A value axis (or colour scale) is logarithmic when its largest positive value is more than this many
#: times its smallest: then one outlier no longer flattens every other trial into one colour or line.
LOG_SPAN = 4.0
RECOMMENDED = "#d62728"  # the red star, in every figure
GREY = "#9a9a9a"
FRONT = "#1f77b4"  # trials on the Pareto front
DOMINATED = "#b8c4d0"  # trials off it
BOUND_TERMS = {  # bound term → (label, colour); risk bound = R̂_S(nearest H-iterate) + C + L_pop·d
    "train": ("R̂_S,B at the nearest reference iterate", "#1f77b4"),
    "complexity": ("complexity C", "#ff7f0e"),
    "decoupling": ("L_pop·d (decoupling)", "#2ca02c"),
}
PLOT_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"format": "png"}}


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def spans_decades(values, span: float = LOG_SPAN) -> bool:
    """Whether positive ``values`` run over more than a factor ``span`` (then a log axis reads better)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    return len(v) > 1 and v.max() / v.min() > span


def log_axis(values) -> dict:
    """A log axis for ``values`` with plain-number tick labels at 1-2-5 steps over a few decades, one
    per decade beyond (plotly's default labels the minor ticks with bare digits that collide)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v) & (v > 0)]
    decades = float(np.log10(v.max() / v.min())) if len(v) > 1 else 0.0
    return {"type": "log", "tickformat": "~g", "dtick": "D2" if decades <= 2.5 else 1}


def fig_html(fig: go.Figure, height: int | None = None) -> str:
    """A figure as a <div>, without plotly.js (the page carries it once)."""
    fig.update_layout(
        template="plotly_white",
        margin={"l": 60, "r": 40, "t": 50, "b": 50},
        modebar={"orientation": "v"},  # on the right edge, not over the title
        title={"x": 0.01, "font": {"size": 15}},
    )
    if height is not None:
        fig.update_layout(height=height)
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, config=PLOT_CONFIG)


def has_data(fig: go.Figure) -> bool:
    """Optuna returns an empty figure (and warns) when a view does not apply to the study."""
    return any(len(getattr(trace, "x", None) or getattr(trace, "y", None) or ()) for trace in fig.data)


def optuna_view(make: Callable[[], go.Figure]) -> tuple[go.Figure | None, str]:
    """Optuna's figure, or None and the reason when it does not apply (too few trials, one value)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fig = make()
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if not has_data(fig):
        reasons = [str(w.message).splitlines()[0] for w in caught]
        return None, reasons[0] if reasons else "no data to draw"
    return fig, ""


def run_link(url: str | None, text: str) -> str:
    return (
        f'<a href="{html.escape(url)}" target="_blank">{html.escape(text)}</a>' if url else html.escape(text)
    )


def objective_target(index: int) -> Callable[[FrozenTrial], float]:
    return lambda t: t.values[index]


def varied_params(study: optuna.Study) -> list[str]:
    """The sampled parameters that took more than one value among the finished trials."""
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    names = dict.fromkeys(k for t in trials for k in t.params)
    return [k for k in names if len({t.params.get(k) for t in trials}) > 1]


# ---------------------------------------------------------------------------------------------
# Optuna's views
# ---------------------------------------------------------------------------------------------


def colour_by_front(fig: go.Figure) -> None:
    """Optuna colours the points by trial number on two colour scales ("Trial", "Best Trial"), which
    say little (hover shows the trial) and draw the lowest-numbered trials nearly white; a group of one
    trial gets a bar spanning −0.4 … 0.4. Two plain colours and a legend instead."""
    groups = {"Best Trial": ("Pareto front", FRONT), "Trial": ("other trials", DOMINATED)}
    for trace in fig.data:
        title = trace.marker.colorbar.title.text if hasattr(trace, "marker") else None
        if title in groups:
            trace.name, colour = groups[title]
            trace.marker.color, trace.marker.showscale, trace.showlegend = colour, False, True


def pareto_figure(
    study: optuna.Study,
    objectives: list[str],
    recommended: FrozenTrial | None,
    band: tuple[int, float, float] | None,
) -> tuple[go.Figure | None, str]:
    """Optuna's Pareto front over the study's objectives, with the rule's tolerance band (objective
    index, low, high) and the recommended trial as a red star; log axes where values span decades."""
    if len(objectives) not in (2, 3):
        return None, f"the study has {len(objectives)} objective(s); a Pareto front needs 2 or 3"
    fig, why = optuna_view(lambda: optuna.visualization.plot_pareto_front(study, target_names=objectives))
    if fig is None:
        return fig, why
    colour_by_front(fig)
    if len(objectives) == 3:
        return fig, why
    values = np.array([t.values for t in study.get_trials(deepcopy=False) if t.values is not None])
    for axis, column in (("xaxis", 0), ("yaxis", 1)):
        if spans_decades(values[:, column]):
            fig.update_layout({axis: log_axis(values[:, column])})
    if band is not None:
        index, low, high = band
        shade = {"fillcolor": "green", "opacity": 0.12, "line_width": 0}
        label = {"annotation_text": "within tolerance", "annotation_position": "top left"}
        (fig.add_vrect if index == 0 else fig.add_hrect)(low, high, **shade, **label)
    if recommended is not None:
        fig.add_trace(
            go.Scatter(
                x=[recommended.values[0]],
                y=[recommended.values[1]],
                mode="markers+text",
                marker={"symbol": "star", "size": 20, "color": RECOMMENDED, "line": {"width": 1}},
                text=[f"trial {recommended.number}"],
                textposition="middle right",
                name="recommended",
                hovertemplate=f"recommended: trial {recommended.number}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Pareto front over the study's objectives (hover: trial and parameters)",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig, ""


def candidates_figure(
    table: pd.DataFrame, within: str, prefer: str, tolerance: float, recommended: int | None
) -> go.Figure | None:
    """The rule's decision up close: the trials near the best ``within`` value (up to 3× the
    tolerance), ``prefer`` against ``within``, every point labelled, the tolerance band shaded. On the
    whole front the band is a sliver next to outliers; here it fills the plot."""
    rows = table[np.isfinite(table[within].astype(float)) & np.isfinite(table[prefer].astype(float))]
    if rows.empty:
        return None
    best = float(rows[within].min())
    limit = best + tolerance * abs(best)
    # 3× the tolerance, and at least 10% of the best: a rule without tolerance still has neighbours
    near = rows[rows[within] <= best + max(3 * tolerance, 0.1) * abs(best)].sort_values(within)
    inside = near[within] <= limit
    fig = go.Figure()
    if limit > best:
        fig.add_vrect(best, limit, fillcolor="green", opacity=0.12, line_width=0)
    for mask, name, colour in (
        (inside, "candidates (within tolerance)", "#2ca02c"),
        (~inside, "others", GREY),
    ):
        part = near[mask]
        fig.add_trace(
            go.Scatter(
                x=part[within],
                y=part[prefer],
                mode="markers+text",
                marker={"color": colour, "size": 9},
                text=[str(int(t)) for t in part["trial"]],
                # alternate label sides along x, so that neighbours' labels do not overlap
                textposition=["top center" if k % 2 else "bottom center" for k in range(len(part))],
                name=name,
                customdata=part["trial"],
                hovertemplate=f"trial %{{customdata}}: {within} = %{{x:.4g}}, {prefer} = %{{y:.4g}}"
                + "<extra></extra>",
            )
        )
    if recommended is not None and recommended in set(near["trial"]):
        row = near[near["trial"] == recommended].iloc[0]
        fig.add_trace(
            go.Scatter(
                x=[row[within]],
                y=[row[prefer]],
                mode="markers",
                marker={"symbol": "star", "size": 22, "color": RECOMMENDED, "line": {"width": 1}},
                name=f"recommended: trial {recommended}",
                hoverinfo="skip",
            )
        )
    if spans_decades(near[prefer]):
        fig.update_yaxes(log_axis(near[prefer]))
    fig.update_layout(
        xaxis_title=within, yaxis_title=prefer, legend={"orientation": "h", "y": -0.2}, showlegend=True
    )
    return fig


def _objective_view(plot, study: optuna.Study, i: int, name: str, values: list, log: bool):
    """One of Optuna's views of objective ``i`` (``plot(study, target=, target_name=)``), its value
    axis logarithmic over ``values`` when ``log``; (None, why) when Optuna cannot draw it."""
    fig, why = optuna_view(lambda: plot(study, target=objective_target(i), target_name=name))
    if fig is not None and log:
        fig.update_yaxes(log_axis(values))
    return fig, why


def search_space_views(study: optuna.Study, objectives: list[str]) -> list[tuple[str, go.Figure | None, str]]:
    """History, contour and slice for each objective, and parameter importance: (title, fig, why not)."""
    params = varied_params(study)
    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    views = []
    for i, name in enumerate(objectives):
        values = [t.values[i] for t in trials]
        log = spans_decades(values)
        target, target_name = objective_target(i), name
        if log:  # Optuna's colour scales are linear: one outlier would paint every other cell alike
            target, target_name = (
                (lambda t, i=i: math.log10(t.values[i]) if t.values[i] > 0 else math.nan),
                (f"log10 {name}"),
            )
        history, why = _objective_view(
            optuna.visualization.plot_optimization_history, study, i, name, values, log
        )
        views.append((f"Optimisation history: {name}", history, why))
        if len(params) >= 2:
            contour, why = optuna_view(
                lambda target=target, target_name=target_name: optuna.visualization.plot_contour(
                    study, params=params[:2], target=target, target_name=target_name
                )
            )
        else:
            contour, why = None, f"needs two parameters that vary; varied: {', '.join(params) or 'none'}"
        views.append(
            (f"Contour over {' × '.join(params[:2]) or 'the parameters'}: {target_name}", contour, why)
        )
        slices, why = _objective_view(optuna.visualization.plot_slice, study, i, name, values, log)
        views.append((f"Slice: {name} against each parameter", slices, why))
    for i, name in enumerate(objectives):
        if len(params) < 2 or len(trials) < 3:
            why = f"needs at least 3 finished trials and 2 varied parameters ({len(trials)}, {len(params)})"
            views.append((f"Parameter importance for {name}", None, why))
            continue
        importance, why = optuna_view(
            lambda i=i, name=name: optuna.visualization.plot_param_importances(
                study, target=objective_target(i), target_name=name
            )
        )
        views.append((f"Parameter importance for {name}", importance, why))
    return views


# ---------------------------------------------------------------------------------------------
# Our own views
# ---------------------------------------------------------------------------------------------


def bound_terms(table: pd.DataFrame) -> dict[str, pd.Series]:
    """The risk bound's three terms at the last step (DESIGN.md §2, gap bound G): ``risk_bound =
    R̂_S,B(w^S_K) + g_K = R̂_S,B(w^H_j(K)) + C + L_pop·‖w^S_K − w^H_j(K)‖``; the last term is what is
    left of the sum once the two measured ones are taken out. A trial with only the uniform form
    (sketched iterates) has ``risk_bound = R̂_S,B(w^S_K) + C + 2·L̂·D``: its own train risk stands in."""
    train = table["bound/train_risk_clipped"]
    reference = table.get("bound/reference_train_risk", train).fillna(train)
    return {
        "train": reference,
        "complexity": table["bound/complexity"],
        "decoupling": table["bound/risk_bound"] - reference - table["bound/complexity"],
    }


def decomposition_figure(metrics: pd.DataFrame, recommended: int | None) -> go.Figure:
    """Each trial's risk bound split into its three terms: one row per trial, one dot per term on a log
    axis (stacked bars on a linear axis hid the small terms under the decoupling one), the sum as a bar, B
    dashed."""
    table = metrics.sort_values("bound/risk_bound", ascending=False)
    labels = [f"trial {int(t)}{' ★' if t == recommended else ''}" for t in table["trial"]]
    parts = bound_terms(table)
    fig = go.Figure()
    fig.add_trace(
        go.Bar(
            y=labels,
            x=table["bound/risk_bound"],
            orientation="h",
            marker_color="#e8e8e8",
            name="risk bound (the sum)",
            hovertemplate="%{y}: risk bound = %{x:.4g}<extra></extra>",
        )
    )
    for key, values in parts.items():
        label, colour = BOUND_TERMS[key]
        fig.add_trace(
            go.Scatter(
                y=labels,
                x=values,
                mode="markers",
                marker={"color": colour, "size": 10},
                name=label,
                hovertemplate=f"%{{y}}: {label} = %{{x:.4g}}<extra></extra>",
            )
        )
    clip = float(table["bound/loss_clip"].iloc[0])
    fig.add_vline(clip, line_dash="dash", annotation_text=f"B = {clip:g}: vacuous beyond")
    values = np.concatenate([v.to_numpy(dtype=float) for v in parts.values()] + [[clip]])
    values = values[np.isfinite(values) & (values > 0)]
    low, high = (
        np.log10(values.min()) - 0.3,
        np.log10(max(values.max(), table["bound/risk_bound"].max())) + 0.3,
    )
    fig.update_layout(
        title="What each trial's risk bound is made of (log scale: every term readable)",
        xaxis={**log_axis(values), "title": "value (clipped-loss units)", "range": [low, high]},
        yaxis={"autorange": "reversed"},
        legend={"orientation": "h", "y": -0.15},
        bargap=0.5,
    )
    return fig


def hausdorff_pair(s: np.ndarray, h: np.ndarray) -> tuple[int, int, float]:
    """(i, j, D): the iterates s[i] and h[j] that realise the Hausdorff distance D between two
    recorded trajectories (N, p) and (M, p), the farthest point of one set from the other."""
    dist = np.sqrt(np.maximum(((s[:, None, :] - h[None, :, :]) ** 2).sum(-1), 0.0))  # (N, M)
    from_s, from_h = dist.min(axis=1), dist.min(axis=0)
    if from_s.max() >= from_h.max():
        i = int(from_s.argmax())
        return i, int(dist[i].argmin()), float(from_s[i])
    j = int(from_h.argmax())
    return int(dist[:, j].argmin()), j, float(from_h[j])


#: Above this many recorded iterates the pairwise distances for D's segment are not computed.
MAX_PAIRWISE = 400


def trajectory_figures(
    trajectories: dict[int, dict[str, np.ndarray]],
    selected: dict[int, str],
    decoupling: dict[int, float],
    pca: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> tuple[go.Figure, go.Figure]:
    """(distance over steps, 2-D projections). The first puts ‖w^S_k − w^H_k‖ of every selected
    trial on one log axis with its D dashed; the second draws each trial's two trajectories on its
    principal axes, all panels on the same scale, with the segment that realises D."""
    distance = go.Figure()
    gaps = []
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2"]
    for k, (number, why) in enumerate(selected.items()):
        arrays = trajectories[number]
        s, h = arrays["empirical"], arrays["reference"]
        steps = arrays.get("record_steps", np.arange(len(s)))
        colour = palette[k % len(palette)]
        gap = np.linalg.norm(s - h, axis=1)
        gaps.append(gap)
        distance.add_trace(
            go.Scatter(
                x=steps,
                y=np.where(gap > 0, gap, np.nan),
                mode="lines",
                line={"color": colour},
                name=f"trial {number} ({why})",
                hovertemplate=f"trial {number}, step %{{x}}: ‖w_S − w_H‖ = %{{y:.4g}}<extra></extra>",
            )
        )
        if number in decoupling and math.isfinite(decoupling[number]):
            distance.add_hline(decoupling[number], line={"color": colour, "dash": "dash", "width": 1})
    distance.update_layout(
        title="Distance between the twin runs over the steps (dashed: each trial's D, Hausdorff distance)",
        xaxis_title="step",
        yaxis={**log_axis(np.concatenate(gaps)), "title": "‖w_S,k − w_H,k‖"},
        legend={"orientation": "h", "y": -0.2},
    )

    n = len(selected)
    cols = min(n, 2)
    rows = -(-n // cols)
    titles = [f"trial {number} ({why})" for number, why in selected.items()]
    panels = make_subplots(
        rows=rows, cols=cols, subplot_titles=titles, shared_xaxes="all", shared_yaxes="all"
    )
    for k, number in enumerate(selected):
        row, col = k // cols + 1, k % cols + 1
        arrays = trajectories[number]
        s, h = arrays["empirical"], arrays["reference"]
        projected, explained = pca(np.concatenate([s, h]))
        ps, ph = projected[: len(s)], projected[len(s) :]
        first = k == 0
        for points, name, colour in (
            (ps, "empirical run (S)", "#1f77b4"),
            (ph, "reference run (H)", "#ff7f0e"),
        ):
            panels.add_trace(
                go.Scatter(
                    x=points[:, 0],
                    y=points[:, 1],
                    mode="lines+markers",
                    marker={"size": 4},
                    line={"color": colour},
                    name=name,
                    legendgroup=name,
                    showlegend=first,
                    hovertemplate=f"trial {number}, {name}<extra></extra>",
                ),
                row=row,
                col=col,
            )
        panels.add_trace(
            go.Scatter(
                x=[ps[0, 0]],
                y=[ps[0, 1]],
                mode="markers",
                marker={"symbol": "square", "color": "black", "size": 8},
                name="start (shared)",
                legendgroup="start",
                showlegend=first,
            ),
            row=row,
            col=col,
        )
        if len(s) * len(h) <= MAX_PAIRWISE**2:
            i, j, d = hausdorff_pair(s, h)
            panels.add_trace(
                go.Scatter(
                    x=[ps[i, 0], ph[j, 0]],
                    y=[ps[i, 1], ph[j, 1]],
                    mode="lines",
                    line={"color": RECOMMENDED, "width": 3, "dash": "dot"},
                    name="D (in full dimension)",
                    legendgroup="D",
                    showlegend=first,
                    hovertemplate=f"trial {number}: D = {d:.4g} (full-dimensional distance)<extra></extra>",
                ),
                row=row,
                col=col,
            )
        panels.update_xaxes(title_text=f"PC1 ({explained[0]:.0%})", row=row, col=col)
        panels.update_yaxes(title_text=f"PC2 ({explained[1]:.0%})", row=row, col=col)
    panels.update_layout(
        title="Both trajectories on their principal axes, every panel on the same scale (dotted red: D)",
        height=380 * rows + 80,
        legend={"orientation": "h", "y": -0.08},
    )
    return distance, panels


def learning_curve_figure(curves: dict[int, dict[str, pd.Series]], recommended: int | None) -> go.Figure:
    """Validation and minibatch training loss of every finished trial; hover names the trial,
    the legend toggles it, the recommended trial is the thick red line."""
    names = ("val/loss", "train/minibatch_loss")
    fig = make_subplots(rows=1, cols=2, subplot_titles=names, shared_xaxes=True)
    for col, name in enumerate(names, start=1):
        for number, trial_curves in curves.items():
            series = trial_curves.get(name)
            if series is None or series.empty:
                continue
            best = number == recommended
            fig.add_trace(
                go.Scatter(
                    x=series.index,
                    y=series.values,
                    mode="lines",
                    line={"color": RECOMMENDED if best else GREY, "width": 3 if best else 1},
                    opacity=1.0 if best else 0.6,
                    name=f"trial {number}{' (recommended)' if best else ''}",
                    legendgroup=str(number),
                    showlegend=col == 1,
                    hovertemplate=f"trial {number}, step %{{x}}: %{{y:.4g}}<extra></extra>",
                ),
                row=1,
                col=col,
            )
    for col, name in enumerate(names, start=1):  # each panel its own ticks: their ranges differ
        values = [t[name].to_numpy() for t in curves.values() if t.get(name) is not None]
        fig.update_yaxes(log_axis(np.concatenate(values)) if values else {"type": "log"}, row=1, col=col)
    fig.update_xaxes(title_text="step")
    fig.update_layout(
        title="Learning curves (click a legend entry to hide a trial, double-click to isolate it)"
    )
    return fig


def certificate_figure(certified: pd.DataFrame, recommended: int | None) -> go.Figure:
    """Per certified trial: the certified error bounds (of the final weights, from H; of Q) next to
    the test-free estimates (training and validation error of the final weights), with the trivial
    bound."""
    labels = [f"trial {int(t)}{' ★' if t == recommended else ''}" for t in certified["trial"]]
    fig = go.Figure()
    for column, label, colour in (
        ("train/error", "training error (final weights)", "#aec7e8"),
        ("val/error", "validation error (final weights, estimate)", "#1f77b4"),
        ("certificate/heldout_error", "held-out certificate: error of the final weights", "#ff7f0e"),
        ("certificate/bound", "PAC-Bayes certificate: error of Q", RECOMMENDED),
    ):
        if column not in certified:
            continue
        fig.add_trace(
            go.Bar(
                x=labels,
                y=certified[column],
                name=label,
                marker_color=colour,
                hovertemplate=f"%{{x}}: {label} = %{{y:.3f}}<extra></extra>",
            )
        )
    trivial = certified["certificate/trivial"].dropna()
    if not trivial.empty:
        fig.add_hline(float(trivial.iloc[0]), line_dash="dash", annotation_text="trivial bound (1 − 1/k)")
        vacuous = min(float(trivial.iloc[0]), 0.5)  # diagnostics.py's hsgd.vacuous.certificate
        fig.add_hline(vacuous, line_dash="dot", line_color=GREY, annotation_text="vacuous from here")
    fig.update_layout(
        barmode="group",
        title="Certificates beside the test-free estimates",
        yaxis={"title": "error rate", "range": [0, 1.05]},
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


# ---------------------------------------------------------------------------------------------
# Tables and the page
# ---------------------------------------------------------------------------------------------

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1280px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:2px solid #eee;padding-bottom:.2em}
.answer{background:#f6f9ff;border:1px solid #cdd9f0;border-radius:8px;padding:.8em 1.2em}
.answer b{color:#0b3d91} .muted{color:#666;font-size:.92em} .note{color:#8a6d00;font-size:.9em}
nav a{margin-right:1em} figure{margin:1em 0}
table{border-collapse:collapse;font-size:13px;margin:.6em 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f3f3f3;position:sticky;top:0}
td.l,th.l{text-align:left} tr.rec{background:#fff1f0;font-weight:600}
tr.front td:first-child{border-left:3px solid #1f77b4}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1em} .grid>div{min-width:0}
@media (max-width:1000px){.grid{grid-template-columns:1fr}}
.pngs img{max-width:32%;border:1px solid #eee;margin:2px}
"""


def _cell(value, digits: str = ".4g") -> str:
    if isinstance(value, (bool, np.bool_)):
        return "★" if value else ""
    if isinstance(value, (float, np.floating)):
        return "-" if not np.isfinite(value) else format(float(value), digits)
    return html.escape(str(value))


def trials_table_html(table: pd.DataFrame, links: dict[int, str], columns: list[str]) -> str:
    """The ranked trials: recommended row highlighted, Pareto-front rows marked, trial → MLflow run."""
    head = "".join(f'<th class="{"l" if c in ("state",) else ""}">{html.escape(c)}</th>' for c in columns)
    rows = []
    for _, row in table.iterrows():
        number = int(row["trial"])
        css = "rec" if row.get("recommended", False) else "front" if row.get("pareto_rank") == 1 else ""
        cells = []
        for c in columns:
            text = run_link(links.get(number), f"trial {number}") if c == "trial" else _cell(row.get(c, ""))
            cells.append(f'<td class="{"l" if c in ("trial", "state") else ""}">{text}</td>')
        rows.append(f'<tr class="{css}">{"".join(cells)}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def section(anchor: str, title: str, body: str) -> str:
    return f'<h2 id="{anchor}">{html.escape(title)}</h2>\n{body}'


def figure_block(title: str, fig: go.Figure | None, why: str, height: int | None = None) -> str:
    if fig is None:
        return f'<div><p class="note">{html.escape(title)}: not drawn ({html.escape(why)}).</p></div>'
    fig.update_layout(title=title)  # Optuna's own titles do not say which objective
    return f"<div>{fig_html(fig, height)}</div>"


def page(
    *,
    title: str,
    facts: str,
    answer: str,
    sections: list[str],
    plotly_js: str,
) -> str:
    """The whole page: one HTML file, plotly.js inlined once."""
    anchors = [s.split('"')[1] for s in sections]
    names = [s.split(">", 1)[1].split("</h2>")[0] for s in sections]
    nav = " ".join(f'<a href="#{a}">{n}</a>' for a, n in zip(anchors, names, strict=True))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{STYLE}</style>
<script>{plotly_js}</script></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="muted">{facts}</p>
<div class="answer">{answer}</div>
<nav>{nav}</nav>
{"".join(sections)}
</body></html>
"""
