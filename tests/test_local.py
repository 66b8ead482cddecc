"""``--local``: failure detection (fast) and end-to-end runs on the shared iris archive (slow)."""

import concurrent.futures
import dataclasses
import gc
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from kfp import dsl, local
from kfp.dsl import Artifact, Output

from pipeline.config import DEFAULT_DATA_SHA256, PipelineConfig
from pipeline.lib.contract import (
    EXECUTOR_OUTPUT,
    RUN_TOKEN_ENV,
    STATE_FAILED,
    STATE_STARTED,
    STATE_SUCCEEDED,
    STEP_PROGRESS_FILE,
    STEP_RESULT_FILE,
    STEP_STATUS_FILE,
)
from pipeline.lib.progress import read_status, report_progress, report_step, task_dir_from_argv
from pipeline.runners import StepFailedError, run_local
from pipeline.runners.console import StepConsole
from pipeline.runners.local import (
    FILE_OUTPUTS,
    run_judged,
    verify_local_run,
    verify_trials,
)
from pipeline.runners.run_files import NO_END, find_run_dir, first_failure, task_statuses
from pipeline.stepspec import SWEEP_ONLY_FIELDS
from tests.support.cli_helpers import (
    V1_BACKBONE,
    CliRun,
    clean_env,
    run_local_cli,
    set_flags,
    succeeded,
)
from tests.support.paths import PROJECT_ROOT

TOKEN = "this-run"


@dataclasses.dataclass(frozen=True)
class _Result:
    score: float
    history: tuple[dict, ...]
    where: Path


def _executor_argv(task_dir: Path) -> list[str]:
    """The step process's command line as kfp.local starts it (``executor_main``)."""
    executor_input = {"inputs": {}, "outputs": {"outputFile": str(task_dir / EXECUTOR_OUTPUT)}}
    return ["-m", "kfp.dsl.executor_main", "--executor_input", json.dumps(executor_input),
            "--function_to_execute", "train_model"]


def test_the_task_folder_comes_from_the_executor_command_line(tmp_path: Path) -> None:
    task_dir = tmp_path / "run" / "for-loop-2-iteration-1" / "train-model"
    assert task_dir_from_argv(_executor_argv(task_dir)) == task_dir
    assert task_dir_from_argv(["pytest", "-q"]) is None
    assert task_dir_from_argv(["--executor_input", "{not json"]) is None


@pytest.fixture
def unfreeze_after() -> Any:
    """A step called as kfp's executor calls it freezes this process's heap: undo that."""
    yield
    gc.unfreeze()


def test_a_step_leaves_its_status_result_and_progress_in_its_task_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unfreeze_after: None) -> None:
    task_dir = tmp_path / "train-model"
    monkeypatch.setattr(sys, "argv", _executor_argv(task_dir))
    monkeypatch.setenv(RUN_TOKEN_ENV, TOKEN)
    seen = []

    def step(epochs: int) -> _Result:
        seen.append(read_status(task_dir))
        for epoch in range(epochs):
            report_progress("head epochs", epoch + 1, epochs)
        return _Result(0.75, ({"epoch": 1, "loss": np.float32(0.5)},), tmp_path)

    result = report_step(step, 3)
    assert result.score == 0.75
    assert seen[0].state == STATE_STARTED and seen[0].run_token == TOKEN
    status = read_status(task_dir)
    assert (status.task, status.state, status.error) == ("train-model", STATE_SUCCEEDED, None)
    assert status.ended_at >= status.started_at
    assert status.result() == {"score": 0.75, "history": [{"epoch": 1, "loss": 0.5}],
                               "where": str(tmp_path)}
    assert status.progress() == {"what": "head epochs", "done": 3, "total": 3}
    assert sorted(p.name for p in task_dir.iterdir()) == [
        STEP_PROGRESS_FILE, STEP_RESULT_FILE, STEP_STATUS_FILE]  # no temporary files left


