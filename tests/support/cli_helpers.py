"""Helpers for the end-to-end tests that run ``python pipeline.py --local`` as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.paths import PROJECT_ROOT

#: ``--set`` values of the end-to-end tests' backbone: MobileNet v1-0.25 (with the shared
#: weights file as ``weights``) and no test-time views, several times faster than the default
#: MobileNetV2-0.5 at 320 px with 8 views.
V1_BACKBONE = ("backbone=mobilenet", "alpha=0.25", "tta_views=0")


def set_flags(*items: str) -> list[str]:
    """``--set`` before each ``key=value``."""
    return [flag for item in items for flag in ("--set", item)]


@dataclass
class CliRun:
    """What one CLI run left: exit code, output, the ``--summary`` JSON and its wall time."""

    returncode: int
    stdout: str
    stderr: str
    summary: dict[str, Any]
    elapsed_s: float


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without MLflow and IRIS_* settings, plus ``extra``.

    The runs must not pick up this machine's (or CI's) tracking server or data overrides.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "IRIS_"))}
    return {**env, **extra}


def run_local_cli(workdir: Path, *args: str, env: dict[str, str] | None = None,
                  timeout: float = 900) -> CliRun:
    """``python pipeline.py --local --summary ... *args`` in ``workdir``."""
    summary = workdir / f"summary-{uuid.uuid4().hex[:8]}.json"
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "pipeline.py"), "--local", "--summary", str(summary),
         *args],
        cwd=workdir, env=env or clean_env(), capture_output=True, text=True, timeout=timeout)
    elapsed = time.monotonic() - started
    data = json.loads(summary.read_text()) if summary.is_file() else {}
    return CliRun(done.returncode, done.stdout, done.stderr, data, elapsed)


def succeeded(run: CliRun) -> dict[str, Any]:
    """The summary of a run that must have succeeded (its stderr tail otherwise)."""
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.summary["status"] == "succeeded"
    return run.summary
