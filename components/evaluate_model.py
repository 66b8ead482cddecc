"""Component ``evaluate_model``: test-split metrics, confusion matrix, HTML report, gate verdict."""

from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)


def evaluate_model(
    trained_model: Input[Model],
    prepared_data: Input[Dataset],
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_name: str,
    experiment_name: str,
    batch_size: int,
    gate_metric: str,
    gate_threshold: float,
    gate_on: str,
    metrics: Output[Metrics],
    classification_metrics: Output[ClassificationMetrics],
    report: Output[HTML],
    evaluation: Output[Artifact],
    model_card: Output[Markdown],
) -> bool:
    """Score the model on the held-out test split; return whether it passes the gate.

    The verdict is the task's only parameter output (``Output``): kfp.local resolves a
    ``dsl.If`` on that name but silently treats a named output as False (see pipeline/dag.py).
    """
    from pipeline.lib.params import EvaluateParams, TrackingParams
    from pipeline.lib.progress import report_step
    from pipeline.steps import evaluate

    values = locals()
    result = report_step(evaluate.run_step, trained_model.path, trained_model.metadata,
                         prepared_data.path, evaluation.path, report.path,
                         EvaluateParams.from_mapping(values), TrackingParams.from_mapping(values),
                         card_path=model_card.path)
    for name, value in result.scalars().items():
        metrics.log_metric(name, value)
    metrics.metadata.update(result.metadata())
    classification_metrics.log_confusion_matrix(result.metrics["classes"],
                                                result.metrics["confusion_matrix"])
    return result.gate_passed
