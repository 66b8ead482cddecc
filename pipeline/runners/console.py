"""What a local run shows: a line per step on the terminal, everything else in per-step logs.

The terminal follows the files the steps leave in their task folders (``run_files.py``):
:meth:`StepConsole.poll`, called from a watcher thread, prints ``[3/5] train-model ...`` when
a step's status says it started and ``... done in 38.2 s · <key result>`` when it ended (the
result shown by the step's :attr:`~pipeline.stepspec.StepSpec.show`), and turns the step's
progress file into a bar on a terminal. kfp.local's console text (executor input dumps,
TensorFlow start-up noise, artifact listings) is only a log: :class:`StepConsole` stands in
for ``sys.stdout`` during a run and writes it to ``<run folder>/logs/<task>.log``, starting
a task's log at kfp.local's "Executing task" line, and keeps each task's last lines for the
error report. ``verbose`` passes the stream through instead of the step lines. A task run
once per sweep trial (``repeats``) shows and logs each run apart: ``[3/6] train-model 2/4``
in ``logs/train-model-2.log``.
"""

from __future__ import annotations

import collections
import contextlib
import re
import threading
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from pipeline.lib.contract import STATE_STARTED, STATE_SUCCEEDED
from pipeline.lib.progress import StepStatus
from pipeline.runners.run_files import find_run_dir, task_statuses
from pipeline.stepspec import SPECS_BY_TASK

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
#: Where kfp.local's stream moves on to another task (used for the logs only).
_EXECUTING = re.compile(r"Executing task '([^']+)'")
LOGS_DIR = "logs"
#: Lines of a failed step's log shown on the terminal.
TAIL_LINES = 15
#: Seconds between looks at the task folders while a run goes on.
POLL_S = 0.25


def strip_ansi(text: str) -> str:
    """``text`` without the colour codes kfp.local puts around task names."""
    return _ANSI.sub("", text)


def without_tracebacks(lines: list[str]) -> list[str]:
    """``lines`` with each Python traceback cut to its last line, the exception itself.

    A failed step's last lines are shown to people, who need the error and the log lines
    before it; the frames are for whoever opens the full log, which keeps them.
    """
    kept: list[str] = []
    in_traceback = False
    for line in lines:
        if "Traceback (most recent call last):" in line:
            in_traceback = True
            continue
        if in_traceback and (line.startswith((" ", "\t")) or not line.strip()
                             or line.startswith(("During handling", "The above exception"))):
            continue
        in_traceback = False
        kept.append(line)
    return kept


def step_result(status: StepStatus) -> str:
    """The one thing worth knowing about a finished step, read from its recorded result."""
    spec = SPECS_BY_TASK.get(status.task)
    try:
        return spec.show(status.result() or {}) if spec else ""
    except (AttributeError, KeyError, TypeError, ValueError):
        return ""


