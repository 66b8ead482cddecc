"""Fetching the raw data set: a URL, object store, archive or folder, verified, cached, atomic."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO

from pipeline.lib.credentials import HTTP_SCHEMES, redact_uri
from pipeline.lib.files import atomic_writer, file_sha256, normalize_sha256, replace_dir
from pipeline.lib.interrupts import sigterm_exits
from pipeline.lib.sniff import check_archive
from pipeline.lib.transfer import (
    CHUNK,
    STALL_WINDOW_S,
    DownloadError,
    Transfer,
    check_fsspec,
    fsspec_attempt,
    http_attempt,
    http_auth,
    source_name,
    with_retries,
)

logger = logging.getLogger(__name__)

#: Defaults of a direct call (the pipeline passes its config's download_* values).
DEFAULT_DEADLINE_S = 1800.0
DEFAULT_MIN_BYTES_PER_S = 1024.0

#: ``IRIS_CACHE_DIR`` overrides the default cache location (else ``$XDG_CACHE_HOME`` or ~/.cache).
CACHE_ENV = "IRIS_CACHE_DIR"

#: Reasons a data folder's entry is not copied (the data report groups skipped files by them).
SKIP_LINK = "symbolic link"
SKIP_SPECIAL = "not a regular file"

#: Appended to every failed remote fetch: the README's first command on a machine without
#: network fails here, and the fix is a flag away.
LOCAL_COPY_HINT = (
    "to use a local copy instead (archive or folder of class folders), pass --data PATH "
    "or set IRIS_DATA_SOURCE=PATH"
)


def default_cache_dir() -> Path:
    """``$IRIS_CACHE_DIR``, else ``$XDG_CACHE_HOME/iris-image-pipeline``, else ~/.cache/..."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "iris-image-pipeline"


def _atomic_file(final: Path) -> contextlib.AbstractContextManager[IO[bytes]]:
    """A ``.part`` file next to ``final``, renamed onto it only if the block succeeds."""
    return atomic_writer(final, "w+b", suffix=".part")


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
        while chunk := handle.read(CHUNK):
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


def _fetch_remote(url: str, dest: Path, expected: str | None, cache_dir: Path, *,
                  retries: int, backoff_s: float, timeout_s: float, use_fsspec: bool,
                  transfer: Transfer) -> Path:
    """Fetch via the cache: a cached copy with the expected digest means no request at all.

    Logs and errors name the URL without its credentials.
    """
    content_types: list[str] = []
    if use_fsspec:
        shown, attempt_fn = redact_uri(url), fsspec_attempt
    else:
        url, auth = http_auth(url)
        shown, attempt_fn = url, functools.partial(http_attempt, auth=auth,
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
        check_fsspec(url)
    # Download next to the destination, then verify before the rename makes it visible.
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_file(dest) as tmp:
        with_retries(shown, lambda: attempt_fn(url, tmp, timeout_s, transfer), retries,
                      backoff_s, transfer)
        check_archive(tmp, shown, content_types[-1] if content_types else None)
        digest = hashlib.sha256()
        while chunk := tmp.read(CHUNK):
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
        transfer = Transfer(redact_uri(source), deadline_s, min_bytes_per_s, stall_window_s)
        try:
            return _fetch_remote(source, dest_dir / source_name(source), expected, cache,
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
        check_archive(handle, f"data source {source!r}")
    dest = dest_dir / source_name(str(local))
    if dest.resolve() == local.resolve():
        _check_digest(file_sha256(local), expected, str(local))
        return dest
    _copy_verified(local, dest, expected, str(local))
    logger.info("copied %s to %s", local, dest)
    return dest
