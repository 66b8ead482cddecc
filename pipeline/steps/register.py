"""The register step: register the gated model and move the champion/challenger alias.

The step only gathers its evidence from the upstream artifacts and calls the registry
(:mod:`pipeline.lib.registry`, which holds the champion rule, the promotion lock and the
alias history) inside its own MLflow run, so the decision is logged there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.lib import model_card, run_story, tracking_runs
from pipeline.lib.contract import (
    META_DATA_SHA256,
    META_MODEL_ID,
    META_MODEL_URI,
    META_PREDICTIONS_URI,
    META_SPLIT_DIGEST,
    PREDICTIONS_FILE,
)
from pipeline.lib.params import RegisterParams, TrackingParams
from pipeline.lib.registry import Evidence, register_model


def evidence_from(metrics_metadata: Mapping[str, Any], evaluation_dir: str | Path,
                  data_dir: str | Path | None) -> Evidence:
    """The evaluation's evidence: digests and the MLflow copy of the per-image predictions
    from its Metrics metadata, the predictions themselves from its folder, and the prepared
    data set they were made on (where a champion scored on other data is scored again)."""
    return Evidence(
        predictions=Path(evaluation_dir) / PREDICTIONS_FILE,
        predictions_uri=str(metrics_metadata[META_PREDICTIONS_URI]),
        data_sha256=str(metrics_metadata[META_DATA_SHA256]),
        split_digest=str(metrics_metadata[META_SPLIT_DIGEST]),
        test_data=data_dir,
    )


def run_step(model_metadata: Mapping[str, Any], metrics_metadata: Mapping[str, Any],
             evaluation_dir: str | Path, params: RegisterParams,
             tracking_params: TrackingParams,
             data_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``register_model`` component's body: the registry decision in the step's MLflow run.

    The logged model's URI comes from the training artifact's metadata, the gate's value
    from the evaluation's Metrics metadata. Returns the decision and the run id.
    """
    with tracking_runs.tracked_step("register", tracking_params, params.to_dict()) as run:
        decision = register_model(
            model_metadata[META_MODEL_URI],
            name=params.registered_model_name,
            metric_name=params.gate_metric,
            metric_value=float(metrics_metadata[params.gate_metric]),
            evidence=evidence_from(metrics_metadata, evaluation_dir, data_dir),
            margin=params.promotion_margin,
        )
        run_story.tell_parent(run.info.run_id, decision, model_metadata.get(META_MODEL_ID))
        model_card.describe_version(decision, evaluation_dir, model_metadata)
    return {**decision, "mlflow_run_id": run.info.run_id}


__all__ = ["evidence_from", "run_step"]
