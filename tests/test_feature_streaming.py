"""Feature extraction for the head streams a split: images are not all held before extracting."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from pipeline.lib import feature_head, inputs, models
from tests.support.train_helpers import small_train

NUM_IMAGES, SIZE, BATCH = 13, 32, 4


class CountingLayer(keras.layers.Layer):
    """Identity that counts the batches the extractor has processed."""

    calls = 0

    def call(self, x: tf.Tensor) -> tf.Tensor:
        CountingLayer.calls += 1
        return x


def _core() -> keras.Model:
    image = keras.Input(shape=(SIZE, SIZE, 3))
    x = CountingLayer()(image)
    x = keras.layers.Conv2D(4, 3, kernel_initializer=keras.initializers.GlorotUniform(1))(x)
    x = keras.layers.GlobalAveragePooling2D(name=models.POOL)(x)
    return keras.Model(image, keras.layers.Dense(3, name=models.HEAD)(x))


@pytest.fixture
def streamed_split(monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, list[int]]:
    """A split served by a generator: its images, and the extractor calls before each was read."""
    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, SIZE, SIZE, 3),
                                               dtype=np.uint8)
    seen: list[int] = []

    def generate():
        for i, image in enumerate(images):
            seen.append(CountingLayer.calls)
            yield image, np.int32(i % 3)

    def load_examples(data_dir, split, image_size, *, cache=True, **kwargs):
        assert not cache, "features are extracted in one pass: nothing to cache"
        return tf.data.Dataset.from_generator(generate, output_signature=(
            tf.TensorSpec((SIZE, SIZE, 3), tf.uint8), tf.TensorSpec((), tf.int32)))

    monkeypatch.setattr(inputs, "load_examples", load_examples)
    return images, seen


def test_extract_features_streams_batches_and_keeps_the_order(streamed_split):
    images, seen = streamed_split
    config = small_train(image_size=SIZE, batch_size=BATCH)
    augmenter = inputs.build_augmenter(config)
    core = _core()
    built = CountingLayer.calls  # building the model calls the layer symbolically
    views = 2
    features, labels = feature_head.extract_features(core, None, "train", config,
                                              augmenter=augmenter, views=views)
    assert len(seen) == NUM_IMAGES
    # the last batch's images are read after earlier batches went through the extractor
    assert seen[-1] > built, "every image was read before any feature was extracted"

    extractor = keras.Model(core.inputs, core.get_layer(models.POOL).output)
    expected = []
    for view in range(views + 1):  # view-major: the images, then each augmented view
        for step, start in enumerate(range(0, NUM_IMAGES, BATCH)):
            batch = tf.constant(images[start:start + BATCH])
            if view:
                seed = tf.constant([config.seed, view * 100_000 + step], tf.int64)
                batch = augmenter.augment(batch, seed)
            expected.append(np.asarray(extractor(tf.cast(batch, tf.float32))))
    np.testing.assert_allclose(features, np.concatenate(expected), rtol=1e-6, atol=1e-6)
    assert labels.tolist() == [i % 3 for i in range(NUM_IMAGES)] * (views + 1)
