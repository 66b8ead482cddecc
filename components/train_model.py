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
    model: str,
    alpha: float,
    weights: str,
    dropout: float,
    epochs: int,
    steps_per_epoch: int,
    learning_rate: float,
    fine_tune_epochs: int,
    fine_tune_learning_rate: float,
    early_stopping_patience: int,
    class_weights: bool,
    mixed_precision: bool,
    xla: bool,
    trained_model: Output[Model],
) -> None:
    """Train with the declared config fields; the model folder is the ``trained_model`` artifact.

    ``model`` is the config field (architecture name), hence the artifact's other name.
    """
    from pipeline.config import PipelineConfig
    from pipeline.steps.train import train_model as fit_model

    params = {k: v for k, v in locals().items() if k in PipelineConfig.field_names()}
    config = PipelineConfig.from_mapping(params)
    result = fit_model(prepared_data.path, trained_model.path, config)
    trained_model.metadata.update(
        framework="keras",
        **{k: v for k, v in result.items() if isinstance(v, (str, int, float, bool))},
    )
