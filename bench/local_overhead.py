"""Benchmark: wall time of ``pipeline.py --local`` vs the same steps called in one process.

The baseline calls each component's body (one layer-1 call plus its MLflow tracking) in this
process, in DAG order, with the same config, data and kfp artifact objects; the measured run
is the CLI with kfp.local (a process per step, executor JSON, artifact folders), cache off
so both do all the work. Each gets a fresh MLflow sqlite store. Target: ratio <= 1.15.
Prints one JSON line last.

    python -m bench.local_overhead                      # default config, shared data
    python -m bench.local_overhead --set epochs=5 --set image_size=128
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kfp import dsl

from components.download_dataset import download_dataset
from components.evaluate_model import evaluate_model
from components.preprocess_dataset import preprocess_dataset
from components.register_model import register_model
from components.train_model import train_model
from pipeline.cli_args import resolve_config
from pipeline.config import PipelineConfig
from pipeline.dag import PIPELINE_NAME
from tests.support.paths import DEFAULT_BACKBONE_WEIGHTS, IRIS_ZIP, PROJECT_ROOT

TARGET_RATIO = 1.15


def run_in_process(config: PipelineConfig, workdir: Path, tracking_uri: str) -> bool:
    """The DAG's steps as plain calls of the component bodies; returns the gate verdict."""
    values: dict[str, Any] = {**config.to_dict(), "tracking_uri": tracking_uri,
                              "pipeline_run_id": uuid.uuid4().hex[:8],
                              "pipeline_name": PIPELINE_NAME}

    def artifact(kind: type[dsl.Artifact], task: str, name: str) -> dsl.Artifact:
        (workdir / task).mkdir(parents=True, exist_ok=True)
        return kind(name=name, uri=str(workdir / task / name), metadata={})

    def call(func: Callable[..., Any], **artifacts: dsl.Artifact) -> Any:
        params = {name: values[name] for name in inspect.signature(func).parameters
                  if name not in artifacts}
        return func(**artifacts, **params)

    raw = artifact(dsl.Dataset, "download-dataset", "raw_data")
    call(download_dataset, raw_data=raw)
    prepared = artifact(dsl.Dataset, "preprocess-dataset", "prepared_data")
    call(preprocess_dataset, raw_data=raw,
         prepared_data=prepared,
         data_report=artifact(dsl.Markdown, "preprocess-dataset", "data_report"))
    model = artifact(dsl.Model, "train-model", "trained_model")
    call(train_model, prepared_data=prepared, trained_model=model)
    metrics = artifact(dsl.Metrics, "evaluate-model", "metrics")
    evaluation = artifact(dsl.Artifact, "evaluate-model", "evaluation")
    gate = call(evaluate_model, trained_model=model, prepared_data=prepared, metrics=metrics,
                classification_metrics=artifact(dsl.ClassificationMetrics, "evaluate-model",
                                                "classification_metrics"),
                report=artifact(dsl.HTML, "evaluate-model", "report"), evaluation=evaluation)
    if gate:
        call(register_model, trained_model=model, metrics=metrics, evaluation=evaluation)
    return bool(gate)


def run_cli(argv: list[str], workdir: Path, tracking_uri: str) -> None:
    command = [sys.executable, str(PROJECT_ROOT / "pipeline.py"), "--local", "--no-cache",
               "--output-dir", str(workdir / "local_outputs"), "--tracking-uri", tracking_uri,
               "--summary", str(workdir / "summary.json"), *argv]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    subprocess.run(command, cwd=workdir, env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(IRIS_ZIP))
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        metavar="KEY=VALUE")
    parser.add_argument("--repeat", type=int, default=1,
                        help="pairs of runs; the order alternates, the median ratio counts")
    args = parser.parse_args()
    weights = DEFAULT_BACKBONE_WEIGHTS  # the default backbone's ImageNet weights, offline
    overrides = [f"weights={weights}", *args.overrides]
    config = resolve_config(None, args.data, overrides, environ={})
    cli_args = ["--data", args.data, *(x for item in overrides for x in ("--set", item))]

    pairs: list[dict[str, float]] = []
    summary: dict[str, Any] = {}
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-local-") as tmp:
            times: dict[str, float] = {}
            # Alternate which goes first so warm caches do not favour one side.
            for mode in (("in_process", "local") if i % 2 == 0 else ("local", "in_process")):
                workdir = Path(tmp) / mode
                workdir.mkdir()
                uri = f"sqlite:///{workdir / 'mlflow.db'}"
                start = time.perf_counter()
                if mode == "in_process":
                    run_in_process(config, workdir, uri)
                else:
                    run_cli(cli_args, workdir, uri)
                    summary = json.loads((workdir / "summary.json").read_text())
                times[mode] = time.perf_counter() - start
            pairs.append({"local_s": round(times["local"], 2),
                          "in_process_s": round(times["in_process"], 2),
                          "ratio": round(times["local"] / times["in_process"], 3)})
            print(json.dumps({"pair": i + 1, **pairs[-1]}), file=sys.stderr)

    ratio = statistics.median(p["ratio"] for p in pairs)
    print(json.dumps({
        "benchmark": "local_overhead",
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio <= TARGET_RATIO,
        "pairs": pairs,
        "local_test_metrics": summary.get("test_metrics"),
        "local_gate": summary.get("gate"),
        "overrides": overrides,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
