"""Download step: fetch the raw data set from a URL, object store or path, verified, cached."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import fsspec
import requests
from tqdm import tqdm

logger = logging.getLogger(__name__)

#: Responses larger than this get a tqdm progress bar; smaller ones a log line.
PROGRESS_MIN_BYTES = 20 * 1024 * 1024
#: Longest wait between two attempts, whatever the backoff doubling reaches.
MAX_BACKOFF_S = 60.0
#: The extra to install for each object-store scheme fsspec needs a plug-in for.
FSSPEC_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
#: ``IRIS_CACHE_DIR`` overrides the default cache location (else ``$XDG_CACHE_HOME`` or ~/.cache).
CACHE_ENV = "IRIS_CACHE_DIR"

_CHUNK = 1 << 20
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


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


def normalize_sha256(sha256: str | None) -> str | None:
    """The lower-case hex digest to check, or None for None/""/"none" (no check)."""
    if sha256 is None or sha256.strip().lower() in ("", "none"):
        return None
    digest = sha256.strip().lower()
    if not _SHA256_RE.match(digest):
        raise ValueError(
            f"sha256 must be 64 hex digits (or 'none' to skip the check), got {sha256!r}"
        )
    return digest


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks so large archives stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _source_name(source: str) -> str:
    """A safe file name for the fetched archive: the last path segment of the source."""
    path = urllib.parse.urlparse(source).path if "://" in source else source
    name = Path(urllib.parse.unquote(path).replace("\\", "/")).name
    if name in ("", ".", "..") or name.startswith("."):
        name = "dataset-archive"
    return name


@contextlib.contextmanager
def _atomic_file(final: Path) -> Iterator[IO[bytes]]:
    """A temporary file next to ``final``, renamed onto it only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".part", dir=final.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as handle:
            yield handle
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_digest(actual: str, expected: str | None, what: str) -> None:
    if expected is not None and actual != expected:
        raise ValueError(
            f"sha256 mismatch for {what}: expected {expected}, got {actual}; "
            "the file was not kept (set the right digest, or 'none' to skip the check)"
        )


def _copy_verified(src: Path, dest: Path, expected: str | None, what: str) -> str:
    """Copy ``src`` to ``dest`` atomically, hashing on the way; a bad digest leaves nothing."""
    digest = hashlib.sha256()
    with _atomic_file(dest) as out, open(src, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
        _check_digest(digest.hexdigest(), expected, what)
    return digest.hexdigest()


def _copy_tree(src: Path, dest: Path) -> Path:
    """Copy a folder of class folders into ``dest`` atomically; links are skipped, not followed.

    Following links could pull in files from anywhere on the machine, so only regular files
    and real folders are copied.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        count = 0
        for dirpath, dirnames, filenames in os.walk(src):
            here = Path(dirpath)
            rel = here.relative_to(src)
            for name in list(dirnames):
                if (here / name).is_symlink():
                    logger.warning("not following linked folder %s", here / name)
                    dirnames.remove(name)
                else:
                    (staging / rel / name).mkdir()
            for name in filenames:
                path = here / name
                if path.is_symlink() or not path.is_file():
                    logger.warning("skipping %s: not a regular file", path)
                    continue
                shutil.copy2(path, staging / rel / name)
                count += 1
        replace_dir(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("copied %d files from folder %s to %s", count, src, dest)
    return dest


def replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder ``new`` onto ``dest``, swapping out any old one only at the end."""
    if not dest.exists():
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.replace(dest, old / dest.name)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old / dest.name, dest)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _with_retries(url: str, attempt_fn: Callable[[], Any], retries: int, backoff_s: float) -> Any:
    """Run ``attempt_fn`` up to ``retries + 1`` times, waiting backoff_s * 2**i in between."""
    last: BaseException | None = None
    for attempt in range(retries + 1):
        try:
            return attempt_fn()
        except _Transient as exc:
            last = exc.__cause__ or exc
            if attempt == retries:
                break
            wait = min(backoff_s * 2**attempt, MAX_BACKOFF_S)
            logger.warning("fetching %s failed (%s); retry %d/%d in %.2fs", url, last,
                           attempt + 1, retries, wait)
            time.sleep(wait)
    raise DownloadError(f"could not fetch {url} after {retries + 1} attempt(s): {last}")


