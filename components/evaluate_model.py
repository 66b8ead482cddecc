"""Component ``evaluate_model``: test-split metrics, confusion matrix, HTML report, gate verdict."""

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output


def evaluate_model(
    trained_model: Input[Model],
    prepared_data: Input[Dataset],
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_name: str,
    experiment_name: str,
    image_size: int,
    batch_size: int,
    gate_metric: str,
    gate_threshold: float,
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
) -> bool:
    """Score the model on the held-out test split; return whether it passes the gate.

    The verdict is the task's only parameter output (``Output``): kfp.local resolves a
    ``dsl.If`` on that name but silently treats a named output as False (see pipeline/dag.py).
    """
    from pipeline.lib.contract import META_GATE_METRIC, META_GATE_PASSED, META_RUN_ID
    from pipeline.lib.params import EvaluateParams, TrackingParams
    from pipeline.steps import evaluate

    values = locals()
    result = evaluate.run_step(trained_model.path, prepared_data.path, evaluation.path,
                               report.path, EvaluateParams.from_mapping(values),
                               TrackingParams.from_mapping(values))
    for name, value in result.scalars().items():
        metrics.log_metric(name, value)
    metrics.metadata.update({META_GATE_METRIC: gate_metric, META_GATE_PASSED: result.gate_passed,
                             META_RUN_ID: result.mlflow_run_id})
    classification_metrics.log_confusion_matrix(result.metrics["classes"],
                                                result.metrics["confusion_matrix"])
    return result.gate_passed
