"""The register step: gate, register the model version, and move the champion/challenger alias.

Users pick models from the MLflow registry by alias (``models:/<name>@champion``), so the
alias must only move to a version that is shown to be better on the gate metric. On ~60 test
images two runs of one config differ by more than most real improvements, so when both
versions were scored on the same images (same data and split digest) the rule is paired: a
bootstrap of the difference over those images, and the alias moves only when the interval's
lower end clears the margin. Otherwise the point estimates are compared and the decision says
so. The decision (and the numbers it was made on) is logged on the active run, tagged on the
version and returned, so a skipped or demoted model is explained in the MLflow UI and the
pipeline summary alike.

The champion's per-image predictions are not recomputed: each version carries a tag pointing
at its evaluate run's ``predictions.csv`` artifact, which that run logged anyway. Keeping
them costs one small file per version (a line per test image: its 64-digit id, two class
names and the probabilities) and, at registration, one artifact download instead of loading
and running the champion model. If that run's artifacts are deleted, the comparison falls
back to point estimates, saying why.

Every alias move is recorded as a registered-model tag ``alias_history.NNNN`` (time, alias,
from and to version, why), and :func:`restore_champion` (``python pipeline.py
--restore-champion VERSION``) puts the champion alias back on any earlier version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import logging
import math
import re
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.lib import stats, tracking
from pipeline.lib.contract import (
    META_DATA_SHA256,
    META_MODEL_URI,
    META_PREDICTIONS_URI,
    META_SPLIT_DIGEST,
    PREDICTIONS_FILE,
)
from pipeline.lib.params import RegisterParams, TrackingParams

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
#: Version tag holding the gate metric's value, so later runs compare without run lookups.
METRIC_TAG_PREFIX = "metric."
#: MLflow 3 logged-model URIs: ``models:/m-<id>`` (registered models are ``models:/<name>/...``).
_MODEL_ID_URI = re.compile(r"^models:/(m-[0-9a-f]+)(?:/.*)?$")
#: Version tags naming what a version was scored on, and where its predictions are kept.
DATA_TAG = "data.sha256"
SPLIT_TAG = "data.split_digest"
PREDICTIONS_TAG = "predictions_uri"
#: Version tags of the comparison with the champion that decided the alias.
COMPARISON_TAG_PREFIX = "compare."
#: Registered-model tags recording alias moves, numbered in order.
HISTORY_TAG_PREFIX = "alias_history."
#: MLflow's longest tag value.
MAX_TAG_VALUE = 5000


@dataclasses.dataclass(frozen=True)
class Evidence:
    """A model's test-split evidence: its per-image predictions and what they were made on.

    ``predictions`` is the local ``predictions.csv`` of the evaluate step;
    ``predictions_uri`` (``runs:/<evaluate run id>/predictions.csv``) is the copy kept in
    MLflow that later registrations download; ``data_sha256`` and ``split_digest`` identify
    the data and the split (``evaluate.split_digest``).
    """

    predictions: str | Path
    predictions_uri: str
    data_sha256: str
    split_digest: str

    def tags(self) -> dict[str, str]:
        return {DATA_TAG: self.data_sha256, SPLIT_TAG: self.split_digest,
                PREDICTIONS_TAG: self.predictions_uri}


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
    number = str(version.version)  # an int from some stores
    tagged = (version.tags or {}).get(_metric_tag(metric_name))
    if tagged is not None:
        try:
            return number, float(tagged)
        except ValueError:
            logger.warning("champion version %s has a bad %s tag %r", version.version,
                           _metric_tag(metric_name), tagged)
    if version.run_id:
        try:
            value = client.get_run(version.run_id).data.metrics.get(metric_name)
        except MlflowException:
            value = None
        if value is not None:
            return number, float(value)
    return number, None


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
    comparison = decision.get("comparison") or {}
    tags = {
        "registry.comparison": comparison.get("method", ""),
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
    metrics += [Metric(f"registry.{key}", comparison[key], now, 0)
                for key in ("difference", "difference_ci_low", "difference_ci_high")
                if comparison.get(key) is not None]
    client.log_batch(run.info.run_id, metrics=metrics,
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])


def promotion_lock(tracking_uri: str, name: str) -> contextlib.AbstractContextManager[None]:
    """An inter-process lock around reading the champion of ``name`` and moving its alias.

    Without it two register steps finishing together both read the same champion, both
    decide to replace it, and the last to write wins, even with the lower score. Local
    (sqlite/file) stores get a file lock beside the store; an MLflow server offers no lock,
    so there the lock is a no-op.
    """
    key = hashlib.sha256(name.encode()).hexdigest()[:16]  # any model name, a safe file name
    return tracking.local_store_lock(tracking_uri, f"promote-{key}")


def register_model(
    model_uri: str,
    *,
    name: str,
    metric_name: str,
    metric_value: float,
    client: MlflowClient | None = None,
    evidence: Evidence | None = None,
    margin: float = 0.0,
) -> dict[str, Any]:
    """Register ``model_uri`` as a new version of ``name`` when the gate passed.

    The new version gets alias ``champion`` when there is none yet, or when it beats the
    current champion by more than ``margin`` (see :func:`compare_with_champion`), else
    ``challenger``; a champion whose value is unknown is kept (a new version cannot be shown
    to beat it). The step runs only behind the gate (``dsl.If``). On any error after the version was
    created, the version is deleted and moved aliases are put back, so the registry never
    holds a half-registered model.

    Returns a dict: ``registered`` (bool), ``decision`` ("champion", "challenger" or
    "not_registered"), ``reason``, ``name``, ``version``, ``alias``, ``model_uri``
    (``models:/<name>/<version>`` or None), ``metric_name``, ``metric_value``,
    ``champion_value``, ``previous_champion_version`` and ``comparison`` (how the champion
    was compared: method, difference and its interval).
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
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    client = client or MlflowClient()

    decision: dict[str, Any] = {
        "registered": False, "decision": "not_registered", "reason": "", "name": name,
        "version": None, "alias": None, "model_uri": None, "metric_name": metric_name,
        "metric_value": metric_value, "champion_value": None, "previous_champion_version": None,
        "comparison": None,
    }
    # read the champion, decide, move the alias: one promotion at a time per model
    with promotion_lock(client.tracking_uri, name):
        champion_version, champion_value = champion_metric(client, name, metric_name)
        previous_challenger = _alias_version(client, name, CHALLENGER)
        decision["previous_champion_version"] = champion_version
        decision["champion_value"] = champion_value
        if champion_version is None:
            alias, reason = CHAMPION, f"first version of {name!r}: becomes champion"
            comparison: dict[str, Any] = {"method": "none"}
        elif champion_value is None:
            alias, reason, comparison = CHALLENGER, (
                f"champion v{champion_version} has no recorded {metric_name}: it stays champion"
            ), {"method": "none"}
        else:
            promote, reason, comparison = compare_with_champion(
                client, name, champion_version, champion_value, metric_name, metric_value,
                evidence, margin)
            alias = CHAMPION if promote else CHALLENGER

        run_id, model_id = _source_for(client, model_uri)
        created_model = _ensure_registered_model(client, name)
        version = None
        history_key = None
        tags = {_metric_tag(metric_name): repr(metric_value), "gate_metric": metric_name,
                **(evidence.tags() if evidence else {}),
                **{f"{COMPARISON_TAG_PREFIX}{k}": str(v) for k, v in comparison.items()
                   if v is not None}}
        try:
            version = client.create_model_version(
                name, source=model_uri, run_id=run_id, model_id=model_id, tags=tags,
                description=reason, await_creation_for=60,
            ).version
            if str(client.get_model_version(name, version).status) not in ("READY", "1"):
                raise RuntimeError(f"model version {name} v{version} did not become READY")
            client.set_registered_model_alias(name, alias, version)
            history_key = _record_alias_move(
                client, name, alias, str(version),
                champion_version if alias == CHAMPION else previous_challenger, reason)
            decision.update(registered=True, decision=alias, reason=reason, version=str(version),
                            alias=alias, model_uri=f"models:/{name}/{version}",
                            comparison=comparison)
            _log_decision(client, decision)
        except BaseException:
            _roll_back(client, name, version, created_model, alias,
                       champion_version if alias == CHAMPION else previous_challenger,
                       history_key)
            raise
    if model_id:
        _link_logged_model(client, model_id, name, str(version))
    logger.info("registered %s as %s v%s with alias %r: %s", model_uri, name, version, alias,
                reason)
    return decision


