"""Training step: seeded, resumable, GPU-ready training that writes an exportable model.

Outputs in ``model_dir``: ``model.keras`` (float32, loads in safe mode), ``saved_model/``
(serving signature ``serving_default`` taking uint8 images [batch, height, width, 3] of any
size), ``classes.json``, ``history.json``, ``training_summary.json`` (the
:class:`TrainResult` plus the history), ``augmentation_preview.png`` and ``checkpoints/``
(weights + optimizer state after every epoch, so a killed run started again with the same
``model_dir`` continues from its last finished epoch; with ``$IRIS_CHECKPOINT_ROOT`` set they
live there instead, keyed by the training fingerprint, see
:func:`pipeline.lib.training.checkpoint_folder`). The parts live in
:mod:`pipeline.lib.training` and :mod:`pipeline.lib.feature_head`; this module composes them.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import tensorflow as tf

from pipeline.lib import (
    credentials,
    crossval,
    embeddings,
    inputs,
    model_logging,
    models,
    records,
    run_story,
    tracking_log,
    tracking_runs,
)
from pipeline.lib.backbones import model_label
from pipeline.lib.contract import (
    CLASSES_FILE,
    CROSS_VALIDATION_FILE,
    DATA_REPORT_JSON,
    HISTORY_FILE,
    META_DATASET_DIGEST,
    META_EXPERIMENT_ID,
    META_MODEL_ID,
    META_MODEL_URI,
    META_PARAMS,
    META_PARENT_RUN_ID,
    META_RUN_ID,
    META_SERVING_MS,
    META_SHA256,
    META_SOURCE,
    META_TRACKING_URI,
    META_TRAIN_PARAMS,
    OOF_PREDICTIONS_FILE,
    PREVIEW_FILE,
    TRAINING_SUMMARY_FILE,
    VAL_SCORE_PREFIX,
)
from pipeline.lib.feature_cache import FeatureCache
from pipeline.lib.feature_head import FeatureHead, scores_from_features, uses_feature_head
from pipeline.lib.files import atomic_write_json, read_json
from pipeline.lib.params import DownloadParams, PreprocessParams, TrackingParams, TrainParams
from pipeline.lib.preview import save_augmentation_preview
from pipeline.lib.training import (
    Checkpoints,
    EpochCheckpoint,
    Phase,
    ResumableEarlyStopping,
    TrainState,
    augment_in_model,
    checkpoint_folder,
    choose_strategy,
    class_weights_for,
    compile_model,
    config_fingerprint,
    data_identity,
    describe_devices,
    export_model,
    plan_phases,
    set_phase,
    split_scores,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a training produced, flat and JSON-plain (``dataclasses.asdict``).

    The ``model_val_*`` scores are the exported model's (test-time views included) on the
    validation split: what a sweep chooses on. ``backbone_images`` counts the images this run
    pushed through the backbone (its compute floor, see ``bench/default_run.py``).
    """

    model: str
    label: str  # names the trained model, e.g. mobilenet_v2-a0_5-320px
    image_size: int
    classes: tuple[str, ...]
    best_val_loss: float | None
    best_val_accuracy: float | None
    model_val_accuracy: float
    model_val_balanced_accuracy: float
    model_val_macro_f1: float
    fit_seconds: float  # epochs plus feature extraction, over all (resumed) runs
    fit_seconds_this_run: float
    backbone_images: int
    epochs_run: int
    best_epoch: int | None
    phase_best_epochs: tuple[int | None, ...]
    resumed_from_epoch: int | None
    devices: tuple[str, ...]
    replicas: int
    strategy: str
    mixed_precision: bool
    xla: bool
    augmentation_in: str  # "model" or "tf.data"
    head_training: str  # "features" or "images"
    head_feature_rows: int | None
    class_weights: dict[str, float]
    train_examples: int

    #: The numbers to compare runs by (MLflow metrics); the other fields say how it went.
    METRICS = ("best_val_loss", "best_val_accuracy", f"{VAL_SCORE_PREFIX}accuracy",
               f"{VAL_SCORE_PREFIX}balanced_accuracy", f"{VAL_SCORE_PREFIX}macro_f1",
               "fit_seconds", "fit_seconds_this_run", "backbone_images")

    def metrics(self) -> dict[str, float]:
        """The METRICS by their MLflow names: the validation scores as they are (what a sweep
        compares), the rest grouped (``val/best_loss``, ``train/fit_seconds``)."""
        return {name if name.startswith(VAL_SCORE_PREFIX)
                else tracking_log.training_metric_name(name): float(getattr(self, name))
                for name in self.METRICS if getattr(self, name) is not None}

    def bookkeeping(self) -> dict[str, Any]:
        """How the run went (MLflow tags ``train.<name>``)."""
        skip = {*self.METRICS, "model", "label", "image_size", "classes"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


@dataclasses.dataclass
class Training:
    """One training's fixed setup and its mutable progress, shared by the parts below."""

    data_dir: Path
    model_dir: Path
    config: TrainParams
    classes: list[str]
    train_labels: np.ndarray
    checkpoints: Checkpoints
    state: TrainState
    resumed_from: int | None
    devices: dict[str, Any]
    strategy: tf.distribute.Strategy
    in_model: bool
    mixed: bool
    class_weights: dict[int, float] | None
    phases: list[Phase]
    cache_dir: str
    feature_cache: FeatureCache
    fit_seconds: float = 0.0
    feature_rows: int | None = None
    backbone_images: int = 0


def _read_data(data_dir: Path) -> tuple[list[str], np.ndarray]:
    classes = records.load_classes(data_dir)
    train_labels = inputs.read_labels(data_dir, "train")
    if len(train_labels) == 0:
        raise ValueError(f"the training split under {str(data_dir)!r} is empty")
    records.split_files(data_dir, "val")  # fail early and clearly when val is missing
    return classes, train_labels


def _set_up(data_dir: Path, model_dir: Path, config: TrainParams, classes: list[str],
            train_labels: np.ndarray, checkpoints: Checkpoints, cache_dir: str) -> Training:
    """Seeds, devices, strategy and precision, and the state to resume from (if any)."""
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
    if mixed:
        keras.mixed_precision.set_global_policy("mixed_float16")
    logger.info(
        "training %s on %s (%d replica(s), %s); mixed precision %s, XLA %s, augmentation in %s",
        model_label(config.model, config.backbone, config.alpha, config.image_size),
        ", ".join(devices["gpus"] or devices["cpus"]), strategy.num_replicas_in_sync,
        type(strategy).__name__, "on" if mixed else "off", "on" if config.xla else "off",
        "the model" if in_model else "tf.data",
    )
    weights = class_weights_for(train_labels, len(classes)) if config.class_weights else None
    # without a shared cache, one for this run: its features are still computed only once
    feature_cache = FeatureCache.from_env() or FeatureCache(Path(cache_dir) / "features")
    return Training(data_dir, model_dir, config, classes, train_labels, checkpoints, state,
                    resumed_from, devices, strategy, in_model, mixed, weights,
                    plan_phases(config), cache_dir, feature_cache)


def _build(run: Training) -> tuple[keras.Model, inputs.RandomAugment, keras.Model]:
    """The model, the augmenter, and what trains end to end (augmentation inside on GPU)."""
    with run.strategy.scope():
        core = models.build_model(run.config, len(run.classes))
        augmenter = inputs.build_augmenter(run.config)
        if not run.in_model:
            return core, augmenter, core
        image = keras.Input(shape=(None, None, 3), name="image")
        return core, augmenter, keras.Model(image, core(augmenter(image)), name="trainer")


def _phase_data(run: Training, phase: Phase, core: keras.Model, trainer: keras.Model,
                augmenter: inputs.RandomAugment, finished: int
                ) -> tuple[keras.Model, Any, int, Any, FeatureHead | None]:
    """(model, train data, steps, validation data, feature head) of one phase.

    Head on features: the head model on cached backbone features; else the trainer on images.
    """
    config, offset = run.config, run.state.phase_index * 10_000  # distinct shuffles per phase
    if uses_feature_head(config, phase):
        started = time.perf_counter()
        with run.strategy.scope():
            head = FeatureHead.build(core, run.data_dir, config, augmenter,
                                     offset + finished, offset + phase.epochs,
                                     run.feature_cache)
        run.state.train_seconds += time.perf_counter() - started  # committed by the epochs
        run.feature_rows = head.rows
        run.backbone_images += head.computed
        return head.model, head.train, head.steps, head.val, head
    train_data, steps = inputs.make_train_dataset(
        run.data_dir, config, first_epoch=offset + finished, last_epoch=offset + phase.epochs,
        augmenter=None if run.in_model else augmenter, cache_dir=run.cache_dir)
    val_data = inputs.make_eval_dataset(run.data_dir, "val", config, cache_dir=run.cache_dir)
    return trainer, train_data, steps, val_data, None


def _run_phase(run: Training, core: keras.Model, trainer: keras.Model,
               augmenter: inputs.RandomAugment,
               callbacks: Sequence[keras.callbacks.Callback]) -> None:
    """Train the current phase to its end (or early stop), leaving its best weights in place."""
    state, config, checkpoints = run.state, run.config, run.checkpoints
    phase = run.phases[state.phase_index]
    finished = len(state.phase_history(phase))
    set_phase(core, phase, config)
    # at a phase start the saved optimizer state belongs to the previous phase:
    # load the weights before compiling so only the model's part is read
    if state.last_weights and not finished:
        checkpoints.restore(trainer, state.last_weights)
    started = time.perf_counter()
    model, train_data, steps, val_data, head = _phase_data(run, phase, core, trainer,
                                                           augmenter, finished)
    with run.strategy.scope():
        compile_model(model, phase.learning_rate, config,
                      steps_per_execution=steps if head is not None else 1)
        model.optimizer.build(model.trainable_variables)
    if finished:
        checkpoints.restore(model, state.last_weights)
    if not state.stopped and finished < phase.epochs:
        stopping = ([ResumableEarlyStopping(config.early_stopping_patience,
                                            state.phase_history(phase))]
                    if config.early_stopping_patience else [])
        epochs_before = len(state.history)
        model.fit(
            train_data, epochs=phase.epochs, initial_epoch=finished, steps_per_epoch=steps,
            validation_data=val_data, class_weight=run.class_weights,
            callbacks=[*stopping, EpochCheckpoint(checkpoints, state, phase), *callbacks],
            shuffle=False, verbose=0,  # the batches come shuffled per epoch
        )
        if head is None:  # end to end: every epoch's images and validation pass the backbone
            per_epoch = steps * config.batch_size + len(inputs.read_labels(run.data_dir, "val"))
            run.backbone_images += (len(state.history) - epochs_before) * per_epoch
    # phase over: continue from its best epoch's weights
    if state.best_weights:
        checkpoints.restore(model, state.best_weights)
    if head is not None:
        head.fold_into(core)
    run.fit_seconds += time.perf_counter() - started
    state.phase_index += 1
    state.complete = state.phase_index >= len(run.phases)
    state.stopped = False
    state.last_weights = checkpoints.save_weights(
        trainer, f"last-{len(state.history):04d}-end-{phase.name}.weights.h5")
    state.best_weights = None
    checkpoints.commit(state)


def _cross_validate(run: Training, core: keras.Model,
                    augmenter: inputs.RandomAugment) -> crossval.CrossValidation:
    """``cv_folds``: out-of-fold predictions over train + validation, then the fold heads'
    average folded into ``core`` (:mod:`pipeline.lib.crossval`)."""
    started = time.perf_counter()
    features = crossval.pooled_features(core, run.data_dir, run.config, augmenter,
                                        run.feature_cache)
    with run.strategy.scope():
        cv = crossval.cross_validate(features, run.classes, run.config)
    cv.head.fold_into(core)
    run.backbone_images += features.computed
    run.feature_rows = features.training.shape[0] * features.training.shape[1]
    run.fit_seconds += time.perf_counter() - started
    run.state.train_seconds += time.perf_counter() - started
    return cv


def _export(run: Training, core: keras.Model,
            cv: crossval.CrossValidation | None = None) -> dict[str, float]:
    """Export the trained model; its validation scores (with test-time views) by name.

    Cross-validated, the export also trained on the validation images: its out-of-fold
    scores stand in, and the predictions, figures and measured serving cost are written.
    """
    config = run.config
    exported = export_model(core, config, len(run.classes), run.model_dir,
                            mixed_precision=run.mixed)
    if cv is not None:
        scores = cv.scores()
        cv.predictions.write_csv(run.model_dir / OOF_PREDICTIONS_FILE)
        atomic_write_json(run.model_dir / CROSS_VALIDATION_FILE, {
            **cv.summary(),
            META_SERVING_MS: crossval.serving_cost_ms(exported, run.data_dir, config)})
    elif uses_feature_head(config) and run.phases[-1].name == "head":  # backbone not trained
        scores, computed = scores_from_features(core, run.data_dir, config, run.feature_cache)
        run.backbone_images += computed
    else:
        scores = split_scores(exported, run.data_dir, "val", config)
        run.backbone_images += (len(inputs.read_labels(run.data_dir, "val"))
                                * max(1, config.tta_views))
    atomic_write_json(run.model_dir / CLASSES_FILE, run.classes)
    atomic_write_json(run.model_dir / HISTORY_FILE, run.state.history)
    save_augmentation_preview(run.data_dir, config, run.model_dir / PREVIEW_FILE)
    return scores


def _result(run: Training, val_scores: Mapping[str, float]) -> TrainResult:
    config, state = run.config, run.state
    phase_best = [state.best_entry(phase) for phase in run.phases]
    best = phase_best[-1]
    return TrainResult(
        model=config.model,
        label=model_label(config.model, config.backbone, config.alpha, config.image_size),
        image_size=config.image_size,
        classes=tuple(run.classes),
        best_val_loss=best.get("val_loss") if best else None,
        best_val_accuracy=best.get("val_accuracy") if best else None,
        **{f"{VAL_SCORE_PREFIX}{name}": float(value) for name, value in val_scores.items()},
        fit_seconds=round(float(state.train_seconds), 3),
        fit_seconds_this_run=round(run.fit_seconds, 3),
        backbone_images=run.backbone_images,
        epochs_run=len(state.history),
        best_epoch=best["epoch"] if best else None,
        phase_best_epochs=tuple(b["epoch"] if b else None for b in phase_best),
        resumed_from_epoch=run.resumed_from,
        devices=tuple(run.devices["gpus"] or run.devices["cpus"]),
        replicas=run.strategy.num_replicas_in_sync,
        strategy=type(run.strategy).__name__,
        mixed_precision=run.mixed,
        xla=bool(config.xla),
        augmentation_in="model" if run.in_model else "tf.data",
        head_training="features" if uses_feature_head(config) else "images",
        head_feature_rows=run.feature_rows,
        class_weights={run.classes[c]: w for c, w in (run.class_weights or {}).items()},
        train_examples=len(run.train_labels),
    )


def train_model(
    data_dir: str | Path,
    model_dir: str | Path,
    config: TrainParams,
    *,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> TrainResult:
    """Train ``config.model`` on the prepared data in ``data_dir``; export it to ``model_dir``.

    Resumes from the checkpoints of :func:`pipeline.lib.training.checkpoint_folder` when a
    previous run with the same config and data was interrupted. ``callbacks`` (e.g. an MLflow
    logger) are added to every ``fit`` call. The result is also written, with the per-epoch
    history, to ``training_summary.json``.
    """
    data_dir, model_dir = Path(data_dir), Path(model_dir)
    classes, train_labels = _read_data(data_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = config_fingerprint(config, classes, data_identity(data_dir))
    previous_policy = keras.mixed_precision.global_policy()
    # decoded splits over the memory budget are cached here, outside the model artifact
    cache_dir = tempfile.mkdtemp(prefix="iris-input-cache-")
    with checkpoint_folder(model_dir, fingerprint) as (directory, shared):
        checkpoints = Checkpoints(directory, fingerprint)
        try:
            run = _set_up(data_dir, model_dir, config, classes, train_labels, checkpoints,
                          cache_dir)
            core, augmenter, trainer = _build(run)
            if run.state.complete:  # killed after the last phase ended, before the export
                checkpoints.restore(trainer, run.state.last_weights)
            cv = _cross_validate(run, core, augmenter) if config.cv_folds else None
            while cv is None and not run.state.complete:
                _run_phase(run, core, trainer, augmenter, callbacks)
            val_scores = _export(run, core, cv)
        finally:
            keras.mixed_precision.set_global_policy(previous_policy)
            shutil.rmtree(cache_dir, ignore_errors=True)
        result = _result(run, val_scores)
        atomic_write_json(model_dir / TRAINING_SUMMARY_FILE,
                          {**dataclasses.asdict(result), "history": run.state.history})
        if shared:  # shared root: done, free the space and the folder
            shutil.rmtree(checkpoints.directory, ignore_errors=True)
    logger.info("trained %s: %d epochs, best epoch %s, %.1fs of training", result.label,
                result.epochs_run, result.best_epoch, run.state.train_seconds)
    return result


def _log_cross_validation(model_dir: Path) -> dict[str, Any]:
    """With ``cv_folds``: log the cross-validated figures (per-fold scores as steps) and the
    out-of-fold predictions on the train run; return the figures for the metadata."""
    figures = read_json(model_dir / CROSS_VALIDATION_FILE)
    if not figures:
        return {}
    tracking_log.log_metrics({k: v for k, v in figures.items() if not isinstance(v, list)})
    for name, values in figures.items():
        if name.startswith("cv_fold_"):
            for fold, value in enumerate(values):
                tracking_log.log_metrics({name: value}, step=fold)
    tracking_log.log_artifacts(model_dir / OOF_PREDICTIONS_FILE)
    return figures


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
    with tracking_runs.tracked_step("train", tracking_params, logged) as run:
        report = read_json(data_dir / DATA_REPORT_JSON) or {}
        digest = tracking_log.log_dataset_input(data_metadata[META_SOURCE],
                                                (report.get("input") or {}).get("sha256", ""),
                                                report)
        result = train_model(data_dir, model_dir, params,
                             callbacks=[model_logging.MlflowEpochLogger()])
        tracking_log.log_metrics(result.metrics())
        mlflow.set_tags({f"train.{k}": v if isinstance(v, str) else json.dumps(v)
                         for k, v in result.bookkeeping().items()})
        tracking_log.log_artifacts(model_dir / PREVIEW_FILE)
        cross_validation = _log_cross_validation(model_dir)
        # drift check (issue 23): the training images' feature summary, logged with the model
        embeddings.write_reference(model_dir, data_dir, params.image_size, config=params)
        logged_model = model_logging.log_model(
            model_dir, image_size=params.image_size,
            example_image=records.read_split(data_dir, "test", limit=1)[0].image,
            name=run_story.model_name(result.label, params.seed, params.to_dict()))
        parent = tracking_log.parent_run_id()
        uri = mlflow.get_tracking_uri()
    return {
        "framework": "keras",
        META_TRACKING_URI: credentials.redact_uri(uri),
        META_RUN_ID: run.info.run_id,
        META_EXPERIMENT_ID: run.info.experiment_id,
        META_PARENT_RUN_ID: parent or "",
        META_MODEL_URI: logged_model.model_uri,
        META_MODEL_ID: logged_model.model_id,
        META_DATASET_DIGEST: digest,
        META_TRAIN_PARAMS: params.to_dict(),
        **cross_validation,
        **{k: v for k, v in dataclasses.asdict(result).items()
           if isinstance(v, (str, int, float, bool))},
    }


__all__ = ["TrainResult", "run_step", "train_model"]
