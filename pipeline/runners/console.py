"""What a local run shows: a line per step on the terminal, everything else in per-step logs.

kfp.local streams every step's output (executor input dumps, TensorFlow start-up noise,
artifact listings) to ``sys.stdout``. :class:`StepConsole` stands in for ``sys.stdout``
during a run: it writes each task's full output to ``<run folder>/logs/<task>.log``, prints
``[3/5] train-model ...`` when a step starts and ``... done in 38.2 s · <key result>`` when it
ends, turns the steps' progress lines into a bar on a terminal, and keeps each task's last
lines for the error report. ``verbose`` passes everything through as kfp.local prints it.
A task run once per sweep trial (``repeats``) shows and logs each run apart:
``[3/6] train-model 2/4`` in ``logs/train-model-2.log``.
"""

from __future__ import annotations

import collections
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from pipeline.lib import contract
from pipeline.lib.progress import PROGRESS_PREFIX
from pipeline.runners.kfp_output import strip_ansi

_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
_EXECUTOR_OUTPUT_FILE = re.compile(r'"outputFile":\s*"([^"]+/' + re.escape(contract.EXECUTOR_OUTPUT)
                                   + r')"')
LOGS_DIR = "logs"
#: The executor input's key naming where the running task writes (inside this run's folder).
_OUTPUT_FILE = '"outputFile"'
#: Lines of a failed step's log shown on the terminal.
TAIL_LINES = 15


def _artifact_metadata(executor_output: dict[str, Any], name: str) -> dict[str, Any]:
    artifacts = executor_output.get("artifacts", {}).get(name, {}).get("artifacts", [])
    return dict(artifacts[0].get("metadata", {})) if artifacts else {}


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def step_result(task: str, executor_output: dict[str, Any]) -> str:
    """The one thing worth knowing about a finished step, read from its executor output."""
    if task == "download-dataset":
        meta = _artifact_metadata(executor_output, "raw_data")
        return f"fetched {meta.get(contract.META_PATH, '?')}"
    if task == "preprocess-dataset":
        meta = _artifact_metadata(executor_output, "prepared_data")
        sizes = meta.get("split_sizes", {})
        used = sum(int(n) for n in sizes.values())
        split = "/".join(str(int(n)) for n in sizes.values())
        skipped = int(meta.get("files_skipped", 0))
        named = meta.get(contract.META_SKIPPED_FILES) or []
        more = " ..." if skipped > len(named) else ""
        return (f"{used} images used, train/val/test {split}, "
                f"{int(meta.get('duplicates_dropped', 0))} duplicates dropped"
                + (f", {skipped} skipped: {', '.join(named)}{more}" if skipped else ""))
    if task == "train-model":
        meta = _artifact_metadata(executor_output, "trained_model")
        scored = f"{contract.VAL_SCORE_PREFIX}balanced_accuracy"
        return (f"val balanced_accuracy {_fmt(meta.get(scored))} "
                f"(best epoch {_fmt(meta.get('best_epoch'))} of {_fmt(meta.get('epochs_run'))})")
    if task == "select-model":
        sweep = _artifact_metadata(executor_output, "selected_model").get(contract.META_SWEEP, {})
        trials = sweep.get("trials") or []
        winner = next((t for t in trials if t.get("trial") == sweep.get("winner")), None)
        if winner is None:
            return ""
        return (f"trial {int(winner['trial']) + 1} of {len(trials)} ({winner['label']}) chosen on "
                f"validation, {sweep.get('metric')} {_fmt(winner['val_score'])}")
    if task == "evaluate-model":
        meta = _artifact_metadata(executor_output, "metrics")
        gate = meta.get(contract.META_GATE_METRIC, "balanced_accuracy")
        verdict = "gate passed" if meta.get(contract.META_GATE_PASSED) else "gate failed"
        return (f"test {gate} {_fmt(meta.get(gate))} (majority baseline "
                f"{_fmt(meta.get(f'majority_baseline_{gate}'))}), {verdict}")
    if task == "register-model":
        decision = executor_output.get("parameterValues", {}).get("Output") or {}
        if decision.get("registered"):
            return f"{decision['name']} v{decision['version']} @{decision['alias']}"
        return str(decision.get("reason", "not registered"))
    return ""


