"""The local runner: the whole DAG in this environment with kfp.local, verified task by task."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import sys
import time
import typing
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from kfp.dsl import ClassificationMetrics, Metrics

from pipeline import PROJECT_ROOT
from pipeline.config import PipelineConfig
from pipeline.dag import PIPELINE_NAME, PipelineOutputs, create_pipeline, pipeline_arguments
from pipeline.lib.contract import (
    CHECKPOINT_ROOT_ENV,
    EXECUTOR_OUTPUT,
    LOCAL_CHECKPOINT_ROOT,
    RUN_TOKEN_ENV,
)
from pipeline.lib.feature_cache import CACHE_ROOT_ENV, LOCAL_FEATURE_CACHE
from pipeline.lib.interrupts import CLI_PID_ENV
from pipeline.lib.progress import StepStatus
from pipeline.runners.console import StepConsole, strip_ansi, without_tracebacks
from pipeline.runners.run_files import first_failure
from pipeline.sweep import Sweep
from pipeline.tasks import STEPS, TASK_NAMES

TRAIN_TASK = TASK_NAMES["train_model"]

DEFAULT_OUTPUT_DIR = Path("local_outputs")
#: The last line of a Python traceback: ``ModuleNotFoundError: No module named 'x'``.
_PYTHON_ERROR = re.compile(r"^\w+(Error|Exception|Exit): ")
#: Pipeline outputs that are folders or files on disk (Metrics artifacts are metadata only).
FILE_OUTPUTS = tuple(name for name, kind in typing.get_type_hints(PipelineOutputs).items()
                     if kind not in (bool, Metrics, ClassificationMetrics))


class StepFailedError(RuntimeError):
    """A pipeline step failed; ``step`` is its KFP task name, ``error`` what it raised."""

    def __init__(self, step: str, error: str, run_dir: Path | None = None, *,
                 tail: list[str] | None = None, log: Path | None = None) -> None:
        self.step = step
        self.error = error
        self.run_dir = run_dir
        self.tail = tail or []  # the step's last output lines
        self.log = log  # its full output
        super().__init__(f"step {step!r} failed: {error}")


@dataclasses.dataclass(frozen=True)
class LocalRunResult:
    """What one ``--local`` run produced, checked to exist, and where it lives."""

    run_dir: Path
    output_dir: Path
    outputs: dict[str, Any]  # pipeline output name -> kfp Artifact or parameter value
    cached_steps: list[str]  # task names served from kfp.local's cache
    gate_passed: bool
    registration: dict[str, Any] | None  # the register step's output, None when gated off
    elapsed_s: float


def _executor_output(task_dir: Path) -> dict[str, Any] | None:
    path = task_dir / EXECUTOR_OUTPUT
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def output_producers(pipeline_spec: Any) -> dict[str, str]:
    """Pipeline output name -> task that produces it, from the compiled spec."""
    outputs = pipeline_spec.root.dag.outputs
    producers = {name: spec.artifact_selectors[0].producer_subtask
                 for name, spec in outputs.artifacts.items()}
    producers.update({name: spec.value_from_parameter.producer_subtask
                      for name, spec in outputs.parameters.items()})
    return producers


def gated_task(pipeline_spec: Any) -> str:
    """The one task inside the DAG's condition branch (the register step), from the spec."""
    inside = [task for name, component in pipeline_spec.components.items()
              if name.startswith("comp-condition") for task in component.dag.tasks]
    if len(inside) != 1:
        raise ValueError(f"expected one task behind the gate, found {inside}")
    return inside[0]


def spec_tasks(pipeline_spec: Any) -> list[str]:
    """The step tasks of the compiled DAG, loops and branches included, in step order."""
    names = {task for component in [pipeline_spec.root, *pipeline_spec.components.values()]
             for task in component.dag.tasks}
    return [TASK_NAMES[step] for step in STEPS if TASK_NAMES[step] in names]


def verify_trials(run_dir: Path, trials: int) -> None:
    """Every sweep trial's train task wrote its executor output (kfp.local may not say)."""
    done = [path for path in run_dir.glob(f"for-loop-*-iteration-*/{TRAIN_TASK}/{EXECUTOR_OUTPUT}")
            if path.is_file()]
    if len(done) != trials:
        raise StepFailedError(TRAIN_TASK, f"{len(done)} of the sweep's {trials} trials finished "
                              f"(executor outputs under {run_dir})", run_dir)


