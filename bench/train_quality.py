"""Benchmark: test-split quality and training time of the default config over several seeds.

For each seed: split the shared iris archive with ``prepare_dataset`` (that seed), train the
default config (MobileNet) with ``train_model``, score the test split with
``evaluate_model``; then the same for the notebook's CNN (``model=seed_cnn``, the notebook's
image size 256) for comparison. Reports per-seed and mean balanced accuracy, macro F1 and
wall-clock training seconds. Target on 2 CPU cores: mean balanced accuracy >= 0.65 with
<= 120 s of training per seed. The default head trains for Keras epochs on cached backbone
features of augmented views (config ``head_feature_views``, ``head_c``); each row also gives
the epochs run, the best epoch and its validation accuracy.

``--set KEY=VALUE`` (repeatable) overrides config fields of the measured config (e.g.
``--set backbone=mobilenet_v2 --set alpha=0.5 --set image_size=320``); ``--tta-views N`` also
scores every trained model with N test-time views (the same training, re-exported), so the
two are compared on identical heads. Every score is given on the validation split too: that
is the one to choose settings on. Validation scores are the train step's own
(``model_val_balanced_accuracy`` of the exported model, test-time views included;
``split_scores`` for the re-exported views), so the bench scores as a sweep chooses.

``--sweep FILE`` measures a sweep (``sweeps/default.yaml``) instead of the one config: per seed
the data is prepared once, then every trial (the config with the trial's overrides, on top of
``--set``) is trained and its test split scored. Per trial and seed one JSON line: test and
validation balanced accuracy, the test score's 95% interval and its width, train and
evaluation seconds. Per seed: the trial the sweep's rule picks (``select.rank_trials``: best
validation balanced accuracy, ties to the earlier trial), its test score, and the sweep's wall
seconds (every trial's training and evaluation). Last: per trial (labelled as the pipeline
labels them) the mean test / validation score, interval width and train seconds; the mean
test score of the picks ("sweep pick"), how often each trial was picked, and beside it the
mean of the trial that is the measured config unchanged (the default, if the file has it).
The test split never takes part in a pick.

``--cv-folds K`` sets ``cv_folds`` (over the sweep file's own, which ``sweeps/default.yaml``
sets to 5; ``--cv-folds 0`` measures the validation rule): every trial is also scored out of
fold over train + validation (its ``cv_balanced_accuracy`` and measured serving cost per
image), and the pick is the select step's own (``select.select_trial``: with out-of-fold
predictions the paired, cost-aware rule of ``pipeline/lib/selection.py``, else the best
validation score). The JSON line gives ``selection_regret``: the best single trial's mean test
score minus the picks'; and ``leader_regret``, the same for each seed's leader (best
out-of-fold score, the trial the rule pairs the others with), so the ranking's own regret
and what the cost-aware choice trades for serving cost are told apart.

Run: ``python -m bench.train_quality [--seeds 5] [--skip-seed-cnn] [--set KEY=VALUE ...]
[--tta-views 8 | --sweep sweeps/default.yaml [--cv-folds K]]``; one JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from pipeline.cli_args import parse_overrides
from pipeline.config import PipelineConfig
from pipeline.lib import models
from pipeline.lib.contract import (
    CROSS_VALIDATION_FILE,
    META_SERVING_MS,
    META_TRAIN_PARAMS,
    VAL_SCORE_PREFIX,
)
from pipeline.lib.files import read_json
from pipeline.lib.params import EvaluateParams, PreprocessParams, TrainParams
from pipeline.lib.training import split_scores
from pipeline.steps.evaluate import evaluate_model
from pipeline.steps.preprocess import prepare_dataset
from pipeline.steps.select import SWEEP_FILE, select_trial, trial_labels
from pipeline.steps.train import train_model
from pipeline.sweep import Sweep, load_sweep
from tests.support.paths import DEFAULT_BACKBONE_WEIGHTS, IRIS_ZIP

#: Trial labels say how a trial departs from the default config.
DEFAULTS = PipelineConfig().to_dict()

METRIC = "balanced_accuracy"  # the sweep's rule: the pipeline's default gate metric
VAL_KEY = f"{VAL_SCORE_PREFIX}{METRIC}"  # in the training summary's metrics


def train_and_evaluate(pipeline_config: PipelineConfig, data_dir: Path, work: Path,
                       name: str) -> tuple[dict, dict]:
    """Train ``pipeline_config``, score the test split: the bench's row and the train summary.

    The validation score is the train step's (the exported model's, test-time views
    included): the one a sweep chooses on.
    """
    model_dir = work / f"{name}-model"
    started = time.perf_counter()
    summary = train_model(data_dir, model_dir, pipeline_config.params_for(TrainParams))
    trained = time.perf_counter()
    metrics = evaluate_model(model_dir, data_dir, work / f"{name}-eval",
                             pipeline_config.params_for(EvaluateParams))
    evaluated = time.perf_counter()
    low, high = metrics[f"{METRIC}_ci_low"], metrics[f"{METRIC}_ci_high"]
    row = {
        "balanced_accuracy": round(metrics[METRIC], 4),
        "balanced_accuracy_ci": [round(low, 4), round(high, 4)],
        "ci_width": round(high - low, 4),
        "val_balanced_accuracy": round(getattr(summary, VAL_KEY), 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "accuracy": round(metrics["accuracy"], 4),
        "train_wall_seconds": round(trained - started, 1),
        "eval_wall_seconds": round(evaluated - trained, 1),
        "epochs": summary.epochs_run,
        "best_epoch": summary.best_epoch,
        "best_val_accuracy": (None if summary.best_val_accuracy is None
                              else round(summary.best_val_accuracy, 4)),
    }
    cross_validation = read_json(model_dir / CROSS_VALIDATION_FILE)
    if cross_validation:
        row["cv_balanced_accuracy"] = round(cross_validation[f"cv_{METRIC}"], 4)
        row[META_SERVING_MS] = round(cross_validation[META_SERVING_MS], 2)
    return row, summary


def run_one(pipeline_config: PipelineConfig, data_dir: Path, work: Path, name: str,
            tta_views: int = 0) -> dict:
    row, _ = train_and_evaluate(pipeline_config, data_dir, work, name)
    if tta_views:
        config = pipeline_config.params_for(TrainParams)
        viewed = models.with_test_time_views(models.load_model(work / f"{name}-model"),
                                             tta_views, config.image_size)
        row["tta"] = {key: round(split_scores(viewed, data_dir, split, config)[METRIC], 4)
                      for key, split in (("balanced_accuracy", "test"),
                                         ("val_balanced_accuracy", "val"))}
    return row


def run_sweep(sweep: Sweep, labels: list[str], base: PipelineConfig, data_dir: Path,
              work: Path, seed: int) -> tuple[list[dict], dict]:
    """Every trial of ``sweep`` on one seed's data: per-trial rows and the sweep's pick."""
    rows, metadatas = [], []
    started = time.perf_counter()
    for index, (trial, label) in enumerate(zip(sweep.trials, labels, strict=True)):
        config = PipelineConfig.from_mapping(trial, base)
        row, summary = train_and_evaluate(config, data_dir, work, f"trial{index + 1}")
        row = {"seed": seed, "trial": index + 1, "label": label, **row}
        rows.append(row)
        # what the select step reads from each trial's model metadata (unrounded)
        figures = read_json(work / f"trial{index + 1}-model" / CROSS_VALIDATION_FILE) or {}
        metadatas.append({META_TRAIN_PARAMS: trial, VAL_KEY: getattr(summary, VAL_KEY),
                          **figures})
        print(json.dumps({"sweep_trial": row}), flush=True)
    seconds = time.perf_counter() - started
    select_trial([work / f"trial{i + 1}-model" for i in range(len(rows))],
                 metadatas, work / "selected", METRIC, DEFAULTS)
    verdict = read_json(work / "selected" / SWEEP_FILE)
    chosen = verdict["winner"]
    # cross-validated, the leader (best out-of-fold score) is the row the others pair with
    leader = next((t["trial"] for t in verdict["trials"]
                   if "cv_score" in t and t["difference"] is None), chosen)
    pick = {"seed": seed, "trial": chosen + 1, "label": labels[chosen],
            "val_balanced_accuracy": rows[chosen]["val_balanced_accuracy"],
            "balanced_accuracy": rows[chosen]["balanced_accuracy"],
            "leader": leader + 1, "leader_balanced_accuracy": rows[leader]["balanced_accuracy"],
            "sweep_wall_seconds": round(seconds, 1), "rule": verdict["summary"],
            # cross-validated: the trials not shown worse than that seed's leader
            "within_noise": [t["trial"] + 1 for t in verdict["trials"] if t.get("within_noise")]}
    print(json.dumps({"sweep_pick": pick}), flush=True)
    return rows, pick


def sweep_result(sweep: Sweep, labels: list[str], rows: list[dict],
                 picks: list[dict], default: int | None) -> dict:
    """The sweep's part of the closing JSON line: per trial, per seed's pick, overall."""
    trials = []
    for index, (trial, label) in enumerate(zip(sweep.trials, labels, strict=True)):
        mine = [r for r in rows if r["trial"] == index + 1]
        trials.append({
            "trial": index + 1, "label": label, "overrides": trial,
            "mean_balanced_accuracy": mean(mine, "balanced_accuracy"),
            "mean_val_balanced_accuracy": mean(mine, "val_balanced_accuracy"),
            "mean_ci_width": mean(mine, "ci_width"),
            "mean_train_seconds": round(mean(mine, "train_wall_seconds"), 1),
            "mean_eval_seconds": round(mean(mine, "eval_wall_seconds"), 1),
            "test_per_seed": [r["balanced_accuracy"] for r in mine],
            "val_per_seed": [r["val_balanced_accuracy"] for r in mine],
            "picked": sum(p["trial"] == index + 1 for p in picks),
            "within_noise_seeds": sum(index + 1 in p["within_noise"] for p in picks),
        })
        if all("cv_balanced_accuracy" in r for r in mine):
            trials[-1]["mean_cv_balanced_accuracy"] = mean(mine, "cv_balanced_accuracy")
            trials[-1]["mean_serving_ms_per_image"] = mean(mine, META_SERVING_MS)
    best = max(t["mean_balanced_accuracy"] for t in trials)
    return {
        "trials": trials,
        "picks": picks,
        "sweep_pick": {
            "mean_balanced_accuracy": mean(picks, "balanced_accuracy"),
            "mean_val_balanced_accuracy": mean(picks, "val_balanced_accuracy"),
            "picked": {t["label"]: t["picked"] for t in trials},
            "mean_sweep_wall_seconds": round(mean(picks, "sweep_wall_seconds"), 1),
            "max_sweep_wall_seconds": max(p["sweep_wall_seconds"] for p in picks),
        },
        # the best single trial's mean test score minus the picks' (0: the rule never lost)
        "selection_regret": round(best - mean(picks, "balanced_accuracy"), 4),
        # the same for the leader alone (best out-of-fold score, cost not considered,
        # sweep_choice=best_score): beside selection_regret, what choosing on cost changed
        "leader_regret": round(best - mean(picks, "leader_balanced_accuracy"), 4),
        # the trial that is the measured config unchanged (None: the file has none)
        "default": None if default is None else {
            "trial": default + 1, "label": labels[default],
            "mean_balanced_accuracy": trials[default]["mean_balanced_accuracy"],
            "mean_val_balanced_accuracy": trials[default]["mean_val_balanced_accuracy"]},
    }


def mean(rows: list[dict], key: str) -> float:
    return round(float(np.mean([r[key] for r in rows])), 4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--zip", type=Path, default=IRIS_ZIP)
    parser.add_argument("--weights", default=str(DEFAULT_BACKBONE_WEIGHTS),
                        help="weights file of the default backbone")
    parser.add_argument("--skip-seed-cnn", action="store_true")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config field of the measured config (repeatable)")
    parser.add_argument("--tta-views", type=int, default=0,
                        help="also score each trained model with this many test-time views")
    parser.add_argument("--sweep", metavar="FILE", type=Path,
                        help="measure every trial of this sweep file and the sweep's pick")
    parser.add_argument("--cv-folds", type=int, default=None,
                        help="cross-validate every trial with this many folds (cv_folds; "
                             "over the sweep file's own)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.sweep and args.tta_views:
        parser.error("--tta-views does not combine with --sweep (a trial sets tta_views)")
    try:
        overrides = parse_overrides(args.set)
        folds = {} if args.cv_folds is None else {"cv_folds": str(args.cv_folds)}
        sweep = labels = default = None
        if args.sweep:
            sweep_base = PipelineConfig.from_mapping(
                overrides, PipelineConfig(data_source=str(args.zip), weights=args.weights))
            sweep = load_sweep(args.sweep, sweep_base)
            labels = [label for label, _ in trial_labels(sweep.trials, DEFAULTS)]
            default = next((i for i, trial in enumerate(sweep.trials)
                            if PipelineConfig.from_mapping(trial, sweep_base) == sweep_base),
                           None)
            overrides = {**overrides, **{k: str(v) for k, v in sweep.shared.items()}}
        overrides.update(folds)  # the flag over the file
    except ValueError as exc:
        parser.error(str(exc))

    ours, notebook, trial_rows, picks = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for seed in range(1, args.seeds + 1):
            work = Path(tmp) / f"seed{seed}"
            base = PipelineConfig(data_source=str(args.zip), weights=args.weights, seed=seed,
                                  split_seed=seed)
            config = PipelineConfig.from_mapping(overrides, base)
            data_dir = work / "data"
            prepare_dataset(args.zip, data_dir, config.params_for(PreprocessParams))
            if sweep is not None:
                rows, pick = run_sweep(sweep, labels, config, data_dir, work, seed)
                trial_rows.extend(rows)
                picks.append(pick)
            else:
                row = {"seed": seed,
                       **run_one(config, data_dir, work, "default", args.tta_views)}
                ours.append(row)
                print(json.dumps({"default": row}), flush=True)
            if not args.skip_seed_cnn:
                cnn = dataclasses.replace(config, model="seed_cnn", image_size=256, tta_views=0)
                row = {"seed": seed, **run_one(cnn, data_dir, work, "seed_cnn")}
                notebook.append(row)
                print(json.dumps({"seed_cnn": row}), flush=True)

    measured = PipelineConfig.from_mapping(overrides)
    result = {
        "bench": "train_quality",
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),  # other work shares the cores
        "seeds": args.seeds,
        "overrides": overrides,
        "config": {k: getattr(measured, k) for k in (
            "model", "backbone", "alpha", "tta_views", "image_size", "epochs", "learning_rate",
            "fine_tune_epochs", "fine_tune_learning_rate", "fine_tune_layers",
            "early_stopping_patience", "dropout", "pooling", "head_feature_views", "head_c",
            "augment_rotation", "augment_shift", "augment_zoom", "augment_contrast")},
    }
    if sweep is not None:
        result["sweep"] = {"file": str(args.sweep), **sweep_result(sweep, labels, trial_rows,
                                                                     picks, default)}
    else:
        result["default"] = {
            "per_seed": ours, "mean_balanced_accuracy": mean(ours, "balanced_accuracy"),
            "mean_val_balanced_accuracy": mean(ours, "val_balanced_accuracy"),
            "mean_macro_f1": mean(ours, "macro_f1"),
            "mean_train_seconds": mean(ours, "train_wall_seconds"),
            "max_train_seconds": max(r["train_wall_seconds"] for r in ours)}
        result["target"] = {"mean_balanced_accuracy": 0.65, "train_seconds_per_seed": 120}
        result["target_met"] = (result["default"]["mean_balanced_accuracy"] >= 0.65
                                and result["default"]["max_train_seconds"] <= 120)
    if args.tta_views:
        result["default"]["tta"] = {
            "views": args.tta_views,
            **{key: mean([r["tta"] for r in ours], key)
               for key in ("balanced_accuracy", "val_balanced_accuracy")},
        }
    if notebook:
        result["seed_cnn"] = {
            "per_seed": notebook,
            "mean_balanced_accuracy": mean(notebook, "balanced_accuracy"),
            "mean_macro_f1": mean(notebook, "macro_f1"),
            "mean_train_seconds": mean(notebook, "train_wall_seconds"),
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
