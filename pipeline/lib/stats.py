"""Bootstrap confidence intervals for test metrics and paired comparisons of two models.

The iris test split has about 60 images, so a metric's point estimate alone says little: two
runs of the same config differ by more than most "improvements". Every interval here comes
from a *stratified* bootstrap over test images: each resample draws images within every true
class (with replacement), because the class counts of the test split are fixed by the
stratified split (resampling them too would add variance the real test split does not have)
and every class keeps images, so per-class recall and balanced accuracy are always defined.
A class of ``n_c`` images gets ``n_c - 1`` draws weighted ``n_c / (n_c - 1)`` (Rao and Wu's
rescaled bootstrap): the plain bootstrap's variance is too small by ``(n_c - 1) / n_c``, which
matters for the ten-image classes here. Intervals are percentile intervals.

Number of resamples (:data:`RESAMPLES`): the Monte-Carlo error of a percentile end is about
``sqrt(q (1 - q) / B) / f(x_q)``; for a roughly normal bootstrap distribution with standard
deviation ``s`` and ``q = 0.025`` that is ``2.7 s / sqrt(B)``. ``B = 4000`` makes it 0.04 s:
the ends move by under a twentieth of the metric's own standard error when the seed changes,
which is below what any decision here (gate, champion rule) could resolve, while the whole
computation stays vectorised numpy over a ``B x n`` index matrix (chunked for large ``n``).
``bench/bootstrap.py`` measures the time, the ends' Monte-Carlo error and the coverage.

The bootstrap seed is fixed (:data:`SEED`), not the training seed, so the same predictions
always give the same interval.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.lib.files import atomic_writer

#: Bootstrap resamples per interval (see the module docstring for why this many).
RESAMPLES = 4000
#: Two-sided confidence level of every interval.
CONFIDENCE = 0.95
#: Bootstrap seed: fixed, so an interval depends on the predictions only.
SEED = 0
#: Metrics that get an interval (per-class recall gets one too).
METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_f1")
#: Upper bound on resample-index cells held in memory at once (int64: 8 bytes each).
_CHUNK_CELLS = 4_000_000



def confusion_metrics(confusion: np.ndarray) -> dict[str, np.ndarray]:
    """Accuracy, balanced accuracy, macro F1 and per-class recall from confusion matrices.

    ``confusion`` is ``[..., K, K]`` (rows true, columns predicted), so a stack of resampled
    matrices is scored in one go. Balanced accuracy averages recall over the classes present
    (rows with images); macro F1 averages over all K classes, an absent or never-predicted
    class scoring 0 (scikit-learn's ``zero_division=0``). Recall of an absent class is NaN.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    rows = cm.sum(axis=-1)
    cols = cm.sum(axis=-2)
    total = rows.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(rows > 0, tp / rows, np.nan)
        f1 = np.where(rows + cols > 0, 2 * tp / (rows + cols), 0.0)
        accuracy = np.where(total > 0, tp.sum(axis=-1) / total, 0.0)
    present = rows > 0
    balanced = np.where(present.any(axis=-1),
                        np.nansum(np.where(present, recall, 0.0), axis=-1)
                        / np.maximum(present.sum(axis=-1), 1), 0.0)
    return {"accuracy": accuracy, "balanced_accuracy": balanced,
            "macro_f1": f1.mean(axis=-1), "recall": recall}


def confusion(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """The ``K x K`` confusion matrix (rows true, columns predicted)."""
    labels, predictions = _check(labels, predictions, num_classes)
    return np.bincount(labels * num_classes + predictions,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def score(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 over all ``num_classes`` (absent ones count 0).

    The same arithmetic as the bootstrap's (:func:`confusion_metrics`), so a point estimate
    always lies on the scale of its interval.
    """
    scored = confusion_metrics(confusion(labels, predictions, num_classes))
    return {name: float(scored[name]) for name in METRICS}


def _check(labels: np.ndarray, predictions: np.ndarray, num_classes: int
           ) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.ndim != 1 or labels.shape != predictions.shape:
        raise ValueError(f"labels and predictions must be 1-D of one length, got shapes "
                         f"{labels.shape} and {predictions.shape}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    for name, values in (("labels", labels), ("predictions", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values "
                             f"{values.min()}..{values.max()}")
    return labels, predictions


def _resample_chunks(labels: np.ndarray, resamples: int, seed: int
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rescaled stratified bootstrap draws: ``(index [chunk, m], weight [m])`` chunks.

    Each class with ``n_c`` images contributes ``m_c = n_c - 1`` draws, each weighted
    ``n_c / m_c`` (Rao and Wu's rescaled bootstrap), so the class still weighs ``n_c`` images
    while a proportion's bootstrap variance is ``p (1 - p) / (n_c - 1)``, the unbiased one,
    not the plain bootstrap's ``p (1 - p) / n_c``, which makes intervals on classes of ten
    images too short. A class of one image is drawn once, weight 1.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    draws = [max(members.size - 1, 1) for members in groups]
    weight = np.concatenate([np.full(m, members.size / m)
                             for members, m in zip(groups, draws, strict=True)])
    chunk = max(1, min(resamples, _CHUNK_CELLS // max(weight.size, 1)))
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        parts = [members[rng.integers(0, members.size, size=(rows, m))]
                 for members, m in zip(groups, draws, strict=True)]
        yield np.concatenate(parts, axis=1), weight


def _resampled_confusions(codes: np.ndarray, index: np.ndarray, weight: np.ndarray,
                          num_classes: int) -> np.ndarray:
    """Weighted confusion matrices ``[rows, K, K]`` of the draws (codes = true * K + pred)."""
    cells = num_classes * num_classes
    rows = index.shape[0]
    flat = (codes[index] + (np.arange(rows)[:, None] * cells)).ravel()
    return np.bincount(flat, weights=np.broadcast_to(weight, index.shape).ravel(),
                       minlength=rows * cells).reshape(rows, num_classes, num_classes)


def _interval(values: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    tail = (1 - confidence) / 2
    low, high = np.nanquantile(values, [tail, 1 - tail], axis=0)
    return low, high


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")


def bootstrap_intervals(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, *,
    resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED,
) -> dict[str, tuple[float, float] | list[tuple[float, float] | None]]:
    """Percentile intervals of each metric in :data:`METRICS` and of per-class recall.

    Returns ``{"accuracy": (low, high), ..., "recall": [(low, high) or None per class]}``
    (None for a class with no test image).
    """
    labels, predictions = _check(labels, predictions, num_classes)
    _check_confidence(confidence)
    if labels.size == 0:
        raise ValueError("cannot bootstrap an empty test set")
    codes = labels * num_classes + predictions
    samples: dict[str, list[np.ndarray]] = {name: [] for name in (*METRICS, "recall")}
    for index, weight in _resample_chunks(labels, resamples, seed):
        scored = confusion_metrics(_resampled_confusions(codes, index, weight, num_classes))
        for name, values in scored.items():
            samples[name].append(values)
    out: dict[str, tuple[float, float] | list[tuple[float, float] | None]] = {}
    for name in METRICS:
        low, high = _interval(np.concatenate(samples[name]), confidence)
        out[name] = (float(low), float(high))
    recall = np.concatenate(samples["recall"])
    present = np.isin(np.arange(num_classes), labels)
    lows, highs = _interval(np.where(present, recall, 0.0), confidence)
    out["recall"] = [(float(lo), float(hi)) if ok else None
                     for lo, hi, ok in zip(lows, highs, present, strict=True)]
    return out


@dataclasses.dataclass(frozen=True)
class Difference:
    """Metric of ``a`` minus metric of ``b`` on the same images, with its paired interval."""

    metric: str
    value: float
    ci_low: float
    ci_high: float
    images: int
    confidence: float
    resamples: int

    def describe(self) -> str:
        return (f"{self.metric} difference {self.value:+.4f} "
                f"({self.confidence:.0%} CI {self.ci_low:+.4f} to {self.ci_high:+.4f}, paired "
                f"bootstrap over the same {self.images} test images, {self.resamples} resamples)")


def paired_difference(
    labels: np.ndarray, predictions_a: np.ndarray, predictions_b: np.ndarray,
    num_classes: int, metric: str, *,
    resamples: int = RESAMPLES, confidence: float = CONFIDENCE, seed: int = SEED,
) -> Difference:
    """Paired bootstrap of ``metric(a) - metric(b)``: both scored on every same resample.

    Pairing removes the images both models get right (or wrong) from the noise: only the
    images where they disagree move the difference, so a real improvement shows up with
    far fewer test images than comparing two separate intervals would need.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    labels, predictions_a = _check(labels, predictions_a, num_classes)
    _, predictions_b = _check(labels, predictions_b, num_classes)
    _check_confidence(confidence)
    if labels.size == 0:
        raise ValueError("cannot compare on an empty test set")
    codes_a = labels * num_classes + predictions_a
    codes_b = labels * num_classes + predictions_b
    diffs = []
    for index, weight in _resample_chunks(labels, resamples, seed):
        a = confusion_metrics(_resampled_confusions(codes_a, index, weight, num_classes))[metric]
        b = confusion_metrics(_resampled_confusions(codes_b, index, weight, num_classes))[metric]
        diffs.append(a - b)
    low, high = _interval(np.concatenate(diffs), confidence)
    point = (confusion_metrics(confusion(labels, predictions_a, num_classes))[metric]
             - confusion_metrics(confusion(labels, predictions_b, num_classes))[metric])
    return Difference(metric=metric, value=float(point), ci_low=float(low), ci_high=float(high),
                      images=int(labels.size), confidence=confidence, resamples=resamples)


@dataclasses.dataclass(frozen=True)
class Predictions:
    """One model's per-image test predictions, keyed by a stable image id (content sha256)."""

    image_ids: tuple[str, ...]
    labels: np.ndarray  # true class index per image
    predicted: np.ndarray  # predicted class index per image
    probabilities: np.ndarray  # [n, K]
    classes: tuple[str, ...]

    def write_csv(self, path: str | Path) -> Path:
        """``image_id,true_label,predicted_label,prob_<class>...``; written atomically."""
        path = Path(path)
        with atomic_writer(path, "w") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image_id", "true_label", "predicted_label",
                             *(f"prob_{c}" for c in self.classes)])
            for image_id, true, pred, probs in zip(self.image_ids, self.labels, self.predicted,
                                                   self.probabilities, strict=True):
                writer.writerow([image_id, self.classes[true], self.classes[pred],
                                 *(f"{p:.6g}" for p in probs)])
        return path

    @classmethod
    def read_csv(cls, path: str | Path) -> Predictions:
        """Parse a file :meth:`write_csv` wrote; ``ValueError`` names the file and the problem."""
        path = Path(path)
        try:
            with open(path, newline="") as handle:
                rows = list(csv.reader(handle))
        except OSError as exc:
            raise ValueError(f"cannot read predictions {str(path)!r}: {exc}") from exc
        if not rows or rows[0][:3] != ["image_id", "true_label", "predicted_label"]:
            raise ValueError(f"{str(path)!r} is not a predictions file (header "
                             f"{rows[0] if rows else 'missing'})")
        classes = tuple(h.removeprefix("prob_") for h in rows[0][3:])
        index = {c: i for i, c in enumerate(classes)}
        try:
            body = rows[1:]
            return cls(
                image_ids=tuple(r[0] for r in body),
                labels=np.array([index[r[1]] for r in body], dtype=np.int64),
                predicted=np.array([index[r[2]] for r in body], dtype=np.int64),
                probabilities=np.array([[float(v) for v in r[3:]] for r in body],
                                       dtype=np.float64).reshape(len(body), len(classes)),
                classes=classes,
            )
        except (KeyError, ValueError, IndexError) as exc:
            raise ValueError(f"malformed predictions file {str(path)!r}: {exc!r}") from exc


def align(a: Predictions, b: Predictions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, predicted by a, predicted by b) on the same images in one order.

    Raises ``ValueError`` saying why when ``a`` and ``b`` were not scored on the same images
    with the same labels and classes, the precondition of a paired comparison.
    """
    if a.classes != b.classes:
        raise ValueError(f"different classes: {list(a.classes)} vs {list(b.classes)}")
    if len(set(a.image_ids)) != len(a.image_ids) or len(set(b.image_ids)) != len(b.image_ids):
        raise ValueError("image ids repeat within a predictions file")
    if set(a.image_ids) != set(b.image_ids):
        only_a = len(set(a.image_ids) - set(b.image_ids))
        only_b = len(set(b.image_ids) - set(a.image_ids))
        raise ValueError(f"different test images ({only_a} only in one, {only_b} only in the "
                         "other)")
    position = {image_id: i for i, image_id in enumerate(b.image_ids)}
    order = np.array([position[i] for i in a.image_ids], dtype=np.int64)
    if not np.array_equal(a.labels, b.labels[order]):
        raise ValueError("the same images carry different true labels")
    return a.labels, a.predicted, b.predicted[order]


def ci_keys(metric: str) -> tuple[str, str]:
    """The metrics.json / MLflow names of ``metric``'s interval ends."""
    return f"{metric}_ci_low", f"{metric}_ci_high"


__all__ = [
    "CONFIDENCE",
    "METRICS",
    "RESAMPLES",
    "SEED",
    "Difference",
    "Predictions",
    "align",
    "bootstrap_intervals",
    "ci_keys",
    "confusion",
    "confusion_metrics",
    "paired_difference",
    "score",
]