class StepConsole:
    """A ``sys.stdout`` stand-in for a local run (see the module docstring)."""

    def __init__(self, stream: TextIO, output_dir: Path, tasks: Sequence[str], *,
                 verbose: bool = False, pipeline_name: str = "",
                 repeats: Mapping[str, int] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._tasks = list(tasks)
        self._repeats = dict(repeats or {})
        self._runs: collections.Counter[str] = collections.Counter()  # starts per task
        self._executor_outputs: dict[str, Path] = {}  # task -> where its current run writes
        self._verbose = verbose
        self._clock = clock
        self._tty = bool(getattr(stream, "isatty", lambda: False)())
        self._run_dir_re = re.compile(re.escape(str(output_dir)) + "/"
                                      + re.escape(pipeline_name) + r"-[\w.-]+")
        self._partial = ""
        self._pending: list[tuple[str, str]] = []  # (task, line) until the run folder is known
        self._files: dict[str, TextIO] = {}
        self._bar: Any = None
        self.run_dir: Path | None = None
        self.current: str | None = None
        self.started: dict[str, float] = {}
        self.finished: dict[str, str] = {}  # task -> status
        self.tails: dict[str, collections.deque[str]] = collections.defaultdict(
            lambda: collections.deque(maxlen=TAIL_LINES))
        self.lines: collections.deque[str] = collections.deque(maxlen=20_000)

    # --- file protocol -------------------------------------------------------------------
    def write(self, text: str) -> int:
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

    # --- routing ---------------------------------------------------------------------------
    def _line(self, line: str) -> None:
        self.lines.append(line)
        # the run folder is where a task of this run writes its outputs (its inputs may come
        # from an earlier run's folder through the cache)
        if (self.run_dir is None and _OUTPUT_FILE in line
                and (match := self._run_dir_re.search(line))):
            self.run_dir = Path(match.group(0))
        if match := _EXECUTING.search(line):
            self._start(match.group(1))
        if self.current and (match := _EXECUTOR_OUTPUT_FILE.search(line)):
            self._executor_outputs[self.current] = Path(match.group(1))
        task = self.instance(self.current) if self.current else "pipeline"
        self._log(task, line)
        if self.current:
            self.tails[task].append(line)
            if line.strip().startswith(PROGRESS_PREFIX):
                self._progress(line.strip()[len(PROGRESS_PREFIX):])
        if match := _FINISHED.search(line):
            self._finish(match.group(1), match.group(2))

    def _log(self, task: str, line: str) -> None:
        if self.run_dir is None:
            self._pending.append((task, line))
            return
        for pending_task, pending in self._pending:
            self._file(pending_task).write(pending + "\n")
        self._pending.clear()
        self._file(task).write(line + "\n")

    def _file(self, task: str) -> TextIO:
        if task not in self._files:
            assert self.run_dir is not None
            path = self.run_dir / LOGS_DIR / f"{task}.log"
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files[task] = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        return self._files[task]

    def instance(self, task: str) -> str:
        """The log name of ``task``'s latest run: ``train-model-2`` for a sweep's 2nd trial."""
        return f"{task}-{self._runs[task]}" if self._repeats.get(task, 1) > 1 else task

    def log_path(self, task: str) -> Path | None:
        return self.run_dir / LOGS_DIR / f"{self.instance(task)}.log" if self.run_dir else None

    # --- terminal --------------------------------------------------------------------------
    def _say(self, text: str) -> None:
        if not self._verbose:
            self._close_bar()
            self._stream.write(text + "\n")
            self._stream.flush()

    def _label(self, task: str) -> str:
        index = self._tasks.index(task) + 1 if task in self._tasks else 0
        repeats = self._repeats.get(task, 1)
        run = f" {max(self._runs[task], 1)}/{repeats}" if repeats > 1 else ""
        return f"[{index}/{len(self._tasks)}] {task}{run}"

    def _start(self, task: str) -> None:
        for earlier in self._tasks[:self._tasks.index(task)] if task in self._tasks else []:
            if earlier not in self.started:  # kfp.local served it from its cache
                self.started[earlier] = self._clock()
                self.finished[earlier] = "CACHED"
                self._say(f"{self._label(earlier)} ... cached")
        self.current = task
        self._runs[task] += 1
        self.started[task] = self._clock()
        self._say(f"{self._label(task)} ...")

    def _finish(self, task: str, status: str) -> None:
        self.finished[task] = status
        self.current = None
        seconds = self._clock() - self.started.get(task, self._clock())
        if status != "SUCCESS":
            self._say(f"{self._label(task)} FAILED after {seconds:.1f} s")
            return
        result = ""
        if self.run_dir is not None:
            path = self._executor_outputs.get(task, self.run_dir / task / contract.EXECUTOR_OUTPUT)
            try:
                result = step_result(task, json.loads(path.read_text()))
            except (OSError, ValueError, KeyError, TypeError):
                result = ""
        self._say(f"{self._label(task)} done in {seconds:.1f} s"
                  + (f" · {result}" if result else ""))

    def _progress(self, payload: str) -> None:
        """A step's ``@@progress {"what": ..., "done": n, "total": m}`` line: a bar on a TTY."""
        if self._verbose or not self._tty:
            return
        try:
            data = json.loads(payload)
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
        for task in self._tasks:
            if task in self.started:
                continue
            self.started[task] = self._clock()
            if task in skipped:
                self._say(f"{self._label(task)} skipped: the evaluation gate failed")
            else:
                self.finished[task] = "CACHED"
                self._say(f"{self._label(task)} ... cached")

    def close(self) -> None:
        """Write out what is left of the stream and close the log files."""
        if self._partial:
            self._line(strip_ansi(self._partial))
            self._partial = ""
        self._close_bar()
        for handle in self._files.values():
            handle.close()
        self._files.clear()


__all__ = ["LOGS_DIR", "StepConsole", "step_result"]
