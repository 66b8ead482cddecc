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
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline.lib import inputs, model_logging, models, records, tracking
from pipeline.lib.contract import (
    CHECKPOINT_DIR,
    CHECKPOINT_ROOT_ENV,
    CLASSES_FILE,
    DATA_REPORT_JSON,
    HISTORY_FILE,
    META_DATASET_DIGEST,
    META_MODEL_ID,
    META_MODEL_URI,
    META_PARAMS,
    META_PARENT_RUN_ID,
    META_RUN_ID,
    META_SHA256,
    META_SOURCE,
    META_TRACKING_URI,
    MODEL_FILE,
    PREVIEW_FILE,
    SAVED_MODEL_DIR,
    TRAINING_SUMMARY_FILE,
)
from pipeline.lib.files import atomic_write_json, read_json
from pipeline.lib.params import PreprocessParams, TrackingParams, TrainParams

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"

#: Fields that do not change what is trained (resume ignores differences in them).
NOT_TRAINING_FIELDS = frozenset({"weights", "weights_sha256", "mixed_precision", "xla",
                                 "augment_placement"})


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
# checkpoints, early stopping, history
# ----------------------------------------------------------------------------------------
class Checkpoints:
    """``checkpoints/state.json`` plus weight files; state is written last, so it is consistent."""

    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.directory.mkdir(parents=True, exist_ok=True)

    @property
    def state_path(self) -> Path:
        return self.directory / STATE_FILE

    def load(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        try:
            state = json.loads(self.state_path.read_text())
        except ValueError as exc:
            raise ValueError(f"corrupt checkpoint state {str(self.state_path)!r}: {exc}") from exc
        if state.get("fingerprint") != self.fingerprint:
            raise ValueError(
                f"{str(self.directory)!r} holds checkpoints of a different training run (other "
                "config or classes); use a fresh model_dir or delete that folder to start over"
            )
        return state

    def save_weights(self, model: keras.Model, name: str) -> str:
        path = self.directory / name
        tmp = self.directory / f".tmp-{name}"
        model.save_weights(tmp)
        os.replace(tmp, path)
        return name

    def commit(self, state: dict[str, Any]) -> None:
        """Write the state, then drop weight files it no longer references."""
        state = {**state, "fingerprint": self.fingerprint}
        atomic_write_json(self.state_path, state)
        keep = {state.get("last_weights"), state.get("best_weights")}
        for path in self.directory.glob("*.weights.h5"):
            if path.name not in keep:
                path.unlink(missing_ok=True)


def end_epoch(checkpoints: Checkpoints, state: dict[str, Any], phase: Phase, model: keras.Model,
              phase_epoch: int, metrics: dict[str, float], learning_rate: float, seconds: float,
              *, patience: int = 0, of: int | None = None) -> bool:
    """Close one epoch: history entry, best weights by val_loss, last weights, checkpoint, log.

    Returns whether the phase is done (``patience`` epochs without improvement, or the last
    of ``of`` epochs when given). Both head trainers end epochs here, so resume and early
    stopping see the same state whichever ran.
    """
    entry = {
        "epoch": len(state["history"]) + 1,
        "phase": phase.name,
        "phase_epoch": phase_epoch,
        **{k: float(metrics[k]) for k in ("loss", "accuracy", "val_loss", "val_accuracy")
           if k in metrics},
        "learning_rate": learning_rate,
        "seconds": round(seconds, 3),
    }
    state["history"].append(entry)
    state["train_seconds"] = state.get("train_seconds", 0.0) + seconds
    val_loss = entry.get("val_loss", math.inf)
    if state["best_val_loss"] is None or val_loss < state["best_val_loss"]:
        state["best_val_loss"] = val_loss
        state["best_epoch"] = entry["epoch"]
        state["wait"] = 0
        state["best_weights"] = checkpoints.save_weights(
            model, f"best-{phase.name}-{entry['epoch']:04d}.weights.h5")
    else:
        state["wait"] += 1
    state["phase_epoch"] = phase_epoch
    total = of or phase.epochs
    if patience and state["wait"] >= patience:
        state["phase_done"] = True
        logger.info("early stopping in phase %s after epoch %d (best epoch %d, val_loss %.4f)",
                    phase.name, phase_epoch, state["best_epoch"], state["best_val_loss"])
    elif of is not None and phase_epoch >= of:
        state["phase_done"] = True
    state["last_weights"] = checkpoints.save_weights(model, f"last-{entry['epoch']:04d}.weights.h5")
    checkpoints.commit(state)
    logger.info(
        "epoch %d (%s %d/%d): loss %.4f acc %.3f val_loss %.4f val_acc %.3f lr %.2g (%.1fs)",
        entry["epoch"], phase.name, phase_epoch, total, entry.get("loss", 0),
        entry.get("accuracy", 0), entry.get("val_loss", 0), entry.get("val_accuracy", 0),
        learning_rate, seconds,
    )
    return bool(state["phase_done"])


class EpochTracker(keras.callbacks.Callback):
    """Per epoch: record history, early-stop on val_loss (keeping the best weights), checkpoint.

    Replaces ``keras.callbacks.EarlyStopping`` because its state (best loss, patience counter,
    best weights) would be lost on a restart; here all of it is in the checkpoint.
    """

    def __init__(self, checkpoints: Checkpoints, state: dict[str, Any], phase: Phase,
                 patience: int) -> None:
        super().__init__()
        self.checkpoints = checkpoints
        self.state = state
        self.phase = phase
        self.patience = patience
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._started
        lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        if end_epoch(self.checkpoints, self.state, self.phase, self.model, epoch + 1,
                     dict(logs or {}), lr, seconds, patience=self.patience):
            self.model.stop_training = True


# ----------------------------------------------------------------------------------------
# head on cached backbone features
# ----------------------------------------------------------------------------------------
def uses_feature_head(config: TrainParams) -> bool:
    """Whether the frozen-backbone head phase trains on cached features (MobileNet only)."""
    return config.model == "mobilenet" and config.head_feature_views > 0


def extract_features(
    core: keras.Model, data_dir: Path, split: str, config: TrainParams, *,
    augmenter: inputs.RandomAugment | None = None, views: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pooled backbone features of a split: the images, then ``views`` augmented copies of them.

    Augmentation uses stateless seeds from (config.seed, view, batch), so features (and the
    head fitted on them) are reproducible.
    """
    if views and augmenter is None:
        raise ValueError(f"{views} augmented views of split {split!r} need an augmenter")
    extractor = keras.Model(core.inputs, core.get_layer(models.POOL).output)
    examples = inputs.load_examples(data_dir, split, config.image_size, cache=False)
    images, labels = [], []
    for image, label in examples.batch(config.batch_size):
        images.append(image.numpy())
        labels.append(label.numpy())
    features, all_labels = [], []
    for view in range(views + 1):
        for step, batch in enumerate(images):
            if view:
                seed = tf.constant([config.seed, view * 100_000 + step], tf.int64)
                batch = augmenter.augment(batch, seed)
            features.append(np.asarray(extractor(tf.cast(batch, tf.float32), training=False)))
        all_labels += labels
    return np.concatenate(features), np.concatenate(all_labels)


def fit_head_on_features(
    core: keras.Model, data_dir: Path, config: TrainParams, augmenter: inputs.RandomAugment,
    class_weight: dict[int, float] | None,
) -> dict[str, float]:
    """Fit the softmax head as L2 logistic regression on cached features; write it into ``core``.

    Why: with a frozen backbone every head epoch recomputes the same backbone forward passes;
    computing features once (original + ``head_feature_views`` augmented views per image) and
    solving the convex head problem takes seconds and scored better on held-out data than
    early-stopped Adam epochs (bench/train_quality.py). Standardization is folded into the
    Dense weights, so the exported model is the plain Keras model. Dropout is not used here.
    """
    from sklearn.linear_model import LogisticRegression

    x_train, y_train = extract_features(core, data_dir, "train", config, augmenter=augmenter,
                                        views=config.head_feature_views)
    x_val, y_val = extract_features(core, data_dir, "val", config)
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0) + 1e-6
    dense = core.get_layer(models.HEAD)
    num_classes = int(dense.units)
    sample_weight = (np.array([class_weight[int(y)] for y in y_train]) if class_weight
                     else None)
    clf = LogisticRegression(C=config.head_c, max_iter=2000)
    clf.fit((x_train - mean) / std, y_train, sample_weight=sample_weight)
    if list(clf.classes_) != list(range(num_classes)):
        raise ValueError(f"every class needs training images; found classes {clf.classes_}")
    kernel = (clf.coef_ / std).T.astype(np.float32)
    bias = (clf.intercept_ - (clf.coef_ * (mean / std)).sum(axis=1)).astype(np.float32)
    dense.set_weights([kernel, bias])

    def loss_and_accuracy(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        probabilities = np.clip(clf.predict_proba((x - mean) / std), 1e-7, 1.0)
        loss = float(-np.mean(np.log(probabilities[np.arange(len(y)), y])))
        return loss, float(np.mean(probabilities.argmax(axis=1) == y))

    loss, accuracy = loss_and_accuracy(x_train, y_train)
    val_loss, val_accuracy = loss_and_accuracy(x_val, y_val)
    logger.info("head fitted on %d cached feature rows (%d augmented views per image): "
                "val_loss %.4f val_acc %.3f", len(y_train), config.head_feature_views,
                val_loss, val_accuracy)
    return {"loss": loss, "accuracy": accuracy, "val_loss": val_loss,
            "val_accuracy": val_accuracy}


# ----------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------
def export_model(trained: keras.Model, config: TrainParams, num_classes: int,
                 model_dir: Path) -> keras.Model:
    """Write ``model.keras`` and ``saved_model/`` from a clean float32 copy of ``trained``.

    The copy carries no optimizer state or mixed-precision policy, so it serves on any CPU.
    """
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("float32")
    try:
        clean = models.build_model(dataclasses.replace(config, weights="none"), num_classes)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    clean.set_weights([np.asarray(w) for w in trained.get_weights()])

    keras_path = model_dir / MODEL_FILE
    tmp = model_dir / f".tmp-{MODEL_FILE}"
    clean.save(tmp)
    os.replace(tmp, keras_path)

    saved = model_dir / SAVED_MODEL_DIR
    tmp_dir = model_dir / f".tmp-{SAVED_MODEL_DIR}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    archive = keras.export.ExportArchive()
    archive.track(clean)

    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": clean(tf.cast(images, tf.float32), training=False)}

    archive.add_endpoint(
        "serve", serve,
        input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
    )
    archive.write_out(str(tmp_dir), verbose=False)
    shutil.rmtree(saved, ignore_errors=True)
    os.replace(tmp_dir, saved)
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
    Returns a summary: epochs_run, best_epoch, train_seconds, devices, history, ...
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
        state = {"phase_index": 0, "phase_epoch": 0, "phase_done": False, "history": [],
                 "best_val_loss": None, "best_epoch": None, "wait": 0, "best_weights": None,
                 "last_weights": None, "train_seconds": 0.0, "complete": False,
                 "phase_best_epochs": []}
    else:
        resumed_from = len(state["history"])
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
    try:
        with strategy.scope():
            core = models.build_model(config, len(classes))
            augmenter = inputs.build_augmenter(config)
            if in_model:
                image = keras.Input(shape=(None, None, 3), name="image")
                trainer = keras.Model(image, core(augmenter(image)), name="trainer")
            else:
                trainer = core
        weights = class_weights_for(train_labels, len(classes)) if config.class_weights else None
        val_data = inputs.make_eval_dataset(data_dir, "val", config)
        phases = plan_phases(config)
        fit_seconds = 0.0
        while not state["complete"]:
            index = state["phase_index"]
            phase = phases[index]
            _set_phase(core, phase, config)
            # at a phase start the saved optimizer state belongs to the previous phase:
            # load the weights before compiling so only the model's part is read
            mid_phase = state["phase_epoch"] > 0
            if state["last_weights"] and not mid_phase:
                trainer.load_weights(checkpoints.directory / state["last_weights"])
            with strategy.scope():
                _compile(trainer, phase.learning_rate, config)
                trainer.optimizer.build(trainer.trainable_variables)
            if state["last_weights"] and mid_phase:
                trainer.load_weights(checkpoints.directory / state["last_weights"])
            if phase.name == "head" and uses_feature_head(config) and not state["phase_done"]:
                # one closed-form "epoch": no optimizer steps, hence learning rate 0
                started = time.perf_counter()
                logs = fit_head_on_features(core, data_dir, config, augmenter, weights)
                seconds = time.perf_counter() - started
                fit_seconds += seconds
                end_epoch(checkpoints, state, phase, trainer, 1, logs, 0.0, seconds, of=1)
            elif not state["phase_done"] and state["phase_epoch"] < phase.epochs:
                offset = index * 10_000  # distinct shuffles per phase
                train_data, steps = inputs.make_train_dataset(
                    data_dir, config, first_epoch=offset + state["phase_epoch"],
                    last_epoch=offset + phase.epochs, augmenter=None if in_model else augmenter,
                )
                tracker = EpochTracker(checkpoints, state, phase, config.early_stopping_patience)
                started = time.perf_counter()
                trainer.fit(
                    train_data, epochs=phase.epochs, initial_epoch=state["phase_epoch"],
                    steps_per_epoch=steps, validation_data=val_data, class_weight=weights,
                    callbacks=[tracker, *callbacks], verbose=0,
                )
                fit_seconds += time.perf_counter() - started
            # phase over: continue from its best weights
            if state["best_weights"]:
                trainer.load_weights(checkpoints.directory / state["best_weights"])
            state["phase_best_epochs"].append(state["best_epoch"])
            last = index + 1 >= len(phases)
            state.update(phase_index=index + 1, phase_epoch=0, phase_done=False, wait=0,
                         best_val_loss=None if not last else state["best_val_loss"],
                         complete=last)
            if not last:
                state["last_weights"] = checkpoints.save_weights(
                    trainer, f"last-{len(state['history']):04d}-phase{index + 1}.weights.h5")
                state["best_weights"] = None
            checkpoints.commit(state)

        export_model(core, config, len(classes), model_dir)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)

    atomic_write_json(model_dir / CLASSES_FILE, classes)
    atomic_write_json(model_dir / HISTORY_FILE, state["history"])
    inputs.save_augmentation_preview(data_dir, config, model_dir / PREVIEW_FILE)
    history = state["history"]
    final_best = state["phase_best_epochs"][-1] if state["phase_best_epochs"] else None
    best_entry = next((h for h in history if h["epoch"] == final_best), None)
    summary = {
        "model": config.model,
        "epochs_run": len(history),
        "best_epoch": final_best,
        "best_val_loss": best_entry.get("val_loss") if best_entry else None,
        "best_val_accuracy": best_entry.get("val_accuracy") if best_entry else None,
        "phase_best_epochs": state["phase_best_epochs"],
        "train_seconds": round(float(state["train_seconds"]), 3),
        "fit_seconds_this_run": round(fit_seconds, 3),
        "resumed_from_epoch": resumed_from,
        "devices": devices["gpus"] or devices["cpus"],
        "replicas": strategy.num_replicas_in_sync,
        "strategy": type(strategy).__name__,
        "mixed_precision": mixed,
        "xla": bool(config.xla),
        "augmentation_in": "model" if in_model else "tf.data",
        "head_training": "features" if uses_feature_head(config) else "epochs",
        "class_weights": {classes[c]: w for c, w in (weights or {}).items()},
        "train_examples": len(train_labels),
        "classes": classes,
        "history": history,
    }
    atomic_write_json(model_dir / TRAINING_SUMMARY_FILE, summary)
    if checkpoint_lock is not None:  # shared root: done, free the space and the folder
        shutil.rmtree(checkpoints.directory, ignore_errors=True)
        checkpoint_lock.close()
    logger.info("trained %s: %d epochs, best epoch %s, %.1fs of training", config.model,
                summary["epochs_run"], final_best, summary["train_seconds"])
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
    data_params = PreprocessParams.from_mapping(data_metadata[META_PARAMS])
    logged = {"data_source": data_metadata[META_SOURCE],
              "data_sha256": data_metadata[META_SHA256],
              **data_params.to_dict(), **params.to_dict()}
    with tracking.tracked_step("train", tracking_params, logged) as run:
        report = read_json(data_dir / DATA_REPORT_JSON) or {}
        digest = tracking.log_dataset_input(data_metadata[META_SOURCE],
                                            (report.get("input") or {}).get("sha256", ""),
                                            report)
        result = train_model(data_dir, model_dir, params,
                             callbacks=[model_logging.MlflowEpochLogger()])
        tracking.log_metrics({k: v for k, v in result.items() if k != "history"})
        tracking.log_artifacts(model_dir / PREVIEW_FILE)
        logged_model = model_logging.log_model(
            model_dir, image_size=params.image_size,
            example_image=records.read_split(data_dir, "test")[0].image,
            name=f"iris-{params.model}-{params.image_size}px-seed{params.seed}")
        parent = tracking.parent_run_id()
        uri = mlflow.get_tracking_uri()
    return {
        "framework": "keras",
        META_TRACKING_URI: tracking.redact_uri(uri),
        META_RUN_ID: run.info.run_id,
        META_PARENT_RUN_ID: parent or "",
        META_MODEL_URI: logged_model.model_uri,
        META_MODEL_ID: logged_model.model_id,
        META_DATASET_DIGEST: digest,
        **{k: v for k, v in result.items() if isinstance(v, (str, int, float, bool))},
    }


__all__ = ["class_weights_for", "config_fingerprint", "describe_devices", "export_model",
           "extract_features", "fit_head_on_features", "run_step", "train_model",
           "uses_feature_head"]
