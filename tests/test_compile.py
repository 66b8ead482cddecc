"""Compile test: the IR YAML's tasks, images, GPU, retries, caching, resources and parameters."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2

from pipeline.config import PipelineConfig, load_images
from pipeline.dag import create_pipeline
from pipeline.runners import compile_pipeline
from pipeline.stepspec import STEP_SPECS
from pipeline.sweep import build_sweep
from pipeline.tasks import (
    CACHED_STEPS,
    DOWNLOAD_RETRIES,
    GPU_STEP,
    MLFLOW_CONFIG_MAP,
    MLFLOW_SECRET_KEYS,
    STEP_FUNCTIONS,
    STEPS,
    TASK_NAMES,
    TASK_RESOURCES,
    TRACKING_STEPS,
    build_components,
)

SECRET = "mlflow-credentials"
#: Steps only a sweep's DAG has: those whose component takes a list of trained models.
SWEEP_STEPS = frozenset({name for name, spec in STEP_SPECS.items()
                         if "trained_models" in inspect.signature(spec.component).parameters})
ROOT_TASKS = {"download-dataset", "preprocess-dataset", "train-model", "evaluate-model"}
KFP_TYPES = {str: "STRING", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", bool: "BOOLEAN"}


def _load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    docs = list(yaml.safe_load_all(path.read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    path = compile_pipeline(tmp_path_factory.mktemp("compile") / "pipeline.yaml",
                            mlflow_secret=SECRET)
    return _load(path)


@pytest.fixture(scope="module")
def spec(compiled: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    return compiled[0]


def _tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every container task by name, including those inside the gate's sub-DAG."""
    tasks: dict[str, dict[str, Any]] = {}
    for component in [spec["root"], *spec["components"].values()]:
        for name, task in component.get("dag", {}).get("tasks", {}).items():
            if not spec["components"][task["componentRef"]["name"]].get("dag"):
                tasks[name] = task
    return tasks


def _executor(spec: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    label = spec["components"][task["componentRef"]["name"]]["executorLabel"]
    return spec["deploymentSpec"]["executors"][label]["container"]


def test_yaml_parses_back_into_kfp_protobufs(compiled: tuple[dict, dict]) -> None:
    spec, platform = compiled
    parsed = json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())
    assert parsed.pipeline_info.name == "iris-image-pipeline"
    assert set(parsed.root.dag.tasks) == ROOT_TASKS | {"condition-1"}
    platform_spec = json_format.ParseDict(platform["platforms"]["kubernetes"],
                                          pipeline_spec_pb2.SinglePlatformSpec())
    assert set(platform_spec.deployment_spec.executors) == {
        "exec-train-model", "exec-evaluate-model", "exec-register-model"}


def test_task_names_and_gate(spec: dict[str, Any]) -> None:
    assert set(_tasks(spec)) == {TASK_NAMES[step] for step in STEPS if step not in SWEEP_STEPS}
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == ROOT_TASKS | {"condition-1"}
    gate = root["condition-1"]
    assert gate["taskInfo"]["name"] == "gate-passed"
    assert gate["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--evaluate-model-Output'] == true")
    inner = spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"register-model"}


def test_images_per_task_come_from_images_json(spec: dict[str, Any]) -> None:
    images = load_images()
    for name, task in _tasks(spec).items():
        expected = images["gpu"] if name == TASK_NAMES[GPU_STEP] else images["cpu"]
        assert _executor(spec, task)["image"] == expected, name


def test_gpu_requested_by_train_only(spec: dict[str, Any]) -> None:
    for name, task in _tasks(spec).items():
        accelerator = _executor(spec, task)["resources"].get("accelerator")
        if name == "train-model":
            assert accelerator["resourceType"] == "nvidia.com/gpu"
            assert accelerator["resourceCount"] == "1"
        else:
            assert accelerator is None, name


def test_every_task_sets_cpu_and_memory_requests_and_limits(spec: dict[str, Any]) -> None:
    by_task = {TASK_NAMES[step]: res for step, res in TASK_RESOURCES.items()}
    for name, task in _tasks(spec).items():
        resources = _executor(spec, task)["resources"]
        expected = by_task[name]
        assert resources["resourceCpuRequest"] == expected.cpu_request, name
        assert resources["resourceCpuLimit"] == expected.cpu_limit, name
        assert resources["resourceMemoryRequest"] == expected.memory_request, name
        assert resources["resourceMemoryLimit"] == expected.memory_limit, name


def test_download_retries_with_backoff_and_nothing_else_retries(spec: dict[str, Any]) -> None:
    for name, task in _tasks(spec).items():
        if name == "download-dataset":
            policy = task["retryPolicy"]
            assert policy["maxRetryCount"] == DOWNLOAD_RETRIES > 0
            assert policy["backoffDuration"] == "30s"
            assert policy["backoffFactor"] == 2.0
            assert policy["backoffMaxDuration"] == "600s"
        else:
            assert "retryPolicy" not in task, name


