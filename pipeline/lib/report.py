"""Evaluation figures (PNG) and the self-contained HTML report (images inlined as base64)."""

from __future__ import annotations

import base64
import html
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: pipeline pods and CI have no display
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from pipeline.lib.files import atomic_write_text, atomic_writer

logger = logging.getLogger(__name__)


def _save(fig: plt.Figure, path: Path) -> Path:
    """Write atomically (temp file, then rename) so a crash leaves no half-written PNG."""
    try:
        with atomic_writer(path, "wb") as handle:
            fig.savefig(handle, format="png", dpi=90, bbox_inches="tight")
    finally:
        plt.close(fig)
    return Path(path)


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str],
                          path: str | Path) -> Path:
    """Counts per (true, predicted) class, darker = more; the diagonal is what is right."""
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.6 * len(classes) + 2, 1.4 * len(classes) + 1.5))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test split)")
    threshold = cm.max() / 2 if cm.size and cm.max() else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > threshold else "black")
    return _save(fig, Path(path))


def plot_training_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Loss and accuracy per epoch for training and validation, phases marked."""
    return _save(training_curves_figure(history), Path(path))


#: Up to this many epochs each one gets a marker, so a single epoch (a head fitted in one
#: closed-form step) is a visible dot rather than an invisible zero-length line.
_MARKED_EPOCHS = 20


def training_curves_figure(history: Sequence[Mapping[str, Any]]) -> plt.Figure:
    """The figure behind :func:`plot_training_curves`: only the series the history has.

    Epochs are the history's own 1-based numbers, on integer ticks; a key missing or not
    finite in an entry leaves that point out instead of drawing NaN.
    """
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for name, label in ((key, f"train {key}"), (f"val_{key}", f"val {key}")):
            points = [(int(h["epoch"]), float(h[name])) for h in history
                      if isinstance(h.get(name), (int, float)) and math.isfinite(h[name])]
            if points:
                epochs, values = zip(*points, strict=True)
                ax.plot(epochs, values, label=label, markersize=4,
                        marker="o" if len(points) <= _MARKED_EPOCHS else None)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.set_title(key)
        for prev, cur in itertools.pairwise(history):
            if prev.get("phase") != cur.get("phase"):
                ax.axvline(cur["epoch"] - 0.5, color="grey", linestyle=":", linewidth=1)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, f"no {key} recorded", ha="center", transform=ax.transAxes)
    return fig


def plot_image_grid(images: Sequence[np.ndarray], titles: Sequence[str], path: str | Path,
                    *, columns: int = 6, heatmaps: Sequence[np.ndarray] | None = None) -> Path:
    """A grid of images with a title each (e.g. misclassified test images, true vs predicted);
    ``heatmaps`` (values 0..1 on any grid, one per image) are laid over them, translucent."""
    count = max(len(images), 1)
    cols = min(columns, count)
    rows = (count + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for n, (ax, image, title) in enumerate(zip(axes.flat, images, titles, strict=False)):
        pixels = np.asarray(image).astype(np.uint8)
        ax.imshow(pixels)
        if heatmaps is not None:
            height, width = pixels.shape[:2]
            ax.imshow(heatmaps[n], cmap="jet", alpha=0.35, vmin=0.0, vmax=1.0,
                      interpolation="bilinear", extent=(0, width, height, 0))
        ax.set_title(title, fontsize=7)
    if not images:
        axes[0][0].text(0.5, 0.5, "none", ha="center", va="center")
    return _save(fig, Path(path))


def _img_tag(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).is_file():
        return f"<p><em>{html.escape(alt)}: not available</em></p>"
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def _interval(values: Mapping[str, Any], name: str) -> str:
    """``low – high`` of ``name``'s interval in ``values``, or "n/a" when it has none."""
    low, high = values.get(f"{name}_ci_low"), values.get(f"{name}_ci_high")
    if low is None or high is None:
        return "n/a"
    return f"{_fmt(float(low))} &ndash; {_fmt(float(high))}"


