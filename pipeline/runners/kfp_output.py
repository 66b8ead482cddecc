"""Reading kfp.local's streamed output: which task failed, and with what error.

kfp.local (2.17) streams each step's output to ``sys.stdout`` but keeps nothing and can
report a failed task as successful, so the runner records the stream and parses it. Kept
hand-written: kfp offers no API for a task's status or error in a local run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FAILED = re.compile(r"Task '([^']+)' finished with status FAILURE")
_INNER_FAILED = re.compile(r"Inner task failed: (.*)")
_TRACEBACK = "Traceback (most recent call last):"


def strip_ansi(text: str) -> str:
    """``text`` without the colour codes kfp.local puts around task names."""
    return _ANSI.sub("", text)


def failed_tasks(lines: Iterable[str]) -> list[str]:
    """Task names that kfp.local logged as finished with status FAILURE, in order."""
    return [m.group(1) for line in lines if (m := _FAILED.search(_ANSI.sub("", line)))]


def task_error(lines: Iterable[str], task: str) -> str:
    """The exception a task's process died with, read from its streamed output.

    Takes the output after the task's last "Executing task" line, finds the last Python
    traceback there and returns its final exception line(s); falls back to the last line.
    """
    lines = [_ANSI.sub("", line) for line in lines]
    start = max((i for i, line in enumerate(lines)
                 if (m := _EXECUTING.search(line)) and m.group(1) == task), default=-1)
    segment = [line for line in lines[start + 1:] if line.strip()]
    tracebacks = [i for i, line in enumerate(segment) if _TRACEBACK in line]
    if tracebacks:
        head = segment[tracebacks[-1]]
        indent = len(head) - len(head.lstrip())
        message: list[str] = []
        for line in segment[tracebacks[-1] + 1:]:
            if _EXECUTING.search(line) or "finished with status" in line:
                break
            stripped = line.strip()
            at_head_indent = len(line) - len(line.lstrip()) == indent
            # frames are indented deeper; the exception starts back at the header's indent
            if message or (at_head_indent and not stripped.startswith("File ")):
                message.append(stripped)
        if message:
            return " ".join(message)
    for line in reversed(segment):
        if "finished with status" not in line and not set(line.strip()) <= {"-"}:
            return line.strip()
    return "no error output captured"


def failed_task_from_exception(exc: BaseException) -> str | None:
    """The innermost failed task named in kfp.local's "Inner task failed: ..." message."""
    match = _INNER_FAILED.search(_ANSI.sub("", str(exc)))
    names = re.findall(r"'([^']+)'", match.group(1)) if match else []
    return names[0] if names else None


__all__ = ["failed_task_from_exception", "failed_tasks", "strip_ansi", "task_error"]
