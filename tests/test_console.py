"""The local run's terminal: a line per step, full output in per-step logs, bars on a TTY."""

from __future__ import annotations

import io
import json
from pathlib import Path

from pipeline.lib.contract import EXECUTOR_OUTPUT
from pipeline.lib.progress import PROGRESS_PREFIX
from pipeline.runners.console import StepConsole, step_result

TASKS = ["download-dataset", "preprocess-dataset", "train-model", "evaluate-model",
         "register-model"]
CYAN, GREEN, RESET = "\x1b[96m", "\x1b[92m", "\x1b[0m"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _task(console: StepConsole, clock: Clock, run_dir: Path, task: str, seconds: float,
          executor_output: dict | None, noise: str = "noise", folder: str = "") -> None:
    task_dir = run_dir / folder / task
    console.write(f"10:00:00.000 - INFO - Executing task {CYAN}'{task}'{RESET}\n")
    console.write(f'        "outputFile": "{task_dir}/executor_output.json"\n')
    console.write(f"    {noise} of {task}\n")
    if executor_output is not None:
        task_dir.mkdir(parents=True, exist_ok=True)
        (task_dir / EXECUTOR_OUTPUT).write_text(json.dumps(executor_output))
    clock.now += seconds
    status = "SUCCESS" if executor_output is not None else "FAILURE"
    console.write(f"10:00:01.000 - INFO - Task {CYAN}'{task}'{RESET} finished with status "
                  f"{GREEN}{status}{RESET}\n")


def _console(tmp_path: Path, stream: io.StringIO, **kwargs) -> tuple[StepConsole, Clock, Path]:
    clock = Clock()
    output_dir = tmp_path / "out"
    run_dir = output_dir / "iris-image-pipeline-2026-11-27-10-00-00-000000"
    console = StepConsole(stream, output_dir, TASKS, pipeline_name="iris-image-pipeline",
                          clock=clock, **kwargs)
    return console, clock, run_dir


def _artifact(name: str, metadata: dict) -> dict:
    return {"artifacts": {name: {"artifacts": [{"metadata": metadata}]}}}


def test_one_line_per_step_start_and_end_with_its_result_and_nothing_else(tmp_path) -> None:
    stream = io.StringIO()
    console, clock, run_dir = _console(tmp_path, stream)
    _task(console, clock, run_dir, "download-dataset", 0.5,
          _artifact("raw_data", {"path": "iris-image.zip"}))
    _task(console, clock, run_dir, "preprocess-dataset", 1.25, _artifact("prepared_data", {
        "split_sizes": {"train": 271.0, "val": 59.0, "test": 59.0}, "duplicates_dropped": 32.0}))
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


def test_cached_and_gated_steps_are_reported(tmp_path) -> None:
    stream = io.StringIO()
    console, clock, run_dir = _console(tmp_path, stream)
    _task(console, clock, run_dir, "train-model", 3, _artifact("trained_model", {
        "model_val_balanced_accuracy": 0.7123, "best_epoch": 4, "epochs_run": 9}))
    _task(console, clock, run_dir, "evaluate-model", 2, _artifact("metrics", {
        "gate_metric": "balanced_accuracy", "gate_passed": False, "balanced_accuracy": 0.41,
        "majority_baseline_balanced_accuracy": 1 / 3}))
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
    console, clock, run_dir = _console(tmp_path, stream)
    _task(console, clock, run_dir, "download-dataset", 1, None, noise="ValueError: bad digest")
    console.close()
    assert stream.getvalue().splitlines()[-1] == "[1/5] download-dataset FAILED after 1.0 s"
    assert "    ValueError: bad digest of download-dataset" in console.tails["download-dataset"]
    assert console.log_path("download-dataset") == run_dir / "logs" / "download-dataset.log"


def test_verbose_passes_everything_through(tmp_path) -> None:
    stream = io.StringIO()
    console, clock, run_dir = _console(tmp_path, stream, verbose=True)
    _task(console, clock, run_dir, "download-dataset", 1, _artifact("raw_data", {"path": "x"}))
    console.close()
    assert "noise of download-dataset" in stream.getvalue()
    assert "[1/5]" not in stream.getvalue()


def test_progress_is_a_bar_on_a_terminal_and_silent_otherwise(tmp_path) -> None:
    for stream, expect_bar in ((Tty(), True), (io.StringIO(), False)):
        console, _clock, _run_dir = _console(tmp_path / str(expect_bar), stream)
        console.write(f"Executing task '{TASKS[2]}'\n")
        for done in (1, 2, 3):
            payload = json.dumps({"what": "epochs", "done": done, "total": 10})
            console.write(f"    {PROGRESS_PREFIX}{payload}\n")
        console.close()
        assert ("epochs" in stream.getvalue()) is expect_bar
        assert ("3/10" in stream.getvalue()) is expect_bar


def test_register_result_names_version_and_alias() -> None:
    output = {"parameterValues": {"Output": {"registered": True, "name": "iris", "version": "3",
                                             "alias": "champion"}}}
    assert step_result("register-model", output) == "iris v3 @champion"


def test_the_run_folder_is_where_tasks_write_not_where_cached_inputs_live(tmp_path) -> None:
    """A cached run's first executed task reads its inputs from an earlier run's folder."""
    stream = io.StringIO()
    console, _clock, run_dir = _console(tmp_path, stream)
    earlier = run_dir.with_name("iris-image-pipeline-2026-11-26-09-00-00-000000")
    console.write(f"Executing task '{TASKS[2]}'\n")
    console.write(f'    "uri": "{earlier}/preprocess-dataset/prepared_data",\n')
    console.write(f'    "outputFile": "{run_dir}/train-model/executor_output.json"\n')
    console.close()
    assert console.run_dir == run_dir


def test_a_sweep_shows_and_logs_each_trial_apart_and_names_the_chosen_one(tmp_path) -> None:
    stream = io.StringIO()
    clock = Clock()
    output_dir = tmp_path / "out"
    run_dir = output_dir / "iris-image-pipeline-2026-11-27-10-00-00-000000"
    tasks = ["download-dataset", "preprocess-dataset", "train-model", "select-model",
             "evaluate-model", "register-model"]
    console = StepConsole(stream, output_dir, tasks, pipeline_name="iris-image-pipeline",
                          repeats={"train-model": 2}, clock=clock)
    for trial, score in enumerate((0.61, 0.68)):  # kfp.local: for-loop-2-iteration-<i>/
        _task(console, clock, run_dir, "train-model", 2, _artifact("trained_model", {
            "model_val_balanced_accuracy": score, "best_epoch": 3, "epochs_run": 8}),
            noise=f"trial {trial}", folder=f"for-loop-2-iteration-{trial}")
    _task(console, clock, run_dir, "select-model", 1, _artifact("selected_model", {"sweep": {
        "metric": "model_val_balanced_accuracy", "winner": 1.0, "trials": [
            {"trial": 0.0, "label": "backbone=mobilenet", "val_score": 0.61},
            {"trial": 1.0, "label": "backbone=mobilenet_v2", "val_score": 0.68}]}}))
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
