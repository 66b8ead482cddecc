"""File helpers every step shares: atomic writes, folder swaps and content digests.

A step killed or failing mid-write must never leave a half-written file under the final
name (a later step or a cached run would read it), so every output goes to a temporary
sibling first and is renamed into place only once complete; on any error the temporary
file is removed and the error names the final path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class WriteError(OSError):
    """Writing a file failed (disk full, read-only, ...); the message names the file."""


def _write_error(path: Path, exc: OSError) -> WriteError:
    return WriteError(exc.errno, f"cannot write {str(path)!r}: {exc.strerror or exc}")


class _NamedWrites:
    """A file object whose ``write``/``flush`` failures name the final path, not the temp one.

    Only the file's own operations are translated: other ``OSError``s raised in the block
    (a missing source, a refused download) keep their own message.
    """

    def __init__(self, handle: IO[Any], path: Path) -> None:
        self._handle = handle
        self._path = path

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            raise _write_error(self._path, exc) from exc

    def flush(self) -> None:
        try:
            self._handle.flush()
        except OSError as exc:
            raise _write_error(self._path, exc) from exc

    def __getattr__(self, name: str) -> Any:  # seek, read, truncate, fileno, ...
        return getattr(self._handle, name)


@contextlib.contextmanager
def atomic_writer(path: str | Path, mode: str = "wb", *,
                  suffix: str = ".tmp") -> Iterator[Any]:
    """A file object for a temporary file next to ``path``, renamed onto it on success.

    On any error (``ENOSPC`` included, and ``KeyboardInterrupt``/``SystemExit``) the
    temporary file (``suffix``) is removed; a failure to create, write, flush, close or
    rename it is raised as :class:`WriteError` naming ``path``, so a full disk says which
    file could not be written and leaves no temporary litter for the next run to trip over.
    """
    path = Path(path)
    if mode not in ("w", "wb", "w+b"):
        raise ValueError(f"atomic_writer mode must be 'w', 'wb' or 'w+b', got {mode!r}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix,
                                        dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    tmp = Path(tmp_name)
    try:
        with open(fd, mode, encoding=None if "b" in mode else "utf-8") as handle:
            yield _NamedWrites(handle, path)
            try:
                handle.close()  # a full disk may only show when the buffer is flushed
            except OSError as exc:
                raise _write_error(path, exc) from exc
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(path, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "w") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, **dump_options: Any) -> Path:
    """Write ``data`` as indented JSON plus a newline to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, **dump_options) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path next to ``path`` for writers that want a name, not a file object
    (Keras' ``save``, KFP's compiler); renamed onto ``path`` when the block succeeds and
    removed (file or folder) when it fails. The name ends with ``path``'s own name, since
    such writers check the suffix (``.keras``, ``.weights.h5``, ``.yaml``)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=f"-{path.name}", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    tmp = Path(name)
    try:
        yield tmp
        try:
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(path, exc) from exc
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def read_json(path: str | Path) -> Any:
    """The JSON in ``path``, or None when it is missing or unreadable (optional inputs)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


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


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in chunks so large archives stay out of memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


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


__all__ = ["WriteError", "atomic_path", "atomic_write_json",
           "atomic_write_text", "atomic_writer", "file_sha256", "normalize_sha256", "read_json",
           "replace_dir"]
