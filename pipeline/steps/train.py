"""Training step: seeded, resumable, GPU-ready training that writes an exportable model.

Outputs in ``model_dir``: ``model.keras`` (float32, loads in safe mode), ``saved_model/``
(serving signature ``serving_default`` taking uint8 images [batch, height, width, 3] of any
size), ``classes.json``, ``history.json``, ``training_summary.json``,
``augmentation_preview.png`` and ``checkpoints/`` (weights + optimizer state after every
epoch, so a killed run started again with the same ``model_dir`` continues from its last
finished epoch; with ``$IRIS_CHECKPOINT_ROOT`` set they live there instead, keyed by the
training fingerprint, see :func:`checkpoint_dir`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline.lib import embeddings, inputs, model_logging, models, records, stats, tracking
from pipeline.lib.contract import (
    CHECKPOINT_DIR,
    CHECKPOINT_ROOT_ENV,
    CLASSES_FILE,
    DATA_REPORT_JSON,
    HISTORY_FILE,
    META_DATASET_DIGEST,
    META_EXPERIMENT_ID,
    META_MODEL_ID,
    META_MODEL_URI,
    META_PARAMS,
    META_PARENT_RUN_ID,
    META_RUN_ID,
    META_SHA256,
    META_SOURCE,
    META_TRACKING_URI,
    META_TRAIN_PARAMS,
    MODEL_FILE,
    PREVIEW_FILE,
    SAVED_MODEL_DIR,
    TRAINING_SUMMARY_FILE,
    VAL_SCORE_PREFIX,
)
from pipeline.lib.files import atomic_path, atomic_write_json, read_json, replace_dir
from pipeline.lib.params import DownloadParams, PreprocessParams, TrackingParams, TrainParams
from pipeline.lib.progress import report_progress

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"

#: Fields that do not change what is trained (resume ignores differences in them).
NOT_TRAINING_FIELDS = frozenset({"weights", "weights_sha256", "mixed_precision", "xla",
                                 "augment_placement", "tta_views"})


# ----------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------
def config_fingerprint(config: TrainParams, classes: list[str],
                       data_identity: Mapping[str, Any]) -> str:
    """Digest of everything that defines a training run; checkpoints of another run are refused.

    The data's identity (archive digest and per-split content fingerprints from the data
    report) stands in for the data settings, which the train step does not receive.
    """
    relevant = {k: v for k, v in config.to_dict().items() if k not in NOT_TRAINING_FIELDS}
    blob = json.dumps({"config": relevant, "classes": classes, "data": data_identity},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def checkpoint_dir(model_dir: Path, fingerprint: str) -> tuple[Path, IO[bytes] | None]:
    """Where a training keeps its checkpoints, and the lock it holds on a shared folder.

    A local rerun gets a new model folder (a new kfp.local run folder), so checkpoints inside
    it were never found again after a crash; under ``$IRIS_CHECKPOINT_ROOT/<fingerprint>``,
    shared by runs and keyed by the training fingerprint (config, classes and data), a rerun
    with the same config and data resumes from the last finished epoch. Two identical
    trainings at once must not write one folder: the first holds an ``flock`` on
    ``<fingerprint>.lock`` (keep the returned file open while training; the kernel releases
    it if the process dies), a second one finding it held uses its own model folder. Without
    the variable (a cluster pod, whose model folder is what a retried task gets back) the
    checkpoints stay in ``model_dir/checkpoints``.
    """
    root = os.environ.get(CHECKPOINT_ROOT_ENV, "").strip()
    if not root:
        return model_dir / CHECKPOINT_DIR, None
    Path(root).mkdir(parents=True, exist_ok=True)
    lock = open(Path(root) / f"{fingerprint}.lock", "a+b")  # noqa: SIM115 (held by caller)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        logger.warning("checkpoints %s are in use by another training with the same config "
                       "and data: this one checkpoints in its model folder", Path(root) /
                       fingerprint)
        return model_dir / CHECKPOINT_DIR, None
    return Path(root) / fingerprint, lock


def data_identity(data_dir: Path) -> dict[str, Any]:
    """What identifies the prepared data: the archive's sha256 and each split's fingerprint."""
    report = read_json(data_dir / DATA_REPORT_JSON) or {}
    return {"sha256": (report.get("input") or {}).get("sha256", ""),
            "splits": report.get("split_fingerprints", {})}


def class_weights_for(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Inverse-frequency weights n / (k * n_c); absent classes get 0 instead of dividing by 0."""
    counts = np.bincount(labels, minlength=num_classes)
    total = counts.sum()
    return {c: (float(total / (num_classes * counts[c])) if counts[c] else 0.0)
            for c in range(num_classes)}


