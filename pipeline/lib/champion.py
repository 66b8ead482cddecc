"""The champion rule: which alias a new version gets against the current champion, and why.

On ~60 test images two runs of one config differ by more than most real improvements, so the
rule is paired: a bootstrap of the difference over the same images, and the alias moves only
when the interval's lower end clears the margin. The champion's per-image predictions are
not recomputed when both were scored on the same data and split: each version carries a tag
pointing at its evaluate run's ``predictions.csv``, one small download. On other data or
another split the champion is scored on *this* run's test images (as TFX's Evaluator scores
its baseline on the candidate's evaluation data); only when it cannot be loaded are the point
estimates compared, and the decision says so. A version of other classes is never compared
with the champion at all (:class:`ClassMismatchError`).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.lib import stats
from pipeline.lib.promotion import CHALLENGER, CHAMPION, message

logger = logging.getLogger(__name__)

#: Version tag holding the gate metric's value, so later runs compare without run lookups.
METRIC_TAG_PREFIX = "metric."
#: Version tags naming what a version was scored on, where its predictions are kept, and
#: the class names it predicts (a JSON list, in output order).
DATA_TAG = "data.sha256"
SPLIT_TAG = "data.split_digest"
PREDICTIONS_TAG = "predictions_uri"
CLASSES_TAG = "classes"
#: Version tags of the comparison with the champion that decided the alias.
COMPARISON_TAG_PREFIX = "compare."
#: Test images per forward pass when the champion is scored on this run's test split: few,
#: so a model with test-time views fits the register step's memory.
RESCORE_BATCH = 8


class ClassMismatchError(ValueError):
    """A new version predicts other classes than the champion: it cannot be compared with it."""


@dataclasses.dataclass(frozen=True)
class Evidence:
    """A model's test-split evidence: its per-image predictions and what they were made on.

    ``predictions`` is the local ``predictions.csv`` of the evaluate step;
    ``predictions_uri`` (``runs:/<evaluate run id>/predictions.csv``) is the copy kept in
    MLflow that later registrations download; ``data_sha256`` and ``split_digest`` identify
    the data and the split (``evaluate.split_digest``); ``test_data`` is the prepared data
    set those predictions were made on, where a champion scored on other data is scored
    again (None: it cannot be, and such a champion is compared by point estimate).
    """

    predictions: str | Path
    predictions_uri: str
    data_sha256: str
    split_digest: str
    test_data: str | Path | None = None

    def read(self) -> stats.Predictions:
        return stats.Predictions.read_csv(self.predictions)

    def tags(self) -> dict[str, str]:
        return {DATA_TAG: self.data_sha256, SPLIT_TAG: self.split_digest,
                PREDICTIONS_TAG: self.predictions_uri,
                CLASSES_TAG: json.dumps(list(self.read().classes))}


@dataclasses.dataclass(frozen=True)
class Decision:
    """Which alias a new version gets, why, and the champion it was compared with."""

    alias: str
    reason: str
    comparison: dict[str, Any]
    champion_version: str | None
    champion_value: float | None


def metric_tag(metric_name: str) -> str:
    return f"{METRIC_TAG_PREFIX}{metric_name}"


def comparison_tags(comparison: dict[str, Any]) -> dict[str, str]:
    return {f"{COMPARISON_TAG_PREFIX}{k}": str(v) for k, v in comparison.items()
            if v is not None}


def champion_metric(
    client: MlflowClient, name: str, metric_name: str,
) -> tuple[str | None, float | None]:
    """(version, metric value) of the current ``champion`` of ``name``; (None, None) if none.

    The value comes from the version tag the registration sets, else from the metric of the
    run that produced the version. A champion whose value cannot be found yields
    (version, None).
    """
    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            return None, None
        raise
    number = str(version.version)  # an int from some stores
    tagged = (version.tags or {}).get(metric_tag(metric_name))
    if tagged is not None:
        try:
            return number, float(tagged)
        except ValueError:
            logger.warning("champion version %s has a bad %s tag %r", version.version,
                           metric_tag(metric_name), tagged)
    if version.run_id:
        try:
            value = client.get_run(version.run_id).data.metrics.get(metric_name)
        except MlflowException:
            value = None
        if value is not None:
            return number, float(value)
    return number, None


def decide(client: MlflowClient, name: str, champion: tuple[str | None, float | None],
           metric_name: str, metric_value: float, evidence: Evidence | None,
           margin: float) -> Decision:
    """The alias a new version with ``metric_value`` gets against ``champion`` (version, value).

    ``ClassMismatchError`` when the new version's classes differ from the champion's.
    """
    champion_version, champion_value = champion
    if champion_version is None:
        return Decision(CHAMPION, f"first version of {name!r}: becomes champion",
                        {"method": "none"}, None, None)
    tags = client.get_model_version(name, champion_version).tags or {}
    stored, why_not_stored = _stored_predictions(client, champion_version, tags)
    ours = evidence.read() if evidence is not None else None
    if ours is not None:
        _require_same_classes(name, champion_version, _classes(tags, stored), ours.classes)
    if champion_value is None:
        return Decision(CHALLENGER, f"champion v{champion_version} has no recorded "
                        f"{metric_name}: it stays champion", {"method": "none"},
                        champion_version, None)
    promote, reason, comparison = compare_with_champion(
        client, name, champion_version, champion_value, metric_name, metric_value, evidence,
        margin, tags=tags, stored=stored, why_not_stored=why_not_stored)
    return Decision(CHAMPION if promote else CHALLENGER, reason, comparison, champion_version,
                    champion_value)


def _classes(tags: dict[str, str], stored: stats.Predictions | None) -> tuple[str, ...] | None:
    """The champion's classes: its ``classes`` tag, else its predictions' header."""
    if CLASSES_TAG in tags:
        try:
            return tuple(str(c) for c in json.loads(tags[CLASSES_TAG]))
        except (TypeError, ValueError):
            logger.warning("ignoring a malformed %s tag %r", CLASSES_TAG, tags[CLASSES_TAG])
    return stored.classes if stored is not None else None


def _require_same_classes(name: str, champion_version: str, theirs: tuple[str, ...] | None,
                          ours: tuple[str, ...]) -> None:
    """``ClassMismatchError`` naming both class lists and a registered-model name to use."""
    if theirs is None or tuple(theirs) == tuple(ours):
        return
    suffix = hashlib.sha256(json.dumps(list(ours)).encode()).hexdigest()[:8]
    raise ClassMismatchError(
        f"this model predicts classes {list(ours)}, but champion v{champion_version} of "
        f"{name!r} predicts {list(theirs)}: a model of other classes is never compared with "
        f"that champion or given its alias, so nothing was registered. Register it under a "
        f"name of its own, e.g. --set registered_model_name={name}-{suffix}")


def compare_with_champion(
    client: MlflowClient, name: str, champion_version: str, champion_value: float,
    metric_name: str, metric_value: float, evidence: Evidence | None, margin: float, *,
    tags: dict[str, str], stored: stats.Predictions | None, why_not_stored: str | None,
) -> tuple[bool, str, dict[str, Any]]:
    """(promote?, reason, comparison) of a new version against the current champion.

    Paired on the champion's recorded predictions (``stored``) when both were scored on the
    same data and split (equal ``data.sha256`` and non-empty ``data.split_digest`` tags);
    else, given this run's test data, on the champion's predictions of those images, made
    now. Promote only when the lower end of the 95% interval of the difference exceeds
    ``margin``. Otherwise (the champion cannot be loaded) promote when the point estimates
    differ by more than ``margin``, and the reason says why the comparison was not paired.
    ``tags`` are the champion version's; ``stored`` and ``why_not_stored`` come from
    :func:`_stored_predictions`.
    """
    why_unpaired = _unpaired_reason(champion_version, tags, metric_name, evidence,
                                    why_not_stored)
    difference, basis = None, f"same data and split as champion v{champion_version}"
    if why_unpaired is None:
        try:
            difference = _paired(stored, metric_name, evidence)
        except ValueError as exc:
            why_unpaired = (f"champion v{champion_version}'s per-image predictions are not "
                            f"usable ({exc})")
    if difference is None and evidence is not None and evidence.test_data is not None \
            and metric_name in stats.METRICS:
        try:
            rescored = score_on_test_split(client, name, champion_version, evidence.test_data)
            difference = _paired(rescored, metric_name, evidence)
            basis = (f"{why_unpaired}: scored champion v{champion_version} on this run's "
                     "test images")
        except ClassMismatchError:
            raise
        except Exception as exc:  # it cannot be loaded or run: point estimates
            why_unpaired += (f"; champion v{champion_version} could not be scored on this "
                             f"run's test images ({message(exc)})")
    if difference is not None:
        promote = difference.ci_low > margin
        verdict = ("lower end above the margin: becomes champion" if promote else
                   "lower end not above the margin: not shown to be better, stays challenger")
        reason = f"{basis}: {difference.describe()}; margin {margin:.4f}: {verdict}"
        return promote, reason, {
            "method": "paired_bootstrap", "champion_version": champion_version,
            "champion_predictions": "recorded" if why_unpaired is None else "rescored",
            "difference": difference.value, "difference_ci_low": difference.ci_low,
            "difference_ci_high": difference.ci_high, "confidence": difference.confidence,
            "images": difference.images, "margin": margin}
    change = metric_value - champion_value
    promote = change > margin
    verdict = "beats" if promote else "does not beat"
    reason = (f"{why_unpaired}: compared by point estimate: {metric_name} {metric_value:.4f} "
              f"{verdict} champion v{champion_version}'s {champion_value:.4f} (difference "
              f"{change:+.4f}, margin {margin:.4f})")
    return promote, reason, {"method": "point_estimate", "champion_version": champion_version,
                             "difference": change, "margin": margin,
                             "unpaired_because": why_unpaired}


def _unpaired_reason(champion_version: str, champion_tags: dict[str, str], metric_name: str,
                     evidence: Evidence | None, why_not_stored: str | None) -> str | None:
    """Why the champion's recorded predictions cannot be paired with ours, or None."""
    if evidence is None:
        return "no per-image predictions were given for the new version"
    if metric_name not in stats.METRICS:
        return f"{metric_name} has no paired bootstrap"
    if PREDICTIONS_TAG not in champion_tags:
        return f"champion v{champion_version} has no per-image predictions on record"
    theirs = (champion_tags.get(DATA_TAG, ""), champion_tags.get(SPLIT_TAG, ""))
    ours = (evidence.data_sha256, evidence.split_digest)
    if not ours[1] or theirs != ours:
        return (f"champion v{champion_version} was evaluated on other data or another split "
                f"(data sha256 {theirs[0][:12] or '?'} vs {ours[0][:12] or '?'}, split digest "
                f"{theirs[1][:12] or '?'} vs {ours[1][:12] or '?'})")
    return why_not_stored


