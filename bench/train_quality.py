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
is the one to choose settings on.

Run: ``python bench/train_quality.py [--seeds 5] [--skip-seed-cnn] [--set KEY=VALUE ...]
[--tta-views 8]``; one JSON line last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from pipeline.cli import parse_overrides  # noqa: E402
from pipeline.config import PipelineConfig  # noqa: E402
from pipeline.lib import inputs, models, records  # noqa: E402
from pipeline.lib.params import EvaluateParams, PreprocessParams, TrainParams  # noqa: E402
from pipeline.lib.stats import score  # noqa: E402
from pipeline.steps.evaluate import evaluate_model  # noqa: E402
from pipeline.steps.preprocess import prepare_dataset  # noqa: E402
from pipeline.steps.train import train_model  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def split_balanced_accuracy(model, data_dir: Path, split: str, config: TrainParams) -> float:
    """Balanced accuracy of a loaded model on one split (validation: where choices are made)."""
    labels, predictions = [], []
    for images, batch_labels in inputs.make_eval_dataset(data_dir, split, config):
        predictions.append(np.asarray(model.predict_on_batch(images)).argmax(axis=1))
        labels.append(batch_labels.numpy())
    num_classes = len(records.load_classes(data_dir))
    return round(score(np.concatenate(labels), np.concatenate(predictions),
                       num_classes)["balanced_accuracy"], 4)


def run_one(pipeline_config: PipelineConfig, data_dir: Path, work: Path, name: str,
            tta_views: int = 0) -> dict:
    model_dir = work / f"{name}-model"
    config = pipeline_config.params_for(TrainParams)
    started = time.perf_counter()
    summary = train_model(data_dir, model_dir, config)
    seconds = time.perf_counter() - started
    metrics = evaluate_model(model_dir, data_dir, work / f"{name}-eval",
                             pipeline_config.params_for(EvaluateParams))
    model = models.load_model(model_dir)
    row = {
        "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
        "val_balanced_accuracy": split_balanced_accuracy(model, data_dir, "val", config),
        "macro_f1": round(metrics["macro_f1"], 4),
        "accuracy": round(metrics["accuracy"], 4),
        "train_wall_seconds": round(seconds, 1),
        "epochs": summary["bookkeeping"]["epochs_run"],
        "best_epoch": summary["bookkeeping"]["best_epoch"],
        "best_val_accuracy": round(summary["metrics"]["best_val_accuracy"], 4),
    }
    if tta_views:
        viewed = models.with_test_time_views(model, tta_views)
        row["tta"] = {split_name: split_balanced_accuracy(viewed, data_dir, split, config)
                      for split_name, split in (("balanced_accuracy", "test"),
                                                ("val_balanced_accuracy", "val"))}
    return row


def mean(rows: list[dict], key: str) -> float:
    return round(float(np.mean([r[key] for r in rows])), 4)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--zip", type=Path, default=SHARED / "iris-image.zip")
    parser.add_argument("--weights", default=str(SHARED / "mobilenet_2_5_224_tf_no_top.h5"))
    parser.add_argument("--skip-seed-cnn", action="store_true")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                        help="override a config field of the measured config (repeatable)")
    parser.add_argument("--tta-views", type=int, default=0,
                        help="also score each trained model with this many test-time views")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    overrides = parse_overrides(args.set)

    ours, notebook = [], []
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        for seed in range(1, args.seeds + 1):
            work = Path(tmp) / f"seed{seed}"
            base = PipelineConfig(data_source=str(args.zip), weights=args.weights, seed=seed,
                                  split_seed=seed)
            config = PipelineConfig.from_mapping(overrides, base)
            data_dir = work / "data"
            prepare_dataset(args.zip, data_dir, config.params_for(PreprocessParams))
            row = {"seed": seed, **run_one(config, data_dir, work, "default", args.tta_views)}
            ours.append(row)
            print(json.dumps({"default": row}), flush=True)
            if not args.skip_seed_cnn:
                cnn = dataclasses.replace(config, model="seed_cnn", image_size=256)
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
        "default": {"per_seed": ours, "mean_balanced_accuracy": mean(ours, "balanced_accuracy"),
                    "mean_val_balanced_accuracy": mean(ours, "val_balanced_accuracy"),
                    "mean_macro_f1": mean(ours, "macro_f1"),
                    "mean_train_seconds": mean(ours, "train_wall_seconds"),
                    "max_train_seconds": max(r["train_wall_seconds"] for r in ours)},
        "target": {"mean_balanced_accuracy": 0.65, "train_seconds_per_seed": 120},
    }
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
    result["target_met"] = (result["default"]["mean_balanced_accuracy"] >= 0.65
                            and result["default"]["max_train_seconds"] <= 120)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