def test_only_a_step_under_kfps_executor_freezes_the_heap_for_a_quick_exit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unfreeze_after: None) -> None:
    """The executor's process ends after the step; its final garbage collections would walk
    every TensorFlow object for 2 to 3 s. Called directly (tests, notebooks), no freeze: the
    process goes on and must still collect its garbage."""
    gc.unfreeze()
    report_step(lambda: None, task_dir=tmp_path / "download-dataset")
    assert gc.get_freeze_count() == 0
    monkeypatch.setattr(sys, "argv", _executor_argv(tmp_path / "train-model"))
    with pytest.raises(ValueError):
        report_step(lambda: int("x"))
    assert gc.get_freeze_count() > 0  # a failed step's process ends too


def test_a_failing_step_records_its_error_and_raises_it_again(tmp_path: Path) -> None:
    def step() -> None:
        raise FileNotFoundError("data source not found: '/nonexistent/iris.zip'")

    with pytest.raises(FileNotFoundError):
        report_step(step, task_dir=tmp_path / "download-dataset")
    status = read_status(tmp_path / "download-dataset")
    assert status.state == STATE_FAILED
    assert status.error == "FileNotFoundError: data source not found: '/nonexistent/iris.zip'"
    assert status.result() is None
    with pytest.raises(KeyboardInterrupt):
        report_step(lambda: (_ for _ in ()).throw(KeyboardInterrupt("SIGTERM")),
                    task_dir=tmp_path / "train-model")
    assert read_status(tmp_path / "train-model").error == "KeyboardInterrupt: SIGTERM"
    with pytest.raises(ValueError):
        report_step(lambda: int("x\n  more"), task_dir=tmp_path / "evaluate-model")
    assert read_status(tmp_path / "evaluate-model").error == (
        "ValueError: invalid literal for int() with base 10: 'x\\n  more'")
    with pytest.raises(KeyError):
        report_step(lambda: {}["a"], task_dir=tmp_path / "select-model")
    assert read_status(tmp_path / "select-model").error == "KeyError: 'a'"
    with pytest.raises(RuntimeError):
        report_step(lambda: (_ for _ in ()).throw(RuntimeError("first\n  second")),
                    task_dir=tmp_path / "register-model")
    assert read_status(tmp_path / "register-model").error == "RuntimeError: first second"


def _write_status(task_dir: Path, state: str, started: float, token: str = TOKEN,
                  error: str | None = None) -> None:
    task_dir.mkdir(parents=True, exist_ok=True)
    (task_dir / STEP_STATUS_FILE).write_text(json.dumps(
        {"state": state, "started_at": started, "ended_at": None if state == STATE_STARTED
         else started + 1, "error": error, "run_token": token}))


def test_the_run_folder_is_the_new_one_holding_this_runs_token(tmp_path: Path) -> None:
    """Two runs in one output folder: each finds its own folder, not the newest one."""
    old = tmp_path / "iris-image-pipeline-1"
    _write_status(old / "train-model", STATE_SUCCEEDED, 1.0)  # an earlier run, same token
    existing = {p.name for p in tmp_path.iterdir()}
    ours, theirs = tmp_path / "iris-image-pipeline-2", tmp_path / "iris-image-pipeline-3"
    assert find_run_dir(tmp_path, TOKEN, existing) is None  # nothing new yet
    (tmp_path / ".kfp_cache").mkdir()
    ours.mkdir()
    assert find_run_dir(tmp_path, TOKEN, existing) is None  # no step has started
    _write_status(ours / "for-loop-2-iteration-0" / "train-model", STATE_STARTED, 5.0)
    _write_status(theirs / "download-dataset", STATE_STARTED, 6.0, token="another-run")
    assert find_run_dir(tmp_path, TOKEN, existing) == ours
    assert find_run_dir(tmp_path, "another-run", existing) == theirs


def test_the_first_failed_or_unended_step_is_the_failure(tmp_path: Path) -> None:
    _write_status(tmp_path / "download-dataset", STATE_SUCCEEDED, 1.0)
    _write_status(tmp_path / "train-model", STATE_STARTED, 3.0)  # killed: no end recorded
    assert [s.task for s in task_statuses(tmp_path)] == ["download-dataset", "train-model"]
    status, error = first_failure(task_statuses(tmp_path))
    assert (status.task, error) == ("train-model", NO_END)
    _write_status(tmp_path / "preprocess-dataset", STATE_FAILED, 2.0, error="ValueError: few")
    status, error = first_failure(task_statuses(tmp_path))
    assert (status.task, error) == ("preprocess-dataset", "ValueError: few")
    (tmp_path / "evaluate-model").mkdir()
    (tmp_path / "evaluate-model" / STEP_STATUS_FILE).write_text("{half a fi")  # unreadable
    assert len(task_statuses(tmp_path)) == 3
    for name in ("train-model", "preprocess-dataset"):
        _write_status(tmp_path / name, STATE_SUCCEEDED, 2.0)
    assert first_failure(task_statuses(tmp_path)) is None


