"""Download step: fetch the raw data set from a URL, object store or path, verified, cached."""

from __future__ import annotations

from pathlib import Path

from pipeline.lib.contract import (
    META_PARAMS,
    META_PATH,
    META_SHA256,
    META_SKIPPED,
    META_SOURCE,
)
from pipeline.lib.credentials import redact_uri
from pipeline.lib.fetch import fetch_dataset
from pipeline.lib.params import DownloadParams


def run_step(params: DownloadParams, out_dir: str | Path) -> dict[str, str]:
    """The ``download_dataset`` component's body: fetch, then describe the artifact.

    Returns the artifact metadata: the source and digest (for later steps' lineage, even
    when they are served from the cache), the step's params (the source without any
    credentials), the fetched entry's path inside ``out_dir`` and what a folder source's
    copy left out (links, FIFOs), which the data report lists.
    """
    skipped: list[dict[str, str]] = []
    fetched = fetch_dataset(params.data_source, out_dir, params.data_sha256 or None,
                            deadline_s=params.download_deadline_s,
                            min_bytes_per_s=params.download_min_bytes_per_s, skipped=skipped)
    # reports and MLflow records never hold a password
    recorded = {**params.to_dict(), "data_source": redact_uri(params.data_source)}
    return {META_SOURCE: recorded["data_source"], META_SHA256: params.data_sha256,
            META_PATH: Path(fetched).relative_to(out_dir).as_posix(), META_PARAMS: recorded,
            META_SKIPPED: skipped}


__all__ = ["run_step"]