def render_html(
    metrics: Mapping[str, Any],
    data_report: Mapping[str, Any] | None,
    figures: Mapping[str, Path | None],
    path: str | Path,
) -> Path:
    """One HTML file with everything inlined, so it can be mailed or stored as one artifact."""
    classes = metrics["classes"]
    baseline = metrics["baseline"]
    gate = "PASSED" if metrics["gate_passed"] else "FAILED"
    gated = (" (lower end of its 95% interval)" if metrics.get("gate_on") == "ci_low"
             else "")
    rows = "".join(
        f"<tr><td>{html.escape(c)}</td>"
        + "".join(f"<td>{_fmt(metrics['per_class'][c][k])}</td>" for k in ("precision", "recall"))
        + f"<td>{_interval(metrics['per_class'][c], 'recall')}</td>"
        + "".join(f"<td>{_fmt(metrics['per_class'][c][k])}</td>" for k in ("f1", "support"))
        + "</tr>"
        for c in classes
    )
    summary_rows = "".join(
        f"<tr><td>{name}</td><td>{_fmt(metrics[name])}</td><td>{_interval(metrics, name)}</td>"
        f"<td>{_fmt(baseline[name])}</td></tr>"
        for name in ("accuracy", "balanced_accuracy", "macro_f1")
    )
    data_html = "<p><em>no data report found</em></p>"
    if data_report:
        counts = data_report.get("split_counts") or {}
        count_rows = "".join(
            f"<tr><td>{html.escape(str(split))}</td>"
            + "".join(f"<td>{_fmt((counts.get(split) or {}).get(c, 0))}</td>" for c in classes)
            + "</tr>"
            for split in counts
        )
        facts = {k: data_report.get(k) for k in ("files_seen", "files_used", "files_skipped",
                                                 "duplicates_dropped", "imbalance_ratio",
                                                 "majority_baseline")
                 if k in data_report}
        fact_html = "".join(f"<li>{html.escape(k)}: {_fmt(v)}</li>" for k, v in facts.items())
        data_html = (
            f"<ul>{fact_html}</ul>"
            + ("<table><tr><th>split</th>" + "".join(f"<th>{html.escape(c)}</th>" for c in classes)
               + f"</tr>{count_rows}</table>" if count_rows else "")
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Iris classifier evaluation</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: right; }}
td:first-child, th:first-child {{ text-align: left; }}
.pass {{ color: #17702c; }} .fail {{ color: #a51d1d; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Iris classifier: evaluation on the held-out test split</h1>
<p>Model <b>{html.escape(str(metrics.get("model", "?")))}</b>,
{metrics["test_examples"]} test images.
Gate: {html.escape(metrics["gate_metric"])}{gated} = {_fmt(metrics["gate_value"])} &ge;
{_fmt(metrics["gate_threshold"])}?
<b class="{"pass" if metrics["gate_passed"] else "fail"}">{gate}</b></p>
<h2>Summary (model vs majority-class baseline)</h2>
<table><tr><th>metric</th><th>model</th><th>95% interval</th>
<th>baseline ({html.escape(str(baseline["class"]))})</th></tr>
{summary_rows}</table>
<p>Interval: {html.escape(str(metrics.get("interval_method", "n/a")))}. A difference
between two runs smaller than these intervals' width is not evidence that one is better.</p>
<h2>Per class</h2>
<table><tr><th>class</th><th>precision</th><th>recall</th><th>recall 95% interval</th>
<th>F1</th><th>support</th></tr>{rows}</table>
<h2>Confusion matrix</h2>{_img_tag(figures.get("confusion_matrix"), "confusion matrix")}
<h2>Training curves</h2>{_img_tag(figures.get("training_curves"), "training curves")}
<h2>Data</h2>{data_html}
<h2>Misclassified test images ({metrics["misclassified"]}): true and predicted class, every
class's probability</h2>
<p>The colours (Grad-CAM, red strongest) show where each image pushed the model towards the
class it predicted; a model without a pretrained backbone has none.</p>
{_img_tag(figures.get("misclassified"), "misclassified test images")}
<h2>Most confident correct test images per class</h2>
{_img_tag(figures.get("confident_correct"), "most confident correct test images")}
</body></html>
"""
    return atomic_write_text(path, page)


__all__ = ["plot_confusion_matrix", "plot_image_grid", "plot_training_curves", "render_html"]
