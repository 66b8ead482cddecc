"""The frozen-backbone head trained on pooled backbone features instead of images.

With a frozen backbone every head epoch would recompute the same backbone forward passes:
features are computed once (:func:`extract_features`) and the head trains on them
(:class:`FeatureHead`), then is folded back into the full model for export.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from pipeline.lib import inputs, models
from pipeline.lib.backbones import TRANSFER
from pipeline.lib.params import TrainParams
from pipeline.lib.progress import report_progress
from pipeline.lib.training import Phase

logger = logging.getLogger(__name__)


def uses_feature_head(config: TrainParams, phase: Phase | None = None) -> bool:
    """Whether the frozen-backbone head phase trains on cached features (transfer only)."""
    on = config.model == TRANSFER and config.head_feature_views > 0
    return on and (phase is None or phase.name == "head")


def extract_features(
    core: keras.Model, data_dir: Path, split: str, config: TrainParams, *,
    augmenter: inputs.RandomAugment | None = None, views: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features of a split: the images, then ``views`` augmented copies of them.

    Augmentation uses stateless seeds from (config.seed, view, batch), so features (and the
    head trained on them) are reproducible, also after a restart. The split is decoded once
    and streamed batch by batch, every view of a batch extracted at once: only features are
    kept, so memory does not grow with the number of images times their decoded size.
    """
    if views and augmenter is None:
        raise ValueError(f"{views} augmented views of split {split!r} need an augmenter")
    extractor = keras.Model(core.inputs, core.get_layer(models.POOL).output)
    examples = inputs.load_examples(data_dir, split, config.image_size, cache=False)
    features: list[list[np.ndarray]] = [[] for _ in range(views + 1)]
    labels = []
    # prefetch: the next batch is decoded while this one goes through the backbone
    for step, (batch, label) in enumerate(examples.batch(config.batch_size).prefetch(1)):
        labels.append(label.numpy())
        for view in range(views + 1):
            images = batch
            if view:
                seed = tf.constant([config.seed, view * 100_000 + step], tf.int64)
                images = augmenter.augment(batch, seed)
            features[view].append(
                np.asarray(extractor(tf.cast(images, tf.float32), training=False)))
        report_progress(f"{split} feature batches", step + 1)
    return (np.concatenate([row for view in features for row in view]),
            np.concatenate(labels * (views + 1)))


@dataclasses.dataclass(frozen=True)
class FeatureHead:
    """The softmax head as its own small model on standardized cached features.

    Why: with a frozen backbone every head epoch would recompute the same backbone forward
    passes; features of the training images and ``head_feature_views`` augmented views of
    each are computed once, then the head trains for real epochs (Adam, early stopping on
    val_loss) in a fraction of a second each. The L2 penalty on the kernel is the one of
    logistic regression with inverse strength ``head_c`` (sum of losses + |W|^2 / (2 C)),
    written per example as Keras averages the loss; the logged loss and val_loss include it.
    No dropout: the penalty regularizes, and a resumed run repeats the uninterrupted one
    exactly. :meth:`fold_into` writes the standardization into the full model's Dense layer,
    so the export is the plain model.
    """

    model: keras.Model
    train: tf.data.Dataset
    steps: int
    val: tuple[np.ndarray, np.ndarray]
    mean: np.ndarray
    std: np.ndarray
    rows: int

    @classmethod
    def build(cls, core: keras.Model, data_dir: Path, config: TrainParams,
              augmenter: inputs.RandomAugment, first_epoch: int, last_epoch: int) -> FeatureHead:
        x_train, y_train = extract_features(core, data_dir, "train", config, augmenter=augmenter,
                                            views=config.head_feature_views)
        num_classes = int(core.get_layer(models.HEAD).units)
        missing = sorted(set(range(num_classes)) - set(y_train.tolist()))
        if missing:
            raise ValueError(f"every class needs training images; classes {missing} have none")
        x_val, y_val = extract_features(core, data_dir, "val", config)
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0) + 1e-6
        rows = len(y_train)
        features = keras.Input(shape=(x_train.shape[1],), name="features")
        dense = keras.layers.Dense(
            num_classes, activation="softmax", dtype="float32", name=models.HEAD,
            kernel_regularizer=keras.regularizers.L2(1.0 / (2.0 * config.head_c * rows)))
        model = keras.Model(features, dense(features), name="feature_head")
        examples = tf.data.Dataset.from_tensor_slices(((x_train - mean) / std, y_train))
        train, steps = inputs.epoch_batches(examples, rows, config, first_epoch=first_epoch,
                                            last_epoch=last_epoch, augmenter=None)
        logger.info("head trains on %d cached feature rows (%d augmented views per image)",
                    rows, config.head_feature_views)
        return cls(model, train, steps, ((x_val - mean) / std, y_val), mean, std, rows)

    def fold_into(self, core: keras.Model) -> None:
        """Set ``core``'s Dense head to this head composed with the standardization."""
        kernel, bias = (np.asarray(w, np.float64) for w in self.model.get_weights())
        kernel = kernel / self.std[:, None]
        bias = bias - self.mean @ kernel
        core.get_layer(models.HEAD).set_weights([kernel.astype(np.float32),
                                                 bias.astype(np.float32)])
