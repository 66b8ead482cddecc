"""Where the MLflow tracking store is and whether it can be used right now.

The store's URI (explicit, ``$MLFLOW_TRACKING_URI`` or a local sqlite default), the
fail-fast check made before a step starts work, the lock that serialises a local store's
first use, the experiment the runs go to, and the bound on how long a step's later calls
wait for a server that went away.
The run lifecycle is in :mod:`pipeline.lib.tracking_runs`, logging in
:mod:`pipeline.lib.tracking_log`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import requests
from filelock import FileLock
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient

from pipeline.lib.credentials import MLFLOW_CONFIG_MAP, redact_uri

logger = logging.getLogger(__name__)

#: Set by KFP in every executor container (downward API), never by kfp.local.
KFP_POD_ENV = ("KFP_POD_NAME", "KFP_POD_UID")

#: Where local (sqlite) tracking keeps its database and artifacts, relative to the workdir.
LOCAL_DB_NAME = "mlflow.db"
LOCAL_ARTIFACTS_DIR = "mlartifacts"

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


class TrackingServerError(RuntimeError):
    """The tracking store is unreachable or refuses us; raised before any work starts."""


class TrackingServerLostError(RuntimeError):
    """The tracking server stopped answering while a step ran, for longer than the bound."""


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
            f"cannot reach MLflow tracking server {shown}: {hide(first_line(str(exc)))}"
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
    with environment(settings):
        try:
            MlflowClient(tracking_uri=tracking_uri).search_experiments(max_results=1)
        except RestException as exc:
            status = exc.get_http_status_code()
            if status in (401, 403):
                _raise_refused(shown, status, exc.message)
            raise TrackingServerError(
                f"MLflow tracking server {shown} refused a request (HTTP {status}): "
                f"{hide(first_line(exc.message))}"
            ) from exc
        except MlflowException as exc:
            raise TrackingServerError(
                f"{shown} does not answer as an MLflow tracking server: "
                f"{hide(first_line(exc.message))}"
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
def environment(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (``None``: unset) environment variables for the block, then restore them.

    MLflow reads its settings from the environment per request.
    """
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
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


def lock_path(tracking_uri: str, purpose: str) -> Path | None:
    """``<store>.<purpose>.lock`` beside a local store (``mlflow.db.init.lock``), else ``None``."""
    if not re.fullmatch(r"[\w.-]+", purpose or ""):
        raise ValueError(f"lock purpose must be letters, digits, '_', '.' or '-': {purpose!r}")
    path = _local_store_path(tracking_uri)
    return None if path is None else path.parent / f"{path.name}.{purpose}.lock"


@contextlib.contextmanager
def local_store_lock(tracking_uri: str, purpose: str) -> Iterator[None]:
    """Hold an exclusive inter-process lock on a local store for ``purpose``; no-op if remote.

    Steps of concurrent pipeline runs are separate processes sharing one sqlite file (or
    ``file:`` folder): MLflow's first use of a fresh database creates its tables and runs
    migrations without any locking, and read-decide-write sequences such as moving the
    champion alias are not transactions. The lock is a :class:`filelock.FileLock` (an OS
    ``flock``, released by the kernel even when the holder is killed) on
    :func:`lock_path`. Remote stores (HTTP servers) are not lockable from here.
    """
    path = lock_path(tracking_uri, purpose)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


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


def first_line(text: str) -> str:
    return (text or "").strip().splitlines()[0][:500] if (text or "").strip() else ""


def _snippet(text: str, limit: int = 200) -> str:
    text = " ".join((text or "").split())
    return f"({text[:limit]})" if text else ""


# ----------------------------------------------------------------------------------------
# The experiment the runs go to
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# How long a step's calls wait for a server that went away
# ----------------------------------------------------------------------------------------
#: Seconds within which a step's MLflow call gives up on a server that stopped answering.
GIVE_UP_ENV = "IRIS_TRACKING_GIVE_UP_S"
DEFAULT_GIVE_UP_S = 120.0
#: MLflow's documented client settings that :func:`request_bounds` fills in.
MLFLOW_REQUEST_SETTINGS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
                           "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER", "MLFLOW_HTTP_REQUEST_TIMEOUT")
_RETRIES = 5


def give_up_s() -> float:
    """The bound from ``$IRIS_TRACKING_GIVE_UP_S`` (default 120 s); a bad value is an error."""
    raw = os.environ.get(GIVE_UP_ENV, "").strip()
    if not raw:
        return DEFAULT_GIVE_UP_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{GIVE_UP_ENV} must be a number of seconds > 0, got {raw!r}")
    return value


def request_bounds(bound_s: float) -> dict[str, str]:
    """MLflow HTTP settings under which one call gives up within about ``bound_s`` seconds.

    MLflow's defaults (7 retries, backoff factor 2, 120 s per attempt) let one call wait
    for many minutes. Here a call retries 5 times: urllib3 waits 0, 2, 4, 8 and 16 times the
    backoff factor (``bound_s // 60``, an integer for MLflow), half the bound in all, so a
    server back within that is fine; each of the 6 attempts waits at most ``bound_s / 12``
    for an answer, the other half for a server that accepts connections but never answers.
    """
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(_RETRIES),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(int(bound_s // 60)),
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": f"{min(1.0, bound_s / 120):g}",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(bound_s // 12))),
    }


@contextlib.contextmanager
def bounded_requests(bound_s: float) -> Iterator[None]:
    """Every MLflow HTTP call in the body gives up within ``bound_s`` (:func:`request_bounds`).

    MLflow reads these settings per request, so they hold for calls from any library in
    the body (Keras callbacks, model logging). Values the user set are kept.
    """
    settings = {name: value for name, value in request_bounds(bound_s).items()
                if not os.environ.get(name, "").strip()}
    with environment(settings):
        yield


def server_answers(tracking_uri: str, timeout_s: float = 3.0) -> bool:
    """Whether an HTTP tracking server answers ``GET /health`` now; local stores always do."""
    if urllib.parse.urlparse(tracking_uri).scheme not in ("http", "https"):
        return True
    try:
        response = requests.get(tracking_uri.rstrip("/") + "/health", timeout=timeout_s,
                                **_request_credentials())
    except requests.RequestException:
        return False
    return response.status_code < 500



__all__ = [
    "DEFAULT_GIVE_UP_S",
    "EXPERIMENT_DESCRIPTION",
    "GIVE_UP_ENV",
    "LOCAL_DB_NAME",
    "TrackingServerError",
    "TrackingServerLostError",
    "TrackingUriMissingError",
    "bounded_requests",
    "check_tracking_server",
    "ensure_experiment_tags",
    "environment",
    "first_line",
    "get_or_create_experiment",
    "give_up_s",
    "in_kfp_pod",
    "is_local_store",
    "local_artifact_root",
    "local_store_lock",
    "lock_path",
    "request_bounds",
    "resolve_tracking_uri",
    "server_answers",
]
