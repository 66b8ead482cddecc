"""The MLflow UI as a user meets it: the closing block's ``mlflow ui`` command and address,
a fresh Chromium profile, and clicks (never typed addresses) from the run list to the newest
pipeline run, its evaluate run's gallery, its train run's charts and its registered model's
card, all on model-training pages (``tests/support/mlflow_browser.click_through``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from pipeline.lib import gallery
from tests.support.cli_helpers import V1_BACKBONE, clean_env, run_local_cli, succeeded
from tests.support.mlflow_browser import (
    PRINTED_PORT,
    chromium_missing,
    chromium_page,
    click_through,
    printed_mlflow_ui,
)

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(chromium_missing() is not None,
                                 reason=chromium_missing() or "")]

#: Small and quick; gate 0 so the register step runs and the train run has a registered model.
SETTINGS = ("image_size=96", *V1_BACKBONE, "gate_threshold=0", "epochs=1")


@pytest.fixture(scope="module")
def printed(tmp_path_factory: pytest.TempPathFactory, iris_zip: Path,
            mobilenet_weights: Path) -> tuple[Path, str, str, dict[str, Any]]:
    """A local run (default sqlite store); the ``mlflow ui`` line and address it printed."""
    workdir = tmp_path_factory.mktemp("mlflow-ui")
    args = ["--data", str(iris_zip), "--output-dir", str(workdir / "out")]
    for item in (*SETTINGS, f"weights={mobilenet_weights}"):
        args += ["--set", item]
    run = run_local_cli(workdir, *args, env=clean_env())
    summary = succeeded(run)
    text = run.stdout + run.stderr
    command = re.search(r"^.*?(mlflow ui .*)$", text, re.M)
    address = re.search(rf"then (http://127\.0\.0\.1:{PRINTED_PORT}\S*)", text)
    assert command and address, text[-3000:]
    return workdir, command.group(1), address.group(1), summary


def test_evaluate_run_holds_the_gallery(printed: tuple[Path, str, str, dict[str, Any]]) -> None:
    from mlflow import MlflowClient

    summary = printed[3]
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    files = {a.path for a in client.list_artifacts(summary["mlflow"]["step_run_ids"]["evaluate"])}
    assert {"misclassified.png", gallery.CONFIDENT_PNG, "report.html"} <= files


def test_clicks_from_the_printed_address_stay_on_model_training_pages(
        printed: tuple[Path, str, str, dict[str, Any]]) -> None:
    workdir, command, address, summary = printed
    with printed_mlflow_ui(command, workdir) as url, chromium_page() as page:
        click_through(page, address.replace(f"http://127.0.0.1:{PRINTED_PORT}", url), summary)
