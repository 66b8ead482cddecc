"""Component ``predict_images``: a registered model's labels for new images, and a drift check."""

from kfp.dsl import Dataset, Input, Markdown, Output


def predict_images(
    raw_data: Input[Dataset],
    tracking_uri: str,
    pipeline_run_id: str,
    pipeline_name: str,
    experiment_name: str,
    model_uri: str,
    batch_size: int,
    min_image_side: int,
    max_archive_bytes: int,
    max_archive_entries: int,
    max_entry_compression_ratio: float,
    max_archive_compression_ratio: float,
    max_image_bytes: int,
    predictions: Output[Dataset],
    drift_report: Output[Markdown],
) -> None:
    """Score every image of ``raw_data`` with ``model_uri``; write the predictions CSV into
    ``predictions`` and the drift report (for the KFP UI) into ``drift_report``."""
    from pipeline.lib.params import PredictParams, TrackingParams
    from pipeline.lib.progress import report_step
    from pipeline.steps import predict

    values = locals()
    predictions.metadata.update(report_step(
        predict.run_step, raw_data.path, raw_data.metadata, predictions.path, drift_report.path,
        PredictParams.from_mapping(values), TrackingParams.from_mapping(values)))