def describe_devices() -> dict[str, Any]:
    """Logical devices TensorFlow sees; the strategy is chosen from these."""
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    cpus = [d.name for d in tf.config.list_logical_devices("CPU")]
    return {"gpus": gpus, "cpus": cpus, "accelerated": bool(gpus)}


def choose_strategy(devices: dict[str, Any]) -> tf.distribute.Strategy:
    """MirroredStrategy over several GPUs (or several logical CPUs, used by tests), else default."""
    pool = devices["gpus"] or devices["cpus"]
    if len(pool) > 1:
        return tf.distribute.MirroredStrategy(devices=pool)
    return tf.distribute.get_strategy()


def augment_in_model(config: TrainParams, devices: dict[str, Any]) -> bool:
    """GPU: augment inside the model on the device; CPU: in tf.data, overlapped by prefetch."""
    if config.augment_placement == "auto":
        return devices["accelerated"]
    return config.augment_placement == "model"


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    epochs: int
    learning_rate: float
    fine_tune: bool


def plan_phases(config: TrainParams) -> list[Phase]:
    """MobileNet: train the head, then optionally fine-tune; the notebook's CNN: one phase."""
    if config.model != "mobilenet":
        return [Phase("train", config.epochs, config.learning_rate, fine_tune=False)]
    phases = [Phase("head", config.epochs, config.learning_rate, fine_tune=False)]
    if config.fine_tune_epochs > 0:
        phases.append(Phase("fine_tune", config.fine_tune_epochs, config.fine_tune_learning_rate,
                            fine_tune=True))
    return phases


