"""Component ``register_model``: the registry step, run only when the evaluation gate passed."""

from kfp.dsl import Input, Metrics, Model


def register_model(
    trained_model: Input[Model],
    metrics: Input[Metrics],
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_name: str,
    experiment_name: str,
    registered_model_name: str,
    gate_metric: str,
) -> dict:
    """Register the trained model in MLflow: alias ``champion`` if it beats the current one.

    Runs only when the gate passed (``dsl.If``); the verdict and value come from the
    evaluation's Metrics artifact, the model URI from the training step's Model metadata.
    The returned decision (version, alias, both metric values) is the task's output.
    """
    from pathlib import Path

    from pipeline.config import PipelineConfig
    from pipeline.lib import tracking
    from pipeline.steps import register as registry

    params = {k: v for k, v in locals().items() if k in PipelineConfig.field_names()}
    uri = tracking.resolve_tracking_uri(tracking_uri, Path.cwd())
    with tracking.step_run("register", tracking_uri=uri, experiment_name=experiment_name,
                           pipeline_run_id=pipeline_run_id, pipeline_name=pipeline_name,
                           params=params) as run:
        decision = registry.register_model(
            trained_model.metadata["mlflow_model_uri"],
            name=registered_model_name,
            metric_name=gate_metric,
            metric_value=float(metrics.metadata[gate_metric]),
            gate_passed=bool(metrics.metadata["gate_passed"]),
        )
    return {**decision, "mlflow_run_id": run.info.run_id}