def _stored_predictions(client: MlflowClient, champion_version: str, tags: dict[str, str]
                        ) -> tuple[stats.Predictions | None, str | None]:
    """(the champion's recorded per-image predictions, None) or (None, why they are unusable)."""
    uri = tags.get(PREDICTIONS_TAG)
    if uri is None:
        return None, None
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    try:
        if not uri.startswith("runs:/") or not run_id or not path:
            raise ValueError(f"{PREDICTIONS_TAG} {uri!r} is not runs:/<run id>/<path>")
        with tempfile.TemporaryDirectory(prefix="champion-predictions-") as tmp:
            return stats.Predictions.read_csv(client.download_artifacts(run_id, path, tmp)), None
    except (MlflowException, OSError, ValueError) as exc:
        return None, (f"champion v{champion_version}'s per-image predictions are not usable "
                      f"({message(exc)})")


def _paired(theirs: stats.Predictions | None, metric_name: str,
            evidence: Evidence) -> stats.Difference:
    """Paired bootstrap of new minus champion on the images both predictions share."""
    if theirs is None:
        raise ValueError("no predictions")
    ours = evidence.read()
    labels, new, old = stats.align(ours, theirs)
    return stats.paired_difference(labels, new, old, len(ours.classes), metric_name)


def score_on_test_split(client: MlflowClient, name: str, version: str,
                        data_dir: str | Path) -> stats.Predictions:
    """Version ``version`` of ``name``'s predictions of ``data_dir``'s test images, made now.

    The registered model is loaded as the pyfunc model it is served as and sent each test
    image's original bytes, so it scores them exactly as a client would. Imports TensorFlow
    (the model's), and only here: a registration on recorded predictions never does.
    """
    import mlflow
    import pandas as pd

    from pipeline.lib import records

    with tempfile.TemporaryDirectory(prefix="champion-model-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, version), dst_path=tmp,
            tracking_uri=client.tracking_uri)
        model = mlflow.pyfunc.load_model(local)
    classes = tuple(str(c) for c in (model.metadata.metadata or {}).get("classes", ()))
    examples = records.read_split(data_dir, "test")
    data_classes = tuple(records.load_classes(data_dir))
    _require_same_classes(name, version, classes or None, data_classes)
    frames = [model.predict(pd.DataFrame({"image": [
        base64.b64encode(e.image).decode() for e in examples[i:i + RESCORE_BATCH]]}))
        for i in range(0, len(examples), RESCORE_BATCH)]
    probabilities = pd.concat(frames)[list(data_classes)].to_numpy(dtype=float)
    logger.info("%s v%s scored on %d test images of %s", name, version, len(examples), data_dir)
    return stats.Predictions(tuple(e.sha256 for e in examples),
                             np.array([e.label for e in examples], dtype=np.int64),
                             probabilities.argmax(axis=1), probabilities, data_classes)


__all__ = [
    "ClassMismatchError",
    "Decision",
    "Evidence",
    "champion_metric",
    "compare_with_champion",
    "comparison_tags",
    "decide",
    "metric_tag",
    "score_on_test_split",
]