def test_caching_on_for_download_and_preprocess_only(spec: dict[str, Any]) -> None:
    cached = {TASK_NAMES[step] for step in CACHED_STEPS}
    assert cached == {"download-dataset", "preprocess-dataset"}
    for name, task in _tasks(spec).items():
        assert task["cachingOptions"].get("enableCache", False) is (name in cached), name


def test_parameter_defaults_and_types_equal_the_config(spec: dict[str, Any]) -> None:
    params = spec["root"]["inputDefinitions"]["parameters"]
    defaults = PipelineConfig()
    types = PipelineConfig.field_types()
    assert set(params) == set(types) | {"tracking_uri"}
    for name, kind in types.items():
        assert params[name]["parameterType"] == KFP_TYPES[kind], name
        value = params[name]["defaultValue"]
        assert kind(value) == getattr(defaults, name) and value == getattr(defaults, name), name
    assert params["tracking_uri"]["defaultValue"] == ""


def test_each_task_gets_exactly_its_declared_config_fields(
        spec: dict[str, Any], sweep_spec: dict[str, Any]) -> None:
    """Every step (the sweep's select step in a sweep's DAG) gets the config fields its
    component declares, straight from the pipeline parameter; every field is read."""
    fields = set(PipelineConfig.field_names())
    used: set[str] = set()
    for func in STEP_FUNCTIONS:
        declared = set(inspect.signature(func).parameters) & fields
        task = _tasks(sweep_spec if func.__name__ in SWEEP_STEPS else spec)[
            TASK_NAMES[func.__name__]]
        inputs = task["inputs"]["parameters"]
        wired = {name for name in inputs if name in fields}
        assert wired == declared, func.__name__
        for name in wired:  # straight from the pipeline parameter of the same name
            source = inputs[name]["componentInputParameter"]
            assert source in (name, f"pipelinechannel--{name}"), (func.__name__, name)
        used |= declared
    assert used == fields, f"config fields no step reads: {sorted(fields - used)}"


def test_mlflow_credentials_only_from_the_named_secret(compiled: tuple[dict, dict]) -> None:
    spec, platform = compiled
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in TRACKING_STEPS - SWEEP_STEPS:
        config = executors[f"exec-{TASK_NAMES[step]}"]
        (secret,) = config["secretAsEnv"]
        assert secret["secretName"] == SECRET
        assert {m["secretKey"]: m["envVar"] for m in secret["keyToEnv"]} == {
            k: k for k in MLFLOW_SECRET_KEYS}
        (config_map,) = config["configMapAsEnv"]
        assert config_map["configMapName"] == MLFLOW_CONFIG_MAP and config_map["optional"]
    for task in _tasks(spec).values():
        env = {e["name"] for e in _executor(spec, task).get("env", [])}
        assert not env & {*MLFLOW_SECRET_KEYS, "MLFLOW_TRACKING_URI"}


def test_no_secret_unless_configured(tmp_path: Path) -> None:
    _, platform = _load(compile_pipeline(tmp_path / "p.yaml", mlflow_config_map=None))
    executors = platform.get("platforms", {}).get("kubernetes", {}).get(
        "deploymentSpec", {}).get("executors", {})
    assert all("secretAsEnv" not in e and "configMapAsEnv" not in e
               for e in executors.values())
    assert set(executors) == {"exec-train-model"}  # only the GPU toleration is left


def test_compile_time_overrides_become_defaults(tmp_path: Path) -> None:
    config = PipelineConfig.from_mapping({"epochs": "3", "gate_threshold": "0.7"})
    spec, _ = _load(compile_pipeline(tmp_path / "p.yaml", config=config,
                                     tracking_uri="http://mlflow:5000"))
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["epochs"]["defaultValue"] == 3
    assert params["gate_threshold"]["defaultValue"] == 0.7
    assert params["tracking_uri"]["defaultValue"] == "http://mlflow:5000"


def test_images_are_chosen_when_the_pipeline_is_built() -> None:
    components = build_components({"cpu": "registry.example/cpu:1",
                                   "gpu": "registry.example/gpu:1"})
    images = {step: c.component_spec.implementation.container.image
              for step, c in components.items()}
    assert images == {step: ("registry.example/gpu:1" if step == GPU_STEP
                             else "registry.example/cpu:1") for step in TASK_NAMES}


def test_rejects_negative_retries_and_bad_package_names(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="download_retries"):
        create_pipeline(download_retries=-1)
    with pytest.raises(ValueError, match=r"\.yaml"):
        compile_pipeline(tmp_path / "pipeline.json")


def test_compiling_twice_gives_identical_yaml(tmp_path: Path) -> None:
    """The submit path names versions by content hash, which needs a deterministic compile."""
    first = compile_pipeline(tmp_path / "a.yaml").read_bytes()
    second = compile_pipeline(tmp_path / "b.yaml").read_bytes()
    assert first == second
    assert next(yaml.safe_load_all(first))["pipelineInfo"]["name"] == "iris-image-pipeline"