def _http_attempt(url: str, tmp: IO[bytes], timeout_s: float) -> None:
    """One GET into ``tmp`` (truncated first); transient failures raise ``_Transient``."""
    tmp.seek(0)
    tmp.truncate()
    try:
        with requests.get(url, stream=True, timeout=timeout_s,
                          headers={"User-Agent": "iris-image-pipeline"}) as response:
            status = response.status_code
            if status >= 500 or status in (408, 429):
                raise _Transient(f"HTTP {status} {response.reason}")
            if status >= 400:
                raise DownloadError(f"could not fetch {url}: HTTP {status} {response.reason}")
            total = int(response.headers.get("Content-Length") or 0)
            received = 0
            with tqdm(total=total or None, unit="B", unit_scale=True, desc=_source_name(url),
                      disable=total < PROGRESS_MIN_BYTES or None) as bar:
                for chunk in response.iter_content(_CHUNK):
                    tmp.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total and received != total:
                raise _Transient(f"short read: {received} of {total} bytes")
            logger.info("downloaded %s (%d bytes)", url, received)
    except (requests.ConnectionError, requests.Timeout,
            requests.exceptions.ChunkedEncodingError) as exc:
        raise _Transient(str(exc)) from exc


def _fsspec_attempt(url: str, tmp: IO[bytes], timeout_s: float) -> None:
    """One copy of an object-store (or other fsspec) URL into ``tmp``."""
    tmp.seek(0)
    tmp.truncate()
    del timeout_s  # each plug-in (s3fs, gcsfs) applies its own timeouts and retries
    try:
        with fsspec.open(url, "rb") as src:
            shutil.copyfileobj(src, tmp, _CHUNK)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"data source not found: {url}") from exc
    except PermissionError as exc:
        raise DownloadError(f"could not fetch {url}: access denied ({exc})") from exc
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
        raise ValueError(f"unsupported data source scheme {scheme!r} in {url!r}") from exc


def _fetch_remote(url: str, dest: Path, expected: str | None, cache_dir: Path, *,
                  retries: int, backoff_s: float, timeout_s: float, use_fsspec: bool) -> Path:
    """Fetch via the cache: a cached copy with the expected digest means no request at all."""
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
                logger.info("cache hit for %s: %s", url, candidate)
                return dest

    if use_fsspec:
        _check_fsspec(url)
    attempt = _fsspec_attempt if use_fsspec else _http_attempt
    # Download next to the destination, then verify before the rename makes it visible.
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(dest) as tmp:
        _with_retries(url, lambda: attempt(url, tmp, timeout_s), retries, backoff_s)
        tmp.seek(0)
        digest = hashlib.sha256()
        while chunk := tmp.read(_CHUNK):
            digest.update(chunk)
        actual = digest.hexdigest()
        _check_digest(actual, expected, url)
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
                  timeout_s: float = 60.0) -> Path:
    """Bring the raw data set into ``dest_dir`` and return its path there.

    ``source`` is an http(s) URL (retried with exponential backoff on connection errors,
    timeouts and 5xx, each attempt bounded by ``timeout_s``), an ``s3://``/``gs://`` (any
    fsspec) URL, a ``file://`` URL, a local archive, or a local folder of class folders
    (copied, without following links). When ``sha256`` is given (not None/""/"none") the
    archive must match it or nothing is kept; remote archives are cached under their digest
    in ``cache_dir`` so fetching the same source and digest again makes no request. Every
    write goes to a temporary file first and is renamed into place.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError("data source must be a non-empty URL or path")
    source = source.strip()
    expected = normalize_sha256(sha256)
    if retries < 0 or backoff_s < 0 or timeout_s <= 0:
        raise ValueError("retries and backoff_s must be >= 0 and timeout_s > 0")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    scheme = urllib.parse.urlparse(source).scheme.lower() if "://" in source else ""

    if scheme in ("", "file"):
        local = Path(urllib.request.url2pathname(urllib.parse.urlparse(source).path)
                     if scheme == "file" else source).expanduser()
        if local.is_dir():
            if expected is not None:
                raise ValueError(
                    f"data source {source!r} is a folder, which has no sha256 to check; "
                    "pass sha256='none' (IRIS_DATA_SHA256=none) for folder sources"
                )
            return _copy_tree(local, dest_dir / local.name)
        if not local.is_file():
            raise FileNotFoundError(f"data source not found: {source!r} (no such file or folder)")
        dest = dest_dir / _source_name(str(local))
        if dest.resolve() == local.resolve():
            _check_digest(file_sha256(local), expected, str(local))
            return dest
        _copy_verified(local, dest, expected, str(local))
        logger.info("copied %s to %s", local, dest)
        return dest

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    dest = dest_dir / _source_name(source)
    try:
        return _fetch_remote(source, dest, expected, cache, retries=retries,
                             backoff_s=backoff_s, timeout_s=timeout_s,
                             use_fsspec=scheme not in ("http", "https"))
    except DownloadError as exc:  # e.g. no network: say how to run from a local copy
        raise DownloadError(f"{exc}; {LOCAL_COPY_HINT}") from exc


__all__ = [
    "CACHE_ENV",
    "LOCAL_COPY_HINT",
    "DownloadError",
    "default_cache_dir",
    "fetch_dataset",
    "file_sha256",
    "normalize_sha256",
    "replace_dir",
]
