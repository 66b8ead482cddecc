"""Validation and split step: decode every image once, drop bad files and label conflicts, split."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import shutil
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.lib import records
from pipeline.lib.archive import (
    DEFAULT_MAX_IMAGE_BYTES,
    SKIP_NOT_UTF8,
    find_class_root,
    is_junk,
    is_utf8,
    printable_name,
    safe_extract,
)
from pipeline.lib.contract import (
    CLASSES_FILE,
    DATA_REPORT_JSON,
    DATA_REPORT_MD,
    META_DATA_COUNTS,
    META_PARAMS,
    META_PATH,
    META_SHA256,
    META_SKIPPED,
    META_SKIPPED_FILES,
    META_SOURCE,
)
from pipeline.lib.files import (
    WriteError,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    replace_dir,
)
from pipeline.lib.params import PreprocessParams

logger = logging.getLogger(__name__)

#: Accepted file name extensions (compared lower-case) and the decoded formats they may hold.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif"})
IMAGE_FORMATS = frozenset({"JPEG", "PNG", "BMP", "GIF"})
#: RGB images in these formats are stored byte for byte; everything else is re-encoded as PNG.
KEEP_ORIGINAL_FORMATS = frozenset({"JPEG", "PNG"})
#: Target bytes per TFRecord shard (at least two shards so readers can interleave).
SHARD_TARGET_BYTES = 100 * 1024 * 1024
REPORT_SCHEMA_VERSION = 1
#: Skipped files named in the step's metadata (the console line); the report lists them all.
SKIPPED_SHOWN = 3

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


def _skip(path: str, reason: str, detail: str = "") -> dict[str, str]:
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
        return _skip(rel, SKIP_EXTENSION, f"extension {extension or '(none)'!r} is not one of "
                     f"{sorted(IMAGE_EXTENSIONS)}")
    size = path.stat().st_size
    if size > max_bytes:
        return _skip(rel, SKIP_TOO_BIG_FILE, f"{size} bytes, over max_image_bytes {max_bytes}")
    data = path.read_bytes()
    if not data:
        return _skip(rel, SKIP_EMPTY)
    digest = hashlib.sha256(data).hexdigest()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                return _skip(rel, SKIP_NOT_IMAGE, f"content is {image.format}, not an accepted "
                             "image format")
            image.load()
            width, height = image.size
            if min(width, height) < min_side:
                return _skip(rel, SKIP_TOO_SMALL, f"{width}x{height} is below min_image_side "
                             f"{min_side}")
            if image.format in KEEP_ORIGINAL_FORMATS and image.mode == "RGB":
                return Candidate(rel, label, digest, path, None, width, height, image.format,
                                 image.mode)
            try:
                rgb = _to_rgb(image)
            except (ValueError, OSError) as exc:
                return _skip(rel, SKIP_MODE, f"cannot convert mode {image.mode} to RGB: {exc}")
            out = converted_dir / f"{digest}.png"
            if not out.exists():
                rgb.save(out, format="PNG")
            return Candidate(rel, label, digest, path, out, width, height, image.format,
                             image.mode)
    except Image.DecompressionBombError as exc:
        return _skip(rel, SKIP_TOO_LARGE, str(exc))
    except UnidentifiedImageError:
        return _skip(rel, SKIP_NOT_IMAGE, "content is not a recognised image")
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        return _skip(rel, SKIP_CORRUPT, f"decoding failed: {exc}")


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
            scan.skipped.append(_skip(entry.name, reason))

    truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file must fail, whoever changed this
    try:
        for label in classes:
            for path in walk_files(root / label, root, scan.ignored):
                scan.seen += 1
                rel = path.relative_to(root).as_posix()
                if path.is_symlink() or not path.is_file():
                    scan.skipped.append(_skip(rel, SKIP_LINK if path.is_symlink() else
                                              SKIP_NOT_IMAGE, "not a regular file"))
                    continue
                if not is_utf8(rel):
                    scan.skipped.append(_skip(rel, SKIP_NOT_UTF8))
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


def split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes for one class: rounded shares, each split non-empty if n >= 3."""
    n_test = math.floor(n * test_fraction + 0.5)
    n_val = math.floor(n * val_fraction + 0.5)
    if n >= 3:
        n_test, n_val = max(1, n_test), max(1, n_val)
    while n_test + n_val > max(n - 1, 0):  # leave at least one training image
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    return n - n_val - n_test, n_val, n_test


