"""Benchmark: the default ``pipeline.py --local`` run against its compute floor, and its memory.

Runs the default pipeline (``--local --no-cache``, the shared data and backbone weights, so
nothing is downloaded) in a fresh folder and polls the process tree (psutil, every 0.2 s):
each step is its own process (kfp.local runs ``--function_to_execute <step>``), so a step's
wall time is its process' lifetime and its peak RSS the largest sum over that process and its
children. Then, in this same invocation, it times the floor: the backbone alone (pooled
features, one process, batch of the run's ``batch_size``, ``image_size`` px) over as many
images as the run pushed through it (as a graph function, the fastest way to run it),
counted from the run itself: the train step's
``backbone_images`` (training summary) plus evaluate's test images times its views.

``--runs 2`` repeats the run in the same output folder (the feature cache warm): the second
train step's time over the first's is ``second_train_ratio``. JSON line last: ``wall_s``,
``floor_s``, ``floor_ratio``, ``peak_rss_gb`` (largest step) and per-step figures.
Targets (issue 20): floor_ratio <= 1.5, peak_rss_gb <= 2.0, second_train_ratio <= 0.3.

    python bench/default_run.py [--runs 2] [--set KEY=VALUE ...]
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
from typing import Any

import psutil

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHARED = PROJECT_ROOT.parent / "shared" / "data"
# the default backbone's (tests/support/paths.py: DEFAULT_BACKBONE_WEIGHTS; this script runs
# without the project on sys.path)
WEIGHTS = SHARED / "mobilenet_2_5_224_tf_no_top.h5"
STEPS = ("download_dataset", "preprocess_dataset", "train_model", "evaluate_model",
         "register_model")
POLL_S = 0.2

sys.path.insert(0, str(PROJECT_ROOT))


def _step_of(process: psutil.Process, known: dict[int, str | None]) -> str | None:
    """The step a process works for: named by its own command line or an ancestor's."""
    if process.pid in known:
        return known[process.pid]
    step = None
    try:
        command = process.cmdline()
        if "--function_to_execute" in command:
            step = command[command.index("--function_to_execute") + 1]
        else:
            parent = process.parent()
            step = _step_of(parent, known) if parent is not None else None
    except (psutil.NoSuchProcess, psutil.AccessDenied, IndexError):
        pass
    known[process.pid] = step
    return step


