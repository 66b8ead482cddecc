"""Register a model version and move the champion/challenger alias; restore an earlier champion.

Users pick models from the MLflow registry by alias (``models:/<name>@champion``), so the
alias must only move to a version shown to be better on the gate metric (the rule is in
:mod:`pipeline.lib.champion`). The decision (and the numbers it was made on) is logged on the
active run, tagged on the version and returned, so a skipped or demoted model is explained in
the MLflow UI and the pipeline summary alike. Concurrent registrations take turns
(:mod:`pipeline.lib.promotion`); on a server the champion alias is also compare-and-set
(:func:`_move_alias`). A registration that fails midway leaves nothing behind, and
:func:`restore_champion` (``python pipeline.py --restore-champion VERSION``) puts the
champion alias back on any earlier version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.lib import promotion
from pipeline.lib.champion import (
    ClassMismatchError,
    Decision,
    Evidence,
    champion_metric,
    comparison_tags,
    decide,
    metric_tag,
)
from pipeline.lib.promotion import (
    CHALLENGER,
    CHAMPION,
    AliasMove,
    alias_history,
    alias_version,
    ensure_registered_model,
    promotion_lock,
    record_alias_move,
    set_alias,
)

logger = logging.getLogger(__name__)

#: MLflow 3 logged-model URIs: ``models:/m-<id>`` (registered models are ``models:/<name>/...``).
_MODEL_ID_URI = re.compile(r"^models:/(m-[0-9a-f]+)(?:/.*)?$")


def _check_arguments(model_uri: str, name: str, metric_name: str, metric_value: Any,
                     margin: float) -> float:
    """``ValueError`` naming a bad argument; returns ``metric_value`` as a float."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError("registered model name must be a non-empty string")
    if not isinstance(metric_name, str) or not metric_name.strip():
        raise ValueError("metric_name must be a non-empty string")
    try:
        value = float(metric_value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metric_value must be a number, got {metric_value!r}") from exc
    if not math.isfinite(value):
        raise ValueError(f"metric_value must be finite, got {metric_value!r}")
    if not isinstance(model_uri, str) or not model_uri.strip():
        raise ValueError("model_uri must be a non-empty string")
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin!r}")
    return value


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
    current champion by more than ``margin`` (:func:`pipeline.lib.champion.decide`), else
    ``challenger``; a champion whose value is unknown is kept (a new version cannot be shown
    to beat it). A version of other classes than the champion's is refused before anything
    is registered (``ClassMismatchError``). Concurrent calls for one model take turns
    (:func:`~pipeline.lib.promotion.promotion_lock`); on a server the champion alias is also
    compare-and-set (:func:`_move_alias`), so the decision reported is the one that stood
    when the call ended. On any error after the version was created, the version is deleted
    and moved aliases are put back, so the registry never holds a half-registered model.

    Returns a dict: ``registered`` (bool), ``decision`` ("champion", "challenger" or
    "not_registered"), ``reason``, ``name``, ``version``, ``alias``, ``model_uri``
    (``models:/<name>/<version>`` or None), ``metric_name``, ``metric_value``,
    ``champion_value``, ``previous_champion_version`` and ``comparison`` (how the champion
    was compared: method, difference and its interval).
    """
    metric_value = _check_arguments(model_uri, name, metric_name, metric_value, margin)
    client = client or MlflowClient()
    decision: dict[str, Any] = {
        "registered": False, "decision": "not_registered", "reason": "", "name": name,
        "version": None, "alias": None, "model_uri": None, "metric_name": metric_name,
        "metric_value": metric_value, "champion_value": None, "previous_champion_version": None,
        "comparison": None,
    }

    def decide_against(champion: tuple[str | None, float | None]) -> Decision:
        return decide(client, name, champion, metric_name, metric_value, evidence, margin)

    # read the champion, decide, move the alias: one promotion at a time per model
    with promotion_lock(client, name) as created_by_lock:
        decided = decide_against(champion_metric(client, name, metric_name))
        run_id, model_id = _source_for(client, model_uri)
        created_model = ensure_registered_model(client, name) or created_by_lock
        version = None
        moves: list[AliasMove] = []
        tags = {metric_tag(metric_name): repr(metric_value), "gate_metric": metric_name,
                **(evidence.tags() if evidence else {}), **comparison_tags(decided.comparison)}
        try:
            version = str(client.create_model_version(
                name, source=model_uri, run_id=run_id, model_id=model_id, tags=tags,
                description=decided.reason, await_creation_for=60,
            ).version)
            if str(client.get_model_version(name, version).status) not in ("READY", "1"):
                raise RuntimeError(f"model version {name} v{version} did not become READY")
            final = _move_alias(client, name, version, metric_name, decided, decide_against,
                                moves, check=promotion.is_shared_store(client))
            if final != decided:  # decided again against a champion that moved meanwhile
                _retag_comparison(client, name, version, decided, final)
            decision.update(registered=True, decision=final.alias, reason=final.reason,
                            version=version, alias=final.alias,
                            model_uri=f"models:/{name}/{version}", comparison=final.comparison,
                            champion_value=final.champion_value,
                            previous_champion_version=final.champion_version)
            _log_decision(client, decision)
        except BaseException:
            _roll_back(client, name, version, created_model, moves)
            raise
    if model_id:
        _link_logged_model(client, model_id, name, version)
    logger.info("registered %s as %s v%s with alias %r: %s", model_uri, name, version,
                final.alias, final.reason)
    return decision


def _move_alias(
    client: MlflowClient, name: str, version: str, metric_name: str, decided: Decision,
    decide_against: Callable[[tuple[str | None, float | None]], Decision],
    moves: list[AliasMove], *, check: bool,
) -> Decision:
    """Give ``version`` its alias; with ``check`` (a server), compare-and-set the champion.

    Under the local file lock nobody else moves the alias, so it is set once. On a server
    the lease normally keeps others out too, but it rests on timing (see
    ``promotion._server_lease``), so a champion move is checked twice. Right before it: the
    champion must still be the version the decision was made against, else decide again
    against the new one. A settle delay after it: the champion must still be ours, else
    another process moved it after us; decide against that one, and move the alias back
    only if ours is shown to be better. A process whose move another one overwrote finds out
    the same way and puts its own version back only if it beats the one found there, so the
    better of the two ends as champion whichever writes last. A version not (or no longer)
    champion becomes challenger; so does one whose champion kept moving for
    ``PROMOTION_ATTEMPTS`` decisions. Returns the final decision.
    """
    promoted: Decision | None = None  # the decision that last made us champion

    def decide_again() -> Decision | None:
        champion = champion_metric(client, name, metric_name)
        return None if champion[0] == version else decide_against(champion)

    for _ in range(promotion.PROMOTION_ATTEMPTS if check else 1):
        if decided.alias == CHAMPION and check:
            current = alias_version(client, name, CHAMPION)
            if current == version:  # already ours (put back by hand, or by our own move)
                return promoted or decided
            if current != decided.champion_version:
                logger.warning("%s: champion moved from v%s to v%s while v%s was compared with "
                               "it: deciding again", name, decided.champion_version, current,
                               version)
                again = decide_again()
                if again is None:
                    return promoted or decided
                decided = again
                continue
        previous = (decided.champion_version if decided.alias == CHAMPION
                    else alias_version(client, name, CHALLENGER))
        if not set_alias(client, name, decided.alias, version, previous, decided.reason, moves):
            continue  # another process created the champion alias at the same moment
        if decided.alias != CHAMPION or not check:
            return decided
        promoted = decided
        time.sleep(promotion.PROMOTION_SETTLE_S)
        current = alias_version(client, name, CHAMPION)
        if current == version:
            return decided
        logger.warning("%s: champion moved from v%s to v%s right after v%s got it: deciding "
                       "again", name, version, current, version)
        again = decide_again()
        if again is None:  # moved back to us meanwhile
            return promoted
        decided = again
    reason = (f"the champion alias of {name!r} kept moving while v{version} was compared "
              f"with it ({promotion.PROMOTION_ATTEMPTS} decisions): registered as challenger")
    decided = dataclasses.replace(decided, alias=CHALLENGER, reason=reason)
    set_alias(client, name, CHALLENGER, version, alias_version(client, name, CHALLENGER),
              reason, moves)
    return decided


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
        "registry.reason": decision["reason"][:promotion.MAX_TAG_VALUE],
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


def _retag_comparison(client: MlflowClient, name: str, version: str, first: Decision,
                      final: Decision) -> None:
    """Make the version's ``compare.*`` tags and description say what decided its alias."""
    before, after = comparison_tags(first.comparison), comparison_tags(final.comparison)
    for key in before.keys() - after.keys():
        client.delete_model_version_tag(name, version, key)
    for key, value in after.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=final.reason)


