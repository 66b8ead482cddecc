"""Runners: the one DAG run locally with kfp.local, compiled to IR YAML, or submitted to KFP."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

from pipeline.config import PipelineConfig
from pipeline.dag import (
    MLFLOW_CONFIG_MAP,
    PIPELINE_NAME,
    STEPS,
    TASK_NAMES,
    create_pipeline,
    pipeline_arguments,
)
from pipeline.steps.download import normalize_sha256

logger = logging.getLogger(__name__)

DEFAULT_OUTPUT_DIR = Path("local_outputs")
DEFAULT_PACKAGE = Path("pipeline.yaml")
#: Longest ``--wait`` for a submitted run before giving up (the run keeps going).
DEFAULT_WAIT_TIMEOUT_S = 6 * 3600
#: Pipeline outputs that are folders or files on disk (Metrics artifacts are metadata only).
FILE_OUTPUTS = ("raw_data", "prepared_data", "data_report", "trained_model", "report",
                "evaluation")
#: Entries of the data report that the summary repeats (the rest lists files).
DATA_REPORT_COUNTS = ("files_seen", "files_used", "files_skipped", "duplicates_dropped",
                      "class_counts", "split_sizes", "split_counts", "skipped_by_reason",
                      "majority_baseline")
#: The task kfp.local runs inside the gate's ``dsl.If`` branch.
GATED_TASK = "register-model"
#: Successful kfp tasks end by writing this file into their task folder.
EXECUTOR_OUTPUT = "executor_output.json"

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r"Executing task '([^']+)'")
_FAILED = re.compile(r"Task '([^']+)' finished with status FAILURE")
_INNER_FAILED = re.compile(r"Inner task failed: (.*)")
_TRACEBACK = "Traceback (most recent call last):"


class StepFailedError(RuntimeError):
    """A pipeline step failed; ``step`` is its KFP task name, ``error`` what it raised."""

    def __init__(self, step: str, error: str, run_dir: Path | None = None) -> None:
        self.step = step
        self.error = error
        self.run_dir = run_dir
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


@dataclasses.dataclass(frozen=True)
class SubmitResult:
    """Identifiers of what ``--submit`` created on the KFP server, and the final state."""

    pipeline_id: str
    pipeline_version_id: str
    experiment_id: str
    run_id: str
    state: str | None = None


# --- output recording (error messages of failed steps) ------------------------------------


class _OutputRecorder:
    """A stdout stand-in that passes everything through and keeps the last lines.

    kfp.local streams each step's output to ``sys.stdout`` line by line but keeps nothing,
    so without this a failed step could only be reported as "failed", not with its error.
    """

    def __init__(self, stream: TextIO, max_lines: int = 20_000) -> None:
        self._stream = stream
        self._partial = ""
        self.lines: collections.deque[str] = collections.deque(maxlen=max_lines)

    def write(self, text: str) -> int:
        self._stream.write(text)
        pieces = (self._partial + text).split("\n")
        self._partial = pieces.pop()
        self.lines.extend(_ANSI.sub("", piece) for piece in pieces)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self._stream, name)


@contextlib.contextmanager
def _recording_stdout() -> Iterator[_OutputRecorder]:
    recorder = _OutputRecorder(sys.stdout)
    sys.stdout = recorder  # type: ignore[assignment]
    try:
        yield recorder
    finally:
        sys.stdout = recorder._stream


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


def _failed_task_from_exception(exc: BaseException) -> str | None:
    """The innermost failed task named in kfp.local's "Inner task failed: ..." message."""
    match = _INNER_FAILED.search(_ANSI.sub("", str(exc)))
    names = re.findall(r"'([^']+)'", match.group(1)) if match else []
    return names[0] if names else None


# --- local ----------------------------------------------------------------------------


def _executor_output(task_dir: Path) -> dict[str, Any] | None:
    path = task_dir / EXECUTOR_OUTPUT
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _producers(pipeline_spec: Any) -> dict[str, str]:
    """Pipeline output name -> task that produces it, from the compiled spec."""
    outputs = pipeline_spec.root.dag.outputs
    producers = {name: spec.artifact_selectors[0].producer_subtask
                 for name, spec in outputs.artifacts.items()}
    producers.update({name: spec.value_from_parameter.producer_subtask
                      for name, spec in outputs.parameters.items()})
    return producers


