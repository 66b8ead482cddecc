"""Component ``download_dataset``: the raw archive or folder as a KFP Dataset artifact."""

from kfp.dsl import Dataset, Output


def download_dataset(data_source: str, data_sha256: str, download_deadline_s: float,
                     download_min_bytes_per_s: float, raw_data: Output[Dataset]) -> None:
    """Fetch ``data_source`` (checked against ``data_sha256`` unless empty) into ``raw_data``."""
    from pipeline.lib.params import DownloadParams
    from pipeline.lib.progress import report_step
    from pipeline.steps import download

    raw_data.metadata.update(report_step(download.run_step, DownloadParams.from_mapping(locals()),
                                         raw_data.path))
