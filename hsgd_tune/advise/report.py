"""The study report: PNG plots and one HTML page, logged to the study's parent MLflow run.

What the user reads to decide: where the Pareto front lies and which trial the rule picks; how
validation loss, the bound and its terms vary over learning rate × batch size; what the bound is
made of; how the empirical and reference trajectories drift apart; and whether the bound ranks the
trials like the observed generalization gap does (Kendall's τ and the granulated Ψ, DESIGN.md §2).

The math (binning, projection, correlations) is in small pure functions; the drawing functions take
tables and arrays and write one PNG each.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window (headless servers, CI)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hsgd_tune.advise import report_page as rp  # noqa: E402
from hsgd_tune.advise.correlation import granulated_kendall, kendall_tau  # noqa: E402
from hsgd_tune.advise.ranking import Ranking, certified_note, markdown_table, rule_text
from hsgd_tune.errors import ConfigError  # noqa: E402
from hsgd_tune.search.trials import (
    CERTIFICATE,  # noqa: E402
    METRIC_ATTRS,
)
from hsgd_tune.studyfile.config import StudyConfig  # noqa: E402
from hsgd_tune.track.tracker import Tracker  # noqa: E402

HELDOUT_CERTIFICATE = "certificate/heldout_error"  # about the served weights (bound/heldout.py)

#: Heatmaps drawn when the trials report the metric: trial user attribute → (file stem, title).
HEATMAPS = {
    "val/loss": ("val_loss", "validation loss"),
    "bound/risk_bound": ("risk_bound", "risk bound"),
    "bound/decoupling_distance": ("decoupling_distance", "decoupling distance D"),
    "tail/alpha": ("tail_index", 'tail index α̂ ([diagnostics] trials = "all")'),
}
#: Measures whose rank agreement with the gap is reported; the last two are baselines (DESIGN.md §2).
MEASURES = ("bound/risk_bound", "bound/gap_bound", "bound/decoupling_distance", "lr/b", "val/loss")
MAX_LR_BINS = 6


# ---------------------------------------------------------------------------------------------
# Pure helpers
# ---------------------------------------------------------------------------------------------


def log_bins(values: np.ndarray, max_bins: int = MAX_LR_BINS) -> np.ndarray:
    """Each positive value (n,) replaced by the geometric centre of its bin, so that trials with
    nearby learning rates share a heatmap cell and a granulated-Kendall group.

    At most ``max_bins`` distinct values are kept as they are (a grid study); otherwise
    ``max_bins`` bins of equal width on a log scale span [min, max].
    """
    values = np.asarray(values, dtype=float)
    if len(np.unique(values)) <= max_bins:
        return values
    edges = np.geomspace(values.min(), values.max(), max_bins + 1)
    index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, max_bins - 1)
    centres = np.sqrt(edges[:-1] * edges[1:])
    return centres[index]


def pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project points (N, p) on their two principal axes: returns (N, 2) and the fraction of the
    variance each axis explains (2,). Fewer than 2 axes with variance: the missing ones are 0."""
    centred = points - points.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    axes = np.zeros((2, points.shape[1]))
    axes[: min(2, len(vt))] = vt[:2]
    total = float(np.sum(s**2))
    explained = np.zeros(2)
    if total > 0:
        explained[: min(2, len(s))] = s[:2] ** 2 / total
    return centred @ axes.T, explained


