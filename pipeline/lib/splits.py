"""Split assignment: stratified per class, grouped by content hash, in a seeded order."""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict

from pipeline.lib import records
from pipeline.lib.scan import Candidate


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes for one class: rounded shares, each split non-empty if n >= 3."""
    n_test = math.floor(n * test_fraction + 0.5)
    n_val = math.floor(n * val_fraction + 0.5)
    if n >= 3:
        n_test, n_val = max(1, n_test), max(1, n_val)
    while n_test + n_val > max(n - 1, 0):  # leave at least one training image
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def _order_key(seed: int, digest: str) -> str:
    """Seeded, platform-independent shuffle key: a content's position depends on it alone."""
    return hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()


def assign_splits(items: list[Candidate], classes: list[str], val_fraction: float,
                  test_fraction: float, seed: int) -> dict[str, list[Candidate]]:
    """Stratified split grouped by content hash: all files of one content share a split."""
    groups: dict[str, dict[str, list[Candidate]]] = {label: defaultdict(list) for label in classes}
    for item in items:
        groups[item.label][item.sha256].append(item)
    splits: dict[str, list[Candidate]] = {name: [] for name in records.SPLITS}
    for label in classes:
        digests = sorted(groups[label], key=lambda d: _order_key(seed, d))
        _, n_val, n_test = split_sizes(len(digests), val_fraction, test_fraction)
        parts = {"test": digests[:n_test], "val": digests[n_test:n_test + n_val],
                 "train": digests[n_test + n_val:]}
        for split, chosen in parts.items():
            for digest in chosen:
                splits[split].extend(groups[label][digest])
    for split in splits:  # classes interleaved, in seeded order, so shards are mixed
        splits[split].sort(key=lambda c: (_order_key(seed, c.sha256), c.path))
    return splits
