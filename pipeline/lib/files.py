"""File helpers every step shares: atomic writes, folder swaps and content digests.

A step killed or failing mid-write must never leave a half-written file under the final
name (a later step or a cached run would read it), so every output goes to a temporary
sibling first and is renamed into place only once complete; on any error the temporary
file is removed and the error names the final path.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

_CHUNK = 1 << 20
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic_path(final: str | Path, prefix: str = ".tmp") -> Iterator[Path]:
    """A temporary path next to ``final``, renamed onto it when the block succeeds and removed
    when it fails. The name ends with ``final``'s (writers such as Keras check the suffix)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f"{prefix}-", suffix=f"-{final.name}", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:  # name what did not fit
            raise OSError(exc.errno, f"{exc.strerror or 'disk full'} while writing",
                          str(final)) from exc
        raise


@contextlib.contextmanager
def atomic_file(final: str | Path, mode: str = "wb", prefix: str = ".tmp") -> Iterator[IO[Any]]:
    """An open temporary file next to ``final``, renamed onto it only if the block succeeds."""
    with atomic_path(final, prefix) as tmp, open(tmp, mode) as handle:
        yield handle


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_file(path, "w") as handle:
        handle.write(text)
    return Path(path)


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically (non-JSON values as ``str``)."""
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


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
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


__all__ = ["atomic_file", "atomic_path", "file_sha256", "read_json", "replace_dir",
           "write_json", "write_text"]
