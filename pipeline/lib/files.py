"""Atomic file writes that name the path on failure and never leave a temporary file behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


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


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "wb") as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_writer`)."""
    with atomic_writer(path, "w") as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(path: str | Path, data: Any, **dump_options: Any) -> Path:
    """Write ``data`` as indented JSON plus a newline to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, **dump_options) + "\n")


__all__ = ["WriteError", "atomic_write_bytes", "atomic_write_json", "atomic_write_text",
           "atomic_writer"]
