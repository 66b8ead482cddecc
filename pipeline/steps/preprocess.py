"""Validation and split step: decode every image once, drop bad files and label conflicts, split."""

from __future__ import annotations

import hashlib
import logging
import math
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.lib import records
from pipeline.lib.archive import find_class_root, safe_extract
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
from pipeline.lib.data_report import build_report, render_report_md
from pipeline.lib.files import (
    WriteError,
    atomic_write_json,
    atomic_write_text,
    file_sha256,
    replace_dir,
)
from pipeline.lib.params import PreprocessParams
from pipeline.lib.scan import (
    Candidate,
    Scan,
    list_classes,
    resolve_duplicates,
    scan_images,
    skip_record,
)
from pipeline.lib.splits import assign_splits

logger = logging.getLogger(__name__)

#: Target bytes per TFRecord shard (at least two shards so readers can interleave).
SHARD_TARGET_BYTES = 100 * 1024 * 1024
#: Skipped files named in the step's metadata (the console line); the report lists them all.
SKIPPED_SHOWN = 3


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
        scan.skipped += [skip_record(s["path"], s["reason"], s.get("detail", ""))
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


__all__ = ["prepare_dataset", "run_step"]
