"""Select step (sweeps only): choose the trial that goes on to the test split.

Two rules, both blind to the test split; the chosen model is copied into this step's output
and evaluated, gated and registered like a single run's model.

- Cross-validated trials (``cv_folds`` > 0: every trial's model folder holds its out-of-fold
  predictions over the same train + validation images, and its measured serving cost):
  :func:`pipeline.lib.selection.choose_trial` ranks them by the out-of-fold score, pairs
  each with the leader image by image, and among those not shown worse than the leader
  chooses the cheapest to serve. The ranking table (scores, intervals, paired differences,
  costs) and the rule's sentence go to ``sweep.json``, the select run and the terminal.
- Otherwise the best validation score wins (``model_val_<metric>``: the exported model with
  its test-time views on the validation split); ties go to the earlier trial.

In MLflow every trial is its train run, a child of the pipeline run: this step tags each
with its label (the settings that differ between trials), its rank and whether it was
chosen, names it after its label, and names the parent run after the winner's settings.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, RunTag
from mlflow.tracking import MlflowClient

from pipeline.lib import selection, stats, tracking_log, tracking_runs
from pipeline.lib.contract import (
    CV_SCORE_PREFIX,
    META_RUN_ID,
    META_SERVING_MS,
    META_SWEEP,
    META_TRAIN_PARAMS,
    OOF_PREDICTIONS_FILE,
    VAL_SCORE_PREFIX,
)
from pipeline.lib.files import atomic_write_json
from pipeline.lib.params import SelectParams, TrackingParams, TrainParams
from pipeline.lib.tracking_log import CHOICE_PREFIX
from pipeline.lib.tracking_store import TAG_NOTE

logger = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
TAG_TRIAL = "sweep.trial"
#: the trial's rank by the score the sweep chose on (out of fold, else validation)
TAG_RANK = "sweep.rank"
TAG_CHOSEN = "sweep.chosen"
TAG_WINNER = "sweep.winner"
TAG_WINNER_RUN = "sweep.winner_run_id"
TAG_RULE = "sweep.rule"
RANKING_TABLE = "ranking.json"
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


def trial_labels(params: Sequence[Mapping[str, Any]],
                 defaults: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Per trial: a short label and its values of every setting that differs between trials.

    The label names where a trial departs from ``defaults`` (the project's default config,
    which the component passes in: this layer does not read the config), among the settings
    that differ between trials:
    ``tta_views=8`` rather than all seven swept settings; a trial with the default value of
    every one is ``defaults``. Labels are statements about each trial alone, never relative
    to another trial (a sweep's first trial is not "the base"), and distinct: two trials
    differ in some swept setting, so at most one of them has its default value there.
    """
    keys = [k for k in sorted(params[0] if params else {})  # metadata keeps no key order
            if len({json.dumps(p.get(k), sort_keys=True) for p in params}) > 1]
    rows = []
    for p in params:
        overrides = {k: p.get(k) for k in keys}
        label = ", ".join(f"{k}={_short(v)}" for k, v in overrides.items()
                          if json.dumps(v, sort_keys=True)
                          != json.dumps(defaults.get(k), sort_keys=True))
        rows.append((label or DEFAULTS_LABEL, overrides))
    return rows


def _short(value: Any) -> Any:
    """A path or URL by its file name (a weights file's name says which it is)."""
    if isinstance(value, str) and "/" in value:
        return value.rstrip("/").rsplit("/", 1)[-1]
    return value


def rank_trials(metadatas: Sequence[Mapping[str, Any]], metric: str,
                defaults: Mapping[str, Any]) -> list[Trial]:
    """The trials, best validation ``metric`` first (ties: the earlier trial first).

    ``ValueError`` when a trial lacks its validation score: choosing without it could only
    be a guess, and a silent default would make a broken trial win or lose arbitrarily.
    """
    if not metadatas:
        raise ValueError("the sweep produced no trained trials to choose from")
    key = f"{VAL_SCORE_PREFIX}{metric}"
    # KFP metadata hands whole numbers back as floats (320.0)
    labels = trial_labels([TrainParams.typed(m.get(META_TRAIN_PARAMS) or {}) for m in metadatas],
                          defaults)
    trials = []
    for index, (meta, (label, overrides)) in enumerate(zip(metadatas, labels, strict=True)):
        value = meta.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"trial {index + 1} ({label}) has no validation score {key!r} "
                             f"in its model's metadata (got {value!r})")
        trials.append(Trial(index, label, float(value), str(meta.get(META_RUN_ID, "")),
                            overrides))
    return sorted(trials, key=lambda t: (-t.val_score, t.index))


