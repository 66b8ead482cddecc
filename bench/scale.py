"""Benchmark: seconds per image and peak memory of preprocess and train as the data set grows.

Generates synthetic sets of distinct 256x256 JPEGs (3 classes, a class colour plus random
low-frequency patterns and noise, so every file has its own content hash), then runs
``prepare_dataset`` and ``train_model`` on each set, every step in its own process, and reads
that process's peak RSS from ``os.wait4``. The train config is the default's shape (MobileNet
head on cached features of the images and augmented views) plus one fine-tune epoch, so both
the feature extraction and the tf.data training/validation pipeline are exercised.
Target: the peak RSS of the larger set at most 1.3x the smaller one's, per step.

Run: ``python -m bench.scale [--sizes 1000 8000] [--views 1] [--fine-tune-epochs 1]``;
prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.support.paths import MOBILENET_WEIGHTS, PROJECT_ROOT

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLASSES = ("setosa", "versicolor", "virginica")
COLOURS = ((200, 80, 80), (80, 200, 80), (80, 80, 200))
TARGET_RATIO = 1.3


def generate(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` distinct JPEGs spread over three class folders under ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        label = i % len(CLASSES)
        coarse = rng.normal(0, 40, size=(8, 8, 3))
        pattern = np.kron(coarse, np.ones((32, 32, 1)))
        pixels = np.clip(np.array(COLOURS[label]) + pattern + rng.normal(0, 8, (256, 256, 3)),
                         0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / CLASSES[label] / f"{i:06d}.jpg", quality=85)
    return folder


def worker(step: str, args: list[str]) -> None:
    """One step in this (child) process; prints its wall time as JSON."""
    from pipeline.config import PipelineConfig
    from pipeline.lib.params import PreprocessParams, TrainParams

    config = PipelineConfig.from_mapping(json.loads(args[0]))
    started = time.perf_counter()
    if step == "preprocess":
        from pipeline.steps.preprocess import prepare_dataset

        prepare_dataset(args[1], args[2], config.params_for(PreprocessParams))
    else:
        from pipeline.steps.train import train_model

        train_model(args[1], args[2], config.params_for(TrainParams))
    print(json.dumps({"seconds": time.perf_counter() - started}))


def run_step(step: str, *args: str) -> dict[str, float]:
    """Run ``step`` in a child process; its wall seconds and peak RSS (MiB)."""
    process = subprocess.Popen([sys.executable, "-m", "bench.scale", "--worker", step, *args],
                               cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    out = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{step} failed with exit code {process.returncode}")
    seconds = json.loads(out.strip().splitlines()[-1])["seconds"]
    return {"seconds": seconds, "peak_rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss is KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[1000, 8000])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--views", type=int, default=1, help="head_feature_views")
    parser.add_argument("--fine-tune-epochs", type=int, default=1)
    parser.add_argument("--weights", default=str(MOBILENET_WEIGHTS))
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1:])
        return

    config = json.dumps({  # MobileNet v1-0.25: memory growth, not the backbone, is measured
        "data_sha256": "", "backbone": "mobilenet", "alpha": 0.25, "tta_views": 0,
        "weights": args.weights, "image_size": args.image_size,
        "head_feature_views": args.views, "fine_tune_epochs": args.fine_tune_epochs,
        "fine_tune_layers": 10, "max_archive_entries": 1_000_000,
    })
    results: dict[str, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp:
        for size in args.sizes:
            work = Path(tmp) / str(size)
            raw = generate(work / "raw", size, seed=size)
            results[str(size)] = {}
            for step, step_args in (("preprocess", (str(raw), str(work / "data"))),
                                    ("train", (str(work / "data"), str(work / "model")))):
                measured = run_step(step, config, *step_args)
                measured["seconds_per_image"] = measured["seconds"] / size
                results[str(size)][step] = measured
                print(f"{size:>6} images  {step:<10} {measured['seconds']:8.1f} s  "
                      f"{1000 * measured['seconds_per_image']:7.2f} ms/image  "
                      f"peak RSS {measured['peak_rss_mib']:7.0f} MiB", flush=True)
    small, large = (str(s) for s in args.sizes)
    ratios = {step: round(results[large][step]["peak_rss_mib"]
                          / results[small][step]["peak_rss_mib"], 3)
              for step in ("preprocess", "train")}
    for step, ratio in ratios.items():
        print(f"peak RSS ratio {large}/{small} images, {step}: {ratio:.2f}x "
              f"(target <= {TARGET_RATIO}x)")
    print(json.dumps({
        "bench": "scale", "sizes": args.sizes, "image_size": args.image_size,
        "head_feature_views": args.views, "fine_tune_epochs": args.fine_tune_epochs,
        "results": {size: {step: {k: round(v, 4) for k, v in m.items()}
                           for step, m in steps.items()} for size, steps in results.items()},
        "peak_rss_ratio": ratios,
        "within_target": all(r <= TARGET_RATIO for r in ratios.values()),
    }))


if __name__ == "__main__":
    main()
