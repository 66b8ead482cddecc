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
    weights_sha256: str,
    dropout: float,
    pooling: str,
    tta_views: int,
    head_feature_views: int,
    head_c: float,
    cv_folds: int,
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
    """Train inside the step's MLflow run; ``model`` is the architecture's name (config field).

    The artifact's metadata carries the MLflow ids on to the register step and the summary.
    """
    from pipeline.lib.params import TrackingParams, TrainParams
    from pipeline.lib.progress import report_step
    from pipeline.steps import train

    values = locals()
    trained_model.metadata.update(report_step(
        train.run_step, prepared_data.path, prepared_data.metadata, trained_model.path,
        TrainParams.from_mapping(values), TrackingParams.from_mapping(values)))
