"""Pictures of what the model gets wrong and what it is surest of, for the evaluation report.

A confusion matrix counts mistakes; a user of an image classifier wants to see them. The
misclassified grid's titles give the true and predicted class and every class's
probability (:func:`title`); :func:`confident_correct` draws, per class, the test images
the model got right with the highest probability, which shows what it has learned to look
for. Both read the per-image predictions the evaluate step already made: no second model pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.lib import inputs, report, stats

#: Correct test images shown per class, most confident first.
CONFIDENT_PER_CLASS = 4
#: The grid's file in the evaluate step's output (and the run's artifacts).
CONFIDENT_PNG = "confident_correct.png"


def _short(name: str) -> str:
    """``iris-versicolour`` -> ``versicolour``: the titles are small."""
    return name.removeprefix("iris-")


def title(classes: Sequence[str], true: int, probabilities: np.ndarray) -> str:
    """Thumbnail title: true and predicted class, then each class's probability."""
    predicted = int(np.argmax(probabilities))
    probs = " ".join(f"{_short(c)[:4]} {p:.2f}" for c, p in zip(classes, probabilities,
                                                                 strict=True))
    return f"true: {_short(classes[true])}\npred: {_short(classes[predicted])}\n{probs}"


def confident_indices(predictions: stats.Predictions, per_class: int) -> list[int]:
    """Per class (in class order), the correct test images with the highest probability."""
    correct = predictions.labels == predictions.predicted
    chosen: list[int] = []
    for cls in range(len(predictions.classes)):
        rows = np.flatnonzero(correct & (predictions.labels == cls))
        ranked = rows[np.argsort(-predictions.probabilities[rows, cls], kind="stable")]
        chosen.extend(int(i) for i in ranked[:per_class])
    return chosen


def confident_correct(data_dir: str | Path, image_size: int, predictions: stats.Predictions,
                      path: str | Path, per_class: int = CONFIDENT_PER_CLASS) -> Path:
    """Grid of the most confidently right test images per class (the test split's order is
    the predictions' order, which the evaluate step has checked)."""
    wanted = confident_indices(predictions, per_class)
    position = {index: n for n, index in enumerate(wanted)}
    images: list[np.ndarray] = [np.zeros(0)] * len(wanted)
    test = inputs.load_examples(data_dir, "test", image_size, cache=False)
    for index, (image, _) in enumerate(test.as_numpy_iterator()):
        if index in position:
            images[position[index]] = image
    titles = [title(predictions.classes, int(predictions.labels[i]),
                    predictions.probabilities[i]) for i in wanted]
    return report.plot_image_grid(images, titles, path, columns=per_class)


__all__ = ["CONFIDENT_PER_CLASS", "CONFIDENT_PNG", "confident_correct", "confident_indices",
           "title"]