def _tag_runs(client: MlflowClient, ranked: Sequence[Trial], winner: Trial, parent_id: str,
              verdict: Mapping[str, Any]) -> None:
    """Label every trial's run and name the winner on the parent run (tags and run name);
    log on each trial's run the score it was ranked by, ``choice/<metric>``, the metric
    MLflow's Compare view plots first.

    A trial's run name leads with its rank and whether it was chosen
    (``train · #1 of 2, chosen · pooling=avg``): the MLflow UI shows names at the top of the
    run list and the Compare view, where the ``sweep.*`` tags sit among many others; the
    run's description says the same in words. The parent's name came from the first
    trial's settings; it becomes ``sweep of N: <winner's settings>`` (every swept value, also
    for the ``defaults`` trial) followed by the rest of that name (data set, start time).
    """
    metric = verdict["metric"]
    # cross-validated: the out-of-fold score ranks; else the validation score
    scores = {row["trial"]: row.get("cv_score", row["val_score"]) for row in verdict["trials"]}
    now = int(time.time() * 1000)
    for rank, trial in enumerate(ranked, start=1):
        if not trial.run_id:
            continue
        chosen = trial is winner
        standing = f"#{rank} of {len(ranked)}" + (", chosen" if chosen else "")
        outcome = ("chosen, evaluated on the test split" if chosen else
                   f"not chosen (trial {winner.index + 1}, {winner.label}, scored "
                   f"{scores[winner.index]:.4f})")
        client.log_batch(trial.run_id, metrics=[
            Metric(f"{CHOICE_PREFIX}{metric}", scores[trial.index], now, 0)], tags=[
            RunTag(TAG_TRIAL, trial.label), RunTag(TAG_RANK, str(rank)),
            RunTag(TAG_CHOSEN, str(chosen).lower()),
            RunTag(TAG_NOTE, f"Sweep trial {trial.index + 1} ({trial.label}): "
                             f"{metric} {scores[trial.index]:.4f}, rank {rank} "
                             f"of {len(ranked)}; {outcome}.")])
        client.update_run(trial.run_id, name=f"train · {standing} · {trial.label}"[:250])
    if parent_id:
        client.log_batch(parent_id, tags=[
            RunTag(TAG_WINNER, f"{winner.label} ({metric} {scores[winner.index]:.3f})"),
            RunTag(TAG_WINNER_RUN, winner.run_id), RunTag(TAG_RULE, verdict["summary"])])
        settings = ", ".join(f"{k}={_short(v)}" for k, v in winner.overrides.items())
        rest = (client.get_run(parent_id).info.run_name or "").split(" · ")[1:]
        client.update_run(parent_id, name=" · ".join(
            [f"sweep of {len(ranked)}: {settings or winner.label}", *rest])[:250])


def cross_validated_evidence(model_dirs: Sequence[str | Path],
                             metadatas: Sequence[Mapping[str, Any]],
                             trials: Sequence[Trial]) -> list[selection.TrialEvidence] | None:
    """Every trial's out-of-fold predictions and serving cost; None when none has them.

    ``ValueError`` when only some trials have them: a mixed sweep cannot be paired.
    """
    files = [Path(d) / OOF_PREDICTIONS_FILE for d in model_dirs]
    present = [f.is_file() for f in files]
    if not any(present):
        return None
    if not all(present):
        missing = [t.index + 1 for t, ok in zip(trials, present, strict=True) if not ok]
        raise ValueError(f"trial(s) {missing} have no out-of-fold predictions "
                         f"({OOF_PREDICTIONS_FILE}) while the others do: cross-validated and "
                         "single-split trials cannot be compared image by image")
    return [selection.TrialEvidence(
        index=t.index, label=t.label, predictions=stats.Predictions.read_csv(f),
        cost=float(meta.get(META_SERVING_MS) or math.nan))
        for t, f, meta in zip(trials, files, metadatas, strict=True)]


def _verdict_rows(trials: Sequence[Trial], choice: selection.Choice | None
                  ) -> list[dict[str, Any]]:
    """The ranking table, by trial: label, scores and, cross-validated, the paired figures."""
    verdicts = {v.index: v for v in choice.verdicts} if choice else {}
    rows = []
    for t in sorted(trials, key=lambda t: t.index):
        row: dict[str, Any] = {"trial": t.index, "label": t.label, "val_score": t.val_score,
                               "run_id": t.run_id, "overrides": t.overrides}
        if (v := verdicts.get(t.index)) is not None:
            d = v.difference
            row.update({"cv_score": v.score, "cv_ci_low": v.ci_low, "cv_ci_high": v.ci_high,
                        "serving_ms_per_image": v.cost, "within_noise": v.within_noise,
                        "difference": None if d is None else
                        {"value": d.value, "ci_low": d.ci_low, "ci_high": d.ci_high}})
        rows.append(row)
    return rows


