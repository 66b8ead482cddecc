"""The frozen-backbone head trained on pooled backbone features instead of images.

With a frozen backbone every head epoch would recompute the same backbone forward passes:
features are computed once (:func:`extract_features`) and the head trains on them
(:class:`FeatureHead`), then is folded back into the full model for export.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.lib import inputs, models, stats
from pipeline.lib.backbones import BACKBONES, TRANSFER
from pipeline.lib.feature_cache import FeatureCache, feature_key
from pipeline.lib.files import file_sha256
from pipeline.lib.params import TrainParams
from pipeline.lib.progress import report_progress
from pipeline.lib.training import Phase
from pipeline.lib.views import DihedralView

logger = logging.getLogger(__name__)


def uses_feature_head(config: TrainParams, phase: Phase | None = None) -> bool:
    """Whether the frozen-backbone head phase trains on cached features (transfer only)."""
    on = config.model == TRANSFER and config.head_feature_views > 0
    return on and (phase is None or phase.name == "head")


@dataclasses.dataclass(frozen=True)
class View:
    """One view of an image whose features are extracted: plain, augmented or flipped/turned.

    ``augment`` views draw their transform from a seed of (config.seed, view index, image
    content), so features are reproducible (also after a restart) and cacheable whatever
    batch an image comes in; ``dihedral`` views are the exported model's test-time views.
    """

    kind: str  # "plain", "augment" or "dihedral"
    index: int = 0

    def key(self, config: TrainParams) -> dict[str, Any]:
        """Everything about this view that its features depend on (for the cache key)."""
        if self.kind == "augment":
            return {"kind": "augment", "index": self.index, "seed": config.seed,
                    "augment": {name: getattr(config, f"augment_{name}")
                                for name in ("flip", "rotation", "shift", "zoom", "contrast")}}
        if self.kind == "dihedral" and self.index:
            return {"kind": "dihedral", "index": self.index}
        return {"kind": "plain"}

    def apply(self, images: tf.Tensor, shas: Sequence[str], config: TrainParams,
              augmenter: inputs.RandomAugment | None) -> tf.Tensor:
        if self.kind == "augment":
            if augmenter is None:
                raise ValueError("augmented views need an augmenter")
            seeds = [[config.seed, self.index * 2**28 + int(sha[:7], 16)] for sha in shas]
            return augmenter.augment_each(images, np.asarray(seeds, np.int64))
        if self.kind == "dihedral" and self.index:
            return DihedralView(self.index)(tf.cast(images, tf.float32))
        return tf.cast(images, tf.float32)


def plain_and_augmented(count: int) -> list[View]:
    """The image itself, then ``count`` augmented views of it."""
    return [View("plain"), *(View("augment", i) for i in range(1, count + 1))]


def test_time_views(config: TrainParams) -> list[View]:
    """The views the exported model averages over (only the image itself without them)."""
    return [View("dihedral", i) for i in range(max(1, config.tta_views))]


def backbone_key(config: TrainParams) -> dict[str, Any] | None:
    """What determines the backbone's features besides the view and image; None: not cached.

    Random weights (``weights=none``) are not cached: they are the experiment, not a fixture.
    """
    weights = models.resolve_weights(config.weights, config.weights_sha256)
    if weights is None:
        return None
    spec = BACKBONES[config.backbone]
    return {"weights": weights if weights == "imagenet" else file_sha256(weights),
            "backbone": config.backbone, "alpha": config.alpha if spec.takes_alpha else None,
            "image_size": config.image_size, "pooling": config.pooling}


#: :func:`pooled_forward`'s traced functions by model, then image size.
_FORWARDS: weakref.WeakKeyDictionary[keras.Model, dict[int, Any]] = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Features:
    """Features of a split, view-major (all images in view 0, then view 1...), and labels."""

    x: np.ndarray
    y: np.ndarray
    computed: int  # images that went through the backbone (the rest came from the cache)


def pooled_forward(core: keras.Model, image_size: int) -> Any:
    """The backbone up to its pooled features as one graph function of a float image batch.

    A graph, not Keras' eager call: eagerly, a functional model keeps every layer's output
    of the batch alive until the call returns (gigabytes for MobileNetV2 at 320 px and batch
    32), and runs op by op; the graph frees each activation after its last use.
    One function per model and size, kept while the model lives: each split and each call
    reuses its graph instead of tracing the backbone again (seconds per trace).
    """
    traced = _FORWARDS.setdefault(core, {})
    if image_size not in traced:
        extractor = keras.Model(core.inputs, core.get_layer(models.POOL).output)
        spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)
        traced[image_size] = tf.function(lambda images: extractor(images, training=False),
                                         input_signature=[spec], autograph=False)
    return traced[image_size]


def extract_features(core: keras.Model, data_dir: Path | None, split: str,
                     config: TrainParams, views: Sequence[View], *,
                     augmenter: inputs.RandomAugment | None = None,
                     cache: FeatureCache | None = None) -> Features:
    """Pooled backbone features of every image of a split in each of ``views``.

    Entries of ``cache`` are read first; the rest is computed with the split streamed batch
    by batch (decoded once, only features kept, so memory does not grow with the images'
    decoded size), the missing views of consecutive images pooled into full batches of
    ``config.batch_size`` for the backbone, and stored.
    """
    shas, labels = inputs.read_index(data_dir, split)
    key = backbone_key(config) if cache is not None else None
    keys = ([[feature_key(key, view.key(config), sha) for sha in shas] for view in views]
            if key is not None else None)
    found: dict[tuple[int, int], np.ndarray] = {}
    if keys is not None:
        for v, row in enumerate(keys):
            for i, k in enumerate(row):
                if (hit := cache.get(k)) is not None:
                    found[v, i] = hit
    computed = _compute_missing(core, data_dir, split, config, views, shas, found, augmenter)
    if keys is not None and computed:
        for v, i in computed:
            cache.put(keys[v][i], found[v, i])
        cache.evict()
    x = np.stack([found[v, i] for v in range(len(views)) for i in range(len(shas))])
    return Features(x, np.tile(np.asarray(labels), len(views)), len(computed))


def _compute_missing(core: keras.Model, data_dir: Path | None, split: str, config: TrainParams,
                     views: Sequence[View], shas: Sequence[str],
                     found: dict[tuple[int, int], np.ndarray],
                     augmenter: inputs.RandomAugment | None) -> list[tuple[int, int]]:
    """Fill ``found`` with the (view, image) features it lacks; returns those computed."""
    missing = [(v, i) for v in range(len(views)) for i in range(len(shas)) if (v, i) not in found]
    if not missing:
        return []
    wanted = set(missing)
    forward = pooled_forward(core, config.image_size)
    examples = inputs.load_examples(data_dir, split, config.image_size, cache=False)
    pending: list[tf.Tensor] = []
    slots: list[tuple[int, int]] = []

    def flush(count: int) -> None:
        images = tf.concat(pending, 0)
        rows = np.asarray(forward(images[:count]))
        for slot, row in zip(slots[:count], rows, strict=True):
            found[slot] = row
        del slots[:count]
        pending[:] = [images[count:]] if count < len(images) else []

    position = 0
    # prefetch: the next batch is decoded while this one goes through the backbone
    for step, (batch, _) in enumerate(examples.batch(config.batch_size).prefetch(1)):
        indices = range(position, position + len(batch))
        position += len(batch)
        for v, view in enumerate(views):
            need = [j for j, i in enumerate(indices) if (v, i) in wanted]
            if need:
                pending.append(view.apply(tf.gather(batch, need), [shas[indices[j]] for j in need],
                                          config, augmenter))
                slots.extend((v, indices[j]) for j in need)
            while len(slots) >= config.batch_size:
                flush(config.batch_size)
        report_progress(f"{split} feature batches", step + 1)
    if slots:
        flush(len(slots))
    return missing


def l2_strength(config: TrainParams, rows: int) -> float:
    """The kernel's L2 factor for ``rows`` training rows: |W|^2 / (2 C) spread over the rows,
    since Keras averages the loss per row (see :class:`FeatureHead`)."""
    return 1.0 / (2.0 * config.head_c * rows)


def head_model(width: int, num_classes: int, penalty: keras.regularizers.Regularizer, *,
               kernel_initializer: str = "glorot_uniform") -> keras.Model:
    """The softmax head on ``width`` standardized features; ``penalty`` on its kernel (the
    L2 of :class:`FeatureHead`, ``keras.regularizers.L2(l2_strength(config, rows))``)."""
    features = keras.Input(shape=(width,), name="features")
    dense = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name=models.HEAD,
        kernel_initializer=kernel_initializer, kernel_regularizer=penalty)
    return keras.Model(features, dense(features), name="feature_head")


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
    computed: int  # images that went through the backbone (the rest came from the cache)

    @classmethod
    def build(cls, core: keras.Model, data_dir: Path, config: TrainParams,
              augmenter: inputs.RandomAugment, first_epoch: int, last_epoch: int,
              cache: FeatureCache | None) -> FeatureHead:
        train = extract_features(core, data_dir, "train", config,
                                 plain_and_augmented(config.head_feature_views),
                                 augmenter=augmenter, cache=cache)
        x_train, y_train = train.x, train.y
        num_classes = int(core.get_layer(models.HEAD).units)
        missing = sorted(set(range(num_classes)) - set(y_train.tolist()))
        if missing:
            raise ValueError(f"every class needs training images; classes {missing} have none")
        val = extract_features(core, data_dir, "val", config, [View("plain")], cache=cache)
        x_val, y_val = val.x, val.y
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0) + 1e-6
        rows = len(y_train)
        model = head_model(x_train.shape[1], num_classes,
                           keras.regularizers.L2(l2_strength(config, rows)))
        examples = tf.data.Dataset.from_tensor_slices(((x_train - mean) / std, y_train))
        batches, steps = inputs.epoch_batches(examples, rows, config, first_epoch=first_epoch,
                                            last_epoch=last_epoch, augmenter=None)
        logger.info("head trains on %d cached feature rows (%d augmented views per image)",
                    rows, config.head_feature_views)
        return cls(model, batches, steps, ((x_val - mean) / std, y_val), mean, std, rows,
                   train.computed + val.computed)

    def linear(self) -> LinearHead:
        """This head composed with the standardization: logits of raw backbone features."""
        kernel, bias = (np.asarray(w, np.float64) for w in self.model.get_weights())
        kernel = kernel / self.std[:, None]
        return LinearHead(kernel, bias - self.mean @ kernel)

    def fold_into(self, core: keras.Model) -> None:
        """Set ``core``'s Dense head to this head composed with the standardization."""
        self.linear().fold_into(core)


