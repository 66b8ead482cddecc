"""Component ``register_model``: the registry step, run only when the evaluation gate passed."""

from kfp.dsl import Artifact, Input, Metrics, Model


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
) -> dict:
    """Register the trained model in MLflow: alias ``champion`` if it beats the current one.

    Runs only when the gate passed (``dsl.If``); the verdict and value come from the
    evaluation's Metrics artifact, the model URI from the training step's Model metadata.
    The evaluation folder's per-image predictions (and the data and split digests in the
    Metrics metadata) let the champion be compared image by image. The returned decision
    (version, alias, both metric values, the comparison) is the task's output.
    """
    from pathlib import Path

    from pipeline.config import PipelineConfig
    from pipeline.lib import tracking
    from pipeline.lib.stats import PREDICTIONS_FILE
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
            evidence=registry.Evidence(
                predictions=Path(evaluation.path) / PREDICTIONS_FILE,
                predictions_uri=str(metrics.metadata["predictions_uri"]),
                data_sha256=str(metrics.metadata["data_sha256"]),
                split_digest=str(metrics.metadata["split_digest"]),
            ),
            margin=promotion_margin,
        )
    return {**decision, "mlflow_run_id": run.info.run_id}