# ----------------------------------------------------------------------------------------
# training state, checkpoints, early stopping
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class TrainState:
    """Everything a restart needs; written to ``checkpoints/state.json`` after every epoch.

    Early stopping's counters and each phase's best epoch are not stored: they follow from
    ``history`` (see :meth:`phase_history`, :meth:`best_entry`).
    """

    phase_index: int = 0
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    stopped: bool = False  # early stopping ended the current phase
    last_weights: str | None = None  # after the last finished epoch (with optimizer state)
    best_weights: str | None = None  # after the current phase's best epoch
    train_seconds: float = 0.0  # epochs plus feature extraction, over all (resumed) runs
    complete: bool = False

    def phase_history(self, phase: Phase) -> list[dict[str, Any]]:
        return [h for h in self.history if h["phase"] == phase.name]

    def best_entry(self, phase: Phase) -> dict[str, Any] | None:
        """The phase's epoch with the lowest val_loss (the first of equals, as Keras picks)."""
        entries = self.phase_history(phase)
        return min(entries, key=lambda h: h.get("val_loss", math.inf)) if entries else None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class Checkpoints:
    """``checkpoints/state.json`` plus weight files; state is written last, so it is consistent."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def load(self) -> TrainState | None:
        if not self.state_path.is_file():
            return None
        try:
            data = json.loads(self.state_path.read_text())
            if data.get("fingerprint") != self.fingerprint:
                raise LookupError
            return TrainState.from_json(data)
        except LookupError:
            raise ValueError(
                f"{str(self.directory)!r} holds checkpoints of a different training run (other "
                "config or classes); use a fresh model_dir or delete that folder to start over"
            ) from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"corrupt checkpoint state {str(self.state_path)!r}: {exc}") from exc

    def save_weights(self, model: keras.Model, name: str) -> str:
        with atomic_path(self.directory / name) as tmp:
            model.save_weights(tmp)
        return name

    def restore(self, model: keras.Model, name: str) -> None:
        model.load_weights(self.directory / name)

    def commit(self, state: TrainState) -> None:
        """Write the state, then drop weight files it no longer references."""
        atomic_write_json(self.state_path,
                          {**dataclasses.asdict(state), "fingerprint": self.fingerprint})
        keep = {state.last_weights, state.best_weights}
        for path in self.directory.glob("*.weights.h5"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' early stopping on val_loss, its counters replayed from a resumed phase's history.

    Best weights are restored by the step from the checkpoint instead of Keras' in-memory
    copy, which a restart would lose.
    """

    def __init__(self, patience: int, finished: Sequence[dict[str, Any]]) -> None:
        super().__init__(monitor="val_loss", patience=patience)
        self.finished = list(finished)

    def on_train_begin(self, logs: dict | None = None) -> None:
        super().on_train_begin(logs)
        for epoch, entry in enumerate(self.finished):
            super().on_epoch_end(epoch, entry)


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: history entry, best and last weights, then the state, then a log line.

    Not Keras' ``BackupAndRestore`` or ``ModelCheckpoint``: they save weights and the epoch
    count in separate, non-atomic writes and keep neither the history nor the best epoch
    across a restart; here one state file, written last, names the weight files it belongs to.
    """

    def __init__(self, checkpoints: Checkpoints, state: TrainState, phase: Phase) -> None:
        super().__init__()
        self.checkpoints = checkpoints
        self.state = state
        self.phase = phase
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        state, phase = self.state, self.phase
        seconds = time.perf_counter() - self._started
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        best = state.best_entry(phase)
        entry = {
            "epoch": len(state.history) + 1,
            "phase": phase.name,
            "phase_epoch": epoch + 1,
            **{k: float(v) for k, v in (logs or {}).items()
               if k in ("loss", "accuracy", "val_loss", "val_accuracy")},
            "learning_rate": learning_rate,
            "seconds": round(seconds, 3),
        }
        state.history.append(entry)
        state.train_seconds += seconds
        if best is None or entry.get("val_loss", math.inf) < best.get("val_loss", math.inf):
            state.best_weights = self.checkpoints.save_weights(
                self.model, f"best-{phase.name}-{entry['epoch']:04d}.weights.h5")
        state.stopped = bool(self.model.stop_training)
        state.last_weights = self.checkpoints.save_weights(
            self.model, f"last-{entry['epoch']:04d}.weights.h5")
        self.checkpoints.commit(state)
        report_progress(f"{phase.name} epochs", epoch + 1, phase.epochs)
        logger.info(
            "epoch %d (%s %d/%d): loss %.4f acc %.3f val_loss %.4f val_acc %.3f lr %.2g (%.1fs)%s",
            entry["epoch"], phase.name, epoch + 1, phase.epochs, entry.get("loss", math.nan),
            entry.get("accuracy", math.nan), entry.get("val_loss", math.nan),
            entry.get("val_accuracy", math.nan), learning_rate, seconds,
            ": early stop" if state.stopped else "",
        )


# ----------------------------------------------------------------------------------------
# head on cached backbone features
# ----------------------------------------------------------------------------------------
def uses_feature_head(config: TrainParams, phase: Phase | None = None) -> bool:
    """Whether the frozen-backbone head phase trains on cached features (MobileNet only)."""
    on = config.model == "mobilenet" and config.head_feature_views > 0
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


# ----------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------
def split_scores(model: keras.Model, data_dir: str | Path, split: str,
                 config: TrainParams) -> dict[str, float]:
    """Accuracy, balanced accuracy and macro F1 of ``model`` on one split of ``data_dir``.

    Run on the exported model (test-time views included) and the validation split, this is
    the score a sweep chooses on: what evaluation and serving will see, without the test split.
    """
    labels, predictions = [], []
    for images, batch_labels in inputs.make_eval_dataset(data_dir, split, config):
        predictions.append(np.asarray(model.predict_on_batch(images)).argmax(axis=1))
        labels.append(batch_labels.numpy())
    return stats.score(np.concatenate(labels), np.concatenate(predictions),
                       len(records.load_classes(data_dir)))


def export_model(trained: keras.Model, config: TrainParams, num_classes: int,
                 model_dir: Path) -> keras.Model:
    """Write ``model.keras`` and ``saved_model/`` from a clean float32 copy of ``trained``.

    The copy carries no optimizer state or mixed-precision policy, so it serves on any CPU.
    With ``config.tta_views`` it averages over that many flips and turns of each image
    (:func:`models.with_test_time_views`): only here, so training is unchanged and evaluation
    and serving score the same model. Returns the exported model.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        clean = models.build_model(dataclasses.replace(config, weights="none"), num_classes)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    clean.set_weights([np.asarray(w) for w in trained.get_weights()])
    clean = models.with_test_time_views(clean, config.tta_views)

    with atomic_path(model_dir / MODEL_FILE) as tmp:
        clean.save(tmp)

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{SAVED_MODEL_DIR}-", dir=model_dir))
    archive = keras.export.ExportArchive()
    archive.track(clean)

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": clean(tf.cast(images, tf.float32), training=False)}

    archive.add_endpoint(
        "serve", serve,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
    )
    try:
        archive.write_out(str(tmp_dir), verbose=False)
        replace_dir(tmp_dir, model_dir / SAVED_MODEL_DIR)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return clean