def _order_key(seed: int, digest: str) -> str:
    """Seeded, platform-independent shuffle key: a content's position depends on it alone."""
    return hashlib.sha256(f"{seed}:{digest}".encode()).hexdigest()


def assign_splits(items: list[Candidate], classes: list[str], val_fraction: float,
                  test_fraction: float, seed: int) -> dict[str, list[Candidate]]:
    """Stratified split grouped by content hash: all files of one content share a split."""
    groups: dict[str, dict[str, list[Candidate]]] = {label: defaultdict(list) for label in classes}
    for item in items:
        groups[item.label][item.sha256].append(item)
    splits: dict[str, list[Candidate]] = {name: [] for name in records.SPLITS}
    for label in classes:
        digests = sorted(groups[label], key=lambda d: _order_key(seed, d))
        _, n_val, n_test = split_sizes(len(digests), val_fraction, test_fraction)
        parts = {"test": digests[:n_test], "val": digests[n_test:n_test + n_val],
                 "train": digests[n_test + n_val:]}
        for split, chosen in parts.items():
            for digest in chosen:
                splits[split].extend(groups[label][digest])
    for split in splits:  # classes interleaved, in seeded order, so shards are mixed
        splits[split].sort(key=lambda c: (_order_key(seed, c.sha256), c.path))
    return splits


def _examples(items: list[Candidate], index: dict[str, int]) -> Iterator[records.Example]:
    """Encoded bytes for each item, read lazily; originals are re-checked against their hash."""
    for item in items:
        if item.converted is not None:
            data = item.converted.read_bytes()
        else:
            data = item.source.read_bytes()
            if hashlib.sha256(data).hexdigest() != item.sha256:
                raise ValueError(f"{item.path!r} changed while the data set was being prepared")
        yield records.Example(image=data, label=index[item.label], sha256=item.sha256,
                              path=item.path)


def _num_shards(items: list[Candidate]) -> int:
    total = sum((c.converted or c.source).stat().st_size for c in items)
    return max(1, min(len(items), max(2, math.ceil(total / SHARD_TARGET_BYTES))))


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a non-empty folder that is not a prepared data set (user files)."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"output {str(out_dir)!r} exists and is not a folder")
    contents = {p.name for p in out_dir.iterdir()}
    if contents and not contents & {CLASSES_FILE, DATA_REPORT_JSON}:
        raise FileExistsError(
            f"output folder {str(out_dir)!r} is not empty and not a prepared data set; "
            "refusing to replace it"
        )


def _check_counts(classes: list[str], kept: list[Candidate], scan: Scan, root: Path,
                  minimum: int) -> None:
    """Clear errors for the data sets no training could use."""
    if len(classes) < 2:
        raise ValueError(
            f"need at least 2 class folders under {str(root)!r}, found {len(classes)}"
            f"{': ' + ', '.join(map(repr, classes)) if classes else ''}; put each class's "
            "images in its own folder"
        )
    usable = Counter(c.label for c in kept)
    skipped = Counter(s["path"].split("/", 1)[0] for s in scan.skipped)
    short = [label for label in classes if usable[label] < minimum]
    if short:
        details = ", ".join(
            f"{label!r} has {usable[label]}"
            + (" (empty folder)" if usable[label] == 0 and skipped[label] == 0 else
               f" ({skipped[label]} skipped)" if skipped[label] else "")
            for label in short
        )
        raise ValueError(
            f"too few usable images per class: {details}; at least {minimum} are needed "
            "(min_images_per_class) after skipping bad files and label conflicts"
        )


