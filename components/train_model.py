"""Component ``train_model``: fit the classifier on the prepared splits into a Model artifact."""

from kfp.dsl import Dataset, Input, Model, Output


def train_model(
    prepared_data: Input[Dataset],
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_name: str,
    experiment_name: str,
    seed: int,
    image_size: int,
    batch_size: int,
    augment_flip: bool,
    augment_rotation: float,
    augment_shift: float,
    augment_zoom: float,
    augment_contrast: float,
    augment_placement: str,
    model: str,
    backbone: str,
    alpha: float,
    weights: str,
    dropout: float,
    pooling: str,
    tta_views: int,
    head_feature_views: int,
    head_c: float,
    epochs: int,
    steps_per_epoch: int,
    learning_rate: float,
    fine_tune_epochs: int,
    fine_tune_learning_rate: float,
    fine_tune_layers: int,
    early_stopping_patience: int,
    class_weights: bool,
    mixed_precision: bool,
    xla: bool,
    deterministic: bool,
    trained_model: Output[Model],
) -> None:
    """Train with the declared config fields inside the step's MLflow run.

    ``model`` is the config field (architecture name), hence the artifact's other name. The
    data parameters arrive in ``prepared_data``'s metadata, so the MLflow parent run gets
    every config field even when download and preprocess were served from the cache. The
    artifact's metadata carries the MLflow ids on to the register step and the summary.
    """
    from pathlib import Path

    from pipeline.config import PipelineConfig
    from pipeline.lib import inputs, model_logging, tracking
    from pipeline.steps.preprocess import load_report
    from pipeline.steps.train import train_model as fit_model

    params = {k: v for k, v in locals().items() if k in PipelineConfig.field_names()}
    config = PipelineConfig.from_mapping(params)
    data = prepared_data.metadata
    data_params = {"data_source": data["source"], "data_sha256": data["sha256"], **data["params"]}
    data_config = PipelineConfig.from_mapping(data_params)  # metadata numbers come back as floats
    params = {**{k: getattr(data_config, k) for k in data_params}, **params}
    uri = tracking.resolve_tracking_uri(tracking_uri, Path.cwd())
    with tracking.step_run("train", tracking_uri=uri, experiment_name=experiment_name,
                           pipeline_run_id=pipeline_run_id, pipeline_name=pipeline_name,
                           params=params) as run:
        report = load_report(prepared_data.path)  # its input.sha256 is the archive's actual one
        tracking.log_dataset_input(data["source"], report["input"].get("sha256", ""), report)
        result = fit_model(prepared_data.path, trained_model.path, config,
                           callbacks=[model_logging.MlflowEpochLogger()])
        tracking.log_metrics({k: v for k, v in result.items() if k != "history"})
        tracking.log_artifacts(Path(trained_model.path) / "augmentation_preview.png")
        examples = inputs.load_examples(prepared_data.path, "test", config.image_size, cache=False)
        images, _ = next(iter(examples.batch(2)))
        model_uri = model_logging.log_model(trained_model.path, input_example=images.numpy())
        parent = tracking.parent_run_id()
    trained_model.metadata.update(
        framework="keras",
        mlflow_tracking_uri=tracking.redact_uri(uri),
        mlflow_run_id=run.info.run_id,
        mlflow_parent_run_id=parent or "",
        mlflow_model_uri=model_uri,
        **{k: v for k, v in result.items() if isinstance(v, (str, int, float, bool))},
    )
