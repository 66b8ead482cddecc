"""The DAG: download -> preprocess -> train -> evaluate -> register (only if the gate passes).

With a sweep (``pipeline/sweep.py``) train is a ``dsl.ParallelFor`` over the trials, and
``select_model`` hands the trial with the best validation score on to evaluate.

Its parameters are ``PipelineConfig``'s fields (same names, types and defaults; a test keeps
them equal) plus ``tracking_uri``. How each task runs (image, resources, cache, retries,
secrets) is in ``pipeline/tasks.py``.
"""

from collections.abc import Mapping
from typing import Any, NamedTuple

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Markdown

from pipeline.config import PipelineConfig, load_images
from pipeline.lib.credentials import (
    DATA_PASSWORD_ENV,
    DATA_USERNAME_ENV,
    MLFLOW_CONFIG_MAP,
    has_credentials,
    redact_uri,
)
from pipeline.stepspec import STEP_SPECS, Resources, outputs_type
from pipeline.sweep import Sweep
from pipeline.tasks import (
    DOWNLOAD_RETRIES,
    MLFLOW_CONFIG_MAP_KEYS,
    MLFLOW_SECRET_KEYS,
    TRACKING_URI_PARAM,
    TaskFactory,
)

PIPELINE_NAME = "iris-image-pipeline"
DESCRIPTION = ("Download, validate and split the iris image set, train a classifier, evaluate it "
               "on the held-out test split and register it in MLflow when it passes the gate.")
D = PipelineConfig()  # the defaults of every parameter


#: The training DAG's steps (select_model only in a sweep).
TRAINING_STEPS = tuple(STEP_SPECS)
#: What a run hands back, the steps' declared outputs (the local runner verifies and
#: summarises them).
PipelineOutputs = outputs_type("PipelineOutputs", TRAINING_STEPS)


def create_pipeline(images: Mapping[str, str] | None = None, *,
                    download_retries: int = DOWNLOAD_RETRIES, mlflow_secret: str | None = None,
                    mlflow_config_map: str | None = MLFLOW_CONFIG_MAP,
                    data_secret: str | None = None, sweep: Sweep | None = None) -> Any:
    """The pipeline as a KFP graph component, ready to compile or run with kfp.local.

    Each task receives the parameters its component declares, matched by name (TaskFactory).
    Secrets (``mlflow_secret``, ``data_secret``) are compiled in by name, never by value.
    A ``sweep``'s trials are compiled in as the loop's items; each trial's values replace
    the pipeline parameters of the same names in its train task.
    """
    task = TaskFactory(PIPELINE_NAME, images, download_retries=download_retries,
                       mlflow_secret=mlflow_secret, mlflow_config_map=mlflow_config_map,
                       data_secret=data_secret)

    @dsl.pipeline(name=PIPELINE_NAME, description=DESCRIPTION)
    def iris_image_pipeline(
        # data
        data_source: str = D.data_source, data_sha256: str = D.data_sha256, seed: int = D.seed,
        split_seed: int = D.split_seed,
        val_fraction: float = D.val_fraction, test_fraction: float = D.test_fraction,
        min_images_per_class: int = D.min_images_per_class,
        min_image_side: int = D.min_image_side, max_archive_bytes: int = D.max_archive_bytes,
        max_archive_entries: int = D.max_archive_entries,
        max_entry_compression_ratio: float = D.max_entry_compression_ratio,
        max_archive_compression_ratio: float = D.max_archive_compression_ratio,
        max_image_bytes: int = D.max_image_bytes,
        download_deadline_s: float = D.download_deadline_s,
        download_min_bytes_per_s: float = D.download_min_bytes_per_s,
        # input pipeline and augmentation
        image_size: int = D.image_size, batch_size: int = D.batch_size,
        augment_flip: bool = D.augment_flip, augment_rotation: float = D.augment_rotation,
        augment_shift: float = D.augment_shift, augment_zoom: float = D.augment_zoom,
        augment_contrast: float = D.augment_contrast,
        augment_placement: str = D.augment_placement,
        # model
        model: str = D.model, backbone: str = D.backbone, alpha: float = D.alpha,
        weights: str = D.weights,
        weights_sha256: str = D.weights_sha256, dropout: float = D.dropout,
        pooling: str = D.pooling,
        # training
        epochs: int = D.epochs, steps_per_epoch: int = D.steps_per_epoch,
        learning_rate: float = D.learning_rate, fine_tune_epochs: int = D.fine_tune_epochs,
        fine_tune_learning_rate: float = D.fine_tune_learning_rate,
        fine_tune_layers: int = D.fine_tune_layers,
        early_stopping_patience: int = D.early_stopping_patience,
        head_feature_views: int = D.head_feature_views, head_c: float = D.head_c,
        cv_folds: int = D.cv_folds, sweep_choice: str = D.sweep_choice,
        class_weights: bool = D.class_weights, mixed_precision: bool = D.mixed_precision,
        xla: bool = D.xla, deterministic: bool = D.deterministic,
        tta_views: int = D.tta_views,
        # evaluation, registry, tracking
        gate_metric: str = D.gate_metric, gate_threshold: float = D.gate_threshold,
        gate_on: str = D.gate_on, promotion_margin: float = D.promotion_margin,
        registered_model_name: str = D.registered_model_name,
        experiment_name: str = D.experiment_name, tracking_uri: str = "",
    ) -> PipelineOutputs:
        params = locals()
        download = task("download_dataset", params)
        prepare = task("preprocess_dataset", params, raw_data=download.outputs["raw_data"])
        prepared = prepare.outputs["prepared_data"]
        if sweep is None:
            trained = task("train_model", params,
                           prepared_data=prepared).outputs["trained_model"]
        else:
            with dsl.ParallelFor(list(sweep.trials), parallelism=sweep.parallelism) as trial:
                trials = task("train_model", {**params, **trial_values(trial, sweep.keys)},
                              prepared_data=prepared)
            trained = task("select_model", params, trained_models=dsl.Collected(
                trials.outputs["trained_model"])).outputs["selected_model"]
        evaluate = task("evaluate_model", params, trained_model=trained, prepared_data=prepared)
        # The verdict is evaluate's single parameter output, "Output": kfp.local (2.17)
        # cannot resolve a condition on a *named* output and silently skips the branch.
        with dsl.If(evaluate.outputs["Output"] == True, name="gate-passed"):  # noqa: E712
            task("register_model", params, trained_model=trained, prepared_data=prepared,
                 metrics=evaluate.outputs["metrics"], evaluation=evaluate.outputs["evaluation"])
        produced = {**download.outputs, **prepare.outputs, **evaluate.outputs,
                    "trained_model": trained, "gate_passed": evaluate.outputs["Output"]}
        return PipelineOutputs(**{name: produced[name] for name in PipelineOutputs._fields})

    return iris_image_pipeline


