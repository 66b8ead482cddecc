"""Benchmark: the batch-prediction pipeline's throughput, and the drift test's error rates.

Needs a registered model that carries a drift reference (any model trained since the drift
check exists), e.g. the champion of a default local run:

    python pipeline.py --local                   # registers models:/iris-image-classifier@champion
    python -m bench.batch_predict --tracking-uri "sqlite:///$PWD/mlflow.db"

Measures, on the 421 images of the shared iris archive:

- ``pipeline``: images per second of ``python pipeline.py --predict ARCHIVE`` end to end
  (kfp.local, both steps, process start-ups and model download included) and its peak RSS
  (the largest of its processes), against ``in_process``: the same model loaded with
  ``mlflow.pyfunc`` in this process scoring the same files (load included), target ratio
  >= 0.7;
- ``false_positive_rate``: the drift test on 20 random halves of iris, each half the
  reference and the other half the new images (no drift by construction), target <= 0.1;
- ``detection_rate``: the same halves with the new half rotated by 30 degrees, re-coloured
  (red and blue swapped) or replaced by generated images, target >= 0.9.

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from tests.support.paths import IRIS_ZIP

ROOT = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.7
TARGET_FPR = 0.1
TARGET_DETECTION = 0.9
HALVES = 20


def load_images(archive: Path) -> list[bytes]:
    with zipfile.ZipFile(archive) as zf:
        names = sorted(n for n in zf.namelist()
                       if n.lower().endswith((".jpg", ".jpeg", ".png")))
        return [zf.read(n) for n in names]


def run_pipeline(archive: Path, model_uri: str, tracking_uri: str, work: Path) -> dict[str, Any]:
    """Wall time and peak RSS of one ``--predict`` run, in its own process tree."""
    summary = work / "summary.json"
    command = [sys.executable, str(ROOT / "pipeline.py"), "--predict", str(archive),
               "--model-uri", model_uri, "--tracking-uri", tracking_uri,
               "--output-dir", str(work / "out"), "--summary", str(summary)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=work, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the pipeline failed ({done.returncode}):\n{done.stderr[-3000:]}")
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    result = json.loads(summary.read_text())
    return {"seconds": elapsed, "images": result["images"], "peak_rss_mb": peak_kb / 1024,
            "closing_block": done.stderr.strip().splitlines()}


def run_in_process(images: list[bytes], model_uri: str, batch_size: int) -> dict[str, Any]:
    """The same model, loaded here, on the same files (load included)."""
    import mlflow
    import pandas as pd

    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(model_uri)
    labels = []
    for start in range(0, len(images), batch_size):
        frame = model.predict(pd.DataFrame({"image": images[start:start + batch_size]}))
        labels += list(frame["label"])
    return {"seconds": time.perf_counter() - started, "images": len(labels)}


def shifted(images: list[bytes], kind: str) -> list[bytes]:
    """``images`` rotated, re-coloured, or as many generated images."""
    from PIL import Image

    from tests.support.imagegen import image_bytes

    if kind == "generated":
        return [image_bytes(i, size=256) for i in range(len(images))]
    out = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
            if kind == "rotated":
                rgb = rgb.rotate(30, resample=Image.Resampling.BILINEAR)
            else:  # re-coloured: red and blue swapped
                r, g, b = rgb.split()
                rgb = Image.merge("RGB", (b, g, r))
            buffer = io.BytesIO()
            rgb.save(buffer, format="PNG")
            out.append(buffer.getvalue())
    return out


def drift_rates(images: list[bytes], model_uri: str, work: Path) -> dict[str, Any]:
    """False alarms on random halves of iris, detections on shifted halves.

    Every image (and its shifted versions) is described once; each split then takes the
    rows of its halves: the reference from the first half of the originals, the new images
    from the second half, original or shifted.
    """
    from mlflow.tracking import MlflowClient

    from pipeline.lib import drift, embeddings
    from pipeline.steps.predict import LoadedModel, resolve_model_version

    model = LoadedModel.download(resolve_model_version(model_uri, MlflowClient()),
                                 work / "model")
    sizes = [(256, 256)] * len(images)
    kinds = ("held_out", "rotated", "recoloured", "generated")
    described = {kind: embeddings.describe_all(
        model.describe, images if kind == "held_out" else shifted(images, kind), sizes)
        for kind in kinds}
    features, labels, stats = described["held_out"]
    flagged: dict[str, list[bool]] = {kind: [] for kind in kinds}
    for seed in range(HALVES):
        order = np.random.default_rng(seed).permutation(len(images))
        first, second = order[:len(order) // 2], order[len(order) // 2:]
        reference = drift.Reference.build(features[first], labels[first], stats[first],
                                          model.classes, seed=seed)
        for kind in kinds:
            f, y, s = (column[second] for column in described[kind])
            report = drift.compare(reference, f, y, s, seed=seed)
            flagged[kind].append(report["overall"]["verdict"] == drift.VERDICT_DRIFT)
    rates = {kind: float(np.mean(values)) for kind, values in flagged.items()}
    shifted_all = [v for kind in kinds[1:] for v in flagged[kind]]
    return {"false_positive_rate": rates["held_out"],
            "detection_rate": float(np.mean(shifted_all)),
            "detection_by_kind": {kind: rates[kind] for kind in kinds[1:]},
            "alpha": drift.ALPHA, "halves": HALVES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        required="MLFLOW_TRACKING_URI" not in os.environ)
    parser.add_argument("--model-uri", default="models:/iris-image-classifier@champion")
    parser.add_argument("--archive", type=Path, default=IRIS_ZIP)
    parser.add_argument("--batch-size", type=int, default=32, help="as the pipeline's default")
    parser.add_argument("--skip-pipeline", action="store_true",
                        help="only the drift rates (no pipeline run)")
    args = parser.parse_args(argv)
    os.environ["MLFLOW_TRACKING_URI"] = args.tracking_uri
    images = load_images(args.archive)
    result: dict[str, Any] = {"images": len(images), "model_uri": args.model_uri}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        work = Path(tmp)
        if not args.skip_pipeline:
            pipeline = run_pipeline(args.archive, args.model_uri, args.tracking_uri, work)
            for line in pipeline.pop("closing_block"):
                print(line)
            local = run_in_process(images, args.model_uri, args.batch_size)
            result["pipeline_images_per_s"] = pipeline["images"] / pipeline["seconds"]
            result["in_process_images_per_s"] = local["images"] / local["seconds"]
            result["ratio"] = result["pipeline_images_per_s"] / result["in_process_images_per_s"]
            result["pipeline_seconds"] = pipeline["seconds"]
            result["in_process_seconds"] = local["seconds"]
            result["pipeline_peak_rss_mb"] = pipeline["peak_rss_mb"]
            result["in_process_peak_rss_mb"] = (
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        result.update(drift_rates(images, args.model_uri, work))
    result["targets"] = {"ratio": TARGET_RATIO, "false_positive_rate": TARGET_FPR,
                         "detection_rate": TARGET_DETECTION}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