def compare_with_champion(
    client: MlflowClient, name: str, champion_version: str, champion_value: float,
    metric_name: str, metric_value: float, evidence: Evidence | None, margin: float,
) -> tuple[bool, str, dict[str, Any]]:
    """(promote?, reason, comparison) of a new version against the current champion.

    Paired when both were scored on the same data and split (equal ``data.sha256`` and
    non-empty ``data.split_digest`` tags) and the champion's predictions can be fetched:
    promote only when the lower end of the 95% interval of the difference exceeds
    ``margin``. Otherwise promote when the point estimates differ by more than ``margin``,
    and the reason says why the comparison was not paired.
    """
    champion = client.get_model_version(name, champion_version)
    champion_tags = champion.tags or {}
    why_unpaired = _unpaired_reason(champion_version, champion_tags, metric_name, evidence)
    if why_unpaired is None:
        try:
            difference = _paired(client, champion_tags[PREDICTIONS_TAG], metric_name, evidence)
        except (MlflowException, OSError, ValueError) as exc:
            why_unpaired = (f"champion v{champion_version}'s per-image predictions are not "
                            f"usable ({_message(exc)})")
    if why_unpaired is None:
        promote = difference.ci_low > margin
        verdict = ("lower end above the margin: becomes champion" if promote else
                   "lower end not above the margin: not shown to be better, stays challenger")
        reason = (f"same data and split as champion v{champion_version}: "
                  f"{difference.describe()}; margin {margin:.4f}: {verdict}")
        return promote, reason, {
            "method": "paired_bootstrap", "champion_version": champion_version,
            "difference": difference.value, "difference_ci_low": difference.ci_low,
            "difference_ci_high": difference.ci_high, "confidence": difference.confidence,
            "images": difference.images, "margin": margin}
    change = metric_value - champion_value
    promote = change > margin
    verdict = "beats" if promote else "does not beat"
    reason = (f"{why_unpaired}: compared by point estimate: {metric_name} {metric_value:.4f} "
              f"{verdict} champion v{champion_version}'s {champion_value:.4f} (difference "
              f"{change:+.4f}, margin {margin:.4f})")
    return promote, reason, {"method": "point_estimate", "champion_version": champion_version,
                             "difference": change, "margin": margin,
                             "unpaired_because": why_unpaired}


