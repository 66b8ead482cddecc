"""What a running step tells the local runner: its status, result and progress, as files.

A step runs in its own process (a pod on a cluster) whose output the local runner only
sees as kfp.local's console text, whose wording may change with any kfp release. So every
component's single step call goes through :func:`report_step`, which writes three small
JSON files into the task's own folder (names in ``pipeline/lib/contract.py``), each replaced
atomically:

- the status: ``{"state": "started" | "succeeded" | "failed", "error": ..., "run_token": ...,
  "started_at": ..., "ended_at": ...}`` (epoch seconds);
- the result: the step's return value as JSON (a dataclass through ``dataclasses.asdict``);
- the progress of a long loop (:func:`report_progress`): ``{"what", "done", "total"}``.

The task folder is the one kfp's executor writes its output into (``outputs.outputFile`` of
the executor input on the executor's command line); on a cluster that is a scratch folder
of the pod, where the files are harmless. The runner reads them with :func:`read_status`.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from pipeline.lib.contract import (
    RUN_TOKEN_ENV,
    STATE_FAILED,
    STATE_STARTED,
    STATE_SUCCEEDED,
    STEP_PROGRESS_FILE,
    STEP_RESULT_FILE,
    STEP_STATUS_FILE,
)
from pipeline.lib.files import atomic_write_json, read_json

logger = logging.getLogger(__name__)
T = TypeVar("T")

#: The task folder of the step running in this process (set by :func:`report_step`).
_task_dir: Path | None = None


@dataclasses.dataclass(frozen=True)
class StepStatus:
    """One task folder's status file, as the runner reads it."""

    task_dir: Path
    state: str
    started_at: float
    ended_at: float | None = None
    error: str | None = None
    run_token: str | None = None

    @property
    def task(self) -> str:
        """The KFP task name (the folder's name)."""
        return self.task_dir.name

    def result(self) -> Any:
        """The step's recorded result (None when it has none yet)."""
        return read_json(self.task_dir / STEP_RESULT_FILE)

    def progress(self) -> dict[str, Any] | None:
        return read_json(self.task_dir / STEP_PROGRESS_FILE)


def task_dir_from_argv(argv: Sequence[str]) -> Path | None:
    """The task folder named by kfp's executor command line (``--executor_input <json>``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--executor_input")
    try:
        known, _ = parser.parse_known_args(list(argv))
        output_file = json.loads(known.executor_input)["outputs"]["outputFile"]
    except (SystemExit, TypeError, ValueError, KeyError):
        return None
    return Path(output_file).parent


def as_json(value: Any) -> Any:
    """``value`` made JSON-ready: dataclasses as dicts, paths and other objects as strings,
    numpy numbers as Python numbers."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return {str(k): as_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return as_json(value.item())
    return str(value)


def _write(task_dir: Path | None, name: str, data: Any) -> None:
    if task_dir is not None:
        atomic_write_json(task_dir / name, data)


def report_step(step: Callable[..., T], *args: Any, task_dir: Path | None = None,
                **kwargs: Any) -> T:
    """Call ``step(*args, **kwargs)`` and leave its status and result in the task folder.

    ``task_dir`` defaults to the one on kfp's executor command line; without one (a step
    called outside kfp) the step just runs. Any exception, ``KeyboardInterrupt`` included,
    is recorded as ``failed`` with its one-line message and raised again.

    Under kfp's executor the process ends right after the step, so the heap is then frozen
    (``gc.freeze``): the interpreter's final collections skip the step's millions of
    TensorFlow and MLflow objects, which took 2 to 3 s per step process.
    """
    global _task_dir
    in_executor = task_dir is None
    task_dir = task_dir or task_dir_from_argv(sys.argv)
    status = {"state": STATE_STARTED, "started_at": time.time(), "ended_at": None,
              "error": None, "run_token": os.environ.get(RUN_TOKEN_ENV)}
    _write(task_dir, STEP_STATUS_FILE, status)
    _task_dir = task_dir  # where report_progress writes while the step runs
    try:
        result = step(*args, **kwargs)
    except BaseException as exc:
        lines = f"{type(exc).__name__}: {exc}".splitlines()
        error = " ".join(line.strip() for line in lines if line.strip()).rstrip(":")
        _write(task_dir, STEP_STATUS_FILE, {**status, "state": STATE_FAILED,
                                            "ended_at": time.time(), "error": error})
        raise
    finally:
        _task_dir = None
        if in_executor and task_dir is not None:
            gc.freeze()
    _write(task_dir, STEP_RESULT_FILE, as_json(result))  # first: "succeeded" has a result
    _write(task_dir, STEP_STATUS_FILE, {**status, "state": STATE_SUCCEEDED,
                                        "ended_at": time.time()})
    return result


def report_progress(what: str, done: int, total: int | None = None) -> None:
    """Announce that ``done`` (of ``total``, when known) units of ``what`` are finished."""
    _write(_task_dir, STEP_PROGRESS_FILE, {"what": what, "done": done, "total": total})
    logger.debug("%s: %d of %s", what, done, total if total is not None else "?")


def read_status(task_dir: Path) -> StepStatus | None:
    """The status a step left in ``task_dir``; None when there is none (not started, cached)
    or it is unreadable."""
    data = read_json(task_dir / STEP_STATUS_FILE)
    try:
        return StepStatus(task_dir, str(data["state"]), float(data["started_at"]),
                          data.get("ended_at"), data.get("error"), data.get("run_token"))
    except (TypeError, KeyError, ValueError):
        return None


__all__ = ["StepStatus", "as_json", "read_status", "report_progress", "report_step",
           "task_dir_from_argv"]
