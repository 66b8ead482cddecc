"""Backbone features of images under an exported model: what the drift check compares.

The features are the input of the model's softmax head (the pooled backbone output for
transfer models), computed on the identity view with the same decoder as training and
serving, so the training reference and new images are described by the same function.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline.lib import drift, models, records
from pipeline.lib.contract import DRIFT_REFERENCE_FILE
from pipeline.lib.images import decode_image, make_resizer

#: Images per forward pass.
BATCH_SIZE = 32


def feature_extractor(model: keras.Model) -> keras.Model:
    """Image (uint8/float 0..255, any size) -> the features the head of ``model`` reads, and
    the head's probabilities on them (the identity view's).

    An exported model with test-time views wraps the classifier as a nested model (whose
    ``probabilities`` layer is the Dense head); without views the model is the classifier.
    """
    core = next((layer for layer in model.layers if isinstance(layer, keras.Model)
                 and any(inner.name == models.HEAD for inner in layer.layers)), model)
    head = core.get_layer(models.HEAD)
    return keras.Model(core.inputs, [head.input, head.output], name="features")


class Describer:
    """Decodes encoded images like the served model does and returns their features, the
    identity view's predicted class and image statistics
    (:func:`pipeline.lib.drift.image_statistics`)."""

    def __init__(self, model: keras.Model, image_size: int) -> None:
        extractor = feature_extractor(model)
        resizer = make_resizer(image_size)
        self._decode = tf.function(lambda encoded: decode_image(encoded, resizer),
                                   input_signature=[tf.TensorSpec([], tf.string)])
        self._features = tf.function(
            lambda batch: extractor(tf.cast(batch, tf.float32), training=False),
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])

    def __call__(self, encoded: Sequence[bytes], sizes: Sequence[tuple[int, int]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixels = np.stack([self._decode(item).numpy() for item in encoded])
        features, probabilities = self._features(pixels)
        return (np.asarray(features, np.float32), np.asarray(probabilities).argmax(axis=1),
                drift.image_statistics(pixels, sizes))


def describe_all(describer: Describer, encoded: Sequence[bytes],
                 sizes: Sequence[tuple[int, int]]) -> tuple[np.ndarray, ...]:
    """:class:`Describer` over any number of images, :data:`BATCH_SIZE` at a time."""
    parts = [describer(encoded[i:i + BATCH_SIZE], sizes[i:i + BATCH_SIZE])
             for i in range(0, len(encoded), BATCH_SIZE)]
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def write_reference(model_dir: str | Path, data_dir: str | Path, image_size: int) -> Path:
    """Summarise the training split under the exported model in ``model_dir`` into
    ``model_dir/drift_reference.npz``.

    Each image is filed under the class the model predicts for it, as new images are, so a
    class's comparison is like with like; the identity view's prediction stands in for the
    test-time views' (one backbone pass instead of one per view)."""
    model_dir = Path(model_dir)
    examples = records.read_split(data_dir, "train", limit=drift.MAX_REFERENCE_IMAGES)
    sizes = []
    for example in examples:
        with Image.open(io.BytesIO(example.image)) as image:
            sizes.append(image.size)
    features, labels, stats = describe_all(Describer(models.load_model(model_dir), image_size),
                                           [e.image for e in examples], sizes)
    reference = drift.Reference.build(features, labels, stats, records.load_classes(data_dir))
    return reference.save(model_dir / DRIFT_REFERENCE_FILE)


__all__ = ["BATCH_SIZE", "Describer", "describe_all", "feature_extractor", "write_reference"]
