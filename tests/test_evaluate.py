"""Evaluation: metric arithmetic, the self-contained report, and a real model on the test split."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest

from pipeline.lib import inputs, report, stats
from pipeline.lib.stats import score
from pipeline.steps.evaluate import (
    evaluate_model,
    gate_verdict,
    passes_gate,
    split_digest,
)
from pipeline.steps.train import train_model
from tests.support.train_helpers import small_eval, small_train


def test_score_counts_every_class():
    labels = np.array([0, 0, 1, 1, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 1, 0, 2, 1])
    got = score(labels, preds, 3)
    assert got["accuracy"] == pytest.approx(5 / 8)
    assert got["balanced_accuracy"] == pytest.approx((1 / 2 + 3 / 4 + 1 / 2) / 3)
    majority = score(labels, np.ones_like(labels), 3)
    assert majority["balanced_accuracy"] == pytest.approx(1 / 3)
    assert majority["macro_f1"] == pytest.approx((0 + 2 * 0.5 * 1 / 1.5 + 0) / 3)


@pytest.mark.parametrize(("gate_on", "threshold", "compared", "passed"), [
    ("point", 0.60, "balanced_accuracy", True),
    ("ci_low", 0.60, "balanced_accuracy_ci_low", False),
    ("ci_low", 0.45, "balanced_accuracy_ci_low", True),  # at the boundary: >= passes
    ("ci_low", 0.4501, "balanced_accuracy_ci_low", False),
])
def test_gate_on_point_or_the_intervals_lower_end(gate_on, threshold, compared, passed):
    metrics = {"balanced_accuracy": 0.62, "balanced_accuracy_ci_low": 0.45,
               "balanced_accuracy_ci_high": 0.78}
    key, value, ok = gate_verdict(metrics, "balanced_accuracy", gate_on, threshold)
    assert (key, value, ok) == (compared, metrics[compared], passed)
    with pytest.raises(ValueError, match="gate_on must be"):
        gate_verdict(metrics, "balanced_accuracy", "upper", threshold)


@pytest.mark.parametrize("value, threshold, passed", [
    (0.5, 0.5, True),  # a tie passes: the README's ">="
    (0.0, 0.0, True),
    (1.0, 1.0, True),
    (0.75, 0.5, True),
    (0.4999, 0.5, False),
    (0.0, 0.01, False),
])
def test_gate_passes_at_or_above_the_threshold(value: float, threshold: float,
                                               passed: bool) -> None:
    assert passes_gate(value, threshold) is passed


def test_report_html_is_self_contained(tmp_path):
    classes = ["a", "b"]
    figure = report.plot_confusion_matrix([[3, 1], [0, 4]], classes, tmp_path / "cm.png")
    metrics = {
        "classes": classes, "accuracy": 0.875, "balanced_accuracy": 0.875, "macro_f1": 0.87,
        "accuracy_ci_low": 0.625, "accuracy_ci_high": 1.0, "balanced_accuracy_ci_low": 0.6,
        "balanced_accuracy_ci_high": 1.0, "macro_f1_ci_low": 0.55, "macro_f1_ci_high": 1.0,
        "interval_method": "95% percentile interval, test bootstrap",
        "per_class": {c: {"precision": 1.0, "recall": 0.75, "recall_ci_low": 0.25,
                          "recall_ci_high": 1.0, "f1": 0.86, "support": 4}
                      for c in classes},
        "baseline": {"class": "b", "accuracy": 0.5, "balanced_accuracy": 0.5, "macro_f1": 0.33},
        "gate_metric": "balanced_accuracy", "gate_value": 0.875, "gate_threshold": 0.5,
        "gate_passed": True, "test_examples": 8, "misclassified": 1, "model": "m",
    }
    path = report.render_html(metrics, {"split_counts": {"test": {"a": 4, "b": 4}}},
                              {"confusion_matrix": figure}, tmp_path / "r.html")
    page = path.read_text()
    assert "data:image/png;base64," in page and "PASSED" in page
    assert not re.search(r'src="(?!data:)', page)  # nothing loaded from elsewhere
    # interval beside point estimate and baseline, per-class recall interval, the method
    assert re.search(r"<td>accuracy</td><td>0\.875</td><td>0\.625 &ndash; 1\.000</td>"
                     r"<td>0\.500</td>", page)
    assert "<td>0.750</td><td>0.250 &ndash; 1.000</td>" in page
    assert "test bootstrap" in page


def test_split_digest_names_the_images_of_every_split(tmp_path_factory, iris_zip, iris_data):
    data_dir = iris_data
    classes = json.loads((data_dir / "classes.json").read_text())
    digest = split_digest(data_dir, classes)
    assert len(digest) == 64 and digest == split_digest(data_dir, classes)
    assert digest != split_digest(data_dir, classes[::-1]), "labels are part of it"
    ids, labels = inputs.read_index(data_dir, "test")
    assert len(set(ids)) == len(ids) and labels.tolist() == inputs.read_labels(
        data_dir, "test").tolist()


@pytest.mark.slow
def test_evaluate_real_model_on_test_split(tmp_path_factory, iris_data, reference_model):
    root = tmp_path_factory.mktemp("evaluate")
    model_dir, _ = reference_model
    data_dir = iris_data
    out = root / "eval"
    metrics = evaluate_model(model_dir, data_dir, out, small_eval())
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    data_report = json.loads((data_dir / "data_report.json").read_text())
    n_test = sum(data_report["split_counts"]["test"].values())
    assert metrics["test_examples"] == n_test
    for key in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0 <= metrics[key] <= 1
        assert 0 <= metrics["baseline"][key] <= 1
        low, high = (metrics[k] for k in stats.ci_keys(key))
        assert 0 <= low <= metrics[key] <= high <= 1 and high - low > 0.02, key
    for values in metrics["per_class"].values():
        assert values["recall_ci_low"] <= values["recall"] <= values["recall_ci_high"]
    predictions = stats.Predictions.read_csv(out / "predictions.csv")
    ids, labels = inputs.read_index(data_dir, "test")
    assert list(predictions.image_ids) == ids and predictions.labels.tolist() == labels.tolist()
    assert predictions.probabilities.shape == (n_test, 3)
    assert score(predictions.labels, predictions.predicted, 3)["accuracy"] == metrics["accuracy"]
    assert metrics["split_digest"] == split_digest(data_dir, metrics["classes"])
    assert metrics["data_sha256"] == data_report["input"]["sha256"]
    assert metrics["gate_on"] == "point"
    assert metrics["baseline"]["class"] == "iris-versicolour"
    assert metrics["baseline"]["balanced_accuracy"] == pytest.approx(1 / 3)
    cm = np.array(metrics["confusion_matrix"])
    assert cm.shape == (3, 3) and cm.sum() == n_test
    assert metrics["misclassified"] == n_test - np.trace(cm)
    assert metrics["accuracy"] == pytest.approx(np.trace(cm) / n_test)
    assert [metrics["per_class"][c]["support"] for c in metrics["classes"]] == cm.sum(1).tolist()
    assert metrics["gate_metric"] == "balanced_accuracy"
    assert metrics["gate_value"] == metrics["balanced_accuracy"]
    assert metrics["gate_passed"] == (metrics["gate_value"] >= metrics["gate_threshold"])
    for name in ("confusion_matrix.png", "training_curves.png", "misclassified.png",
                 "confident_correct.png", "report.html"):
        assert (out / name).stat().st_size > 0
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "iris-virginica" in page

    strict = evaluate_model(model_dir, data_dir, root / "strict",
                            dataclasses.replace(small_eval(), gate_metric="macro_f1",
                                                gate_threshold=1.0))
    assert strict["gate_value"] == strict["macro_f1"]
    assert strict["gate_passed"] is (strict["macro_f1"] >= 1.0)
    # gate on the interval's lower end, threshold right at it: passes; a hair above: fails
    at_low = dataclasses.replace(small_eval(), gate_on="ci_low",
                                 gate_threshold=metrics["balanced_accuracy_ci_low"])
    lower = evaluate_model(model_dir, data_dir, root / "ci_low", at_low)
    assert lower["gate_value"] == metrics["balanced_accuracy_ci_low"] and lower["gate_passed"]
    assert "lower end of its 95% interval" in (root / "ci_low" / "report.html").read_text()


#: A realistic but quick config: the default cached-feature head, on smaller images.
QUALITY_OVERRIDES: dict[str, object] = {"image_size": 128, "head_feature_views": 4,
                                        "fine_tune_epochs": 0}
#: How far above the majority baseline's balanced accuracy (1/3) the model must score.
QUALITY_MARGIN = 0.1


@pytest.mark.slow
def test_trained_model_clearly_beats_the_majority_baseline(tmp_path_factory, iris_zip,
                                                           mobilenet_weights, iris_data):
    """The README's central claim, on the shared data's held-out test split."""
    root = tmp_path_factory.mktemp("quality")
    data_dir = iris_data
    train_model(data_dir, root / "model", small_train(**QUALITY_OVERRIDES))
    metrics = evaluate_model(root / "model", data_dir, root / "eval",
                             small_eval(**QUALITY_OVERRIDES))
    baseline = metrics["baseline"]["balanced_accuracy"]
    assert baseline == pytest.approx(1 / 3)
    assert metrics["balanced_accuracy"] >= baseline + QUALITY_MARGIN, metrics["confusion_matrix"]


def test_evaluate_refuses_mismatched_classes(tmp_path_factory, iris_data):
    root = tmp_path_factory.mktemp("mismatch")
    model_dir = root / "model"
    model_dir.mkdir()
    (model_dir / "classes.json").write_text(json.dumps(["x", "y", "z"]))
    with pytest.raises(ValueError, match="trained on classes"):
        evaluate_model(model_dir, iris_data, root / "out", small_eval())


def test_training_curves_show_a_single_epoch_and_only_recorded_series():
    one = [{"epoch": 1, "phase": "head", "loss": 0.6, "accuracy": 0.8, "val_loss": 0.7,
            "val_accuracy": 0.75}]
    fig = report.training_curves_figure(one)
    for ax in fig.axes:
        assert [line.get_label() for line in ax.lines] == [f"train {ax.get_title()}",
                                                          f"val {ax.get_title()}"]
        for line in ax.lines:
            assert list(line.get_xdata()) == [1]  # the history's 1-based epoch
            assert line.get_marker() == "o", "one point without a marker is invisible"
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [1.0], "integer epoch ticks only"
    report.plt.close(fig)

    partial = [{"epoch": e, "phase": "head", "loss": 1.0 / e, "val_loss": float("nan")}
               for e in (1, 2, 3)]
    fig = report.training_curves_figure(partial)
    loss_ax, accuracy_ax = fig.axes
    assert [line.get_label() for line in loss_ax.lines] == ["train loss"]
    assert list(loss_ax.lines[0].get_xdata()) == [1, 2, 3]
    assert not accuracy_ax.lines
    assert [t.get_text() for t in accuracy_ax.texts] == ["no accuracy recorded"]
    report.plt.close(fig)