def _run_dirs(output_dir: Path) -> set[Path]:
    return {p for p in output_dir.glob(f"{PIPELINE_NAME}-*") if p.is_dir()}


def _verify_local_run(outputs: Mapping[str, Any], producers: Mapping[str, str],
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
    register = _executor_output(run_dir / GATED_TASK)
    if gate_passed and register is None:
        raise StepFailedError(GATED_TASK, "did not run although the evaluation gate passed "
                              "(kfp.local skipped the gated branch)", run_dir)
    if not gate_passed and register is not None:
        raise StepFailedError(GATED_TASK, "ran although the evaluation gate failed", run_dir)
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
) -> LocalRunResult:
    """Run the whole DAG in this environment with kfp.local's SubprocessRunner.

    Each step runs as its own Python process (as in a pod) with outputs under
    ``output_dir/<pipeline>-<timestamp>/<task>/``. With ``enable_cache`` kfp.local's cache
    (``output_dir/.kfp_cache``, keyed by component code, image and inputs) serves the
    cacheable steps of an identical earlier run. Raises :class:`StepFailedError` naming
    the failed step and its error, whether or not kfp.local noticed the failure.
    """
    from kfp import local

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    pipeline_func = create_pipeline(images, download_retries=0)
    producers = _producers(pipeline_func.pipeline_spec)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(output_dir),
               enable_caching=enable_cache)
    before = _run_dirs(output_dir)
    started = time.monotonic()
    with _recording_stdout() as recorder, warnings.catch_warnings():
        # Expected locally: resources and GPUs are cluster settings; our images are not
        # named "python"; steps run in this environment, not in the image.
        warnings.filterwarnings("ignore", message=r".*no effect in the current local runner")
        warnings.filterwarnings("ignore", message=r".*non-Python base image",
                                category=RuntimeWarning)
        try:
            task = pipeline_func(**pipeline_arguments(config, tracking_uri))
        except RuntimeError as exc:
            failed = (_failed_task_from_exception(exc)
                      or next(iter(failed_tasks(recorder.lines)), None))
            if failed is None:
                raise
            new = sorted(_run_dirs(output_dir) - before)
            raise StepFailedError(failed, task_error(recorder.lines, failed),
                                  new[-1] if new else None) from None
        silent_failures = failed_tasks(recorder.lines)
    new = sorted(_run_dirs(output_dir) - before)
    run_dir = new[-1] if new else None
    if silent_failures:
        step = silent_failures[0]
        raise StepFailedError(step, task_error(recorder.lines, step), run_dir)
    if run_dir is None:
        raise StepFailedError(PIPELINE_NAME, f"kfp.local created no run folder in {output_dir}")
    outputs = dict(task.outputs)
    cached, registration = _verify_local_run(outputs, producers, run_dir)
    return LocalRunResult(
        run_dir=run_dir,
        output_dir=output_dir,
        outputs=outputs,
        cached_steps=cached,
        gate_passed=bool(outputs["gate_passed"]),
        registration=registration,
        elapsed_s=time.monotonic() - started,
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def build_summary(result: LocalRunResult, config: PipelineConfig,
                  tracking_uri: str = "") -> dict[str, Any]:
    """The ``--summary`` JSON: test metrics, data counts, gate verdict, MLflow ids, paths."""
    outputs = result.outputs
    metrics_meta = dict(outputs["metrics"].metadata)
    evaluation = _read_json(Path(outputs["evaluation"].path) / "metrics.json")
    prepared_meta = dict(outputs["prepared_data"].metadata)
    data_report = _read_json(Path(outputs["prepared_data"].path) / "data_report.json")
    model_meta = dict(outputs["trained_model"].metadata)
    registration = result.registration or {}
    gate_metric = metrics_meta.get("gate_metric", config.gate_metric)
    return {
        "status": "succeeded",
        "pipeline": PIPELINE_NAME,
        "test_metrics": {k: v for k, v in evaluation.items() if not k.startswith("gate_")
                         and isinstance(v, (int, float)) and not isinstance(v, bool)},
        "majority_baseline": evaluation.get("baseline"),
        "per_class": evaluation.get("per_class"),
        "classes": evaluation.get("classes"),
        "confusion_matrix": evaluation.get("confusion_matrix"),
        "data": {
            "source": prepared_meta.get("source", config.data_source),
            # the archive's actual digest (none for a folder); checked = it was given
            "sha256": data_report.get("input", {}).get("sha256")
            or prepared_meta.get("sha256", config.data_sha256),
            "sha256_checked": normalize_sha256(
                prepared_meta.get("sha256", config.data_sha256)) is not None,
            "counts": {k: data_report[k] for k in DATA_REPORT_COUNTS if k in data_report},
            "report": str(Path(outputs["prepared_data"].path) / "data_report.json"),
        },
        "gate": {
            "metric": evaluation.get("gate_metric", gate_metric),
            "value": evaluation.get("gate_value", metrics_meta.get(gate_metric)),
            "threshold": evaluation.get("gate_threshold", config.gate_threshold),
            "passed": result.gate_passed,
        },
        "registration": result.registration,
        "mlflow": {
            "tracking_uri": model_meta.get("mlflow_tracking_uri", tracking_uri),
            "experiment_name": config.experiment_name,
            "run_id": model_meta.get("mlflow_parent_run_id"),  # the pipeline run's parent
            "step_run_ids": {"train": model_meta.get("mlflow_run_id"),
                             "evaluate": metrics_meta.get("mlflow_run_id"),
                             "register": registration.get("mlflow_run_id")},
            "logged_model_uri": model_meta.get("mlflow_model_uri"),
            "model_uri": registration.get("model_uri") or model_meta.get("mlflow_model_uri"),
            "registered_model": registration.get("name"),
            "registered_version": registration.get("version"),
            "alias": registration.get("alias"),
        },
        "cached_steps": result.cached_steps,
        "elapsed_s": round(result.elapsed_s, 1),
        "output_dir": str(result.output_dir),
        "run_dir": str(result.run_dir),
        "outputs": {name: outputs[name].path for name in FILE_OUTPUTS},
        "config": config.to_dict(),
    }


def failure_summary(error: StepFailedError, config: PipelineConfig) -> dict[str, Any]:
    """The ``--summary`` JSON of a failed run: which step, what error, where its outputs are."""
    return {
        "status": "failed",
        "pipeline": PIPELINE_NAME,
        "failed_step": error.step,
        "error": error.error,
        "run_dir": str(error.run_dir) if error.run_dir else None,
        "config": config.to_dict(),
    }


def write_json(data: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``data`` as JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.",
                                     suffix=".tmp", delete=False) as tmp:
        json.dump(data, tmp, indent=2, default=str)
        tmp.write("\n")
    Path(tmp.name).replace(path)
    return path


# --- compile and submit -------------------------------------------------------------------


def compile_pipeline(
    package_path: str | Path = DEFAULT_PACKAGE,
    *,
    config: PipelineConfig | None = None,
    tracking_uri: str = "",
    images: Mapping[str, str] | None = None,
    mlflow_secret: str | None = None,
    mlflow_config_map: str | None = MLFLOW_CONFIG_MAP,
) -> Path:
    """Write the pipeline's IR YAML; ``config`` values become the parameters' defaults."""
    from kfp import compiler

    package_path = Path(package_path)
    if package_path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"pipeline package must end in .yaml or .yml, got {str(package_path)!r}")
    package_path.parent.mkdir(parents=True, exist_ok=True)
    pipeline_func = create_pipeline(images, mlflow_secret=mlflow_secret,
                                    mlflow_config_map=mlflow_config_map)
    arguments = pipeline_arguments(config or PipelineConfig(), tracking_uri)
    tmp = package_path.with_name(f".{package_path.name}.tmp{package_path.suffix}")
    try:
        compiler.Compiler().compile(pipeline_func, str(tmp), pipeline_parameters=arguments)
        tmp.replace(package_path)
    finally:
        tmp.unlink(missing_ok=True)
    return package_path


