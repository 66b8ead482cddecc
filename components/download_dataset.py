"""Component ``download_dataset``: the raw archive or folder as a KFP Dataset artifact."""

from kfp.dsl import Dataset, Output


def download_dataset(data_source: str, data_sha256: str, download_deadline_s: float,
                     download_min_bytes_per_s: float, raw_data: Output[Dataset]) -> None:
    """Fetch ``data_source`` (checked against ``data_sha256`` unless empty) into ``raw_data``.

    A remote fetch gives up after ``download_deadline_s`` in all and retries a transfer
    slower than ``download_min_bytes_per_s``.

    The artifact is a folder holding the fetched archive or class-folder tree; its metadata
    names the entry (``path``) so the preprocess step need not guess, and carries the source,
    digest and download settings (``params``) so later steps can log the data set's lineage
    and every config field without re-reading it.
    """
    from pathlib import Path

    from pipeline.steps.download import fetch_dataset

    fetched = fetch_dataset(data_source, raw_data.path, data_sha256 or None,
                            deadline_s=download_deadline_s,
                            min_bytes_per_s=download_min_bytes_per_s)
    raw_data.metadata.update(
        source=data_source,
        sha256=data_sha256,
        path=Path(fetched).relative_to(raw_data.path).as_posix(),
        params={"download_deadline_s": download_deadline_s,
                "download_min_bytes_per_s": download_min_bytes_per_s},
    )
