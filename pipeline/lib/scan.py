"""Image inspection and scanning: decode every file under a class root once, find duplicates.

Shared by the preprocess step (training data) and the predict step (files to score).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.lib.archive import (
    DEFAULT_MAX_IMAGE_BYTES,
    SKIP_NOT_UTF8,
    is_junk,
    is_utf8,
    printable_name,
)

#: Accepted file name extensions (compared lower-case) and the decoded formats they may hold.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF"})
#: RGB images in these formats are stored byte for byte; everything else is re-encoded as PNG.
KEEP_ORIGINAL_FORMATS = frozenset({"JPEG", "PNG"})
# Why a file was not used; the report groups skipped files by these.
SKIP_NOT_IN_CLASS = "not in a class folder"
SKIP_LINK = "symbolic link"
SKIP_EXTENSION = "unsupported file type"
SKIP_EMPTY = "empty file"
SKIP_NOT_IMAGE = "not an image"
SKIP_CORRUPT = "corrupt or truncated"
SKIP_TOO_SMALL = "too small"
SKIP_TOO_LARGE = "too many pixels"
SKIP_TOO_BIG_FILE = "file too large"
SKIP_MODE = "unsupported colour mode"


@dataclass(frozen=True)
class Candidate:
    """A file that decoded as a usable image, before duplicates are resolved."""

    path: str  # relative to the class root, POSIX separators: "<class>/<file>"
    label: str
    sha256: str  # of the original file's bytes
    source: Path  # where the original bytes are
    converted: Path | None  # the RGB PNG re-encoding, when the original could not be kept
    width: int
    height: int
    format: str
    mode: str


@dataclass
class Scan:
    """Everything the validation pass learned about the files under one class root."""

    classes: list[str]
    seen: int
    candidates: list[Candidate]
    skipped: list[dict[str, str]]
    ignored: list[dict[str, str]]
    converted: list[dict[str, str]]


def skip_record(path: str, reason: str, detail: str = "") -> dict[str, str]:
    """A skipped file as the data report lists it; the name made printable."""
    return {"path": printable_name(path), "reason": reason, "detail": detail or reason}


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of any Pillow mode: alpha is composited on white, 16-bit is scaled down."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith(("I", "F")):
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) > 255:
            values = values / 257.0
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def inspect_image(path: Path, rel: str, label: str, min_side: int, converted_dir: Path,
                  max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Candidate | dict[str, str]:
    """Decode one file fully (once) and return a :class:`Candidate` or a skip record.

    A file must carry an image extension *and* decode, in full, as JPEG/PNG/BMP/GIF:
    Pillow's lazy open alone would accept truncated files that break training later. Files
    over ``max_bytes`` are skipped unread, so no file's size decides the step's memory.
    """
    extension = path.suffix.lower()
    if extension not in IMAGE_EXTENSIONS:
        return skip_record(rel, SKIP_EXTENSION, f"extension {extension or '(none)'!r} is not "
                           f"one of {sorted(IMAGE_EXTENSIONS)}")
    size = path.stat().st_size
    if size > max_bytes:
        return skip_record(rel, SKIP_TOO_BIG_FILE,
                           f"{size} bytes, over max_image_bytes {max_bytes}")
    data = path.read_bytes()
    if not data:
        return skip_record(rel, SKIP_EMPTY)
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                return skip_record(rel, SKIP_NOT_IMAGE, f"content is {image.format}, not an "
                                   "accepted image format")
            image.load()
            width, height = image.size
            if min(width, height) < min_side:
                return skip_record(rel, SKIP_TOO_SMALL,
                                   f"{width}x{height} is below min_image_side {min_side}")
            if image.format in KEEP_ORIGINAL_FORMATS and image.mode == "RGB":
                return Candidate(rel, label, digest, path, None, width, height, image.format,
                                 image.mode)
            try:
                rgb = _to_rgb(image)
            except (ValueError, OSError) as exc:
                return skip_record(rel, SKIP_MODE,
                                   f"cannot convert mode {image.mode} to RGB: {exc}")
            out = converted_dir / f"{digest}.png"
            if not out.exists():
                rgb.save(out, format="PNG")
            return Candidate(rel, label, digest, path, out, width, height, image.format,
                             image.mode)
    except Image.DecompressionBombError as exc:
        return skip_record(rel, SKIP_TOO_LARGE, str(exc))
    except UnidentifiedImageError:
        return skip_record(rel, SKIP_NOT_IMAGE, "content is not a recognised image")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return skip_record(rel, SKIP_CORRUPT, f"decoding failed: {exc}")


def walk_files(folder: Path, root: Path, ignored: list[dict[str, str]]) -> Iterator[Path]:
    """Regular files under ``folder`` in sorted order, not following links, junk left out."""
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        for name in sorted(dirnames):
            if is_junk((name,)):
                ignored.append({"path": printable_name((here / name).relative_to(root).as_posix()),
                                "reason": "OS junk or hidden folder"})
                dirnames.remove(name)
        dirnames.sort()
        for name in sorted(filenames):
            if is_junk((name,)):
                ignored.append({"path": printable_name((here / name).relative_to(root).as_posix()),
                                "reason": "OS junk or hidden file"})
                continue
            yield here / name
        # os.walk lists links to folders among dirnames but never descends into them.
        for name in dirnames:
            if (here / name).is_symlink():
                yield here / name


def list_classes(root: Path) -> list[str]:
    """Class names: the sorted names of the real (not linked, not hidden) folders in ``root``.

    A folder whose name is not UTF-8 is no class: its name could not be stored as a label.
    """
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink()
                  and not is_junk((p.name,)) and is_utf8(p.name))


def scan_images(root: Path, min_side: int, converted_dir: Path,
                max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> Scan:
    """Find the class folders under ``root`` and decode every file in them once.

    Files over ``max_bytes`` and names that are not UTF-8 are skipped with their reason.
    """
    converted_dir.mkdir(parents=True, exist_ok=True)
    entries = sorted(root.iterdir(), key=lambda p: p.name)
    classes = list_classes(root)
    scan = Scan(classes=classes, seen=0, candidates=[], skipped=[], ignored=[], converted=[])
    for entry in entries:
        if is_junk((entry.name,)):
            scan.ignored.append({"path": entry.name, "reason": "OS junk or hidden"})
        elif entry.name not in classes:
            scan.seen += 1
            reason = (SKIP_LINK if entry.is_symlink() else
                      SKIP_NOT_UTF8 if not is_utf8(entry.name) else SKIP_NOT_IN_CLASS)
            scan.skipped.append(skip_record(entry.name, reason))

    truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, whoever changed this
    try:
        for label in classes:
            for path in walk_files(root / label, root, scan.ignored):
                scan.seen += 1
                rel = path.relative_to(root).as_posix()
                if path.is_symlink() or not path.is_file():
                    scan.skipped.append(skip_record(rel, SKIP_LINK if path.is_symlink() else
                                                    SKIP_NOT_IMAGE, "not a regular file"))
                    continue
                if not is_utf8(rel):
                    scan.skipped.append(skip_record(rel, SKIP_NOT_UTF8))
                    continue
                result = inspect_image(path, rel, label, min_side, converted_dir, max_bytes)
                if isinstance(result, Candidate):
                    scan.candidates.append(result)
                    if result.converted is not None:
                        scan.converted.append({"path": rel, "format": result.format,
                                               "mode": result.mode})
                else:
                    scan.skipped.append(result)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_setting
    return scan


def resolve_duplicates(candidates: list[Candidate]) -> tuple[list[Candidate], list[dict[str, Any]],
                                                              list[dict[str, Any]]]:
    """Keep one file per content; drop every copy of content filed under several classes.

    A photo under two labels is wrong in at least one of them and would leak between
    splits, so no copy is kept. Returns (kept, conflicts, within-class duplicates).
    """
    by_hash: dict[str, list[Candidate]] = defaultdict(list)
    for candidate in candidates:
        by_hash[candidate.sha256].append(candidate)
    kept: list[Candidate] = []
    conflicts: list[dict[str, Any]] = []
    within: list[dict[str, Any]] = []
    for digest in sorted(by_hash):
        group = sorted(by_hash[digest], key=lambda c: c.path)
        labels = sorted({c.label for c in group})
        if len(labels) > 1:
            conflicts.append({"sha256": digest, "classes": labels,
                              "paths": [c.path for c in group]})
            continue
        kept.append(group[0])
        if len(group) > 1:
            within.append({"sha256": digest, "class": labels[0], "kept": group[0].path,
                           "dropped": [c.path for c in group[1:]]})
    return kept, conflicts, within
