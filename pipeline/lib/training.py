"""Training's parts: fingerprint and checkpoint folder (with its lock), resumable state and
callbacks, the phases, devices, export and scoring; :mod:`pipeline.steps.train` composes them.

Checkpoints (weights + optimizer state after every epoch) let a killed run started again with
the same model folder, or under ``$IRIS_CHECKPOINT_ROOT`` with the same fingerprint, continue
from its last finished epoch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock
import keras
import numpy as np
import tensorflow as tf

from pipeline.lib import inputs, models, records, stats
from pipeline.lib.backbones import TRANSFER
from pipeline.lib.contract import (
    CHECKPOINT_DIR,
    CHECKPOINT_ROOT_ENV,
    DATA_REPORT_JSON,
    MODEL_FILE,
    SAVED_MODEL_DIR,
)
from pipeline.lib.files import atomic_path, atomic_write_json, read_json, replace_dir
from pipeline.lib.params import TrainParams
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


@contextlib.contextmanager
def checkpoint_folder(model_dir: Path, fingerprint: str) -> Iterator[tuple[Path, bool]]:
    """Where a training keeps its checkpoints, and whether that folder is the shared one.

    A local rerun gets a new model folder (a new kfp.local run folder), so checkpoints inside
    it were never found again after a crash; under ``$IRIS_CHECKPOINT_ROOT/<fingerprint>``,
    shared by runs and keyed by the training fingerprint (config, classes and data), a rerun
    with the same config and data resumes from the last finished epoch. Two identical
    trainings at once must not write one folder: the first holds ``<fingerprint>.lock``
    (``filelock``: released when the block exits, also by an exception, and by the kernel if
    the process dies), a second one finding it held uses its own model folder. Without the
    variable (a cluster pod, whose model folder is what a retried task gets back) the
    checkpoints stay in ``model_dir/checkpoints``.
    """
    root = os.environ.get(CHECKPOINT_ROOT_ENV, "").strip()
    if not root:
        yield model_dir / CHECKPOINT_DIR, False
        return
    Path(root).mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(Path(root) / f"{fingerprint}.lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        logger.warning("checkpoints %s are in use by another training with the same config "
                       "and data: this one checkpoints in its model folder", Path(root) /
                       fingerprint)
        yield model_dir / CHECKPOINT_DIR, False
        return
    try:
        yield Path(root) / fingerprint, True
    finally:
        lock.release()


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
    """Transfer learning: train the head, then optionally fine-tune; the seed CNN: one phase."""
    if config.model != TRANSFER:
        return [Phase("train", config.epochs, config.learning_rate, fine_tune=False)]
    phases = [Phase("head", config.epochs, config.learning_rate, fine_tune=False)]
    if config.fine_tune_epochs > 0:
        phases.append(Phase("fine_tune", config.fine_tune_epochs, config.fine_tune_learning_rate,
                            fine_tune=True))
    return phases



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
                 model_dir: Path, *, mixed_precision: bool) -> keras.Model:
    """Write ``model.keras`` and ``saved_model/`` from an uncompiled float32 model of ``trained``.

    The export carries no optimizer state or mixed-precision policy, so it serves on any CPU.
    A float32 model is exported as a new functional model over its own layers (no second
    backbone is built); only a mixed-precision one is rebuilt in float32 and its weights
    copied. With ``config.tta_views`` it averages over that many flips and turns of each image
    (:func:`models.with_test_time_views`): only here, so training is unchanged and evaluation
    and serving score the same model. Returns the exported model.
    """
    if mixed_precision:
        previous = keras.mixed_precision.global_policy()
        keras.mixed_precision.set_global_policy("float32")
        try:
            clean = models.build_model(dataclasses.replace(config, weights="none"), num_classes)
        finally:
            keras.mixed_precision.set_global_policy(previous)
        clean.set_weights([np.asarray(w) for w in trained.get_weights()])
    else:
        clean = keras.Model(trained.input, trained.output, name=trained.name)
    clean = models.with_test_time_views(clean, config.tta_views, config.image_size)

    with atomic_path(model_dir / MODEL_FILE) as tmp:
        clean.save(tmp)

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".tmp-{SAVED_MODEL_DIR}-", dir=model_dir))
    try:
        write_saved_model(clean, tmp_dir)
        replace_dir(tmp_dir, model_dir / SAVED_MODEL_DIR)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return clean


def write_saved_model(model: keras.Model, directory: Path) -> None:
    """A SavedModel of ``model`` with one endpoint, ``serve`` (also ``serving_default``):
    uint8 images [batch, height, width, 3] in, ``{"probabilities": [batch, classes]}`` out.

    A plain ``tf.Module`` holding the variables and the one traced function, rather than
    ``keras.export.ExportArchive``: the archive also tracks and serializes every layer's
    resources, which took 20 to 27 s of the default run's train step for the same files
    TensorFlow Serving, KServe and ``tf.saved_model.load`` read. ``serve`` is also an
    attribute of the loaded object, as in Keras' export.
    """
    spec = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")

    @tf.function(input_signature=[spec])
    def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": model(tf.cast(images, tf.float32), training=False)}

    module = tf.Module()
    module.model_variables = list(model.variables)
    signature = serve.get_concrete_function()
    module.serve = signature  # not the tf.function: saving one traces the model once more
    tf.saved_model.save(module, str(directory),
                        signatures={"serve": signature, "serving_default": signature})


def compile_model(model: keras.Model, learning_rate: float, config: TrainParams, *,
                  steps_per_execution: int = 1) -> None:
    """Adam on sparse categorical cross-entropy, the one loss every phase trains.

    A head on cached features passes a whole epoch's ``steps_per_execution``: one graph call
    per epoch instead of one per batch, the same weights, about a third less time (its steps
    are microseconds of work and milliseconds of Python each).
    """
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=bool(config.xla),
        steps_per_execution=steps_per_execution,
    )


def set_phase(core: keras.Model, phase: Phase, config: TrainParams) -> None:
    """Freeze the backbone for the head, unfreeze its top layers for fine-tuning."""
    if not models.has_backbone(core):
        return
    if phase.fine_tune:
        count = models.set_fine_tune(core, config.fine_tune_layers)
        logger.info("fine-tuning %d backbone layers at lr %g", count, phase.learning_rate)
    else:
        core.get_layer(models.BACKBONE).trainable = False
