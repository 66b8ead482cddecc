"""Benchmark: the served model's REST latency and throughput beside in-process ``predict``.

Serves a registered model with ``mlflow models serve --env-manager local`` on 127.0.0.1 and
loads the same model in this process, then measures on the same 256 px JPEGs of the shared
iris archive, alternating REST and in-process calls so both see the same machine load:

- ``single``: p50 / p95 latency of a request carrying one image;
- ``batch16``: images per second with requests of 16 images.

``--contract base64`` (default) sends the JPEG files base64-encoded, the served model's
contract; ``--contract uint8`` sends the decoded pixels as nested JSON lists (and a uint8
array in process), the only input a model logged before the base64 contract takes.
Target: REST p50 of one image within 2x of in-process and <= 100 ms (2 cores).
Prints one JSON line last.

    python pipeline.py --local          # registers models:/iris-image-classifier@champion
    python -m bench.serve_latency --tracking-uri "sqlite:///$PWD/mlflow.db"
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests

from tests.support.mlflow_server import serve_model
from tests.support.paths import IRIS_ZIP

TARGET_RATIO = 2.0
TARGET_P50_MS = 100.0
BATCH = 16


def load_jpegs(archive: Path, count: int) -> list[bytes]:
    """The first ``count`` JPEG files of the archive, as stored (256 px in the iris set)."""
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist() if n.lower().endswith((".jpg", ".jpeg")))
        return [zf.read(n) for n in names[:count]]


def payloads(jpegs: list[bytes], contract: str) -> tuple[Callable[[list[int]], Any],
                                                         Callable[[list[int]], Any]]:
    """(REST JSON body, in-process model input) builders for the images at given indices."""
    import pandas as pd
    import tensorflow as tf

    if contract == "base64":
        strings = [base64.b64encode(j).decode() for j in jpegs]
        return (lambda idx: {"inputs": [strings[i] for i in idx]},
                lambda idx: pd.DataFrame({"image": [strings[i] for i in idx]}))
    pixels = [tf.io.decode_image(j, channels=3).numpy() for j in jpegs]
    return (lambda idx: {"inputs": np.stack([pixels[i] for i in idx]).tolist()},
            lambda idx: np.stack([pixels[i] for i in idx]))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure(url: str, model: Any, jpegs: list[bytes], contract: str, repeats: int,
            batches: int) -> dict[str, Any]:
    rest_body, local_input = payloads(jpegs, contract)
    session = requests.Session()

    def rest(idx: list[int]) -> float:
        body = json.dumps(rest_body(idx))  # serialising is the client's cost, not timed
        started = time.perf_counter()
        response = session.post(f"{url}/invocations", data=body, timeout=120,
                                headers={"Content-Type": "application/json"})
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        return elapsed

    def local(idx: list[int]) -> float:
        data = local_input(idx)
        started = time.perf_counter()
        model.predict(data)
        return time.perf_counter() - started

    for i in range(3):  # warm-up: connections, first calls
        rest([i]), local([i])
    single_rest, single_local = [], []
    for r in range(repeats):
        idx = [r % len(jpegs)]
        single_rest.append(rest(idx))
        single_local.append(local(idx))
    batch_rest, batch_local = [], []
    for b in range(batches):
        idx = [(b * BATCH + k) % len(jpegs) for k in range(BATCH)]
        batch_rest.append(rest(idx))
        batch_local.append(local(idx))
    single = {
        "rest_p50_ms": 1000 * percentile(single_rest, 50),
        "rest_p95_ms": 1000 * percentile(single_rest, 95),
        "inprocess_p50_ms": 1000 * percentile(single_local, 50),
        "inprocess_p95_ms": 1000 * percentile(single_local, 95),
    }
    single["rest_over_inprocess_p50"] = single["rest_p50_ms"] / single["inprocess_p50_ms"]
    batch = {
        "rest_images_per_s": BATCH * batches / sum(batch_rest),
        "inprocess_images_per_s": BATCH * batches / sum(batch_local),
        "rest_p50_ms_per_request": 1000 * statistics.median(batch_rest),
    }
    request_bytes = len(json.dumps(rest_body([0])))
    return {"single": {k: round(v, 2) for k, v in single.items()},
            "batch16": {k: round(v, 1) for k, v in batch.items()},
            "one_image_request_bytes": request_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="where the model is registered (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--model-uri", default="models:/iris-image-classifier@champion")
    parser.add_argument("--contract", choices=("base64", "uint8"), default="base64")
    parser.add_argument("--archive", type=Path, default=IRIS_ZIP, help="JPEGs to send")
    parser.add_argument("--repeats", type=int, default=100, help="single-image requests")
    parser.add_argument("--batches", type=int, default=10, help="requests of 16 images")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        parser.error("no tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import mlflow

    mlflow.set_tracking_uri(args.tracking_uri)
    jpegs = load_jpegs(args.archive, 64)
    model = mlflow.pyfunc.load_model(args.model_uri)
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp, \
            serve_model(args.model_uri, args.tracking_uri, Path(tmp)) as url:
        result = measure(url, model, jpegs, args.contract, args.repeats, args.batches)
    single = result["single"]
    result = {
        "benchmark": "serve_latency",
        "model_uri": args.model_uri,
        "contract": args.contract,
        **result,
        "targets": {
            "rest_p50_within_2x_inprocess": single["rest_over_inprocess_p50"] <= TARGET_RATIO,
            "rest_p50_at_most_100_ms": single["rest_p50_ms"] <= TARGET_P50_MS,
        },
        "cpus": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
