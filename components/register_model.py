"""Component ``register_model``: the registry step, run only when the evaluation gate passed."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model


def register_model(
    trained_model: Input[Model],
    metrics: Input[Metrics],
    evaluation: Input[Artifact],
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_name: str,
    experiment_name: str,
    registered_model_name: str,
    gate_metric: str,
    promotion_margin: float,
    prepared_data: Input[Dataset] = None,
) -> dict:
    """Register the trained model in MLflow: alias ``champion`` if it beats the current one.

    ``prepared_data`` holds the test images the model was scored on, where a champion
    evaluated on other data is scored again. The returned decision (version, alias, the
    comparison, run id) is the task's output.
    """
    from pipeline.lib.params import RegisterParams, TrackingParams
    from pipeline.lib.progress import report_step
    from pipeline.steps import register

    values = locals()
    return report_step(register.run_step, trained_model.metadata, metrics.metadata,
                       evaluation.path, RegisterParams.from_mapping(values),
                       TrackingParams.from_mapping(values),
                       data_dir=prepared_data.path if prepared_data else None)
