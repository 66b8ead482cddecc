"""Batch-prediction step: score new, unlabelled images with a registered model; check drift.

The images go through preprocess's checks (``inspect_image``: extension, size limits, a
full decode; archives through ``safe_extract``'s limits), without class folders: every file
under the source is a new image, and a bad one is skipped with its reason. The model is
loaded with ``mlflow.pyfunc`` from the registry, so the labels are what serving answers for
the same files (same decoder, same test-time views). Its drift reference (stored with the
model version at training time, ``pipeline.lib.drift``) is compared with the new images'
features under the same model.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lib import drift, tracking_log, tracking_runs
from pipeline.lib.archive import SKIP_NOT_UTF8, find_class_root, is_utf8, safe_extract
from pipeline.lib.contract import (
    BATCH_PREDICTIONS_FILE,
    DRIFT_REPORT_JSON,
    DRIFT_REPORT_MD,
    META_DRIFT_VERDICT,
    META_FILES_SKIPPED,
    META_MODEL_VERSION,
    META_PATH,
    META_PREDICTED_COUNTS,
    META_RUN_ID,
    META_SOURCE,
)
from pipeline.lib.files import atomic_write_json, atomic_write_text, atomic_writer
from pipeline.lib.params import PredictParams, TrackingParams
from pipeline.lib.scan import (
    SKIP_LINK,
    SKIP_NOT_IMAGE,
    Candidate,
    inspect_image,
    walk_files,
)

logger = logging.getLogger(__name__)

#: ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``.
_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
#: The predictions' columns before one ``prob_<class>`` column per class.
COLUMNS = ("file", "sha256", "label", "model_version")


class ModelNotFoundError(ValueError):
    """The model URI names no registered model version."""


@dataclasses.dataclass(frozen=True)
class ModelVersion:
    """A registered model version: what the predictions name and the run links to."""

    uri: str
    name: str
    version: str
    model_id: str | None  # its MLflow 3 logged model

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}"


def parse_model_uri(model_uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    match = _REGISTRY_URI.match(model_uri.strip())
    if match is None:
        raise ValueError(f"model URI {model_uri!r} must be models:/NAME@ALIAS or "
                         "models:/NAME/VERSION")
    return match["name"], match["alias"], match["version"]


def resolve_model_version(model_uri: str, client: Any) -> ModelVersion:
    """The registered version ``model_uri`` names, or a one-line error saying why not."""
    from mlflow.exceptions import MlflowException

    name, alias, version = parse_model_uri(model_uri)
    try:
        found = (client.get_model_version_by_alias(name, alias) if alias
                 else client.get_model_version(name, version))
    except MlflowException as exc:
        raise ModelNotFoundError(f"model {model_uri} does not exist: "
                                 f"{str(exc.message).splitlines()[0]}") from None
    return ModelVersion(model_uri, name, str(found.version), getattr(found, "model_id", None))


@dataclasses.dataclass
class NewImages:
    """The files of a source: usable images and skipped files with reasons."""

    seen: int
    images: list[Candidate]
    skipped: list[dict[str, str]]
    ignored: list[dict[str, str]]


def scan_new_images(raw: Path, work: Path, params: PredictParams) -> NewImages:
    """Every file under ``raw`` (an archive or folder, any nesting) checked as preprocess
    checks training images; the file name is its path inside the source."""
    ignored: list[dict[str, str]] = []
    if raw.is_dir():
        root = find_class_root(raw)
    else:
        extraction = safe_extract(raw, work / "extracted", max_bytes=params.max_archive_bytes,
                                  max_entries=params.max_archive_entries,
                                  max_entry_ratio=params.max_entry_compression_ratio,
                                  max_archive_ratio=params.max_archive_compression_ratio)
        root = extraction.root
        ignored += [{"path": s["path"], "reason": s["reason"]} for s in extraction.skipped]
    found = NewImages(0, [], [], ignored)
    converted = work / "converted"
    converted.mkdir(parents=True, exist_ok=True)
    for path in walk_files(root, root, found.ignored):
        found.seen += 1
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() or not path.is_file():
            found.skipped.append({"path": rel, "reason": SKIP_LINK if path.is_symlink()
                                  else SKIP_NOT_IMAGE})
        elif not is_utf8(rel):
            found.skipped.append({"path": rel, "reason": SKIP_NOT_UTF8})
        else:
            result = inspect_image(path, rel, "", params.min_image_side, converted,
                                   params.max_image_bytes)
            if isinstance(result, Candidate):
                found.images.append(result)
            else:
                found.skipped.append({"path": result["path"], "reason": result["reason"],
                                      "detail": result["detail"]})
    return found


def _no_images(found: NewImages, source: str) -> str:
    if not found.seen:
        return f"no files in the source {source}"
    reasons = Counter(s["reason"] for s in found.skipped)
    return (f"no usable image in the source {source}: all {found.seen} files skipped ("
            + ", ".join(f"{n} {reason}" for reason, n in reasons.most_common()) + ")")


class LoadedModel:
    """A registered model as serving runs it (``mlflow.pyfunc``) plus its feature extractor
    and drift reference, from one download of the model's files."""

    def __init__(self, version: ModelVersion, local_dir: Path) -> None:
        import keras
        import mlflow

        from pipeline.lib import embeddings, models, serving
        from pipeline.lib.model_logging import DRIFT_REFERENCE_ARTIFACT

        self.version = version
        self.pyfunc = mlflow.pyfunc.load_model(str(local_dir))
        artifacts = mlflow.models.Model.load(str(local_dir)).flavors["python_function"][
            "artifacts"]
        config = json.loads((local_dir / artifacts[serving.CONFIG_ARTIFACT]["path"]).read_text())
        self.classes = [str(c) for c in config["classes"]]
        keras_model = keras.saving.load_model(
            local_dir / artifacts[serving.MODEL_ARTIFACT]["path"], safe_mode=True, compile=False,
            custom_objects=models.CUSTOM_OBJECTS)
        self.describe = embeddings.Describer(keras_model, int(config["image_size"]))
        reference = artifacts.get(DRIFT_REFERENCE_ARTIFACT)
        self.reference = (drift.Reference.load(local_dir / reference["path"])
                          if reference else None)

    @classmethod
    def download(cls, version: ModelVersion, dest: Path) -> LoadedModel:
        import mlflow

        local = mlflow.artifacts.download_artifacts(artifact_uri=version.uri, dst_path=str(dest))
        return cls(version, Path(local))


