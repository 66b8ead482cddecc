"""Cross-validated scoring of the frozen-backbone head, inside the train step (``cv_folds``).

Why: one ~60-image validation split swings by about 0.1 between seeds, too little evidence
to choose a sweep's trial on. With ``cv_folds=k`` every train + validation image is scored
by a head that never saw it: the images are dealt into k folds (:mod:`pipeline.lib.folds`:
stratified, grouped by content, seeded by the content alone, so every trial of a sweep gets
the same folds and their out-of-fold predictions pair image by image); head k is fitted on
the other folds' rows and scores its fold the way the exported model would (softmax of each
test-time view's features, averaged). The test split takes no part.

Why here and not one KFP task per fold: the backbone is frozen, so its features of every
image and view are computed once (and cached, :mod:`pipeline.lib.feature_cache`); a fold is
then a head fit of a few seconds on those shared features (bench/fold_ensemble.py), and a
pod per fold would add its start-up to each fit and re-read the features. Trials stay
parallel KFP tasks. End-to-end training (fine-tuning, the seed CNN) would mean k full
trainings: the config refuses ``cv_folds`` there (:func:`pipeline.config.validate`).

The exported model is then the k fold heads averaged: a softmax head is linear up to its
softmax, so the mean of their kernels and biases is one Dense head whose logits are the mean
of theirs (:class:`~pipeline.lib.feature_head.LinearHead`), exported, served and explained
like any other. Over 5 seeds (bench/fold_ensemble.py) it scored higher on test than a head
refitted on all train + validation rows (+0.026 balanced accuracy for 5 folds, never shown
worse), as high as averaging the heads' probabilities would, and saves that refit.
Each fold's best epoch is picked on its held-out fold's loss (as the single-split run picks
it on the validation split), a small optimism of the out-of-fold score that every trial
shares.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from pipeline.lib import inputs, stats
from pipeline.lib.feature_cache import FeatureCache
from pipeline.lib.feature_head import (
    FeatureHead,
    LinearHead,
    extract_features,
    head_model,
    l2_strength,
    plain_and_augmented,
    test_time_views,
)
from pipeline.lib.folds import assign_folds, check_fold_count
from pipeline.lib.params import TrainParams
from pipeline.lib.training import class_weights_for, compile_model

logger = logging.getLogger(__name__)

#: Folds depend on the images' contents alone (not on the trial's seed), so every trial of a
#: sweep holds out the same images; the train/val split's own seed already varies them.
FOLD_SEED = 0
#: The splits cross-validation folds over (never the test split).
SPLITS = ("train", "val")
#: Serving cost: images per timed batch and timed repeats (the minimum is kept).
COST_BATCH = 16
COST_REPEATS = 3


@dataclasses.dataclass(frozen=True)
class PooledFeatures:
    """Backbone features of every train + validation image, per view ([views, images, width])."""

    image_ids: tuple[str, ...]
    labels: np.ndarray
    training: np.ndarray  # the image itself, then its augmented views (what heads train on)
    scoring: np.ndarray  # the exported model's test-time views (what it scores with)
    computed: int  # images that went through the backbone (the rest came from the cache)


@dataclasses.dataclass(frozen=True)
class CrossValidation:
    """The out-of-fold predictions, each fold's score and best epoch, and the fold heads."""

    predictions: stats.Predictions
    folds: np.ndarray  # each image's fold (predictions' order)
    fold_scores: tuple[dict[str, float], ...]
    best_epochs: tuple[int, ...]
    fold_heads: tuple[LinearHead, ...]  # in fold order
    computed: int
    # each fold head's probabilities on the caller's other images ([folds, images, classes]),
    # for comparing ensembles of the fold heads (bench/fold_ensemble.py)
    fold_probabilities: np.ndarray | None = None

    @property
    def head(self) -> LinearHead:
        """The exported head: the fold heads' logits averaged, as one head."""
        return LinearHead.mean(self.fold_heads)

    def scores(self) -> dict[str, float]:
        p = self.predictions
        return stats.score(p.labels, p.predicted, len(p.classes))

    def summary(self, metric_names: Sequence[str] = stats.METRICS) -> dict[str, Any]:
        """``cv_<metric>`` with ``_ci_low``/``_ci_high``, per-fold scores and epochs (JSON)."""
        p = self.predictions
        intervals = stats.bootstrap_intervals(p.labels, p.predicted, len(p.classes))
        out: dict[str, Any] = {"cv_folds": len(self.fold_scores), "cv_images": len(p.labels),
                               "cv_best_epochs": list(self.best_epochs)}
        for name, value in self.scores().items():
            if name not in metric_names:
                continue
            low_key, high_key = stats.ci_keys(f"cv_{name}")
            low, high = intervals[name]
            out.update({f"cv_{name}": float(value), low_key: low, high_key: high,
                        f"cv_fold_{name}": [s[name] for s in self.fold_scores]})
        return out


