"""Task settings of the DAG: the components, images, resources, caching, retries, secrets.

Kept apart from ``dag.py`` so the DAG itself reads in one screen; everything here is how a
task runs on a cluster, not what the pipeline computes. What each step needs (resources,
cache, GPU, MLflow, data access) is its entry in ``pipeline/stepspec.py``; this module turns
those entries into KFP task settings.
"""

from collections.abc import Callable, Mapping
from typing import Any

from kfp import dsl, kubernetes

from pipeline.config import load_images
from pipeline.lib.credentials import DATA_SECRET_KEYS, MLFLOW_CONFIG_MAP
from pipeline.stepspec import STEP_SPECS, Resources

#: Component bodies in step order; each becomes a component at pipeline-construction time.
STEP_FUNCTIONS: tuple[Callable[..., Any], ...] = tuple(s.component for s in STEP_SPECS.values())
STEPS: tuple[str, ...] = tuple(STEP_SPECS)
#: KFP task names (component names, dashed) by step.
TASK_NAMES: dict[str, str] = {name: spec.task for name, spec in STEP_SPECS.items()}
TASK_RESOURCES: dict[str, Resources] = {name: spec.resources for name, spec in STEP_SPECS.items()}

#: The one step that wants the GPU image and an NVIDIA GPU.
(GPU_STEP,) = (name for name, spec in STEP_SPECS.items() if spec.gpu)
GPU_RESOURCE = "nvidia.com/gpu"

#: Steps whose outputs depend only on their inputs: safe to serve from the cache. Training,
#: evaluation and registration stay uncached: each pipeline run must log its own MLflow runs,
#: and registration compares against whatever the registry's champion is *now*.
CACHED_STEPS = frozenset(name for name, spec in STEP_SPECS.items() if spec.cached)

#: Steps that talk to MLflow and so get its settings (ConfigMap) and credentials (Secret).
TRACKING_STEPS = frozenset(name for name, spec in STEP_SPECS.items() if spec.tracking)

#: Pipeline parameters that are not config fields: where MLflow lives.
TRACKING_URI_PARAM = "tracking_uri"

#: Task-level retries of the download (pod eviction, node loss, registry hiccups). Transient
#: network errors are already retried inside ``fetch_dataset``; these re-run the whole pod.
DOWNLOAD_RETRIES = 3
RETRY_BACKOFF = "30s"
RETRY_BACKOFF_FACTOR = 2.0
RETRY_BACKOFF_MAX = "600s"

MLFLOW_CONFIG_MAP_KEYS = ("MLFLOW_TRACKING_URI",)
#: Keys of the Secret (e.g. ``mlflow-credentials``) mapped to same-named environment variables.
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def context_inputs(pipeline_name: str) -> dict[str, Any]:
    """Run-context inputs the DAG fills in itself (never pipeline parameters)."""
    return {"pipeline_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER, "pipeline_name": pipeline_name}


def build_components(images: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One KFP component per step, on the CPU image except the GPU step.

    Built here rather than with a decorator at import time so importing ``components`` reads
    no configuration; ``install_kfp_package=False`` because our images already ship kfp.
    """
    images = dict(images) if images is not None else load_images()
    return {
        name: dsl.component(spec.component, base_image=images["gpu" if spec.gpu else "cpu"],
                            install_kfp_package=False)
        for name, spec in STEP_SPECS.items()
    }


def configure_task(task: dsl.PipelineTask, step: str, *, download_retries: int,
                   mlflow_secret: str | None, mlflow_config_map: str | None,
                   data_secret: str | None = None) -> None:
    spec = STEP_SPECS[step]
    resources = spec.resources
    task.set_cpu_request(resources.cpu_request).set_cpu_limit(resources.cpu_limit)
    task.set_memory_request(resources.memory_request).set_memory_limit(resources.memory_limit)
    task.set_caching_options(enable_caching=spec.cached)
    # Stream Python output (Keras progress, logs) as it happens, locally and in pod logs.
    task.set_env_variable("PYTHONUNBUFFERED", "1")
    if spec.gpu:
        task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(1)
        kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    if spec.fetches and download_retries > 0:
        task.set_retry(num_retries=download_retries, backoff_duration=RETRY_BACKOFF,
                       backoff_factor=RETRY_BACKOFF_FACTOR, backoff_max_duration=RETRY_BACKOFF_MAX)
    if spec.fetches and data_secret:
        # optional: a Secret holds basic auth or object-store keys, rarely both.
        kubernetes.use_secret_as_env(task, data_secret, {key: key for key in DATA_SECRET_KEYS},
                                     optional=True)
    if spec.tracking:
        if mlflow_config_map:
            kubernetes.use_config_map_as_env(
                task, mlflow_config_map, {key: key for key in MLFLOW_CONFIG_MAP_KEYS}, optional=True
            )
        if mlflow_secret:
            kubernetes.use_secret_as_env(
                task, mlflow_secret, {key: key for key in MLFLOW_SECRET_KEYS}
            )


class TaskFactory:
    """Adds a step's task to the DAG being built, with its arguments and cluster settings.

    Each task receives exactly the parameters its component declares, matched by name among
    the pipeline's parameters, the given artifacts and the run-context inputs; a declared
    input found nowhere is an error at pipeline construction, not a silent default.
    """

    def __init__(self, pipeline_name: str, images: Mapping[str, str] | None = None, *,
                 download_retries: int = DOWNLOAD_RETRIES, mlflow_secret: str | None = None,
                 mlflow_config_map: str | None = MLFLOW_CONFIG_MAP,
                 data_secret: str | None = None) -> None:
        if download_retries < 0:
            raise ValueError(f"download_retries must be >= 0, got {download_retries}")
        self.pipeline_name = pipeline_name
        self.components = build_components(images)
        self.settings = dict(download_retries=download_retries, mlflow_secret=mlflow_secret,
                             mlflow_config_map=mlflow_config_map, data_secret=data_secret)

    def __call__(self, step: str, params: Mapping[str, Any], **artifacts: Any) -> dsl.PipelineTask:
        component = self.components[step]
        context = context_inputs(self.pipeline_name)
        arguments = dict(artifacts)
        for name in component.component_spec.inputs or {}:
            if name in artifacts:
                continue
            if name in params:
                arguments[name] = params[name]
            elif name in context:
                arguments[name] = context[name]
            else:
                raise ValueError(f"component {step!r} declares input {name!r}, which is neither "
                                 "a pipeline parameter nor a run-context input")
        task = component(**arguments)
        configure_task(task, step, **self.settings)
        return task


__all__ = [
    "CACHED_STEPS",
    "DOWNLOAD_RETRIES",
    "GPU_STEP",
    "MLFLOW_CONFIG_MAP",
    "MLFLOW_SECRET_KEYS",
    "STEPS",
    "STEP_FUNCTIONS",
    "TASK_NAMES",
    "TASK_RESOURCES",
    "TRACKING_STEPS",
    "TRACKING_URI_PARAM",
    "Resources",
    "TaskFactory",
    "build_components",
    "configure_task",
    "context_inputs",
]
