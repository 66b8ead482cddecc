"""Remote transfers: HTTP(S) and fsspec attempts, retries, the overall deadline, the stall watch."""

from __future__ import annotations

import logging
import os
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import fsspec
import requests
import urllib3
from tqdm import tqdm

from pipeline.lib.credentials import (
    DATA_PASSWORD_ENV,
    DATA_USERNAME_ENV,
    redact_uri,
    split_credentials,
)

logger = logging.getLogger(__name__)

#: Responses larger than this get a tqdm progress bar; smaller ones a log line.
PROGRESS_MIN_BYTES = 20 * 1024 * 1024
#: Longest wait between two attempts, whatever the backoff doubling reaches.
MAX_BACKOFF_S = 60.0
#: The extra to install for each object-store scheme fsspec needs a plug-in for.
FSSPEC_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: Window of the minimum-throughput check: a transfer that receives fewer than
#: ``min_bytes_per_s`` times this many seconds' worth of bytes in one window has stalled.
STALL_WINDOW_S = 30.0
#: Bytes read per chunk.
CHUNK = 1 << 20


class DownloadError(OSError):
    """A remote source could not be fetched after every retry; the message names the URL."""


class Transient(Exception):  # noqa: N818 (a retry signal, never escapes the fetch)
    """A failure worth retrying (connection error, timeout, 5xx, short read)."""


def source_name(source: str) -> str:
    """A safe file name for the fetched archive: the last path segment of the source."""
    path = urllib.parse.urlparse(source).path if "://" in source else source
    name = Path(urllib.parse.unquote(path).replace("\\", "/")).name
    if name in ("", ".", "..") or name.startswith("."):
        name = "dataset-archive"
    return name


class Transfer:
    """The deadline and stall watch of one fetch, shared by all its attempts.

    ``received`` is called after every chunk: past the overall deadline the fetch fails
    (``DownloadError``, no retry); fewer than ``min_bytes_per_s`` over a window of
    ``window_s`` is a stall, retried like any transient failure.
    """

    def __init__(self, url: str, deadline_s: float, min_bytes_per_s: float,
                 window_s: float) -> None:
        self.url = url
        self.deadline_s = deadline_s
        self.min_bytes_per_s = min_bytes_per_s
        self.window_s = window_s
        self.deadline = time.monotonic() + deadline_s
        self.restart_window()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def check_deadline(self, last: object = None) -> None:
        if self.remaining() <= 0:
            raise DownloadError(
                f"could not fetch {self.url} within download_deadline_s={self.deadline_s:g} s"
                + (f" (last error: {last})" if last else "")
            )

    def restart_window(self) -> None:
        self.window_start = time.monotonic()
        self.window_bytes = 0

    def received(self, n: int) -> None:
        self.check_deadline()
        self.window_bytes += n
        elapsed = time.monotonic() - self.window_start
        if self.min_bytes_per_s <= 0 or elapsed < self.window_s:
            return
        if self.window_bytes < self.min_bytes_per_s * elapsed:
            raise Transient(
                f"transfer stalled: {self.window_bytes} bytes in {elapsed:.1f} s, below "
                f"download_min_bytes_per_s={self.min_bytes_per_s:g}"
            )
        self.restart_window()


def http_auth(source: str) -> tuple[str, tuple[str, str] | None]:
    """(URL without userinfo, basic auth) for an http(s) source.

    Credentials come from the URL if it has them (library use; the CLI moves them out
    before they become a parameter), else from ``IRIS_DATA_USERNAME``/``IRIS_DATA_PASSWORD``
    (exported locally, from the ``--data-secret`` Secret on a cluster).
    """
    url, user, password = split_credentials(source)
    if user is None:
        user = os.environ.get(DATA_USERNAME_ENV) or None
        password = os.environ.get(DATA_PASSWORD_ENV) or None
    if user is None and password is None:
        return url, None
    return url, (user or "", password or "")


