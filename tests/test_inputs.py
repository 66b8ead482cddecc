"""Input pipeline and augmentation: identity at inference, exact flips, seeded resumable streams."""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline.lib import inputs, preview
from tests.support.train_helpers import small_train, tiny_prepared_data


@pytest.fixture(scope="module")
def data_dir(iris_data):
    return iris_data


@pytest.fixture(scope="module")
def stream_dir(tmp_path_factory):
    """A prepared data set of generated images (24 train, 10 val), for the tests of how a
    split is streamed, cached and shuffled, which does not depend on what the images show.

    Each fresh pipeline reads the split's labels (twice) and decodes every image: over the
    iris set's 271 training images that took 0.7-1.5 s per pipeline, most of those tests.
    """
    return tiny_prepared_data(tmp_path_factory.mktemp("streams"), {"a": 16, "b": 12, "c": 12})


def _images(n: int = 3, h: int = 40, w: int = 52, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def test_augmentation_is_identity_at_inference():
    layer = inputs.RandomAugment(flip=True, rotation=1.0, shift=0.3, zoom=0.2, contrast=0.3, seed=1)
    x = _images()
    out = layer(x, training=False)
    assert out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), x.astype(np.float32))
    # and it really augments when training
    assert not np.allclose(layer(x, training=True).numpy(), x)


def test_all_amounts_zero_switches_augmentation_off():
    layer = inputs.RandomAugment(flip=False, rotation=0, shift=0, zoom=0, contrast=0)
    assert not layer.active
    x = _images()
    np.testing.assert_array_equal(layer(x, training=True).numpy(), x.astype(np.float32))


def test_flip_only_gives_exact_flips():
    layer = inputs.RandomAugment(flip=True, rotation=0, shift=0, zoom=0, contrast=0)
    x = _images(n=16)
    out = layer.augment(x, tf.constant([3, 4], tf.int64)).numpy()
    seen = set()
    for original, augmented in zip(x.astype(np.float32), out, strict=True):
        candidates = {
            "none": original, "h": original[:, ::-1], "v": original[::-1],
            "hv": original[::-1, ::-1],
        }
        match = [k for k, c in candidates.items() if np.allclose(c, augmented, atol=1e-3)]
        assert match, "a flip-only augmentation must be an exact flip of the input"
        seen.add(match[0])
    assert len(seen) >= 2  # random, not always the same flip


def test_augmentation_keeps_shape_range_and_is_seeded():
    layer = inputs.RandomAugment(seed=7)
    x = _images(n=4, h=33, w=47)
    a = layer.augment(x, tf.constant([1, 2], tf.int64)).numpy()
    b = layer.augment(x, tf.constant([1, 2], tf.int64)).numpy()
    c = layer.augment(x, tf.constant([1, 3], tf.int64)).numpy()
    assert a.shape == x.shape
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_each_image_is_augmented_by_its_own_seed_whatever_its_batch():
    """``augment_each`` (one graph for a batch) draws what ``augment`` draws for that image
    alone with its seed: cached features stay valid whichever batch an image came in."""
    layer = inputs.RandomAugment(seed=7)
    x = _images(n=5, h=33, w=47)
    seeds = np.array([[42, 11], [42, 12], [7, 11], [42, 11], [0, 99]], np.int64)
    batched = layer.augment_each(x, seeds).numpy()
    alone = [layer.augment(x[i:i + 1], tf.constant(seeds[i])).numpy()[0] for i in range(5)]
    np.testing.assert_array_equal(batched, np.stack(alone))
    np.testing.assert_array_equal(layer.augment_each(x[3:], seeds[3:]).numpy(), batched[3:])
    assert not np.allclose(batched[0], batched[1])


def test_augmenter_follows_config_and_serializes():
    config = small_train(augment_flip=False, augment_rotation=0.25, augment_shift=0.0,
                          augment_zoom=0.0, augment_contrast=0.0)
    layer = inputs.build_augmenter(config)
    assert (layer.flip, layer.rotation, layer.shift) == (False, 0.25, 0.0)
    clone = inputs.RandomAugment.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()


@pytest.mark.parametrize("kwargs", [{"rotation": -0.1}, {"zoom": 1.0}, {"contrast": 1.5}])
def test_augmenter_rejects_bad_amounts(kwargs):
    with pytest.raises(ValueError, match="must be"):
        inputs.RandomAugment(**kwargs)


