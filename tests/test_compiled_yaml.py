"""The compiled YAML itself, run under kfp.local: what a cluster receives, executed.

``--local`` calls the pipeline function and the compile tests read the YAML; here the CLI
compiles, ``kfp.components.load_component_from_file`` loads the YAML back and kfp.local's
SubprocessRunner runs it, so the IR's executors, parameter passing and ``dsl.If`` are
exercised before a cluster sees them. The smallest settings that still register a model:
MobileNet v1-0.25 at 32 px, one epoch on cached features, gate threshold 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from pipeline.lib.credentials import MLFLOW_CONFIG_MAP
from tests.support.cli_helpers import V1_BACKBONE, clean_env, set_flags
from tests.support.paths import PROJECT_ROOT

pytestmark = pytest.mark.slow

TINY = (*V1_BACKBONE, "epochs=1", "image_size=32", "head_feature_views=1", "gate_threshold=0")


def compile_with_cli(workdir: Path, *args: str) -> Path:
    """``python pipeline.py --compile`` as a user would; the YAML it wrote."""
    package = workdir / "pipeline.yaml"
    done = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "pipeline.py"), "--compile", "-o", str(package),
         "--allow-placeholder-images", *args],
        cwd=workdir, env=clean_env(PYTHONPATH=str(PROJECT_ROOT)), capture_output=True,
        text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return package


def run_compiled(package: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch,
                 **arguments: Any) -> Any:
    """The YAML loaded back as a component and run by kfp.local's SubprocessRunner.

    The executors' ``python3`` is this interpreter, importing this checkout's ``pipeline``;
    no MLflow or IRIS_* setting of this machine reaches them.
    """
    from kfp import components, local

    for name in [n for n in os.environ if n.startswith(("MLFLOW_", "IRIS_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PYTHONPATH", str(PROJECT_ROOT))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    monkeypatch.chdir(workdir)
    local.init(runner=local.SubprocessRunner(use_venv=False),
               pipeline_root=str(workdir / "runs"), enable_caching=False)
    pipeline = components.load_component_from_file(str(package))
    return pipeline(**arguments)


def test_the_compiled_default_dag_runs_and_registers_a_champion(
        tmp_path: Path, iris_zip: Path, mobilenet_weights: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    name = f"compiled-{uuid.uuid4().hex[:8]}"
    package = compile_with_cli(tmp_path, "--data", str(iris_zip), *set_flags(
        *TINY, f"weights={mobilenet_weights}", f"registered_model_name={name}"))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    task = run_compiled(package, tmp_path, monkeypatch, tracking_uri=tracking_uri)

    assert task.outputs["gate_passed"] is True
    client = MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "1"
    train = client.get_run(champion.run_id)
    assert train.data.tags["kfp.step"] == "train"
    assert train.data.params["image_size"] == "32"  # the compiled-in default reached the step
    parent = client.get_run(train.data.tags["mlflow.parentRunId"])
    steps = client.search_runs([parent.info.experiment_id],
                               f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert {run.data.tags["kfp.step"] for run in steps} == {"train", "evaluate", "register"}
    assert MLFLOW_CONFIG_MAP in package.read_text()  # the cluster's YAML, not a local variant


def test_a_compiled_two_trial_sweep_registers_the_trial_best_on_validation(
        tmp_path: Path, iris_zip: Path, mobilenet_weights: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.tracking import MlflowClient

    name = f"compiled-sweep-{uuid.uuid4().hex[:8]}"
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("trials:\n  - {head_c: 0.0001}\n  - {head_c: 1.0}\n")
    package = compile_with_cli(tmp_path, "--data", str(iris_zip), "--sweep", str(sweep),
                               *set_flags(*TINY, f"weights={mobilenet_weights}",
                                          f"registered_model_name={name}"))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    task = run_compiled(package, tmp_path, monkeypatch, tracking_uri=tracking_uri)

    assert task.outputs["gate_passed"] is True
    client = MlflowClient(tracking_uri)
    champion = client.get_model_version_by_alias(name, "champion")
    parent_id = client.get_run(champion.run_id).data.tags["mlflow.parentRunId"]
    trains = client.search_runs([client.get_run(parent_id).info.experiment_id],
                                f"tags.`mlflow.parentRunId` = '{parent_id}' "
                                "AND tags.`kfp.step` = 'train'")
    assert len(trains) == 2
    assert {run.data.params["head_c"] for run in trains} == {"0.0001", "1.0"}
    val = {run.info.run_id: run.data.metrics["model_val_balanced_accuracy"] for run in trains}
    (winner,) = [run for run in trains if run.data.tags["sweep.chosen"] == "true"]
    assert val[winner.info.run_id] == max(val.values())
    assert champion.run_id == winner.info.run_id