def test_every_config_field_reaches_some_component() -> None:
    """A config field no component declares would be a pipeline parameter that does nothing."""
    declared = {name for func in STEP_FUNCTIONS for name in inspect.signature(func).parameters}
    unused = sorted(set(PipelineConfig.field_names()) - declared)
    assert not unused, f"config fields no component consumes: {unused}"


# --- a sweep: ParallelFor over train, Collected into select, the winner evaluated -----------
SWEEP = {"parallelism": 2, "trials": [{"backbone": "mobilenet_v2", "alpha": 0.5},
                                     {"backbone": "mobilenet", "alpha": 0.25}],
         "grid": {"image_size": [224, 320]}}


@pytest.fixture(scope="module")
def sweep_spec(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    sweep = build_sweep(SWEEP, PipelineConfig())
    path = compile_pipeline(tmp_path_factory.mktemp("sweep") / "pipeline.yaml",
                            mlflow_secret=SECRET, sweep=sweep)
    return _load(path)[0]


def test_a_sweep_compiles_to_a_parallel_for_over_train_with_its_trials(
        sweep_spec: dict[str, Any]) -> None:
    json_format.ParseDict(sweep_spec, pipeline_spec_pb2.PipelineSpec())  # valid IR
    root = sweep_spec["root"]["dag"]["tasks"]
    (loop_name,) = [name for name in root if name.startswith("for-loop")]
    loop = root[loop_name]
    assert loop["iteratorPolicy"]["parallelismLimit"] == 2
    items = json.loads(loop["parameterIterator"]["items"]["raw"])
    assert items == [
        {"alpha": 0.5, "backbone": "mobilenet_v2", "image_size": 224},
        {"alpha": 0.5, "backbone": "mobilenet_v2", "image_size": 320},
        {"alpha": 0.25, "backbone": "mobilenet", "image_size": 224},
        {"alpha": 0.25, "backbone": "mobilenet", "image_size": 320},
    ]
    inner = sweep_spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"train-model"}
    wired = inner["train-model"]["inputs"]["parameters"]
    for key in ("alpha", "backbone", "image_size"):  # from the loop item, not the parameter
        assert wired[key]["parameterExpressionSelector"] == f'parseJson(string_value)["{key}"]'
    assert wired["epochs"]["componentInputParameter"] == "pipelinechannel--epochs"


def test_the_sweep_only_steps_and_fields_are_the_select_steps() -> None:
    """stepspec's sweep-only steps are those whose component takes the trained trials, and
    the fields only they read are the ones a single run leaves off its MLflow runs."""
    from pipeline import stepspec

    assert stepspec.SWEEP_STEPS == SWEEP_STEPS
    assert {"sweep_choice"} == stepspec.SWEEP_ONLY_FIELDS


def test_a_sweep_evaluates_only_the_trial_select_chose(sweep_spec: dict[str, Any]) -> None:
    root = sweep_spec["root"]["dag"]["tasks"]
    assert set(_tasks(sweep_spec)) == set(TASK_NAMES.values())
    select = root["select-model"]["inputs"]["artifacts"]["trained_models"]
    assert select["taskOutputArtifact"]["producerTask"].startswith("for-loop")
    for consumer in ("evaluate-model",):
        source = root[consumer]["inputs"]["artifacts"]["trained_model"]["taskOutputArtifact"]
        assert source == {"outputArtifactKey": "selected_model", "producerTask": "select-model"}
    assert "trained_model" not in root["evaluate-model"]["inputs"].get("parameters", {})


def test_select_and_trained_trials_read_mlflow_settings_like_the_other_steps(
        tmp_path: Path) -> None:
    path = compile_pipeline(tmp_path / "p.yaml", mlflow_secret=SECRET,
                            sweep=build_sweep(SWEEP, PipelineConfig()))
    executors = _load(path)[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in TRACKING_STEPS:
        (secret,) = executors[f"exec-{TASK_NAMES[step]}"]["secretAsEnv"]
        assert secret["secretName"] == SECRET, step


def test_the_test_sessions_kfp_stack_names_the_callers_inspect_names() -> None:
    """tests/support/kfp_stack.py stands in for ``inspect.stack()`` in kfp's pipeline tasks
    (the compile tests' speed): same frames, files, lines and function names."""
    from kfp.dsl import pipeline_task

    from tests.support.kfp_stack import stack

    assert pipeline_task.inspect.stack is stack
    cheap, real = stack(), inspect.stack()
    assert len(cheap) == len(real)
    for ours, theirs in zip(cheap[1:], real[1:], strict=True):
        assert (ours.frame, ours.lineno, ours.function) == (
            theirs.frame, theirs.lineno, theirs.function)
        assert Path(ours.filename).resolve() == Path(theirs.filename).resolve()
    assert cheap[0].function == real[0].function == inspect.currentframe().f_code.co_name