@pytest.mark.slow  # runs the pipeline (a few seconds); the fast tests above cover the parts
def test_a_failed_step_and_the_run_folder_are_found_with_kfps_output_discarded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything kfp.local prints goes nowhere; the step lines, the failed step, its error
    and the run folder all come from the files the step left."""
    monkeypatch.setattr(StepConsole, "write", lambda self, text: len(text))
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stdout", terminal)
    output_dir = tmp_path / "out"
    config = PipelineConfig(data_source=str(tmp_path / "missing.zip"))
    with pytest.raises(StepFailedError) as err:
        run_local(config, output_dir=output_dir, enable_cache=False)
    assert err.value.step == "download-dataset"
    assert err.value.error.startswith("FileNotFoundError: data source not found")
    assert err.value.run_dir.parent == output_dir.resolve()
    assert (err.value.run_dir / "download-dataset" / STEP_STATUS_FILE).is_file()
    lines = terminal.getvalue().splitlines()
    assert lines[0] == "[1/5] download-dataset ..."
    assert re.fullmatch(r"\[1/5\] download-dataset FAILED after [0-9.]+ s", lines[1])


# --- the checks behind "kfp.local said SUCCESS" ---------------------------------------------

PRODUCERS = {"raw_data": "download-dataset", "prepared_data": "preprocess-dataset",
             "data_report": "preprocess-dataset", "trained_model": "train-model",
             "metrics": "evaluate-model", "classification_metrics": "evaluate-model",
             "report": "evaluate-model", "evaluation": "evaluate-model",
             "model_card": "evaluate-model",
             "gate_passed": "evaluate-model"}
GATED = "register-model"
TASKS = ("download-dataset", "preprocess-dataset", "train-model", "evaluate-model",
         "register-model")


def _fake_run(root: Path, *, gate: bool, register_ran: bool,
              cached: tuple[str, ...] = ()) -> tuple[dict[str, Any], Path]:
    """A run folder laid out as kfp.local lays it out, with an older run holding cache hits."""
    run_dir, old_dir = root / "iris-image-pipeline-2", root / "iris-image-pipeline-1"
    outputs: dict[str, Any] = {"gate_passed": gate}
    for name, task in PRODUCERS.items():
        if name == "gate_passed":
            continue
        base = old_dir if task in cached else run_dir
        (base / task).mkdir(parents=True, exist_ok=True)
        (base / task / EXECUTOR_OUTPUT).write_text("{}")
        path = base / task / name
        if name in FILE_OUTPUTS:
            path.write_text("x")
        outputs[name] = dsl.Artifact(uri=str(path))
    if register_ran:
        (run_dir / "register-model").mkdir()
        (run_dir / "register-model" / EXECUTOR_OUTPUT).write_text(
            json.dumps({"parameterValues": {"Output": {"registered": True}}}))
    return outputs, run_dir


def test_a_silently_skipped_gated_step_is_a_failure(tmp_path: Path) -> None:
    outputs, run_dir = _fake_run(tmp_path, gate=True, register_ran=False)
    with pytest.raises(StepFailedError, match="did not run although the evaluation gate") as err:
        verify_local_run(outputs, PRODUCERS, GATED, run_dir)
    assert err.value.step == "register-model"


def test_a_gated_step_that_ran_on_a_failed_gate_is_a_failure(tmp_path: Path) -> None:
    outputs, run_dir = _fake_run(tmp_path, gate=False, register_ran=True)
    with pytest.raises(StepFailedError, match="ran although the evaluation gate failed"):
        verify_local_run(outputs, PRODUCERS, GATED, run_dir)


def test_missing_outputs_name_their_step(tmp_path: Path) -> None:
    outputs, run_dir = _fake_run(tmp_path, gate=False, register_ran=False)
    Path(outputs["report"].path).unlink()
    with pytest.raises(StepFailedError, match="output 'report' is missing") as err:
        verify_local_run(outputs, PRODUCERS, GATED, run_dir)
    assert err.value.step == "evaluate-model"
    outputs, run_dir = _fake_run(tmp_path / "b", gate=False, register_ran=False)
    (run_dir / "train-model" / EXECUTOR_OUTPUT).unlink()
    with pytest.raises(StepFailedError, match=r"left no executor_output\.json") as err:
        verify_local_run(outputs, PRODUCERS, GATED, run_dir)
    assert err.value.step == "train-model"


def test_a_sweep_trial_that_left_no_outputs_is_a_failure(tmp_path: Path) -> None:
    for iteration in (0, 2):  # kfp.local's folders of a ParallelFor's iterations
        task_dir = tmp_path / f"for-loop-2-iteration-{iteration}" / "train-model"
        task_dir.mkdir(parents=True)
        (task_dir / EXECUTOR_OUTPUT).write_text("{}")
    verify_trials(tmp_path, 2)
    (tmp_path / "for-loop-2-iteration-1" / "train-model").mkdir(parents=True)  # started only
    with pytest.raises(StepFailedError, match="2 of the sweep's 3 trials finished") as err:
        verify_trials(tmp_path, 3)
    assert err.value.step == "train-model"


def test_cache_hits_are_outputs_from_an_earlier_run(tmp_path: Path) -> None:
    outputs, run_dir = _fake_run(tmp_path, gate=True, register_ran=True,
                                 cached=("download-dataset", "preprocess-dataset"))
    cached, registration = verify_local_run(outputs, PRODUCERS, GATED, run_dir)
    assert cached == ["download-dataset", "preprocess-dataset"]
    assert registration == {"registered": True}


def _gate_bool(flag: bool) -> bool:
    return flag


def _gate_named(flag: bool) -> NamedTuple("Outputs", [("passed", bool)]):
    import collections

    return collections.namedtuple("Outputs", ["passed"])(flag)


def _mark(out: Output[Artifact]) -> None:
    with open(out.path, "w") as f:
        f.write("ran")


def test_kfp_local_condition_on_a_named_output_is_silently_skipped(tmp_path: Path) -> None:
    """Canary for the upstream behaviour dag.py works around and run_local checks for.

    kfp.local 2.17 resolves ``dsl.If`` on a task's single ``Output`` but cannot resolve a
    *named* output: the gated task is skipped and the pipeline still reports success. If
    this test starts failing, kfp fixed it and the ``Output`` workaround may go.
    """
    single, named, mark = (dsl.component(f, base_image="python:3.11", install_kfp_package=False)
                           for f in (_gate_bool, _gate_named, _mark))

    @dsl.pipeline(name="gate-canary")
    def canary() -> None:
        first = single(flag=True)
        with dsl.If(first.outputs["Output"] == True):  # noqa: E712
            mark().set_caching_options(False)
        second = named(flag=True)
        with dsl.If(second.outputs["passed"] == True):  # noqa: E712
            mark().set_caching_options(False)

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    canary()  # no exception: kfp.local calls this run a success
    ran = sorted(p.parent.name for p in tmp_path.glob("gate-canary-*/*/out"))
    assert ran == ["mark"], "only the branch gated on the single Output ran"


# --- end to end: python pipeline.py --local on the shared archive ---------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.slow  # a tiny pipeline end to end: about a minute on 2 cores
def test_steps_progress_and_run_folder_are_shown_with_kfps_output_discarded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, iris_zip: Path,
        mobilenet_weights: Path) -> None:
    monkeypatch.setattr(StepConsole, "write", lambda self, text: len(text))
    terminal = _Tty()
    monkeypatch.setattr(sys, "stdout", terminal)
    config = PipelineConfig(data_source=str(iris_zip), epochs=2, image_size=32,
                            head_feature_views=0, weights=str(mobilenet_weights),
                            backbone="mobilenet", alpha=0.25, tta_views=0, gate_threshold=0.0)
    result = run_local(config, output_dir=tmp_path / "out",
                       tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.run_dir.parent == (tmp_path / "out").resolve()
    assert result.registration["registered"] is True
    text = terminal.getvalue()
    for index, task in enumerate(TASKS, start=1):
        assert re.search(rf"\[{index}/5\] {task} done in [0-9.]+ s · \S", text), task
    assert re.search(r"head epochs: +[0-9]+%", text), text  # the bar, from the progress file


def _fast_args(iris_zip: Path, weights: Path) -> list[str]:
    """Few epochs, small images, offline weights; threshold 0 so the gated step runs.

    The head trains epoch by epoch (head_feature_views=0) so history and MLflow metrics have
    one entry per epoch; the cached-feature head is covered in tests/test_train.py.
    """
    return ["--data", str(iris_zip), "--set", "epochs=2", "--set", "image_size=96",
            "--set", "head_feature_views=0", *set_flags(*V1_BACKBONE),
            "--set", f"weights={weights}", "--set", "gate_threshold=0"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("local")


@pytest.fixture(scope="module")
def first_run(workdir: Path, iris_zip: Path, mobilenet_weights: Path) -> CliRun:
    return run_local_cli(workdir, *_fast_args(iris_zip, mobilenet_weights))


@pytest.fixture(scope="module")
def second_run(first_run: CliRun, workdir: Path, iris_zip: Path,
               mobilenet_weights: Path) -> CliRun:
    return run_local_cli(workdir, *_fast_args(iris_zip, mobilenet_weights))


@pytest.mark.slow
def test_local_run_writes_every_artifact(first_run: CliRun) -> None:
    summary = succeeded(first_run)
    out = {name: Path(path) for name, path in summary["outputs"].items()}
    assert (out["raw_data"] / "iris-image.zip").is_file()
    prepared = out["prepared_data"]
    assert json.loads((prepared / "classes.json").read_text()) == [
        "iris-setosa", "iris-versicolour", "iris-virginica"]
    for split in ("train", "val", "test"):
        assert list((prepared / split).glob("*.tfrecord")), split
    assert out["data_report"].read_text().startswith("#")
    model = out["trained_model"]
    for name in ("model.keras", "classes.json", "history.json", "augmentation_preview.png"):
        assert (model / name).is_file(), name
    assert (model / "saved_model" / "saved_model.pb").is_file()
    assert len(json.loads((model / "history.json").read_text())) == 2  # epochs=2
    evaluation = out["evaluation"]
    for name in ("metrics.json", "confusion_matrix.png", "training_curves.png", "report.html",
                 "predictions.csv"):
        assert (evaluation / name).is_file(), name
    assert "<html" in out["report"].read_text().lower()
    run_dir = Path(summary["run_dir"])
    for task in ("download-dataset", "preprocess-dataset", "train-model", "evaluate-model",
                 "register-model"):
        assert (run_dir / task / "executor_output.json").is_file(), task


@pytest.mark.slow
def test_local_run_metrics_and_data_counts(first_run: CliRun) -> None:
    summary = succeeded(first_run)
    metrics = summary["test_metrics"]
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert 0.0 <= metrics[name] <= 1.0, name
        assert metrics[f"{name}_ci_low"] <= metrics[name] <= metrics[f"{name}_ci_high"], name
    assert metrics["test_examples"] == 59
    assert sum(map(sum, summary["confusion_matrix"])) == 59
    baseline = summary["majority_baseline"]
    assert baseline["class"] == "iris-versicolour"
    assert baseline["accuracy"] == pytest.approx(38 / 59)
    counts = summary["data"]["counts"]
    assert (counts["files_seen"], counts["files_used"], counts["duplicates_dropped"]) == (
        421, 389, 32)
    assert counts["class_counts"] == {"iris-setosa": 66, "iris-versicolour": 253,
                                      "iris-virginica": 70}
    # --data without a digest: not checked, but the archive's actual sha256 is recorded
    assert summary["data"]["sha256"] == DEFAULT_DATA_SHA256  # the shared copy's bytes
    assert summary["data"]["sha256_checked"] is False
    assert f"to pin it: --set data_sha256={DEFAULT_DATA_SHA256}" in first_run.stderr


@pytest.mark.slow
def test_local_summary_has_gate_registration_and_mlflow_ids(first_run: CliRun,
                                                            workdir: Path) -> None:
    summary = succeeded(first_run)
    gate = summary["gate"]
    assert gate == {"metric": "balanced_accuracy", "threshold": 0.0, "passed": True,
                    "value": summary["test_metrics"]["balanced_accuracy"]}
    registration = summary["registration"]
    assert registration["registered"] is True and registration["version"] == "1"
    mlflow_info = summary["mlflow"]
    assert mlflow_info["tracking_uri"] == f"sqlite:///{workdir.resolve() / 'mlflow.db'}"
    assert mlflow_info["model_uri"] == "models:/iris-image-classifier/1"
    assert mlflow_info["alias"] == "champion"
    assert mlflow_info["run_id"] and all(mlflow_info["step_run_ids"].values())
    assert summary["cached_steps"] == []

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_info["tracking_uri"])
    params = client.get_run(mlflow_info["run_id"]).data.params
    missing = set(PipelineConfig.field_names()) - SWEEP_ONLY_FIELDS - set(params)
    assert not missing, f"config fields not logged on the parent run: {sorted(missing)}"
    assert params["data_source"] == summary["data"]["source"] and params["epochs"] == "2"


@pytest.mark.slow
def test_terminal_shows_a_line_per_step_and_a_closing_block(first_run: CliRun) -> None:
    """Non-TTY output: no executor dumps, no TF noise; at most 25 lines; the closing block."""
    summary = succeeded(first_run)
    lines = (first_run.stdout + first_run.stderr).splitlines()
    assert len(lines) <= 25, "\n".join(lines)
    text = "\n".join(lines)
    for index, task in enumerate(TASKS, start=1):
        assert re.search(rf"^\[{index}/5\] {task} done in [0-9.]+ s", text, re.M), task
    assert "executor_input" not in text and "oneDNN" not in text
    metrics = summary["test_metrics"]
    assert re.search(rf"^test \(59 images\): +accuracy {metrics['accuracy']:.3f} "
                     rf"\[{metrics['accuracy_ci_low']:.3f}, {metrics['accuracy_ci_high']:.3f}\] +"
                     rf"balanced_accuracy {metrics['balanced_accuracy']:.3f}", text, re.M)
    assert re.search(r"^majority baseline: +accuracy 0\.644 +balanced_accuracy 0\.333", text,
                     re.M)
    assert (f"gate: balanced_accuracy {metrics['balanced_accuracy']:.3f} >= 0.000 -> passed"
            in text)
    assert "registered: iris-image-classifier version 1 @champion" in text
    assert f"MLflow parent run {summary['mlflow']['run_id']}" in text
    assert f'mlflow ui --backend-store-uri "{summary["mlflow"]["tracking_uri"]}"' in text
    assert f"run folder: {summary['run_dir']}" in text
    assert re.search(r"^total: [0-9.]+ s", text, re.M)


@pytest.mark.slow
def test_each_steps_full_output_is_in_its_log_file(first_run: CliRun) -> None:
    logs = Path(succeeded(first_run)["run_dir"]) / "logs"
    train = (logs / "train-model.log").read_text()
    assert "Executing task 'train-model'" in train
    assert re.search(r"epoch 1 .*loss [0-9.]+", train), "no per-epoch progress in the log"
    assert re.search(r"epoch 2 .*loss [0-9.]+", train)
    progress = json.loads((logs.parent / "train-model" / STEP_PROGRESS_FILE).read_text())
    assert progress == {"what": "head epochs", "done": 2, "total": 2}  # a bar on a terminal
    assert "Executing task 'train-model'" not in (logs / "evaluate-model.log").read_text()


@pytest.mark.slow
def test_second_identical_run_reuses_download_and_preprocess(first_run: CliRun,
                                                             second_run: CliRun) -> None:
    first, second = succeeded(first_run), succeeded(second_run)
    assert second["cached_steps"] == ["download-dataset", "preprocess-dataset"]
    assert "[1/5] download-dataset ... cached" in second_run.stdout
    assert "[2/5] preprocess-dataset ... cached" in second_run.stdout
    for name in ("raw_data", "prepared_data", "data_report"):  # the first run's artifacts
        assert second["outputs"][name] == first["outputs"][name], name
    run_dir = Path(second["run_dir"])
    assert run_dir != Path(first["run_dir"])
    assert sorted(p.name for p in run_dir.iterdir()) == [
        "evaluate-model", "logs", "register-model", "train-model"]
    assert second["registration"]["version"] == "2"
    assert second["mlflow"]["run_id"] != first["mlflow"]["run_id"]


def test_failing_first_step_exits_non_zero_naming_it(tmp_path: Path) -> None:
    run = run_local_cli(tmp_path, "--data", str(tmp_path / "missing.zip"), timeout=300)
    assert run.returncode == 1
    assert "pipeline failed: step 'download-dataset' failed: FileNotFoundError: data source " \
           "not found" in run.stderr
    assert "Traceback" not in run.stderr  # a message, not the CLI's own traceback
    assert run.summary["status"] == "failed"
    assert run.summary["failed_step"] == "download-dataset"
    assert "missing.zip" in run.summary["error"]


def test_the_steps_run_the_code_of_the_cli_that_started_them(tmp_path: Path) -> None:
    """A copy of the project, not installed (the installed one is elsewhere), whose download
    step words its error its own way: the step processes import the copy, as the CLI did."""
    copy = tmp_path / "checkout"
    for folder in ("pipeline", "components", "containers"):
        shutil.copytree(PROJECT_ROOT / folder, copy / folder,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PROJECT_ROOT / "pipeline.py", copy / "pipeline.py")
    fetch = copy / "pipeline" / "lib" / "fetch.py"
    fetch.write_text(fetch.read_text().replace("data source not found", "copy: no data source"))
    workdir = tmp_path / "work"
    workdir.mkdir()
    done = subprocess.run(
        [sys.executable, str(copy / "pipeline.py"), "--local", "--data", str(tmp_path / "no.zip")],
        cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "step 'download-dataset' failed: FileNotFoundError: copy: no data source" \
        in done.stderr, done.stderr[-2000:]


def test_a_step_that_dies_before_it_starts_is_named_with_its_error(tmp_path: Path) -> None:
    """No status file (the step never began: its import failed): the failure names the task
    kfp.local was on and the error its process printed, not just kfp.local's summary."""
    console = StepConsole(io.StringIO(), tmp_path, ["download-dataset", "train-model"],
                          token=TOKEN)
    console.write("10:00:00.000 - INFO - Executing task 'download-dataset'\n"
                  "Traceback (most recent call last):\n"
                  '  File "<frozen runpy>", line 198, in _run_module_as_main\n'
                  "ModuleNotFoundError: No module named 'components'\n"
                  "10:00:01.000 - ERROR - Task 'download-dataset' finished with status FAILURE\n")
    with pytest.raises(StepFailedError) as failed:
        run_judged(console, "iris-image-pipeline", tmp_path, _raises_like_kfp_local)
    assert failed.value.step == "download-dataset"
    assert failed.value.error == ("its process ended before the step started: "
                                  "ModuleNotFoundError: No module named 'components'")
    assert "Traceback (most recent call last):" not in failed.value.tail