def _unpaired_reason(champion_version: str, champion_tags: dict[str, str], metric_name: str,
                     evidence: Evidence | None) -> str | None:
    """Why the champion cannot be compared image by image, or None when it can."""
    if evidence is None:
        return "no per-image predictions were given for the new version"
    if metric_name not in stats.METRICS:
        return f"{metric_name} has no paired bootstrap"
    if PREDICTIONS_TAG not in champion_tags:
        return f"champion v{champion_version} has no per-image predictions on record"
    theirs = (champion_tags.get(DATA_TAG, ""), champion_tags.get(SPLIT_TAG, ""))
    ours = (evidence.data_sha256, evidence.split_digest)
    if not ours[1] or theirs != ours:
        return (f"champion v{champion_version} was evaluated on other data or another split "
                f"(data sha256 {theirs[0][:12] or '?'} vs {ours[0][:12] or '?'}, split digest "
                f"{theirs[1][:12] or '?'} vs {ours[1][:12] or '?'})")
    return None


def _paired(client: MlflowClient, champion_uri: str, metric_name: str,
            evidence: Evidence) -> stats.Difference:
    """Paired bootstrap of new minus champion on the images both predictions files share."""
    run_id, _, path = champion_uri.removeprefix("runs:/").partition("/")
    if not champion_uri.startswith("runs:/") or not run_id or not path:
        raise ValueError(f"{PREDICTIONS_TAG} {champion_uri!r} is not runs:/<run id>/<path>")
    with tempfile.TemporaryDirectory(prefix="champion-predictions-") as tmp:
        local = client.download_artifacts(run_id, path, tmp)
        theirs = stats.Predictions.read_csv(local)
    ours = stats.Predictions.read_csv(evidence.predictions)
    labels, new, old = stats.align(ours, theirs)
    return stats.paired_difference(labels, new, old, len(ours.classes), metric_name)


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc)


