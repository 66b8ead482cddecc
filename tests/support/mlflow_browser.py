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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
