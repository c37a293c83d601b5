"""``hsgd-tune ui``: the MLflow UI (and optuna-dashboard, if installed) on a study's stores, with links
that open the study's trials ranked (track/views.py).

Both listen on 127.0.0.1 only: the stores hold everything about the study, and neither UI has a login.
The servers run in their own process groups, so stopping ``hsgd-tune ui`` (Ctrl-C or SIGTERM) stops
them and every worker they started.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from hsgd_tune.advise.ranking import rank_study, stored_config, write_to_mlflow
from hsgd_tune.errors import ConfigError, HsgdError
from hsgd_tune.search.storage import DEFAULT_JOURNAL, database_url, storage_description
from hsgd_tune.search.study import lookup_study
from hsgd_tune.studyfile.config import load_study
from hsgd_tune.track.tracker import Tracker
from hsgd_tune.track.views import VIEWS, experiment_url, mark_custom_model_experiment, study_views, ui_base

HOST = "127.0.0.1"
START_TIMEOUT_S = 180.0  # MLflow's server takes a minute to start on a busy 2-core machine


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def mlflow_command(tracking_uri: str, port: int) -> list[str]:
    # One worker: a local UI has one user, and MLflow's default of 4 is heavy on a laptop.
    return [
        *(sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri),
        *("--host", HOST, "--port", str(port), "--workers", "1"),
    ]


def dashboard_command(storage: str | None, port: int) -> list[str] | None:
    """optuna-dashboard (the ``dashboard`` extra) on the study's storage, or None when it is not
    installed. The one next to this Python first: a virtual env need not be on PATH."""
    beside = Path(sys.executable).parent / "optuna-dashboard"
    exe = str(beside) if beside.is_file() else shutil.which("optuna-dashboard")
    if exe is None:
        return None
    url = database_url(storage) if storage and "://" in storage else storage or str(DEFAULT_JOURNAL)
    return [exe, url, "--host", HOST, "--port", str(port)]


def mlflow_links(tracker: Tracker, study, cfg, base: str) -> list[str]:
    """The lines that open the study in the MLflow UI at ``base``: the experiment, every trial
    ranked, the recommended trial. Ranks the study first, so the views have ranks to show."""
    experiment = tracker.experiment_id(cfg.experiment_name, create=False)
    if experiment is None:
        return [f"MLflow UI: {base} (no experiment {cfg.experiment_name!r} yet: run the study first)"]
    mark_custom_model_experiment(tracker, experiment)
    lines = [f"MLflow UI: {experiment_url(base, experiment)}"]
    if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        write_to_mlflow(rank_study(study, cfg.rank), tracker)
        views = study_views(tracker, experiment, study.study_name, base)
        lines += [f"  {VIEWS[name][0]}: {url}" for name, url in views.items()]
    return lines


def serve(ref: str, storage: str | None, port: int, dashboard_port: int) -> int:
    """Start the UIs, print their URLs, and wait until interrupted."""
    cfg = None
    if Path(ref).suffix == ".toml" or Path(ref).is_file():
        cfg = load_study(ref, import_code=False)  # the UI runs no user code
        ref, storage = cfg.name, storage or cfg.run.storage
    study = lookup_study(storage, ref)
    if study is None:
        raise HsgdError(f"no study named {ref!r} in {storage_description(storage)}")
    cfg = cfg or stored_config(study)
    tracker = Tracker()
    if tracker.uri.startswith(("http://", "https://")):
        print("\n".join(mlflow_links(tracker, study, cfg, ui_base(tracker))))
        print("(the tracking server already serves the MLflow UI)")
        return 0
    dashboard = dashboard_command(storage, dashboard_port)
    ports = {"--port": port, **({"--dashboard-port": dashboard_port} if dashboard is not None else {})}
    for option, p in ports.items():  # before anything is written (the links write MLflow tags)
        if not 0 < p < 65536 or not port_is_free(p):
            raise ConfigError(option, f"must be a free port on {HOST}", p)
    links = mlflow_links(tracker, study, cfg, ui_base(tracker, port))
    commands = {"MLflow UI": (mlflow_command(tracker.uri, port), port, "/health", links)}
    if dashboard is not None:
        commands["optuna-dashboard"] = (
            dashboard,
            dashboard_port,
            "/",
            [f"optuna-dashboard: http://{HOST}:{dashboard_port}/"],
        )
    signal.signal(signal.SIGTERM, _interrupt)
    processes = []
    try:
        for what, (cmd, p, probe, lines) in commands.items():
            proc = subprocess.Popen(
                cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            processes.append(proc)
            wait_until_up(proc, f"http://{HOST}:{p}{probe}", what)
            print("\n".join(lines), flush=True)
        if dashboard is None:
            print('optuna-dashboard: not installed (pip install -e ".[dashboard]")', flush=True)
        print("Ctrl-C to stop.", flush=True)
        processes[0].wait()
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in processes:
            stop(proc)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def wait_until_up(proc: subprocess.Popen, url: str, what: str) -> None:
    """Poll ``url`` until it answers; a server that exits first is an error with its last line."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            lines = (proc.stderr.read() or b"").decode(errors="replace").strip().splitlines()
            raise HsgdError(
                f"{what} exited with code {proc.returncode}: {lines[-1] if lines else 'no output'}"
            )
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise HsgdError(f"{what} did not answer at {url} within {START_TIMEOUT_S:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server and every worker it started (its own process group): SIGTERM for a clean
    shutdown, then SIGKILL for whatever is left (MLflow's job consumers outlive their parent)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