def restore_champion(name: str, version: str | int, *, client: MlflowClient | None = None,
                     reason: str = "restored by hand") -> dict[str, Any]:
    """Put the ``champion`` alias back on ``version`` of ``name``; returns what moved.

    The undo of a promotion (``python pipeline.py --restore-champion VERSION``): the move is
    recorded in the alias history like every other. ``ValueError`` names a version that does
    not exist.
    """
    client = client or MlflowClient()
    version = str(version)
    try:
        target = client.get_model_version(name, version)
    except MlflowException as exc:
        raise ValueError(f"cannot restore {name!r} v{version}: {exc.message}") from exc
    if str(target.status) not in ("READY", "1"):
        raise ValueError(f"cannot restore {name!r} v{version}: its status is {target.status}")
    previous = _alias_version(client, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, version)
    _record_alias_move(client, name, CHAMPION, version, previous, reason)
    logger.info("%s: champion alias moved from v%s to v%s (%s)", name, previous, version, reason)
    return {"name": name, "alias": CHAMPION, "version": version, "previous_version": previous,
            "model_uri": f"models:/{name}/{version}"}


def alias_history(client: MlflowClient, name: str) -> list[str]:
    """Every recorded alias move of ``name``, oldest first."""
    tags = client.get_registered_model(name).tags or {}
    return [tags[key] for key in sorted(k for k in tags if k.startswith(HISTORY_TAG_PREFIX))]


def _record_alias_move(client: MlflowClient, name: str, alias: str, version: str,
                       previous: str | None, reason: str) -> str:
    """Add one ``alias_history.NNNN`` tag on the registered model; returns its key."""
    tags = client.get_registered_model(name).tags or {}
    number = 1 + sum(1 for key in tags if key.startswith(HISTORY_TAG_PREFIX))
    key = f"{HISTORY_TAG_PREFIX}{number:04d}"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    moved = f"v{previous} -> v{version}" if previous else f"v{version}"
    client.set_registered_model_tag(name, key, f"{now} {alias} {moved}: {reason}"[:MAX_TAG_VALUE])
    return key


def _alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
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
    previous: str | None, history_key: str | None,
) -> None:
    """Undo a failed registration: restore the alias and its history, delete the version."""
    logger.error("registration of %s failed; rolling back", name)
    try:
        if history_key is not None and not created_model:
            client.delete_registered_model_tag(name, history_key)
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
             evaluation_dir: str | Path, params: RegisterParams,
             tracking_params: TrackingParams) -> dict[str, Any]:
    """The ``register_model`` component's body: the registry decision in the step's MLflow run.

    The logged model's URI comes from the training artifact's metadata; the gate's value,
    the data and split digests and the MLflow copy of the per-image predictions from the
    evaluation's Metrics metadata; the predictions themselves from its folder. Returns the
    decision and the run id.
    """
    with tracking.tracked_step("register", tracking_params, params.to_dict()) as run:
        evidence = Evidence(
            predictions=Path(evaluation_dir) / PREDICTIONS_FILE,
            predictions_uri=str(metrics_metadata[META_PREDICTIONS_URI]),
            data_sha256=str(metrics_metadata[META_DATA_SHA256]),
            split_digest=str(metrics_metadata[META_SPLIT_DIGEST]),
        )
        decision = register_model(
            model_metadata[META_MODEL_URI],
            name=params.registered_model_name,
            metric_name=params.gate_metric,
            metric_value=float(metrics_metadata[params.gate_metric]),
            evidence=evidence,
            margin=params.promotion_margin,
        )
    return {**decision, "mlflow_run_id": run.info.run_id}


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "Evidence",
    "alias_history",
    "champion_metric",
    "compare_with_champion",
    "register_model",
    "restore_champion",
    "run_step",
]