def _ratio(numerator: int, denominator: int) -> float:
    return round(numerator / denominator, 6) if denominator else 0.0


def build_report(scan: Scan, kept: list[Candidate], conflicts: list[dict[str, Any]],
                 within: list[dict[str, Any]], splits: dict[str, list[Candidate]],
                 ignored: list[dict[str, str]], config: PreprocessParams,
                 input_info: dict[str, Any], source_info: Mapping[str, Any] | None
                 ) -> dict[str, Any]:
    """The data report as a JSON-ready dict; deterministic (no times, no temporary paths)."""
    classes = scan.classes
    class_counts = Counter(c.label for c in kept)
    split_counts = {split: {label: sum(1 for c in items if c.label == label)
                            for label in classes} for split, items in splits.items()}
    split_sizes_ = {split: len(items) for split, items in splits.items()}
    # The baseline a model must beat: always answer the training split's largest class.
    train_counts = split_counts["train"]
    majority = max(classes, key=lambda label: (train_counts[label], class_counts[label],
                                               -classes.index(label)))
    conflict_files = sum(len(g["paths"]) for g in conflicts)
    within_files = sum(len(g["dropped"]) for g in within)
    counts = [class_counts[label] for label in classes]
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "input": input_info,
        "source": dict(source_info) if source_info else None,
        "settings": {
            "split_seed": config.split_seed,
            "val_fraction": config.val_fraction,
            "test_fraction": config.test_fraction,
            "min_image_side": config.min_image_side,
            "min_images_per_class": config.min_images_per_class,
        },
        "classes": classes,
        "files_seen": scan.seen,
        "files_used": len(kept),
        "files_skipped": len(scan.skipped),
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in scan.skipped).items())),
        "skipped": sorted(scan.skipped, key=lambda s: s["path"]),
        "duplicates_dropped": conflict_files + within_files,
        "conflicting_files_dropped": conflict_files,
        "conflicting_duplicates": conflicts,
        "within_class_files_dropped": within_files,
        "within_class_duplicates": within,
        "converted_to_rgb": sorted(scan.converted, key=lambda c: c["path"]),
        "ignored": sorted(ignored, key=lambda i: i["path"]),
        "class_counts": {label: class_counts[label] for label in classes},
        "split_counts": split_counts,
        "split_sizes": split_sizes_,
        "imbalance_ratio": _ratio(max(counts), min(counts)),
        "majority_baseline": {
            "class": majority,
            "test_accuracy": _ratio(split_counts["test"][majority], split_sizes_["test"]),
            "overall_accuracy": _ratio(class_counts[majority], len(kept)),
        },
        "split_fingerprints": {
            split: hashlib.sha256("\n".join(sorted(c.sha256 for c in items)).encode()).hexdigest()
            for split, items in splits.items()
        },
    }


