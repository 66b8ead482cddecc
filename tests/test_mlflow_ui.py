"""The MLflow UI as a user meets it: the closing block's ``mlflow ui`` command and address,
a fresh Chromium profile, and clicks (never typed addresses) from the run list to the newest
pipeline run, its train run and its registered model, all on model-training pages."""

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
    close_assistant,
    genai_markers_shown,
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


def _open(page: Any, what: str) -> None:
    """Wait until ``what`` shows, then fail if any GenAI page or sidebar is on screen."""
    page.get_by_text(what, exact=True).first.wait_for()
    page.wait_for_timeout(1500)  # the sidebar and breadcrumbs settle after the content
    close_assistant(page)
    assert genai_markers_shown(page) == [], f"GenAI page at {page.url} ({what})"


def click_through(page: Any, address: str, summary: dict[str, Any]) -> None:
    """Run list -> newest pipeline run -> its train run -> its registered version, by clicks."""
    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["run_id"])
    model = summary["registration"]
    page.goto(address)
    _open(page, parent.info.run_name)  # the run list, newest run first
    page.get_by_role("link", name=parent.info.run_name).first.click()
    _open(page, "Child runs")
    assert f"/runs/{parent.info.run_id}" in page.url
    # the registry decision is on the pipeline run: its description and its models
    assert page.get_by_text("Registry decision").count()
    assert page.locator(f"a[href$='/models/{model['name']}/versions/{model['version']}']").count()
    page.get_by_role("link", name="train", exact=True).first.click()
    _open(page, "Registered models")
    assert f"/runs/{summary['mlflow']['step_run_ids']['train']}" in page.url
    version_page = f"/models/{model['name']}/versions/{model['version']}"
    page.locator(f"a[href$='{version_page}']").first.click()  # "<name> v<version>"
    _open(page, f"Version {model['version']}")
    assert version_page in page.url
    assert page.get_by_text("Model card").count() and page.get_by_text("95% interval").count()


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
