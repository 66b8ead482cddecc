"""The local run's terminal: a line per step from its status files, full output in per-step
logs, bars on a TTY."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

from pipeline.lib import contract
from pipeline.lib.progress import as_json
from pipeline.runners.console import StepConsole, without_tracebacks

TASKS = ["download-dataset", "preprocess-dataset", "train-model", "evaluate-model",
         "register-model"]
CYAN, GREEN, RESET = "\x1b[96m", "\x1b[92m", "\x1b[0m"
TOKEN = "run-token-1"


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _status(task_dir: Path, state: str, started: float, ended: float | None = None, *,
            result: object = None, error: str | None = None, token: str = TOKEN) -> None:
    """Files as ``report_step`` leaves them in a task folder."""
    task_dir.mkdir(parents=True, exist_ok=True)
    if result is not None:
        (task_dir / contract.STEP_RESULT_FILE).write_text(json.dumps(as_json(result)))
    (task_dir / contract.STEP_STATUS_FILE).write_text(json.dumps(
        {"state": state, "started_at": started, "ended_at": ended, "error": error,
         "run_token": token}))


def _task(console: StepConsole, task_dir: Path, seconds: float, result: object,
          noise: str = "noise", start: float = 1000.0) -> None:
    """One task: kfp.local's stream (log only) and the step's status files, polled."""
    task = task_dir.name
    console.write(f"10:00:00.000 - INFO - Executing task {CYAN}'{task}'{RESET}\n")
    _status(task_dir, contract.STATE_STARTED, start)
    console.poll()
    console.write(f"    {noise} of {task}\n")
    if result is None:
        _status(task_dir, contract.STATE_FAILED, start, start + seconds, error="ValueError: x")
    else:
        _status(task_dir, contract.STATE_SUCCEEDED, start, start + seconds, result=result)
    console.write(f"10:00:01.000 - INFO - Task {CYAN}'{task}'{RESET} finished with status "
                  f"{GREEN}SUCCESS{RESET}\n")
    console.poll()


def _console(tmp_path: Path, stream: io.StringIO, tasks=TASKS,
             **kwargs) -> tuple[StepConsole, Path]:
    output_dir = tmp_path / "out"
    run_dir = output_dir / "iris-image-pipeline-2026-11-27-10-00-00-000000"
    return StepConsole(stream, output_dir, tasks, token=TOKEN, **kwargs), run_dir


def test_one_line_per_step_start_and_end_with_its_result_and_nothing_else(tmp_path) -> None:
    stream = io.StringIO()
    console, run_dir = _console(tmp_path, stream)
    _task(console, run_dir / "download-dataset", 0.5, {"path": "iris-image.zip"})
    _task(console, run_dir / "preprocess-dataset", 1.25, {
        "split_sizes": {"train": 271.0, "val": 59.0, "test": 59.0}, "duplicates_dropped": 32.0},
        start=2000.0)
    console.close()
    assert stream.getvalue().splitlines() == [
        "[1/5] download-dataset ...",
        "[1/5] download-dataset done in 0.5 s · fetched iris-image.zip",
        "[2/5] preprocess-dataset ...",
        "[2/5] preprocess-dataset done in 1.2 s · 389 images used, train/val/test 271/59/59, "
        "32 duplicates dropped",
    ]
    log = (run_dir / "logs" / "preprocess-dataset.log").read_text()
    assert "noise of preprocess-dataset" in log and "noise of download-dataset" not in log
    assert "noise of download-dataset" in (run_dir / "logs" / "download-dataset.log").read_text()
    assert console.run_dir == run_dir


@dataclasses.dataclass(frozen=True)
class _Evaluation:  # the evaluate step returns a dataclass; its result is its asdict
    metrics: dict
    gate_passed: bool


def test_cached_and_gated_steps_are_reported(tmp_path) -> None:
    stream = io.StringIO()
    console, run_dir = _console(tmp_path, stream)
    _task(console, run_dir / "train-model", 3, {
        "model_val_balanced_accuracy": 0.7123, "best_epoch": 4, "epochs_run": 9})
    _task(console, run_dir / "evaluate-model", 2, _Evaluation(
        {"gate_metric": "balanced_accuracy", "balanced_accuracy": 0.41,
         "baseline": {"balanced_accuracy": 1 / 3}}, gate_passed=False), start=2000.0)
    console.report_unstarted(skipped=["register-model"])
    console.close()
    lines = stream.getvalue().splitlines()
    assert lines[:2] == ["[1/5] download-dataset ... cached", "[2/5] preprocess-dataset ... cached"]
    assert lines[3] == ("[3/5] train-model done in 3.0 s · val balanced_accuracy 0.712 "
                        "(best epoch 4 of 9)")
    assert lines[5] == ("[4/5] evaluate-model done in 2.0 s · test balanced_accuracy 0.410 "
                        "(majority baseline 0.333), gate failed")
    assert lines[6] == "[5/5] register-model skipped: the evaluation gate failed"


def test_a_failed_step_keeps_its_last_lines_and_names_its_log(tmp_path) -> None:
    stream = io.StringIO()
    console, run_dir = _console(tmp_path, stream)
    _task(console, run_dir / "download-dataset", 1, None, noise="ValueError: bad digest")
    console.close()
    assert stream.getvalue().splitlines()[-1] == "[1/5] download-dataset FAILED after 1.0 s"
    assert "    ValueError: bad digest of download-dataset" in console.tails["download-dataset"]
    assert console.log_path("download-dataset") == run_dir / "logs" / "download-dataset.log"


def test_the_terminal_follows_the_files_not_the_stream(tmp_path) -> None:
    """Nothing kfp.local prints reaches the step lines: with the stream dropped they are the
    same, and a stream that claims success does not hide a failed status."""
    stream = io.StringIO()
    console, run_dir = _console(tmp_path, stream)
    _status(run_dir / "download-dataset", contract.STATE_STARTED, 10.0)
    console.poll()
    _status(run_dir / "download-dataset", contract.STATE_FAILED, 10.0, 12.5,
            error="OSError: disk full")
    console.poll()
    console.close()
    assert stream.getvalue().splitlines() == ["[1/5] download-dataset ...",
                                              "[1/5] download-dataset FAILED after 2.5 s"]
    assert console.run_dir == run_dir
    assert [(s.task, s.state, s.error) for s in console.statuses] == [
        ("download-dataset", "failed", "OSError: disk full")]


def test_verbose_passes_everything_through(tmp_path) -> None:
    stream = io.StringIO()
    console, run_dir = _console(tmp_path, stream, verbose=True)
    _task(console, run_dir / "download-dataset", 1, {"path": "x"})
    console.close()
    assert "noise of download-dataset" in stream.getvalue()
    assert "[1/5]" not in stream.getvalue()


def test_progress_is_a_bar_on_a_terminal_and_silent_otherwise(tmp_path) -> None:
    for stream, expect_bar in ((Tty(), True), (io.StringIO(), False)):
        console, run_dir = _console(tmp_path / str(expect_bar), stream)
        task_dir = run_dir / TASKS[2]
        _status(task_dir, contract.STATE_STARTED, 10.0)
        for done in (1, 2, 3):
            (task_dir / contract.STEP_PROGRESS_FILE).write_text(
                json.dumps({"what": "epochs", "done": done, "total": 10}))
            console.poll()
        console.close()
        assert ("epochs" in stream.getvalue()) is expect_bar
        assert ("3/10" in stream.getvalue()) is expect_bar


def test_register_result_names_version_and_alias(tmp_path) -> None:
    stream = io.StringIO()
    console, run_dir = _console(tmp_path, stream)
    _task(console, run_dir / "register-model", 1, {
        "registered": True, "name": "iris", "version": "3", "alias": "champion"})
    console.close()
    assert stream.getvalue().splitlines()[-1].endswith("done in 1.0 s · iris v3 @champion")


def test_a_sweep_shows_and_logs_each_trial_apart_and_names_the_chosen_one(tmp_path) -> None:
    stream = io.StringIO()
    tasks = ["download-dataset", "preprocess-dataset", "train-model", "select-model",
             "evaluate-model", "register-model"]
    console, run_dir = _console(tmp_path, stream, tasks, repeats={"train-model": 2})
    for trial, score in enumerate((0.61, 0.68)):  # kfp.local: for-loop-2-iteration-<i>/
        _task(console, run_dir / f"for-loop-2-iteration-{trial}" / "train-model", 2, {
            "model_val_balanced_accuracy": score, "best_epoch": 3, "epochs_run": 8},
            noise=f"trial {trial}", start=1000.0 + 10 * trial)
    _task(console, run_dir / "select-model", 1, {"sweep": {
        "metric": "model_val_balanced_accuracy", "winner": 1.0, "trials": [
            {"trial": 0.0, "label": "backbone=mobilenet", "val_score": 0.61},
            {"trial": 1.0, "label": "backbone=mobilenet_v2", "val_score": 0.68}]}}, start=1100.0)
    console.close()
    lines = stream.getvalue().splitlines()
    assert lines[2:] == [
        "[3/6] train-model 1/2 ...",
        "[3/6] train-model 1/2 done in 2.0 s · val balanced_accuracy 0.610 (best epoch 3 of 8)",
        "[3/6] train-model 2/2 ...",
        "[3/6] train-model 2/2 done in 2.0 s · val balanced_accuracy 0.680 (best epoch 3 of 8)",
        "[4/6] select-model ...",
        "[4/6] select-model done in 1.0 s · trial 2 of 2 (backbone=mobilenet_v2) chosen on "
        "validation, model_val_balanced_accuracy 0.680",
    ]
    logs = run_dir / "logs"
    assert "trial 0" in (logs / "train-model-1.log").read_text()
    assert "trial 1" in (logs / "train-model-2.log").read_text()
    assert "trial 0" not in (logs / "train-model-2.log").read_text()


def test_a_failed_steps_last_lines_keep_the_error_but_not_the_traceback() -> None:
    lines = ["INFO fetching data.zip", "Traceback (most recent call last):",
             '  File "/x/download.py", line 3, in fetch', "    raise NotAnArchiveError(url)",
             "", "During handling of the above exception, another exception occurred:", "",
             "Traceback (most recent call last):", '  File "/x/y.py", line 9, in run',
             "pipeline.lib.sniff.NotAnArchiveError: data.zip is an HTML page",
             "ERROR task failed"]
    assert without_tracebacks(lines) == [
        "INFO fetching data.zip",
        "pipeline.lib.sniff.NotAnArchiveError: data.zip is an HTML page",
        "ERROR task failed"]