def trial_metrics(ranking: Ranking) -> pd.DataFrame:
    """One row per finished trial: its params and every metric kept in its user attributes, plus
    ``gap`` = val/loss − train/loss (the observed generalization gap) and ``lr/b``."""
    rows = []
    for t in ranking.study.get_trials(deepcopy=False):
        if t.state.name != "COMPLETE":
            continue
        numbers = {
            k: v for k, v in t.user_attrs.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        rows.append({"trial": t.number, **t.params, **numbers})
    table = pd.DataFrame(rows)
    table["gap"] = table["val/loss"] - table["train/loss"]
    table["lr/b"] = table["learning_rate"] / table["batch_size"]
    table["lr_bin"] = log_bins(table["learning_rate"].to_numpy())
    return table


def correlations(metrics: pd.DataFrame) -> pd.DataFrame:
    """Kendall's τ and the granulated Ψ (with ψ per hyperparameter) of each measure against the gap.

    Granulation groups trials that share every other hyperparameter; a learning rate sampled on a
    continuous scale is first put in log bins (:func:`log_bins`), else no two trials would share one.
    """
    hparams = pd.DataFrame({"learning_rate": metrics["lr_bin"], "batch_size": metrics["batch_size"]})
    rows = []
    for measure in MEASURES:
        if measure not in metrics:
            continue
        psi, parts = granulated_kendall(metrics[measure], metrics["gap"], hparams)
        rows.append(
            {
                "measure": measure,
                "tau": kendall_tau(metrics[measure], metrics["gap"]),
                "Psi": psi,
                **{f"psi_{k}": v for k, v in parts.items()},
            }
        )
    return pd.DataFrame(rows)


def selected_trials(metrics: pd.DataFrame, recommended: int | None) -> dict[int, str]:
    """The few trials whose trajectories are drawn: trial number → why it was chosen."""
    chosen: dict[int, str] = {}
    if recommended is not None:
        chosen[recommended] = "recommended"
    for column, why in (("val/loss", "lowest val loss"), ("bound/risk_bound", "lowest bound")):
        chosen.setdefault(int(metrics.loc[metrics[column].idxmin(), "trial"]), why)
    chosen.setdefault(int(metrics.loc[metrics["bound/risk_bound"].idxmax(), "trial"]), "highest bound")
    return chosen


# ---------------------------------------------------------------------------------------------
# Reading what the plots need from MLflow
# ---------------------------------------------------------------------------------------------


@dataclass
class StudyRecords:
    metrics: pd.DataFrame  # trial_metrics()
    curves: dict[int, dict[str, pd.Series]]  # trial → curve name → values indexed by step
    trajectories: dict[int, dict[str, np.ndarray]]  # selected trial → npz arrays
    selected: dict[int, str]
    runs: dict[int, Any] = field(default_factory=dict)  # trial → its MLflow run (metrics, tags)
    links: dict[int, str] = field(default_factory=dict)  # trial → its run in the MLflow UI
    views: dict[str, str] = field(default_factory=dict)  # mlflow_views.VIEWS name → URL


def read_records(ranking: Ranking, tracker: Tracker) -> StudyRecords:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a report, not a download log
    metrics = trial_metrics(ranking)
    run_ids = {t.number: t.user_attrs.get("mlflow_run_id") for t in ranking.study.get_trials(deepcopy=False)}
    runs, links, views = _runs_and_links(ranking, tracker, run_ids)
    curves = {}
    for number in metrics["trial"]:
        curves[int(number)] = {
            name: _history(tracker, run_ids[number], name) for name in ("val/loss", "train/minibatch_loss")
        }
    selected = selected_trials(metrics, ranking.recommended)
    trajectories = {}
    with tempfile.TemporaryDirectory() as tmp:
        for number in selected:
            path = tracker.client.download_artifacts(run_ids[number], "trajectories.npz", tmp)
            with np.load(path) as npz:
                trajectories[number] = {k: npz[k] for k in npz.files}
    return StudyRecords(metrics, curves, trajectories, selected, runs, links, views)


def _runs_and_links(ranking: Ranking, tracker: Tracker, run_ids: dict[int, str | None]):
    """Every trial's MLflow run (one search), its UI link, and the study's MLflow views."""
    from hsgd_tune.track.views import run_url, study_views, ui_base

    any_run = next((r for r in run_ids.values() if r), None)
    if any_run is None:
        return {}, {}, {}
    experiment_id = tracker.client.get_run(any_run).info.experiment_id
    runs = tracker.trial_runs(experiment_id, ranking.name)
    base = ui_base(tracker)
    links = {n: run_url(base, experiment_id, r.info.run_id) for n, r in runs.items()}
    # Reading writes nothing: the views' tags are written when the report is logged (_log), and by
    # `run` and `ui`.
    return runs, links, study_views(tracker, experiment_id, ranking.name, base, write=False)


def _history(tracker: Tracker, run_id: str, key: str) -> pd.Series:
    history = tracker.client.get_metric_history(run_id, key)
    series = pd.Series({m.step: m.value for m in history}, dtype=float)  # last value per step wins
    return series.sort_index()


# ---------------------------------------------------------------------------------------------
# The plots: one function per PNG
# ---------------------------------------------------------------------------------------------


def plot_pareto(ranking: Ranking, metrics: pd.DataFrame, path: Path) -> None:
    """Validation loss vs risk bound; the front joined, the recommended trial starred, and the
    rule's tolerance band shaded when it applies to validation loss."""
    front = set(ranking.table.loc[ranking.table["pareto_rank"] == 1, "trial"])
    x, y = metrics["val/loss"], metrics["bound/risk_bound"]
    on_front = metrics["trial"].isin(front)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    ax.scatter(x[~on_front], y[~on_front], c="0.6", label="other trials")
    ax.scatter(x[on_front], y[on_front], c="tab:blue", label="Pareto front (study objectives)")
    if ranking.rule.within == "val_loss":
        limit = x.min() + ranking.rule.tolerance * abs(x.min())
        ax.axvspan(
            x.min(),
            limit,
            color="tab:green",
            alpha=0.15,
            label=f"val loss within {ranking.rule.tolerance:.0%}",
        )
    if ranking.recommended is not None:
        row = metrics[metrics["trial"] == ranking.recommended].iloc[0]
        ax.scatter(
            row["val/loss"], row["bound/risk_bound"], marker="*", s=300, c="tab:red", label="recommended"
        )
    # Labels only where they matter (the front, the star); the rest is in the interactive page.
    for k, (_, row) in enumerate(metrics[on_front].sort_values("val/loss").iterrows()):
        ax.annotate(
            str(int(row["trial"])),
            (row["val/loss"], row["bound/risk_bound"]),
            fontsize=7,
            xytext=(4, 4 if k % 2 else -9),  # alternate sides: neighbours' labels do not overlap
            textcoords="offset points",
        )
    if rp.spans_decades(y):
        ax.set_yscale("log")
    if rp.spans_decades(x):
        ax.set_xscale("log")
    ax.set(
        xlabel="validation loss",
        ylabel="risk bound (clipped loss)",
        title=f"{ranking.name}: validation loss vs bound",
    )
    ax.legend(fontsize=8)
    _save(fig, path)


def plot_heatmap(metrics: pd.DataFrame, column: str, title: str, path: Path) -> None:
    """Mean of ``column`` per (learning-rate bin, batch size) cell, the value written in the cell.

    Colours on a log scale when the values span more than a factor 4 (one outlier would otherwise
    paint every other cell alike); text dark on light cells and light on dark ones; cells without a
    trial say so."""
    from matplotlib.colors import LogNorm, Normalize

    grid = metrics.pivot_table(index="lr_bin", columns="batch_size", values=column, aggfunc="mean")
    counts = metrics.pivot_table(index="lr_bin", columns="batch_size", values=column, aggfunc="count")
    fig, ax = plt.subplots(figsize=(1.2 * grid.shape[1] + 2.5, 0.6 * grid.shape[0] + 2))
    values = grid.to_numpy(dtype=float)
    finite = values[np.isfinite(values)]
    log = finite.size > 1 and finite.min() > 0 and finite.max() / finite.min() > rp.LOG_SPAN
    norm = LogNorm(finite.min(), finite.max()) if log else Normalize(finite.min(), finite.max())
    cmap = plt.get_cmap("viridis")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto", origin="lower")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            if not np.isfinite(values[i, j]):
                ax.text(j, i, "no trial", ha="center", va="center", fontsize=6, color="0.55")
                continue
            n = int(counts.iloc[i, j])
            r, g, b, _ = cmap(norm(values[i, j]))
            light = 0.299 * r + 0.587 * g + 0.114 * b > 0.5  # perceived luminance of the cell
            text = f"{values[i, j]:.3g}" + (f"\n(mean of {n})" if n > 1 else "")
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if light else "white")
    ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
    ax.set_yticks(range(grid.shape[0]), [f"{v:.3g}" for v in grid.index])
    scale = ", log colour scale" if log else ""
    ax.set(xlabel="batch size", ylabel="learning rate (bin centre)", title=f"{title} (mean per cell{scale})")
    fig.colorbar(image, ax=ax)
    _save(fig, path)