def render_report_md(report: Mapping[str, Any]) -> str:
    """The data report for people: the same figures as the JSON, as Markdown tables."""
    classes = report["classes"]
    splits = list(report["split_counts"])
    baseline = report["majority_baseline"]
    lines = [
        "# Data report",
        "",
        f"- input: {report['input'].get('kind')} `{report['input'].get('name')}`"
        + (f" (sha256 `{report['input']['sha256']}`)" if report["input"].get("sha256") else ""),
    ]
    if report.get("source"):
        lines.append("- source: " + ", ".join(f"{k} `{v}`" for k, v in report["source"].items()))
    settings = report["settings"]
    lines += [
        f"- split seed {settings['split_seed']}, val {settings['val_fraction']}, "
        f"test {settings['test_fraction']}, min side {settings['min_image_side']} px",
        f"- files seen: **{report['files_seen']}**, used: **{report['files_used']}**, "
        f"skipped: **{report['files_skipped']}**, duplicates dropped: "
        f"**{report['duplicates_dropped']}** ({report['conflicting_files_dropped']} filed under "
        f"several classes, {report['within_class_files_dropped']} repeated within a class)",
        f"- imbalance ratio (largest / smallest class): {report['imbalance_ratio']}",
        f"- majority-class baseline (always `{baseline['class']}`): test accuracy "
        f"{baseline['test_accuracy']}, overall {baseline['overall_accuracy']}",
        "",
        "## Images per class and split",
        "",
        "| class | index | " + " | ".join(splits) + " | total |",
        "| --- | ---: | " + " | ".join("---:" for _ in splits) + " | ---: |",
    ]
    for index, label in enumerate(classes):
        cells = " | ".join(str(report["split_counts"][s][label]) for s in splits)
        lines.append(f"| {label} | {index} | {cells} | {report['class_counts'][label]} |")
    sizes = " | ".join(str(report["split_sizes"][s]) for s in splits)
    lines.append(f"| **all** | | {sizes} | {report['files_used']} |")
    if report["skipped"]:
        lines += ["", "## Skipped files", "", "| file | reason | detail |", "| --- | --- | --- |"]
        lines += [f"| `{s['path']}` | {s['reason']} | {s['detail'].replace('|', '/')} |"
                  for s in report["skipped"]]
    if report["conflicting_duplicates"]:
        lines += ["", "## Same image under several classes (every copy dropped)", "",
                  "| sha256 | files |", "| --- | --- |"]
        lines += [f"| `{g['sha256'][:16]}` | " + ", ".join(f"`{p}`" for p in g["paths"]) + " |"
                  for g in report["conflicting_duplicates"]]
    if report["within_class_duplicates"]:
        lines += ["", "## Repeated within a class (one copy kept)", "",
                  "| kept | dropped |", "| --- | --- |"]
        lines += [f"| `{g['kept']}` | " + ", ".join(f"`{p}`" for p in g["dropped"]) + " |"
                  for g in report["within_class_duplicates"]]
    if report["converted_to_rgb"]:
        lines += ["", "## Converted to RGB (stored as PNG)", "", "| file | was |", "| --- | --- |"]
        lines += [f"| `{c['path']}` | {c['format']} {c['mode']} |"
                  for c in report["converted_to_rgb"]]
    return "\n".join(lines) + "\n"