def test_load_examples_decodes_and_resizes(data_dir):
    examples = list(inputs.load_examples(data_dir, "test", 48).as_numpy_iterator())
    labels = inputs.read_labels(data_dir, "test")
    assert len(examples) == len(labels) > 0
    image = examples[0][0]
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert [int(e[1]) for e in examples] == labels.tolist()
    assert image.std() > 5  # a real photo, not a blank


def test_missing_split_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no TFRecord shards"):
        inputs.load_examples(tmp_path, "train", 32)


def test_eval_dataset_is_unaugmented_and_ordered(stream_dir):
    data_dir = stream_dir
    config = small_train()
    first = [b[0].numpy() for b in inputs.make_eval_dataset(data_dir, "val", config)]
    second = [b[0].numpy() for b in inputs.make_eval_dataset(data_dir, "val", config)]
    plain = np.stack([e[0] for e in inputs.load_examples(data_dir, "val", 64).as_numpy_iterator()])
    np.testing.assert_array_equal(np.concatenate(first), plain)
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))


@pytest.mark.parametrize("seed", [0, 2**31 - 1, 7])
def test_the_train_stream_builds_under_any_global_seed(seed):
    """``--set seed=0`` sets TensorFlow's global seed to 0, where TF compares the per-epoch
    shuffle seed (a tensor inside flat_map) in Python; 2**31 - 1 is 0 to TF as well."""
    examples = tf.data.Dataset.from_tensor_slices((np.arange(10.0), np.arange(10)))
    config = small_train(batch_size=5, seed=seed)
    keras.utils.set_random_seed(seed)
    try:
        ds, steps = inputs.epoch_batches(examples, 10, config, first_epoch=0, last_epoch=2,
                                         augmenter=None)
        epochs = [b[0].numpy() for b in ds.take(2 * steps)]
        assert tf.compat.v1.random.get_seed(0)[0] == seed % (2**31 - 1)  # left as it was
    finally:
        tf.random.set_seed(None)
    assert sorted(np.concatenate(epochs[:steps]).tolist()) == list(range(10))
    assert not np.array_equal(np.concatenate(epochs[:steps]), np.concatenate(epochs[steps:]))


