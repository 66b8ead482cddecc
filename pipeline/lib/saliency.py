"""Where the model looked: Grad-CAM heat maps on the backbone's last feature map.

A thumbnail of a mistake says what went wrong, not why. Grad-CAM (Selvaraju et al., 2017)
weights each channel of the backbone's last feature map by the mean gradient of a class's
log-probability with respect to it; the positive part of the weighted sum shows where the
image pushed the model towards that class. On the frozen backbone this is one forward and
backward pass per image (the plain view, not the test-time views), a few images at a time to
keep the evaluate step's memory near its scoring peak.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
import tensorflow as tf

from pipeline.lib import models

#: Images per backward pass: the activations of a 320 px MobileNetV2 are kept for the gradient.
CHUNK = 4


def grad_cam(model: keras.Model, images: np.ndarray, classes: Sequence[int]) -> np.ndarray | None:
    """Heat maps [n, h, w] in [0, 1] of ``classes[i]`` for ``images[i]`` (uint8 or float,
    0..255), on the backbone's feature grid (e.g. 10x10 for 320 px MobileNetV2); None for a
    model without a pretrained backbone (the notebook's CNN)."""
    classifier = models.classifier_of(model)
    if not models.has_backbone(classifier):
        return None
    to_features, to_probabilities = models.split_at_backbone(classifier)
    maps = []
    for start in range(0, len(images), CHUNK):
        x = tf.convert_to_tensor(np.asarray(images[start:start + CHUNK]), tf.float32)
        wanted = tf.constant(list(classes[start:start + CHUNK]), tf.int32)
        features = to_features(x)
        with tf.GradientTape() as tape:
            tape.watch(features)
            probabilities = to_probabilities(features)
            chosen = tf.gather(probabilities, wanted, axis=1, batch_dims=1)
            score = tf.math.log(chosen + 1e-12)
        gradients = tape.gradient(score, features)
        weights = tf.reduce_mean(gradients, axis=[1, 2], keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
        peak = cam.max(axis=(1, 2), keepdims=True)
        maps.append(np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0))
    return np.concatenate(maps) if maps else np.zeros((0, 1, 1), np.float32)


__all__ = ["CHUNK", "grad_cam"]