def prepare_dataset(raw: str | Path, out_dir: str | Path, config: PreprocessParams, *,
                    source_info: Mapping[str, Any] | None = None,
                    skipped_upstream: Sequence[Mapping[str, str]] = ()) -> dict[str, Any]:
    """Validate ``raw`` (archive or folder of class folders) and write the split data set.

    Extracts archives safely, decodes every image once, drops bad files and content filed
    under several classes, splits stratified and grouped by content hash, and writes TFRecord
    shards, ``classes.json`` and the data report into ``out_dir``. Everything is built in a
    temporary folder next to ``out_dir`` and moved into place at the end, so a failure leaves
    nothing half-written. ``source_info`` (e.g. URL and sha256) is copied into the report,
    and ``skipped_upstream`` (what the download step did not copy: links, FIFOs) joins its
    skipped files. Returns the report.
    """
    raw, out_dir = Path(raw), Path(out_dir)
    if not raw.exists():
        raise FileNotFoundError(f"raw data set not found: {str(raw)!r}")
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.work-", dir=out_dir.parent))
    try:
        ignored: list[dict[str, str]] = []
        if raw.is_dir():
            root = find_class_root(raw)
            input_info: dict[str, Any] = {"kind": "folder", "name": raw.name}
        else:
            extraction = safe_extract(
                raw, work / "extracted", max_bytes=config.max_archive_bytes,
                max_entries=config.max_archive_entries,
                max_entry_ratio=config.max_entry_compression_ratio,
                max_archive_ratio=config.max_archive_compression_ratio)
            root = extraction.root
            ignored += [{"path": s["path"], "reason": s["reason"]} for s in extraction.skipped]
            input_info = {"kind": "archive", "name": raw.name, "sha256": file_sha256(raw),
                          "bytes": raw.stat().st_size}
        classes = list_classes(root)
        if len(classes) < 2:  # fail before decoding anything
            _check_counts(classes, [], Scan(classes, 0, [], [], [], []), root,
                          config.min_images_per_class)
        scan = scan_images(root, config.min_image_side, work / "converted",
                           config.max_image_bytes)
        scan.skipped += [_skip(s["path"], s["reason"], s.get("detail", ""))
                         for s in skipped_upstream]
        scan.seen += len(skipped_upstream)
        ignored += scan.ignored
        kept, conflicts, within = resolve_duplicates(scan.candidates)
        _check_counts(scan.classes, kept, scan, root, config.min_images_per_class)
        splits = assign_splits(kept, scan.classes, config.val_fraction, config.test_fraction,
                               config.split_seed)
        report = build_report(scan, kept, conflicts, within, splits, ignored, config,
                              input_info, source_info)

        build = work / "build"
        index = {label: i for i, label in enumerate(scan.classes)}
        try:
            for split, items in splits.items():
                records.write_split(build, split, _examples(items, index), _num_shards(items))
            records.write_classes(build, scan.classes)
            atomic_write_json(build / DATA_REPORT_JSON, report)
            atomic_write_text(build / DATA_REPORT_MD, render_report_md(report))
        except WriteError as exc:  # e.g. a full disk: say where the data set was going
            raise WriteError(exc.errno, f"cannot write the prepared data set "
                             f"{str(out_dir)!r}: {exc.strerror}") from exc
        replace_dir(build, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    logger.info(
        "prepared %s: %d files seen, %d used, %d skipped, %d duplicates dropped; "
        "train/val/test = %s", out_dir, report["files_seen"], report["files_used"],
        report["files_skipped"], report["duplicates_dropped"],
        "/".join(str(report["split_sizes"][s]) for s in records.SPLITS),
    )
    return report


def run_step(raw_dir: str | Path, raw_metadata: Mapping[str, Any], out_dir: str | Path,
             report_md_path: str | Path, params: PreprocessParams) -> dict[str, Any]:
    """The ``preprocess_dataset`` component's body: prepare the data, describe the artifact.

    The Markdown report is copied to ``report_md_path`` (what the KFP UI renders). The
    returned metadata carries the source, digest and preprocess params forward, so the
    (uncached) tracking steps can log them even when this step was served from the cache.
    """
    source = {META_SOURCE: raw_metadata.get(META_SOURCE, ""),
              META_SHA256: raw_metadata.get(META_SHA256, "")}
    raw = Path(raw_dir) / raw_metadata.get(META_PATH, "")
    report = prepare_dataset(raw, out_dir, params, source_info=source,
                             skipped_upstream=raw_metadata.get(META_SKIPPED) or ())
    shutil.copyfile(Path(out_dir) / DATA_REPORT_MD, report_md_path)
    upstream = dict(raw_metadata.get(META_PARAMS, {}))  # the download step's params
    return {**source, META_PARAMS: {**upstream, **params.to_dict()},
            **{key: report[key] for key in META_DATA_COUNTS},
            META_SKIPPED_FILES: [f"{s['path']} ({s['reason']})"
                                 for s in report["skipped"][:SKIPPED_SHOWN]]}


__all__ = [
    "Candidate",
    "assign_splits",
    "build_report",
    "inspect_image",
    "list_classes",
    "prepare_dataset",
    "render_report_md",
    "resolve_duplicates",
    "run_step",
    "scan_images",
    "split_sizes",
    "walk_files",
]
