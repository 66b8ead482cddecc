"""Safe extraction of zip and tar archives: no path escapes, no links out, no zip bombs.

Kept hand-written: Python's ``tarfile`` "data" filter refuses escaping paths and links in
tar files only; nothing in the standard library checks zip entries, total size, entry
counts or compression ratios, and one checker treats both formats alike.
"""

from __future__ import annotations

import gzip
import logging
import lzma
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pipeline.lib.files import WriteError

logger = logging.getLogger(__name__)

#: Default limits on untrusted input (the config's defaults too). Photos barely compress
#: (about 1x), while a deflate bomb reaches about 1000x.
DEFAULT_MAX_ENTRY_RATIO = 200.0
DEFAULT_MAX_ARCHIVE_RATIO = 50.0
DEFAULT_MAX_IMAGE_BYTES = 64 * 1024 * 1024

#: Operating-system litter that never belongs to a data set (compared case-insensitively).
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "__macosx"})

_COPY_CHUNK = 1 << 20
#: Entries (and archives) expanding to less than this are never refused for their compression
#: ratio: a small, very compressible file (a text file of spaces) does no harm.
RATIO_MIN_BYTES = 1 << 20
#: Why an entry whose name is not valid UTF-8 (a tar written on another system) is skipped:
#: the name could not be stored in the data report or the TFRecords.
SKIP_NOT_UTF8 = "file name is not valid UTF-8"
#: What broken archive data raises while being read (all turned into one clear ValueError).
_CORRUPT = (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
            gzip.BadGzipFile)


class UnsafeArchiveError(ValueError):
    """An archive was refused; ``entries`` lists every offending member with the reason."""

    def __init__(self, archive: Path, problems: list[tuple[str, str]]) -> None:
        self.archive = Path(archive)
        self.entries = [name for name, _ in problems]
        self.problems = problems
        listing = "; ".join(f"{name!r} ({reason})" for name, reason in problems)
        super().__init__(
            f"refusing to extract {str(archive)!r}: {len(problems)} unsafe entr"
            f"{'y' if len(problems) == 1 else 'ies'}: {listing}"
        )


class ArchiveTooLargeError(ValueError):
    """An archive exceeds the configured entry-count or uncompressed-size limit."""


@dataclass(frozen=True)
class Member:
    """One archive entry as the pre-scan sees it, before anything is written."""

    name: str  # the name as stored in the archive (for messages)
    parts: tuple[str, ...]  # normalized relative path components inside the target
    kind: str  # "file", "dir", "symlink", "hardlink" or "other"
    size: int  # uncompressed bytes (for links: the bytes of the member they point to)
    link: str = ""  # link target as stored, for links
    compressed: int = 0  # compressed bytes of a zip entry (tar members are not compressed alone)


@dataclass
class Extraction:
    """What :func:`safe_extract` did: where the data landed and what it left out, and why."""

    root: Path  # the folder holding the class folders (below any single wrapping folder)
    files_written: int = 0
    bytes_written: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}


