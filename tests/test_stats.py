"""Bootstrap intervals and paired differences: definitions, coverage, and the predictions file."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, recall_score

from pipeline.lib import stats
from pipeline.lib.contract import PREDICTIONS_FILE

#: Class sizes of the iris test split (seed 42): 11 setosa, 38 versicolour, 10 virginica.
TEST_COUNTS = (11, 38, 10)


def simulate(rng: np.random.Generator, recall: tuple[float, ...],
             counts: tuple[int, ...] = TEST_COUNTS) -> tuple[np.ndarray, np.ndarray]:
    """(labels, predictions): each image right with its class's probability, else a wrong class."""
    k = len(counts)
    labels = np.repeat(np.arange(k), counts)
    right = rng.random(labels.size) < np.asarray(recall)[labels]
    wrong = (labels + rng.integers(1, k, labels.size)) % k
    return labels, np.where(right, labels, wrong)


def test_confusion_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    labels, predictions = simulate(rng, (0.9, 0.5, 0.3))
    got = stats.confusion_metrics(stats.confusion(labels, predictions, 3))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, predictions))
    assert got["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro"))
    assert got["recall"] == pytest.approx(recall_score(labels, predictions, average=None))


def test_a_stack_of_confusions_is_scored_at_once_and_absent_classes_count_zero() -> None:
    one = np.array([[2, 0, 0], [1, 1, 0], [0, 0, 0]])  # class 2 absent and never predicted
    got = stats.confusion_metrics(np.stack([one, one]))
    assert got["accuracy"].tolist() == [0.75, 0.75]
    assert got["balanced_accuracy"] == pytest.approx([0.75, 0.75])  # mean over present classes
    assert got["macro_f1"] == pytest.approx([(0.8 + 2 / 3 + 0) / 3] * 2)
    assert np.isnan(got["recall"][:, 2]).all()


def test_ninety_five_percent_intervals_cover_the_true_value_93_to_97_percent() -> None:
    """1,000 simulated test sets of the iris test split's size with known true metrics."""
    rng = np.random.default_rng(2024)
    recall = (0.8, 0.6, 0.7)
    true_accuracy = float(np.dot(TEST_COUNTS, recall) / sum(TEST_COUNTS))
    true_balanced = float(np.mean(recall))
    covered = np.zeros(2)
    for i in range(1000):
        labels, predictions = simulate(rng, recall)
        ci = stats.bootstrap_intervals(labels, predictions, 3, resamples=500, seed=i)
        covered += [ci["accuracy"][0] <= true_accuracy <= ci["accuracy"][1],
                    ci["balanced_accuracy"][0] <= true_balanced <= ci["balanced_accuracy"][1]]
    accuracy_coverage, balanced_coverage = covered / 1000
    assert 0.93 <= accuracy_coverage <= 0.97
    assert 0.93 <= balanced_coverage <= 0.97


def test_intervals_hold_the_point_estimate_are_seeded_and_name_absent_classes() -> None:
    rng = np.random.default_rng(5)
    labels, predictions = simulate(rng, (0.9, 0.6, 0.8), counts=(12, 30, 0))
    ci = stats.bootstrap_intervals(labels, predictions, 3)
    point = stats.confusion_metrics(stats.confusion(labels, predictions, 3))
    for name in stats.METRICS:
        low, high = ci[name]
        assert low <= point[name] <= high and high - low > 0.05, name
    assert ci["recall"][2] is None  # no test image of class 2
    assert ci["recall"][0][0] <= point["recall"][0] <= ci["recall"][0][1]
    assert ci == stats.bootstrap_intervals(labels, predictions, 3), "same seed, same interval"
    assert ci != stats.bootstrap_intervals(labels, predictions, 3, seed=1)


@pytest.mark.parametrize("compare", [False, True], ids=["intervals", "paired"])
def test_every_resample_keeps_each_classs_image_count(
        monkeypatch: pytest.MonkeyPatch, compare: bool) -> None:
    """Stratified: each resampled confusion matrix weighs every true class as the test set does.

    The labels are shuffled (grouping must go by class, not by position) and one class has a
    single image (drawn once, weight 1).
    """
    rng = np.random.default_rng(13)
    labels, predictions = simulate(rng, (0.8, 0.5, 0.7, 0.5), counts=(*TEST_COUNTS, 1))
    order = rng.permutation(labels.size)
    labels, predictions = labels[order], predictions[order]
    scored: list[np.ndarray] = []

    def recording(confusion: np.ndarray) -> dict[str, np.ndarray]:
        if np.ndim(confusion) == 3:  # a stack of resamples (point estimates are 2-D)
            scored.append(np.asarray(confusion))
        return confusion_metrics(confusion)

    confusion_metrics = stats.confusion_metrics
    monkeypatch.setattr(stats, "confusion_metrics", recording)
    monkeypatch.setattr(stats, "_CHUNK_CELLS", 2_000)  # several chunks
    if compare:
        stats.paired_difference(labels, predictions, labels, 4, "accuracy", resamples=300)
    else:
        stats.bootstrap_intervals(labels, predictions, 4, resamples=300)
    resampled = np.concatenate(scored)
    assert resampled.shape[0] == 300 * (2 if compare else 1)
    np.testing.assert_allclose(resampled.sum(axis=-1),
                               np.broadcast_to([*TEST_COUNTS, 1], resampled.shape[:2]))


