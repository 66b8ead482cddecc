"""Evaluation step: honest metrics on the held-out test split, a gate verdict and a report.

Only the test split is scored (the notebook scored its own training images). Every metric
is shown beside the majority-class baseline, the score a model that learned nothing gets,
and with a 95% bootstrap interval (``pipeline.lib.stats``): on ~60 test images a point
estimate alone moves by more than most differences between runs. The per-image predictions
(keyed by image content sha256) are kept so the registry can compare two models on the same
images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import precision_recall_fscore_support

from pipeline.lib import (
    gallery,
    inputs,
    model_card,
    models,
    records,
    report,
    saliency,
    stats,
    tracking_log,
    tracking_runs,
)
from pipeline.lib.contract import (
    CLASSES_FILE,
    CONFUSION_PNG,
    CURVES_PNG,
    DATA_REPORT_JSON,
    HISTORY_FILE,
    META_DATA_SHA256,
    META_DATASET_DIGEST,
    META_GATE_METRIC,
    META_GATE_PASSED,
    META_MODEL_ID,
    META_PREDICTIONS_URI,
    META_RUN_ID,
    META_SPLIT_DIGEST,
    METRICS_FILE,
    MISCLASSIFIED_PNG,
    PREDICTIONS_FILE,
    REPORT_FILE,
    TRAINING_SUMMARY_FILE,
)
from pipeline.lib.files import atomic_write_json, atomic_write_text, read_json
from pipeline.lib.params import EvaluateParams, TrackingParams
from pipeline.lib.stats import score

logger = logging.getLogger(__name__)

MAX_MISCLASSIFIED_SHOWN = 36


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
    return key, value, passes_gate(value, threshold)


def split_digest(data_dir: str | Path, classes: list[str]) -> str:
    """sha256 over every record's (split, image sha256, class): which images went where.

    Two models with the same digest were trained, validated and tested on the same images
    with the same labels, so the registry may compare them image by image.
    """
    lines = sorted(f"{split}\t{image_id}\t{classes[label]}"
                   for split in records.SPLITS
                   for image_id, label in zip(*inputs.read_index(data_dir, split), strict=True))
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def trained_image_size(model_dir: str | Path) -> int:
    """The image side the model in ``model_dir`` was trained at (its training summary)."""
    summary = read_json(Path(model_dir) / TRAINING_SUMMARY_FILE) or {}
    if not isinstance(summary.get("image_size"), int):
        raise ValueError(f"the model in {str(model_dir)!r} has no image_size in its "
                         f"{TRAINING_SUMMARY_FILE}: train it again with this version")
    return summary["image_size"]


def passes_gate(value: float, threshold: float) -> bool:
    """The quality gate's verdict: ``value`` at or above ``threshold`` passes.

    A tie passes, as the README and the config's ``gate_threshold`` say (``>=``), so a
    threshold set to a known score admits a model that reaches it.
    """
    return bool(value >= threshold)


def _load_checked_model(model_dir: Path, data_dir: Path, classes: list[str]) -> Any:
    """The Keras model in ``model_dir``, refused unless it predicts ``classes``."""
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
    return model


@dataclasses.dataclass(frozen=True)
class _TestScores:
    """The model's answers on the test split, and the first misclassified images to show."""

    predictions: stats.Predictions
    wrong_images: list[np.ndarray]
    wrong_titles: list[str]
    wrong_predicted: list[int]


