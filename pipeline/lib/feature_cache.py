"""An on-disk cache of frozen-backbone features, shared by runs, sweep trials and folds.

A pooled feature vector depends only on the backbone (its weights' digest, name, width,
input size, pooling), on the view of the image (its augmentation parameters and seed, or
the test-time flip) and on the image's content. :func:`feature_key` digests exactly these,
so a second identical run, every sweep trial sharing a backbone setting and every fold read
features instead of recomputing them, and any change of a key part misses.

Entries are ``<root>/<key[:2]>/<key>.npy`` written atomically (temporary file, then
``os.replace``) with a sha256 of their payload in front: an entry that fails the check or
does not parse is deleted and recomputed, never trusted. The cache is bounded: after a
batch of writes, :meth:`FeatureCache.evict` removes least recently used entries (by mtime,
which a hit refreshes) until the total is within ``budget_bytes``.

Where: ``$IRIS_FEATURE_CACHE`` (the local runner sets it beside its outputs; on a cluster
point it at a mounted volume), budget ``$IRIS_FEATURE_CACHE_BYTES`` (default 2 GiB). Unset,
nothing is cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CACHE_ROOT_ENV = "IRIS_FEATURE_CACHE"
CACHE_BYTES_ENV = "IRIS_FEATURE_CACHE_BYTES"
#: The local runner's cache folder inside its output folder.
LOCAL_FEATURE_CACHE = ".feature-cache"
DEFAULT_BUDGET_BYTES = 2 * 2**30
#: Bumped when the way features are computed changes, so old entries miss.
FORMAT_VERSION = 1
_DIGEST_BYTES = 32


def feature_key(backbone: Mapping[str, Any], view: Mapping[str, Any], image_sha256: str) -> str:
    """The cache key of one image's features under one backbone setting and one view."""
    blob = json.dumps({"version": FORMAT_VERSION, "backbone": dict(backbone),
                       "view": dict(view), "image": image_sha256}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


class FeatureCache:
    """Feature vectors by :func:`feature_key`, on disk under ``root``, at most ``budget_bytes``."""

    def __init__(self, root: str | Path, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"the feature cache budget must be > 0 bytes, got {budget_bytes}")
        self.root = Path(root)
        self.budget_bytes = int(budget_bytes)
        self.hits = 0
        self.misses = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FeatureCache | None:
        """The cache ``$IRIS_FEATURE_CACHE`` names, or None when it is unset."""
        environ = os.environ if environ is None else environ
        root = environ.get(CACHE_ROOT_ENV, "").strip()
        if not root:
            return None
        budget = environ.get(CACHE_BYTES_ENV, "").strip()
        try:
            return cls(root, int(budget) if budget else DEFAULT_BUDGET_BYTES)
        except ValueError as exc:
            raise ValueError(f"{CACHE_BYTES_ENV}={budget!r} is not a byte count > 0") from exc

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        """The stored features, or None (missing, or corrupt: then the entry is deleted)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        digest, payload = data[:_DIGEST_BYTES], data[_DIGEST_BYTES:]
        try:
            if hashlib.sha256(payload).digest() != digest:
                raise ValueError("checksum mismatch")
            features = np.load(io.BytesIO(payload), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            logger.warning("feature cache entry %s is corrupt (%s): recomputing it", path, exc)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        # least recently *used* is evicted first; if another process evicted it meanwhile,
        # the copy read is still good
        with contextlib.suppress(FileNotFoundError):
            os.utime(path)
        self.hits += 1
        return features

    def put(self, key: str, features: np.ndarray) -> None:
        """Store ``features`` atomically (a reader sees the old entry, or none, or the new)."""
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(features), allow_pickle=False)
        payload = buffer.getvalue()
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        try:
            with os.fdopen(handle, "wb") as out:
                out.write(hashlib.sha256(payload).digest() + payload)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def evict(self) -> int:
        """Delete least recently used entries until the cache fits its budget; returns how many."""
        entries = []
        for path in self.root.glob("*/*.npy"):
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total <= self.budget_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        if removed:
            logger.info("feature cache %s: evicted %d least recently used entries", self.root,
                        removed)
        return removed


__all__ = [
    "CACHE_BYTES_ENV",
    "CACHE_ROOT_ENV",
    "DEFAULT_BUDGET_BYTES",
    "LOCAL_FEATURE_CACHE",
    "FeatureCache",
    "feature_key",
]
