"""Grad-CAM heat maps: the chosen class's channels, weighted by their gradient, on the
backbone's feature grid; through an exported model's test-time views wrapper too."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.lib import models, saliency
from tests.support.train_helpers import small_train

SIZE = 64
IMAGES = 6  # more than one chunk


def _images(count: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (count, SIZE, SIZE, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def classifier():
    """A classifier whose class 0 reads only the average of one backbone channel (one that
    responds somewhere in every test image) and whose other classes read nothing: class 0's
    map is that channel, class 1's is empty. Returns the model and the channel."""
    import keras

    keras.utils.set_random_seed(0)  # random backbone weights, the same in any test order
    config = small_train(weights="none", image_size=SIZE, pooling="avg_max", tta_views=0)
    model = models.build_model(config, 3)
    to_features, _ = models.split_at_backbone(model)
    features = np.asarray(to_features(_images(IMAGES).astype(np.float32)))
    channel = int(np.argmax(features.max(axis=(1, 2)).min(axis=0)))
    assert features[..., channel].max(axis=(1, 2)).min() > 0
    head = model.get_layer(models.HEAD)
    kernel, bias = (np.zeros_like(w) for w in head.get_weights())
    kernel[channel, 0] = 3.0  # the average-pooled half of the avg_max features
    head.set_weights([kernel, bias])
    return model, channel


def test_the_map_is_the_chosen_classes_channels_weighted_by_their_gradient(classifier) -> None:
    model, channel = classifier
    images = _images(IMAGES)
    to_features, _ = models.split_at_backbone(model)
    feature = np.asarray(to_features(images.astype(np.float32)))[..., channel]
    expected = feature / feature.max(axis=(1, 2), keepdims=True)
    maps = saliency.grad_cam(model, images, [0] * len(images))
    assert maps.shape == feature.shape and maps.shape[1] < SIZE  # the feature grid
    np.testing.assert_allclose(maps, expected, atol=1e-4)
    # class 1's gradient only lowers class 0's channel: nothing pushed towards it
    assert not saliency.grad_cam(model, images[:2], [1, 1]).any()


@pytest.mark.parametrize("pooling", ["avg", "avg_max"])
def test_the_split_classifier_is_the_classifier(pooling: str) -> None:
    """The two halves Grad-CAM differentiates between compose to the model's own output
    (ImageNet weights: a random backbone's features can be all zero, where any pooling fits)."""
    model = models.build_model(small_train(image_size=SIZE, pooling=pooling, tta_views=0), 3)
    to_features, to_probabilities = models.split_at_backbone(model)
    images = _images(3).astype(np.float32)
    np.testing.assert_allclose(np.asarray(to_probabilities(to_features(images))),
                               np.asarray(model(images, training=False)), atol=1e-6)


def test_an_exported_models_map_comes_from_its_classifier(classifier) -> None:
    model, _ = classifier
    exported = models.with_test_time_views(model, 8, SIZE)
    images = _images(2)
    np.testing.assert_allclose(saliency.grad_cam(exported, images, [0, 0]),
                               saliency.grad_cam(model, images, [0, 0]), atol=1e-5)


def test_evaluate_maps_each_mistake_for_the_class_it_was_called(classifier) -> None:
    """The class the model called, not the true one: here called 0 (its channel) and 1
    (nothing pushed towards it), while both images are truly class 2."""
    from pipeline.lib import stats
    from pipeline.steps import evaluate

    model, _ = classifier
    images = _images(2)
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    predictions = stats.Predictions(("a", "b"), np.array([2, 2]), np.array([0, 1]),
                                    probabilities, ("x", "y", "z"))
    scores = evaluate._TestScores(predictions, list(images), ["", ""], [0, 1])
    maps = evaluate._mistake_heatmaps(model, scores)
    assert maps[0].max() == pytest.approx(1.0) and not maps[1].any()
    assert evaluate._mistake_heatmaps(model, dataclasses.replace(
        scores, wrong_images=[], wrong_titles=[], wrong_predicted=[])) is None


def test_the_grid_lays_each_map_over_its_image(tmp_path) -> None:
    from PIL import Image

    from pipeline.lib import report

    gray = [np.full((SIZE, SIZE, 3), 128, np.uint8)]
    plain = report.plot_image_grid(gray, ["t"], tmp_path / "plain.png")
    heat = np.zeros((4, 4))
    heat[0, 0] = 1.0
    mapped = report.plot_image_grid(gray, ["t"], tmp_path / "mapped.png", heatmaps=[heat])
    with Image.open(plain) as a, Image.open(mapped) as b:
        assert a.size == b.size and np.abs(np.asarray(a, float) - np.asarray(b, float)).max() > 50


def test_the_notebooks_cnn_has_no_map() -> None:
    model = models.build_model(small_train(model="seed_cnn", image_size=96), 3)
    assert saliency.grad_cam(model, _images(2), [0, 0]) is None
