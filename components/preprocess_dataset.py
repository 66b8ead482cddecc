"""Component ``preprocess_dataset``: validated, de-duplicated, split TFRecords plus a report."""

from kfp.dsl import Dataset, Input, Markdown, Output


def preprocess_dataset(
    raw_data: Input[Dataset],
    split_seed: int,
    val_fraction: float,
    test_fraction: float,
    min_images_per_class: int,
    min_image_side: int,
    max_archive_bytes: int,
    max_archive_entries: int,
    max_entry_compression_ratio: float,
    max_archive_compression_ratio: float,
    max_image_bytes: int,
    prepared_data: Output[Dataset],
    data_report: Output[Markdown],
) -> None:
    """Turn the raw data set into TFRecord splits; the Markdown report is what the KFP UI shows."""
    from pipeline.lib.params import PreprocessParams
    from pipeline.lib.progress import report_step
    from pipeline.steps import preprocess

    prepared_data.metadata.update(report_step(
        preprocess.run_step, raw_data.path, raw_data.metadata, prepared_data.path,
        data_report.path, PreprocessParams.from_mapping(locals())))
