"""Evaluation step: honest metrics on the held-out test split, a gate verdict and a report.

Only the test split is scored (the notebook scored its own training images). Every metric
is shown beside the majority-class baseline, the score a model that learned nothing gets,
and with a 95% bootstrap interval (``pipeline.lib.stats``): on ~60 test images a point
estimate alone moves by more than most differences between runs. The per-image predictions
(keyed by image content sha256) are kept so the registry can compare two models on the same
images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from pipeline.config import PipelineConfig
from pipeline.lib import inputs, models, records, report, stats

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"
MISCLASSIFIED_PNG = "misclassified.png"
PREDICTIONS_FILE = stats.PREDICTIONS_FILE
MAX_MISCLASSIFIED_SHOWN = 36


def score(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 over all ``num_classes`` (absent ones count 0).

    The same arithmetic as the bootstrap's (``stats.confusion_metrics``), so a point estimate
    always lies on the scale of its interval.
    """
    scored = stats.confusion_metrics(stats.confusion(labels, predictions, num_classes))
    return {name: float(scored[name]) for name in stats.METRICS}


def gate_verdict(metrics: Mapping[str, Any], metric: str, gate_on: str,
                 threshold: float) -> tuple[str, float, bool]:
    """(what was compared, its value, passed?): ``metric`` or its interval's lower end.

    ``gate_on="ci_low"`` passes only a model whose 95% interval lies at or above
    ``threshold``, so a lucky draw of test images cannot carry a weak model through.
    """
    if gate_on not in ("point", "ci_low"):
        raise ValueError(f"gate_on must be 'point' or 'ci_low', got {gate_on!r}")
    key = metric if gate_on == "point" else stats.ci_keys(metric)[0]
    value = float(metrics[key])
    return key, value, bool(value >= threshold)