def with_retries(url: str, attempt_fn: Callable[[], Any], retries: int, backoff_s: float,
                  transfer: Transfer) -> Any:
    """Run ``attempt_fn`` up to ``retries + 1`` times, waiting backoff_s * 2**i in between.

    No attempt starts, and no wait runs, past the transfer's overall deadline. Kept
    hand-written: urllib3's ``Retry`` covers connection errors and status codes but not a
    body that stalls or breaks mid-stream, nor fsspec sources, and knows no overall deadline.
    """
    last: BaseException | None = None
    for attempt in range(retries + 1):
        transfer.check_deadline(last)
        transfer.restart_window()
        try:
            return attempt_fn()
        except Transient as exc:
            last = exc.__cause__ or exc
            if attempt == retries:
                break
            wait = min(backoff_s * 2**attempt, MAX_BACKOFF_S, max(transfer.remaining(), 0.0))
            logger.warning("fetching %s failed (%s); retry %d/%d in %.2fs", url, last,
                           attempt + 1, retries, wait)
            time.sleep(wait)
    raise DownloadError(f"could not fetch {url} after {retries + 1} attempt(s): {last}")


def http_attempt(url: str, tmp: IO[bytes], timeout_s: float, transfer: Transfer,
                  auth: tuple[str, str] | None = None,
                  content_types: list[str] | None = None) -> None:
    """One GET into ``tmp`` (truncated first); transient failures raise ``Transient``.

    Chunks are read as they arrive (``read1``), not in fixed 1 MiB blocks, so a server
    trickling bytes is seen by the deadline and stall checks instead of blocking a read.
    ``requests`` drops ``auth`` on a redirect to another host, so credentials stay with the
    server they are for. The response's Content-Type is appended to ``content_types``.
    """
    tmp.seek(0)
    tmp.truncate()
    timeout = max(min(timeout_s, transfer.remaining()), 0.001)
    try:
        with requests.get(url, stream=True, timeout=timeout, auth=auth,
                          headers={"User-Agent": "iris-image-pipeline"}) as response:
            status = response.status_code
            if status >= 500 or status in (408, 429):
                raise Transient(f"HTTP {status} {response.reason}")
            if status in (401, 403):
                given = "were refused" if auth else "are needed"
                raise DownloadError(
                    f"could not fetch {url}: HTTP {status} {response.reason}: credentials "
                    f"{given} (set {DATA_USERNAME_ENV}/{DATA_PASSWORD_ENV}; on a cluster, "
                    "the Secret named by --data-secret)")
            if status >= 400:
                raise DownloadError(f"could not fetch {url}: HTTP {status} {response.reason}")
            if content_types is not None:
                content_types.append(response.headers.get("Content-Type", ""))
            total = int(response.headers.get("Content-Length") or 0)
            received = 0
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=source_name(url),
                      disable=total < PROGRESS_MIN_BYTES or None) as bar:
                while chunk := response.raw.read1(CHUNK, decode_content=True):
                    tmp.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    transfer.received(len(chunk))
            if total and received != total:
                raise Transient(f"short read: {received} of {total} bytes")
            logger.info("downloaded %s (%d bytes)", url, received)
    except requests.TooManyRedirects as exc:
        raise DownloadError(f"could not fetch {url}: too many redirects ({exc})") from exc
    except (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError) as exc:
        raise Transient(str(exc)) from exc


def fsspec_attempt(url: str, tmp: IO[bytes], timeout_s: float, transfer: Transfer) -> None:
    """One copy of an object-store (or other fsspec) URL into ``tmp``."""
    tmp.seek(0)
    tmp.truncate()
    del timeout_s  # each plug-in (s3fs, gcsfs) applies its own timeouts and retries
    try:
        with fsspec.open(url, "rb") as src:
            while chunk := src.read(CHUNK):
                tmp.write(chunk)
                transfer.received(len(chunk))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"data source not found: {redact_uri(url)}") from exc
    except PermissionError as exc:
        raise DownloadError(f"could not fetch {redact_uri(url)}: access denied ({exc})") from exc
    except (OSError, TimeoutError) as exc:
        raise Transient(str(exc)) from exc


def check_fsspec(url: str) -> None:
    """Fail early, naming the extra to install, when the URL's fsspec plug-in is missing."""
    scheme = urllib.parse.urlparse(url).scheme.lower()
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        extra = FSSPEC_EXTRAS.get(scheme)
        hint = (f'pip install "iris-image-pipeline[{extra}]"' if extra
                else "install the fsspec plug-in for it")
        raise ImportError(
            f"reading {scheme}:// URLs needs an extra package: {hint} ({exc})"
        ) from exc
    except ValueError as exc:
        raise ValueError(
            f"unsupported data source scheme {scheme!r} in {redact_uri(url)!r}") from exc