#: KFP's parameter type names of the config's field types.
_KFP_TYPES = {str: "String", int: "Integer", float: "Float", bool: "Boolean"}


def trial_values(trial: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """The loop item's value of each swept key, typed as its config field.

    KFP types every key of a compiled-in list of dicts by the first dict's *first* value
    (kfp 2.17 ``for_loop._get_first_element_type``), so ``image_size`` would be checked as
    a string when ``backbone`` comes first. Each value is typed by its field instead; at run
    time the item's JSON keeps the value's own type.
    """
    types = PipelineConfig.field_types()
    values = {}
    for key in keys:
        value = getattr(trial, key)
        value.channel_type = _KFP_TYPES[types[key]]
        values[key] = value
    return values


def refuse_credentials(config: PipelineConfig, tracking_uri: str = "") -> None:
    """``ValueError`` when the data source or tracking URI carries ``user:password@``.

    Parameter values are written down wherever the pipeline goes (the compiled YAML's
    defaults, KFP's run records, kfp.local's executor input dumps and cache), so credentials
    reach the steps through the environment instead, filled from a Secret on a cluster.
    """
    carriers = (("data_source", config.data_source, (DATA_USERNAME_ENV, DATA_PASSWORD_ENV),
                 "--data-secret"),
                (TRACKING_URI_PARAM, tracking_uri, MLFLOW_SECRET_KEYS, "--mlflow-secret"))
    for name, uri, env, flag in carriers:
        if has_credentials(uri):
            raise ValueError(
                f"{name} {redact_uri(uri)} carries credentials, which would be recorded with "
                "the pipeline's parameters: remove them from the URL and use a Kubernetes "
                f"Secret with keys {' / '.join(env)}, named with {flag} (with --local, export "
                "them instead)")


def pipeline_arguments(config: PipelineConfig, tracking_uri: str = "") -> dict[str, Any]:
    """The run's parameter values: every config field plus ``tracking_uri``; never credentials
    (:func:`refuse_credentials`)."""
    refuse_credentials(config, tracking_uri)
    return {**config.to_dict(), TRACKING_URI_PARAM: tracking_uri}


# ----------------------------------------------------------------------------------------
# The second pipeline: batch predictions with a registered model, and a drift check
# ----------------------------------------------------------------------------------------
PREDICT_PIPELINE_NAME = "iris-batch-predictions"
PREDICT_DESCRIPTION = ("Download new iris photos, validate them, label them with a registered "
                       "model (default: the champion) and check them for drift against the "
                       "model's training images.")
DEFAULT_MODEL_URI = f"models:/{D.registered_model_name}@champion"
#: The predict task's settings, kept here until tasks.py describes every step's.
PREDICT_STEP = "predict_images"
PREDICT_RESOURCES = Resources("1", "2", "2Gi", "6Gi")
#: Config fields the predict pipeline takes as parameters (beside model_uri, tracking_uri).
PREDICT_FIELDS = ("data_source", "data_sha256", "download_deadline_s",
                  "download_min_bytes_per_s", "batch_size", "min_image_side",
                  "max_archive_bytes", "max_archive_entries", "max_entry_compression_ratio",
                  "max_archive_compression_ratio", "max_image_bytes", "experiment_name")


class PredictOutputs(NamedTuple):
    """What a batch-prediction run hands back."""

    raw_data: Dataset
    predictions: Dataset
    drift_report: Markdown


def create_predict_pipeline(images: Mapping[str, str] | None = None, *,
                            download_retries: int = DOWNLOAD_RETRIES,
                            mlflow_secret: str | None = None,
                            mlflow_config_map: str | None = MLFLOW_CONFIG_MAP,
                            data_secret: str | None = None) -> Any:
    """The batch-prediction pipeline: the training pipeline's download step, then
    ``predict_images`` (uncached: each run logs its own MLflow run and reads the registry's
    alias as it is now)."""
    from components.predict_images import predict_images

    task = TaskFactory(PREDICT_PIPELINE_NAME, images, download_retries=download_retries,
                       mlflow_secret=mlflow_secret, mlflow_config_map=mlflow_config_map,
                       data_secret=data_secret)
    predict_component = dsl.component(
        predict_images, base_image=(dict(images) if images is not None else load_images())["cpu"],
        install_kfp_package=False)

    @dsl.pipeline(name=PREDICT_PIPELINE_NAME, description=PREDICT_DESCRIPTION)
    def iris_batch_predictions(
        data_source: str = "", data_sha256: str = "",
        download_deadline_s: float = D.download_deadline_s,
        download_min_bytes_per_s: float = D.download_min_bytes_per_s,
        model_uri: str = DEFAULT_MODEL_URI, batch_size: int = D.batch_size,
        min_image_side: int = D.min_image_side, max_archive_bytes: int = D.max_archive_bytes,
        max_archive_entries: int = D.max_archive_entries,
        max_entry_compression_ratio: float = D.max_entry_compression_ratio,
        max_archive_compression_ratio: float = D.max_archive_compression_ratio,
        max_image_bytes: int = D.max_image_bytes,
        experiment_name: str = D.experiment_name, tracking_uri: str = "",
    ) -> PredictOutputs:
        params = locals()
        download = task("download_dataset", params)
        predict = predict_component(
            raw_data=download.outputs["raw_data"], pipeline_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
            pipeline_name=PREDICT_PIPELINE_NAME,
            **{name: params[name] for name in predict_component.component_spec.inputs
               if name in params})
        _configure_predict_task(predict, mlflow_secret, mlflow_config_map)
        return PredictOutputs(raw_data=download.outputs["raw_data"],
                              predictions=predict.outputs["predictions"],
                              drift_report=predict.outputs["drift_report"])

    return iris_batch_predictions


def _configure_predict_task(task: dsl.PipelineTask, mlflow_secret: str | None,
                            mlflow_config_map: str | None) -> None:
    resources = PREDICT_RESOURCES
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    task.set_caching_options(enable_caching=False)
    task.set_env_variable("PYTHONUNBUFFERED", "1")
    if mlflow_config_map:
        kubernetes.use_config_map_as_env(task, mlflow_config_map,
                                         {key: key for key in MLFLOW_CONFIG_MAP_KEYS},
                                         optional=True)
    if mlflow_secret:
        kubernetes.use_secret_as_env(task, mlflow_secret,
                                     {key: key for key in MLFLOW_SECRET_KEYS})


def predict_arguments(config: PipelineConfig, model_uri: str = DEFAULT_MODEL_URI,
                      tracking_uri: str = "") -> dict[str, Any]:
    """The batch-prediction run's parameter values (never credentials)."""
    refuse_credentials(config, tracking_uri)
    values = config.to_dict()
    return {**{name: values[name] for name in PREDICT_FIELDS}, "model_uri": model_uri,
            TRACKING_URI_PARAM: tracking_uri}


__all__ = [
    "DEFAULT_MODEL_URI",
    "DESCRIPTION",
    "PIPELINE_NAME",
    "PREDICT_PIPELINE_NAME",
    "TRAINING_STEPS",
    "PipelineOutputs",
    "PredictOutputs",
    "create_pipeline",
    "create_predict_pipeline",
    "pipeline_arguments",
    "predict_arguments",
    "refuse_credentials",
]
