"""The MLflow runs of a pipeline run: one parent run per pipeline run, one nested run per step.

Why this instead of ``mlflow.autolog``: autologging is untested on TF 2.21 / Keras 3, and a
KFP pipeline runs each step in its own process (often its own pod), so the "one parent
run, nested step runs" layout has to be re-found by tag in every step rather than kept in
process state. Here: finding or creating the experiment and the parent, the step's run and
how it ends (FINISHED, FAILED, KILLED by a signal or a vanished CLI, or a lost server), and
the runs that crashed processes left RUNNING. Everything talks to MLflow through its
public API and works the same against a local ``sqlite:///`` store and an ``mlflow server``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import subprocess
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import PROJECT_ROOT
from pipeline.lib.credentials import redact_uri
from pipeline.lib.interrupts import Stop, process_alive, stop_as_interrupt
from pipeline.lib.params import TrackingParams
from pipeline.lib.tracking_log import TAG_PARENT, log_params_once
from pipeline.lib.tracking_store import (
    TrackingServerError,
    TrackingServerLostError,
    bounded_requests,
    check_tracking_server,
    ensure_experiment_tags,
    environment,
    first_line,
    get_or_create_experiment,
    give_up_s,
    resolve_tracking_uri,
    server_answers,
)

logger = logging.getLogger(__name__)

# Tags (dotted keys need backticks in MLflow filter strings).
TAG_PIPELINE_RUN_ID = "kfp.pipeline_run_id"
TAG_PIPELINE_NAME = "kfp.pipeline_name"
TAG_STEP = "kfp.step"
TAG_RUN_KIND = "iris.run_kind"  # "pipeline" (parent) or "step" (child)
TAG_PACKAGE_VERSION = "iris.package_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # the key the MLflow UI shows as "Git commit"
#: Why a run ended FAILED or KILLED (on the step's run and on the pipeline's parent run).
TAG_ERROR = "error"
TAG_SOURCE_NAME = "mlflow.source.name"  # the UI's "Source" column
TAG_SOURCE_TYPE = "mlflow.source.type"
TAG_PID = "iris.pid"  # the process that keeps the run RUNNING, on ...
TAG_HOST = "iris.host"  # ... this host (a pod name on a cluster)
TAG_FAILED_REASON = "iris.failed_reason"


def git_commit() -> str | None:
    """The commit the code runs from: ``$GIT_COMMIT`` (set by image builds) or ``git``."""
    for var in ("IRIS_GIT_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    if not (PROJECT_ROOT / ".git").exists():
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def plugin_run_id() -> str | None:
    """``$MLFLOW_RUN_ID`` when the KFP MLflow plugin (or a user) gave us a run to log under."""
    value = os.environ.get("MLFLOW_RUN_ID", "").strip()
    return value or None


def _package_version() -> str:
    from pipeline import __version__

    return __version__


def _validate_run_args(step: str, pipeline_run_id: str, pipeline_name: str) -> None:
    for label, value in (("step", step), ("pipeline_run_id", pipeline_run_id),
                         ("pipeline_name", pipeline_name)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{label} must be a non-empty string, got {value!r}")
    if "{{" in pipeline_run_id or any(c in pipeline_run_id for c in "'\"\\"):
        raise ValueError(
            f"pipeline_run_id {pipeline_run_id!r} is not a resolved KFP run id "
            "(unfilled placeholder or quote characters)"
        )


def parent_run_name(params: Mapping[str, Any], pipeline_name: str,
                    started: datetime.datetime | None = None) -> str:
    """A name that says what differs between pipeline runs in MLflow's run list.

    E.g. ``mobilenet_v2 a0.5 320px avg_max tta8 · iris-image.zip · 11-27 10:42``: the model
    (its backbone, for transfer learning) and its key settings, the data set's file name and
    the local start time. KFP's run ids (``iris-image-pipeline-2668005``) all share a prefix,
    which is all the list shows.
    """
    model = str(params.get("model", "")).strip()
    if model in ("transfer", "mobilenet") and params.get("backbone"):
        model = str(params["backbone"])
    parts = [model] if model else [pipeline_name]
    if model.startswith("mobilenet") and "alpha" in params:
        parts.append(f"a{float(params['alpha']):g}")
    if "image_size" in params:
        parts.append(f"{int(params['image_size'])}px")
    if params.get("pooling"):
        parts.append(str(params["pooling"]))
    if int(params.get("tta_views") or 0) > 0:
        parts.append(f"tta{int(params['tta_views'])}")
    if int(params.get("fine_tune_epochs") or 0) > 0:
        parts.append(f"fine-tune {int(params['fine_tune_epochs'])}")
    fields = [" ".join(parts)]
    source = str(params.get("data_source", "")).strip().rstrip("/")
    if source:
        fields.append(urllib.parse.unquote(urllib.parse.urlsplit(source).path).rsplit("/", 1)[-1]
                      or source)
    fields.append((started or datetime.datetime.now()).strftime("%m-%d %H:%M"))
    return " · ".join(fields)[:250]


def find_parent_run(client: MlflowClient, experiment_id: str, pipeline_run_id: str) -> str | None:
    """The oldest parent run tagged with ``pipeline_run_id`` in the experiment, if any."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{TAG_PIPELINE_RUN_ID}` = '{pipeline_run_id}' "
            f"AND tags.`{TAG_RUN_KIND}` = 'pipeline'"
        ),
        order_by=["attributes.start_time ASC"],
        max_results=10,
    )
    return runs[0].info.run_id if runs else None