def pooled_features(core: keras.Model, data_dir: Path, config: TrainParams,
                    augmenter: inputs.RandomAugment, cache: FeatureCache | None
                    ) -> PooledFeatures:
    """Features of the train and validation images, computed once for all folds."""
    ids: list[str] = []
    labels, training, scoring, computed = [], [], [], 0
    for split in SPLITS:
        shas, split_labels = inputs.read_index(data_dir, split)
        count = len(shas)
        trained = extract_features(core, data_dir, split, config,
                                   plain_and_augmented(config.head_feature_views),
                                   augmenter=augmenter, cache=cache)
        scored = extract_features(core, data_dir, split, config, test_time_views(config),
                                  cache=cache)
        ids += shas
        labels.append(np.asarray(split_labels, np.int64))
        training.append(trained.x.reshape(-1, count, trained.x.shape[-1]))
        scoring.append(scored.x.reshape(-1, count, scored.x.shape[-1]))
        computed += trained.computed + scored.computed
    return PooledFeatures(tuple(ids), np.concatenate(labels), np.concatenate(training, axis=1),
                          np.concatenate(scoring, axis=1), computed)


class _BestEpoch(keras.callbacks.Callback):
    """Early stopping on the held-out rows' loss, keeping the best epoch's weights.

    The loss (cross-entropy plus the head's L2 penalty, as Keras' val_loss) is computed
    eagerly on the few held-out rows: Keras' validation pass would trace an evaluation
    function per fold and cost more than the epoch itself.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, patience: int) -> None:
        super().__init__()
        self.x, self.y, self.patience = tf.constant(x, tf.float32), tf.constant(y), patience
        self.best_loss = np.inf
        self.best_epoch = 0
        self.weights: list[np.ndarray] | None = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        probabilities = self.model(self.x, training=False)
        loss = float(tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            self.y, probabilities)) + sum(float(x) for x in self.model.losses))
        if loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, epoch + 1
            self.weights = self.model.get_weights()
        elif self.patience and epoch + 1 - self.best_epoch >= self.patience:
            self.model.stop_training = True


class _VariableL2(keras.regularizers.Regularizer):
    """Keras' L2 (``strength * sum(x**2)``, the same float32 numbers) with its strength in a
    variable: a head model traced once trains folds of different row counts."""

    def __init__(self) -> None:
        self.strength = keras.Variable(0.0, trainable=False, dtype="float32", name="l2")

    def __call__(self, x: Any) -> Any:
        return self.strength * keras.ops.sum(keras.ops.square(x))


class HeadTrainer:
    """Fits heads of one width and class count, as :class:`FeatureHead` trains one, on a
    compiled model kept per epoch length.

    Why: Keras traces its training loop once per compiled model, about 1.1 s, most of a
    small fold's fit; the folds of a cross-validation mostly share their epoch length
    (``steps_per_execution`` is part of the trace), so they share one traced loop. Each fit
    starts from what a head of its own would: the initial weights of a freshly built head
    (the same random draws), the optimizer's initial state and its rows' L2 strength, and
    gives the same weights (``tests/test_crossval.py``).
    """

    def __init__(self, width: int, num_classes: int, config: TrainParams) -> None:
        self.width, self.num_classes, self.config = width, num_classes, config
        self._compiled: dict[int, tuple[keras.Model, _VariableL2, list[np.ndarray]]] = {}

    @property
    def compilations(self) -> int:
        """Models compiled so far: one per distinct epoch length."""
        return len(self._compiled)

    def _model_for(self, steps: int) -> tuple[keras.Model, _VariableL2, list[np.ndarray]]:
        if steps not in self._compiled:
            penalty = _VariableL2()
            model = head_model(self.width, self.num_classes, penalty,
                               kernel_initializer="zeros")  # no random draw: fits set weights
            compile_model(model, self.config.learning_rate, self.config,
                          steps_per_execution=steps)
            model.optimizer.build(model.trainable_variables)
            start = [np.array(v) for v in model.optimizer.variables]
            self._compiled[steps] = model, penalty, start
        return self._compiled[steps]

    def fit(self, training: np.ndarray, labels: np.ndarray, epochs: int,
            held_out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[FeatureHead, int]:
        """A head on ``training`` ([views, images, width]).

        With ``held_out`` (plain features, labels) it early-stops on their loss and keeps its
        best epoch's weights; without, it trains exactly ``epochs`` epochs. Returns the head
        (a model of its own) and its best (or last) epoch.
        """
        config, width = self.config, self.width
        views = training.shape[0]
        x = training.reshape(-1, width)
        y = np.tile(labels, views)
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
        rows = len(y)
        head = head_model(width, self.num_classes,
                          keras.regularizers.L2(l2_strength(config, rows)))
        examples = tf.data.Dataset.from_tensor_slices(((x - mean) / std, y))
        batches, steps = inputs.epoch_batches(examples, rows, config, first_epoch=0,
                                              last_epoch=epochs, augmenter=None)
        model, penalty, optimizer_start = self._model_for(steps)
        model.set_weights(head.get_weights())
        penalty.strength.assign(l2_strength(config, rows))
        for variable, value in zip(model.optimizer.variables, optimizer_start, strict=True):
            variable.assign(value)
        weights = class_weights_for(labels, self.num_classes) if config.class_weights else None
        best = None
        if held_out is not None:
            best = _BestEpoch((held_out[0] - mean) / std, held_out[1],
                              config.early_stopping_patience)
        model.fit(batches, epochs=epochs, steps_per_epoch=steps, class_weight=weights,
                  callbacks=[best] if best else [], shuffle=False, verbose=0)
        head.set_weights(best.weights if best is not None and best.weights is not None
                         else model.get_weights())
        empty = (np.zeros((0, width), np.float32), np.zeros(0, np.int64))
        return (FeatureHead(head, batches, steps, empty, mean, std, rows, 0),
                best.best_epoch if best is not None else epochs)


def fold_assignment(image_ids: Sequence[str], labels: np.ndarray, classes: Sequence[str],
                    folds: int) -> np.ndarray:
    """Each image's fold: from the contents and labels alone (:data:`FOLD_SEED`), never the
    trial's settings, so every trial of a sweep holds out the same images.

    ``ValueError`` naming the class when one has fewer distinct images than folds.
    """
    distinct = {name: len({d for d, y in zip(image_ids, labels, strict=True) if y == c})
                for c, name in enumerate(classes)}
    check_fold_count(folds, distinct)
    return assign_folds(image_ids, labels, folds, FOLD_SEED)


def cross_validate(features: PooledFeatures, classes: Sequence[str], config: TrainParams,
                   also_score: np.ndarray | None = None) -> CrossValidation:
    """k heads, each fitted on the other folds and scoring its own (their mean: ``head``).

    ``also_score`` (test-time view features, [views, images, width]) is scored by every fold
    head too (``fold_probabilities``).

    ``ValueError`` (naming the limit) when a class has fewer distinct images than folds.
    """
    keras.utils.set_random_seed(config.seed)  # the heads' initial weights: reproducible
    folds_wanted = config.cv_folds
    labels = features.labels
    folds = fold_assignment(features.image_ids, labels, classes, folds_wanted)
    num_classes = len(classes)
    probabilities = np.zeros((len(labels), num_classes), np.float32)
    fold_scores, best_epochs, also, fold_heads = [], [], [], []
    trainer = HeadTrainer(features.training.shape[-1], num_classes, config)
    for fold in range(folds_wanted):
        held = folds == fold
        fitted, best = trainer.fit(features.training[:, ~held], labels[~held], config.epochs,
                                   held_out=(features.training[0, held], labels[held]))
        head = fitted.linear()
        probabilities[held] = head.view_probabilities(features.scoring[:, held])
        fold_scores.append(stats.score(labels[held], probabilities[held].argmax(axis=1),
                                       num_classes))
        best_epochs.append(best)
        fold_heads.append(head)
        if also_score is not None:
            also.append(head.view_probabilities(also_score))
        logger.info("fold %d/%d: %d held-out images, best epoch %d, balanced accuracy %.3f",
                    fold + 1, folds_wanted, int(held.sum()), best,
                    fold_scores[-1]["balanced_accuracy"])
    predictions = stats.Predictions(features.image_ids, labels, probabilities.argmax(axis=1),
                                    probabilities, tuple(classes))
    logger.info("cross-validated over %d folds of %d images (%d heads on %d compiled "
                "models); the model: the fold heads averaged", folds_wanted, len(labels),
                folds_wanted, trainer.compilations)
    return CrossValidation(predictions, folds, tuple(fold_scores), tuple(best_epochs),
                           tuple(fold_heads), features.computed,
                           np.stack(also) if also else None)


def serving_cost_ms(model: keras.Model, data_dir: Path, config: TrainParams) -> float:
    """Measured milliseconds per served image (all test-time views): the minimum over
    :data:`COST_REPEATS` timed batches of :data:`COST_BATCH` validation images, after a
    warm-up, so what a trial costs to serve is compared on measurement, not on guesses."""
    examples = inputs.load_examples(data_dir, "val", config.image_size, cache=False)
    batch = tf.cast(next(iter(examples.batch(COST_BATCH)))[0], tf.float32)
    model.predict_on_batch(batch)  # warm-up: tracing and allocation are not serving
    timings = []
    for _ in range(COST_REPEATS):
        started = time.perf_counter()
        model.predict_on_batch(batch)
        timings.append(time.perf_counter() - started)
    return 1000.0 * min(timings) / int(batch.shape[0])


__all__ = ["FOLD_SEED", "CrossValidation", "HeadTrainer", "PooledFeatures", "cross_validate",
           "fold_assignment",
           "pooled_features", "serving_cost_ms"]