def split_digest(data_dir: str | Path, classes: list[str]) -> str:
    """sha256 over every record's (split, image sha256, class): which images went where.

    Two models with the same digest were trained, validated and tested on the same images
    with the same labels, so the registry may compare them image by image.
    """
    lines = sorted(f"{split}\t{image_id}\t{classes[label]}"
                   for split in records.SPLITS
                   for image_id, label in zip(*inputs.read_index(data_dir, split), strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    config: PipelineConfig,
) -> dict[str, Any]:
    """Score the model in ``model_dir`` on ``data_dir``'s test split; write metrics and report.

    Writes ``metrics.json``, ``predictions.csv`` (per test image: content sha256, true and
    predicted class, probabilities), ``confusion_matrix.png``, ``training_curves.png``,
    ``misclassified.png`` and a self-contained ``report.html`` into ``out_dir``. Returns the
    metrics with ``<metric>_ci_low`` / ``<metric>_ci_high`` beside each point estimate, and
    ``gate_passed``: config.gate_metric (its point estimate, or the interval's lower end when
    ``config.gate_on == "ci_low"``) >= config.gate_threshold.
    """
    model_dir, data_dir, out_dir = Path(model_dir), Path(data_dir), Path(out_dir)
    classes = records.load_classes(data_dir)
    model_classes = _load_json(model_dir / records.CLASSES_FILE)
    if model_classes is not None and list(model_classes) != classes:
        raise ValueError(
            f"the model in {str(model_dir)!r} was trained on classes {model_classes}, but the "
            f"data set in {str(data_dir)!r} has {classes}"
        )
    model = models.load_model(model_dir)
    if model.output_shape[-1] != len(classes):
        raise ValueError(f"model predicts {model.output_shape[-1]} classes, data set has "
                         f"{len(classes)}")
    out_dir.mkdir(parents=True, exist_ok=True)

    labels_all, preds_all, probs_all = [], [], []
    wrong_images: list[np.ndarray] = []
    wrong_titles: list[str] = []
    test = inputs.load_examples(data_dir, "test", config.image_size, cache=False)
    for images, labels in test.batch(config.batch_size).prefetch(2):
        probs = np.asarray(model.predict_on_batch(images))
        preds = probs.argmax(axis=1)
        labels_np = labels.numpy()
        labels_all.append(labels_np)
        preds_all.append(preds)
        probs_all.append(probs)
        for i in np.flatnonzero(preds != labels_np):
            if len(wrong_images) < MAX_MISCLASSIFIED_SHOWN:
                wrong_images.append(images[i].numpy())
                wrong_titles.append(f"true: {classes[labels_np[i]]}\npred: {classes[preds[i]]} "
                                    f"({probs[i, preds[i]]:.2f})")
    if not labels_all:
        raise ValueError(f"the test split under {str(data_dir)!r} is empty")
    y_true = np.concatenate(labels_all)
    y_pred = np.concatenate(preds_all)
    every = list(range(len(classes)))
    image_ids, indexed_labels = inputs.read_index(data_dir, "test")
    if not np.array_equal(indexed_labels, y_true):
        raise RuntimeError(f"the test records under {str(data_dir)!r} were read in two "
                           "different orders; per-image predictions would be mislabelled")
    predictions = stats.Predictions(tuple(image_ids), y_true, y_pred,
                                    np.concatenate(probs_all), tuple(classes))

    metrics: dict[str, Any] = {}
    intervals = stats.bootstrap_intervals(y_true, y_pred, len(classes))
    for name, point in score(y_true, y_pred, len(classes)).items():
        low, high = stats.ci_keys(name)
        metrics.update({name: point, low: intervals[name][0], high: intervals[name][1]})
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=every, zero_division=0)
    recall_ci = [interval or (None, None) for interval in intervals["recall"]]
    metrics["per_class"] = {
        c: {"precision": float(precision[i]), "recall": float(recall[i]),
            "recall_ci_low": recall_ci[i][0], "recall_ci_high": recall_ci[i][1],
            "f1": float(f1[i]), "support": int(support[i])}
        for i, c in enumerate(classes)
    }
    metrics["confusion_matrix"] = stats.confusion(y_true, y_pred, len(classes)).tolist()
    metrics["classes"] = classes
    metrics["interval_method"] = (
        f"{stats.CONFIDENCE:.0%} percentile interval, rescaled stratified bootstrap over test "
        f"images, {stats.RESAMPLES} resamples, seed {stats.SEED}")

    # majority class of the training split, predicted for every test image
    train_labels = inputs.read_labels(data_dir, "train")
    majority = int(np.bincount(train_labels, minlength=len(classes)).argmax()) if len(
        train_labels) else int(np.bincount(y_true, minlength=len(classes)).argmax())
    baseline = score(y_true, np.full_like(y_true, majority), len(classes))
    metrics["baseline"] = {"strategy": "majority class of the training split",
                           "class": classes[majority], **baseline}

    gated, value, passed = gate_verdict(metrics, config.gate_metric, config.gate_on,
                                        config.gate_threshold)
    data_report = _load_json(data_dir / records.REPORT_JSON)
    metrics.update(
        gate_metric=config.gate_metric,
        gate_on=config.gate_on,
        gate_threshold=float(config.gate_threshold),
        gate_value=value,
        gate_passed=passed,
        test_examples=len(y_true),
        misclassified=int((y_true != y_pred).sum()),
        data_sha256=((data_report or {}).get("input") or {}).get("sha256") or "",
        split_digest=split_digest(data_dir, classes),
    )
    summary = _load_json(model_dir / "training_summary.json") or {}
    metrics["model"] = summary.get("model", config.model)

    history = _load_json(model_dir / "history.json") or []
    figures = {
        "confusion_matrix": report.plot_confusion_matrix(
            metrics["confusion_matrix"], classes, out_dir / CONFUSION_PNG),
        "training_curves": report.plot_training_curves(history, out_dir / CURVES_PNG),
        "misclassified": report.plot_image_grid(wrong_images, wrong_titles,
                                                out_dir / MISCLASSIFIED_PNG),
    }
    report.render_html(metrics, data_report, figures, out_dir / REPORT_FILE)

    predictions.write_csv(out_dir / PREDICTIONS_FILE)
    tmp = out_dir / f".{METRICS_FILE}.tmp"
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out_dir / METRICS_FILE)
    logger.info(
        "test split (%d images): accuracy %.3f, balanced accuracy %.3f, macro F1 %.3f "
        "(majority baseline %.3f / %.3f / %.3f); 95%% CI %s; gate %s %.3f >= %.3f: %s",
        metrics["test_examples"], metrics["accuracy"], metrics["balanced_accuracy"],
        metrics["macro_f1"], baseline["accuracy"], baseline["balanced_accuracy"],
        baseline["macro_f1"],
        " / ".join("[{:.3f}, {:.3f}]".format(*(metrics[k] for k in stats.ci_keys(name)))
                   for name in stats.METRICS),
        gated, value, config.gate_threshold, "passed" if metrics["gate_passed"] else "failed",
    )
    return metrics


__all__ = ["PREDICTIONS_FILE", "evaluate_model", "gate_verdict", "score", "split_digest"]
