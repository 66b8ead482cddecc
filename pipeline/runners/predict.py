"""Runners of the batch-prediction pipeline: locally with kfp.local, compiled, or submitted
(once, or as a KFP recurring run on a cron schedule)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.dag import (
    DEFAULT_MODEL_URI,
    PREDICT_PIPELINE_NAME,
    create_predict_pipeline,
    predict_arguments,
)
from pipeline.lib.contract import DRIFT_REPORT_JSON, EXECUTOR_OUTPUT, RUN_TOKEN_ENV
from pipeline.lib.files import atomic_path, read_json
from pipeline.runners.cluster import SubmitResult, find_version
from pipeline.runners.console import StepConsole
from pipeline.runners.local import StepFailedError, console_run, run_judged
from pipeline.tasks import MLFLOW_CONFIG_MAP

PREDICT_TASKS = ("download-dataset", "predict-images")
DEFAULT_PREDICT_PACKAGE = Path("predict-pipeline.yaml")


@dataclasses.dataclass(frozen=True)
class PredictRunResult:
    """A finished local batch-prediction run: where its outputs are and what they say."""

    run_dir: Path
    predictions: Path  # the CSV
    drift_report: Path  # the Markdown
    metadata: dict[str, Any]  # the predictions artifact's metadata (counts, verdict, run id)
    drift: dict[str, Any]  # the drift report (JSON)
    elapsed_s: float


def run_predict_local(config: PipelineConfig, *, model_uri: str = DEFAULT_MODEL_URI,
                      output_dir: str | Path, tracking_uri: str = "", verbose: bool = False,
                      images: Mapping[str, str] | None = None) -> PredictRunResult:
    """Run the batch-prediction pipeline here with kfp.local (no cache: new images each
    time). Raises :class:`StepFailedError` naming the failed step and its error."""
    from kfp import local

    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    pipeline_func = create_predict_pipeline(images, download_retries=0)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(output_dir),
               enable_caching=False)
    started = time.monotonic()
    token = uuid.uuid4().hex  # as run_local: the run folder is the one its steps mark
    console = StepConsole(sys.stdout, output_dir, PREDICT_TASKS, token=token,
                          existing={p.name for p in output_dir.iterdir()}, verbose=verbose)
    with console_run(console, {RUN_TOKEN_ENV: token}):
        task = run_judged(console, PREDICT_PIPELINE_NAME, output_dir,
                          lambda: pipeline_func(**predict_arguments(config, model_uri,
                                                                    tracking_uri)))
        executor = read_json(console.run_dir / "predict-images" / EXECUTOR_OUTPUT)
        if executor is None:
            raise StepFailedError("predict-images", f"left no {EXECUTOR_OUTPUT}",
                                  console.run_dir)
        console.report_unstarted()
    predictions = Path(task.outputs["predictions"].path)
    metadata = executor["artifacts"]["predictions"]["artifacts"][0].get("metadata", {})
    return PredictRunResult(console.run_dir, predictions / "predictions.csv",
                            Path(task.outputs["drift_report"].path), metadata,
                            read_json(predictions / DRIFT_REPORT_JSON) or {},
                            time.monotonic() - started)


def compile_predict(package_path: str | Path = DEFAULT_PREDICT_PACKAGE, *,
                    config: PipelineConfig | None = None, model_uri: str = DEFAULT_MODEL_URI,
                    tracking_uri: str = "", images: Mapping[str, str] | None = None,
                    mlflow_secret: str | None = None,
                    mlflow_config_map: str | None = MLFLOW_CONFIG_MAP,
                    data_secret: str | None = None) -> Path:
    """Write the batch-prediction pipeline's IR YAML; the values become its defaults."""
    from kfp import compiler

    package_path = Path(package_path)
    if package_path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"pipeline package must end in .yaml or .yml, got {str(package_path)!r}")
    arguments = predict_arguments(config or PipelineConfig(), model_uri, tracking_uri)
    pipeline_func = create_predict_pipeline(images, mlflow_secret=mlflow_secret,
                                            mlflow_config_map=mlflow_config_map,
                                            data_secret=data_secret)
    with atomic_path(package_path) as tmp:
        compiler.Compiler().compile(pipeline_func, str(tmp), pipeline_parameters=arguments)
    return package_path


