"""Recording on the step's MLflow run: params, metrics, artifacts, the data set as an input.

Every function logs on the active run that :func:`pipeline.lib.tracking_runs.step_run`
opened (and, where it says so, on the pipeline's parent run), or on the run it is given.

Typical use inside a step::

    with tracked_step("train", tracking_params, params.to_dict()):
        summary = train_model(..., callbacks=[MlflowEpochLogger()])
        log_metrics(summary)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
import mlflow.data
import numpy as np
from mlflow.entities import Dataset as DatasetEntity
from mlflow.entities import DatasetInput, InputTag, LoggedModelInput, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.lib.contract import DATA_REPORT_JSON

logger = logging.getLogger(__name__)

TAG_PARENT = "mlflow.parentRunId"  # MLflow's system tag for a nested run's parent

#: Name of the data set's MLflow dataset input (its digest tells versions apart).
DATASET_NAME = "iris-image"

#: Keras log keys that :class:`MlflowEpochLogger` always logs when present.
EPOCH_KEYS = ("loss", "accuracy", "val_loss", "val_accuracy")
#: MLflow name of the score a sweep ranked its trials by, on each trial's run
#: (``choice/cv_balanced_accuracy``): MLflow's Compare view plots a run's alphabetically
#: first metric, and every other train-run metric sorts after this prefix (see
#: :func:`training_metric_name`).
CHOICE_PREFIX = "choice/"


def training_metric_name(key: str) -> str:
    """The MLflow name of a train run's curve or figure: ``val/<name>`` for a ``val_`` or
    ``best_val_`` Keras key (``val/loss``, ``val/best_loss``), else ``train/<key>``.

    Grouped so MLflow's charts show a train and a val section, and so the decision scores
    (``model_val_*``, ``cv_*``, ``choice/*``) come first in its Compare view, not training
    ``accuracy``.
    """
    for prefix, group in (("best_val_", "val/best_"), ("val_", "val/")):
        if key.startswith(prefix):
            return group + key.removeprefix(prefix)
    return f"train/{key}"

# MLflow accepts at most 100 params per log_batch call.
_PARAM_BATCH = 100
#: Characters MLflow refuses in metric names (it allows alphanumerics, _ - . : / and space).
_METRIC_NAME_BAD = re.compile(r"[^\w\-.:/ ]")


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
    """(source_type, source_json) for ``source``: local path, http(s), s3/gs/... or other.

    MLflow's public ``mlflow.data.from_numpy`` resolves a source string the way its own
    dataset logging does; what it cannot place is recorded as a ``code`` source naming it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            described = json.loads(mlflow.data.from_numpy(
                np.zeros(0), source=source, name="source", digest="-").to_json())
    except MlflowException:
        return "code", json.dumps({"tags": {"source": source}})
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
    "CHOICE_PREFIX",
    "DATASET_NAME",
    "EPOCH_KEYS",
    "TAG_PARENT",
    "log_artifacts",
    "log_dataset_input",
    "log_metrics",
    "log_params_once",
    "numeric_metrics",
    "parent_run_id",
    "require_active_run",
    "training_metric_name",
]