def _raises_like_kfp_local() -> None:
    raise RuntimeError("Pipeline 'iris-image-pipeline' finished with status FAILURE. "
                       "Inner task failed: 'download-dataset'.")


@pytest.mark.slow
def test_failing_later_step_is_named_and_uses_the_cache(second_run: CliRun, workdir: Path,
                                                        iris_zip: Path,
                                                        mobilenet_weights: Path) -> None:
    run = run_local_cli(workdir, *_fast_args(iris_zip, mobilenet_weights),
                   "--set", "min_images_per_class=1000")
    assert run.returncode == 1
    assert "step 'preprocess-dataset' failed: ValueError: too few usable images per class" \
        in run.stderr
    assert "[1/5] download-dataset ... cached" in run.stdout
    assert "last lines of preprocess-dataset:" in run.stderr
    assert re.search(r"full log: .*/logs/preprocess-dataset\.log", run.stderr)
    assert run.summary["failed_step"] == "preprocess-dataset"
    assert not (Path(run.summary["run_dir"]) / "train-model").exists()


@pytest.fixture(scope="module")
def failed_gate_run(first_run: CliRun, workdir: Path, iris_zip: Path,
                    mobilenet_weights: Path) -> CliRun:
    """After ``first_run`` (whose download and preprocess kfp.local has cached), a tiny model
    run with ``--no-cache`` against a gate it cannot pass, under its own registered name."""
    return run_local_cli(workdir, "--no-cache", "--data", str(iris_zip),
                         "--set", "epochs=1", "--set", "image_size=64",
                         "--set", "head_feature_views=1", "--set", f"weights={mobilenet_weights}",
                         *set_flags(*V1_BACKBONE), "--set", "gate_threshold=1.0",
                         "--set", "registered_model_name=iris-gate-failed")