def _get_or_create_parent(
    client: MlflowClient, experiment_id: str, pipeline_run_id: str, tags: dict[str, str],
    run_name: str,
) -> str:
    """Find the pipeline's parent run or create it; concurrent creators settle on the oldest."""
    existing = find_parent_run(client, experiment_id, pipeline_run_id)
    if existing:
        return existing
    created = client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
    winner = find_parent_run(client, experiment_id, pipeline_run_id) or created
    if winner != created:  # lost a race with a parallel step: keep one parent
        client.delete_run(created)
        logger.info("parent run %s already existed; discarded duplicate %s", winner, created)
    else:
        logger.info("created MLflow parent run %s for pipeline run %s", created, pipeline_run_id)
    return winner


def fail_orphaned_runs(client: MlflowClient, experiment_id: str, keep: str | None = None
                       ) -> list[str]:
    """Mark FAILED the RUNNING runs whose process on this host is gone; returns their ids.

    A step killed outright (``kill -9``, out of memory) cannot end its runs, which then stay
    RUNNING forever. Every step run (and its parent while a step runs) is tagged with its
    process id and host, so any later step in the experiment on the same host can tell a
    dead owner from a live one. Runs from other hosts, or without the tags, are left alone;
    ``keep`` (the caller's own parent run) is never touched.
    """
    host = socket.gethostname()
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"attributes.status = 'RUNNING' AND tags.`{TAG_HOST}` = '{host}'",
        max_results=1000,
    )
    failed = []
    for run in runs:
        pid = run.data.tags.get(TAG_PID, "")
        if run.info.run_id == keep or not pid.isdigit() or process_alive(int(pid)):
            continue
        reason = f"process {pid} on {host} ended without ending this run (killed?)"
        with contextlib.suppress(MlflowException):
            client.set_tag(run.info.run_id, TAG_FAILED_REASON, reason)
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            failed.append(run.info.run_id)
            logger.warning("marked MLflow run %s FAILED: %s", run.info.run_id, reason)
    return failed