@dataclasses.dataclass
class Scored:
    """Per image: probabilities (in class order), features and image statistics."""

    probabilities: np.ndarray
    features: np.ndarray
    stats: np.ndarray


def score_images(model: LoadedModel, images: list[Candidate], batch_size: int) -> Scored:
    """Labels from the served model, features for the drift check, ``batch_size`` at a time."""
    import pandas as pd

    from pipeline.lib.serving import IMAGE_COLUMN

    probabilities, features, stats = [], [], []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        encoded = [(item.converted or item.source).read_bytes() for item in batch]
        frame = model.pyfunc.predict(pd.DataFrame({IMAGE_COLUMN: encoded}))
        probabilities.append(frame[model.classes].to_numpy(np.float64))
        batch_features, _, batch_stats = model.describe(encoded, [(i.width, i.height)
                                                                 for i in batch])
        features.append(batch_features)
        stats.append(batch_stats)
        logger.info("scored %d of %d images", start + len(batch), len(images))
    return Scored(np.concatenate(probabilities), np.concatenate(features),
                  np.concatenate(stats))


def write_predictions(path: Path, images: list[Candidate], probabilities: np.ndarray,
                      classes: list[str], version: str) -> Path:
    """``file,sha256,label,model_version,prob_<class>...``, written atomically."""
    with atomic_writer(path, "w") as handle:
        writer = csv.writer(handle)
        writer.writerow([*COLUMNS, *(f"prob_{c}" for c in classes)])
        for item, probs in zip(images, probabilities, strict=True):
            writer.writerow([item.path, item.sha256, classes[int(probs.argmax())], version,
                             *(f"{p:.6g}" for p in probs)])
    return path


