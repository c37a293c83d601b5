"""Links into the MLflow UI that open on what a user of this tool wants to see.

MLflow 3's experiment page reads its search facets (``searchFilter``, ``orderByKey``, ``orderByAsc``) from
the URL, but its columns only from a *shared view state*: an experiment tag
``mlflow.sharedViewState.<key>`` holding the page state as JSON, opened with ``?viewStateShareKey=<key>``
(what the UI's own "Share" button writes). A view here is such a tag, written once per (study, view),
and a URL that opens it: the trial runs (not the study's parent run), ranked, with the rank, the
recommendation, the sampled values, validation loss, the bound and the certificate as columns.

MLflow 3.17's UI also keeps a global "GenAI / Model training" switch (``mlflow.workflowType`` in the
browser's storage, GenAI by default) that overrides the experiment's kind tag; a link carries
``workflowType=machine_learning`` so that it opens in model-training mode on any browser.

Links point at the MLflow UI that ``hsgd-tune ui`` starts (:data:`LOCAL_UI`), or at the tracking server
when ``MLFLOW_TRACKING_URI`` names one.
"""

from __future__ import annotations

import hashlib
import json

from hsgd_tune.track.tracker import EXPERIMENT_KIND, ROLE_TAG, STUDY_TAG, Tracker

LOCAL_UI = "http://127.0.0.1:5000"
SHARED_VIEW_TAG = "mlflow.sharedViewState."


def column(kind: str, name: str) -> str:
    """A runs-table column as the MLflow UI names it: ``metrics.`val/loss```."""
    return f"{kind}.`{name}`"


#: The columns of every view, left to right: the decision first (the page may be narrow).
COLUMNS = (
    column("metrics", "rank/order"),
    column("metrics", "rank/pareto_rank"),
    column("tags", "hsgd.recommended"),
    column("metrics", "val/loss"),
    column("metrics", "bound/risk_bound"),
    column("metrics", "certificate/bound"),
    column("params", "learning_rate"),
    column("params", "batch_size"),
    column("metrics", "val/error"),
    column("tags", "optuna.state"),
)

#: View name → (what it shows, extra filter).
VIEWS = {
    "trials": ("every trial, ranked", ""),
    "recommended": ("the recommended trial", f" AND {column('tags', 'hsgd.recommended')} = 'true'"),
}


def ui_base(tracker: Tracker, port: int | None = None) -> str:
    """Where the MLflow UI of ``tracker``'s store is: the tracking server, or ``hsgd-tune ui``'s."""
    if tracker.uri.startswith(("http://", "https://")):
        return tracker.uri.rstrip("/")
    return LOCAL_UI if port is None else f"http://127.0.0.1:{port}"


#: Query parameter of every link: open the UI in model-training mode (module doc).
TRAINING_MODE = "workflowType=machine_learning"


def experiment_url(base: str, experiment_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?{TRAINING_MODE}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{TRAINING_MODE}"


def view_state(study: str, view: str) -> dict:
    """The page state of one view (MLflow's search facets and runs-table UI state)."""
    trials = f"{column('tags', ROLE_TAG)} = 'trial' AND {column('tags', STUDY_TAG)} = '{study}'"
    return {
        "searchFilter": trials + VIEWS[view][1],
        "orderByKey": column("metrics", "rank/order"),  # the rule's order: the recommended trial first
        "orderByAsc": True,
        "selectedColumns": list(COLUMNS),
        "columnOrder": list(COLUMNS),
        "runListHidden": False,
        "viewMaximized": False,
    }


def view_key(study: str, view: str) -> tuple[str, str]:
    """(key, state as JSON) of one view: the key is a hash of the state, so it names that state."""
    state = json.dumps(view_state(study, view), sort_keys=True)
    return f"hsgd-{view}-{hashlib.sha256(state.encode()).hexdigest()[:12]}", state


def view_url(experiment_id: str, study: str, view: str, base: str) -> str:
    """The URL that opens a view (its tag is written by :func:`study_views`)."""
    key, _ = view_key(study, view)
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}&{TRAINING_MODE}"


def study_views(
    tracker: Tracker, experiment_id: str, study: str, base: str, write: bool = True
) -> dict[str, str]:
    """Every view's URL: {"trials": ..., "recommended": ...}; with ``write``, the views' shared
    states are (re)written on the experiment first (idempotent)."""
    if write:
        for view in VIEWS:
            key, state = view_key(study, view)
            tracker.client.set_experiment_tag(experiment_id, SHARED_VIEW_TAG + key, state)
    return {view: view_url(experiment_id, study, view, base) for view in VIEWS}


def mark_custom_model_experiment(tracker: Tracker, experiment_id: str) -> None:
    """Tag an experiment (made by an older version, or by hand) so MLflow 3 opens it on its runs."""
    experiment = tracker.client.get_experiment(experiment_id)
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            tracker.client.set_experiment_tag(experiment_id, key, value)
