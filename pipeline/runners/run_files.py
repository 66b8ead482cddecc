"""What a local run left on disk: its run folder and its tasks' status files.

kfp.local (2.17) keeps no record of a task's status and can report a failed task as a
success, so the runner reads what every step writes into its own task folder
(``pipeline/lib/progress.py``): nothing depends on the wording of kfp.local's console text.
The run folder is the folder that appeared in the output folder after the run started and
holds a status with this run's token (two runs may share an output folder).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

from pipeline.lib.contract import STATE_FAILED, STATE_STARTED, STEP_STATUS_FILE
from pipeline.lib.progress import StepStatus, read_status

#: Where kfp.local puts task folders below the run folder: a task, or a loop iteration's task.
_STATUS_GLOBS = (f"*/{STEP_STATUS_FILE}", f"*/*/{STEP_STATUS_FILE}")
#: Said of a step whose process ended without reporting how (SIGKILL, out of memory).
NO_END = "its process ended without reporting a result (killed, or out of memory?)"


def task_statuses(run_dir: Path) -> list[StepStatus]:
    """Every status under ``run_dir`` (loop iterations included), in the order steps started."""
    found = (read_status(path.parent) for pattern in _STATUS_GLOBS
             for path in run_dir.glob(pattern))
    return sorted((status for status in found if status), key=lambda s: s.started_at)


def find_run_dir(output_dir: Path, token: str, existing: Collection[str]) -> Path | None:
    """The folder of ``output_dir`` not in ``existing`` whose steps carry ``token``."""
    try:
        children = sorted(output_dir.iterdir())
    except OSError:
        return None
    for child in children:
        if child.name in existing or child.name.startswith(".") or not child.is_dir():
            continue
        if any(status.run_token == token for status in task_statuses(child)):
            return child
    return None


def first_failure(statuses: Sequence[StepStatus]) -> tuple[StepStatus, str] | None:
    """After a run: the first step that failed, or that never reported its end, and why."""
    for status in statuses:
        if status.state == STATE_FAILED:
            return status, status.error or "failed without an error message"
    for status in statuses:
        if status.state == STATE_STARTED:
            return status, NO_END
    return None


__all__ = ["NO_END", "find_run_dir", "first_failure", "task_statuses"]