def _score_test_split(model: Any, data_dir: Path, classes: list[str], image_size: int,
                      batch_size: int) -> _TestScores:
    """Predict every test image once, in the order ``inputs.read_index`` lists them."""
    labels_all, preds_all, probs_all = [], [], []
    wrong_images: list[np.ndarray] = []
    wrong_titles: list[str] = []
    wrong_predicted: list[int] = []
    test = inputs.load_examples(data_dir, "test", image_size, cache=False)
    predict = models.view_batched_predictor(model, image_size)
    # each backbone call takes every view of its images: about batch_size views in all
    images_per_call = max(1, batch_size // models.test_time_view_count(model))
    for images, labels in test.batch(images_per_call).prefetch(2):
        probs = predict(images)
        preds = probs.argmax(axis=1)
        labels_np = labels.numpy()
        labels_all.append(labels_np)
        preds_all.append(preds)
        probs_all.append(probs)
        for i in np.flatnonzero(preds != labels_np):
            if len(wrong_images) < MAX_MISCLASSIFIED_SHOWN:
                wrong_images.append(images[i].numpy())
                wrong_titles.append(gallery.title(classes, int(labels_np[i]), probs[i]))
                wrong_predicted.append(int(preds[i]))
    if not labels_all:
        raise ValueError(f"the test split under {str(data_dir)!r} is empty")
    y_true = np.concatenate(labels_all)
    image_ids, indexed_labels = inputs.read_index(data_dir, "test")
    if not np.array_equal(indexed_labels, y_true):
        raise RuntimeError(f"the test records under {str(data_dir)!r} were read in two "
                           "different orders; per-image predictions would be mislabelled")
    predictions = stats.Predictions(tuple(image_ids), y_true, np.concatenate(preds_all),
                                    np.concatenate(probs_all), tuple(classes))
    return _TestScores(predictions, wrong_images, wrong_titles, wrong_predicted)


def _metrics_with_intervals(y_true: np.ndarray, y_pred: np.ndarray,
                            classes: list[str]) -> dict[str, Any]:
    """Each metric with its bootstrap interval, per-class figures and the confusion matrix."""
    metrics: dict[str, Any] = {}
    intervals = stats.bootstrap_intervals(y_true, y_pred, len(classes))
    for name, point in score(y_true, y_pred, len(classes)).items():
        low, high = stats.ci_keys(name)
        metrics.update({name: point, low: intervals[name][0], high: intervals[name][1]})
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(range(len(classes))), zero_division=0)
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
    return metrics