def test_large_test_sets_are_resampled_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(9)
    labels, predictions = simulate(rng, (0.7, 0.7, 0.7), counts=(400, 400, 400))
    monkeypatch.setattr(stats, "_CHUNK_CELLS", 10_000)  # 8 resamples per chunk
    ci = stats.bootstrap_intervals(labels, predictions, 3, resamples=200)
    # +-1.96 standard errors of a proportion over 1,200 images: about +-0.026
    assert 0.035 < ci["accuracy"][1] - ci["accuracy"][0] < 0.07


def test_paired_difference_sees_a_real_gain_and_not_noise() -> None:
    rng = np.random.default_rng(11)
    labels, old = simulate(rng, (0.6, 0.6, 0.6))
    better = np.where(rng.random(labels.size) < 0.8, labels, old)  # fixes 80% of images
    gain = stats.paired_difference(labels, better, old, 3, "balanced_accuracy")
    assert gain.ci_low > 0 and gain.value > 0.1
    assert gain.ci_low <= gain.value <= gain.ci_high
    _, same_quality = simulate(rng, (0.6, 0.6, 0.6))
    noise = stats.paired_difference(labels, same_quality, old, 3, "balanced_accuracy")
    assert noise.ci_low < 0 < noise.ci_high
    itself = stats.paired_difference(labels, old, old, 3, "accuracy")
    assert (itself.value, itself.ci_low, itself.ci_high) == (0, 0, 0)
    assert "paired bootstrap over the same 59 test images" in gain.describe()


def test_pairing_is_narrower_than_two_separate_intervals() -> None:
    rng = np.random.default_rng(12)
    labels, a = simulate(rng, (0.7, 0.7, 0.7))
    b = np.where(rng.random(labels.size) < 0.9, a, labels)  # agrees with a on most images
    paired = stats.paired_difference(labels, b, a, 3, "accuracy")
    ci_a = stats.bootstrap_intervals(labels, a, 3)["accuracy"]
    ci_b = stats.bootstrap_intervals(labels, b, 3)["accuracy"]
    half_widths = (ci_a[1] - ci_a[0]) / 2 + (ci_b[1] - ci_b[0]) / 2
    assert paired.ci_high - paired.ci_low < half_widths


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"labels": np.array([0, 3])}, r"labels must lie in \[0, 3\)"),
    ({"predictions": np.array([0])}, "one length"),
    ({"labels": np.array([], int), "predictions": np.array([], int)}, "empty"),
    ({"resamples": 0}, "resamples must be >= 1"),
    ({"confidence": 1.0}, "confidence must be in"),
])
def test_bad_inputs_are_clear_errors(kwargs: dict, message: str) -> None:
    arguments = {"labels": np.array([0, 1]), "predictions": np.array([0, 1]), **kwargs}
    with pytest.raises(ValueError, match=message):
        stats.bootstrap_intervals(num_classes=3, **arguments)
    with pytest.raises(ValueError, match="metric must be one of"):
        stats.paired_difference(np.array([0]), np.array([0]), np.array([0]), 3, "auc")


def _predictions(ids: list[str], labels: list[int], predicted: list[int]) -> stats.Predictions:
    probs = np.eye(3)[predicted] * 0.7 + 0.1
    return stats.Predictions(tuple(ids), np.array(labels), np.array(predicted), probs,
                             ("setosa", "versicolour", "virginica"))


def test_predictions_file_round_trips_and_aligns_by_image_id(tmp_path) -> None:
    mine = _predictions(["a1", "b2", "c3"], [0, 1, 2], [0, 2, 2])
    path = mine.write_csv(tmp_path / PREDICTIONS_FILE)
    assert path.read_text().splitlines()[:2] == [
        "image_id,true_label,predicted_label,prob_setosa,prob_versicolour,prob_virginica",
        "a1,setosa,setosa,0.8,0.1,0.1"]
    back = stats.Predictions.read_csv(path)
    assert back.image_ids == mine.image_ids and back.classes == mine.classes
    assert back.predicted.tolist() == [0, 2, 2] and back.probabilities == pytest.approx(
        mine.probabilities)
    theirs = _predictions(["c3", "a1", "b2"], [2, 0, 1], [1, 0, 1])  # other order
    labels, a, b = stats.align(mine, theirs)
    assert (labels.tolist(), a.tolist(), b.tolist()) == ([0, 1, 2], [0, 2, 2], [0, 1, 1])


@pytest.mark.parametrize(("other", "message"), [
    (_predictions(["a1", "b2", "zz"], [0, 1, 2], [0, 1, 2]), "different test images"),
    (_predictions(["a1", "b2", "c3"], [0, 1, 1], [0, 1, 2]), "different true labels"),
    (_predictions(["a1", "a1", "c3"], [0, 0, 2], [0, 1, 2]), "repeat"),
])
def test_align_refuses_predictions_on_other_images(other: stats.Predictions,
                                                   message: str) -> None:
    with pytest.raises(ValueError, match=message):
        stats.align(_predictions(["a1", "b2", "c3"], [0, 1, 2], [0, 1, 2]), other)


def test_reading_a_file_that_is_not_predictions_names_it(tmp_path) -> None:
    bad = tmp_path / "metrics.json"
    bad.write_text("{}\n")
    with pytest.raises(ValueError, match=r"metrics\.json.*not a predictions file"):
        stats.Predictions.read_csv(bad)
    with pytest.raises(ValueError, match="cannot read predictions"):
        stats.Predictions.read_csv(tmp_path / "missing.csv")
