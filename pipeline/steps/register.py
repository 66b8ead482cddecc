"""The register step: gate, register the model version, and move the champion/challenger alias.

Users pick models from the MLflow registry by alias (``models:/<name>@champion``), so the
alias must only move to a version that is better on the gate metric. The decision (and the
numbers it was made on) is logged on the active run and returned, so a skipped or demoted
model is explained in the MLflow UI and the pipeline summary alike.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping
from typing import Any

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.lib import tracking
from pipeline.lib.contract import META_GATE_PASSED, META_MODEL_URI
from pipeline.lib.params import RegisterParams, TrackingParams

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
#: Version tag holding the gate metric's value, so later runs compare without run lookups.
METRIC_TAG_PREFIX = "metric."
#: MLflow 3 logged-model URIs: ``models:/m-<id>`` (registered models are ``models:/<name>/...``).
_MODEL_ID_URI = re.compile(r"^models:/(m-[0-9a-f]+)(?:/.*)?$")


def _metric_tag(metric_name: str) -> str:
    return f"{METRIC_TAG_PREFIX}{metric_name}"


def champion_metric(
    client: MlflowClient, name: str, metric_name: str,
) -> tuple[str | None, float | None]:
    """(version, metric value) of the current ``champion`` of ``name``; (None, None) if none.

    The value comes from the version tag this module sets, else from the metric of the run
    that produced the version. A champion whose value cannot be found yields (version, None).
    """
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None, None
        raise
    tagged = (version.tags or {}).get(_metric_tag(metric_name))
    if tagged is not None:
        try:
            return version.version, float(tagged)
        except ValueError:
            logger.warning("champion version %s has a bad %s tag %r", version.version,
                           _metric_tag(metric_name), tagged)
    if version.run_id:
        try:
            value = client.get_run(version.run_id).data.metrics.get(metric_name)
        except MlflowException:
            value = None
        if value is not None:
            return version.version, float(value)
    return version.version, None


def _source_for(client: MlflowClient, model_uri: str) -> tuple[str | None, str | None]:
    """(run_id, model_id) behind ``model_uri``; MLflow 3 ``models:/m-...`` URIs name a model."""
    run_id = model_id = None
    if model_uri.startswith("runs:/"):
        run_id = model_uri[len("runs:/"):].split("/", 1)[0] or None
    else:
        match = _MODEL_ID_URI.match(model_uri)
        model_id = match.group(1) if match else None
        if model_id:
            try:
                run_id = client.get_logged_model(model_id).source_run_id
            except MlflowException as exc:
                raise ValueError(f"cannot register {model_uri!r}: {exc.message}") from exc
    return run_id, model_id


def _log_decision(client: MlflowClient, decision: dict[str, Any]) -> None:
    """Record the decision on the active run (tags) with both numbers (metrics)."""
    run = mlflow.active_run()
    if run is None:
        logger.info("no active MLflow run: registry decision only logged here")
        return
    tags = {
        "registry.decision": decision["decision"],
        "registry.reason": decision["reason"][:5000],
        "registry.model_name": decision["name"],
        "registry.alias": decision["alias"] or "",
        "registry.version": decision["version"] or "",
        "registry.champion_version": decision["previous_champion_version"] or "",
    }
    now = int(time.time() * 1000)
    metrics = [Metric(f"registry.candidate_{decision['metric_name']}",
                      decision["metric_value"], now, 0)]
    if decision["champion_value"] is not None:
        metrics.append(Metric(f"registry.champion_{decision['metric_name']}",
                              decision["champion_value"], now, 0))
    client.log_batch(run.info.run_id, metrics=metrics,
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])


def register_model(
    model_uri: str,
    *,
    name: str,
    metric_name: str,
    metric_value: float,
    gate_passed: bool,
    client: MlflowClient | None = None,
) -> dict[str, Any]:
    """Register ``model_uri`` as a new version of ``name`` when the gate passed.

    The new version gets alias ``champion`` only if ``metric_value`` is strictly greater than
    the current champion's (or there is none), else ``challenger``; a champion whose value is
    unknown is kept (a new version cannot be shown to beat it). A failed gate registers
    nothing. On any error after the version was created, the version is deleted and moved
    aliases are put back, so the registry never holds a half-registered model.

    Returns a dict: ``registered`` (bool), ``decision`` ("champion", "challenger" or
    "not_registered"), ``reason``, ``name``, ``version``, ``alias``, ``model_uri``
    (``models:/<name>/<version>`` or None), ``metric_name``, ``metric_value``,
    ``champion_value`` and ``previous_champion_version``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError("registered model name must be a non-empty string")
    if not isinstance(metric_name, str) or not metric_name.strip():
        raise ValueError("metric_name must be a non-empty string")
    try:
        metric_value = float(metric_value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metric_value must be a number, got {metric_value!r}") from exc
    if not math.isfinite(metric_value):
        raise ValueError(f"metric_value must be finite, got {metric_value!r}")
    if not isinstance(model_uri, str) or not model_uri.strip():
        raise ValueError("model_uri must be a non-empty string")
    client = client or MlflowClient()

    decision: dict[str, Any] = {
        "registered": False, "decision": "not_registered", "reason": "", "name": name,
        "version": None, "alias": None, "model_uri": None, "metric_name": metric_name,
        "metric_value": metric_value, "champion_value": None, "previous_champion_version": None,
    }
    if not gate_passed:
        decision["reason"] = (
            f"gate failed: {metric_name}={metric_value:.4f} did not pass the quality gate; "
            "nothing registered"
        )
        logger.warning("not registering %s: %s", model_uri, decision["reason"])
        _log_decision(client, decision)
        return decision

    champion_version, champion_value = champion_metric(client, name, metric_name)
    previous_challenger = _alias_version(client, name, CHALLENGER)
    decision["previous_champion_version"] = champion_version
    decision["champion_value"] = champion_value
    if champion_version is None:
        alias, reason = CHAMPION, f"first version of {name!r}: becomes champion"
    elif champion_value is None:
        alias, reason = CHALLENGER, (
            f"champion v{champion_version} has no recorded {metric_name}: it stays champion")
    elif metric_value > champion_value:
        alias, reason = CHAMPION, (
            f"{metric_name} {metric_value:.4f} beats champion v{champion_version}'s "
            f"{champion_value:.4f}")
    else:
        alias, reason = CHALLENGER, (
            f"{metric_name} {metric_value:.4f} does not beat champion v{champion_version}'s "
            f"{champion_value:.4f}")

    run_id, model_id = _source_for(client, model_uri)
    created_model = _ensure_registered_model(client, name)
    version = None
    try:
        version = client.create_model_version(
            name, source=model_uri, run_id=run_id, model_id=model_id,
            tags={_metric_tag(metric_name): repr(metric_value), "gate_metric": metric_name},
            description=reason, await_creation_for=60,
        ).version
        if str(client.get_model_version(name, version).status) not in ("READY", "1"):
            raise RuntimeError(f"model version {name} v{version} did not become READY")
        client.set_registered_model_alias(name, alias, version)
        decision.update(registered=True, decision=alias, reason=reason, version=str(version),
                        alias=alias, model_uri=f"models:/{name}/{version}")
        _log_decision(client, decision)
    except BaseException:
        _roll_back(client, name, version, created_model, alias,
                   champion_version if alias == CHAMPION else previous_challenger)
        raise
    if model_id:
        _link_logged_model(client, model_id, name, str(version))
    logger.info("registered %s as %s v%s with alias %r: %s", model_uri, name, version, alias,
                reason)
    return decision


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return client.get_model_version_by_alias(name, alias).version
    except MlflowException:
        return None


def _ensure_registered_model(client: MlflowClient, name: str) -> bool:
    """Create registered model ``name`` if missing; True when this call created it."""
    try:
        client.create_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            return False
        raise


def _roll_back(
    client: MlflowClient, name: str, version: str | None, created_model: bool, alias: str,
    previous: str | None,
) -> None:
    """Undo a failed registration: restore the alias, delete the version (and new model)."""
    logger.error("registration of %s failed; rolling back", name)
    try:
        if version is not None:
            if previous is not None:
                client.set_registered_model_alias(name, alias, previous)
            client.delete_model_version(name, version)
        if created_model:
            client.delete_registered_model(name)
    except MlflowException as exc:  # keep the original error; say what may be left
        logger.error("rollback of %s v%s incomplete: %s", name, version, exc.message)


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Tag the logged model with its registered version, as ``mlflow.register_model`` does."""
    import json

    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    try:
        model = client.get_logged_model(model_id)
        versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        versions.append({"name": name, "version": version})
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
    except (MlflowException, ValueError) as exc:
        logger.warning("could not link logged model %s to %s v%s: %s", model_id, name, version,
                       exc)


def run_step(model_metadata: Mapping[str, Any], metrics_metadata: Mapping[str, Any],
             params: RegisterParams, tracking_params: TrackingParams) -> dict[str, Any]:
    """The ``register_model`` component's body: the registry decision in the step's MLflow run.

    The logged model's URI comes from the training artifact's metadata, the gate's verdict
    and value from the evaluation's Metrics metadata. Returns the decision and the run id.
    """
    with tracking.tracked_step("register", tracking_params, params.to_dict()) as run:
        decision = register_model(
            model_metadata[META_MODEL_URI],
            name=params.registered_model_name,
            metric_name=params.gate_metric,
            metric_value=float(metrics_metadata[params.gate_metric]),
            gate_passed=bool(metrics_metadata[META_GATE_PASSED]),
        )
    return {**decision, "mlflow_run_id": run.info.run_id}


__all__ = ["CHALLENGER", "CHAMPION", "champion_metric", "register_model", "run_step"]