# ----------------------------------------------------------------------------------------
# the step
# ----------------------------------------------------------------------------------------
def _compile(model: keras.Model, learning_rate: float, config: TrainParams) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=bool(config.xla),
    )


def _set_phase(core: keras.Model, phase: Phase, config: TrainParams) -> None:
    if models.has_backbone(core):
        if phase.fine_tune:
            count = models.set_fine_tune(core, config.fine_tune_layers)
            logger.info("fine-tuning %d backbone layers at lr %g", count, phase.learning_rate)
        else:
            core.get_layer(models.BACKBONE).trainable = False


def train_model(
    data_dir: str | Path,
    model_dir: str | Path,
    config: TrainParams,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, Any]:
    """Train ``config.model`` on the prepared data in ``data_dir``; export it to ``model_dir``.

    Resumes from the checkpoints of :func:`checkpoint_dir` when a previous run with the same
    config and data was interrupted. ``callbacks`` (e.g. an MLflow logger) are added to
    every ``fit`` call.
    Returns the summary also written to ``training_summary.json``: ``model``, ``classes``,
    ``metrics`` (numbers to compare runs by), ``bookkeeping`` (how the run went: epochs, best
    epoch, devices, strategy, class weights, ...) and the per-epoch ``history``.
    """
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    classes = records.load_classes(data_dir)
    train_labels = inputs.read_labels(data_dir, "train")
    if len(train_labels) == 0:
        raise ValueError(f"the training split under {str(data_dir)!r} is empty")
    records.split_files(data_dir, "val")  # fail early and clearly when val is missing
    model_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = config_fingerprint(config, classes, data_identity(data_dir))
    directory, checkpoint_lock = checkpoint_dir(model_dir, fingerprint)
    checkpoints = Checkpoints(directory, fingerprint)
    state = checkpoints.load()
    resumed_from = None
    if state is None:
        state = TrainState()
    else:
        resumed_from = len(state.history)
        logger.info("resuming from %s: %d epoch(s) already finished", checkpoints.directory,
                    resumed_from)

    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    devices = describe_devices()
    strategy = choose_strategy(devices)
    in_model = augment_in_model(config, devices)
    mixed = bool(config.mixed_precision and devices["accelerated"])
    previous_policy = keras.mixed_precision.global_policy()
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    logger.info(
        "training %s on %s (%d replica(s), %s); mixed precision %s, XLA %s, augmentation in %s",
        config.model, ", ".join(devices["gpus"] or devices["cpus"]),
        strategy.num_replicas_in_sync, type(strategy).__name__, "on" if mixed else "off",
        "on" if config.xla else "off", "the model" if in_model else "tf.data",
    )
    weights = class_weights_for(train_labels, len(classes)) if config.class_weights else None
    phases = plan_phases(config)
    fit_seconds = 0.0
    feature_rows = None
    # decoded splits over the memory budget are cached here, outside the model artifact
    cache_dir = tempfile.mkdtemp(prefix="iris-input-cache-")
    try:
        with strategy.scope():
            core = models.build_model(config, len(classes))
            augmenter = inputs.build_augmenter(config)
            if in_model:
                image = keras.Input(shape=(None, None, 3), name="image")
                trainer = keras.Model(image, core(augmenter(image)), name="trainer")
            else:
                trainer = core
        if state.complete:  # killed after the last phase ended, before the export
            checkpoints.restore(trainer, state.last_weights)
        while not state.complete:
            phase = phases[state.phase_index]
            finished = len(state.phase_history(phase))
            _set_phase(core, phase, config)
            # at a phase start the saved optimizer state belongs to the previous phase:
            # load the weights before compiling so only the model's part is read
            if state.last_weights and not finished:
                checkpoints.restore(trainer, state.last_weights)
            started = time.perf_counter()
            head = None
            offset = state.phase_index * 10_000  # distinct shuffles per phase
            if uses_feature_head(config, phase):
                with strategy.scope():
                    head = FeatureHead.build(core, data_dir, config, augmenter,
                                             offset + finished, offset + phase.epochs)
                state.train_seconds += time.perf_counter() - started  # committed by the epochs
                model, train_data, steps = head.model, head.train, head.steps
                val_data: Any = head.val
                feature_rows = head.rows
            else:
                model = trainer
                train_data, steps = inputs.make_train_dataset(
                    data_dir, config, first_epoch=offset + finished,
                    last_epoch=offset + phase.epochs, augmenter=None if in_model else augmenter,
                    cache_dir=cache_dir,
                )
                val_data = inputs.make_eval_dataset(data_dir, "val", config,
                                                    cache_dir=cache_dir)
            with strategy.scope():
                _compile(model, phase.learning_rate, config)
                model.optimizer.build(model.trainable_variables)
            if finished:
                checkpoints.restore(model, state.last_weights)
            if not state.stopped and finished < phase.epochs:
                stopping = ([ResumableEarlyStopping(config.early_stopping_patience,
                                                    state.phase_history(phase))]
                            if config.early_stopping_patience else [])
                model.fit(
                    train_data, epochs=phase.epochs, initial_epoch=finished,
                    steps_per_epoch=steps, validation_data=val_data, class_weight=weights,
                    callbacks=[*stopping, EpochCheckpoint(checkpoints, state, phase), *callbacks],
                    shuffle=False, verbose=0,  # the batches come shuffled per epoch
                )
            # phase over: continue from its best epoch's weights
            if state.best_weights:
                checkpoints.restore(model, state.best_weights)
            if head is not None:
                head.fold_into(core)
            fit_seconds += time.perf_counter() - started
            state.phase_index += 1
            state.complete = state.phase_index >= len(phases)
            state.stopped = False
            state.last_weights = checkpoints.save_weights(
                trainer, f"last-{len(state.history):04d}-end-{phase.name}.weights.h5")
            state.best_weights = None
            checkpoints.commit(state)

        exported = export_model(core, config, len(classes), model_dir)
        val_scores = split_scores(exported, data_dir, "val", config)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
        shutil.rmtree(cache_dir, ignore_errors=True)

    atomic_write_json(model_dir / CLASSES_FILE, classes)
    atomic_write_json(model_dir / HISTORY_FILE, state.history)
    inputs.save_augmentation_preview(data_dir, config, model_dir / PREVIEW_FILE)
    phase_best = [state.best_entry(phase) for phase in phases]
    best = phase_best[-1]
    summary = {
        "model": config.model,
        "image_size": config.image_size,
        "classes": classes,
        "metrics": {
            "best_val_loss": best.get("val_loss") if best else None,
            "best_val_accuracy": best.get("val_accuracy") if best else None,
            **{f"{VAL_SCORE_PREFIX}{name}": value for name, value in val_scores.items()},
            "train_seconds": round(float(state.train_seconds), 3),
            "fit_seconds_this_run": round(fit_seconds, 3),
        },
        "bookkeeping": {
            "epochs_run": len(state.history),
            "best_epoch": best["epoch"] if best else None,
            "phase_best_epochs": [b["epoch"] if b else None for b in phase_best],
            "resumed_from_epoch": resumed_from,
            "devices": devices["gpus"] or devices["cpus"],
            "replicas": strategy.num_replicas_in_sync,
            "strategy": type(strategy).__name__,
            "mixed_precision": mixed,
            "xla": bool(config.xla),
            "augmentation_in": "model" if in_model else "tf.data",
            "head_training": "features" if uses_feature_head(config) else "images",
            "head_feature_rows": feature_rows,
            "class_weights": {classes[c]: w for c, w in (weights or {}).items()},
            "train_examples": len(train_labels),
        },
        "history": state.history,
    }
    atomic_write_json(model_dir / TRAINING_SUMMARY_FILE, summary)
    if checkpoint_lock is not None:  # shared root: done, free the space and the folder
        shutil.rmtree(checkpoints.directory, ignore_errors=True)
        checkpoint_lock.close()
    logger.info("trained %s: %d epochs, best epoch %s, %.1fs of training", config.model,
                len(state.history), summary["bookkeeping"]["best_epoch"],
                state.train_seconds)
    return summary


