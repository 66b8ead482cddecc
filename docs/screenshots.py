"""Regenerate the MLflow UI screenshots in docs/: default runs, the printed ``mlflow ui``, clicks.

Usage (needs ``pip install -e ".[dev,docs]"`` and Debian's ``chromium`` package; Playwright's
own browser download is not used)::

    python -m docs.screenshots --output-dir docs/

Does what a user does: runs ``pipeline.py --local`` with the default config (then with
``tta_views=8``, and a two-trial ``--sweep``) in one folder with its default MLflow store,
starts the ``mlflow ui`` command the closing block printed, opens the printed address in a
fresh Chromium profile and clicks from the run list (its *Run Name* column dragged wide
enough to show the names whole) to the default run, its evaluate run's
gallery of mistakes, its train run's charts and its registered version's model card
(:func:`tests.support.mlflow_browser.click_through`, the browser test's clicks), opens the
run list's *Columns* menu, then ticks the sweep's trials in the run list and compares them.
Each stop is saved as a PNG. The runs
share the folder's feature cache, so only the first extracts training features. The data set
and weights come from ``IRIS_DATA_SOURCE`` / ``IRIS_MODEL_WEIGHTS`` when set (offline), else
the defaults are downloaded. ``--workdir`` keeps the runs; run again with ``--reuse`` to
retake the screenshots from them without running the pipeline.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from tests.support.cli_helpers import clean_env, run_local_cli, set_flags, succeeded
from tests.support.mlflow_browser import (
    PRINTED_PORT,
    VIEWPORT,
    chromium_missing,
    chromium_page,
    click_through,
    close_assistant,
    printed_mlflow_ui,
    show,
)
from tests.support.paths import PROJECT_ROOT

logger = logging.getLogger("screenshots")

#: What the runs printed and left (``--reuse`` reads it).
RUNS_FILE = "screenshot-runs.json"
#: The default run, then one setting changed, so the run list names them by what differs.
RUNS = ((), ("tta_views=8",))
#: The sweep run's trials: two head strengths on the default config's cached features.
SWEEP = "grid:\n  head_c: [0.003, 0.03]\n"
#: Where the printed address's port is replaced by the one ``mlflow ui`` got here.
PRINTED_ADDRESS = re.compile(rf"then (http://127\.0\.0\.1:{PRINTED_PORT}\S*)")
PRINTED_COMMAND = re.compile(r"^\s*(mlflow ui .*)$", re.M)


def run_pipelines(workdir: Path) -> tuple[list[dict[str, Any]], str, str]:
    """Both local runs, then the sweep, in ``workdir``; their ``--summary`` JSONs and the
    ``mlflow ui`` command and address the last one printed."""
    env = clean_env(**{k: v for k, v in os.environ.items() if k.startswith("IRIS_")},
                    PYTHONPATH=os.pathsep.join(filter(None, [str(PROJECT_ROOT),
                                                             os.environ.get("PYTHONPATH")])))
    sweep = workdir / "sweep.yaml"
    sweep.write_text(SWEEP)
    runs = [set_flags(*extra) for extra in RUNS]
    runs.append(["--sweep", str(sweep)])
    summaries, text = [], ""
    for index, args in enumerate(runs, 1):
        logger.info("pipeline run %d/%d: %s", index, len(runs), " ".join(args) or "(default)")
        run = run_local_cli(workdir, *args, env=env, timeout=3600)
        summaries.append(succeeded(run))
        text = run.stdout + run.stderr
    command, address = PRINTED_COMMAND.search(text), PRINTED_ADDRESS.search(text)
    if not (command and address):
        raise RuntimeError(f"no mlflow ui command or address in the output: {text[-2000:]}")
    (workdir / RUNS_FILE).write_text(json.dumps(
        {"summaries": summaries, "command": command.group(1), "address": address.group(1)}))
    return summaries, command.group(1), address.group(1)


def save_png(page: object, path: Path) -> Path:
    """Screenshot ``page`` to ``path`` as a palette PNG (a tenth of the RGB size)."""
    raw = path.with_suffix(".raw.png")
    page.screenshot(path=str(raw))
    with Image.open(raw) as image:
        image.convert("RGB").quantize(colors=256).save(path, optimize=True)
    raw.unlink()
    logger.info("wrote %s (%d kB)", path, path.stat().st_size // 1024)
    return path


def widen_run_names(page: Any, width: int = 480) -> None:
    """Drag the run list's *Run Name* column edge out to ``width`` px, as a user does: at its
    190 px the names are cut after the model, hiding the settings that tell the runs apart."""
    header = page.locator(".ag-header-cell").filter(has_text="Run Name").first
    edge = header.locator(".ag-header-cell-resize")
    box = edge.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    grow = width - header.bounding_box()["width"]
    edge.hover()
    page.mouse.down()
    for step in range(1, 21):  # in small moves: one jump is not taken as a drag
        page.mouse.move(x + grow * step / 20, y)
        page.wait_for_timeout(20)
    page.mouse.up()
    page.mouse.move(x, y + 400)  # off the header: its tooltip would cover the first row


def open_column_menu(page: Any) -> None:
    """From the run list: open *Columns*, where the README says to tick the metric columns."""
    close_assistant(page)
    page.get_by_role("button", name="Columns").first.click()
    page.get_by_placeholder("Search columns").wait_for()


def compare_trials(page: Any, summary: dict[str, Any]) -> None:
    """From the run list: show the sweep's trial runs, tick them, *Compare*, only differences."""
    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    names = [client.get_run(t["run_id"]).info.run_name for t in summary["sweep"]["trials"]]
    show(page, "Run Name")
    sweep_row = page.locator("[role=row]").filter(has_text="sweep of").first  # the newest
    sweep_row.locator("button[data-component-id*='runnamecellrenderer']").first.click()  # +
    for name in names:
        page.locator("[role=row]").filter(has_text=name).first.locator(
            "input.ag-checkbox-input").click()
    page.get_by_role("button", name="Compare").first.click()
    show(page, "Run Name:")
    page.get_by_role("switch", name="Parameters - Show diff only").click()
    page.get_by_role("switch", name="Metrics - Show diff only").click()
    close_assistant(page)
    page.get_by_text("Run Name:").first.evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(3000)  # the charts draw after their data arrives


