"""Download step: fetch the raw data set from a URL, object store or path, verified, cached."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import fsspec
import requests
import urllib3
from tqdm import tqdm

from pipeline.lib.contract import (
    META_PARAMS,
    META_PATH,
    META_SHA256,
    META_SKIPPED,
    META_SOURCE,
)
from pipeline.lib.credentials import (
    DATA_PASSWORD_ENV,
    DATA_USERNAME_ENV,
    HTTP_SCHEMES,
    redact_uri,
    split_credentials,
)
from pipeline.lib.files import atomic_writer, file_sha256, normalize_sha256, replace_dir
from pipeline.lib.interrupts import sigterm_exits
from pipeline.lib.params import DownloadParams

logger = logging.getLogger(__name__)

#: Defaults of a direct call (the pipeline passes its config's download_* values).
DEFAULT_DEADLINE_S = 1800.0
DEFAULT_MIN_BYTES_PER_S = 1024.0

#: Responses larger than this get a tqdm progress bar; smaller ones a log line.
PROGRESS_MIN_BYTES = 20 * 1024 * 1024
#: Longest wait between two attempts, whatever the backoff doubling reaches.
MAX_BACKOFF_S = 60.0
#: The extra to install for each object-store scheme fsspec needs a plug-in for.
FSSPEC_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: Window of the minimum-throughput check: a transfer that receives fewer than
#: ``min_bytes_per_s`` times this many seconds' worth of bytes in one window has stalled.
STALL_WINDOW_S = 30.0
#: ``IRIS_CACHE_DIR`` overrides the default cache location (else ``$XDG_CACHE_HOME`` or ~/.cache).
CACHE_ENV = "IRIS_CACHE_DIR"

_CHUNK = 1 << 20
#: Reasons a data folder's entry is not copied (the data report groups skipped files by them).
SKIP_LINK = "symbolic link"
SKIP_SPECIAL = "not a regular file"


#: Appended to every failed remote fetch: the README's first command on a machine without
#: network fails here, and the fix is a flag away.
LOCAL_COPY_HINT = (
    "to use a local copy instead (archive or folder of class folders), pass --data PATH "
    "or set IRIS_DATA_SOURCE=PATH"
)


class DownloadError(OSError):
    """A remote source could not be fetched after every retry; the message names the URL."""


class _Transient(Exception):  # noqa: N818 (internal signal, never escapes)
    """A failure worth retrying (connection error, timeout, 5xx, short read)."""


def default_cache_dir() -> Path:
    """``$IRIS_CACHE_DIR``, else ``$XDG_CACHE_HOME/iris-image-pipeline``, else ~/.cache/..."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "iris-image-pipeline"


def _source_name(source: str) -> str:
    """A safe file name for the fetched archive: the last path segment of the source."""
    path = urllib.parse.urlparse(source).path if "://" in source else source
    name = Path(urllib.parse.unquote(path).replace("\\", "/")).name
    if name in ("", ".", "..") or name.startswith("."):
        name = "dataset-archive"
    return name


def _atomic_file(final: Path) -> contextlib.AbstractContextManager[IO[bytes]]:
    """A ``.part`` file next to ``final``, renamed onto it only if the block succeeds."""
    return atomic_writer(final, "w+b", suffix=".part")


class _Transfer:
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
            raise _Transient(
                f"transfer stalled: {self.window_bytes} bytes in {elapsed:.1f} s, below "
                f"download_min_bytes_per_s={self.min_bytes_per_s:g}"
            )
        self.restart_window()