def _majority_baseline(data_dir: Path, y_true: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """The scores of predicting the training split's majority class for every test image."""
    train_labels = inputs.read_labels(data_dir, "train")
    majority = int(np.bincount(train_labels, minlength=len(classes)).argmax()) if len(
        train_labels) else int(np.bincount(y_true, minlength=len(classes)).argmax())
    baseline = score(y_true, np.full_like(y_true, majority), len(classes))
    return {"strategy": "majority class of the training split", "class": classes[majority],
            **baseline}


def _mistake_heatmaps(model: Any, scores: _TestScores) -> np.ndarray | None:
    """Grad-CAM of each shown mistake for the class it was called (None without a backbone)."""
    if not scores.wrong_images:
        return None
    started = time.perf_counter()
    heatmaps = saliency.grad_cam(model, np.stack(scores.wrong_images), scores.wrong_predicted)
    logger.info("Grad-CAM of %d misclassified images: %.1fs", len(scores.wrong_images),
                time.perf_counter() - started)
    return heatmaps


def _write_artifacts(metrics: dict[str, Any], scores: _TestScores, heatmaps: np.ndarray | None,
                     model_dir: Path, data_dir: Path, out_dir: Path,
                     data_report: dict[str, Any] | None) -> None:
    """The figures, ``report.html``, ``predictions.csv`` and ``metrics.json`` in ``out_dir``."""
    history = read_json(model_dir / HISTORY_FILE) or []
    figures = {
        "confusion_matrix": report.plot_confusion_matrix(
            metrics["confusion_matrix"], metrics["classes"], out_dir / CONFUSION_PNG),
        "training_curves": report.plot_training_curves(history, out_dir / CURVES_PNG),
        "misclassified": report.plot_image_grid(scores.wrong_images, scores.wrong_titles,
                                                out_dir / MISCLASSIFIED_PNG, heatmaps=heatmaps),
        "confident_correct": gallery.confident_correct(
            data_dir, trained_image_size(model_dir), scores.predictions,
            out_dir / gallery.CONFIDENT_PNG),
    }
    report.render_html(metrics, data_report, figures, out_dir / REPORT_FILE)
    scores.predictions.write_csv(out_dir / PREDICTIONS_FILE)
    atomic_write_json(out_dir / METRICS_FILE, metrics)


def _log_result(metrics: Mapping[str, Any], gated: str) -> None:
    baseline = metrics["baseline"]
    logger.info(
        "test split (%d images): accuracy %.3f, balanced accuracy %.3f, macro F1 %.3f "
        "(majority baseline %.3f / %.3f / %.3f); 95%% CI %s; gate %s %.3f >= %.3f: %s",
        metrics["test_examples"], metrics["accuracy"], metrics["balanced_accuracy"],
        metrics["macro_f1"], baseline["accuracy"], baseline["balanced_accuracy"],
        baseline["macro_f1"],
        " / ".join("[{:.3f}, {:.3f}]".format(*(metrics[k] for k in stats.ci_keys(name)))
                   for name in stats.METRICS),
        gated, metrics["gate_value"], metrics["gate_threshold"],
        "passed" if metrics["gate_passed"] else "failed",
    )


def evaluate_model(
    model_dir: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    config: EvaluateParams,
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
    model = _load_checked_model(model_dir, data_dir, classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores = _score_test_split(model, data_dir, classes, trained_image_size(model_dir),
                               config.batch_size)
    y_true, y_pred = scores.predictions.labels, scores.predictions.predicted
    metrics = _metrics_with_intervals(y_true, y_pred, classes)
    metrics["baseline"] = _majority_baseline(data_dir, y_true, classes)

    gated, value, passed = gate_verdict(metrics, config.gate_metric, config.gate_on,
                                        config.gate_threshold)
    data_report = read_json(data_dir / DATA_REPORT_JSON)
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
    metrics["model"] = (read_json(model_dir / TRAINING_SUMMARY_FILE) or {}).get("model", "")
    _write_artifacts(metrics, scores, _mistake_heatmaps(model, scores), model_dir, data_dir,
                     out_dir, data_report)
    _log_result(metrics, gated)
    return metrics


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """What the evaluate component hands to KFP: metrics, the gate verdict, the run id."""

    metrics: dict[str, Any]
    gate_passed: bool
    mlflow_run_id: str

    def metadata(self) -> dict[str, Any]:
        """The Metrics artifact's metadata: the gate, and what the register step compares
        (data and split digests, the MLflow copy of the per-image predictions)."""
        return {
            META_GATE_METRIC: self.metrics["gate_metric"],
            META_GATE_PASSED: self.gate_passed,
            META_RUN_ID: self.mlflow_run_id,
            META_DATA_SHA256: self.metrics["data_sha256"],
            META_SPLIT_DIGEST: self.metrics["split_digest"],
            META_PREDICTIONS_URI: f"runs:/{self.mlflow_run_id}/{PREDICTIONS_FILE}",
        }

    def scalars(self) -> dict[str, float]:
        """The plain numbers, the majority baseline's prefixed, for a KFP Metrics artifact."""
        baseline = {f"majority_baseline_{k}": v for k, v in self.metrics["baseline"].items()}
        return {k: float(v) for k, v in {**self.metrics, **baseline}.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_step(model_dir: str | Path, model_metadata: Mapping[str, Any], data_dir: str | Path,
             out_dir: str | Path, report_path: str | Path, params: EvaluateParams,
             tracking_params: TrackingParams, card_path: str | Path | None = None) -> Evaluation:
    """The ``evaluate_model`` component's body: score inside the step's MLflow run.

    Test metrics and the majority baseline also go to the parent run, where pipeline runs
    are compared, and are linked to the logged model and its data set (the model's page in
    MLflow lists them); the HTML report is copied to ``report_path`` for the KFP UI, and the
    model card (``card_path``, the KFP UI's Markdown) says what the model is and how it scored.
    """
    digest = model_metadata.get(META_DATASET_DIGEST)
    with tracking_runs.tracked_step("evaluate", tracking_params, params.to_dict()) as run:
        metrics = evaluate_model(model_dir, data_dir, out_dir, params)
        tracking_log.log_metrics(metrics, on_parent=True,
                                 model_id=model_metadata.get(META_MODEL_ID),
                                 dataset=(tracking_log.DATASET_NAME, digest) if digest else None)
        tracking_log.log_artifacts(out_dir)
    shutil.copyfile(Path(out_dir) / REPORT_FILE, report_path)
    if card_path is not None:
        atomic_write_text(card_path, model_card.card(metrics, model_metadata))
    return Evaluation(metrics, bool(metrics["gate_passed"]), run.info.run_id)


__all__ = ["Evaluation", "evaluate_model", "gate_verdict", "passes_gate", "run_step", "score",
           "split_digest"]
