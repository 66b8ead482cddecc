"""The evaluation report's pictures: misclassified titles with every probability, and the
most confident correct test images per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.lib import gallery, inputs, stats

CLASSES = ("iris-setosa", "iris-versicolour", "iris-virginica")


def _predictions(labels: list[int], probabilities: list[list[float]]) -> stats.Predictions:
    probs = np.asarray(probabilities)
    return stats.Predictions(tuple(f"id{i}" for i in range(len(labels))), np.asarray(labels),
                             probs.argmax(axis=1), probs, CLASSES)


def test_title_gives_true_predicted_and_every_probability() -> None:
    text = gallery.title(CLASSES, 1, np.array([0.1, 0.3, 0.6]))
    assert text == "true: versicolour\npred: virginica\nseto 0.10 vers 0.30 virg 0.60"


def test_confident_correct_picks_right_answers_by_probability_per_class() -> None:
    predictions = _predictions(
        [0, 0, 0, 1, 1, 2],
        [[0.6, 0.2, 0.2], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1],  # the last one is wrong
         [0.2, 0.7, 0.1], [0.1, 0.85, 0.05], [0.3, 0.3, 0.4]])
    assert gallery.confident_indices(predictions, 2) == [1, 0, 4, 3, 5]


@pytest.mark.slow  # prepares the real data set's splits
def test_confident_correct_grid_shows_test_images(tmp_path: Path, iris_data: Path) -> None:
    labels = inputs.read_labels(iris_data, "test")
    probabilities = np.eye(3)[labels] * 0.9 + 0.05
    path = gallery.confident_correct(iris_data, 64, _predictions(list(labels), probabilities),
                                     tmp_path / gallery.CONFIDENT_PNG, per_class=2)
    with Image.open(path) as image:
        assert image.width > 200 and np.asarray(image.convert("L")).std() > 10