def predict_images(raw: str | Path, out_dir: str | Path, model: LoadedModel,
                   params: PredictParams, *, source: str = "") -> dict[str, Any]:
    """Score every usable image under ``raw`` with ``model``; write the predictions CSV and
    the drift report (JSON) into ``out_dir``. Returns the result: counts per predicted label,
    skipped files, the drift report. No usable image is a ``ValueError`` saying why."""
    raw, out_dir = Path(raw), Path(out_dir)
    if not raw.exists():
        raise FileNotFoundError(f"new images not found: {str(raw)!r}")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".predict-work-", dir=out_dir.parent))
    try:
        found = scan_new_images(raw, work, params)
        if not found.images:
            raise ValueError(_no_images(found, source or str(raw)))
        scored = score_images(model, found.images, params.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    labels = scored.probabilities.argmax(axis=1)
    write_predictions(out_dir / BATCH_PREDICTIONS_FILE, found.images, scored.probabilities,
                      model.classes, model.version.version)
    counts = Counter(model.classes[k] for k in labels)
    if model.reference is None:
        report: dict[str, Any] = {"overall": {
            "verdict": None, "images": len(labels),
            "message": f"no drift verdict: {model.version.label} carries no drift reference "
                       "(it was trained before the check existed)"}, "per_class": {}}
    else:
        index = {name: i for i, name in enumerate(model.reference.classes)}
        report = drift.compare(model.reference, scored.features,
                               [index.get(model.classes[k], -1) for k in labels], scored.stats)
    atomic_write_json(out_dir / DRIFT_REPORT_JSON, report)
    result = {"images": len(labels), "files_seen": found.seen,
              "predicted_counts": {c: counts.get(c, 0) for c in model.classes},
              "skipped": found.skipped, "ignored": found.ignored, "drift": report,
              "model": dataclasses.asdict(model.version)}
    logger.info("predicted %d images with %s: %s; %d files skipped; drift: %s", len(labels),
                model.version.label, dict(counts), len(found.skipped),
                drift.describe(report["overall"]))
    return result


def render_report(result: Mapping[str, Any]) -> str:
    """The Markdown the KFP UI shows: what was predicted, what was skipped, the drift check."""
    report = result["drift"]
    lines = [f"# Batch predictions with {result['model']['name']} v{result['model']['version']}",
             "", f"{result['images']} images scored, {len(result['skipped'])} files skipped.",
             "", "| predicted label | images |", "| --- | ---: |"]
    lines += [f"| {label} | {n} |" for label, n in result["predicted_counts"].items()]
    if result["skipped"]:
        lines += ["", "| skipped file | reason |", "| --- | --- |"]
        lines += [f"| `{s['path']}` | {s.get('detail') or s['reason']} |"
                  for s in result["skipped"]]
    body = (drift.render_markdown(report) if "method" in report
            else f"# Drift check\n\n{report['overall']['message']}\n")
    return "\n".join(lines) + "\n\n" + body


def run_step(raw_dir: str | Path, raw_metadata: Mapping[str, Any], out_dir: str | Path,
             report_md_path: str | Path, params: PredictParams,
             tracking_params: TrackingParams) -> dict[str, Any]:
    """The ``predict_images`` component's body: predict inside an MLflow run linked to the
    model version; returns the predictions artifact's metadata.

    The run carries the counts and the drift numbers as metrics (linked to the version's
    logged model), the predictions CSV and the drift report as artifacts (one file each: a
    rerun replaces them, it adds no rows) and the model's name and version as tags; the
    version gets a tag naming this run.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    source = raw_metadata.get(META_SOURCE, "")
    raw = Path(raw_dir) / raw_metadata.get(META_PATH, "")
    out_dir = Path(out_dir)
    with tracking_runs.tracked_step("predict", tracking_params,
                               {**params.to_dict(), "data_source": source}) as run:
        version = resolve_model_version(params.model_uri, MlflowClient())
        mlflow.set_tags({"model.name": version.name, "model.version": version.version,
                         "model.uri": version.uri})
        with tempfile.TemporaryDirectory(prefix="iris-predict-model-") as tmp:
            model = LoadedModel.download(version, Path(tmp))
            result = predict_images(raw, out_dir, model, params, source=source)
        atomic_write_text(out_dir / DRIFT_REPORT_MD, render_report(result))
        shutil.copyfile(out_dir / DRIFT_REPORT_MD, report_md_path)
        overall = result["drift"]["overall"]
        tracking_log.log_metrics({"images_scored": result["images"],
                              "files_skipped": len(result["skipped"]),
                              "predicted": result["predicted_counts"],
                              "drift": {k: overall[k] for k in ("mmd2", "p_value")
                                        if k in overall},
                              "drift_detected": overall.get("verdict") == drift.VERDICT_DRIFT},
                             model_id=version.model_id)
        tracking_log.log_artifacts(out_dir / BATCH_PREDICTIONS_FILE)
        tracking_log.log_artifacts(out_dir / DRIFT_REPORT_JSON)
        tracking_log.log_artifacts(out_dir / DRIFT_REPORT_MD)
        mlflow.set_tag("drift.verdict", overall.get("verdict") or overall["message"])
        # the version's page in the registry points at its latest batch predictions
        MlflowClient().set_model_version_tag(version.name, version.version,
                                             "batch_predictions.last_run", run.info.run_id)
    return {META_SOURCE: source, META_MODEL_VERSION: version.label, META_RUN_ID: run.info.run_id,
            META_PREDICTED_COUNTS: result["predicted_counts"],
            META_FILES_SKIPPED: len(result["skipped"]),
            META_DRIFT_VERDICT: drift.describe(overall),
            "images": result["images"], "files_seen": result["files_seen"],
            "skipped": result["skipped"][:50]}


__all__ = ["COLUMNS", "LoadedModel", "ModelNotFoundError", "ModelVersion", "NewImages",
           "parse_model_uri", "predict_images", "render_report", "resolve_model_version",
           "run_step", "scan_new_images", "score_images", "write_predictions"]