def submit_predict(config: PipelineConfig, *, host: str, model_uri: str = DEFAULT_MODEL_URI,
                   tracking_uri: str = "", experiment: str | None = None,
                   namespace: str | None = None, run_name: str | None = None,
                   schedule: str | None = None, images: Mapping[str, str] | None = None,
                   mlflow_secret: str | None = None,
                   mlflow_config_map: str | None = MLFLOW_CONFIG_MAP,
                   data_secret: str | None = None, client: Any = None) -> SubmitResult:
    """Upload the batch-prediction pipeline (a content-addressed version) and start a run,
    or with ``schedule`` (a cron expression, KFP's six fields or five) a recurring run."""
    arguments = predict_arguments(config, model_uri, tracking_uri)
    if client is None:
        import kfp

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            client = kfp.Client(host=host, namespace=namespace or "kubeflow")
    with tempfile.TemporaryDirectory(prefix="iris-predict-submit-") as tmpdir:
        package = compile_predict(Path(tmpdir) / "pipeline.yaml", images=images,
                                  mlflow_secret=mlflow_secret,
                                  mlflow_config_map=mlflow_config_map, data_secret=data_secret)
        version_name = (f"{PREDICT_PIPELINE_NAME}-"
                        f"{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}")
        pipeline_id = client.get_pipeline_id(PREDICT_PIPELINE_NAME)
        if pipeline_id is None:
            pipeline_id = client.upload_pipeline(
                str(package), pipeline_name=PREDICT_PIPELINE_NAME, namespace=namespace,
                description="Iris batch predictions with a registered model, drift check."
            ).pipeline_id
            version_id = client.list_pipeline_versions(
                pipeline_id, page_size=1, sort_by="created_at desc"
            ).pipeline_versions[0].pipeline_version_id
        else:
            version_id = (find_version(client, pipeline_id, version_name)
                          or client.upload_pipeline_version(
                              str(package), version_name,
                              pipeline_id=pipeline_id).pipeline_version_id)
    experiment_id = client.create_experiment(experiment or config.experiment_name,
                                             namespace=namespace).experiment_id
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    name = run_name or f"{PREDICT_PIPELINE_NAME} {stamp}"
    if schedule:
        job = client.create_recurring_run(
            experiment_id=experiment_id, job_name=name, cron_expression=cron_fields(schedule),
            params=arguments, pipeline_id=pipeline_id, version_id=version_id,
            no_catchup=True)
        run_id = job.recurring_run_id
    else:
        run_id = client.run_pipeline(experiment_id=experiment_id, job_name=name,
                                     params=arguments, pipeline_id=pipeline_id,
                                     version_id=version_id).run_id
    return SubmitResult(pipeline_id=pipeline_id, pipeline_version_id=version_id,
                        experiment_id=experiment_id, run_id=run_id)


def cron_fields(schedule: str) -> str:
    """KFP's six-field cron (seconds first) from a five- or six-field expression; anything
    else is a ``ValueError``."""
    fields = schedule.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(f"--schedule {schedule!r} is not a cron expression: give 5 fields "
                         "(minute hour day month weekday, e.g. '0 2 * * *' for 02:00 nightly) "
                         "or KFP's 6 (seconds first)")
    return " ".join(fields)


def predict_summary(result: PredictRunResult) -> dict[str, Any]:
    """The ``--summary`` JSON of a local batch-prediction run."""
    return {"run_dir": str(result.run_dir), "predictions": str(result.predictions),
            "drift_report": str(result.drift_report), "elapsed_s": result.elapsed_s,
            **json.loads(json.dumps(result.metadata)), "drift": result.drift}


__all__ = ["DEFAULT_PREDICT_PACKAGE", "PredictRunResult", "compile_predict", "cron_fields",
           "predict_summary", "run_predict_local", "submit_predict"]
