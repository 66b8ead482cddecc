"""Benchmark: with ``cv_folds``, ship the fold heads or a head refitted on all rows?

Cross-validation trains k heads on the frozen backbone's features anyway. The train step
exports their average (kernels and biases averaged: one head whose logits are the mean of
theirs, ``crossval.CrossValidation.head``); the alternatives are one more head fitted on every
train + validation row for the folds' average best epoch count (what the train step exported
before), and the k heads kept with their probabilities averaged (k softmaxes per served view).
This bench scores the three on the test split, paired with the refit image by image, and
times cross-validation for several fold counts (the features are computed once per seed and
cached, so the timing is the head fits alone: how ``cv_folds`` scales).

For each seed: split the shared archive as ``bench/train_quality.py`` does, build the config's
backbone, compute the train + validation features (``crossval.pooled_features``) and the
test split's test-time view features once, then per fold count ``crossval.cross_validate``
with the test features scored by every fold head, then the refit. Per seed and fold count
one JSON line: out-of-fold balanced accuracy, test balanced accuracy of the refitted head, of
the averaged head (``averaged``) and of the probability ensemble (``ensemble``), each one's
paired difference with the refit on test (95% interval), and the cross-validation seconds.

Run: ``python -m bench.fold_ensemble [--seeds 5] [--folds 3 5 10] [--set KEY=VALUE ...]``
(``IRIS_FEATURE_CACHE`` shares features with other runs); one JSON line last.
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

import keras
import numpy as np

from pipeline.cli_args import parse_overrides
from pipeline.config import PipelineConfig
from pipeline.lib import crossval, inputs, models, records, stats
from pipeline.lib.feature_cache import FeatureCache
from pipeline.lib.feature_head import LinearHead, extract_features, test_time_views
from pipeline.lib.params import PreprocessParams, TrainParams
from pipeline.steps.preprocess import prepare_dataset
from tests.support.paths import DEFAULT_BACKBONE_WEIGHTS, IRIS_ZIP

METRIC = "balanced_accuracy"


def test_view_features(core: keras.Model, data_dir: Path, config: TrainParams,
                       cache: FeatureCache) -> tuple[np.ndarray, np.ndarray]:
    """The test split's test-time view features ([views, images, width]) and labels."""
    views = test_time_views(config)
    features = extract_features(core, data_dir, "test", config, views, cache=cache)
    count = len(features.y) // len(views)
    return features.x.reshape(len(views), count, -1), features.y[:count]


def refit_head(features: crossval.PooledFeatures, cv: crossval.CrossValidation,
               config: TrainParams, num_classes: int) -> LinearHead:
    """One head on every train + validation row for the folds' average best epoch count."""
    trainer = crossval.HeadTrainer(features.training.shape[-1], num_classes, config)
    epochs = max(1, round(float(np.mean(cv.best_epochs))))
    head, _ = trainer.fit(features.training, features.labels, epochs)
    return head.linear()


def compare(cv: crossval.CrossValidation, refitted: LinearHead, test_x: np.ndarray,
            test_y: np.ndarray, num_classes: int) -> dict:
    """The refitted head against the fold heads on the test split, paired: averaged into one
    head (the export) and kept as an ensemble of their probabilities."""
    refit = refitted.view_probabilities(test_x).argmax(axis=1)
    ensembles = {
        "averaged": cv.head.view_probabilities(test_x).argmax(axis=1),
        "ensemble": cv.fold_probabilities.mean(axis=0).argmax(axis=1),
    }
    out = {"cv_balanced_accuracy": round(cv.scores()[METRIC], 4),
           "refit_balanced_accuracy": round(stats.score(test_y, refit, num_classes)[METRIC], 4)}
    for name, predicted in ensembles.items():
        difference = stats.paired_difference(test_y, predicted, refit, num_classes, METRIC)
        out[f"{name}_balanced_accuracy"] = round(
            stats.score(test_y, predicted, num_classes)[METRIC], 4)
        out[f"{name}_minus_refit"] = [round(difference.value, 4), round(difference.ci_low, 4),
                                      round(difference.ci_high, 4)]
    return out


def run_seed(config: TrainParams, data_dir: Path, folds: list[int],
             cache: FeatureCache) -> list[dict]:
    classes = records.load_classes(data_dir)
    keras.utils.set_random_seed(config.seed)
    core = models.build_model(config, len(classes))
    started = time.perf_counter()
    features = crossval.pooled_features(core, data_dir, config, inputs.build_augmenter(config),
                                        cache)
    test_x, test_y = test_view_features(core, data_dir, config, cache)
    feature_seconds = time.perf_counter() - started
    rows = []
    for k in folds:
        started = time.perf_counter()
        cv = crossval.cross_validate(features, classes, dataclasses.replace(config, cv_folds=k),
                                     also_score=test_x)
        seconds = time.perf_counter() - started
        refit = refit_head(features, cv, config, len(classes))
        rows.append({"seed": config.seed, "folds": k, "cv_seconds": round(seconds, 2),
                     "feature_seconds": round(feature_seconds, 1),
                     **compare(cv, refit, test_x, test_y, len(classes))})
        print(json.dumps({"fold_ensemble": rows[-1]}), flush=True)
    return rows


def summarize(rows: list[dict], folds: list[int]) -> list[dict]:
    out = []
    for k in folds:
        mine = [r for r in rows if r["folds"] == k]
        summary = {"folds": k, **{key: round(float(np.mean([r[key] for r in mine])), 4)
                                  for key in ("cv_balanced_accuracy", "refit_balanced_accuracy",
                                              "ensemble_balanced_accuracy",
                                              "averaged_balanced_accuracy", "cv_seconds")}}
        for name in ("averaged", "ensemble"):
            differences = [r[f"{name}_minus_refit"] for r in mine]
            summary.update({
                f"mean_{name}_minus_refit": round(float(np.mean([d[0] for d in differences])),
                                                  4),
                f"{name}_worse_shown": sum(d[2] < 0 for d in differences),
                f"{name}_better_shown": sum(d[1] > 0 for d in differences)})
        out.append(summary)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--folds", type=int, nargs="+", default=[3, 5, 10])
    parser.add_argument("--zip", type=Path, default=IRIS_ZIP)
    parser.add_argument("--weights", default=str(DEFAULT_BACKBONE_WEIGHTS))
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config field (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        overrides = parse_overrides(args.set)
    except ValueError as exc:
        parser.error(str(exc))
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-folds-") as tmp:
        cache = FeatureCache.from_env() or FeatureCache(Path(tmp) / "features")
        for seed in range(1, args.seeds + 1):
            base = PipelineConfig(data_source=str(args.zip), weights=args.weights, seed=seed,
                                  split_seed=seed)
            config = PipelineConfig.from_mapping(overrides, base)
            data_dir = Path(tmp) / f"seed{seed}"
            prepare_dataset(args.zip, data_dir, config.params_for(PreprocessParams))
            rows += run_seed(config.params_for(TrainParams), data_dir, args.folds, cache)
    result = {"bench": "fold_ensemble", "cpu_count": os.cpu_count(), "seeds": args.seeds,
              "overrides": overrides, "per_folds": summarize(rows, args.folds)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
