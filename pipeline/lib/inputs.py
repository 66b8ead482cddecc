"""tf.data input pipeline and online augmentation (one fused, XLA-compiled affine warp per batch).

Why the augmentation is one custom Keras layer instead of a stack of ``RandomFlip``,
``RandomRotation``, ``RandomTranslation``, ``RandomZoom`` and ``RandomContrast``: each of those
resamples every pixel once, and on 2 CPU cores a naive tf.data + Keras-layers pipeline reaches
only about 3x the notebook's ``ImageDataGenerator``. Flips, rotation, zoom and shift are all
affine maps, so :class:`RandomAugment` composes them into a single 2x3 matrix per image and
resamples the whole batch once (bilinear, edge pixels repeated like the notebook's
``fill_mode='nearest'``), with the contrast change fused into the same XLA computation.
``bench/input_pipeline.py`` measures the result against the notebook's generator.

Where it runs: on a GPU the layer sits inside the training model (augmentation on the device,
inactive at inference); on CPU it is mapped over batches in tf.data so it overlaps with the
train step through ``prefetch``. Randomness is stateless and derived from (seed, epoch, batch)
in the tf.data path, so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.lib import records
from pipeline.lib.images import decode_image, make_resizer
from pipeline.lib.params import TrainParams

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE

#: Decoded images of one split kept in memory (the tf.data cache, the shuffle buffer) up to
#: this many bytes; a larger split is cached in a file under ``cache_dir`` (or decoded again on
#: every pass) and shuffled through a buffer of this size, so memory does not grow with the
#: data set. Small sets (the iris archive at 224 px) stay fully in memory and fully shuffled.
MEMORY_BUDGET_BYTES = 256 * 2**20


# ----------------------------------------------------------------------------------------
# augmentation
# ----------------------------------------------------------------------------------------
@tf.function(jit_compile=True, reduce_retracing=True)
def _warp_batch(images: tf.Tensor, matrices: tf.Tensor, contrast: tf.Tensor) -> tf.Tensor:
    """Resample each image of ``images`` through its own affine map, then scale its contrast.

    ``matrices`` is [N, 6]: source x = m0*x + m1*y + m2, source y = m3*x + m4*y + m5 for an
    output pixel (x, y). Coordinates outside the image are clamped (edge pixels repeat).
    Written as gathers plus elementwise math so XLA fuses it into one pass over the batch.
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    n, h, w = shape[0], shape[1], shape[2]
    hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
    ys, xs = tf.meshgrid(tf.range(hf), tf.range(wf), indexing="ij")
    m = [matrices[:, i][:, None, None] for i in range(6)]
    sx = tf.clip_by_value(m[0] * xs + m[1] * ys + m[2], 0.0, wf - 1.0)
    sy = tf.clip_by_value(m[3] * xs + m[4] * ys + m[5], 0.0, hf - 1.0)
    x0f, y0f = tf.floor(sx), tf.floor(sy)
    fx, fy = (sx - x0f)[..., None], (sy - y0f)[..., None]
    x0, y0 = tf.cast(x0f, tf.int32), tf.cast(y0f, tf.int32)
    x1, y1 = tf.minimum(x0 + 1, w - 1), tf.minimum(y0 + 1, h - 1)
    offset = tf.range(n)[:, None, None] * (h * w)
    flat = tf.reshape(images, [-1, 3])

    def pixels(yy: tf.Tensor, xx: tf.Tensor) -> tf.Tensor:
        return tf.cast(tf.gather(flat, offset + yy * w + xx), tf.float32)

    top = pixels(y0, x0) * (1.0 - fx) + pixels(y0, x1) * fx
    bottom = pixels(y1, x0) * (1.0 - fx) + pixels(y1, x1) * fx
    out = top * (1.0 - fy) + bottom * fy
    mean = tf.reduce_mean(out, axis=[1, 2], keepdims=True)
    factor = contrast[:, None, None, None]
    return tf.clip_by_value((out - mean) * factor + mean, 0.0, 255.0)


