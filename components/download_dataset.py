"""Component ``download_dataset``: the raw archive or folder as a KFP Dataset artifact."""

from kfp.dsl import Dataset, Output


def download_dataset(data_source: str, data_sha256: str, raw_data: Output[Dataset]) -> None:
    """Fetch ``data_source`` (checked against ``data_sha256`` unless empty) into ``raw_data``.

    The artifact is a folder holding the fetched archive or class-folder tree; its metadata
    names the entry (``path``) so the preprocess step need not guess, and carries the source
    and digest so later steps can log the data set's lineage without re-reading it.
    """
    from pathlib import Path

    from pipeline.lib.credentials import redact_uri
    from pipeline.steps.download import fetch_dataset

    fetched = fetch_dataset(data_source, raw_data.path, data_sha256 or None)
    raw_data.metadata.update(
        source=redact_uri(data_source),  # reports and MLflow records never hold a password
        sha256=data_sha256,
        path=Path(fetched).relative_to(raw_data.path).as_posix(),
    )
