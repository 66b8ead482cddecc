"""The ``--summary`` JSON of a local run: metrics, data counts, gate, MLflow ids, paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.dag import PIPELINE_NAME
from pipeline.lib.contract import (
    CV_SCORE_PREFIX,
    DATA_REPORT_JSON,
    META_EXPERIMENT_ID,
    META_GATE_METRIC,
    META_MODEL_URI,
    META_PARENT_RUN_ID,
    META_RUN_ID,
    META_SERVING_MS,
    META_SHA256,
    META_SOURCE,
    META_SWEEP,
    META_TRACKING_URI,
    METRICS_FILE,
)
from pipeline.lib.files import normalize_sha256, read_json
from pipeline.runners.local import FILE_OUTPUTS, LocalRunResult, StepFailedError

#: Entries of the data report that the summary repeats (the rest lists files).
DATA_REPORT_COUNTS = ("files_seen", "files_used", "files_skipped", "duplicates_dropped",
                      "class_counts", "split_sizes", "split_counts", "skipped_by_reason",
                      "majority_baseline")


def build_summary(result: LocalRunResult, config: PipelineConfig,
                  tracking_uri: str = "") -> dict[str, Any]:
    """The ``--summary`` JSON: test metrics, data counts, gate verdict, MLflow ids, paths."""
    outputs = result.outputs
    metrics_meta = dict(outputs["metrics"].metadata)
    evaluation = read_json(Path(outputs["evaluation"].path) / METRICS_FILE) or {}
    prepared_meta = dict(outputs["prepared_data"].metadata)
    data_report = read_json(Path(outputs["prepared_data"].path) / DATA_REPORT_JSON) or {}
    model_meta = dict(outputs["trained_model"].metadata)
    registration = result.registration or {}
    gate_metric = metrics_meta.get(META_GATE_METRIC, config.gate_metric)
    return {
        "status": "succeeded",
        "pipeline": PIPELINE_NAME,
        "test_metrics": {k: v for k, v in evaluation.items() if not k.startswith("gate_")
                         and isinstance(v, (int, float)) and not isinstance(v, bool)},
        "majority_baseline": evaluation.get("baseline"),
        "interval_method": evaluation.get("interval_method"),
        "per_class": evaluation.get("per_class"),
        "classes": evaluation.get("classes"),
        "confusion_matrix": evaluation.get("confusion_matrix"),
        "data": {
            "source": prepared_meta.get(META_SOURCE, config.data_source),
            # the archive's actual digest (none for a folder); checked = it was given
            "sha256": data_report.get("input", {}).get("sha256")
            or prepared_meta.get(META_SHA256, config.data_sha256),
            "sha256_checked": normalize_sha256(
                prepared_meta.get(META_SHA256, config.data_sha256)) is not None,
            "counts": {k: data_report[k] for k in DATA_REPORT_COUNTS if k in data_report},
            "report": str(Path(outputs["prepared_data"].path) / DATA_REPORT_JSON),
        },
        "gate": {
            "metric": evaluation.get("gate_metric", gate_metric),
            "value": evaluation.get("gate_value", metrics_meta.get(gate_metric)),
            "threshold": evaluation.get("gate_threshold", config.gate_threshold),
            "passed": result.gate_passed,
        },
        "registration": result.registration,
        # with --sweep: each trial's label and validation score, and the chosen one's index
        "sweep": model_meta.get(META_SWEEP),
        # with cv_folds: the (chosen) model's out-of-fold estimate over train + validation,
        # beside the test score (on small data the steadier of the two)
        "cross_validation": cross_validation(model_meta),
        "mlflow": {
            "tracking_uri": model_meta.get(META_TRACKING_URI, tracking_uri),
            "experiment_name": config.experiment_name,
            "experiment_id": model_meta.get(META_EXPERIMENT_ID),
            "run_id": model_meta.get(META_PARENT_RUN_ID),  # the pipeline run's parent
            "step_run_ids": {"train": model_meta.get(META_RUN_ID),
                             "evaluate": metrics_meta.get(META_RUN_ID),
                             "register": registration.get("mlflow_run_id")},
            "logged_model_uri": model_meta.get(META_MODEL_URI),
            "model_uri": registration.get("model_uri") or model_meta.get(META_MODEL_URI),
            "registered_model": registration.get("name"),
            "registered_version": registration.get("version"),
            "alias": registration.get("alias"),
        },
        "cached_steps": result.cached_steps,
        "elapsed_s": round(result.elapsed_s, 1),
        "output_dir": str(result.output_dir),
        "run_dir": str(result.run_dir),
        "outputs": {name: outputs[name].path for name in FILE_OUTPUTS},
        "config": config.to_dict(),
    }


def cross_validation(model_meta: dict[str, Any]) -> dict[str, Any] | None:
    """The train step's cross-validated figures (``cv_*`` and the serving cost), if any."""
    figures = {k: v for k, v in model_meta.items()
               if k.startswith(CV_SCORE_PREFIX) or k == META_SERVING_MS}
    return figures if CV_SCORE_PREFIX + "folds" in figures else None


def failure_summary(error: StepFailedError, config: PipelineConfig) -> dict[str, Any]:
    """The ``--summary`` JSON of a failed run: which step, what error, where its outputs are."""
    return {
        "status": "failed",
        "pipeline": PIPELINE_NAME,
        "failed_step": error.step,
        "error": error.error,
        "run_dir": str(error.run_dir) if error.run_dir else None,
        "config": config.to_dict(),
    }


__all__ = ["build_summary", "cross_validation", "failure_summary"]