def run_and_watch(command: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``command``; wall time, and per step its wall time and peak RSS (bytes)."""
    started = time.perf_counter()
    root = psutil.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE, text=True)
    known: dict[int, str | None] = {}
    steps: dict[str, dict[str, float]] = {}
    peak_total = 0
    while root.poll() is None:
        now = time.perf_counter() - started
        rss: dict[str, int] = {}
        total = 0
        for process in [root, *root.children(recursive=True)]:
            try:
                resident = process.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            total += resident
            step = _step_of(process, known)
            if step:
                rss[step] = rss.get(step, 0) + resident
        peak_total = max(peak_total, total)
        for step, used in rss.items():
            entry = steps.setdefault(step, {"first_s": now, "last_s": now, "peak_rss": 0})
            entry["last_s"] = now
            entry["peak_rss"] = max(entry["peak_rss"], used)
        time.sleep(POLL_S)
    stderr = root.stderr.read() if root.stderr else ""
    if root.returncode != 0:
        raise SystemExit(f"the run failed ({root.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "steps": steps, "peak_total": peak_total}


def backbone_images(output_dir: Path, tta_views: int) -> dict[str, int]:
    """Images each step pushed through the backbone, from the newest run's own files."""
    from pipeline.lib.contract import TRAINING_SUMMARY_FILE

    summary_path = max(output_dir.rglob(TRAINING_SUMMARY_FILE), key=lambda p: p.stat().st_mtime)
    summary = json.loads(summary_path.read_text())
    metrics_path = max(output_dir.rglob("metrics.json"), key=lambda p: p.stat().st_mtime)
    metrics = json.loads(metrics_path.read_text())
    evaluate = metrics.get("backbone_images")
    if evaluate is None:  # an evaluate step that does not count: every test image, every view
        evaluate = int(metrics["test_examples"]) * max(1, tta_views)
    train = summary.get("backbone_images")
    if train is None:  # a train step that does not count (before it did): its feature rows,
        # the validation images once for the head and once per test-time view for the score
        from pipeline.lib.contract import DATA_REPORT_JSON

        report = json.loads(max(output_dir.rglob(DATA_REPORT_JSON),
                                key=lambda p: p.stat().st_mtime).read_text())
        val = int(report["split_sizes"]["val"])
        train = summary["bookkeeping"]["head_feature_rows"] + val * (1 + max(1, tta_views))
    return {"train_model": int(train), "evaluate_model": int(evaluate)}


def time_floor(config: Any, images: int) -> float:
    """Seconds the backbone alone takes for ``images`` images at the run's size and batch."""
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.lib import models
    from pipeline.lib.params import TrainParams

    params = config.params_for(TrainParams)
    core = models.build_model(params, 3)
    extractor = keras.Model(core.inputs, core.get_layer(models.POOL).output)
    forward = tf.function(lambda x: extractor(x, training=False), input_signature=[
        tf.TensorSpec([None, params.image_size, params.image_size, 3], tf.float32)])
    batch = np.random.default_rng(0).integers(
        0, 256, (params.batch_size, params.image_size, params.image_size, 3)).astype(np.float32)
    forward(batch)  # build and trace outside the clock
    started = time.perf_counter()
    for start in range(0, images, params.batch_size):
        np.asarray(forward(batch[: min(params.batch_size, images - start)]))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("IRIS_DATA_SOURCE",
                                                         str(SHARED / "iris-image.zip")))
    parser.add_argument("--weights", default=os.environ.get("IRIS_MODEL_WEIGHTS", str(WEIGHTS)))
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="KEY=VALUE")
    parser.add_argument("--runs", type=int, default=1, help="2: a second run, cache warm")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="run in DIR (created, must be new) and keep it: the step logs "
                             "(<DIR>/local_outputs/**/logs) show where the time went")
    args = parser.parse_args()

    from pipeline.cli_args import resolve_config

    overrides = [f"weights={args.weights}", *args.overrides]
    config = resolve_config(None, args.data, overrides, environ={})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IRIS_"))}
    env["PYTHONPATH"] = str(PROJECT_ROOT)
    runs = []
    if args.keep is not None:
        args.keep.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="bench-default-run-") as tmp:
        workdir = args.keep.resolve() if args.keep is not None else Path(tmp)
        command = [sys.executable, str(PROJECT_ROOT / "pipeline.py"), "--local", "--no-cache",
                   "--output-dir", str(workdir / "local_outputs"),
                   "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--data", args.data,
                   *(x for item in overrides for x in ("--set", item))]
        for number in range(args.runs):
            watched = run_and_watch(command, workdir, env)
            counted = backbone_images(workdir / "local_outputs", config.tta_views)
            runs.append({**watched, "backbone_images": counted})
            print(json.dumps({"run": number + 1, "wall_s": round(watched["wall_s"], 1),
                              "backbone_images": counted}), file=sys.stderr)
    first = runs[0]
    images = sum(first["backbone_images"].values())
    floor_s = time_floor(config, images)
    per_step = {step: {"wall_s": round(e["last_s"] - e["first_s"], 1),
                       "peak_rss_gb": round(e["peak_rss"] / 2**30, 3)}
                for step, e in first["steps"].items()}
    peak = max(e["peak_rss"] for e in first["steps"].values()) / 2**30
    result: dict[str, Any] = {
        "benchmark": "default_run",
        "wall_s": round(first["wall_s"], 1),
        "floor_s": round(floor_s, 1),
        "floor_ratio": round(first["wall_s"] / floor_s, 2),
        "floor_images": images,
        "backbone_images": first["backbone_images"],
        "peak_rss_gb": round(peak, 3),
        "peak_tree_rss_gb": round(first["peak_total"] / 2**30, 3),
        "steps": per_step,
        "image_size": config.image_size,
        "batch_size": config.batch_size,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    if len(runs) > 1:
        train = [r["steps"]["train_model"]["last_s"] - r["steps"]["train_model"]["first_s"]
                 for r in runs]
        result["second_run_wall_s"] = round(runs[1]["wall_s"], 1)
        result["second_train_ratio"] = round(train[1] / train[0], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
