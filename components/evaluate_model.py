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
    model: str,
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
    Test metrics and the majority baseline also go to the MLflow parent run, where pipeline
    runs are compared.
    """
    import shutil
    from pathlib import Path

    from pipeline.config import PipelineConfig
    from pipeline.lib import tracking
    from pipeline.steps.evaluate import evaluate_model as score_model

    params = {k: v for k, v in locals().items() if k in PipelineConfig.field_names()}
    config = PipelineConfig.from_mapping(params)
    uri = tracking.resolve_tracking_uri(tracking_uri, Path.cwd())
    with tracking.step_run("evaluate", tracking_uri=uri, experiment_name=experiment_name,
                           pipeline_run_id=pipeline_run_id, pipeline_name=pipeline_name,
                           params=params) as run:
        result = score_model(trained_model.path, prepared_data.path, evaluation.path, config)
        # linked to the trained model and its data set: the logged model's page shows them
        digest = trained_model.metadata.get("mlflow_dataset_digest")
        tracking.log_metrics(result, on_parent=True,
                             model_id=trained_model.metadata.get("mlflow_model_id"),
                             dataset=(tracking.DATASET_NAME, digest) if digest else None)
        tracking.log_artifacts(evaluation.path)
    scalars = {**result, **{f"majority_baseline_{k}": v for k, v in result["baseline"].items()}}
    for name, value in scalars.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics.log_metric(name, float(value))
    matrix = [[int(n) for n in row] for row in result["confusion_matrix"]]
    classification_metrics.log_confusion_matrix([str(c) for c in result["classes"]], matrix)
    shutil.copyfile(Path(evaluation.path) / "report.html", report.path)
    metrics.metadata.update(
        gate_metric=str(result["gate_metric"]), gate_passed=bool(result["gate_passed"]),
        mlflow_run_id=run.info.run_id,
    )
    return bool(result["gate_passed"])