def run_step(data_dir: str | Path, data_metadata: Mapping[str, Any], model_dir: str | Path,
             params: TrainParams, tracking_params: TrackingParams) -> dict[str, Any]:
    """The ``train_model`` component's body: train inside the step's MLflow run.

    Logs the data set (its source, actual sha256 and report) as the run's dataset input and
    the data settings from the prepared data's metadata beside the training params, so the
    parent run has every setting even when download and preprocess came from the cache;
    then trains, logs the per-epoch curves, results, preview and the model. Returns the
    Model artifact's metadata (MLflow ids for the register step and the summary, results).
    """
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    upstream = {**data_metadata[META_PARAMS], "data_source": data_metadata[META_SOURCE],
                "data_sha256": data_metadata[META_SHA256]}
    logged = {**DownloadParams.from_mapping(upstream).to_dict(),
              **PreprocessParams.from_mapping(upstream).to_dict(), **params.to_dict()}
    with tracking.tracked_step("train", tracking_params, logged) as run:
        report = read_json(data_dir / DATA_REPORT_JSON) or {}
        digest = tracking.log_dataset_input(data_metadata[META_SOURCE],
                                            (report.get("input") or {}).get("sha256", ""),
                                            report)
        result = train_model(data_dir, model_dir, params,
                             callbacks=[model_logging.MlflowEpochLogger()])
        tracking.log_metrics(result["metrics"])
        mlflow.set_tags({f"train.{k}": v if isinstance(v, str) else json.dumps(v)
                         for k, v in result["bookkeeping"].items()})
        tracking.log_artifacts(model_dir / PREVIEW_FILE)
        # drift check (issue 23): the training images' feature summary, logged with the model
        embeddings.write_reference(model_dir, data_dir, params.image_size)
        logged_model = model_logging.log_model(
            model_dir, image_size=params.image_size,
            example_image=records.read_split(data_dir, "test", limit=1)[0].image,
            name=f"iris-{params.model}-{params.image_size}px-seed{params.seed}")
        parent = tracking.parent_run_id()
        uri = mlflow.get_tracking_uri()
    return {
        "framework": "keras",
        META_TRACKING_URI: tracking.redact_uri(uri),
        META_RUN_ID: run.info.run_id,
        META_EXPERIMENT_ID: run.info.experiment_id,
        META_PARENT_RUN_ID: parent or "",
        META_MODEL_URI: logged_model.model_uri,
        META_MODEL_ID: logged_model.model_id,
        META_DATASET_DIGEST: digest,
        "model": result["model"],
        META_TRAIN_PARAMS: params.to_dict(),
        **{k: v for k, v in {**result["metrics"], **result["bookkeeping"]}.items()
           if isinstance(v, (str, int, float, bool))},
    }


__all__ = ["FeatureHead", "TrainState", "class_weights_for", "config_fingerprint",
           "data_identity", "describe_devices", "export_model", "extract_features", "run_step",
           "train_model", "uses_feature_head"]
