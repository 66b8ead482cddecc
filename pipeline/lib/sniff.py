"""Archive sniffing: tell a zip or tar from an HTML error page or an image by its first bytes."""

from __future__ import annotations

import tarfile
from typing import IO

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


def check_archive(handle: IO[bytes], what: str, content_type: str | None = None) -> None:
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
