"""Select step (sweeps only): the trial with the best validation score goes on to the test split.

Every trial's train step scored its exported model, test-time views included, on the
validation split (``model_val_<metric>`` in its metadata). This step reads those scores and
nothing else, so the test split never takes part in the choice; the chosen model is copied
into this step's output and evaluated, gated and registered like a single run's model.
Ties go to the earlier trial (the sweep file's order): a deterministic, explainable pick.

In MLflow every trial is its train run, a child of the pipeline run: this step tags each
with its label (the settings that differ between trials), its validation rank and whether
it was chosen, names it after its label, and tags the parent run with the winner.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import RunTag
from mlflow.tracking import MlflowClient

from pipeline.config import PipelineConfig
from pipeline.lib import tracking_log, tracking_runs
from pipeline.lib.contract import (
    META_RUN_ID,
    META_SWEEP,
    META_TRAIN_PARAMS,
    VAL_SCORE_PREFIX,
)
from pipeline.lib.files import atomic_write_json
from pipeline.lib.params import SelectParams, TrackingParams, TrainParams
from pipeline.lib.tracking_store import TAG_NOTE

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
TAG_TRIAL = "sweep.trial"
TAG_RANK = "sweep.val_rank"
TAG_CHOSEN = "sweep.chosen"
TAG_WINNER = "sweep.winner"
TAG_WINNER_RUN = "sweep.winner_run_id"
#: The label of a trial with the default value of every swept setting.
DEFAULTS_LABEL = "defaults"


@dataclasses.dataclass(frozen=True)
class Trial:
    """One trained trial as the select step sees it."""

    index: int
    label: str
    val_score: float
    run_id: str
    overrides: dict[str, Any]


def trial_labels(params: Sequence[Mapping[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """Per trial: a short label and its values of every setting that differs between trials.

    The label names where a trial departs from the project's default config
    (:class:`PipelineConfig`), among the settings that differ between trials:
    ``tta_views=8`` rather than all seven swept settings; a trial with the default value of
    every one is ``defaults``. Labels are statements about each trial alone, never relative
    to another trial (a sweep's first trial is not "the base"), and distinct: two trials
    differ in some swept setting, so at most one of them has its default value there.
    """
    keys = [k for k in sorted(params[0] if params else {})  # metadata keeps no key order
            if len({json.dumps(p.get(k), sort_keys=True) for p in params}) > 1]
    defaults = PipelineConfig()
    rows = []
    for p in params:
        overrides = {k: p.get(k) for k in keys}
        label = ", ".join(f"{k}={_short(v)}" for k, v in overrides.items()
                          if json.dumps(v, sort_keys=True)
                          != json.dumps(getattr(defaults, k, None), sort_keys=True))
        rows.append((label or DEFAULTS_LABEL, overrides))
    return rows


def _short(value: Any) -> Any:
    """A path or URL by its file name (a weights file's name says which it is)."""
    if isinstance(value, str) and "/" in value:
        return value.rstrip("/").rsplit("/", 1)[-1]
    return value


def rank_trials(metadatas: Sequence[Mapping[str, Any]], metric: str) -> list[Trial]:
    """The trials, best validation ``metric`` first (ties: the earlier trial first).

    ``ValueError`` when a trial lacks its validation score: choosing without it could only
    be a guess, and a silent default would make a broken trial win or lose arbitrarily.
    """
    if not metadatas:
        raise ValueError("the sweep produced no trained trials to choose from")
    key = f"{VAL_SCORE_PREFIX}{metric}"
    # KFP metadata hands whole numbers back as floats (320.0)
    labels = trial_labels([TrainParams.typed(m.get(META_TRAIN_PARAMS) or {}) for m in metadatas])
    trials = []
    for index, (meta, (label, overrides)) in enumerate(zip(metadatas, labels, strict=True)):
        value = meta.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"trial {index + 1} ({label}) has no validation score {key!r} "
                             f"in its model's metadata (got {value!r})")
        trials.append(Trial(index, label, float(value), str(meta.get(META_RUN_ID, "")),
                            overrides))
    return sorted(trials, key=lambda t: (-t.val_score, t.index))


def _tag_runs(client: MlflowClient, ranked: Sequence[Trial], parent_id: str,
              metric: str) -> None:
    """Label every trial's run and name the winner on the parent run (tags and run name).

    A trial's run name leads with its validation rank and whether it was chosen
    (``train · #1 of 2, chosen · pooling=avg``): the MLflow UI shows names at the top of the
    run list and the Compare view, where the ``sweep.*`` tags sit among many others; the
    run's description says the same in words. The parent's name came from the first
    trial's settings; it becomes ``sweep of N: <winner's label>`` followed by the rest of
    that name (data set, start time).
    """
    winner = ranked[0]
    for rank, trial in enumerate(ranked, start=1):
        if not trial.run_id:
            continue
        chosen = trial is winner
        standing = f"#{rank} of {len(ranked)}" + (", chosen" if chosen else "")
        verdict = ("chosen, evaluated on the test split" if chosen else
                   f"not chosen (trial {winner.index + 1}, {winner.label}, scored "
                   f"{winner.val_score:.4f})")
        client.log_batch(trial.run_id, tags=[
            RunTag(TAG_TRIAL, trial.label), RunTag(TAG_RANK, str(rank)),
            RunTag(TAG_CHOSEN, str(chosen).lower()),
            RunTag(TAG_NOTE, f"Sweep trial {trial.index + 1} ({trial.label}): validation "
                             f"{VAL_SCORE_PREFIX}{metric} {trial.val_score:.4f}, rank {rank} "
                             f"of {len(ranked)}; {verdict}.")])
        client.update_run(trial.run_id, name=f"train · {standing} · {trial.label}"[:250])
    if parent_id:
        client.log_batch(parent_id, tags=[
            RunTag(TAG_WINNER, f"{winner.label} (val {metric} {winner.val_score:.3f})"),
            RunTag(TAG_WINNER_RUN, winner.run_id)])
        rest = (client.get_run(parent_id).info.run_name or "").split(" · ")[1:]
        client.update_run(parent_id, name=" · ".join(
            [f"sweep of {len(ranked)}: {winner.label}", *rest])[:250])


def select_trial(model_dirs: Sequence[str | Path], metadatas: Sequence[Mapping[str, Any]],
                 out_dir: str | Path, metric: str) -> tuple[dict[str, Any], list[Trial]]:
    """Copy the best trial's model folder into ``out_dir``; return its metadata and the ranking.

    The metadata is the winner's (MLflow ids, scores: evaluation and registration then use
    the winning train run) plus ``sweep``: the metric and every trial's label and score.
    """
    if len(model_dirs) != len(metadatas):
        raise ValueError(f"{len(model_dirs)} trial models but {len(metadatas)} metadata entries")
    ranked = rank_trials(metadatas, metric)
    winner = ranked[0]
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(model_dirs[winner.index], out_dir)
    verdict = {
        "metric": f"{VAL_SCORE_PREFIX}{metric}",
        "winner": winner.index,
        "trials": [{"trial": t.index, "label": t.label, "val_score": t.val_score,
                    "run_id": t.run_id, "overrides": t.overrides}
                   for t in sorted(ranked, key=lambda t: t.index)],
    }
    atomic_write_json(out_dir / SWEEP_FILE, verdict)
    logger.info("sweep of %d trials: trial %d (%s) has the best validation %s, %.4f",
                len(ranked), winner.index + 1, winner.label, metric, winner.val_score)
    return {**metadatas[winner.index], META_SWEEP: verdict}, ranked


def run_step(model_dirs: Sequence[str | Path], metadatas: Sequence[Mapping[str, Any]],
             out_dir: str | Path, params: SelectParams,
             tracking_params: TrackingParams) -> dict[str, Any]:
    """The ``select_model`` component's body: choose, copy, and label the trials in MLflow."""
    with tracking_runs.tracked_step("select", tracking_params, params.to_dict()):
        metadata, ranked = select_trial(model_dirs, metadatas, out_dir, params.gate_metric)
        tracking_log.log_metrics({f"trial_{t.index + 1}_{VAL_SCORE_PREFIX}{params.gate_metric}":
                                  t.val_score for t in ranked})
        tracking_log.log_artifacts(Path(out_dir) / SWEEP_FILE)
        _tag_runs(MlflowClient(), ranked, tracking_log.parent_run_id() or "", params.gate_metric)
    return metadata


__all__ = ["SWEEP_FILE", "Trial", "rank_trials", "run_step", "select_trial", "trial_labels"]