def _version_name(package: Path) -> str:
    """Content-addressed version name: re-submitting an unchanged spec reuses the version."""
    return f"{PIPELINE_NAME}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"


def _find_version(client: Any, pipeline_id: str, name: str) -> str | None:
    versions = client.list_pipeline_versions(pipeline_id, filter=json.dumps({
        "predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]
    })).pipeline_versions or []
    return versions[0].pipeline_version_id if versions else None


def submit_pipeline(
    config: PipelineConfig,
    *,
    host: str,
    tracking_uri: str = "",
    experiment: str | None = None,
    namespace: str | None = None,
    run_name: str | None = None,
    wait: bool = False,
    timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    images: Mapping[str, str] | None = None,
    mlflow_secret: str | None = None,
    mlflow_config_map: str | None = MLFLOW_CONFIG_MAP,
    client: Any = None,
) -> SubmitResult:
    """Compile, upload (a new pipeline or a new version) and start a run with ``kfp.Client``.

    The uploaded spec keeps the config's defaults; this run's values travel as run
    parameters, so one pipeline version serves every configuration. ``experiment``
    defaults to the config's experiment name (the MLflow one), so both UIs group alike.
    """
    if client is None:
        import kfp

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            client = kfp.Client(host=host, namespace=namespace or "kubeflow")
    with tempfile.TemporaryDirectory(prefix="iris-submit-") as tmpdir:
        package = compile_pipeline(Path(tmpdir) / "pipeline.yaml", images=images,
                                   mlflow_secret=mlflow_secret,
                                   mlflow_config_map=mlflow_config_map)
        version_name = _version_name(package)
        pipeline_id = client.get_pipeline_id(PIPELINE_NAME)
        if pipeline_id is None:
            created = client.upload_pipeline(
                str(package), pipeline_name=PIPELINE_NAME, namespace=namespace,
                description="Iris image classifier: download, preprocess, train, evaluate, "
                            "register (MLflow).",
            )
            pipeline_id = created.pipeline_id
            # A new pipeline comes with one version holding the uploaded spec.
            versions = client.list_pipeline_versions(pipeline_id, page_size=1,
                                                     sort_by="created_at desc")
            version_id = versions.pipeline_versions[0].pipeline_version_id
            logger.info("uploaded pipeline %s (id %s)", PIPELINE_NAME, pipeline_id)
        else:
            version_id = _find_version(client, pipeline_id, version_name)
            if version_id is None:
                version = client.upload_pipeline_version(str(package), version_name,
                                                         pipeline_id=pipeline_id)
                version_id = version.pipeline_version_id
                logger.info("uploaded pipeline version %s (id %s)", version_name, version_id)
            else:
                logger.info("reusing pipeline version %s (id %s)", version_name, version_id)
    experiment_obj = client.create_experiment(experiment or config.experiment_name,
                                              namespace=namespace)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    run = client.run_pipeline(
        experiment_id=experiment_obj.experiment_id,
        job_name=run_name or f"{PIPELINE_NAME} {stamp}",
        params=pipeline_arguments(config, tracking_uri),
        pipeline_id=pipeline_id,
        version_id=version_id,
    )
    state = None
    if wait:
        logger.info("waiting up to %.0f s for run %s", timeout_s, run.run_id)
        state = client.wait_for_run_completion(run.run_id, timeout=timeout_s).state
    return SubmitResult(pipeline_id=pipeline_id, pipeline_version_id=version_id,
                        experiment_id=experiment_obj.experiment_id, run_id=run.run_id,
                        state=state)


__all__ = [
    "DEFAULT_OUTPUT_DIR",
    "DEFAULT_PACKAGE",
    "LocalRunResult",
    "StepFailedError",
    "SubmitResult",
    "build_summary",
    "compile_pipeline",
    "failed_tasks",
    "failure_summary",
    "run_local",
    "submit_pipeline",
    "task_error",
    "write_json",
]
