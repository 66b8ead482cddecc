"""The data report: what preprocessing kept, skipped and split, as JSON and as Markdown."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from typing import Any

from pipeline.lib.params import PreprocessParams
from pipeline.lib.scan import Candidate, Scan

REPORT_SCHEMA_VERSION = 1


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