def plot_decomposition(metrics: pd.DataFrame, recommended: int | None, path: Path) -> None:
    """The risk bound's terms (``report_page.bound_terms``): one row per trial, one dot per term on a
    log axis (stacked bars on a linear one hid the small terms), the sum as a grey bar."""
    table = metrics.sort_values("bound/risk_bound")
    parts = {rp.BOUND_TERMS[key][0]: values for key, values in rp.bound_terms(table).items()}
    labels = [f"{int(t)}{' ★' if t == recommended else ''}" for t in table["trial"]]
    fig, ax = plt.subplots(figsize=(6.4, 0.25 * len(table) + 1.8))
    ax.barh(labels, table["bound/risk_bound"], color="0.9", label="risk bound (the sum)")
    for name, values in parts.items():
        ax.scatter(values, labels, s=18, zorder=3, label=name)
    ax.axvline(float(table["bound/loss_clip"].iloc[0]), color="k", ls="--", lw=1, label="B (vacuous beyond)")
    ax.set_xscale("log")
    ax.set(xlabel="value (log scale)", ylabel="trial (★ recommended)", title="What the bound is made of")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=3)
    _save(fig, path)


def plot_trajectories(records: StudyRecords, path: Path) -> None:
    """Both trajectories of each selected trial, projected jointly on their two principal axes."""
    n = len(records.selected)
    cols = min(n, 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 4.2 * rows), squeeze=False)
    # n panels on a rows × cols grid: the last row may have empty places (switched off below).
    for ax, (number, why) in zip(axes.flat, records.selected.items(), strict=False):
        arrays = records.trajectories[number]
        s, h = arrays["empirical"], arrays["reference"]  # (N, p) each
        projected, explained = pca_2d(np.concatenate([s, h]))
        ps, ph = projected[: len(s)], projected[len(s) :]
        ax.plot(ps[:, 0], ps[:, 1], "-o", ms=2, label="empirical (S)")
        ax.plot(ph[:, 0], ph[:, 1], "-o", ms=2, label="reference (H)")
        ax.scatter(*ps[0], c="k", marker="s", zorder=3, label="start")
        ax.scatter(
            [ps[-1, 0], ph[-1, 0]], [ps[-1, 1], ph[-1, 1]], c="tab:red", marker="x", zorder=3, label="end"
        )
        ax.set(
            title=f"trial {number} ({why})",
            xlabel=f"PC1 ({explained[0]:.0%})",
            ylabel=f"PC2 ({explained[1]:.0%})",
        )
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    _save(fig, path)


