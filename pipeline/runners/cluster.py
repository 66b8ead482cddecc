"""Runners for a cluster: compile the DAG to KFP IR YAML, or upload and start it on KFP."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.dag import PIPELINE_NAME, create_pipeline, pipeline_arguments
from pipeline.lib.files import atomic_path
from pipeline.sweep import Sweep
from pipeline.tasks import MLFLOW_CONFIG_MAP

logger = logging.getLogger(__name__)

DEFAULT_PACKAGE = Path("pipeline.yaml")
#: Longest ``--wait`` for a submitted run before giving up (the run keeps going).
DEFAULT_WAIT_TIMEOUT_S = 6 * 3600


@dataclasses.dataclass(frozen=True)
class SubmitResult:
    """Identifiers of what ``--submit`` created on the KFP server, and the final state."""

    pipeline_id: str
    pipeline_version_id: str
    experiment_id: str
    run_id: str
    state: str | None = None


def compile_pipeline(
    package_path: str | Path = DEFAULT_PACKAGE,
    *,
    config: PipelineConfig | None = None,
    tracking_uri: str = "",
    images: Mapping[str, str] | None = None,
    mlflow_secret: str | None = None,
    mlflow_config_map: str | None = MLFLOW_CONFIG_MAP,
    data_secret: str | None = None,
    sweep: Sweep | None = None,
) -> Path:
    """Write the pipeline's IR YAML; ``config`` values become the parameters' defaults.

    A data source or tracking URI with credentials is a ``ValueError`` (use the Secrets).
    A ``sweep``'s trials are compiled in (the ParallelFor's items).
    """
    from kfp import compiler

    package_path = Path(package_path)
    if package_path.suffix not in (".yaml", ".yml"):
        raise ValueError(f"pipeline package must end in .yaml or .yml, got {str(package_path)!r}")
    package_path.parent.mkdir(parents=True, exist_ok=True)
    arguments = pipeline_arguments(config or PipelineConfig(), tracking_uri)
    pipeline_func = create_pipeline(images, mlflow_secret=mlflow_secret,
                                    mlflow_config_map=mlflow_config_map, data_secret=data_secret,
                                    sweep=sweep)
    with atomic_path(package_path) as tmp:
        compiler.Compiler().compile(pipeline_func, str(tmp), pipeline_parameters=arguments)
    return package_path


def _version_name(package: Path) -> str:
    """Content-addressed version name: re-submitting an unchanged spec reuses the version."""
    return f"{PIPELINE_NAME}-{hashlib.sha256(package.read_bytes()).hexdigest()[:12]}"


def find_version(client: Any, pipeline_id: str, name: str) -> str | None:
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
    data_secret: str | None = None,
    sweep: Sweep | None = None,
    client: Any = None,
) -> SubmitResult:
    """Compile, upload (a new pipeline or a new version) and start a run with ``kfp.Client``.

    The uploaded spec keeps the config's defaults; this run's values travel as run
    parameters, so one pipeline version serves every configuration. ``experiment``
    defaults to the config's experiment name (the MLflow one), so both UIs group alike.
    """
    arguments = pipeline_arguments(config, tracking_uri)
    if client is None:
        import kfp

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            client = kfp.Client(host=host, namespace=namespace or "kubeflow")
    with tempfile.TemporaryDirectory(prefix="iris-submit-") as tmpdir:
        package = compile_pipeline(Path(tmpdir) / "pipeline.yaml", images=images,
                                   mlflow_secret=mlflow_secret,
                                   mlflow_config_map=mlflow_config_map,
                                   data_secret=data_secret, sweep=sweep)
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
            version_id = find_version(client, pipeline_id, version_name)
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
        params=arguments,
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


__all__ = ["DEFAULT_PACKAGE", "DEFAULT_WAIT_TIMEOUT_S", "SubmitResult", "compile_pipeline",
           "submit_pipeline"]
