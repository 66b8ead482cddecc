"""Debian's Chromium through Playwright, and ``mlflow ui`` as the closing block prints it.

Shared by ``tests/test_mlflow_ui.py`` and ``docs/screenshots.py``: one way to launch the
browser (never Playwright's own browser download) and to tell MLflow's GenAI pages from its
model-training pages.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.lib.contract import MISCLASSIFIED_PNG
from tests.support.mlflow_server import MLFLOW_ENV, _stop, _wait_healthy, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
VIEWPORT = {"width": 1280, "height": 800}
#: Longest wait for a page's content (the UI fetches runs and metrics after loading).
PAGE_TIMEOUT_MS = 60_000
#: Text only MLflow's GenAI pages show: their sidebar's entries and the run page's
#: breadcrumb for an evaluation run.
GENAI_MARKERS = ("Evaluation runs", "Sessions", "Judges", "Agent versions")
#: ``mlflow ui`` prints nothing we need; the closing block's address uses this port.
PRINTED_PORT = "5000"


def chromium_missing() -> str | None:
    """Why the browser cannot run here, or None."""
    if not Path(CHROMIUM).is_file():
        return f"{CHROMIUM} not found (apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[docs]')"
    return None


@contextlib.contextmanager
def chromium_page(height: int = VIEWPORT["height"]) -> Iterator[Any]:
    """A page in a fresh browser profile (no stored MLflow settings)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": VIEWPORT["width"],
                                                    "height": height})
            page = context.new_page()
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def genai_markers_shown(page: Any) -> list[str]:
    """The GenAI-only texts visible on ``page`` (empty on model-training pages)."""
    shown = [text for text in GENAI_MARKERS
             if page.get_by_text(text, exact=True).filter(visible=True).count()]
    breadcrumb = page.get_by_test_id("experiment-observatory-link-runs")
    if breadcrumb.count() and breadcrumb.first.inner_text().strip() == "Evaluations":
        shown.append("breadcrumb Evaluations")
    return shown


def close_assistant(page: Any) -> None:
    """Close MLflow 3.17's assistant panel, which opens by itself on a first visit."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def show(page: Any, what: str) -> None:
    """Wait until ``what`` shows, then fail if any GenAI page or sidebar is on screen."""
    page.get_by_text(what, exact=True).first.wait_for()
    page.wait_for_timeout(1500)  # the sidebar, breadcrumbs and charts settle after the content
    close_assistant(page)
    assert genai_markers_shown(page) == [], f"GenAI page at {page.url} ({what})"


def click_through(page: Any, address: str, summary: dict[str, Any],
                  stop: Callable[[str, Any], None] = lambda name, page: None) -> None:
    """From the printed address, by clicks only: the run list, the pipeline run of
    ``summary`` (a ``--summary`` JSON), its evaluate run's gallery of mistakes, its train run's
    charts and its registered version's model card; ``stop(name, page)`` at each page."""
    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["run_id"])
    steps = summary["mlflow"]["step_run_ids"]
    model = summary["registration"]
    version_page = f"/models/{model['name']}/versions/{model['version']}"
    page.goto(address)
    show(page, parent.info.run_name)  # the run list, newest run first
    stop("runs", page)
    page.get_by_role("link", name=parent.info.run_name).first.click()
    show(page, "Child runs")
    assert f"/runs/{parent.info.run_id}" in page.url
    # the registry decision is on the pipeline run: its description and its models
    assert page.get_by_text("Registry decision").count()
    assert page.locator(f"a[href$='{version_page}']").count()
    stop("parent-run", page)
    page.get_by_role("link", name="evaluate", exact=True).first.click()
    show(page, "Registered models")
    assert f"/runs/{steps['evaluate']}" in page.url
    page.get_by_role("tab", name="Artifacts").click()
    page.get_by_text(MISCLASSIFIED_PNG, exact=True).first.click()
    page.locator("img[src^='blob:']").first.wait_for()  # the artifact viewer's image
    show(page, MISCLASSIFIED_PNG)
    assert page.get_by_text(f"/artifacts/{MISCLASSIFIED_PNG}").count()
    stop("evaluate-gallery", page)
    page.go_back()  # the evaluate run's overview
    page.go_back()  # the pipeline run
    show(page, "Child runs")
    page.get_by_role("link", name="train", exact=True).first.click()
    show(page, "Registered models")
    assert f"/runs/{steps['train']}" in page.url
    page.get_by_role("tab", name="Model metrics").click()
    show(page, "accuracy")  # the train section's first chart (train/accuracy)
    stop("train-metrics", page)
    page.get_by_role("tab", name="Overview").click()
    page.locator(f"a[href$='{version_page}']").first.click()  # "<name> v<version>"
    show(page, f"Version {model['version']}")
    assert version_page in page.url
    assert page.get_by_text("Model card").count() and page.get_by_text("95% interval").count()
    stop("model-card", page)


@contextlib.contextmanager
def printed_mlflow_ui(ui_command: str, workdir: Path) -> Iterator[str]:
    """Run the ``mlflow ui ...`` line the closing block prints, on a free port; yields the
    address to use in place of ``http://127.0.0.1:5000``."""
    args = shlex.split(ui_command)
    assert args[:2] == ["mlflow", "ui"], ui_command
    port = free_port()
    log_path = workdir / "mlflow-ui.log"
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # GenAI job workers: not needed
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "ui", *args[2:], "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"],
            cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, f"{url}/health", log_path, "mlflow ui")
        yield url
    finally:
        _stop(process)
