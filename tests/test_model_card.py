"""The model card: what the model is, its data, test metrics with intervals beside the
majority baseline, why it got its alias, and its most frequent confusion."""

from __future__ import annotations

from pipeline.lib import model_card
from pipeline.lib.contract import META_TRAIN_PARAMS

METRICS = {
    "balanced_accuracy": 0.674, "balanced_accuracy_ci_low": 0.522,
    "balanced_accuracy_ci_high": 0.815, "accuracy": 0.763, "accuracy_ci_low": 0.653,
    "accuracy_ci_high": 0.856, "baseline": {"balanced_accuracy": 0.333, "accuracy": 0.644},
    "classes": ["iris-setosa", "iris-versicolour", "iris-virginica"],
    "confusion_matrix": [[5, 1, 0], [0, 30, 8], [0, 2, 13]],
    "per_class": {"iris-setosa": {"support": 6}, "iris-versicolour": {"support": 38},
                  "iris-virginica": {"support": 15}},
    "test_examples": 59, "data_sha256": "ab" * 32, "split_digest": "cd12",
    "interval_method": "95% percentile interval",
}
MODEL = {META_TRAIN_PARAMS: {"backbone": "mobilenet_v2", "alpha": 0.5, "image_size": 320,
                             "pooling": "avg_max", "tta_views": 8, "seed": 42},
         "train_examples": 271}


def test_card_says_model_data_metrics_alias_and_limits() -> None:
    text = model_card.card(METRICS, MODEL, {"registered": True, "alias": "champion",
                                            "reason": "first version"})
    assert "mobilenet_v2 (alpha 0.5), 320 px input, avg_max pooling, 8 test-time views" in text
    assert "271 training images; 59 test images (iris-setosa 6, iris-versicolour 38" in text
    assert "| balanced_accuracy | 0.674 | [0.522, 0.815] | 0.333 |" in text
    assert "| accuracy | 0.763 | [0.653, 0.856] | 0.644 |" in text
    assert "**Alias @champion**: first version" in text
    assert "8 of 38 test images of iris-versicolour were called iris-virginica" in text