def verify_local_run(outputs: Mapping[str, Any], producers: Mapping[str, str], gated: str,
                     run_dir: Path) -> tuple[list[str], dict[str, Any] | None]:
    """Check that what kfp.local called a success really is one; return cache hits and
    the register step's output.

    kfp.local (2.17) can report success for a run in which a task did not do its work (a
    ``dsl.If`` whose condition it cannot resolve is skipped without error), so every
    pipeline output must exist, every task that ran here must have written its executor
    output, and the gated register step must have run exactly when the gate passed.
    """
    for name, task in producers.items():
        if name not in outputs:
            raise StepFailedError(task, f"produced no {name!r} output", run_dir)
    cached: set[str] = set()
    for name in FILE_OUTPUTS:
        task = producers[name]
        path = Path(outputs[name].path)
        if not path.exists():
            raise StepFailedError(task, f"its output {name!r} is missing: {path}", run_dir)
        if run_dir not in path.parents:
            cached.add(task)
    for task in sorted(set(producers.values()) - cached):
        if _executor_output(run_dir / task) is None:
            raise StepFailedError(task, f"left no {EXECUTOR_OUTPUT} in {run_dir / task}", run_dir)
    gate_passed = bool(outputs["gate_passed"])
    register = _executor_output(run_dir / gated)
    if gate_passed and register is None:
        raise StepFailedError(gated, "did not run although the evaluation gate passed "
                              "(kfp.local skipped the gated branch)", run_dir)
    if not gate_passed and register is not None:
        raise StepFailedError(gated, "ran although the evaluation gate failed", run_dir)
    registration = None
    if register is not None:
        registration = register.get("parameterValues", {}).get("Output")
    return [TASK_NAMES[step] for step in STEPS if TASK_NAMES[step] in cached], registration


def run_local(
    config: PipelineConfig,
    *,
    output_dir: str | Path = DEFAULT_OUTPUT_DIR,
    tracking_uri: str = "",
    enable_cache: bool = True,
    images: Mapping[str, str] | None = None,
    verbose: bool = False,
    sweep: Sweep | None = None,
) -> LocalRunResult:
    """Run the whole DAG in this environment with kfp.local's SubprocessRunner.

    Each step runs as its own Python process (as in a pod) with outputs under
    ``output_dir/<pipeline>-<timestamp>/<task>/``. With ``enable_cache`` kfp.local's cache
    (``output_dir/.kfp_cache``, keyed by component code, image and inputs) serves the
    cacheable steps of an identical earlier run. Raises :class:`StepFailedError` naming
    the failed step and its error, whether or not kfp.local noticed the failure. A
    ``sweep`` trains its trials one after another, whatever its ``parallelism``: kfp.local
    would run that many at once, on a workstation's few cores, and their interleaved output
    could no longer be told apart (both tasks are ``train-model``).
    """
    from kfp import local

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    pipeline_func = create_pipeline(images, download_retries=0,
                                    sweep=sweep.one_at_a_time() if sweep else None)
    producers = output_producers(pipeline_func.pipeline_spec)
    gated = gated_task(pipeline_func.pipeline_spec)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(output_dir),
               enable_caching=enable_cache)
    started = time.monotonic()
    # the run folder is the new one whose steps carry this token (see run_files.py)
    token = uuid.uuid4().hex
    console = StepConsole(sys.stdout, output_dir, spec_tasks(pipeline_func.pipeline_spec),
                          token=token, existing={p.name for p in output_dir.iterdir()},
                          verbose=verbose,
                          repeats={TRAIN_TASK: len(sweep.trials)} if sweep else None)
    # the step processes inherit these: a rerun after a crash resumes the same training
    environment = {RUN_TOKEN_ENV: token, CHECKPOINT_ROOT_ENV: os.environ.get(CHECKPOINT_ROOT_ENV)
                   or str(output_dir / LOCAL_CHECKPOINT_ROOT),
                   # a rerun reads the frozen-backbone features an earlier run computed
                   CACHE_ROOT_ENV: os.environ.get(CACHE_ROOT_ENV)
                   or str(output_dir / LOCAL_FEATURE_CACHE)}
    with console_run(console, environment):
        task = run_judged(console, PIPELINE_NAME, output_dir,
                          lambda: pipeline_func(**pipeline_arguments(config, tracking_uri)))
        outputs = dict(task.outputs)
        if sweep is not None:
            verify_trials(console.run_dir, len(sweep.trials))
        cached, registration = verify_local_run(outputs, producers, gated, console.run_dir)
        console.report_unstarted(skipped=[] if outputs["gate_passed"] else [gated])
    return LocalRunResult(
        run_dir=console.run_dir,
        output_dir=output_dir,
        outputs=outputs,
        cached_steps=cached,
        gate_passed=bool(outputs["gate_passed"]),
        registration=registration,
        elapsed_s=time.monotonic() - started,
    )