def _roll_back(client: MlflowClient, name: str, version: str | None, created_model: bool,
               moves: list[AliasMove]) -> None:
    """Undo a failed registration: aliases and history back, the version (and model) deleted.

    An alias is put back only while it still points at our version: on a server another
    process may have moved it since, and that move stands. The registered model is deleted
    only when this call created it and no other process has registered a version in it.
    """
    logger.error("registration of %s failed; rolling back", name)
    try:
        for move in reversed(moves):
            if move.history_key is not None:
                client.delete_registered_model_tag(name, move.history_key)
            if (version is not None and move.previous is not None
                    and alias_version(client, name, move.alias) == version):
                client.set_registered_model_alias(name, move.alias, move.previous)
        if version is not None:
            client.delete_model_version(name, version)
        if created_model and not client.search_model_versions(f"name = '{name}'",
                                                              max_results=1):
            client.delete_registered_model(name)
    except MlflowException as exc:  # keep the original error; say what may be left
        logger.error("rollback of %s v%s incomplete: %s", name, version, exc.message)


def _link_logged_model(client: MlflowClient, model_id: str, name: str, version: str) -> None:
    """Tag the logged model with its registered version, as ``mlflow.register_model`` does."""
    from pipeline.lib.mlflow_compat import MLFLOW_MODEL_VERSIONS

    try:
        model = client.get_logged_model(model_id)
        versions = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
        versions.append({"name": name, "version": version})
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(versions)})
    except (MlflowException, ValueError) as exc:
        logger.warning("could not link logged model %s to %s v%s: %s", model_id, name, version,
                       exc)


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
    with promotion_lock(client, name):  # not between a register step's read and its move
        previous = alias_version(client, name, CHAMPION)
        client.set_registered_model_alias(name, CHAMPION, version)
        record_alias_move(client, name, CHAMPION, version, previous, reason)
    logger.info("%s: champion alias moved from v%s to v%s (%s)", name, previous, version, reason)
    return {"name": name, "alias": CHAMPION, "version": version, "previous_version": previous,
            "model_uri": f"models:/{name}/{version}"}


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "ClassMismatchError",
    "Evidence",
    "alias_history",
    "champion_metric",
    "register_model",
    "restore_champion",
]
