"""One promotion at a time per registered model, and alias moves that are recorded.

Register steps of concurrent pipeline runs may finish together: both would read the same
champion, both decide to replace it, and the last to write wins, even with the lower score.
On a local store they take turns under a file lock beside the store; on an MLflow server,
which has no lock and no compare-and-set, under a lease kept in a registered-model tag
(:func:`promotion_lock`). Every alias move is recorded as a registered-model tag
``alias_history.NNNN`` (time, alias, from and to version, why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import logging
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.lib import tracking_store

logger = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"
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


@dataclasses.dataclass
class AliasMove:
    """An alias a registration moved (or tried to): what to undo if the registration fails."""

    alias: str
    previous: str | None
    history_key: str | None = None


def message(exc: BaseException) -> str:
    """An exception's one-line text (``MlflowException.message`` without the error code)."""
    return getattr(exc, "message", None) or str(exc)


def is_write_conflict(exc: MlflowException) -> bool:
    """Whether a tag or alias write failed because another process created the same key at once.

    A server's tag write is an insert when the key is new, and the store's unique key
    rejects the second of two concurrent inserts (sqlite, PostgreSQL and MySQL wordings).
    """
    return bool(re.search(r"UNIQUE constraint|IntegrityError|[Dd]uplicate (key|entry)",
                          message(exc)))


def is_shared_store(client: MlflowClient) -> bool:
    """True for an MLflow server: no file lock reaches it, so the lease and re-checks apply."""
    return not tracking_store.is_local_store(client.tracking_uri)


@contextlib.contextmanager
def promotion_lock(client: MlflowClient, name: str) -> Iterator[bool]:
    """An inter-process lock around reading the champion of ``name`` and moving its alias.

    Local (sqlite/file) stores get the store's file lock ``<store>.promote-<hash>.lock``
    beside it (:func:`~pipeline.lib.tracking_store.local_store_lock`; the hash makes any
    model name a safe file name). A server gets a lease in a registered-model tag
    (:func:`_server_lease`), and the registration also compare-and-sets the champion alias
    there, in case the lease failed. Yields True when taking the lease created the
    registered model (a failed first registration removes it).
    """
    if is_shared_store(client):
        with _server_lease(client, name) as created:
            yield created
    else:
        key = hashlib.sha256(name.encode()).hexdigest()[:16]
        with tracking_store.local_store_lock(client.tracking_uri, f"promote-{key}"):
            yield False


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
    the others until its lease expires. The registration's compare-and-set of the champion
    alias is the safety net for those cases. Yields True when it created the model.
    """
    token = uuid.uuid4().hex
    created = ensure_registered_model(client, name)
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
            if not _write_lease(client, name, token):
                continue  # another process created the tag at the same moment: read it
            time.sleep(PROMOTION_SETTLE_S)
            holder = _lease_holder(client, name)
        except MlflowException as exc:
            if exc.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise
            # a failed first registration removed the model meanwhile: create it again
            created = ensure_registered_model(client, name) or created
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


def _write_lease(client: MlflowClient, name: str, token: str) -> bool:
    """Write our lease token; False when a concurrent first write of the tag beat ours."""
    owner = f"{socket.gethostname()}:{os.getpid()}"
    try:
        client.set_registered_model_tag(
            name, LEASE_TAG, f"{token} {time.time() + LEASE_TTL_S:.3f} {owner}")
    except MlflowException as exc:
        if not is_write_conflict(exc):
            raise
        return False
    return True


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


def ensure_registered_model(client: MlflowClient, name: str) -> bool:
    """Create registered model ``name`` if missing; True when this call created it."""
    try:
        client.create_registered_model(name)
        return True
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            return False
        raise


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` of ``name`` points at, None when it points nowhere."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(client: MlflowClient, name: str, alias: str, version: str, previous: str | None,
              reason: str, moves: list[AliasMove]) -> bool:
    """Point ``alias`` at ``version`` and record the move (noted first, for the rollback).

    False, with nothing moved, when a server rejected a first ``champion`` alias because
    another process created it at the same moment (that champion must be compared with);
    a challenger alias is then simply set again.
    """
    move = AliasMove(alias, previous)
    moves.append(move)
    try:
        client.set_registered_model_alias(name, alias, version)
    except MlflowException as exc:
        if not is_write_conflict(exc):
            raise
        if alias == CHAMPION:
            moves.pop()
            return False
        client.set_registered_model_alias(name, alias, version)
    move.history_key = record_alias_move(client, name, alias, version, previous, reason)
    return True


def record_alias_move(client: MlflowClient, name: str, alias: str, version: str,
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
            if not is_write_conflict(exc) or conflicts >= PROMOTION_ATTEMPTS:
                raise


def alias_history(client: MlflowClient, name: str) -> list[str]:
    """Every recorded alias move of ``name``, oldest first."""
    tags = client.get_registered_model(name).tags or {}
    return [tags[key] for key in sorted(k for k in tags if k.startswith(HISTORY_TAG_PREFIX))]


__all__ = [
    "CHALLENGER",
    "CHAMPION",
    "LEASE_TAG",
    "AliasMove",
    "alias_history",
    "alias_version",
    "ensure_registered_model",
    "is_shared_store",
    "is_write_conflict",
    "message",
    "promotion_lock",
    "record_alias_move",
    "set_alias",
]
