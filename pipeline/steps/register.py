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

Register steps of concurrent pipeline runs may finish together. On a local store they take
turns under a file lock; on an MLflow server, which has no lock and no compare-and-set, they
take turns under a lease kept in a registered-model tag, and each also re-reads the champion
alias right before and a moment after moving it (see :func:`promotion_lock`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import logging
import math
import os
import random
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.lib import model_card, run_story, stats, tracking
from pipeline.lib.contract import (
    META_DATA_SHA256,
    META_MODEL_ID,
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
#: Registered-model tag holding the promotion lease on a server: ``<token> <expiry> <owner>``.
LEASE_TAG = "promotion.lease"
#: Seconds between writing the lease (or the champion alias) on a server and reading it back.
#: It must exceed the longest gap between one of our reads and the write that follows it (one
#: registry request, normally milliseconds): then any write that raced ours is visible.
PROMOTION_SETTLE_S = 1.0
#: Seconds a lease is valid: far longer than a promotion takes, and how long the lease of a
#: killed holder keeps the others waiting.
LEASE_TTL_S = 120.0
#: Seconds to wait for the lease before failing the step (outlasts a dead holder's lease).
LEASE_WAIT_S = 2 * LEASE_TTL_S + 30
#: Mean seconds between reads of a lease someone else holds.
LEASE_POLL_S = 0.5
#: Decisions against a champion alias that keeps moving before settling for challenger.
PROMOTION_ATTEMPTS = 5


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


@dataclasses.dataclass(frozen=True)
class _Decision:
    """Which alias a new version gets, why, and the champion it was compared with."""

    alias: str
    reason: str
    comparison: dict[str, Any]
    champion_version: str | None
    champion_value: float | None


@dataclasses.dataclass
class _AliasMove:
    """An alias this call moved (or tried to): what to undo if the registration fails."""

    alias: str
    previous: str | None
    history_key: str | None = None


def _metric_tag(metric_name: str) -> str:
    return f"{METRIC_TAG_PREFIX}{metric_name}"


def _comparison_tags(comparison: Mapping[str, Any]) -> dict[str, str]:
    return {f"{COMPARISON_TAG_PREFIX}{k}": str(v) for k, v in comparison.items()
            if v is not None}


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


@contextlib.contextmanager
def promotion_lock(client: MlflowClient, name: str) -> Iterator[bool]:
    """An inter-process lock around reading the champion of ``name`` and moving its alias.

    Without it two register steps finishing together both read the same champion, both
    decide to replace it, and the last to write wins, even with the lower score. Local
    (sqlite/file) stores get a file lock beside the store. Any other store (an MLflow server)
    gets a lease in a registered-model tag (:func:`_server_lease`), and :func:`register_model`
    also compare-and-sets the champion alias there, in case the lease failed. Yields True
    when taking the lease created the registered model (a failed first registration removes it).
    """
    if tracking.is_local_store(client.tracking_uri):
        key = hashlib.sha256(name.encode()).hexdigest()[:16]  # any model name, a safe file name
        with tracking.local_store_lock(client.tracking_uri, f"promote-{key}"):
            yield False
    else:
        with _server_lease(client, name) as created:
            yield created


@contextlib.contextmanager
def _server_lease(client: MlflowClient, name: str) -> Iterator[bool]:
    """Hold the promotion lease of ``name`` on a server, a ``promotion.lease`` model tag.

    MLflow has no compare-and-set, so this is Fischer's timed mutual exclusion: when the tag
    is absent or expired, write our token, wait :data:`PROMOTION_SETTLE_S`, read it back, and
    hold the lease only if our token is still there (of processes that read "free" together,
    the last to write wins and the others see its token and wait). Limits: it is safe only if
    the gap between reading "free" and our write landing is shorter than the settle delay (a
    longer stall, e.g. a paused process, can let two holders in); a holder that outlives
    :data:`LEASE_TTL_S` (or whose clock is off by that much) loses it; a killed holder blocks
    the others until its lease expires. :func:`register_model`'s compare-and-set of the
    champion alias is the safety net for those cases. Yields True when it created the model.
    """
    token = uuid.uuid4().hex
    owner = f"{socket.gethostname()}:{os.getpid()}"
    created = _ensure_registered_model(client, name)
    deadline = time.monotonic() + LEASE_WAIT_S
    waiting_for = None
    while True:
        try:
            holder = _lease_holder(client, name)
            if holder is not None and holder[0] != token and holder[1] > time.time():
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the promotion lease of {name!r} is still held by "
                                       f"{holder[2]} after {LEASE_WAIT_S:.0f} s")
                if waiting_for != holder[0]:
                    logger.info("%s: waiting for the promotion lease held by %s", name,
                                holder[2])
                    waiting_for = holder[0]
                time.sleep(LEASE_POLL_S * random.uniform(0.5, 1.5))  # jitter: pollers spread out
                continue
            try:
                client.set_registered_model_tag(
                    name, LEASE_TAG, f"{token} {time.time() + LEASE_TTL_S:.3f} {owner}")
            except MlflowException as exc:
                if not _is_write_conflict(exc):
                    raise
                continue  # another process created the tag at the same moment: read it
            time.sleep(PROMOTION_SETTLE_S)
            holder = _lease_holder(client, name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
            # a failed first registration removed the model meanwhile: create it again
            created = _ensure_registered_model(client, name) or created
            continue
        if holder is not None and holder[0] == token:
            break
    try:
        yield created
    finally:
        with contextlib.suppress(MlflowException):  # the model may be gone (rolled back)
            holder = _lease_holder(client, name)
            if holder is not None and holder[0] == token:
                client.delete_registered_model_tag(name, LEASE_TAG)


def _is_write_conflict(exc: MlflowException) -> bool:
    """Whether a tag write failed because another process created the same key at once.

    A server's tag write is an insert when the key is new, and the store's unique key
    rejects the second of two concurrent inserts (sqlite, PostgreSQL and MySQL wordings).
    """
    return bool(re.search(r"UNIQUE constraint|IntegrityError|[Dd]uplicate (key|entry)",
                          _message(exc)))


def _lease_holder(client: MlflowClient, name: str) -> tuple[str, float, str] | None:
    """(token, expiry as Unix time, owner) of the lease on ``name``; None when there is none."""
    value = (client.get_registered_model(name).tags or {}).get(LEASE_TAG, "")
    token, _, rest = value.partition(" ")
    expiry, _, owner = rest.partition(" ")
    try:
        return (token, float(expiry), owner) if token else None
    except ValueError:
        logger.warning("%s: ignoring a malformed %s tag %r", name, LEASE_TAG, value)
        return None


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
    to beat it). The step runs only behind the gate (``dsl.If``). Concurrent calls for one
    model take turns (:func:`promotion_lock`); on a server the champion alias is also
    compare-and-set (:func:`_move_alias`), so the decision reported is the one that stood
    when the call ended. On any error after the version was created, the version is deleted
    and moved aliases are put back, so the registry never holds a half-registered model.

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

    def decide(champion: tuple[str | None, float | None]) -> _Decision:
        return _decide(client, name, champion, metric_name, metric_value, evidence, margin)

    # read the champion, decide, move the alias: one promotion at a time per model
    with promotion_lock(client, name) as created_by_lock:
        decided = decide(champion_metric(client, name, metric_name))
        run_id, model_id = _source_for(client, model_uri)
        created_model = _ensure_registered_model(client, name) or created_by_lock
        version = None
        moves: list[_AliasMove] = []
        tags = {_metric_tag(metric_name): repr(metric_value), "gate_metric": metric_name,
                **(evidence.tags() if evidence else {}), **_comparison_tags(decided.comparison)}
        try:
            version = str(client.create_model_version(
                name, source=model_uri, run_id=run_id, model_id=model_id, tags=tags,
                description=decided.reason, await_creation_for=60,
            ).version)
            if str(client.get_model_version(name, version).status) not in ("READY", "1"):
                raise RuntimeError(f"model version {name} v{version} did not become READY")
            final = _move_alias(client, name, version, metric_name, decided, decide, moves,
                                check=not tracking.is_local_store(client.tracking_uri))
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


def _decide(
    client: MlflowClient, name: str, champion: tuple[str | None, float | None],
    metric_name: str, metric_value: float, evidence: Evidence | None, margin: float,
) -> _Decision:
    """The alias a new version with ``metric_value`` gets against ``champion`` (version, value)."""
    champion_version, champion_value = champion
    if champion_version is None:
        return _Decision(CHAMPION, f"first version of {name!r}: becomes champion",
                         {"method": "none"}, None, None)
    if champion_value is None:
        return _Decision(CHALLENGER, f"champion v{champion_version} has no recorded "
                         f"{metric_name}: it stays champion", {"method": "none"},
                         champion_version, None)
    promote, reason, comparison = compare_with_champion(
        client, name, champion_version, champion_value, metric_name, metric_value, evidence,
        margin)
    return _Decision(CHAMPION if promote else CHALLENGER, reason, comparison, champion_version,
                     champion_value)


def _move_alias(
    client: MlflowClient, name: str, version: str, metric_name: str, decided: _Decision,
    decide: Callable[[tuple[str | None, float | None]], _Decision], moves: list[_AliasMove],
    *, check: bool,
) -> _Decision:
    """Give ``version`` its alias; with ``check`` (a server), compare-and-set the champion.

    Under the local file lock nobody else moves the alias, so it is set once. On a server
    the lease normally keeps others out too, but it rests on timing (see
    :func:`_server_lease`), so a champion move is checked twice. Right before it: the
    champion must still be the version the decision was made against, else decide again
    against the new one. A settle delay after it: the champion must still be ours, else
    another process moved it after us; decide against that one, and move the alias back
    only if ours is shown to be better. A process whose move another one overwrote finds out
    the same way and puts its own version back only if it beats the one found there, so the
    better of the two ends as champion whichever writes last. A version not (or no longer)
    champion becomes challenger; so does one whose champion kept moving for
    :data:`PROMOTION_ATTEMPTS` decisions. Returns the final decision.
    """
    promoted: _Decision | None = None  # the decision that last made us champion

    def decide_again() -> _Decision | None:
        champion = champion_metric(client, name, metric_name)
        return None if champion[0] == version else decide(champion)

    for _ in range(PROMOTION_ATTEMPTS if check else 1):
        if decided.alias == CHAMPION and check:
            current = _alias_version(client, name, CHAMPION)
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
                    else _alias_version(client, name, CHALLENGER))
        if not _set_alias(client, name, decided.alias, version, previous, decided.reason, moves):
            continue  # another process created the champion alias at the same moment
        if decided.alias != CHAMPION or not check:
            return decided
        promoted = decided
        time.sleep(PROMOTION_SETTLE_S)
        current = _alias_version(client, name, CHAMPION)
        if current == version:
            return decided
        logger.warning("%s: champion moved from v%s to v%s right after v%s got it: deciding "
                       "again", name, version, current, version)
        again = decide_again()
        if again is None:  # moved back to us meanwhile
            return promoted
        decided = again
    reason = (f"the champion alias of {name!r} kept moving while v{version} was compared "
              f"with it ({PROMOTION_ATTEMPTS} decisions): registered as challenger")
    decided = dataclasses.replace(decided, alias=CHALLENGER, reason=reason)
    _set_alias(client, name, CHALLENGER, version, _alias_version(client, name, CHALLENGER),
               reason, moves)
    return decided