def take_screenshots(workdir: Path, command: str, address: str,
                     summaries: list[dict[str, Any]], output_dir: Path) -> list[Path]:
    """Each stop of the click-through on the default run (1280x800), then the sweep's trials
    compared (1280x1000)."""
    written: list[Path] = []

    def stop(name: str, page: Any) -> None:
        if name == "runs":
            widen_run_names(page)
        page.wait_for_timeout(2000)  # charts and images draw after their data arrives
        written.append(save_png(page, output_dir / f"mlflow-{name}.png"))

    with printed_mlflow_ui(command, workdir) as url, chromium_page() as page:
        address = address.replace(f"http://127.0.0.1:{PRINTED_PORT}", url)
        try:
            click_through(page, address, summaries[0], stop)
            page.goto(address)
            open_column_menu(page)
            stop("run-columns", page)
            page.set_viewport_size({"width": VIEWPORT["width"], "height": 1000})
            page.goto(address)
            compare_trials(page, summaries[-1])
            stop("sweep-compare", page)
        except Exception:
            save_png(page, output_dir / "failed.png")  # what it showed instead
            raise
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, run the pipelines (unless ``--reuse``), save the screenshots."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=PROJECT_ROOT / "docs",
                        help="where the PNGs go (default: docs/)")
    parser.add_argument("--workdir", type=Path,
                        help="run the pipelines here and keep them "
                             "(default: a temporary folder, removed afterwards)")
    parser.add_argument("--reuse", action="store_true",
                        help="take the screenshots from the runs already in --workdir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if chromium_missing():
        parser.error(chromium_missing())
    if args.reuse and not (args.workdir and (args.workdir / RUNS_FILE).is_file()):
        parser.error(f"--reuse needs a --workdir holding an earlier run's {RUNS_FILE}")
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="iris-screenshots-") as tmp:
        workdir = (args.workdir or Path(tmp)).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        if args.reuse:
            kept = json.loads((workdir / RUNS_FILE).read_text())
            summaries, command, address = kept["summaries"], kept["command"], kept["address"]
        else:
            summaries, command, address = run_pipelines(workdir)
        take_screenshots(workdir, command, address, summaries, args.output_dir.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
