"""Cross-validation folds over the train + validation images: computed once, the same for all.

Why one place: a sweep compares trials image by image on their out-of-fold predictions, which
is only a paired comparison when every trial held out every image in the same fold. The
folds depend on the images' content hashes, classes and a seed alone (not on file order or
the trial), so any step that asks gets the same assignment.

Stratified by class (each fold holds every class in proportion) and grouped by content hash
(all copies of one content sit in one fold, so no image or its duplicate is on both sides of
a fold, like the train/val/test split). The test split takes no part.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

#: Folds need at least two parts: one to train on, one to score.
MIN_FOLDS = 2
#: The most folds a run may ask for (leave-one-out is not what this is for).
MAX_FOLDS = 20


def _order_key(seed: int, digest: str) -> str:
    """Seeded, platform-independent shuffle key (salted apart from the split's own key)."""
    return hashlib.sha256(f"folds:{seed}:{digest}".encode()).hexdigest()


def check_fold_count(folds: int, class_counts: dict[str, int]) -> None:
    """``ValueError`` naming the limit when ``folds`` cannot give every fold every class.

    Balanced accuracy (and per-class recall) of a held-out fold needs every class in it, so
    the smallest class must have at least one distinct image per fold.
    """
    if folds < MIN_FOLDS or folds > MAX_FOLDS:
        raise ValueError(f"cv_folds={folds}: cross-validation needs {MIN_FOLDS} to {MAX_FOLDS} "
                         "folds (0 turns it off)")
    smallest = min(class_counts, key=lambda c: (class_counts[c], c))
    if class_counts[smallest] < folds:
        raise ValueError(
            f"cv_folds={folds} is more than class {smallest!r} has distinct train + validation "
            f"images ({class_counts[smallest]}): every fold must hold every class; use "
            f"cv_folds <= {class_counts[smallest]}")


def assign_folds(digests: Sequence[str], labels: Sequence[int], folds: int,
                 seed: int) -> np.ndarray:
    """The fold (0 .. folds-1) of every image, stratified by class and grouped by content.

    Within a class, contents are ordered by a seeded hash and dealt out round robin; the deal
    continues where the previous class stopped, so fold sizes differ by at most one image
    per content group.
    """
    if len(digests) != len(labels):
        raise ValueError(f"{len(digests)} digests but {len(labels)} labels")
    by_class: dict[int, set[str]] = defaultdict(set)
    for digest, label in zip(digests, labels, strict=True):
        by_class[int(label)].add(digest)
    owner: dict[str, int] = {}
    for label, contents in by_class.items():
        clash = [d for d in contents if d in owner and owner[d] != label]
        if clash:
            raise ValueError(f"content {clash[0][:12]} carries two labels; it must be dropped "
                             "before folding (preprocess drops such duplicates)")
        owner.update(dict.fromkeys(contents, label))
    check_fold_count(folds, {str(c): len(d) for c, d in by_class.items()})
    fold_of: dict[str, int] = {}
    position = 0
    for label in sorted(by_class):
        for digest in sorted(by_class[label], key=lambda d: _order_key(seed, d)):
            fold_of[digest] = position % folds
            position += 1
    return np.array([fold_of[d] for d in digests], dtype=np.int64)


__all__ = ["MAX_FOLDS", "MIN_FOLDS", "assign_folds", "check_fold_count"]