@contextlib.contextmanager
def step_run(
    step: str,
    *,
    tracking_uri: str,
    experiment_name: str,
    pipeline_run_id: str,
    pipeline_name: str,
    params: Mapping[str, Any] | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Run the body inside a nested MLflow run named ``step`` under the pipeline's parent run.

    The parent (one per KFP run id, found by the ``kfp.pipeline_run_id`` tag or created) is
    named by :func:`parent_run_name` and carries the config as params and the run id, pipeline
    name, source, package version and git commit as tags, so runs are compared at the parent
    level in the MLflow UI; the step run carries its own ``params`` as well. Its status follows the
    steps: RUNNING while one runs, FINISHED after each success, FAILED after a failure.

    Under the KFP MLflow plugin (``$MLFLOW_RUN_ID`` set, with ``$MLFLOW_TRACKING_URI`` and
    ``$MLFLOW_EXPERIMENT_ID``) the given run plays the parent: the step run nests under it, its
    status is left to the plugin, and ``experiment_name`` is not used.

    The server is checked first (:func:`check_tracking_server`), so an unreachable one fails
    the step in seconds; every later call gives up within ``$IRIS_TRACKING_GIVE_UP_S``
    (:func:`~pipeline.lib.tracking_store.request_bounds`), and a server that went away
    for longer fails the step with :class:`TrackingServerLostError`. Yields the active child
    run; fluent ``mlflow.log_*`` calls in the body go to it. The child ends FINISHED,
    FAILED (exception) or KILLED (SIGTERM, or the CLI that started the step ended:
    :func:`~pipeline.lib.interrupts.stop_as_interrupt`; the reason is its
    ``iris.failed_reason`` tag).
    """
    _validate_run_args(step, pipeline_run_id, pipeline_name)
    given_run = plugin_run_id()
    if given_run:
        env_uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if env_uri and env_uri != tracking_uri:
            logger.warning("MLFLOW_RUN_ID is set: using the plugin's tracking URI %s, not %s",
                           redact_uri(env_uri), redact_uri(tracking_uri))
            tracking_uri = env_uri
    check_tracking_server(tracking_uri)
    bound = give_up_s()
    with (stop_as_interrupt() as stop, _tracking_uri_scope(tracking_uri),
          bounded_requests(bound)):
        client = MlflowClient(tracking_uri=tracking_uri)
        with _step_run(step, client, tracking_uri, experiment_name, pipeline_run_id,
                       pipeline_name, params, given_run, stop, bound) as active:
            yield active


@contextlib.contextmanager
def _tracking_uri_scope(uri: str) -> Iterator[None]:
    """Make ``uri`` MLflow's global tracking URI for the body, then restore the previous one.

    ``mlflow.set_tracking_uri`` also exports ``$MLFLOW_TRACKING_URI``; left in place, a later
    :func:`resolve_tracking_uri` in the same process (benchmarks, tests, notebooks) would
    silently reuse this step's store instead of its own default.
    """
    previous = mlflow.get_tracking_uri()
    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if previous_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = previous_env


@contextlib.contextmanager
def _step_run(
    step: str, client: MlflowClient, tracking_uri: str, experiment_name: str,
    pipeline_run_id: str, pipeline_name: str, params: Mapping[str, Any] | None,
    given_run: str | None, stop: Stop, bound: float,
) -> Iterator[mlflow.ActiveRun]:
    """The body of :func:`step_run` once the tracking URI is set; sets ``stop.ending``."""
    common = {TAG_PIPELINE_RUN_ID: pipeline_run_id, TAG_PIPELINE_NAME: pipeline_name,
              TAG_PACKAGE_VERSION: _package_version()}
    if commit := git_commit():
        common[TAG_GIT_COMMIT] = commit
    try:
        parent_id, experiment_id, manage_parent = _open_parent(
            step, client, tracking_uri, experiment_name, params, given_run, common)
    except MlflowException as exc:
        if server_answers(tracking_uri):
            raise
        raise TrackingServerLostError(_lost_message(tracking_uri, step, bound, exc)) from exc
    status = RunStatus.to_string(RunStatus.FINISHED)
    lost = False
    child_id = ""
    try:
        child_id = _start_child(step, client, tracking_uri, experiment_id, parent_id, params,
                                common)
        yield mlflow.active_run()
    except BaseException as exc:
        stop.ending.set()
        killed = (isinstance(exc, KeyboardInterrupt) or stop.terminated.is_set()
                  or stop.cli_gone())
        status = RunStatus.to_string(RunStatus.KILLED if killed else RunStatus.FAILED)
        lost = not killed and not server_answers(tracking_uri)
        if lost:
            raise TrackingServerLostError(_lost_message(
                tracking_uri, step, bound, exc, child_id, parent_id)) from exc
        reason = f"{type(exc).__name__}: {exc}"[:5000]
        with contextlib.suppress(Exception):
            runs = [child_id] if child_id else []
            if manage_parent:  # the pipeline run says which step ended it, and why
                client.set_tag(parent_id, TAG_ERROR, f"step {step}: {reason}"[:5000])
                runs.append(parent_id)
            if child_id:
                client.set_tag(child_id, TAG_ERROR, reason)
            for run_id in runs if killed else []:
                client.set_tag(run_id, TAG_FAILED_REASON, stop.reason or reason)
        raise
    finally:
        stop.ending.set()
        # a lost server gets one quick try each: the error above is already decided
        with environment(NO_RETRIES) if lost else contextlib.nullcontext():
            _end_runs(client, child_id, parent_id if manage_parent else None, status,
                      given_run, quiet=lost)


#: MLflow settings for a call whose failure changes nothing: one attempt, 5 s.
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def _end_runs(client: MlflowClient, child_id: str, parent_id: str | None, status: str,
              given_run: str | None, *, quiet: bool) -> None:
    """End the step's run (the active one) and the parent we manage with ``status``."""
    with contextlib.suppress(MlflowException) if quiet else contextlib.nullcontext():
        current = mlflow.active_run()
        if current is not None and current.info.run_id == child_id:
            mlflow.end_run(status)  # note: end_run also unsets $MLFLOW_RUN_ID ...
        elif child_id:
            client.set_terminated(child_id, status)
    if given_run:  # ... which later steps in this process still need
        os.environ["MLFLOW_RUN_ID"] = given_run
    if parent_id:
        with contextlib.suppress(Exception):
            client.set_terminated(parent_id, status)


def _lost_message(tracking_uri: str, step: str, bound: float, exc: BaseException,
                  child_id: str = "", parent_id: str = "") -> str:
    """What a user needs when the server went away: which, what was logged, how to rerun."""
    shown = redact_uri(tracking_uri)
    logged = (f"Run {child_id} of step {step!r} (under pipeline run {parent_id}) holds what "
              "the step logged before; its outcome, later metrics, artifacts and model were "
              "not logged, and the runs stay RUNNING until a later step on this host marks "
              "them FAILED" if child_id else f"Nothing of step {step!r} was logged")
    registered = ("no model was registered by this step" if step != "register" else
                  f"a registry version created by run {child_id} may remain, as its rollback "
                  "needed the server too")
    return (f"MLflow tracking server {shown} went away during step {step!r} and did not "
            f"answer again within {bound:g} s ({first_line(str(exc))}). {logged}; "
            f"{registered}. Rerun the same command once {shown.rstrip('/')}/health answers "
            "(a new pipeline run; cached steps are reused).")


def _open_parent(
    step: str, client: MlflowClient, tracking_uri: str, experiment_name: str,
    params: Mapping[str, Any] | None, given_run: str | None, parent_tags: dict[str, str],
) -> tuple[str, str, bool]:
    """The parent run (found, created or given), its experiment, whether this step manages it.

    Also marks FAILED the runs that dead processes on this host left RUNNING.
    """
    pipeline_run_id, pipeline_name = (parent_tags[TAG_PIPELINE_RUN_ID],
                                      parent_tags[TAG_PIPELINE_NAME])
    if given_run:
        try:
            parent = client.get_run(given_run)
        except MlflowException as exc:
            raise TrackingServerError(
                f"MLFLOW_RUN_ID={given_run} is not a run on {redact_uri(tracking_uri)}: "
                f"{first_line(exc.message)}"
            ) from exc
        parent_id = given_run
        experiment_id = os.environ.get("MLFLOW_EXPERIMENT_ID", "").strip() or (
            parent.info.experiment_id)
        ensure_experiment_tags(client, experiment_id)
        client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in parent_tags.items()])
        manage_parent = False
        logger.info("MLFLOW_RUN_ID=%s given: step %r nests under it", parent_id, step)
    else:
        experiment_id = get_or_create_experiment(client, experiment_name, tracking_uri)
        parent_id = _get_or_create_parent(
            client, experiment_id, pipeline_run_id,
            {**parent_tags, TAG_RUN_KIND: "pipeline", TAG_SOURCE_TYPE: "JOB",
             TAG_SOURCE_NAME: f"{pipeline_name} (KFP run {pipeline_run_id})"},
            parent_run_name(params or {}, pipeline_name),
        )
        manage_parent = True

    fail_orphaned_runs(client, experiment_id, keep=parent_id)
    owner = {TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}
    log_params_once(client, parent_id, params or {})
    if manage_parent:
        client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in owner.items()])
        client.update_run(parent_id, status="RUNNING")
    return parent_id, experiment_id, manage_parent