@pytest.mark.slow
def test_a_failed_gate_succeeds_without_registering(failed_gate_run: CliRun) -> None:
    summary = succeeded(failed_gate_run)
    value = summary["test_metrics"]["balanced_accuracy"]
    assert value < 1.0
    assert summary["gate"] == {"metric": "balanced_accuracy", "threshold": 1.0,
                               "passed": False, "value": value}
    assert summary["registration"] is None
    assert not (Path(summary["run_dir"]) / "register-model").exists()

    from mlflow import MlflowClient

    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    assert client.search_model_versions("name = 'iris-gate-failed'") == []
    assert client.search_registered_models("name = 'iris-gate-failed'") == []


@pytest.mark.slow
def test_no_cache_runs_every_step_again(failed_gate_run: CliRun) -> None:
    summary = succeeded(failed_gate_run)
    assert summary["cached_steps"] == []
    assert "cache hit" not in failed_gate_run.stderr
    assert sorted(p.name for p in Path(summary["run_dir"]).iterdir()) == [
        "download-dataset", "evaluate-model", "logs", "preprocess-dataset", "train-model"]


@pytest.mark.slow  # two tiny pipelines at once: about a minute on 2 cores
def test_concurrent_runs_in_one_folder_each_report_their_own_run_folder(
        tmp_path: Path, iris_zip: Path, mobilenet_weights: Path) -> None:
    """Two ``--local`` runs started together in one folder (one output folder, one
    ``mlflow.db``): each summary names the run folder its own tasks wrote, not the newest one.

    A run folder is tied to its run by what the tasks wrote there: the train step's MLflow
    parent run, the register step's model name (each run registers its own), and the steps'
    logs.
    """
    tiny = ["--data", str(iris_zip), "--set", "epochs=1", "--set", "image_size=32",
            "--set", "head_feature_views=1", "--set", f"weights={mobilenet_weights}",
            *set_flags(*V1_BACKBONE), "--set", "gate_threshold=0"]
    names = ("iris-run-a", "iris-run-b")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = list(pool.map(
            lambda name: run_local_cli(tmp_path, *tiny, "--set", f"registered_model_name={name}",
                                       timeout=600), names))

    summaries = [succeeded(run) for run in runs]
    run_dirs = [Path(summary["run_dir"]) for summary in summaries]
    assert run_dirs[0] != run_dirs[1]
    assert [p.parent for p in run_dirs] == [tmp_path.resolve() / "local_outputs"] * 2
    for name, summary, run_dir, other in zip(names, summaries, run_dirs, names[::-1],
                                             strict=True):
        train = json.loads((run_dir / "train-model" / EXECUTOR_OUTPUT).read_text())
        metadata = train["artifacts"]["trained_model"]["artifacts"][0]["metadata"]
        assert metadata["mlflow_parent_run_id"] == summary["mlflow"]["run_id"], run_dir
        register = json.loads((run_dir / "register-model" / EXECUTOR_OUTPUT).read_text())
        assert register["parameterValues"]["Output"]["name"] == name, run_dir
        assert summary["registration"]["name"] == name
        assert run_dir in Path(summary["outputs"]["trained_model"]).parents
        log = (run_dir / "logs" / "register-model.log").read_text()
        assert log.count("Executing task 'register-model'") == 1, run_dir
        assert name in log and other not in log, run_dir