@keras.saving.register_keras_serializable(package="iris")
class RandomAugment(keras.layers.Layer):
    """Random flips, rotation, zoom, shift and contrast as one resampling; identity at inference.

    Takes images with values in [0, 255] (any numeric dtype) and returns float32 in [0, 255].
    Each transform is off when its amount is 0 (``flip`` False). ``rotation`` is a fraction of
    a full turn as in ``keras.layers.RandomRotation`` (1.0: any angle, the notebook's
    ``rotation_range=360``), ``shift`` a fraction of width/height, ``zoom`` the relative scale
    range, ``contrast`` the relative contrast range.
    """

    def __init__(
        self,
        flip: bool = True,
        rotation: float = 1.0,
        shift: float = 0.2,
        zoom: float = 0.1,
        contrast: float = 0.1,
        seed: int | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        for name, value in (("rotation", rotation), ("shift", shift), ("zoom", zoom),
                            ("contrast", contrast)):
            if value < 0:
                raise ValueError(f"augmentation amount {name} must be >= 0, got {value!r}")
        if zoom >= 1 or contrast >= 1:
            raise ValueError(
                f"zoom and contrast must be < 1, got zoom={zoom!r}, contrast={contrast!r}")
        self.flip = bool(flip)
        self.rotation = float(rotation)
        self.shift = float(shift)
        self.zoom = float(zoom)
        self.contrast = float(contrast)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def active(self) -> bool:
        """Whether any transform is switched on (an inactive layer is a pure cast)."""
        amounts = (self.rotation, self.shift, self.zoom, self.contrast)
        return self.flip or any(v > 0 for v in amounts)

    def call(self, images: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        images = tf.cast(images, tf.float32)
        if not training or not self.active:
            return images
        seed = self.seed_generator.next()
        return self.augment(images, tf.cast(seed, tf.int32))

    def augment(self, images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Augment a batch with an explicit stateless ``seed`` (shape [2]); tf.data uses this."""
        images = tf.convert_to_tensor(images)
        if not self.active:
            return tf.cast(images, tf.float32)
        shape = tf.shape(images)
        matrices, factors = self.sample(shape[0], shape[1], shape[2], seed)
        return _warp_batch(images, matrices, factors)

    def augment_each(self, images: tf.Tensor, seeds: np.ndarray) -> tf.Tensor:
        """Augment each image with its own stateless seed (``seeds`` [n, 2]), in one batch.

        An image's augmented view then depends on its seed only, not on which batch or
        position it came in, so its features can be cached and reused across runs and folds.
        The per-image draws run as one graph (``tf.map_fn``): the same numbers as drawing
        image by image, about 20x faster than eager ops per image.
        """
        images = tf.convert_to_tensor(images)
        if not self.active:
            return tf.cast(images, tf.float32)
        if self not in _AUGMENT_EACH:
            _AUGMENT_EACH[self] = tf.function(self._augment_each, reduce_retracing=True,
                                               autograph=False)
        return _AUGMENT_EACH[self](images, tf.constant(np.asarray(seeds), tf.int64))

    def _augment_each(self, images: tf.Tensor, seeds: tf.Tensor) -> tf.Tensor:
        shape = tf.shape(images)
        matrices, factors = tf.map_fn(
            lambda seed: self.sample(1, shape[1], shape[2], seed), seeds,
            fn_output_signature=(tf.TensorSpec([1, 6], tf.float32),
                                 tf.TensorSpec([1], tf.float32)))
        return _warp_batch(images, tf.reshape(matrices, [-1, 6]), tf.reshape(factors, [-1]))

    def sample(
        self, n: tf.Tensor, h: tf.Tensor, w: tf.Tensor, seed: tf.Tensor
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """Per-image inverse affine matrices [n, 6] and contrast factors [n] from ``seed``."""
        seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=6)

        def uniform(i: int, low: float, high: float) -> tf.Tensor:
            return tf.random.stateless_uniform([n], seeds[i], low, high)

        hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
        ones = tf.ones([n])
        if self.flip:
            flips = tf.where(tf.random.stateless_uniform([n, 2], seeds[0]) < 0.5, -1.0, 1.0)
            flip_x, flip_y = flips[:, 0], flips[:, 1]
        else:
            flip_x = flip_y = ones
        angle = uniform(1, -2 * math.pi * self.rotation, 2 * math.pi * self.rotation)
        scale = uniform(2, 1 - self.zoom, 1 + self.zoom)
        shift_x = uniform(3, -self.shift, self.shift) * wf
        shift_y = uniform(4, -self.shift, self.shift) * hf
        factors = uniform(5, 1 - self.contrast, 1 + self.contrast)
        cos, sin = tf.cos(angle) * scale, tf.sin(angle) * scale
        # source = R(angle) * scale * F * (out - centre) + centre - shift
        a00, a01 = cos * flip_x, -sin * flip_y
        a10, a11 = sin * flip_x, cos * flip_y
        cx, cy = (wf - 1) / 2, (hf - 1) / 2
        matrices = tf.stack(
            [a00, a01, cx - shift_x - a00 * cx - a01 * cy,
             a10, a11, cy - shift_y - a10 * cx - a11 * cy],
            axis=1,
        )
        return matrices, factors

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(flip=self.flip, rotation=self.rotation, shift=self.shift, zoom=self.zoom,
                      contrast=self.contrast, seed=self.seed)
        return config


#: :meth:`RandomAugment.augment_each`'s graph function per layer (kept off the layer, whose
#: attributes Keras tracks and saves).
_AUGMENT_EACH: weakref.WeakKeyDictionary[RandomAugment, Any] = weakref.WeakKeyDictionary()


def build_augmenter(config: TrainParams) -> RandomAugment:
    """The training-time augmentation the config asks for (``augment_*`` fields)."""
    return RandomAugment(
        flip=config.augment_flip,
        rotation=config.augment_rotation,
        shift=config.augment_shift,
        zoom=config.augment_zoom,
        contrast=config.augment_contrast,
        seed=config.seed,
        name="augment",
    )


# ----------------------------------------------------------------------------------------
# tf.data
# ----------------------------------------------------------------------------------------
def image_bytes(image_size: int) -> int:
    """Bytes of one decoded uint8 RGB image."""
    return image_size * image_size * 3


def buffer_examples(image_size: int, memory_budget: int = MEMORY_BUDGET_BYTES) -> int:
    """How many decoded images fit in ``memory_budget`` (at least one)."""
    return max(1, memory_budget // image_bytes(image_size))


def load_examples(data_dir: str | Path, split: str, image_size: int, *, cache: bool = True,
                  cache_dir: str | Path | None = None,
                  memory_budget: int = MEMORY_BUDGET_BYTES) -> tf.data.Dataset:
    """(uint8 image [S, S, 3], int32 label) of one split, decoded in parallel.

    ``cache``: decoded images are kept for later passes, in memory when the split fits in
    ``memory_budget``, else in a file under ``cache_dir`` (which the caller removes), else
    not at all (decoded again on each pass), so memory stays bounded for any split size.
    """
    files = records.checked_split_files(data_dir, split)
    resizer = make_resizer(image_size)

    def parse(serialized: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        features = records.parse(serialized)
        return decode_image(features["image"], resizer), tf.cast(features["label"], tf.int32)

    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=min(len(files), 4)).map(
        parse, num_parallel_calls=AUTOTUNE, deterministic=True)
    if not cache:
        return dataset
    if len(read_labels(data_dir, split)) <= buffer_examples(image_size, memory_budget):
        return dataset.cache()
    if cache_dir is None:
        logger.info("split %r is over the %d-byte memory budget and no cache folder was "
                    "given: decoding it on every pass", split, memory_budget)
        return dataset
    path = Path(cache_dir) / f"{split}-{image_size}px"
    logger.info("split %r is over the %d-byte memory budget: caching it in %s", split,
                memory_budget, path)
    return dataset.cache(str(path))


def read_labels(data_dir: str | Path, split: str) -> np.ndarray:
    """Label of every record in a split (no image decoding): class weights, baselines."""
    return read_index(data_dir, split)[1]


def read_index(data_dir: str | Path, split: str) -> tuple[list[str], np.ndarray]:
    """(content sha256, label) of every record in a split, in :func:`load_examples`' order.

    The sha256 is a stable image id across runs and models (evaluation's per-image
    predictions are keyed by it); no image is decoded.
    """
    files = records.checked_split_files(data_dir, split)
    spec = records.feature_spec()
    # same reader settings as load_examples, so records come in the same order
    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=min(len(files), 4)).map(
        lambda s: tf.io.parse_single_example(s, {k: spec[k] for k in ("sha256", "label")})
    )
    ids, labels = [], []
    for row in dataset.as_numpy_iterator():
        ids.append(row["sha256"].decode())
        labels.append(int(row["label"]))
    return ids, np.array(labels, dtype=np.int64)


def steps_for(num_examples: int, config: TrainParams) -> int:
    """Batches per epoch: config.steps_per_epoch, or one pass over the split when it is 0."""
    if num_examples <= 0:
        raise ValueError("the training split is empty")
    return config.steps_per_epoch or math.ceil(num_examples / config.batch_size)


def epoch_seed(seed: int, epoch: int | tf.Tensor) -> tf.Tensor:
    """A distinct, reproducible int64 seed for one epoch's shuffle."""
    return tf.cast(seed, tf.int64) * 1_000_003 + tf.cast(epoch, tf.int64)


def make_train_dataset(
    data_dir: str | Path,
    config: TrainParams,
    *,
    first_epoch: int,
    last_epoch: int,
    augmenter: RandomAugment | None,
    cache_dir: str | Path | None = None,
    memory_budget: int = MEMORY_BUDGET_BYTES,
) -> tuple[tf.data.Dataset, int]:
    """Image batches of the training split for epochs ``first_epoch`` .. ``last_epoch - 1``.

    See :func:`epoch_batches`; ``augmenter`` None leaves augmentation to the model (GPU
    path); images are float32 in [0, 255] either way. A split over ``memory_budget`` is
    shuffled through a buffer of that size (the shards are already in a seeded random order)
    and cached as :func:`load_examples` says. Returns the batches and steps per epoch.
    """
    examples = load_examples(data_dir, "train", config.image_size, cache_dir=cache_dir,
                             memory_budget=memory_budget)
    num_examples = len(read_labels(data_dir, "train"))
    return epoch_batches(examples, num_examples, config, first_epoch=first_epoch,
                         last_epoch=last_epoch, augmenter=augmenter,
                         buffer=buffer_examples(config.image_size, memory_budget))


def epoch_batches(
    examples: tf.data.Dataset,
    num_examples: int,
    config: TrainParams,
    *,
    first_epoch: int,
    last_epoch: int,
    augmenter: RandomAugment | None,
    buffer: int | None = None,
) -> tuple[tf.data.Dataset, int]:
    """Batches of ``examples`` (input, label) for epochs ``first_epoch`` .. ``last_epoch - 1``.

    Each epoch is shuffled with a seed derived from (config.seed, epoch) and augmented with
    stateless seeds derived from (config.seed, epoch, batch), so the stream of batches does
    not depend on whether training was interrupted and resumed. Inputs are cast to float32.
    Used for images and for cached backbone features alike. ``buffer`` caps the shuffle
    buffer (default: all examples, a full shuffle).
    """
    buffer = min(num_examples, buffer or num_examples)
    steps = steps_for(num_examples, config)
    seed = config.seed

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        shuffled = examples.shuffle(buffer, seed=epoch_seed(seed, epoch),
                                    reshuffle_each_iteration=True)
        if config.steps_per_epoch:
            shuffled = shuffled.repeat()
        batches = shuffled.batch(config.batch_size).take(steps).enumerate()

        def finish(step: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]) -> tuple:
            images, labels = batch
            if augmenter is None:
                return tf.cast(images, tf.float32), labels
            stateless = tf.stack([tf.cast(seed, tf.int64),
                                  tf.cast(epoch, tf.int64) * 100_000 + step])
            return augmenter.augment(images, stateless), labels

        return batches.map(finish, num_parallel_calls=AUTOTUNE, deterministic=True)

    # .repeat(): Keras may look one batch past the last epoch; never consumed otherwise
    with _global_seed_off_zero():  # one_epoch is traced here
        dataset = (
            tf.data.Dataset.range(first_epoch, last_epoch)
            .flat_map(one_epoch)
            .repeat()
            .prefetch(AUTOTUNE)
        )
    return dataset, steps


@contextlib.contextmanager
def _global_seed_off_zero() -> Iterator[None]:
    """TensorFlow's global seed moved off 0 (modulo 2**31 - 1) while the block runs.

    With a global seed of 0 (``keras.utils.set_random_seed(0)``, i.e. ``--set seed=0``),
    ``tf.compat.v1.random.get_seed`` compares the per-epoch shuffle seed, a tensor inside
    ``flat_map``, with 0 in Python and raises ``OperatorNotAllowedInGraphError``. Any other
    global seed leaves the block untouched; with this one, the shuffle is seeded from
    (1, epoch seed).
    """
    # an explicit op seed: asking moves no op-seed counter
    if tf.compat.v1.random.get_seed(0)[0] != 0:
        yield
        return
    tf.random.set_seed(1)
    try:
        yield
    finally:
        tf.random.set_seed(0)


def make_eval_dataset(data_dir: str | Path, split: str, config: TrainParams, *,
                      cache_dir: str | Path | None = None,
                      memory_budget: int = MEMORY_BUDGET_BYTES) -> tf.data.Dataset:
    """(uint8 image batch, label batch) of a split in file order, no augmentation.

    Cached for repeated passes (validation every epoch) as :func:`load_examples` says.
    """
    # a known length lets Keras end validation cleanly (no "ran out of data" warning)
    size = len(read_labels(data_dir, split))
    examples = load_examples(data_dir, split, config.image_size, cache_dir=cache_dir,
                             memory_budget=memory_budget).apply(
        tf.data.experimental.assert_cardinality(size))
    return examples.batch(config.batch_size).prefetch(AUTOTUNE)


__all__ = [
    "RandomAugment",
    "buffer_examples",
    "build_augmenter",
    "decode_image",
    "epoch_batches",
    "load_examples",
    "make_eval_dataset",
    "make_resizer",
    "make_train_dataset",
    "read_index",
    "read_labels",
    "steps_for",
]
