"""Backbone features of images under an exported model: what the drift check compares.

The features are the input of the model's softmax head (the pooled backbone output for
transfer models), computed on the identity view with the same decoder as training and
serving, so the training reference and new images are described by the same function.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

from pipeline.lib import drift, feature_head, models, records
from pipeline.lib.contract import DRIFT_REFERENCE_FILE
from pipeline.lib.feature_cache import FeatureCache, feature_key
from pipeline.lib.feature_head import uses_feature_head
from pipeline.lib.images import decode_image, make_resizer
from pipeline.lib.params import TrainParams

logger = logging.getLogger(__name__)

#: Images per forward pass.
BATCH_SIZE = 32


def feature_extractor(model: keras.Model) -> keras.Model:
    """Image (uint8/float 0..255, any size) -> the features the head of ``model`` reads, and
    the head's probabilities on them (the identity view's).

    An exported model with test-time views wraps the classifier as a nested model (whose
    ``probabilities`` layer is the Dense head); without views the model is the classifier.
    """
    core = _classifier(model)
    head = core.get_layer(models.HEAD)
    return keras.Model(core.inputs, [head.input, head.output], name="features")


def _classifier(model: keras.Model) -> keras.Model:
    """The classifier inside an exported model (the model itself without test-time views)."""
    return next((layer for layer in model.layers if isinstance(layer, keras.Model)
                 and any(inner.name == models.HEAD for inner in layer.layers)), model)


class Describer:
    """Decodes encoded images like the served model does and returns their features, the
    identity view's predicted class and image statistics
    (:func:`pipeline.lib.drift.image_statistics`)."""

    def __init__(self, model: keras.Model, image_size: int) -> None:
        extractor = feature_extractor(model)
        self._head = [np.asarray(w, np.float32)
                      for w in _classifier(model).get_layer(models.HEAD).get_weights()]
        resizer = make_resizer(image_size)
        self._decode = tf.function(lambda encoded: decode_image(encoded, resizer),
                                   input_signature=[tf.TensorSpec([], tf.string)])
        self._features = tf.function(
            lambda batch: extractor(tf.cast(batch, tf.float32), training=False),
            input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])

    def __call__(self, encoded: Sequence[bytes], sizes: Sequence[tuple[int, int]]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        pixels = self._pixels(encoded)
        features, probabilities = self._features(pixels)
        return (np.asarray(features, np.float32), np.asarray(probabilities).argmax(axis=1),
                drift.image_statistics(pixels, sizes))

    def _pixels(self, encoded: Sequence[bytes]) -> np.ndarray:
        return np.stack([self._decode(item).numpy() for item in encoded])

    def from_features(self, features: np.ndarray, encoded: Sequence[bytes],
                      sizes: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray,
                                                                 np.ndarray]:
        """What :meth:`__call__` returns, from the images' features computed before (the
        feature cache's): the head's prediction on them, and the images' statistics; no
        backbone pass."""
        features = np.asarray(features, np.float32)
        kernel, bias = self._head
        stats = [drift.image_statistics(self._pixels(encoded[i:i + BATCH_SIZE]),
                                        sizes[i:i + BATCH_SIZE])
                 for i in range(0, len(encoded), BATCH_SIZE)]
        return features, (features @ kernel + bias).argmax(axis=1), np.concatenate(stats)


def describe_all(describer: Describer, encoded: Sequence[bytes],
                 sizes: Sequence[tuple[int, int]]) -> tuple[np.ndarray, ...]:
    """:class:`Describer` over any number of images, :data:`BATCH_SIZE` at a time."""
    parts = [describer(encoded[i:i + BATCH_SIZE], sizes[i:i + BATCH_SIZE])
             for i in range(0, len(encoded), BATCH_SIZE)]
    return tuple(np.concatenate(column) for column in zip(*parts, strict=True))


def write_reference(model_dir: str | Path, data_dir: str | Path, image_size: int, *,
                    config: TrainParams | None = None) -> Path:
    """Summarise the training split under the exported model in ``model_dir`` into
    ``model_dir/drift_reference.npz``.

    Each image is filed under the class the model predicts for it, as new images are, so a
    class's comparison is like with like; the identity view's prediction stands in for the
    test-time views' (one backbone pass instead of one per view). The training images'
    identity-view features are the ones the feature head trained on: given the training
    ``config``, read from the feature cache when it has them all (no second backbone pass),
    else computed."""
    model_dir = Path(model_dir)
    examples = records.read_split(data_dir, "train", limit=drift.MAX_REFERENCE_IMAGES)
    sizes = []
    for example in examples:
        with Image.open(io.BytesIO(example.image)) as image:
            sizes.append(image.size)
    describer = Describer(models.load_model(model_dir), image_size)
    encoded = [e.image for e in examples]
    cached = (_cached_identity_features(config, [e.sha256 for e in examples])
              if config is not None else None)
    if cached is not None:
        features, labels, stats = describer.from_features(cached, encoded, sizes)
    else:
        features, labels, stats = describe_all(describer, encoded, sizes)
    reference = drift.Reference.build(features, labels, stats, records.load_classes(data_dir))
    return reference.save(model_dir / DRIFT_REFERENCE_FILE)


def _cached_identity_features(config: TrainParams, shas: Sequence[str]) -> np.ndarray | None:
    """The identity view's features of these images from the feature cache, or None unless
    it holds every one of them (the same keys the feature head stored them under)."""
    cache = FeatureCache.from_env()
    backbone = feature_head.backbone_key(config) if cache is not None else None
    if backbone is None or not uses_feature_head(config):
        return None
    view = feature_head.View("plain").key(config)
    rows = []
    for sha in shas:
        if (row := cache.get(feature_key(backbone, view, sha))) is None:
            return None
        rows.append(row)
    logger.info("drift reference: %d training images' features from the feature cache",
                len(rows))
    return np.stack(rows) if rows else None


__all__ = ["BATCH_SIZE", "Describer", "describe_all", "feature_extractor", "write_reference"]