def test_train_stream_is_seeded_and_resumable(stream_dir):
    data_dir = stream_dir
    config = small_train(image_size=32, batch_size=8)  # 3 batches per epoch of 24 images
    augmenter = inputs.build_augmenter(config)
    steps = inputs.steps_for(len(inputs.read_labels(data_dir, "train")), config)

    def take(first_epoch: int, count: int) -> list[np.ndarray]:
        ds, _ = inputs.make_train_dataset(data_dir, config, first_epoch=first_epoch,
                                          last_epoch=first_epoch + 3, augmenter=augmenter)
        return [b[0].numpy() for b in ds.take(count)]

    full = take(0, 2 * steps)
    again = take(0, 2 * steps)
    resumed = take(1, steps)  # a run restarted at epoch 1 sees epoch 1's batches
    for a, b in zip(full, again, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(full[steps:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(full[0], full[steps])  # epochs differ (shuffle and augmentation)


def test_steps_per_epoch_from_config():
    assert inputs.steps_for(100, small_train(batch_size=32)) == 4
    assert inputs.steps_for(100, dataclasses.replace(small_train(), steps_per_epoch=10)) == 10
    with pytest.raises(ValueError, match="empty"):
        inputs.steps_for(0, small_train())


def test_augmentation_preview_png(data_dir, tmp_path):
    """A grid of captioned tiles: each row a training image, then its augmented versions."""
    config = small_train()
    path = preview.save_augmentation_preview(data_dir, config, tmp_path / "p.png",
                                            num_images=2, num_versions=3)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("*.tmp*"))
    sheet = np.asarray(Image.open(path).convert("RGB")).astype(int)
    tile, caption, gap = preview.PREVIEW_TILE, preview.PREVIEW_CAPTION, preview.PREVIEW_GAP
    assert sheet.shape == (2 * (tile + caption), 4 * (tile + gap) - gap, 3)
    first = next(iter(inputs.load_examples(data_dir, "train", config.image_size, cache=False)))
    original = Image.fromarray(np.clip(first[0].numpy(), 0, 255).astype(np.uint8))
    expected = np.asarray(original.resize((tile, tile), Image.Resampling.BILINEAR)).astype(int)
    np.testing.assert_array_equal(sheet[caption:caption + tile, :tile], expected)
    augmented = sheet[caption:caption + tile, tile + gap:2 * tile + gap]
    assert np.abs(augmented - expected).mean() > 10  # an augmented version, not the original
    assert sheet[:caption, :tile].min() < 128  # a caption was drawn in the band


def test_a_long_class_name_is_cut_to_its_tile_in_the_preview(tmp_path):
    """A user's class name wider than a tile ends in an ellipsis instead of running into the
    next tile's caption: the gap between the captions stays white."""
    name = "a-class-name-far-wider-than-one-preview-tile"
    data = tiny_prepared_data(tmp_path, {name: 6, "b": 6, "c": 6})
    path = preview.save_augmentation_preview(data, small_train(image_size=32), tmp_path / "p.png",
                                            num_images=6, num_versions=1)
    sheet = np.asarray(Image.open(path).convert("RGB"))
    tile, caption, gap = preview.PREVIEW_TILE, preview.PREVIEW_CAPTION, preview.PREVIEW_GAP
    bands = sheet.reshape(6, tile + caption, *sheet.shape[1:])[:, :caption]
    assert (bands[:, :, tile:tile + gap] == 255).all()
    assert (bands[:, :, :tile] < 128).any()  # the captions were drawn


def _graph(dataset: tf.data.Dataset) -> tf.compat.v1.GraphDef:
    return tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())


def _dataset_ops(dataset: tf.data.Dataset) -> list[str]:
    """Op type of every node in the dataset's graph, those inside its functions too."""
    graph = _graph(dataset)
    return [n.op for n in graph.node] + [n.op for f in graph.library.function for n in f.node_def]


def _shuffle_buffer_sizes(dataset: tf.data.Dataset) -> list[int]:
    """The constant buffer size of every shuffle inside the dataset's functions."""
    sizes = []
    for function in _graph(dataset).library.function:
        nodes = {n.name: n for n in function.node_def}
        for node in function.node_def:
            if node.op.startswith("ShuffleDataset"):
                const = nodes[node.input[1].split(":")[0]]
                sizes.append(int(tf.make_ndarray(const.attr["value"].tensor)))
    return sizes


def test_split_over_the_memory_budget_is_cached_in_a_file_not_in_memory(stream_dir, tmp_path):
    data_dir = stream_dir
    size = 32
    small = inputs.load_examples(data_dir, "val", size, cache_dir=tmp_path)
    over = inputs.load_examples(data_dir, "val", size, cache_dir=tmp_path,
                                memory_budget=5 * inputs.image_bytes(size))
    uncached = inputs.load_examples(data_dir, "val", size, memory_budget=1)
    assert "CacheDatasetV2" in _dataset_ops(small)
    assert not list(tmp_path.iterdir())  # in memory: no file
    assert "CacheDatasetV2" not in _dataset_ops(uncached)
    expected = list(small.as_numpy_iterator())
    for _ in range(2):  # the first pass writes the file cache, the second reads it
        got = list(over.as_numpy_iterator())
        assert len(got) == len(expected)
        for (a, la), (b, lb) in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
            assert la == lb
    assert any(p.name.startswith(f"val-{size}px") for p in tmp_path.iterdir())


def test_train_stream_over_the_memory_budget_shuffles_a_bounded_buffer(stream_dir, tmp_path):
    data_dir = stream_dir
    config = small_train(image_size=32, batch_size=16)
    budget = 20 * inputs.image_bytes(32)
    labels = inputs.read_labels(data_dir, "train")
    assert len(labels) > 20
    steps = inputs.steps_for(len(labels), config)

    def take(first_epoch: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
        ds, _ = inputs.make_train_dataset(data_dir, config, first_epoch=first_epoch,
                                          last_epoch=first_epoch + 3, augmenter=None,
                                          cache_dir=tmp_path, memory_budget=budget)
        assert _shuffle_buffer_sizes(ds) == [20]  # not the whole split
        return [(b[0].numpy(), b[1].numpy()) for b in ds.take(count)]

    full = take(0, 2 * steps)
    resumed = take(1, steps)
    for epoch in (full[:steps], full[steps:]):  # every example once per epoch
        epoch_labels = np.concatenate([b[1] for b in epoch])
        assert sorted(epoch_labels.tolist()) == sorted(labels.tolist())
    for (a, _), (b, _) in zip(full[steps:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
