"""MLflow tracking for the pipeline: one parent run per pipeline run, one nested run per step.

Why this module exists instead of ``mlflow.autolog``: autologging is untested on TF 2.21 /
Keras 3, and a KFP pipeline runs each step in its own process (often its own pod), so the
"one parent run, nested step runs" layout has to be re-found by tag in every step rather than
kept in process state. Everything here talks to MLflow through its public client API and
works the same against a local ``sqlite:///`` store and a remote ``mlflow server``.

Typical use inside a step (layer 1 stays free of KFP)::

    with tracked_step("train", tracking_params, params.to_dict()):
        summary = train_model(..., callbacks=[MlflowEpochLogger()])
        log_metrics(summary)
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

import mlflow
import numpy as np
import requests
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import (
    DatasetInput,
    InputTag,
    LoggedModelInput,
    Metric,
    Param,
    RunStatus,
    RunTag,
)
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from pipeline.lib.contract import DATA_REPORT_JSON
from pipeline.lib.credentials import MLFLOW_CONFIG_MAP, redact_uri
from pipeline.lib.params import TrackingParams

logger = logging.getLogger(__name__)

# Tags (dotted keys need backticks in MLflow filter strings).
TAG_PIPELINE_RUN_ID = "kfp.pipeline_run_id"
TAG_PIPELINE_NAME = "kfp.pipeline_name"
TAG_STEP = "kfp.step"
TAG_RUN_KIND = "iris.run_kind"  # "pipeline" (parent) or "step" (child)
TAG_PACKAGE_VERSION = "iris.package_version"
TAG_GIT_COMMIT = "mlflow.source.git.commit"  # the key the MLflow UI shows as "Git commit"
TAG_PARENT = "mlflow.parentRunId"
TAG_RUN_NAME = "mlflow.runName"
#: Why a run ended FAILED or KILLED (on the step's run and on the pipeline's parent run).
TAG_ERROR = "error"
TAG_SOURCE_NAME = "mlflow.source.name"  # the UI's "Source" column
TAG_SOURCE_TYPE = "mlflow.source.type"
#: The experiment tag MLflow's UI reads to choose its layout; without it, an experiment with
#: no traces opens on the GenAI overview instead of the training runs.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
TAG_NOTE = "mlflow.note.content"  # the experiment's (and a run's) description in the UI
EXPERIMENT_DESCRIPTION = (
    "Iris-flower image classifier trained by a Kubeflow pipeline. Each pipeline run is one "
    "parent run, named after what differs between runs (model, width, image size, pooling, "
    "data set, start time), with one nested run per tracked step: **train** (per-epoch loss "
    "and accuracy, the logged model), **evaluate** (held-out test metrics, confusion matrix, "
    "HTML report) and **register** (registry decision). Test metrics and the majority "
    "baseline are also on the parent, so the run list compares pipeline runs."
)
TAG_PID = "iris.pid"  # the process that keeps the run RUNNING, on ...
TAG_HOST = "iris.host"  # ... this host (a pod name on a cluster)
TAG_FAILED_REASON = "iris.failed_reason"

#: Set by KFP in every executor container (downward API), never by kfp.local.
KFP_POD_ENV = ("KFP_POD_NAME", "KFP_POD_UID")

#: Where local (sqlite) tracking keeps its database and artifacts, relative to the workdir.
LOCAL_DB_NAME = "mlflow.db"
LOCAL_ARTIFACTS_DIR = "mlartifacts"

#: Name of the data set's MLflow dataset input (its digest tells versions apart).
DATASET_NAME = "iris-image"

#: Keras log keys that :class:`MlflowEpochLogger` always logs when present.
EPOCH_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")

# MLflow accepts at most 100 params and 1000 metrics per log_batch call.
_PARAM_BATCH = 100
#: Characters MLflow refuses in metric names (it allows alphanumerics, _ - . : / and space).
_METRIC_NAME_BAD = re.compile(r"[^\w\-.:/ ]")


class TrackingServerError(RuntimeError):
    """The tracking store is unreachable or refuses us; raised before any work starts."""


class TrackingUriMissingError(RuntimeError):
    """A step in a KFP pod was given no tracking URI (no parameter, ConfigMap or plugin)."""


# ----------------------------------------------------------------------------------------
# Tracking URI and the fail-fast check
# ----------------------------------------------------------------------------------------
def in_kfp_pod() -> bool:
    """Whether this process runs in a Kubeflow Pipelines pod (not kfp.local, not a notebook).

    KFP's compiler gives every executor container ``KFP_POD_NAME`` and ``KFP_POD_UID`` (its
    launcher refuses to start without them); ``KUBERNETES_SERVICE_HOST`` alone would also
    match a notebook server, where the local sqlite default is what the user wants.
    """
    return any(os.environ.get(var, "").strip() for var in KFP_POD_ENV)


def resolve_tracking_uri(uri: str | None, workdir: Path) -> str:
    """The tracking URI a step uses: ``uri``, else ``$MLFLOW_TRACKING_URI``, else local sqlite.

    The local default is an *absolute* ``sqlite:///<workdir>/mlflow.db`` so that every step
    process (KFP's local runner starts one per step, each in its own folder) writes to the
    same database, and ``mlflow ui --backend-store-uri`` opens it from anywhere. Experiments
    this module creates in a local store put their artifacts in ``<workdir>/mlartifacts``.
    Inside a KFP pod there is no such default (:class:`TrackingUriMissingError`): a sqlite
    file there vanishes with the pod, runs and registered model with it, while the run
    reports success.
    """
    if uri and uri.strip():
        return uri.strip()
    from_env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if from_env:
        return from_env
    if in_kfp_pod():
        raise TrackingUriMissingError(
            "no MLflow tracking URI in this Kubeflow Pipelines pod: a local sqlite store would "
            "be lost with the pod. Create the ConfigMap "
            f"{MLFLOW_CONFIG_MAP!r} with key MLFLOW_TRACKING_URI in the run's namespace "
            "(manifests/kubeflow-namespace), or compile/submit with --tracking-uri URI")
    db = Path(workdir).expanduser().resolve() / LOCAL_DB_NAME
    return f"sqlite:///{db}"


def local_artifact_root(tracking_uri: str) -> str | None:
    """``file://`` artifact root next to a local sqlite/file store, ``None`` for remote stores.

    MLflow's client-side default for a sqlite store is ``./mlruns`` of the *current*
    directory; pinning it beside the database keeps runs and their artifacts together.
    """
    path = _local_store_path(tracking_uri)
    if path is None:
        return None
    base = path.parent if tracking_uri.startswith("sqlite:") else path
    return (base / LOCAL_ARTIFACTS_DIR).resolve().as_uri()


def _local_store_path(tracking_uri: str) -> Path | None:
    """The database file of ``sqlite:`` URIs, the directory of ``file:`` URIs and bare paths."""
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        # sqlite:///relative.db or sqlite:////absolute/path.db (SQLAlchemy's convention)
        raw = tracking_uri[len("sqlite:///"):] if tracking_uri.startswith("sqlite:///") else ""
        if not raw or raw == ":memory:":
            return None
        return Path(urllib.parse.unquote(raw.split("?", 1)[0])).resolve()
    if parsed.scheme == "file":
        return Path(urllib.parse.unquote(parsed.path)).resolve()
    if parsed.scheme == "" and tracking_uri:
        return Path(tracking_uri).resolve()
    return None


def is_local_store(tracking_uri: str) -> bool:
    """True for stores this machine can lock (``sqlite:`` files, ``file:`` folders, paths).

    Everything else (an HTTP server, a database URL) is shared with processes elsewhere, so
    inter-process coordination there has to go through the store itself.
    """
    return _local_store_path(tracking_uri) is not None


def check_tracking_server(tracking_uri: str, timeout_s: float = 15.0) -> None:
    """Fail within ``timeout_s`` with :class:`TrackingServerError` naming the URI.

    Called before training starts so that a wrong URI, a stopped server or missing
    credentials cost seconds, not a training run: MLflow's own client retries a dead server
    for minutes (7 retries, exponential backoff). For HTTP servers this makes two requests
    without retries: ``GET /health`` (is something listening and healthy) and a one-row
    experiment search through ``MlflowClient`` with ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and
    a bounded ``MLFLOW_HTTP_REQUEST_TIMEOUT`` (does it accept our credentials: the same
    token, username/password or auth plugin as real calls). Local ``sqlite:``/``file:``
    stores are checked by opening (or creating) the database / directory.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    scheme = urllib.parse.urlparse(tracking_uri).scheme
    shown = redact_uri(tracking_uri)
    if scheme in ("http", "https"):
        _check_http_server(tracking_uri, shown, timeout_s)
    elif scheme == "sqlite" or scheme == "file" or scheme == "":
        _check_local_store(tracking_uri, shown, timeout_s)
    else:
        logger.info("no reachability check for tracking URI scheme %r (%s)", scheme, shown)


def _check_http_server(tracking_uri: str, shown: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    password = urllib.parse.urlsplit(tracking_uri).password

    def hide(text: str) -> str:  # messages may repeat the URL, userinfo and all
        return text.replace(f":{password}@", ":***@") if password else text

    try:  # is something listening, and healthy? (with the credentials MLflow would send)
        health = requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout_s,
                              **_request_credentials())
    except requests.RequestException as exc:
        raise TrackingServerError(
            f"cannot reach MLflow tracking server {shown}: {hide(_first_line(str(exc)))}"
        ) from exc
    if health.status_code in (401, 403):
        _raise_refused(shown, health.status_code, health.text)
    if health.status_code >= 500:
        raise TrackingServerError(
            f"MLflow tracking server {shown} is unhealthy: GET /health answered "
            f"HTTP {health.status_code} {_snippet(health.text)}"
        )
    # /health may legitimately be missing behind some proxies (404); a real request through
    # MLflow's own client decides, with its credentials (token, username/password, auth
    # plugins) and without its minutes of retries.
    remaining = max(1, math.ceil(deadline - time.monotonic()))
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(remaining)}
    started = time.monotonic()
    with _environment(settings):
        try:
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
        except RestException as exc:
            status = exc.get_http_status_code()
            if status in (401, 403):
                _raise_refused(shown, status, exc.message)
            raise TrackingServerError(
                f"MLflow tracking server {shown} refused a request (HTTP {status}): "
                f"{hide(_first_line(exc.message))}"
            ) from exc
        except MlflowException as exc:
            raise TrackingServerError(
                f"{shown} does not answer as an MLflow tracking server: "
                f"{hide(_first_line(exc.message))}"
            ) from exc
    logger.info("MLflow tracking server %s is reachable (%.2f s)", shown,
                time.monotonic() - started)