def _check_digest(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual != expected:
        raise ValueError(
            f"sha256 mismatch for {what}: expected {expected}, got {actual}; "
            "the file was not kept (set the right digest, or 'none' to skip the check)"
        )


#: Leading bytes of the archives preprocess can open (zip, gzip, bzip2, xz); an uncompressed
#: tar is told by ``ustar`` at offset 257 (or, for an old tar without it, by ``tarfile``).
ARCHIVE_MAGIC: dict[bytes, str] = {
    b"PK\x03\x04": "zip", b"PK\x05\x06": "zip", b"PK\x07\x08": "zip",
    b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz",
}
#: What some common non-archives start with, to say what was received instead.
_OTHER_MAGIC: dict[bytes, str] = {
    b"\xff\xd8\xff": "a JPEG image", b"\x89PNG": "a PNG image", b"GIF8": "a GIF image",
    b"%PDF": "a PDF document", b"Rar!": "a RAR archive", b"7z\xbc\xaf": "a 7z archive",
}
_TAR_MAGIC_OFFSET = 257


class NotAnArchiveError(ValueError):
    """The fetched file is no zip or tar archive (an HTML error page, an image...)."""


def archive_kind(handle: IO[bytes]) -> str | None:
    """``zip``, ``gzip``, ``bzip2``, ``xz`` or ``tar`` from ``handle``'s content, else None."""
    handle.seek(0)
    head = handle.read(_TAR_MAGIC_OFFSET + 8)
    handle.seek(0)
    for magic, kind in ARCHIVE_MAGIC.items():
        if head.startswith(magic):
            return kind
    if head[_TAR_MAGIC_OFFSET:_TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    try:
        with tarfile.open(fileobj=handle, mode="r:") as tar:  # a pre-POSIX tar
            kind = "tar" if tar.next() is not None else None
    except (tarfile.TarError, OSError, EOFError, ValueError):
        kind = None
    handle.seek(0)
    return kind


def _describe_content(head: bytes) -> str:
    """A few words on what ``head`` (a file's first bytes) looks like."""
    for magic, what in _OTHER_MAGIC.items():
        if head.startswith(magic):
            return what
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page"
    if text.startswith((b"<?xml", b"<")):
        return "an XML or HTML document"
    if text.startswith((b"{", b"[")):
        return "JSON"
    if not head:
        return "an empty file"
    return "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head[:64]) else "unknown bytes"


def _check_archive(handle: IO[bytes], what: str, content_type: str | None = None) -> None:
    """Refuse ``handle``'s content unless it is an archive preprocess can open.

    Done before the file is kept, so an HTTP 200 serving an error page never reaches the
    download cache or kfp.local's (whose cached copy a later run would reuse).
    """
    if archive_kind(handle) is not None:
        return
    head = handle.read(512)
    handle.seek(0)
    served = f" (served as {content_type})" if content_type else ""
    raise NotAnArchiveError(
        f"{what} is {_describe_content(head)}{served}, not a zip or tar(.gz/.bz2/.xz) archive "
        "of class folders; nothing was kept (check the URL or path)")


def _copy_verified(src: Path, dest: Path, expected: str | None, what: str) -> str:
    """Copy ``src`` to ``dest`` atomically, hashing on the way; a bad digest leaves nothing."""
    digest = hashlib.sha256()
    with _atomic_file(dest) as out, open(src, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
        _check_digest(digest.hexdigest(), expected, what)
    return digest.hexdigest()


def _copy_tree(src: Path, dest: Path, skipped: list[dict[str, str]] | None = None) -> Path:
    """Copy a folder of class folders into ``dest`` atomically; links are skipped, not followed.

    Following links could pull in files from anywhere on the machine, so only regular files
    and real folders are copied. What was left out (links, dangling links, FIFOs, sockets,
    devices) is appended to ``skipped`` as ``{"path", "reason", "detail"}``, paths relative
    to ``src``, for the data report.
    """
    def skip(path: Path, reason: str, detail: str) -> None:
        logger.warning("skipping %s: %s", path, detail)
        if skipped is not None:
            skipped.append({"path": path.relative_to(src).as_posix(), "reason": reason,
                            "detail": detail})

    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        count = 0
        for dirpath, dirnames, filenames in os.walk(src):
            here = Path(dirpath)
            rel = here.relative_to(src)
            for name in list(dirnames):
                if (here / name).is_symlink():
                    skip(here / name, SKIP_LINK, "linked folder, not followed")
                    dirnames.remove(name)
                else:
                    (staging / rel / name).mkdir()
            for name in filenames:
                path = here / name
                if path.is_symlink():
                    skip(path, SKIP_LINK, "link, not followed" if path.exists()
                         else "dangling link")
                    continue
                if not path.is_file():
                    skip(path, SKIP_SPECIAL, "a FIFO, socket or device, not a regular file")
                    continue
                shutil.copy2(path, staging / rel / name)
                count += 1
        replace_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("copied %d files from folder %s to %s", count, src, dest)
    return dest


def _http_auth(source: str) -> tuple[str, tuple[str, str] | None]:
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


def _with_retries(url: str, attempt_fn: Callable[[], Any], retries: int, backoff_s: float,
                  transfer: _Transfer) -> Any:
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
        except _Transient as exc:
            last = exc.__cause__ or exc
            if attempt == retries:
                break
            wait = min(backoff_s * 2**attempt, MAX_BACKOFF_S, max(transfer.remaining(), 0.0))
            logger.warning("fetching %s failed (%s); retry %d/%d in %.2fs", url, last,
                           attempt + 1, retries, wait)
            time.sleep(wait)
    raise DownloadError(f"could not fetch {url} after {retries + 1} attempt(s): {last}")


def _http_attempt(url: str, tmp: IO[bytes], timeout_s: float, transfer: _Transfer,
                  auth: tuple[str, str] | None = None,
                  content_types: list[str] | None = None) -> None:
    """One GET into ``tmp`` (truncated first); transient failures raise ``_Transient``.

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
                raise _Transient(f"HTTP {status} {response.reason}")
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
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=_source_name(url),
                      disable=total < PROGRESS_MIN_BYTES or None) as bar:
                while chunk := response.raw.read1(_CHUNK, decode_content=True):
                    tmp.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
                    transfer.received(len(chunk))
            if total and received != total:
                raise _Transient(f"short read: {received} of {total} bytes")
            logger.info("downloaded %s (%d bytes)", url, received)
    except requests.TooManyRedirects as exc:
        raise DownloadError(f"could not fetch {url}: too many redirects ({exc})") from exc
    except (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError, urllib3.exceptions.HTTPError) as exc:
        raise _Transient(str(exc)) from exc


def _fsspec_attempt(url: str, tmp: IO[bytes], timeout_s: float, transfer: _Transfer) -> None:
    """One copy of an object-store (or other fsspec) URL into ``tmp``."""
    tmp.seek(0)
    tmp.truncate()
    del timeout_s  # each plug-in (s3fs, gcsfs) applies its own timeouts and retries
    try:
        with fsspec.open(url, "rb") as src:
            while chunk := src.read(_CHUNK):
                tmp.write(chunk)
                transfer.received(len(chunk))
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"data source not found: {redact_uri(url)}") from exc
    except PermissionError as exc:
        raise DownloadError(f"could not fetch {redact_uri(url)}: access denied ({exc})") from exc
    except (OSError, TimeoutError) as exc:
        raise _Transient(str(exc)) from exc


def _check_fsspec(url: str) -> None:
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


def _fetch_remote(url: str, dest: Path, expected: str | None, cache_dir: Path, *,
                  retries: int, backoff_s: float, timeout_s: float, use_fsspec: bool,
                  transfer: _Transfer) -> Path:
    """Fetch via the cache: a cached copy with the expected digest means no request at all.

    Logs and errors name the URL without its credentials.
    """
    content_types: list[str] = []
    if use_fsspec:
        shown, attempt_fn = redact_uri(url), _fsspec_attempt
    else:
        url, auth = _http_auth(url)
        shown, attempt_fn = url, functools.partial(_http_attempt, auth=auth,
                                                   content_types=content_types)

    if expected is not None:
        cached = cache_dir / expected / dest.name
        for candidate in [cached, *sorted((cache_dir / expected).glob("*"))]:
            if candidate.is_file() and not candidate.name.startswith("."):
                try:
                    _copy_verified(candidate, dest, expected, f"cached {candidate}")
                except ValueError:
                    logger.warning("cache entry %s is corrupt; fetching again", candidate)
                    candidate.unlink(missing_ok=True)
                    continue
                logger.info("cache hit for %s: %s", shown, candidate)
                return dest

    if use_fsspec:
        _check_fsspec(url)
    # Download next to the destination, then verify before the rename makes it visible.
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(dest) as tmp:
        _with_retries(shown, lambda: attempt_fn(url, tmp, timeout_s, transfer), retries,
                      backoff_s, transfer)
        _check_archive(tmp, shown, content_types[-1] if content_types else None)
        digest = hashlib.sha256()
        while chunk := tmp.read(_CHUNK):
            digest.update(chunk)
        actual = digest.hexdigest()
        _check_digest(actual, expected, shown)
    _store_in_cache(dest, cache_dir / actual / dest.name)
    return dest


def _store_in_cache(src: Path, cached: Path) -> None:
    """Keep a copy under its digest; a read-only cache (e.g. in a container) is not fatal."""
    if cached.is_file():
        return
    try:
        _copy_verified(src, cached, None, str(src))
    except OSError as exc:
        logger.warning("could not cache %s in %s: %s", src, cached.parent, exc)


def fetch_dataset(source: str, dest_dir: str | Path, sha256: str | None = None, *,
                  cache_dir: str | Path | None = None, retries: int = 4, backoff_s: float = 1.0,
                  timeout_s: float = 60.0,
                  deadline_s: float = DEFAULT_DEADLINE_S,
                  min_bytes_per_s: float = DEFAULT_MIN_BYTES_PER_S,
                  stall_window_s: float = STALL_WINDOW_S,
                  skipped: list[dict[str, str]] | None = None) -> Path:
    """Bring the raw data set into ``dest_dir`` and return its path there.

    ``source`` is an http(s) URL (retried with exponential backoff on connection errors,
    timeouts, stalls and 5xx, each attempt bounded by ``timeout_s``, the whole fetch by
    ``deadline_s``; fewer than ``min_bytes_per_s`` over ``stall_window_s`` is a stall, 0
    turns that check off), an ``s3://``/``gs://`` (any fsspec) URL, a ``file://`` URL, a
    local archive, or a local folder of class folders (copied, without following links).
    When ``sha256`` is given (not None/""/"none") the archive must match it or nothing is
    kept; remote archives are cached under their digest in ``cache_dir`` so fetching the
    same source and digest again makes no request. A file that is no zip or tar(.gz/.bz2/.xz)
    archive (told by its first bytes: an HTML error page, an image) is refused
    (:class:`NotAnArchiveError`) before anything is kept. Every write goes to a temporary file
    first and is renamed into place; the temporary file is removed on any failure, SIGTERM
    included. Entries of a folder source that are not copied are appended to ``skipped``.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError("data source must be a non-empty URL or path")
    source = source.strip()
    expected = normalize_sha256(sha256)
    if retries < 0 or backoff_s < 0 or timeout_s <= 0:
        raise ValueError("retries and backoff_s must be >= 0 and timeout_s > 0")
    if deadline_s <= 0 or min_bytes_per_s < 0 or stall_window_s <= 0:
        raise ValueError("deadline_s and stall_window_s must be > 0 and min_bytes_per_s >= 0")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    scheme = urllib.parse.urlparse(source).scheme.lower() if "://" in source else ""

    with sigterm_exits():
        if scheme in ("", "file"):
            return _fetch_local(source, scheme, dest_dir, expected, skipped)
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        transfer = _Transfer(redact_uri(source), deadline_s, min_bytes_per_s, stall_window_s)
        try:
            return _fetch_remote(source, dest_dir / _source_name(source), expected, cache,
                                 retries=retries, backoff_s=backoff_s, timeout_s=timeout_s,
                                 use_fsspec=scheme not in HTTP_SCHEMES, transfer=transfer)
        except DownloadError as exc:  # e.g. no network: say how to run from a local copy
            raise DownloadError(f"{exc}; {LOCAL_COPY_HINT}") from exc


def _fetch_local(source: str, scheme: str, dest_dir: Path, expected: str | None,
                 skipped: list[dict[str, str]] | None = None) -> Path:
    """Copy a local archive or folder (``file://`` URL or path) into ``dest_dir``."""
    local = Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path)
                 if scheme == "file" else source).expanduser()
    if local.is_dir():
        if expected is not None:
            raise ValueError(
                f"data source {source!r} is a folder, which has no sha256 to check; "
                "pass sha256='none' (IRIS_DATA_SHA256=none) for folder sources"
            )
        return _copy_tree(local, dest_dir / local.name, skipped)
    if not local.is_file():
        raise FileNotFoundError(f"data source not found: {source!r} (no such file or folder)")
    with open(local, "rb") as handle:
        _check_archive(handle, f"data source {source!r}")
    dest = dest_dir / _source_name(str(local))
    if dest.resolve() == local.resolve():
        _check_digest(file_sha256(local), expected, str(local))
        return dest
    _copy_verified(local, dest, expected, str(local))
    logger.info("copied %s to %s", local, dest)
    return dest


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


__all__ = [
    "CACHE_ENV",
    "LOCAL_COPY_HINT",
    "STALL_WINDOW_S",
    "DownloadError",
    "NotAnArchiveError",
    "archive_kind",
    "default_cache_dir",
    "fetch_dataset",
    "run_step",
]