@dataclasses.dataclass(frozen=True)
class LinearHead:
    """A softmax head as the exported model holds it: logits = features @ kernel + bias, on
    raw (unstandardized) backbone features.

    Why: heads of one width and class count are then plain arrays; the mean of k such heads
    is one head of the same shape whose logits are the mean of theirs (a logit-averaged
    ensemble), so an ensemble of fold heads exports, serves and explains as one Dense layer.
    """

    kernel: np.ndarray  # [width, classes]
    bias: np.ndarray  # [classes]

    @classmethod
    def mean(cls, heads: Sequence[LinearHead]) -> LinearHead:
        """The head whose logits are the average of ``heads``' logits."""
        return cls(np.mean([h.kernel for h in heads], axis=0),
                   np.mean([h.bias for h in heads], axis=0))

    def view_probabilities(self, scoring: np.ndarray) -> np.ndarray:
        """What the exported model returns from test-time view features ([views, images,
        width]): the softmax of each view's logits, averaged over the views."""
        logits = scoring @ self.kernel + self.bias
        logits -= logits.max(axis=-1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=-1, keepdims=True)
        return probabilities.mean(axis=0)

    def fold_into(self, core: keras.Model) -> None:
        """Set ``core``'s Dense head to this head."""
        core.get_layer(models.HEAD).set_weights([self.kernel.astype(np.float32),
                                                 self.bias.astype(np.float32)])


