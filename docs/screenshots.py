"""Regenerate the MLflow UI screenshots in docs/: two small local runs, a real server, Chromium.

Usage (needs ``pip install -e ".[dev,docs]"`` and Debian's ``chromium`` package; Playwright's
own browser download is not used)::

    python -m docs.screenshots --output-dir docs/

Runs ``pipeline.py --local`` twice (two pooling settings, small images, epoch-by-epoch head so
the charts have curves) and once with a four-trial ``--sweep``, against a fresh ``mlflow
server`` on 127.0.0.1, then saves what a user sees: the experiment's run list, the train run's
model metrics, the registered model and MLflow's Compare view of the sweep's trials. The
server and everything it stored live in a temporary folder (``--workdir`` keeps them). The data
set and weights come from ``IRIS_DATA_SOURCE`` / ``IRIS_MODEL_WEIGHTS`` when set (offline),
else the defaults are downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from tests.support.cli_helpers import clean_env, run_local_cli, succeeded
from tests.support.mlflow_browser import (
    VIEWPORT,
    chromium_missing,
    chromium_page,
    close_assistant,
)
from tests.support.mlflow_server import run_mlflow_server
from tests.support.paths import PROJECT_ROOT

logger = logging.getLogger("screenshots")

EXPERIMENT = "iris-image-classification"
MODEL_NAME = "iris-image-classifier"
#: Small and quick, with curves: the head trains epoch by epoch on 128 px images; gate 0 so
#: both runs reach the registry (champion, then challenger or a new champion).
COMMON = ("image_size=128", "head_feature_views=0", "epochs=8", "learning_rate=0.003",
          "gate_threshold=0")
#: What differs between the two runs, so the run list shows it in the names.
RUNS = (("pooling=avg_max",), ("pooling=avg",))
#: The sweep run's trials: a grid the Compare view shows as a table.
SWEEP = "grid:\n  pooling: [avg_max, avg]\n  tta_views: [0, 8]\n"


def run_pipelines(workdir: Path, tracking_uri: str) -> list[dict]:
    """Both local runs, then the sweep, against ``tracking_uri``; their ``--summary`` JSONs."""
    env = clean_env(**{k: v for k, v in os.environ.items() if k.startswith("IRIS_")},
                    PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                             os.environ.get("PYTHONPATH")])))
    sweep = workdir / "sweep.yaml"
    sweep.write_text(SWEEP)
    runs = [[flag for item in extra for flag in ("--set", item)] for extra in RUNS]
    runs.append(["--sweep", str(sweep)])
    summaries = []
    for index, extra in enumerate(runs, 1):
        args = ["--tracking-uri", tracking_uri, "--output-dir", str(workdir / "out")]
        for item in COMMON:
            args += ["--set", item]
        args += extra
        logger.info("pipeline run %d/%d: %s", index, len(runs), " ".join(args))
        summaries.append(succeeded(run_local_cli(workdir, *args, env=env, timeout=1800)))
    return summaries


def save_png(page: object, path: Path) -> Path:
    """Screenshot ``page`` to ``path`` as a palette PNG (a tenth of the RGB size)."""
    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw))
    with Image.open(raw) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)
    raw.unlink()
    logger.info("wrote %s (%d kB)", path, path.stat().st_size // 1024)
    return path


def show_trial_differences(page: Any) -> None:
    """Compare view: only the settings and metrics that differ, from the run names down."""
    page.get_by_role("switch", name="Parameters - Show diff only").click()
    page.get_by_role("switch", name="Metrics - Show diff only").click()
    close_assistant(page)
    page.get_by_text("Run Name:").first.evaluate("e => e.scrollIntoView({block: 'start'})")


def take_screenshots(url: str, summary: dict, sweep: dict, output_dir: Path) -> list[Path]:
    """Run list, the train run's model metrics and the registered model (1280x800), and the
    sweep's trials compared (1280x1000)."""
    from mlflow import MlflowClient
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    experiment_id = MlflowClient(url).get_experiment_by_name(EXPERIMENT).experiment_id
    train_id = summary["mlflow"]["step_run_ids"]["train"]
    # MLflow 3.17's UI picks GenAI or model-training pages by a global switch (this URL
    # parameter, then the browser's last choice), not by the experiment's kind tag.
    ml = "workflowType=machine_learning"
    trials = json.dumps([t["run_id"] for t in sweep["trials"]])
    pages = [  # file, address, text that says the page is there, what to do first, height
        ("mlflow-runs.png", f"{url}/#/experiments/{experiment_id}?{ml}", "mobilenet_v2 a0.5",
         None, VIEWPORT["height"]),
        ("mlflow-train-metrics.png",
         f"{url}/#/experiments/{experiment_id}/runs/{train_id}/model-metrics?{ml}",
         "train/accuracy", None, VIEWPORT["height"]),
        ("mlflow-registry.png", f"{url}/#/models/{MODEL_NAME}?{ml}", "Version 1", None,
         VIEWPORT["height"]),
        ("mlflow-sweep-compare.png", f"{url}/#/compare-runs?runs={trials}"
         f"&experiments={json.dumps([experiment_id])}&{ml}", "model_val_balanced_accuracy",
         show_trial_differences, 1000),
    ]
    written = []
    with chromium_page() as page:
        for name, address, expected_text, prepare, height in pages:
            page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
            page.goto(address)
            try:
                page.get_by_text(expected_text).first.wait_for()
            except PlaywrightTimeout:
                save_png(page, output_dir / f"failed-{name}")  # what it showed instead
                raise
            close_assistant(page)  # MLflow's assistant panel covers a third of the page
            if prepare is not None:
                prepare(page)
            page.wait_for_timeout(3000)  # charts draw after their data arrives
            written.append(save_png(page, output_dir / name))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the pipelines against a fresh server, save the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=PROJECT_ROOT / "docs",
                        help="where the PNGs go (default: docs/)")
    parser.add_argument("--workdir", type=Path,
                        help="keep the server's store and the runs' outputs here "
                             "(default: a temporary folder, removed afterwards)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if chromium_missing():
        parser.error(chromium_missing())
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="iris-screenshots-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        with run_mlflow_server(workdir / "mlflow-server") as server:
            logger.info("mlflow server at %s", server.url)
            summaries = run_pipelines(workdir, server.url)
            take_screenshots(server.url, summaries[1], summaries[2]["sweep"], args.output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
