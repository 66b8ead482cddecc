"""Evaluation step: honest metrics on the held-out test split, a gate verdict and a report.

Only the test split is scored (the notebook scored its own training images). Every metric
is shown beside the majority-class baseline, the score a model that learned nothing gets.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)

from pipeline.lib import inputs, models, records, report, tracking
from pipeline.lib.contract import (
    CLASSES_FILE,
    CONFUSION_PNG,
    CURVES_PNG,
    DATA_REPORT_JSON,
    HISTORY_FILE,
    METRICS_FILE,
    MISCLASSIFIED_PNG,
    REPORT_FILE,
    TRAINING_SUMMARY_FILE,
)
from pipeline.lib.files import read_json, write_json
from pipeline.lib.params import EvaluateParams, TrackingParams

logger = logging.getLogger(__name__)

MAX_MISCLASSIFIED_SHOWN = 36


def score(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 over all ``num_classes`` (absent ones count 0)."""
    every = list(range(num_classes))
    present = np.unique(labels)
    recalls = [float(np.mean(predictions[labels == c] == c)) for c in present]
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        # sklearn's balanced accuracy warns on classes absent from y_true; same definition
        "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
        "macro_f1": float(f1_score(labels, predictions, labels=every, average="macro",
                                   zero_division=0)),
    }


def passes_gate(value: float, threshold: float) -> bool:
    """The quality gate's verdict: ``value`` at or above ``threshold`` passes.

    A tie passes, as the README and ``PipelineConfig.gate_threshold`` say (``>=``), so a threshold
    set to a known score admits a model that reaches it.
    """
    return bool(value >= threshold)


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    config: EvaluateParams,
) -> dict[str, Any]:
    """Score the model in ``model_dir`` on ``data_dir``'s test split; write metrics and report.

    Writes ``metrics.json``, ``confusion_matrix.png``, ``training_curves.png``,
    ``misclassified.png`` and a self-contained ``report.html`` into ``out_dir``. Returns the
    metrics, including ``gate_passed`` (config.gate_metric >= config.gate_threshold).
    """
    model_dir, data_dir, out_dir = Path(model_dir), Path(data_dir), Path(out_dir)
    classes = records.load_classes(data_dir)
    model_classes = read_json(model_dir / CLASSES_FILE)
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

    metrics: dict[str, Any] = score(y_true, y_pred, len(classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=every, zero_division=0)
    metrics["per_class"] = {
        c: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
            "support": int(support[i])}
        for i, c in enumerate(classes)
    }
    metrics["confusion_matrix"] = confusion_matrix(y_true, y_pred, labels=every).tolist()
    metrics["classes"] = classes

    # majority class of the training split, predicted for every test image
    train_labels = inputs.read_labels(data_dir, "train")
    majority = int(np.bincount(train_labels, minlength=len(classes)).argmax()) if len(
        train_labels) else int(np.bincount(y_true, minlength=len(classes)).argmax())
    baseline = score(y_true, np.full_like(y_true, majority), len(classes))
    metrics["baseline"] = {"strategy": "majority class of the training split",
                           "class": classes[majority], **baseline}

    value = float(metrics[config.gate_metric])
    metrics.update(
        gate_metric=config.gate_metric,
        gate_threshold=float(config.gate_threshold),
        gate_value=value,
        gate_passed=passes_gate(value, config.gate_threshold),
        test_examples=len(y_true),
        misclassified=int((y_true != y_pred).sum()),
    )
    summary = read_json(model_dir / TRAINING_SUMMARY_FILE) or {}
    metrics["model"] = summary.get("model", "")

    history = read_json(model_dir / HISTORY_FILE) or []
    figures = {
        "confusion_matrix": report.plot_confusion_matrix(
            metrics["confusion_matrix"], classes, out_dir / CONFUSION_PNG),
        "training_curves": report.plot_training_curves(history, out_dir / CURVES_PNG),
        "misclassified": report.plot_image_grid(wrong_images, wrong_titles,
                                                out_dir / MISCLASSIFIED_PNG),
    }
    data_report = read_json(data_dir / DATA_REPORT_JSON)
    report.render_html(metrics, data_report, figures, out_dir / REPORT_FILE)

    write_json(out_dir / METRICS_FILE, metrics)
    logger.info(
        "test split (%d images): accuracy %.3f, balanced accuracy %.3f, macro F1 %.3f "
        "(majority baseline %.3f / %.3f / %.3f); gate %s %.3f >= %.3f: %s",
        metrics["test_examples"], metrics["accuracy"], metrics["balanced_accuracy"],
        metrics["macro_f1"], baseline["accuracy"], baseline["balanced_accuracy"],
        baseline["macro_f1"], config.gate_metric, value, config.gate_threshold,
        "passed" if metrics["gate_passed"] else "failed",
    )
    return metrics


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What the evaluate component hands to KFP: metrics, the gate verdict, the run id."""

    metrics: dict[str, Any]
    gate_passed: bool
    mlflow_run_id: str

    def scalars(self) -> dict[str, float]:
        """The plain numbers, the majority baseline's prefixed, for a KFP Metrics artifact."""
        baseline = {f"majority_baseline_{k}": v for k, v in self.metrics["baseline"].items()}
        return {k: float(v) for k, v in {**self.metrics, **baseline}.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_step(model_dir: str | Path, data_dir: str | Path, out_dir: str | Path,
             report_path: str | Path, params: EvaluateParams,
             tracking_params: TrackingParams) -> Evaluation:
    """The ``evaluate_model`` component's body: score inside the step's MLflow run.

    Test metrics and the majority baseline also go to the parent run, where pipeline runs
    are compared; the HTML report is copied to ``report_path`` for the KFP UI.
    """
    with tracking.tracked_step("evaluate", tracking_params, params.to_dict()) as run:
        metrics = evaluate_model(model_dir, data_dir, out_dir, params)
        tracking.log_metrics(metrics, on_parent=True)
        tracking.log_artifacts(out_dir)
    shutil.copyfile(Path(out_dir) / REPORT_FILE, report_path)
    return Evaluation(metrics, bool(metrics["gate_passed"]), run.info.run_id)


__all__ = ["Evaluation", "evaluate_model", "passes_gate", "run_step", "score"]