def _request_credentials() -> dict[str, Any]:
    """``requests`` arguments for the credentials MLflow's client reads from the environment
    (documented settings: basic auth, bearer token, TLS verification)."""
    arguments: dict[str, Any] = {}
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        arguments["auth"] = (user, password)
    if os.environ.get("MLFLOW_TRACKING_TOKEN"):
        arguments["headers"] = {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
        arguments["verify"] = False
    elif os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
        arguments["verify"] = os.environ["MLFLOW_TRACKING_SERVER_CERT_PATH"]
    return arguments


@contextlib.contextmanager
def _environment(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the block (MLflow reads its settings per request)."""
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _raise_refused(shown: str, status: int, text: str) -> None:
    raise TrackingServerError(
        f"MLflow tracking server {shown} refused our credentials: HTTP {status} "
        f"{_snippet(text)} (set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME / "
        "MLFLOW_TRACKING_PASSWORD)"
    )


@contextlib.contextmanager
def local_store_lock(tracking_uri: str, purpose: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock on a local store for ``purpose``; no-op if remote.

    Steps of concurrent pipeline runs are separate processes sharing one sqlite file (or
    ``file:`` folder): MLflow's first use of a fresh database creates its tables and runs
    migrations without any locking, and read-decide-write sequences such as moving the
    champion alias are not transactions. The lock is ``fcntl.flock`` on
    ``<store>.<purpose>.lock`` next to the store, so it is released by the kernel even when
    the holder is killed. Remote stores (HTTP servers) are not lockable from here.
    """
    if not re.fullmatch(r"[\w.-]+", purpose or ""):
        raise ValueError(f"lock purpose must be letters, digits, '_', '.' or '-': {purpose!r}")
    path = _local_store_path(tracking_uri)
    if path is None:
        yield
        return
    lock_path = path.parent / f"{path.name}.{purpose}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_local_store(tracking_uri: str, shown: str, timeout_s: float) -> None:
    path = _local_store_path(tracking_uri)
    if path is None:
        return
    try:
        if tracking_uri.startswith("sqlite:"):
            path.parent.mkdir(parents=True, exist_ok=True)
            # MLflow creates and migrates a fresh database on first use, racing other
            # processes ("table alembic_version already exists"); doing that first use here,
            # one process at a time, leaves later ones an up-to-date schema (and MLflow
            # caches the store per process, so the step reuses it).
            with local_store_lock(tracking_uri, "init"):
                connection = sqlite3.connect(str(path), timeout=timeout_s)
                try:
                    connection.execute("PRAGMA schema_version").fetchone()
                finally:
                    connection.close()
                client = MlflowClient(tracking_uri=tracking_uri)
                client.search_experiments(max_results=1)
                client.search_registered_models(max_results=1)
        else:
            path.mkdir(parents=True, exist_ok=True)
            if not os.access(path, os.W_OK):
                raise PermissionError(f"{path} is not writable")
    except (OSError, sqlite3.Error, MlflowException) as exc:
        raise TrackingServerError(
            f"cannot open MLflow tracking store {shown}: {exc}"
        ) from exc


def _first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:500] if (text or "").strip() else ""


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join((text or "").split())
    return f"({text[:limit]})" if text else ""


# ----------------------------------------------------------------------------------------
# Parent and step runs
# ----------------------------------------------------------------------------------------
def git_commit() -> str | None:
    """The commit the code runs from: ``$GIT_COMMIT`` (set by image builds) or ``git``."""
    for var in ("IRIS_GIT_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        result = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
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


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    """The id of experiment ``name``, created (with a local artifact root if local) if missing.

    Either way it carries :func:`ensure_experiment_tags`, so experiments created by older
    versions open on their training runs too.
    """
    if not name or not name.strip():
        raise ValueError("experiment_name must be a non-empty string")
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted; restore it in the MLflow UI "
                "(or `mlflow experiments restore`) or choose another experiment_name"
            )
        ensure_experiment_tags(client, experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(
            name, artifact_location=local_artifact_root(tracking_uri),
            tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND, TAG_NOTE: EXPERIMENT_DESCRIPTION},
        )
    except MlflowException as exc:  # another step created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        logger.debug("experiment %r was created concurrently: %s", name, exc)
        ensure_experiment_tags(client, experiment.experiment_id)
        return experiment.experiment_id


def ensure_experiment_tags(client: MlflowClient, experiment_id: str) -> None:
    """Give the experiment its kind (training runs, not GenAI) and description if unset.

    Values a user already set (another kind, an edited description) are kept.
    """
    tags = client.get_experiment(experiment_id).tags
    for key, value in ((TAG_EXPERIMENT_KIND, EXPERIMENT_KIND), (TAG_NOTE, EXPERIMENT_DESCRIPTION)):
        if key not in tags:
            client.set_experiment_tag(experiment_id, key, value)


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


def log_params_once(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> dict[str, str]:
    """Log ``params`` on ``run_id`` unless already there; returns values that *differ*.

    MLflow refuses to change a param's value, and every step of a pipeline run logs the same
    config on the same parent, so already-logged equal values are skipped rather than sent.
    Differing values (a re-run with another config under the same KFP run id) are returned
    so the caller can record them elsewhere instead of failing the step.
    """
    values = {str(k): _param_value(v) for k, v in params.items()}
    existing = client.get_run(run_id).data.params
    new = [Param(k, v) for k, v in values.items() if k not in existing]
    conflicts = {k: v for k, v in values.items() if k in existing and existing[k] != v}
    for start in range(0, len(new), _PARAM_BATCH):
        client.log_batch(run_id, params=new[start:start + _PARAM_BATCH])
    if conflicts:
        logger.warning(
            "run %s already has different values for param(s) %s; MLflow cannot change them",
            run_id, ", ".join(f"{k} ({existing[k]!r} -> {v!r})" for k, v in conflicts.items()),
        )
    return conflicts


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(
        value, (list, dict)) else str(value)
    return text[:6000]  # MLflow's param value limit


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


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
        if run.info.run_id == keep or not pid.isdigit() or _process_alive(int(pid)):
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
    the step in seconds. Yields the active child run; fluent ``mlflow.log_*`` calls in the
    body go to it. The child ends FINISHED, FAILED (exception) or KILLED (interrupt).
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
    ending, terminated = threading.Event(), threading.Event()
    with _sigterm_as_interrupt(ending, terminated), _tracking_uri_scope(tracking_uri):
        client = MlflowClient(tracking_uri=tracking_uri)
        with _step_run(step, client, tracking_uri, experiment_name, pipeline_run_id,
                       pipeline_name, params, given_run, ending, terminated) as active:
            yield active


@contextlib.contextmanager
def _sigterm_as_interrupt(ending: threading.Event,
                          terminated: threading.Event) -> Iterator[None]:
    """Turn SIGTERM into ``KeyboardInterrupt`` for the body, so the step's runs end KILLED.

    SIGTERM is how a step is stopped (the local CLI forwards it, Kubernetes sends it before
    killing a pod); by default it ends Python without unwinding, leaving the runs RUNNING.
    Every SIGTERM raises again (an interrupt raised inside a finaliser is swallowed by
    Python, so senders repeat it) until ``ending`` is set: then the runs are being ended
    and must not be interrupted. ``terminated`` records that a SIGTERM came: code in between
    (Keras, tf.data) may turn the interrupt into another exception, and the run still ended
    because it was stopped. Signal handlers can only be set from the main thread: elsewhere
    nothing changes.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        terminated.set()
        if not ending.is_set():
            raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    given_run: str | None, ending: threading.Event, terminated: threading.Event,
) -> Iterator[mlflow.ActiveRun]:
    """The body of :func:`step_run` once the tracking URI is set; sets ``ending`` on exit."""
    parent_tags = {
        TAG_PIPELINE_RUN_ID: pipeline_run_id,
        TAG_PIPELINE_NAME: pipeline_name,
        TAG_PACKAGE_VERSION: _package_version(),
    }
    commit = git_commit()
    if commit:
        parent_tags[TAG_GIT_COMMIT] = commit

    if given_run:
        try:
            parent = client.get_run(given_run)
        except MlflowException as exc:
            raise TrackingServerError(
                f"MLFLOW_RUN_ID={given_run} is not a run on {redact_uri(tracking_uri)}: "
                f"{_first_line(exc.message)}"
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

    child_tags = {
        TAG_PARENT: parent_id,
        TAG_RUN_KIND: "step",
        TAG_STEP: step,
        TAG_PIPELINE_RUN_ID: pipeline_run_id,
        TAG_PIPELINE_NAME: pipeline_name,
        TAG_PACKAGE_VERSION: parent_tags[TAG_PACKAGE_VERSION],
        **owner,
    }
    if commit:
        child_tags[TAG_GIT_COMMIT] = commit
    from mlflow.tracking.context.registry import resolve_tags

    child_id = client.create_run(
        experiment_id, run_name=step, tags={**resolve_tags(child_tags), **child_tags},
    ).info.run_id
    # the step's own params on its run too (the UI shows a run's params, not its parent's);
    # a value differing from the parent's stays visible on the step that saw it
    log_params_once(client, child_id, params or {})
    logger.info("MLflow run %s (step %r) under parent %s at %s", child_id, step, parent_id,
                redact_uri(tracking_uri))

    # An explicit run_id keeps start_run from consuming $MLFLOW_RUN_ID (it deletes the
    # variable and resumes that run), so the plugin's run stays the parent for later steps.
    active = mlflow.start_run(run_id=child_id, nested=True)
    status = RunStatus.to_string(RunStatus.FINISHED)
    try:
        yield active
    except BaseException as exc:
        ending.set()
        status = RunStatus.to_string(
            RunStatus.KILLED if isinstance(exc, KeyboardInterrupt) or terminated.is_set()
            else RunStatus.FAILED)
        reason = f"{type(exc).__name__}: {exc}"[:5000]
        with contextlib.suppress(Exception):
            client.set_tag(child_id, TAG_ERROR, reason)
            if manage_parent:  # the pipeline run says which step ended it, and why
                client.set_tag(parent_id, TAG_ERROR, f"step {step}: {reason}"[:5000])
        raise
    finally:
        ending.set()
        current = mlflow.active_run()
        if current is not None and current.info.run_id == child_id:
            mlflow.end_run(status)  # note: end_run also unsets $MLFLOW_RUN_ID ...
        else:
            client.set_terminated(child_id, status)
        if given_run:  # ... which later steps in this process still need
            os.environ["MLFLOW_RUN_ID"] = given_run
        if manage_parent:
            with contextlib.suppress(Exception):
                client.set_terminated(parent_id, status)


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


def parent_run_id(run_id: str | None = None, client: MlflowClient | None = None) -> str | None:
    """The ``mlflow.parentRunId`` of ``run_id`` (default: the active run)."""
    client = client or MlflowClient()
    run_id = run_id or require_active_run("parent_run_id")
    return client.get_run(run_id).data.tags.get(TAG_PARENT)


def require_active_run(what: str) -> str:
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError(f"{what} needs an active MLflow run: call it inside step_run(...)")
    return run.info.run_id


# ----------------------------------------------------------------------------------------
# Metrics, artifacts, dataset inputs
# ----------------------------------------------------------------------------------------
def numeric_metrics(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers (and booleans as 0/1) in ``values``, nested keys joined by ``.``.

    Step results such as ``metrics.json`` mix numbers with strings (``gate_metric``) and
    nested per-class dicts; MLflow metrics must be plain floats.
    """
    out: dict[str, float] = {}
    for key, value in values.items():
        name = _METRIC_NAME_BAD.sub("_", f"{prefix}{key}")  # e.g. class names in keys
        if isinstance(value, Mapping):
            out.update(numeric_metrics(value, prefix=f"{name}."))
        elif isinstance(value, (bool, int, float, np.integer, np.floating, np.bool_)):
            number = float(value)
            if math.isfinite(number):
                out[name] = number
    return out


def log_metrics(
    values: Mapping[str, Any], *, step: int | None = None, on_parent: bool = False,
    model_id: str | None = None, dataset: tuple[str, str] | None = None,
    client: MlflowClient | None = None,
) -> dict[str, float]:
    """Log the numeric entries of ``values`` on the active run (and its parent); returns them.

    ``on_parent=True`` also logs them on the pipeline's parent run, where the MLflow UI
    compares pipeline runs side by side (test metrics, majority baseline). ``model_id`` (an
    MLflow 3 logged model) and ``dataset`` (name, digest) link the active run's metrics to
    that model and data set: the logged model's page then lists them with the data they were
    measured on, and the model is recorded as an input of the run. The parent's copies stay
    unlinked, so the model holds each metric once.
    """
    run_id = require_active_run("log_metrics")
    client = client or MlflowClient()
    metrics = numeric_metrics(values)
    timestamp = int(time.time() * 1000)
    name, digest = dataset or (None, None)
    linked = [Metric(k, v, timestamp, step or 0, model_id=model_id, dataset_name=name,
                     dataset_digest=digest) for k, v in metrics.items()]
    plain = [Metric(k, v, timestamp, step or 0) for k, v in metrics.items()]
    targets = [(run_id, linked)]
    if on_parent:
        parent = parent_run_id(run_id, client)
        if parent:
            targets.append((parent, plain))
    if model_id:
        client.log_inputs(run_id, models=[LoggedModelInput(model_id)])
    for target, entities in targets:
        for start in range(0, len(entities), 1000):
            client.log_batch(target, metrics=entities[start:start + 1000])
    return metrics


def log_artifacts(path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file or a directory's contents to the active run; missing paths are an error."""
    require_active_run("log_artifacts")
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path)
    elif path.is_file():
        mlflow.log_artifact(str(path), artifact_path)
    else:
        raise FileNotFoundError(f"cannot log artifact: {str(path)!r} does not exist")


def _dataset_source_json(source: str) -> tuple[str, str]:
    """(source_type, source_json) for ``source``: local path, http(s), s3/gs/... or other."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resolved = resolve_dataset_source(source)
    except MlflowException:
        resolved = CodeDatasetSource(tags={"source": source})
    described = MetaDataset(source=resolved, name="source", digest="-").to_dict()
    return described["source_type"], described["source"]


def log_dataset_input(
    source: str, sha256: str, report: Mapping[str, Any], *, name: str = DATASET_NAME,
    context: str = "training", client: MlflowClient | None = None,
) -> str:
    """Record the data set as an MLflow dataset input (active run and parent) + its report.

    MLflow limits a dataset digest to 36 characters, so the digest is the sha256's first 32
    hex digits and the full sha256 is an input tag and part of the profile (with the data
    report's counts). Without a sha256 (a local folder) the digest is computed from the
    report, which lists every file's hash. Returns the digest.
    """
    run_id = require_active_run("log_dataset_input")
    if not source or not source.strip():
        raise ValueError("dataset source must be a non-empty string")
    client = client or MlflowClient()
    report_json = json.dumps(report, sort_keys=True, default=str)
    full = sha256.strip().lower() if sha256 else hashlib.sha256(report_json.encode()).hexdigest()
    source_type, source_json = _dataset_source_json(source)
    entity = DatasetEntity(
        name=name,
        digest=full[:32],
        source_type=source_type,
        source=source_json,
        profile=json.dumps({"sha256": full, "sha256_of": "archive" if sha256 else "data_report",
                            "report": report}, default=str),
    )
    tags = [InputTag("mlflow.data.context", context), InputTag("sha256", full)]
    targets = [run_id]
    parent = parent_run_id(run_id, client)
    if parent:
        targets.append(parent)
    for target in targets:
        client.log_inputs(target, datasets=[DatasetInput(entity, tags)])
    mlflow.log_dict(dict(report), DATA_REPORT_JSON)
    return full[:32]


__all__ = [
    "DATASET_NAME",
    "EPOCH_KEYS",
    "TrackingServerError",
    "TrackingUriMissingError",
    "check_tracking_server",
    "ensure_experiment_tags",
    "fail_orphaned_runs",
    "find_parent_run",
    "get_or_create_experiment",
    "git_commit",
    "in_kfp_pod",
    "is_local_store",
    "local_artifact_root",
    "local_store_lock",
    "log_artifacts",
    "log_dataset_input",
    "log_metrics",
    "log_params_once",
    "numeric_metrics",
    "parent_run_id",
    "parent_run_name",
    "plugin_run_id",
    "redact_uri",
    "resolve_tracking_uri",
    "step_run",
    "tracked_step",
]
