"""Image decoding and resizing shared by training, evaluation and the served model: one decoder.

The served model (``pipeline/lib/serving.py``) ships this file with itself, so it imports
nothing from the project: only TensorFlow and Keras.
"""

from __future__ import annotations

import keras
import tensorflow as tf

#: The resize layer's name (the exported model's first layer after its input).
RESIZE = "resize"


def make_resizer(image_size: int) -> keras.layers.Resizing:
    """The one resize used by the data pipeline and inside the exported model (no drift)."""
    return keras.layers.Resizing(
        image_size, image_size, interpolation="bilinear", crop_to_aspect_ratio=True,
        antialias=True, name=RESIZE,
    )


def fit_image(image: tf.Tensor, resizer: keras.layers.Layer) -> tf.Tensor:
    """An RGB image [height, width, 3] at the model's size as uint8, as the data pipeline caches it.

    Images already at the model's size are only cast; others are resized (centre crop to a
    square, antialiased bilinear), rounded and clipped to 0..255.
    """
    size = resizer.height
    same = tf.logical_and(tf.shape(image)[0] == size, tf.shape(image)[1] == size)
    resized = tf.cond(
        same,
        lambda: tf.cast(image, tf.float32),
        lambda: resizer(tf.cast(image, tf.float32)),
    )
    resized = tf.ensure_shape(resized, [size, size, 3])
    return tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)


def decode_image(encoded: tf.Tensor, resizer: keras.layers.Layer) -> tf.Tensor:
    """Decode JPEG/PNG bytes to RGB and resize to the model's size, as uint8 (cache-friendly)."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return fit_image(image, resizer)


__all__ = ["decode_image", "fit_image", "make_resizer"]
