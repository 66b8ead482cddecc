"""Component ``preprocess_dataset``: validated, de-duplicated, split TFRecords plus a report."""

from kfp.dsl import Dataset, Input, Markdown, Output


def preprocess_dataset(
    raw_data: Input[Dataset],
    seed: int,
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
    """Turn the raw data set into the records layout of ``pipeline.lib.records``.

    The Markdown copy of the data report is what the KFP UI renders; the metadata carries
    the data parameters (this step's and the download's), source and digest forward so the
    (uncached) tracking steps can log them even when this step was served from the cache.
    """
    import shutil
    from pathlib import Path

    from pipeline.config import PipelineConfig
    from pipeline.lib.records import REPORT_MD
    from pipeline.steps.preprocess import prepare_dataset

    params = {k: v for k, v in locals().items() if k in PipelineConfig.field_names()}
    config = PipelineConfig.from_mapping(params)
    source = {"source": raw_data.metadata.get("source", ""),
              "sha256": raw_data.metadata.get("sha256", "")}
    raw = Path(raw_data.path) / raw_data.metadata.get("path", "")
    report = prepare_dataset(raw, prepared_data.path, config, source_info=source)
    shutil.copyfile(Path(prepared_data.path) / REPORT_MD, data_report.path)
    prepared_data.metadata.update(
        **source,
        params={**raw_data.metadata.get("params", {}), **params},
        class_counts=report["class_counts"],
        split_sizes=report["split_sizes"],
        files_skipped=report["files_skipped"],
        duplicates_dropped=report["duplicates_dropped"],
    )