def _set_alias(client: MlflowClient, name: str, alias: str, version: str, previous: str | None,
               reason: str, moves: list[_AliasMove]) -> bool:
    """Point ``alias`` at ``version`` and record the move (noted first, for the rollback).

    False, with nothing moved, when a server rejected a first ``champion`` alias because
    another process created it at the same moment (that champion must be compared with);
    a challenger alias is then simply set again.
    """
    move = _AliasMove(alias, previous)
    moves.append(move)
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        if not _is_write_conflict(exc):
            raise
        if alias == CHAMPION:
            moves.pop()
            return False
        client.set_registered_model_alias(name, alias, version)
    move.history_key = _record_alias_move(client, name, alias, version, previous, reason)
    return True


def _retag_comparison(client: MlflowClient, name: str, version: str, first: _Decision,
                      final: _Decision) -> None:
    """Make the version's ``compare.*`` tags and description say what decided its alias."""
    before, after = _comparison_tags(first.comparison), _comparison_tags(final.comparison)
    for key in before.keys() - after.keys():
        client.delete_model_version_tag(name, version, key)
    for key, value in after.items():
        client.set_model_version_tag(name, version, key, value)
    client.update_model_version(name, version, description=final.reason)


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
    with promotion_lock(client, name):  # not between a register step's read and its move
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
    """Add one ``alias_history.NNNN`` tag on the registered model; returns its key.

    The number follows the highest one (a rolled-back entry leaves a gap). Two processes
    numbering an entry at the same moment on a server collide on the key: the store rejects
    the second insert, which then takes the next number. (A write landing just after the
    other's commit is an update and overwrites it; the promotion lease prevents that.)
    """
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    moved = f"v{previous} -> v{version}" if previous else f"v{version}"
    value = f"{now} {alias} {moved}: {reason}"[:MAX_TAG_VALUE]
    conflicts = 0
    while True:
        tags = client.get_registered_model(name).tags or {}
        number = 1 + max((int(key[len(HISTORY_TAG_PREFIX):]) for key in tags
                          if key.startswith(HISTORY_TAG_PREFIX)
                          and key[len(HISTORY_TAG_PREFIX):].isdigit()), default=0)
        key = f"{HISTORY_TAG_PREFIX}{number:04d}"
        try:
            client.set_registered_model_tag(name, key, value)
            return key
        except MlflowException as exc:
            conflicts += 1
            if not _is_write_conflict(exc) or conflicts >= PROMOTION_ATTEMPTS:
                raise


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


def _roll_back(client: MlflowClient, name: str, version: str | None, created_model: bool,
               moves: list[_AliasMove]) -> None:
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
                    and _alias_version(client, name, move.alias) == version):
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
        run_story.tell_parent(run.info.run_id, decision, model_metadata.get(META_MODEL_ID))
        model_card.describe_version(decision, evaluation_dir, model_metadata)
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