def _start_child(step: str, client: MlflowClient, tracking_uri: str, experiment_id: str,
                 parent_id: str, params: Mapping[str, Any] | None,
                 common: Mapping[str, str]) -> str:
    """Create the step's run under ``parent_id`` and make it the active run; its id."""
    child_tags = {TAG_PARENT: parent_id, TAG_RUN_KIND: "step", TAG_STEP: step, **common,
                  TAG_PID: str(os.getpid()), TAG_HOST: socket.gethostname()}
    # start_run adds MLflow's own context tags (user, source); without $MLFLOW_RUN_ID, which
    # it would resume instead, so the plugin's run stays the parent for later steps.
    with environment({"MLFLOW_RUN_ID": None}):
        child_id = mlflow.start_run(experiment_id=experiment_id, run_name=step,
                                    nested=True, parent_run_id=parent_id,
                                    tags=child_tags).info.run_id
    # the step's own params on its run too (the UI shows a run's params, not its parent's);
    # a value differing from the parent's stays visible on the step that saw it
    log_params_once(client, child_id, params or {})
    logger.info("MLflow run %s (step %r) under parent %s at %s", child_id, step, parent_id,
                redact_uri(tracking_uri))
    return child_id


@contextlib.contextmanager
def tracked_step(
    step: str, tracking: TrackingParams, params: Mapping[str, Any],
) -> Iterator[mlflow.ActiveRun]:
    """:func:`step_run` for a pipeline step: the tracking URI resolved, ``params`` logged.

    The one place the tracked steps (train, evaluate, register) enter MLflow, so their
    components stay a single call.
    """
    uri = resolve_tracking_uri(tracking.tracking_uri, Path.cwd())
    params = {**params, "experiment_name": tracking.experiment_name}  # a config field too
    with step_run(step, tracking_uri=uri, experiment_name=tracking.experiment_name,
                  pipeline_run_id=tracking.pipeline_run_id,
                  pipeline_name=tracking.pipeline_name, params=params) as run:
        yield run


__all__ = [
    "TAG_ERROR",
    "TAG_FAILED_REASON",
    "TAG_PIPELINE_RUN_ID",
    "TAG_RUN_KIND",
    "TAG_STEP",
    "fail_orphaned_runs",
    "find_parent_run",
    "git_commit",
    "parent_run_name",
    "plugin_run_id",
    "step_run",
    "tracked_step",
]