T = TypeVar("T")


def steps_import_path(current: str | None) -> str:
    """``PYTHONPATH`` for the step processes: this CLI's project first, so the steps run the
    code that started them even where the project is not installed, or an editable install
    points at another checkout."""
    return os.pathsep.join([str(PROJECT_ROOT), *filter(None, (current or "").split(os.pathsep))])


@contextlib.contextmanager
def console_run(console: StepConsole, environment: Mapping[str, str]) -> Iterator[None]:
    """While a pipeline runs: kfp.local's output goes to ``console`` (the per-step logs) and
    the step processes inherit ``environment`` plus the CLI's pid (steps stop once it is
    gone); all restored afterwards."""
    environment = {**environment, CLI_PID_ENV: str(os.getpid()),
                   "PYTHONPATH": steps_import_path(os.environ.get("PYTHONPATH"))}
    saved = {name: os.environ.get(name) for name in environment}
    original, sys.stdout = sys.stdout, console  # type: ignore[assignment]
    os.environ.update(environment)
    try:
        yield
    finally:
        sys.stdout = original
        console.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_judged(console: StepConsole, pipeline_name: str, output_dir: Path,
               call: Callable[[], T]) -> T:
    """``call()`` (a kfp.local pipeline run) judged by the steps' status files, whatever
    kfp.local said: the first failed step, else kfp.local's own error, else a missing run
    folder raise :class:`StepFailedError`."""
    error: RuntimeError | None = None
    with warnings.catch_warnings(), console.watching():
        # Expected locally: resources and GPUs are cluster settings; our images are not
        # named "python"; steps run in this environment, not in the image.
        warnings.filterwarnings("ignore", message=r".*no effect in the current local runner")
        warnings.filterwarnings("ignore", message=r".*non-Python base image",
                                category=RuntimeWarning)
        try:
            result = call()
        except RuntimeError as exc:  # kfp.local's word for a failed task
            error = exc
    if failure := first_failure(console.statuses):
        raise step_failure(console, *failure)
    if error is not None:
        raise unexplained_failure(console, error) from None
    if console.run_dir is None:
        raise StepFailedError(pipeline_name, f"kfp.local created no run folder in {output_dir}")
    return result


def step_failure(console: StepConsole, status: StepStatus, error: str) -> StepFailedError:
    """The error of a failed task, with its last output lines and its log file."""
    return StepFailedError(status.task, error, console.run_dir,
                           tail=without_tracebacks(
                               list(console.tails.get(console.instance(status.task), []))),
                           log=console.log_path(status.task))


def unexplained_failure(console: StepConsole, error: RuntimeError) -> StepFailedError:
    """kfp.local failed the run while every step that reported says it succeeded: the task
    whose step returned but whose executor wrote no outputs, or else the run as a whole."""
    for status in console.statuses:
        if not (status.task_dir / EXECUTOR_OUTPUT).is_file():
            return step_failure(console, status, "its step returned but kfp's executor wrote no "
                            f"outputs: {strip_ansi(str(error))}")
    task = console.current_task
    if task is not None and task not in {status.task for status in console.statuses}:
        # its process ended before the step began: an import error, a broken environment
        tail = without_tracebacks(list(console.tails.get(console.instance(task), [])))
        errors = [line for line in tail if _PYTHON_ERROR.match(line)]
        return StepFailedError(task, "its process ended before the step started"
                               + (f": {errors[-1]}" if errors else ""), console.run_dir,
                               tail=tail)
    return StepFailedError(PIPELINE_NAME, strip_ansi(str(error)), console.run_dir)


__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "FILE_OUTPUTS",
    "LocalRunResult",
    "StepFailedError",
    "gated_task",
    "output_producers",
    "run_local",
    "spec_tasks",
    "verify_local_run",
    "verify_trials",
]
