"""A model card in Markdown: what the model is, what it was trained and tested on, how it
scored beside the majority baseline, why it got its alias and where it goes wrong.

MLflow's registry renders a model version's description as Markdown, so the register step
puts the card there (:func:`describe_version`); the card is built only from what the
evaluate step wrote (``metrics.json``) and the train step's model metadata, so the same
text can be shown wherever those two are at hand.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.lib.contract import CV_SCORE_PREFIX, META_TRAIN_PARAMS, METRICS_FILE
from pipeline.lib.files import read_json

logger = logging.getLogger(__name__)

#: Metrics the card lists, in this order, when the evaluation has them.
CARD_METRICS = ("balanced_accuracy", "accuracy", "macro_f1")
#: MLflow's limit on a model version's description (characters).
MAX_DESCRIPTION = 5000


def _whole(value: Any) -> Any:
    """A whole number as an int: KFP hands artifact metadata on as protobuf Structs, whose
    numbers are all floats, so 320 comes back as 320.0."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _interval(metrics: Mapping[str, Any], name: str) -> str:
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    return f"[{low:.3f}, {high:.3f}]" if low is not None and high is not None else "n/a"


def _most_confused(metrics: Mapping[str, Any]) -> str | None:
    """The largest off-diagonal cell of the confusion matrix, in words."""
    matrix, classes = metrics.get("confusion_matrix"), metrics.get("classes")
    if not matrix or not classes:
        return None
    cells = [(count, i, j) for i, row in enumerate(matrix) for j, count in enumerate(row)
             if i != j and count]
    if not cells:
        return None
    count, true, pred = max(cells)
    total = sum(matrix[true])
    return (f"{_whole(count)} of {_whole(total)} test images of {classes[true]} were called "
            f"{classes[pred]}, the most frequent confusion")


def _cross_validation(model_metadata: Mapping[str, Any]) -> list[str]:
    """How a ``cv_folds`` model was made and scored out of fold (nothing without folds)."""
    folds = model_metadata.get(f"{CV_SCORE_PREFIX}folds")
    if not folds:
        return []
    scores = "; ".join(
        f"{name} {model_metadata[key]:.3f} {_interval(model_metadata, key)}"
        for name in CARD_METRICS if (key := f"{CV_SCORE_PREFIX}{name}") in model_metadata)
    return [f"**Cross-validated**: {_whole(folds)} folds over the "
            f"{_whole(model_metadata.get(f'{CV_SCORE_PREFIX}images', '?'))} train + validation "
            "images, each scored by a head that never saw it: " + scores + ". The model is "
            f"the {_whole(folds)} fold heads averaged.", ""]


def card(metrics: Mapping[str, Any], model_metadata: Mapping[str, Any],
         decision: Mapping[str, Any] | None = None) -> str:
    """The card's Markdown from evaluate's metrics, train's metadata and the registry decision."""
    params = model_metadata.get(META_TRAIN_PARAMS) or {}
    baseline = metrics.get("baseline") or {}
    lines = ["## Model card", "", "**Model**: " + ", ".join(filter(None, [
        f"{params.get('backbone', metrics.get('model', ''))}"
        + (f" (alpha {params['alpha']})" if params.get("alpha") is not None else ""),
        f"{_whole(params['image_size'])} px input" if params.get("image_size") else "",
        f"{params['pooling']} pooling" if params.get("pooling") else "",
        f"{int(params['tta_views'])} test-time views" if params.get("tta_views") else
        "one view per image",
        f"seed {_whole(params['seed'])}" if params.get("seed") is not None else ""]))
        + ". Takes raw "
        "RGB images of any size (a base64 JPEG or PNG per row when served).", ""]
    support = {c: v.get("support") for c, v in (metrics.get("per_class") or {}).items()}
    cv_images = model_metadata.get(f"{CV_SCORE_PREFIX}images")
    trained_on = (f"{_whole(cv_images)} train + validation images" if cv_images else
                  f"{_whole(model_metadata.get('train_examples', '?'))} training images")
    lines += [f"**Data**: sha256 `{metrics.get('data_sha256') or 'unknown'}`, test split digest "
              f"`{metrics.get('split_digest', 'unknown')}`; {trained_on}; "
              f"{metrics.get('test_examples', '?')} test images ("
              + ", ".join(f"{c} {_whole(n)}" for c, n in support.items()) + ").", ""]
    lines += _cross_validation(model_metadata)
    lines += ["**Test metrics** (95% intervals: " + str(metrics.get("interval_method", ""))
              + ")", "", "| metric | value | 95% interval | majority baseline |",
              "| --- | --- | --- | --- |"]
    for name in CARD_METRICS:
        if name in metrics:
            base = baseline.get(name)
            lines.append(f"| {name} | {metrics[name]:.3f} | {_interval(metrics, name)} | "
                         + (f"{base:.3f}" if base is not None else "n/a") + " |")
    lines.append("")
    if decision and decision.get("registered"):
        lines += [f"**Alias @{decision['alias']}**: {decision.get('reason', '')}", ""]
    limits = ["tested on "
              f"{metrics.get('test_examples', 'few')} images only: the intervals, not the "
              "point estimates, say what the model can be trusted with"]
    confused = _most_confused(metrics)
    if confused:
        limits.append(confused)
    classes = metrics.get("classes") or list(support)
    limits.append(f"knows {len(classes)} classes only ({', '.join(classes)}): any other "
                  "picture gets one of them")
    lines += ["**Known limits**:", "", *[f"- {limit}" for limit in limits], ""]
    return "\n".join(lines)


def describe_version(decision: Mapping[str, Any], evaluation_dir: str | Path,
                     model_metadata: Mapping[str, Any],
                     client: MlflowClient | None = None) -> None:
    """Make the registered version's description its model card (best effort: logged)."""
    if not decision.get("registered"):
        return
    metrics = read_json(Path(evaluation_dir) / METRICS_FILE)
    if not metrics:
        logger.warning("no %s in %s: the version keeps its short description", METRICS_FILE,
                       evaluation_dir)
        return
    try:
        (client or MlflowClient()).update_model_version(
            decision["name"], decision["version"],
            description=card(metrics, model_metadata, decision)[:MAX_DESCRIPTION])
    except MlflowException as exc:
        logger.warning("could not write the model card of %s v%s: %s", decision["name"],
                       decision["version"], exc)


__all__ = ["card", "describe_version"]