def is_utf8(name: str) -> bool:
    """False for names decoded with surrogate escapes (bytes that are not UTF-8)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_name(name: str) -> str:
    """``name`` safe to write anywhere: undecodable bytes shown as ``\\xNN`` escapes."""
    try:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def is_junk(parts: tuple[str, ...] | list[str]) -> bool:
    """True for OS litter and hidden files/folders anywhere in the path (``.x``, ``__MACOSX``)."""
    return any(part.lower() in JUNK_NAMES or part.startswith(".") for part in parts)


def _is_absolute(name: str) -> bool:
    """POSIX absolute paths and Windows drive paths (``C:/x``, ``C:\\x``) alike."""
    unified = name.replace("\\", "/")
    return unified.startswith("/") or bool(re.match(r"^[A-Za-z]:(/|$)", unified))


def _normalize(name: str) -> tuple[tuple[str, ...], str | None]:
    """Split an entry name into safe components, or explain why it would escape the target."""
    unified = name.replace("\\", "/")
    if _is_absolute(unified):
        return (), "absolute path"
    if "\x00" in unified:
        return (), "NUL byte in name"
    parts: list[str] = []
    for part in unified.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                return (), "path escapes the target (..)"
            parts.pop()
            continue
        parts.append(part)
    return tuple(parts), None


def _link_problem(parts: tuple[str, ...], link: str, hard: bool) -> str | None:
    """Why a link entry would point outside the target, or None when it stays inside."""
    what = "hard link" if hard else "symbolic link"
    if _is_absolute(link):
        return f"{what} to absolute path {link!r}"
    # Hard links are relative to the archive root, symbolic links to the entry's folder.
    base = "" if hard else "/".join(parts[:-1])
    _, problem = _normalize(posixpath.join(base, link.replace("\\", "/")))
    return f"{what} points outside the target ({link!r})" if problem else None


def _scan_zip(archive: zipfile.ZipFile) -> list[tuple[Member, zipfile.ZipInfo]]:
    members = []
    for info in archive.infolist():
        # Unix tools store the file type in the high bits; many writers store only permissions.
        file_type = stat.S_IFMT(info.external_attr >> 16)
        if info.is_dir() or file_type == stat.S_IFDIR:
            kind = "dir"
        elif file_type == stat.S_IFLNK:
            kind = "symlink"
        elif file_type in (0, stat.S_IFREG):
            kind = "file"
        else:
            kind = "other"
        link = ""
        if kind == "symlink":  # a zip link stores its target as the entry's data
            if info.file_size > 4096:
                kind = "other"  # no real link target is that long; do not inflate it
            else:
                link = archive.read(info).decode("utf-8", "replace")
        parts, _ = _normalize(info.filename)
        members.append((Member(info.filename, parts, kind, info.file_size, link,
                               info.compress_size), info))
    return members


def _scan_tar(archive: tarfile.TarFile) -> list[tuple[Member, tarfile.TarInfo]]:
    members = []
    for info in archive.getmembers():
        if info.isdir():
            kind = "dir"
        elif info.isreg():
            kind = "file"
        elif info.issym():
            kind = "symlink"
        elif info.islnk():
            kind = "hardlink"
        else:
            kind = "other"
        size = info.size if kind == "file" else 0
        parts, _ = _normalize(info.name)
        members.append((Member(info.name, parts, kind, size, info.linkname), info))
    # A link's payload is the member it points to: count those bytes against the limit.
    by_name = {m.parts: m for m, _ in members if m.kind == "file"}
    resolved = []
    for member, info in members:
        if member.kind in ("symlink", "hardlink") and member.link:
            base = "" if member.kind == "hardlink" else "/".join(member.parts[:-1])
            parts, problem = _normalize(posixpath.join(base, member.link))
            if not problem and parts in by_name:
                member = Member(member.name, member.parts, member.kind, by_name[parts].size,
                                member.link)
        resolved.append((member, info))
    return resolved


def _problems(members: list[Member]) -> list[tuple[str, str]]:
    """Every entry that would land (or point) outside the target, with the reason."""
    problems = []
    for member in members:
        _, problem = _normalize(member.name)
        if problem is None and member.kind in ("symlink", "hardlink"):
            problem = _link_problem(member.parts, member.link, member.kind == "hardlink")
        if problem:
            problems.append((member.name, problem))
    return problems


@contextmanager
def _open_archive(archive: Path) -> Iterator[tuple[str, zipfile.ZipFile | tarfile.TarFile]]:
    """Open a zip or a (compressed) tar, telling the two apart by content, not by name."""
    if not archive.is_file():
        raise FileNotFoundError(f"archive not found: {str(archive)!r}")
    if zipfile.is_zipfile(archive):
        try:
            with zipfile.ZipFile(archive) as handle:
                yield "zip", handle
        except _CORRUPT as exc:
            raise ValueError(f"corrupt zip archive {str(archive)!r}: {exc}") from exc
        return
    try:
        handle = tarfile.open(archive, mode="r:*")  # noqa: SIM115 (closed by the with below)
    except (*_CORRUPT, OSError) as exc:
        raise ValueError(
            f"{str(archive)!r} is not a zip or tar(.gz/.bz2/.xz) archive ({exc})"
        ) from exc
    with handle:
        try:
            yield "tar", handle
        except _CORRUPT as exc:
            raise ValueError(f"corrupt tar archive {str(archive)!r}: {exc}") from exc


def _copy_limited(src: IO[bytes], dest: Path, limit: int, what: str) -> int:
    """Copy ``src`` to ``dest`` but never more than ``limit`` bytes.

    The limit is the entry's declared size (within what is left of the total budget): more
    means the headers lied (a bomb), and the copy stops before writing the chunk that would
    pass it. A failed write (a full disk) names the file being written.
    """
    written = 0
    with open(dest, "xb") as out:
        while chunk := src.read(_COPY_CHUNK):
            written += len(chunk)
            if written > limit:
                raise ArchiveTooLargeError(
                    f"{what} expands beyond {limit} bytes (its declared size or what is left of "
                    "max_archive_bytes); refusing a possible zip bomb"
                )
            try:
                out.write(chunk)
            except OSError as exc:
                raise WriteError(exc.errno, f"cannot write {str(dest)!r} ({what}): "
                                 f"{exc.strerror or exc}") from exc
    return written


def _check_ratios(archive: Path, members: list[Member], max_entry_ratio: float,
                  max_archive_ratio: float) -> None:
    """Refuse archives that expand far beyond their size before anything is written.

    Photos barely compress, so a high ratio means a bomb: per zip entry (uncompressed over
    compressed bytes) and for the whole archive (total uncompressed over the file's size,
    which covers compressed tars too). Below :data:`RATIO_MIN_BYTES` nothing is refused.
    """
    for member in members:
        if member.kind != "file" or member.size <= RATIO_MIN_BYTES or not member.compressed:
            continue
        ratio = member.size / member.compressed
        if ratio > max_entry_ratio:
            raise ArchiveTooLargeError(
                f"entry {member.name!r} of {str(archive)!r} expands {ratio:.0f}x "
                f"({member.compressed} -> {member.size} bytes), over the limit of "
                f"{max_entry_ratio:g}x (max_entry_compression_ratio); refusing a possible "
                "zip bomb"
            )
    total = sum(m.size for m in members)
    on_disk = max(archive.stat().st_size, 1)
    if total > RATIO_MIN_BYTES and total / on_disk > max_archive_ratio:
        raise ArchiveTooLargeError(
            f"{str(archive)!r} expands {total / on_disk:.0f}x ({on_disk} -> {total} bytes), over "
            f"the limit of {max_archive_ratio:g}x (max_archive_compression_ratio); refusing a "
            "possible zip bomb"
        )


def find_class_root(directory: Path) -> Path:
    """Descend through single wrapping folders to the folder that holds the class folders.

    A folder is a wrapper when it is the only non-junk entry of its parent and itself holds
    sub-folders; a lone folder of images is a class, not a wrapper, and stays put.
    """
    root = Path(directory)
    while True:
        entries = [p for p in root.iterdir() if not is_junk((p.name,))]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].is_symlink():
            return root
        inner = entries[0]
        if not any(p.is_dir() and not is_junk((p.name,)) for p in inner.iterdir()):
            return root
        logger.info("descending into the single wrapping folder %s", inner.name)
        root = inner


def safe_extract(archive: str | Path, target: str | Path, *, max_bytes: int,
                 max_entries: int,
                 max_entry_ratio: float = DEFAULT_MAX_ENTRY_RATIO,
                 max_archive_ratio: float = DEFAULT_MAX_ARCHIVE_RATIO,
                 ) -> Extraction:
    """Extract ``archive`` into ``target`` (new or empty) after checking every entry first.

    Nothing is written unless the whole archive passes: entries escaping the target
    (``../``, absolute paths, links pointing out) are refused together in one error that
    names them, as are archives over ``max_entries`` entries or ``max_bytes`` uncompressed,
    and those expanding more than ``max_entry_ratio`` per zip entry or ``max_archive_ratio``
    overall; no entry is written past its declared size. Links inside the archive are
    written as plain copies (no link is ever created); OS junk, hidden files and names that
    are not UTF-8 are skipped. Files land in a temporary sibling folder first, renamed
    into place at the end, so a failure leaves nothing behind.
    """
    archive, target = Path(archive), Path(target)
    if max_bytes <= 0 or max_entries <= 0:
        raise ValueError("max_bytes and max_entries must be > 0")
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"extraction target {str(target)!r} exists and is not empty")

    with _open_archive(archive) as (kind, handle):
        scanned = _scan_zip(handle) if kind == "zip" else _scan_tar(handle)  # type: ignore[arg-type]
        members = [m for m, _ in scanned]
        if len(members) > max_entries:
            raise ArchiveTooLargeError(
                f"{str(archive)!r} has {len(members)} entries, over the limit of {max_entries} "
                "(max_archive_entries); refusing to extract a possible zip bomb"
            )
        total = sum(m.size for m in members)
        if total > max_bytes:
            raise ArchiveTooLargeError(
                f"{str(archive)!r} expands to {total} bytes, over the limit of {max_bytes} "
                "(max_archive_bytes); refusing to extract a possible zip bomb"
            )
        _check_ratios(archive, members, max_entry_ratio, max_archive_ratio)
        problems = _problems(members)
        if problems:
            raise UnsafeArchiveError(archive, problems)

        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.extract-", dir=target.parent))
        result = Extraction(root=target)
        seen: set[tuple[str, ...]] = set()
        try:
            for member, info in scanned:
                if not member.parts or member.kind == "dir":
                    continue
                reason = ("OS junk or hidden" if is_junk(member.parts) else
                          SKIP_NOT_UTF8 if not is_utf8(member.name) else
                          "not a regular file" if member.kind == "other" else
                          "repeated entry name" if member.parts in seen else "")
                if reason:
                    result.skipped.append({"path": printable_name(member.name),
                                           "reason": reason})
                    continue
                seen.add(member.parts)
                dest = staging.joinpath(*member.parts)
                try:  # no link is ever written, so parents are real folders inside staging
                    dest.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise ValueError(f"archive entry {member.name!r} clashes with another "
                                     f"entry of {str(archive)!r}: {exc}") from exc
                if dest.exists():
                    raise ValueError(f"archive entry {member.name!r} clashes with another "
                                     f"entry of {str(archive)!r}")
                limit = min(member.size, max_bytes - result.bytes_written)
                what = f"entry {member.name!r} of {str(archive)!r}"
                if kind == "zip":
                    if member.kind == "symlink":  # zip links hold their target as data
                        result.skipped.append({"path": member.name, "reason": "link in zip"})
                        continue
                    with handle.open(info) as src:  # type: ignore[arg-type]
                        written = _copy_limited(src, dest, limit, what)
                else:
                    try:
                        src = handle.extractfile(info)  # type: ignore[arg-type]
                    except (KeyError, RecursionError):  # link to nothing, or a link loop
                        src = None
                    if src is None:
                        result.skipped.append({"path": member.name,
                                               "reason": "link to a missing member"})
                        continue
                    with src:
                        written = _copy_limited(src, dest, limit, what)
                result.files_written += 1
                result.bytes_written += written
            if target.exists():
                target.rmdir()
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    for item in result.skipped:
        logger.info("skipped archive entry %r: %s", item["path"], item["reason"])
    result.root = find_class_root(target)
    logger.info("extracted %d files (%d bytes) from %s into %s", result.files_written,
                result.bytes_written, archive.name, result.root)
    return result


__all__ = [
    "JUNK_NAMES",
    "RATIO_MIN_BYTES",
    "SKIP_NOT_UTF8",
    "ArchiveTooLargeError",
    "Extraction",
    "UnsafeArchiveError",
    "find_class_root",
    "is_junk",
    "is_utf8",
    "printable_name",
    "safe_extract",
]
