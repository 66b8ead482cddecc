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


def test_card_writes_whole_numbers_from_kfp_metadata_and_names_the_data_sets_classes() -> None:
    """KFP hands metadata on as protobuf Structs (every number a float); a user's own data
    set has its own classes, which the limits name instead of iris species."""
    as_kfp_gives_it = {META_TRAIN_PARAMS: {k: float(v) if isinstance(v, int) else v
                                           for k, v in MODEL[META_TRAIN_PARAMS].items()},
                       "train_examples": 271.0}
    pets = {**METRICS, "classes": ["cat", "dog"], "confusion_matrix": [[20.0, 4.0], [3.0, 32.0]],
            "per_class": {"cat": {"support": 24.0}, "dog": {"support": 35.0}}}
    text = model_card.card(pets, as_kfp_gives_it)
    assert "320 px input" in text and "seed 42." in text and "271 training images" in text
    assert ".0" not in text.split("**Test metrics**")[0].replace("0.5", "")
    assert "(cat 24, dog 35)" in text and "4 of 24 test images of cat were called dog" in text
    assert "knows 2 classes only (cat, dog): any other picture gets one of them" in text
    assert "iris" not in text.split("**Known limits**")[1]


def test_a_cross_validated_models_card_gives_its_out_of_fold_scores_and_how_it_was_made() -> None:
    """With ``cv_folds`` the model trained on train + validation: its card says so, with the
    out-of-fold estimate (steadier than 59 test images) before the test metrics."""
    cross_validated = {**MODEL, "cv_folds": 5.0, "cv_images": 330.0,
                       "cv_balanced_accuracy": 0.605, "cv_balanced_accuracy_ci_low": 0.551,
                       "cv_balanced_accuracy_ci_high": 0.662, "cv_accuracy": 0.7,
                       "cv_accuracy_ci_low": 0.65, "cv_accuracy_ci_high": 0.75,
                       "cv_fold_balanced_accuracy": [0.6] * 5}
    text = model_card.card(METRICS, cross_validated)
    assert ("**Cross-validated**: 5 folds over the 330 train + validation images, each scored "
            "by a head that never saw it: balanced_accuracy 0.605 [0.551, 0.662]; accuracy "
            "0.700 [0.650, 0.750]. The model is the 5 fold heads averaged.") in text
    assert text.index("**Cross-validated**") < text.index("**Test metrics**")
    assert "330 train + validation images; 59 test images" in text  # what the model saw
    assert "271 training images" not in text
    assert "Cross-validated" not in model_card.card(METRICS, MODEL)
