"""``--local``: failure detection (fast) and end-to-end runs on the shared iris archive (slow)."""

import json
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from kfp import dsl, local
from kfp.dsl import Artifact, Output

from pipeline import runners
from pipeline.runners import StepFailedError, failed_tasks, task_error

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CYAN, RED, RESET = "\x1b[96m", "\x1b[91m", "\x1b[0m"

# What kfp.local 2.17 streams for a failing step (copied from a real run, shortened).
FAILED_STEP_OUTPUT = f"""\
23:25:57.554 - INFO - Executing task {CYAN}'download-dataset'{RESET}
23:25:57.555 - INFO - Streamed logs:

    [KFP Executor 2026-11-26 23:25:57,728 INFO]: Looking for component `download_dataset`
    Traceback (most recent call last):
      File "<frozen runpy>", line 198, in _run_module_as_main
      File "/tmp/tmp.FfJwb5Lk65/ephemeral_component.py", line 18, in download_dataset
        fetched = fetch_dataset(data_source, raw_data.path, data_sha256 or None)
                  ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
      File "/work/main/pipeline/steps/download.py", line 322, in fetch_dataset
        raise FileNotFoundError(f"data source not found: {{source!r}}")
    FileNotFoundError: data source not found: '/nonexistent/iris.zip' (no such file or folder)


23:25:58.165 - ERROR - Task {CYAN}'download-dataset'{RESET} finished with status {RED}FAILURE{RESET}
--------------------------------------------------------------------------------
"""


def test_failed_step_and_its_error_are_read_from_the_streamed_output() -> None:
    lines = FAILED_STEP_OUTPUT.splitlines()
    assert failed_tasks(lines) == ["download-dataset"]
    assert task_error(lines, "download-dataset") == (
        "FileNotFoundError: data source not found: '/nonexistent/iris.zip' "
        "(no such file or folder)")


def test_the_last_traceback_and_multi_line_messages_win() -> None:
    lines = [
        "Executing task 'train-model'",
        "    Traceback (most recent call last):",
        '      File "a.py", line 1, in f',
        "    KeyError: 'x'",
        "",
        "    During handling of the above exception, another exception occurred:",
        "    Traceback (most recent call last):",
        '      File "b.py", line 2, in g',
        "    ValueError: invalid config: epochs must be > 0",
        "    and a second line",
        "Task 'train-model' finished with status FAILURE",
    ]
    assert task_error(lines, "train-model") == (
        "ValueError: invalid config: epochs must be > 0 and a second line")
    assert task_error(["Executing task 'x'", "    Killed"], "x") == "Killed"
    assert task_error([], "x") == "no error output captured"


def test_innermost_task_is_taken_from_kfps_exception() -> None:
    exc = RuntimeError(f"Pipeline 'p' finished with status FAILURE. Inner task failed: "
                       f"{CYAN}'register-model'{RESET} inside {CYAN}'condition-1'{RESET}.")
    assert runners._failed_task_from_exception(exc) == "register-model"
    assert runners._failed_task_from_exception(RuntimeError("something else")) is None


# --- the checks behind "kfp.local said SUCCESS" ---------------------------------------------

PRODUCERS = {"raw_data": "download-dataset", "prepared_data": "preprocess-dataset",
             "data_report": "preprocess-dataset", "trained_model": "train-model",
             "metrics": "evaluate-model", "classification_metrics": "evaluate-model",
             "report": "evaluate-model", "evaluation": "evaluate-model",
             "gate_passed": "evaluate-model"}


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
        (base / task / runners.EXECUTOR_OUTPUT).write_text("{}")
        path = base / task / name
        if name in runners.FILE_OUTPUTS:
            path.write_text("x")
        outputs[name] = dsl.Artifact(uri=str(path))
    if register_ran:
        (run_dir / "register-model").mkdir()
        (run_dir / "register-model" / runners.EXECUTOR_OUTPUT).write_text(
            json.dumps({"parameterValues": {"Output": {"registered": True}}}))
    return outputs, run_dir


def test_a_silently_skipped_gated_step_is_a_failure(tmp_path: Path) -> None:
    outputs, run_dir = _fake_run(tmp_path, gate=True, register_ran=False)
    with pytest.raises(StepFailedError, match="did not run although the evaluation gate") as err:
        runners._verify_local_run(outputs, PRODUCERS, run_dir)
    assert err.value.step == "register-model"


def test_a_gated_step_that_ran_on_a_failed_gate_is_a_failure(tmp_path: Path) -> None:
    outputs, run_dir = _fake_run(tmp_path, gate=False, register_ran=True)
    with pytest.raises(StepFailedError, match="ran although the evaluation gate failed"):
        runners._verify_local_run(outputs, PRODUCERS, run_dir)


def test_missing_outputs_name_their_step(tmp_path: Path) -> None:
    outputs, run_dir = _fake_run(tmp_path, gate=False, register_ran=False)
    Path(outputs["report"].path).unlink()
    with pytest.raises(StepFailedError, match="output 'report' is missing") as err:
        runners._verify_local_run(outputs, PRODUCERS, run_dir)
    assert err.value.step == "evaluate-model"
    outputs, run_dir = _fake_run(tmp_path / "b", gate=False, register_ran=False)
    (run_dir / "train-model" / runners.EXECUTOR_OUTPUT).unlink()
    with pytest.raises(StepFailedError, match=r"left no executor_output\.json") as err:
        runners._verify_local_run(outputs, PRODUCERS, run_dir)
    assert err.value.step == "train-model"


def test_cache_hits_are_outputs_from_an_earlier_run(tmp_path: Path) -> None:
    outputs, run_dir = _fake_run(tmp_path, gate=True, register_ran=True,
                                 cached=("download-dataset", "preprocess-dataset"))
    cached, registration = runners._verify_local_run(outputs, PRODUCERS, run_dir)
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