def select_trial(model_dirs: Sequence[str | Path], metadatas: Sequence[Mapping[str, Any]],
                 out_dir: str | Path, metric: str, defaults: Mapping[str, Any],
                 rule: str = selection.CHEAPEST_WITHIN_NOISE
                 ) -> tuple[dict[str, Any], list[Trial]]:
    """Copy the chosen trial's model folder into ``out_dir``; return its metadata and the
    trials in rank order.

    The metadata is the winner's (MLflow ids, scores: evaluation and registration then use
    the winning train run) plus ``sweep``: the rule, the metric, every trial's label and
    scores (cross-validated: interval, paired difference with the leader, cost) and the
    rule's sentence.
    """
    if len(model_dirs) != len(metadatas):
        raise ValueError(f"{len(model_dirs)} trial models but {len(metadatas)} metadata entries")
    ranked = rank_trials(metadatas, metric, defaults)
    by_index = {t.index: t for t in ranked}
    evidence = cross_validated_evidence(model_dirs, metadatas,
                                        [by_index[i] for i in range(len(ranked))])
    choice = selection.choose_trial(evidence, metric, rule) if evidence else None
    if choice is not None:
        ranked = [by_index[v.index] for v in choice.verdicts]
        winner = by_index[choice.chosen]
        summary = choice.summary
    else:
        winner = ranked[0]
        summary = (f"trial {winner.index + 1} ({winner.label}) has the best validation "
                   f"{metric}, {winner.val_score:.3f}: chosen")
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    shutil.copytree(model_dirs[winner.index], out_dir)
    verdict = {
        "rule": (f"cross-validated, paired: {rule.replace('_', ' ')}" if choice
                 else "validation"),
        "metric": f"{CV_SCORE_PREFIX if choice else VAL_SCORE_PREFIX}{metric}",
        "winner": winner.index,
        "summary": summary,
        "trials": _verdict_rows(ranked, choice),
    }
    atomic_write_json(out_dir / SWEEP_FILE, verdict)
    logger.info("sweep of %d trials: %s", len(ranked), summary)
    return {**metadatas[winner.index], META_SWEEP: verdict}, ranked


def _log_ranking(verdict: Mapping[str, Any], metric: str) -> None:
    """The select run's metrics (each trial's score and paired difference) and its table."""
    rows = verdict["trials"]
    values = {}
    for row in rows:
        prefix = f"trial_{row['trial'] + 1}_"
        values[f"{prefix}{VAL_SCORE_PREFIX}{metric}"] = row["val_score"]
        if "cv_score" in row:
            values[f"{prefix}{CV_SCORE_PREFIX}{metric}"] = row["cv_score"]
            values[f"{prefix}{META_SERVING_MS}"] = row["serving_ms_per_image"]
            if row["difference"] is not None:
                values[f"{prefix}difference_vs_leader"] = row["difference"]["value"]
    tracking_log.log_metrics(values)
    if rows and "cv_score" in rows[0]:
        columns = ["trial", "label", "cv_score", "cv_ci_low", "cv_ci_high",
                   "serving_ms_per_image", "within_noise"]
        table = {c: [r[c] + 1 if c == "trial" else r[c] for r in rows] for c in columns}
        for end in ("value", "ci_low", "ci_high"):
            table[f"difference_{end}"] = [None if r["difference"] is None
                                          else r["difference"][end] for r in rows]
        table["chosen"] = [r["trial"] == verdict["winner"] for r in rows]
        mlflow.log_table(table, artifact_file=RANKING_TABLE)
    mlflow.set_tag(TAG_RULE, verdict["summary"])


def run_step(model_dirs: Sequence[str | Path], metadatas: Sequence[Mapping[str, Any]],
             out_dir: str | Path, params: SelectParams,
             tracking_params: TrackingParams,
             defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The ``select_model`` component's body: choose, copy, and label the trials in MLflow.

    ``defaults``: the default config's train settings, which trial labels are relative to.
    """
    with tracking_runs.tracked_step("select", tracking_params, params.to_dict()):
        metadata, ranked = select_trial(model_dirs, metadatas, out_dir, params.gate_metric,
                                        defaults, params.sweep_choice)
        verdict = metadata[META_SWEEP]
        _log_ranking(verdict, params.gate_metric)
        tracking_log.log_artifacts(Path(out_dir) / SWEEP_FILE)
        winner = next(t for t in ranked if t.index == verdict["winner"])
        _tag_runs(MlflowClient(), ranked, winner, tracking_log.parent_run_id() or "", verdict)
    return metadata


__all__ = ["SWEEP_FILE", "Trial", "cross_validated_evidence", "rank_trials", "run_step",
           "select_trial", "trial_labels"]