def plot_learning_curves(records: StudyRecords, recommended: int | None, path: Path) -> None:
    """Validation loss and S-run minibatch loss over steps; the recommended trial in colour."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, name in zip(axes, ("val/loss", "train/minibatch_loss"), strict=True):
        for number, curves in records.curves.items():
            series = curves[name]
            style = {"c": "tab:red", "lw": 2, "zorder": 3, "label": f"trial {number} (recommended)"}
            ax.plot(
                series.index, series.values, **(style if number == recommended else {"c": "0.7", "lw": 0.8})
            )
        ax.set(xlabel="step", ylabel=name, yscale="log", title=name)
        if recommended is not None:
            ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

PLOTS = {
    "pareto.png": "Validation loss against the risk bound. Blue: the Pareto front over the study's "
    "objectives; star: the recommended trial; green band: the rule's tolerance on validation loss.",
    "decomposition.png": "The risk bound of each trial split into its terms; beyond the dashed line B "
    "it is vacuous (it still ranks trials). L̂ is an estimate, so the bound is not a certificate.",
    "trajectories.png": "Both SGD trajectories of selected trials (empirical on S, reference on H, "
    "same noise), projected on their two principal axes; their distance drives the bound.",
    "learning_curves.png": "Validation loss and minibatch training loss over the steps, all finished trials.",
}


#: Written last into every report folder: the files the tool wrote there. A folder without it, or
#: holding anything else, is not (only) a report, and is never replaced.
REPORT_MARKER = ".hsgd-report"


def write_report(
    ranking: Ranking,
    cfg: StudyConfig,
    tracker: Tracker,
    out: Path,
    log_to_mlflow: bool = True,
    force: bool = False,
) -> Path:
    """Write the plots and ``index.html`` to ``out``, log them to the study's parent run under
    ``report/``, and return the page's path.

    Nothing the tool did not write is ever deleted: the report is drawn in a fresh folder next to
    ``out`` and renamed into place; an earlier report there (its marker lists every file in it) is
    replaced whole; any other existing folder is refused, unless ``force``, and then the report's
    files are written into it, beside what is there. Everything is read and checked first, so a
    failure leaves ``out`` as it was."""
    out = Path(os.path.abspath(out))  # '.' and '..' resolved, so the folder has a name and a parent
    replace = _check_report_folder(out, force)
    records = read_records(ranking, tracker)
    corr = correlations(records.metrics)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    except OSError as exc:
        raise ConfigError("--out", f"must be a folder we can write in ({exc.strerror})", str(out)) from None
    try:
        heatmaps = _draw(ranking, records, staging)
        page = _page(ranking, cfg, records, corr, heatmaps)
        (staging / "index.html").write_text(page, encoding="utf-8")
        (staging / "ranking.md").write_text(markdown_table(ranking.table) + "\n", encoding="utf-8")
        if log_to_mlflow:
            _log(ranking, tracker, staging)
        names = sorted(p.name for p in staging.iterdir())
        (staging / REPORT_MARKER).write_text(json.dumps({"files": names}) + "\n", encoding="utf-8")
        _place(staging, out, replace)
    finally:
        if staging.exists():  # only ever our own staging folder
            shutil.rmtree(staging, ignore_errors=True)
    return out / "index.html"


def _check_report_folder(out: Path, force: bool) -> str:
    """How to put a report at ``out``: "new" (nothing there), "replace" (an earlier report, every file
    in it ours) or "into" (another folder, with ``force``); refuse anything else."""
    if not out.exists() and not out.is_symlink():
        return "new"
    if not out.is_dir() or out.is_symlink():
        raise ConfigError("--out", "must be a folder (it is a file or a link)", str(out))
    if _is_report(out):
        return "replace"
    if not force:
        raise ConfigError(
            "--out",
            "is an existing folder that is not a report of this tool; choose another folder, or pass "
            "--force to write the report's files into it (nothing in it is deleted)",
            str(out),
        )
    return "into"  # with --force the files are written beside what is there: nothing is deleted


def _is_report(folder: Path) -> bool:
    """The marker is there and lists every file in the folder (and nothing else was added)."""
    try:
        listed = set(json.loads((folder / REPORT_MARKER).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    present = {p.name for p in folder.iterdir()} - {REPORT_MARKER}
    return present <= listed and all((folder / n).is_file() for n in present)


def _place(staging: Path, out: Path, how: str) -> None:
    if how == "new":
        staging.rename(out)
    elif how == "replace":  # swap, then delete the old report (every file in it is ours)
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-old-"))
        old.rmdir()
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old)
    else:  # "into" (--force): our files beside the folder's own; the marker is not ours to leave there
        for item in staging.iterdir():
            if item.name != REPORT_MARKER:
                shutil.copy2(item, out / item.name)


def _draw(ranking: Ranking, records: StudyRecords, folder: Path) -> dict[str, str]:
    metrics = records.metrics
    plot_pareto(ranking, metrics, folder / "pareto.png")
    heatmaps = {}
    for column, (stem, title) in HEATMAPS.items():
        if column in metrics and metrics[column].notna().any():
            name = f"heatmap_{stem}.png"
            plot_heatmap(metrics, column, title, folder / name)
            heatmaps[name] = f"{title} over learning rate × batch size."
    plot_decomposition(metrics, ranking.recommended, folder / "decomposition.png")
    plot_trajectories(records, folder / "trajectories.png")
    plot_learning_curves(records, ranking.recommended, folder / "learning_curves.png")
    return heatmaps


def _page(
    ranking: Ranking, cfg: StudyConfig, records: StudyRecords, corr: pd.DataFrame, heatmaps: dict[str, str]
) -> str:
    """The interactive page (report_page.py): the answer first, then the views that back it."""
    from plotly.offline import get_plotlyjs

    metrics = records.metrics
    facts = html.escape(
        f"{len(metrics)} finished trials of {len(ranking.table)}; objectives: {', '.join(cfg.objectives)}; "
        f"data: {cfg.data.source} (n_train = {cfg.data.n_train}); δ = {cfg.bound.delta:g}, "
        f"B = {cfg.bound.loss_clip:g}."
    )
    sections = [
        rp.section("decision", "The decision", _decision(ranking, records)),
        rp.section("certificates", "Certificates", _certificates(ranking, records)),
        rp.section("search", "Search space (Optuna's views)", _search_space(ranking)),
        rp.section("bound", "What the bound is made of", _bound(ranking, records, corr)),
        rp.section("trajectories", "Trajectories", _trajectories(records)),
        rp.section(
            "curves",
            "Learning curves",
            rp.fig_html(rp.learning_curve_figure(records.curves, ranking.recommended), 480),
        ),
        rp.section("trials", "All trials, ranked", _all_trials(ranking, records, heatmaps)),
    ]
    return rp.page(
        title=f"hsgd-tune report: {ranking.name}",
        facts=facts,
        answer=_answer(ranking, records),
        sections=sections,
        plotly_js=get_plotlyjs(),
    )


def _answer(ranking: Ranking, records: StudyRecords) -> str:
    n_close = _candidates(ranking)
    lines = [f"<p><b>{html.escape(ranking.summary())}</b></p>"]
    run = records.runs.get(ranking.recommended)
    heldout = run.data.metrics.get(HELDOUT_CERTIFICATE) if run is not None else None
    if heldout is not None:  # about the very weights that are served: the first thing to say
        lines.append(
            f"<p>Its held-out certificate: the model itself (its final weights) errs with probability at "
            f"most <b>{heldout:.3f}</b> on new data, with probability ≥ 1 − δ (kl bound from its errors on "
            "H, which it never trained on).</p>"
        )
    certificate = run.data.metrics.get(CERTIFICATE) if run is not None else None
    if certificate is not None:
        trivial = run.data.metrics.get("certificate/trivial", float("nan"))
        lines.append(
            "<p>Its PAC-Bayes certificate: the stochastic predictor Q around it errs with probability "
            f"at most <b>{certificate:.3f}</b> (trivial {trivial:.3g}), with probability ≥ 1 − δ over the "
            "data.</p>"
        )
    elif ranking.recommended is not None:
        lines.append(
            "<p>It has no certificate yet: <code>hsgd-tune certify STUDY --trials "
            f"{ranking.recommended}</code> (or <code>hsgd-tune pick</code>) computes it.</p>"
        )
    rule = ranking.rule
    how_sure = (
        f"How sure: {n_close} trial(s) met the tolerance on {html.escape(rule.within)}, so "
        f"{html.escape(rule.prefer)} chose among {n_close}. "
        if rule.tolerance > 0 and rule.prefer != rule.within
        else ""
    )
    lines.append(
        f"<p class=muted>{how_sure}"
        + " ".join(
            rp.run_link(url, f"MLflow: {what}") + "."
            for url, what in (
                (records.links.get(ranking.recommended), "the recommended run"),
                (records.views.get("trials"), "all trials, ranked"),
            )
            if url
        )
        + " (MLflow links open the UI that <code>hsgd-tune ui</code> starts.)</p>"
    )
    return "\n".join(lines)


def _decision(ranking: Ranking, records: StudyRecords) -> str:
    objectives = list(ranking.study.user_attrs.get("objectives", []))
    recommended = ranking.trial(ranking.recommended) if ranking.recommended is not None else None
    band, rule = None, ranking.rule
    banded = rule.tolerance > 0 and rule.prefer != rule.within  # else the rule is "the smallest within"
    if banded and rule.within in objectives:
        best = float(ranking.table[rule.within].min())
        band = (objectives.index(rule.within), best, best + rule.tolerance * abs(best))
    fig, why = rp.pareto_figure(ranking.study, objectives, recommended, band)
    how = (
        f"the green band holds the trials whose {html.escape(rule.within)} is within {rule.tolerance:.0%} "
        f"of the best; among them the rule takes the smallest {html.escape(rule.prefer)} (red star)"
        if banded
        else f"the rule takes the trial with the smallest {html.escape(rule.within)} (red star)"
    )
    note = (
        f"<p class=muted>Each point is a finished trial (hover for its parameters); {how}. Axes are "
        f"logarithmic where values span more than a factor {rp.LOG_SPAN:g}.</p>"
    )
    title = f"Near the best {ranking.rule.within}: the rule's choice up close"
    close = rp.candidates_figure(
        ranking.table, ranking.rule.within, ranking.rule.prefer, ranking.rule.tolerance, ranking.recommended
    )
    pareto = rp.figure_block(
        "Pareto front over the study's objectives (hover: trial and parameters)", fig, why, 520
    )
    zoom = rp.figure_block(title, close, "no trial has both values", 520)
    return f'<div class="grid">{pareto}{zoom}</div>' + note


def _certificates(ranking: Ranking, records: StudyRecords) -> str:
    rows = []
    for number, run in sorted(records.runs.items()):
        m = run.data.metrics
        if CERTIFICATE not in m:
            continue
        params = ranking.trial(number).params if number in set(records.metrics["trial"]) else {}
        rows.append(
            {
                "trial": number,
                **{k: params.get(k) for k in ("learning_rate", "batch_size")},
                "train/error": m.get("train/error", np.nan),
                "val/error": m.get("val/error", np.nan),
                HELDOUT_CERTIFICATE: m.get(HELDOUT_CERTIFICATE, np.nan),
                "certificate/perturbed_bound": m.get("certificate/perturbed_bound", np.nan),
                CERTIFICATE: m[CERTIFICATE],
                "certificate/trivial": m.get("certificate/trivial", np.nan),
                "certificate/kl": m.get("certificate/kl", np.nan),
                "vacuous": run.data.tags.get("hsgd.vacuous.certificate", "-"),
                "recommended": number == ranking.recommended,
            }
        )
    if not rows:
        return (
            "<p>No trial has a certificate yet: <code>hsgd-tune certify STUDY</code> certifies the Pareto "
            "front.</p>"
        )
    note = certified_note(ranking.table, [r["trial"] for r in rows], ranking.name)
    note = f"<p><b>{html.escape(note)}</b></p>" if note else ""
    table = pd.DataFrame(rows)
    columns = [c for c in table.columns if c != "recommended"]
    explain = (
        "<p class=muted>Every certificate here holds with probability ≥ 1 − δ for all configurations at "
        "once, whatever the sampler did (a union over the configuration grid), with no estimate in it. "
        "<b>certificate/heldout_error</b>: the error of the trial's final weights (the model that is "
        "served), from its errors on H. <b>certificate/perturbed_bound</b>: the error of the weights "
        "perturbed by N(0, σ²I), with the reference run as prior (the seed paper's setting). "
        "<b>certificate/bound</b> (PAC-Bayes-kl): the error of the stochastic predictor Q (weights "
        "drawn around the trial's final weights). Training and validation errors are of "
        "the final weights themselves: estimates, not guarantees. Vacuous: the certificate is at least "
        "min(trivial, 0.5), so it cannot rule out an error as large as a constant guess's or a coin "
        "flip's.</p>"
    )
    figure = rp.fig_html(rp.certificate_figure(table, ranking.recommended), 420)
    return note + explain + rp.trials_table_html(table, records.links, columns) + figure


def _search_space(ranking: Ranking) -> str:
    objectives = list(ranking.study.user_attrs.get("objectives", []))
    blocks = [
        rp.figure_block(t, f, why, 420) for t, f, why in rp.search_space_views(ranking.study, objectives)
    ]
    note = (
        "<p class=muted>Optuna's own views. Contours are interpolated between trials: trust them where "
        "the dots are. Objectives that span decades are shown as log10.</p>"
    )
    return note + f'<div class="grid">{"".join(blocks)}</div>'


def _bound(ranking: Ranking, records: StudyRecords, corr: pd.DataFrame) -> str:
    height = 170 + 22 * len(records.metrics)
    figure = rp.fig_html(rp.decomposition_figure(records.metrics, ranking.recommended), height)
    main = corr[corr["measure"] == "bound/risk_bound"].iloc[0]
    parts = ", ".join(f"ψ_{c[4:]} = {main[c]:.3f}" for c in corr.columns if c.startswith("psi_"))
    text = (
        "<p class=muted>Risk bound = R̂_S,B at the reference iterate nearest the final S-iterate + "
        "complexity C + L_pop·d (DESIGN.md §2). L_pop, the norm of the mean gradient of the clipped loss "
        "along the segment, is estimated on V, so the risk bound is an estimate, not a certificate; "
        "above B it is vacuous.</p>"
        f"<p>Across the study the risk bound orders trials like the observed gap (val loss − train "
        f"loss) with Kendall's τ = {main['tau']:.3f} and granulated Kendall Ψ = {main['Psi']:.3f} "
        f"({parts}). τ near 1: the bound ranks like the gap; a small ψ for one hyperparameter: the "
        "bound does not track the gap when only that hyperparameter changes.</p>"
    )
    table = corr.to_html(index=False, float_format=lambda v: f"{v:.3f}", na_rep="-")
    more = (
        f"<p class=muted>Granulated Kendall groups trials that share the other hyperparameter; learning "
        f"rates are put in {MAX_LR_BINS} log-scale bins first when they were sampled on a continuous "
        "scale. <code>lr/b</code> and <code>val/loss</code> are baselines (val/loss is part of the gap "
        "itself).</p>"
    )
    return figure + text + table + more


def _trajectories(records: StudyRecords) -> str:
    decoupling = dict(
        zip(records.metrics["trial"], records.metrics["bound/decoupling_distance"], strict=True)
    )
    distance, panels = rp.trajectory_figures(records.trajectories, records.selected, decoupling, pca_2d)
    note = (
        "<p class=muted>The empirical run trains on S, the reference run on H, from the same start with "
        "the same minibatch positions; D, the one-way distance (each recorded S-iterate to its nearest "
        "recorded H-iterate, the largest of these), drives the bound; it is at most the largest "
        "step-by-step distance, since it pairs each iterate with the closest iterate of the other run at "
        "any step. Projections are per trial (their own "
        "principal axes) on a common scale.</p>"
    )
    return note + rp.fig_html(distance, 420) + rp.fig_html(panels)


def _all_trials(ranking: Ranking, records: StudyRecords, heatmaps: dict[str, str]) -> str:
    table = ranking.table
    certificates = {
        n: r.data.metrics[CERTIFICATE] for n, r in records.runs.items() if CERTIFICATE in r.data.metrics
    }
    if certificates and "certificate" not in table:
        table = table.assign(certificate=table["trial"].map(certificates).astype(float))
    constant = [c for c in table.columns if c not in ("trial",) and table[c].astype(str).nunique() <= 1]
    columns = [c for c in table.columns if c not in constant or c == "recommended"]
    pngs = ["pareto.png", *heatmaps, *[k for k in PLOTS if k != "pareto.png"]]
    static = "".join(f'<a href="{n}"><img src="{n}" alt="{n}"></a>' for n in pngs)
    return (
        rp.trials_table_html(table, records.links, columns)
        + f"<p class=muted>Rule: {html.escape(rule_text(ranking.rule))}. Columns with one value for every "
        f"trial are left out ({html.escape(', '.join(constant)) or 'none'}). Ranking as Markdown: "
        '<a href="ranking.md">ranking.md</a>.</p>'
        + "<h3>Static images (also in the MLflow parent run, under report/)</h3>"
        + f'<div class="pngs">{static}</div>'
    )


def _candidates(ranking: Ranking) -> int:
    table = ranking.table[ranking.table["state"] == "COMPLETE"]
    values = table[ranking.rule.within]
    best = values.min()
    return int((values <= best + ranking.rule.tolerance * abs(best)).sum())


def _log(ranking: Ranking, tracker: Tracker, out: Path) -> None:
    """Log the report to the study's parent run (found through any trial's run)."""
    run_id = next(
        (
            t.user_attrs["mlflow_run_id"]
            for t in ranking.study.get_trials(deepcopy=False)
            if "mlflow_run_id" in t.user_attrs
        ),
        None,
    )
    experiment_id = tracker.client.get_run(run_id).info.experiment_id
    parent = tracker.parent_run_id(experiment_id, ranking.name)
    if parent is not None:
        tracker.client.log_artifacts(parent, str(out), artifact_path="report")
    from hsgd_tune.track.views import study_views, ui_base

    study_views(tracker, experiment_id, ranking.name, ui_base(tracker))  # the page links to them


__all__ = ["correlations", "log_bins", "pca_2d", "write_report", "METRIC_ATTRS"]