class StepConsole:
    """A ``sys.stdout`` stand-in for a local run (see the module docstring).

    ``token`` and ``existing`` (the output folder's entries before the run) find the run
    folder (:func:`~pipeline.runners.run_files.find_run_dir`).
    """

    def __init__(self, stream: TextIO, output_dir: Path, tasks: Sequence[str], *, token: str,
                 existing: Collection[str] = (), verbose: bool = False,
                 repeats: Mapping[str, int] | None = None) -> None:
        self._stream = stream
        self._output_dir = output_dir
        self._token = token
        self._existing = frozenset(existing)
        self._tasks = list(tasks)
        self._repeats = dict(repeats or {})
        self._verbose = verbose
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._lock = threading.RLock()
        self._partial = ""
        self._pending: list[tuple[str, str]] = []  # (log, line) until the run folder is known
        self._files: dict[str, TextIO] = {}
        self._log_runs: collections.Counter[str] = collections.Counter()  # stream's starts
        self._current: str | None = None  # the task the stream is on
        self._runs: dict[Path, int] = {}  # task folder -> its task's run number (1, 2, ...)
        self._shown_end: set[Path] = set()
        self._bar: Any = None
        self.run_dir: Path | None = None
        self.statuses: list[StepStatus] = []
        self.started: set[str] = set()
        self.finished: dict[str, str] = {}  # task -> state, or "cached"
        self.tails: dict[str, collections.deque[str]] = collections.defaultdict(
            lambda: collections.deque(maxlen=TAIL_LINES))

    # --- file protocol: kfp.local's stream, a log --------------------------------------------
    def write(self, text: str) -> int:
        with self._lock:
            if self._verbose:
                self._stream.write(text)
            pieces = (self._partial + text).split("\n")
            self._partial = pieces.pop()
            for piece in pieces:
                self._line(strip_ansi(piece))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._tty

    def __getattr__(self, name: str) -> Any:  # fileno, encoding, ...
        return getattr(self._stream, name)

    def _line(self, line: str) -> None:
        if match := _EXECUTING.search(line):
            self._current = match.group(1)
            self._log_runs[self._current] += 1
        log = self.instance(self._current) if self._current else "pipeline"
        if self._current:
            self.tails[log].append(line)
        if self.run_dir is None:
            self._pending.append((log, line))
        else:
            self._file(log).write(line + "\n")

    def _file(self, log: str) -> TextIO:
        if log not in self._files:
            assert self.run_dir is not None
            path = self.run_dir / LOGS_DIR / f"{log}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files[log] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        return self._files[log]

    def instance(self, task: str) -> str:
        """The log name of ``task``'s latest run: ``train-model-2`` for a sweep's 2nd trial."""
        return f"{task}-{self._log_runs[task]}" if self._repeats.get(task, 1) > 1 else task

    @property
    def current_task(self) -> str | None:
        """The task kfp.local's stream is on (the last one it started)."""
        return self._current

    def log_path(self, task: str) -> Path | None:
        return self.run_dir / LOGS_DIR / f"{self.instance(task)}.log" if self.run_dir else None

    # --- the task folders: the terminal --------------------------------------------------------
    def poll(self) -> None:
        """Look at the task folders; print what started or ended since, update the bar."""
        with self._lock:
            if self.run_dir is None:
                self.run_dir = find_run_dir(self._output_dir, self._token, self._existing)
                if self.run_dir is None:
                    return
                for log, line in self._pending:
                    self._file(log).write(line + "\n")
                self._pending.clear()
            self.statuses = task_statuses(self.run_dir)
            for status in self.statuses:
                if status.task_dir not in self._runs:
                    self._start(status)
                if status.state != STATE_STARTED and status.task_dir not in self._shown_end:
                    self._finish(status)
            running = [status for status in self.statuses if status.state == STATE_STARTED]
            if running:
                self._progress(running[-1].progress())

    @contextlib.contextmanager
    def watching(self, interval_s: float = POLL_S) -> Iterator[None]:
        """Poll in a thread while the block runs, and once more after it."""
        stop = threading.Event()

        def watch() -> None:
            while not stop.wait(interval_s):
                self.poll()

        thread = threading.Thread(target=watch, name="step-console", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.poll()

    def _say(self, text: str) -> None:
        if not self._verbose:
            self._close_bar()
            self._stream.write(text + "\n")
            self._stream.flush()

    def _label(self, task: str, run: int = 1) -> str:
        index = self._tasks.index(task) + 1 if task in self._tasks else 0
        repeats = self._repeats.get(task, 1)
        return f"[{index}/{len(self._tasks)}] {task}" + (f" {run}/{repeats}" if repeats > 1 else "")

    def _start(self, status: StepStatus) -> None:
        task = status.task
        for earlier in self._tasks[:self._tasks.index(task)] if task in self._tasks else []:
            if earlier not in self.started:  # kfp.local served it from its cache
                self._cached(earlier)
        self._runs[status.task_dir] = sum(1 for d in self._runs if d.name == task) + 1
        self.started.add(task)
        self._say(f"{self._label(task, self._runs[status.task_dir])} ...")

    def _cached(self, task: str) -> None:
        self.started.add(task)
        self.finished[task] = "cached"
        self._say(f"{self._label(task)} ... cached")

    def _finish(self, status: StepStatus) -> None:
        self._shown_end.add(status.task_dir)
        self.finished[status.task] = status.state
        label = self._label(status.task, self._runs[status.task_dir])
        seconds = (status.ended_at or status.started_at) - status.started_at
        if status.state != STATE_SUCCEEDED:
            self._say(f"{label} FAILED after {seconds:.1f} s")
            return
        result = step_result(status)
        self._say(f"{label} done in {seconds:.1f} s" + (f" · {result}" if result else ""))

    def _progress(self, data: Mapping[str, Any] | None) -> None:
        """A step's progress file ``{"what": ..., "done": n, "total": m}``: a bar on a TTY."""
        if self._verbose or not self._tty or not data:
            return
        try:
            done, what = int(data["done"]), str(data["what"])
            total = int(data["total"]) if data.get("total") is not None else None
        except (ValueError, KeyError, TypeError):
            return
        from tqdm import tqdm

        if self._bar is None or self._bar.desc != what or self._bar.total != total:
            self._close_bar()
            self._bar = tqdm(total=total, desc=what, file=self._stream, leave=False,
                             dynamic_ncols=True, mininterval=0)
        self._bar.update(done - self._bar.n)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def report_unstarted(self, skipped: Sequence[str] = ()) -> None:
        """After a successful run: steps never started were cached, or skipped by the gate."""
        with self._lock:
            for task in self._tasks:
                if task in self.started:
                    continue
                if task in skipped:
                    self.started.add(task)
                    self._say(f"{self._label(task)} skipped: the evaluation gate failed")
                else:
                    self._cached(task)

    def close(self) -> None:
        """Write out what is left of the stream and close the log files."""
        with self._lock:
            if self._partial:
                self._line(strip_ansi(self._partial))
                self._partial = ""
            self._close_bar()
            for handle in self._files.values():
                handle.close()
            self._files.clear()


__all__ = ["LOGS_DIR", "POLL_S", "StepConsole", "step_result", "strip_ansi"]