def probabilities_from_features(core: keras.Model, data_dir: Path, split: str,
                                config: TrainParams, cache: FeatureCache | None
                                ) -> tuple[np.ndarray, np.ndarray, int]:
    """What the exported model returns for a split's images, computed from backbone features.

    With a frozen backbone, the exported model's output for an image is the mean over its
    test-time views of the softmax head on that view's pooled features: the same numbers
    from the features the head already has (cached) and those of the flipped views, without
    a second pass of the images through a second model. Returns the probabilities, the
    labels and the images computed.
    """
    views = test_time_views(config)
    features = extract_features(core, data_dir, split, config, views, cache=cache)
    kernel, bias = (np.asarray(w, np.float32) for w in core.get_layer(models.HEAD).get_weights())
    head = LinearHead(kernel, bias)
    count = len(features.y) // len(views)
    averaged = head.view_probabilities(features.x.reshape(len(views), count, -1))
    return averaged, features.y[:count], features.computed


def scores_from_features(core: keras.Model, data_dir: Path, config: TrainParams,
                         cache: FeatureCache | None) -> tuple[dict[str, float], int]:
    """The exported model's validation scores (see :func:`probabilities_from_features`)."""
    probabilities, labels, computed = probabilities_from_features(core, data_dir, "val", config,
                                                                  cache)
    return stats.score(labels, probabilities.argmax(axis=1), probabilities.shape[1]), computed
