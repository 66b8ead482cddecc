"""End to end against a real ``mlflow server``: ``pipeline.py --local`` runs, then MlflowClient."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import __version__
from pipeline.config import PipelineConfig
from pipeline.lib import tracking_log, tracking_runs, tracking_store
from pipeline.stepspec import SWEEP_ONLY_FIELDS
from tests.support.cli_helpers import V1_BACKBONE, CliRun, clean_env, run_local_cli, succeeded
from tests.support.mlflow_server import MlflowServer

#: The session's server is shared with other modules: this module's names are its own.
SUFFIX = uuid.uuid4().hex[:8]
MODEL_NAME = f"iris-e2e-{SUFFIX}"
EXPERIMENT = f"iris-e2e-{SUFFIX}"
#: Steps that open an MLflow run (download and preprocess do not track).
TRACKED_STEPS = {"train", "evaluate", "register"}
#: Per-epoch metrics the training step's callback logs, by their MLflow names (the learning
#: rate, ``train/learning_rate``, only once it changes: none without fine-tuning).
EPOCH_METRICS = ("train/loss", "train/accuracy", "val/loss", "val/accuracy")
#: The bound issue 5 sets for an unreachable server, subprocess start included.
FAIL_FAST_BOUND_S = 60.0

pytestmark = [pytest.mark.slow, pytest.mark.mlflow_server]


def _run_cli(workdir: Path, *args: str, env: dict[str, str] | None = None,
             timeout: float = 600) -> CliRun:
    """``python pipeline.py --local`` in ``workdir`` (outputs and kfp cache in workdir/out)."""
    return run_local_cli(workdir, "--output-dir", str(workdir / "out"), *args, env=env,
                         timeout=timeout)


#: The first run must clearly beat the second; both train the head epoch by epoch
#: (head_feature_views=0) so epochs and learning rate decide, and every epoch is logged.
FIRST_RUN = ("head_feature_views=0", "epochs=6", "learning_rate=0.003")
#: One epoch at a learning rate too small to move the new head: near-initial predictions.
SECOND_RUN = ("head_feature_views=0", "epochs=1", "learning_rate=1e-07")


def _args(iris_zip: Path, weights: Path, *sets: str, model_name: str = MODEL_NAME) -> list[str]:
    """Small images, offline weights, gate 0 (the register step runs); ``sets`` override."""
    base = ["image_size=96", f"weights={weights}", *V1_BACKBONE, "gate_threshold=0",
            f"registered_model_name={model_name}", f"experiment_name={EXPERIMENT}"]
    args = ["--data", str(iris_zip)]
    for item in (*base, *sets):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow-e2e")


@pytest.fixture(scope="module")
def client(mlflow_server: MlflowServer) -> Any:
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server.url)


@pytest.fixture(scope="module")
def first_run(mlflow_server: MlflowServer, workdir: Path, iris_zip: Path,
              mobilenet_weights: Path) -> CliRun:
    return _run_cli(workdir, "--tracking-uri", mlflow_server.url,
                    *_args(iris_zip, mobilenet_weights, *FIRST_RUN))


@dataclass
class PluginRun:
    run: CliRun
    given_run_id: str
    experiment_id: str


@pytest.fixture(scope="module")
def second_run(first_run: CliRun, mlflow_server: MlflowServer, workdir: Path, client: Any,
               iris_zip: Path, mobilenet_weights: Path) -> PluginRun:
    """The lower-scoring second run, made the way the KFP backend's MLflow plugin runs steps.

    One pipeline run serves two checks (challenger alias, plugin environment) to keep this
    module's runtime down: the plugin creates the run and passes MLFLOW_TRACKING_URI,
    MLFLOW_EXPERIMENT_ID and MLFLOW_RUN_ID; no --tracking-uri is given.
    """
    succeeded(first_run)  # its experiment exists and its cache serves download and preprocess
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    given = client.create_run(experiment_id, run_name="kfp-plugin-run").info.run_id
    env = clean_env(MLFLOW_TRACKING_URI=mlflow_server.url, MLFLOW_EXPERIMENT_ID=experiment_id,
                     MLFLOW_RUN_ID=given)
    run = _run_cli(workdir, *_args(iris_zip, mobilenet_weights, *SECOND_RUN), env=env)
    return PluginRun(run, given, experiment_id)


def _child_runs(client: Any, parent_id: str) -> dict[str, Any]:
    runs = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`{tracking_log.TAG_PARENT}` = '{parent_id}'")
    return {run.data.tags[tracking_runs.TAG_STEP]: run for run in runs}


def _gate_value(client: Any, run: CliRun) -> float:
    """The gate metric as logged on the MLflow parent run (evaluate logs it there too)."""
    summary = succeeded(run)
    metric = summary["gate"]["metric"]
    return float(client.get_run(summary["mlflow"]["run_id"]).data.metrics[metric])


# --- 1: parent, children, params, metric history, artifacts, registry -----------------------


def test_parent_run_is_tagged_and_has_every_config_param(first_run: CliRun, client: Any) -> None:
    summary = succeeded(first_run)
    parent = client.get_run(summary["mlflow"]["run_id"])
    tags = parent.data.tags
    assert tracking_log.TAG_PARENT not in tags  # a top-level run
    assert tags[tracking_runs.TAG_RUN_KIND] == "pipeline"
    assert tags[tracking_runs.TAG_PIPELINE_NAME] == summary["pipeline"]
    assert tags[tracking_runs.TAG_PACKAGE_VERSION] == __version__
    kfp_run_id = tags[tracking_runs.TAG_PIPELINE_RUN_ID]
    assert kfp_run_id and "{{" not in kfp_run_id  # the placeholder was filled in locally
    assert re.fullmatch(r"[0-9a-f]{40}", tags.get(tracking_runs.TAG_GIT_COMMIT, "")), tags
    assert client.get_experiment(parent.info.experiment_id).name == EXPERIMENT
    assert parent.info.status == "FINISHED"

    params = parent.data.params
    missing = set(PipelineConfig.field_names()) - SWEEP_ONLY_FIELDS - set(params)
    assert not missing, f"config fields not logged on the parent run: {sorted(missing)}"
    for name, value in summary["config"].items():
        if name not in SWEEP_ONLY_FIELDS:  # a single run: no select step to read them
            assert params[name] == str(value), name
    assert (params["epochs"], params["image_size"]) == ("6", "96")
    assert params["registered_model_name"] == MODEL_NAME


def test_one_nested_run_per_tracked_step(first_run: CliRun, client: Any) -> None:
    summary = succeeded(first_run)
    parent_id = summary["mlflow"]["run_id"]
    children = _child_runs(client, parent_id)
    assert set(children) == TRACKED_STEPS
    kfp_run_id = client.get_run(parent_id).data.tags[tracking_runs.TAG_PIPELINE_RUN_ID]
    for step, run in children.items():
        assert run.data.tags[tracking_runs.TAG_PIPELINE_RUN_ID] == kfp_run_id, step
        assert run.data.tags[tracking_runs.TAG_RUN_KIND] == "step", step
        assert run.info.status == "FINISHED", step
    assert {step: children[step].info.run_id for step in TRACKED_STEPS} == \
        summary["mlflow"]["step_run_ids"]
    # exactly one parent for this KFP run id: the steps found it instead of each making one
    parents = client.search_runs(
        [client.get_run(parent_id).info.experiment_id],
        filter_string=f"tags.`{tracking_runs.TAG_PIPELINE_RUN_ID}` = '{kfp_run_id}' "
                      f"AND tags.`{tracking_runs.TAG_RUN_KIND}` = 'pipeline'")
    assert [run.info.run_id for run in parents] == [parent_id]


def test_epoch_metric_history_matches_epochs_run(first_run: CliRun, client: Any) -> None:
    summary = succeeded(first_run)
    train_id = summary["mlflow"]["step_run_ids"]["train"]
    epochs_run = int(client.get_run(train_id).data.tags["train.epochs_run"])
    history = json.loads((Path(summary["outputs"]["trained_model"]) / "history.json").read_text())
    assert epochs_run == len(history)
    assert 1 <= epochs_run <= 6  # epochs=6 (early stopping may end sooner)
    for key in EPOCH_METRICS:
        points = client.get_metric_history(train_id, key)
        assert sorted(p.step for p in points) == list(range(1, epochs_run + 1)), key
    losses = [p.value for p in sorted(client.get_metric_history(train_id, "train/loss"),
                                      key=lambda p: p.step)]
    assert losses == pytest.approx([entry["loss"] for entry in history], rel=1e-5)
    assert client.get_metric_history(train_id, "train/learning_rate") == []  # the param only


def test_what_the_mlflow_ui_shows(first_run: CliRun, client: Any) -> None:
    """Read back, through MLflow's API, what the UI renders for a pipeline run.

    The experiment opens on training runs (not the GenAI overview) with a description; the
    run list names parents by what differs; the train run has curves and its params.
    FIRST_RUN trains the head on images (head_feature_views=0); the default head's
    per-epoch curves (Keras epochs on cached features) are checked in tests/test_train.py.
    """
    summary = succeeded(first_run)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.tags["mlflow.note.content"] == tracking_store.EXPERIMENT_DESCRIPTION

    parent = client.get_run(summary["mlflow"]["run_id"])
    assert re.fullmatch(r"mobilenet a0\.25 96px avg · iris-image\.zip · "
                        r"\d\d-\d\d \d\d:\d\d", parent.info.run_name), parent.info.run_name
    assert parent.data.tags["mlflow.source.type"] == "JOB"
    assert parent.data.tags["mlflow.source.name"].startswith(summary["pipeline"])
    children = _child_runs(client, parent.info.run_id)
    assert {step: run.info.run_name for step, run in children.items()} == {
        step: step for step in TRACKED_STEPS}

    train = children["train"]
    for key in EPOCH_METRICS:
        assert len(client.get_metric_history(train.info.run_id, key)) >= 5, key
    params = train.data.params  # the train step's own config fields, as on the parent
    assert params.items() <= parent.data.params.items()
    assert {"model", "alpha", "image_size", "epochs", "learning_rate", "data_source"} <= set(
        params), sorted(params)
    assert params["epochs"] == "6"


def test_artifacts_dataset_and_test_metrics_are_logged(first_run: CliRun, client: Any) -> None:
    summary = succeeded(first_run)
    ids = summary["mlflow"]["step_run_ids"]

    def files(run_id: str, path: str = "") -> set[str]:
        found: set[str] = set()
        for info in client.list_artifacts(run_id, path or None):
            found |= files(run_id, info.path) if info.is_dir else {info.path}
        return found

    assert {"data_report.json", "augmentation_preview.png"} <= files(ids["train"])
    assert {"training_curves.png", "confusion_matrix.png", "report.html",
            "metrics.json", "predictions.csv"} <= files(ids["evaluate"])
    report = client.download_artifacts(ids["evaluate"], "report.html")
    assert "<html" in Path(report).read_text().lower()

    train = client.get_run(ids["train"])
    (dataset_input,) = train.inputs.dataset_inputs
    assert dataset_input.dataset.source and "iris-image.zip" in dataset_input.dataset.source
    assert dataset_input.dataset.digest

    parent = client.get_run(summary["mlflow"]["run_id"]).data.metrics
    assert {"balanced_accuracy_ci_low", "balanced_accuracy_ci_high"} <= set(summary[
        "test_metrics"])
    for name, value in summary["test_metrics"].items():
        assert parent[name] == pytest.approx(value), name
    assert any(name.startswith("majority_baseline") or name.startswith("baseline")
               for name in parent), sorted(parent)


def test_model_is_logged_with_signature_and_registered_as_champion(
        first_run: CliRun, client: Any) -> None:
    import mlflow

    summary = succeeded(first_run)
    registration = summary["registration"]
    assert registration["registered"] is True
    assert (registration["name"], registration["version"], registration["alias"]) == (
        MODEL_NAME, "1", "champion")
    version = client.get_model_version_by_alias(MODEL_NAME, "champion")
    assert version.version == "1"
    assert version.run_id == summary["mlflow"]["step_run_ids"]["train"]
    logged_uri = summary["mlflow"]["logged_model_uri"]
    logged = client.get_logged_model(logged_uri.split("/")[-1])
    assert logged.source_run_id == version.run_id
    mlflow.set_tracking_uri(client.tracking_uri)
    info = mlflow.models.get_model_info(f"models:/{MODEL_NAME}/1")
    assert info.signature.outputs.input_names() == ["label", *summary["classes"]]
    assert info.metadata["classes"] == summary["classes"]
    assert re.fullmatch(r"iris-mobilenet-a0_25-96px-seed42-[0-9a-f]{6}", logged.name)
    # the evaluate step's test metrics are linked to the logged model, with the data set
    linked = {m.key: m for m in logged.metrics}
    for name, value in summary["test_metrics"].items():
        assert linked[name].value == pytest.approx(value), name
        assert linked[name].run_id == summary["mlflow"]["step_run_ids"]["evaluate"]
        assert linked[name].dataset_name == "iris-image" and linked[name].dataset_digest
    decision = client.get_run(summary["mlflow"]["step_run_ids"]["register"]).data.tags
    assert decision["registry.decision"] == "champion"
    assert decision["registry.version"] == "1"


# --- 2: the champion through pyfunc on raw uint8 images -------------------------------------


def test_champion_labels_raw_uint8_images_of_odd_sizes(first_run: CliRun, client: Any) -> None:
    import keras
    import mlflow

    from pipeline.lib import images

    summary = succeeded(first_run)
    classes = summary["classes"]
    mlflow.set_tracking_uri(client.tracking_uri)
    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
    trained = keras.saving.load_model(
        Path(summary["outputs"]["trained_model"]) / "model.keras", compile=False)
    resizer = images.make_resizer(summary["config"]["image_size"])
    rng = np.random.default_rng(0)
    for shape in ((3, 37, 53, 3), (1, 301, 97, 3)):
        raw = rng.integers(0, 256, size=shape, dtype=np.uint8)
        predicted = loaded.predict(raw)
        assert list(predicted.columns) == ["label", *classes]
        probabilities = predicted[classes].to_numpy()
        assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4), shape
        # the registered champion is the model this run trained, fed as training fed it
        fitted = np.stack([images.fit_image(image, resizer).numpy() for image in raw])
        expected = trained.predict(fitted, verbose=0)
        assert np.allclose(probabilities, expected, atol=1e-4), shape
        assert list(predicted["label"]) == [classes[k] for k in expected.argmax(axis=1)]


# --- 3: a lower-scoring second run becomes challenger ---------------------------------------


def test_lower_scoring_second_run_is_challenger_and_champion_stays(
        first_run: CliRun, second_run: PluginRun, client: Any) -> None:
    first, second = succeeded(first_run), succeeded(second_run.run)
    assert second["cached_steps"] == ["download-dataset", "preprocess-dataset"]
    assert second["mlflow"]["run_id"] != first["mlflow"]["run_id"]
    first_value = _gate_value(client, first_run)
    second_value = _gate_value(client, second_run.run)
    # the premise of this test, checked rather than assumed: a tie would also give
    # "challenger" (champion needs strictly better) and prove less
    assert second_value < first_value, (first_value, second_value)

    registration = second["registration"]
    assert (registration["version"], registration["alias"]) == ("2", "challenger")
    # same data and split: compared image by image, the difference's interval not above 0
    assert registration["comparison"]["method"] == "paired_bootstrap"
    assert registration["comparison"]["difference_ci_low"] <= 0
    assert registration["metric_value"] == pytest.approx(second_value)
    assert registration["champion_value"] == pytest.approx(first_value)
    assert client.get_model_version_by_alias(MODEL_NAME, "champion").version == "1"
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").version == "2"
    decision = client.get_run(second["mlflow"]["step_run_ids"]["register"]).data
    assert decision.tags["registry.decision"] == "challenger"
    metric = second["gate"]["metric"]
    assert decision.metrics[f"registry.champion_{metric}"] == pytest.approx(first_value)
    assert decision.metrics[f"registry.candidate_{metric}"] == pytest.approx(second_value)

    # both pipeline runs are top-level runs of the experiment, each with its config and
    # test metrics: what the MLflow UI compares side by side
    top = {run.info.run_id: run for run in client.search_runs([second_run.experiment_id])
           if tracking_log.TAG_PARENT not in run.data.tags}
    assert set(top) == {first["mlflow"]["run_id"], second["mlflow"]["run_id"]}
    for summary in (first, second):
        data = top[summary["mlflow"]["run_id"]].data
        assert data.params["learning_rate"] == str(summary["config"]["learning_rate"])
        assert data.metrics[metric] == pytest.approx(summary["test_metrics"][metric])


# --- 4: unreachable server ------------------------------------------------------------------


def test_unreachable_server_fails_fast_and_registers_nothing(
        first_run: CliRun, closed_port_uri: str, workdir: Path, client: Any,
        iris_zip: Path, mobilenet_weights: Path) -> None:
    succeeded(first_run)  # warm cache: download and preprocess are instant; train fails first
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs_before = len(client.search_runs([experiment.experiment_id], max_results=1000))
    versions_before = len(client.search_model_versions(f"name = '{MODEL_NAME}'"))

    run = _run_cli(workdir, "--tracking-uri", closed_port_uri,
                   *_args(iris_zip, mobilenet_weights, *SECOND_RUN), timeout=120)
    assert run.returncode == 1, run.stderr[-3000:]
    assert run.elapsed_s < FAIL_FAST_BOUND_S, f"took {run.elapsed_s:.1f} s"
    assert run.summary["status"] == "failed"
    assert run.summary["failed_step"] == "train-model"
    assert closed_port_uri in run.summary["error"]
    assert "TrackingServerError" in run.summary["error"]
    assert "step 'train-model' failed" in run.stderr and closed_port_uri in run.stderr
    run_dir = Path(run.summary["run_dir"])
    assert not list(run_dir.glob("train-model/**/model.keras")), "training started"
    assert not (run_dir / "register-model").exists()
    # nothing reached the real server either
    assert len(client.search_runs([experiment.experiment_id], max_results=1000)) == runs_before
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == versions_before
    print(f"fail-fast wall clock: {run.elapsed_s:.1f} s")


# --- 5: under the KFP MLflow plugin's environment -------------------------------------------


def test_plugin_environment_nests_steps_under_the_given_run(
        second_run: PluginRun, client: Any) -> None:
    summary = succeeded(second_run.run)
    given = second_run.given_run_id
    assert summary["mlflow"]["run_id"] == given
    children = _child_runs(client, given)
    assert set(children) == TRACKED_STEPS
    assert {s: r.info.run_id for s, r in children.items()} == summary["mlflow"]["step_run_ids"]
    assert {r.info.experiment_id for r in children.values()} == {second_run.experiment_id}
    kfp_run_id = children["train"].data.tags[tracking_runs.TAG_PIPELINE_RUN_ID]
    assert {r.data.tags[tracking_runs.TAG_PIPELINE_RUN_ID]
            for r in children.values()} == {kfp_run_id}
    # no parent of our own for this KFP run: the given run played it
    own = client.search_runs(
        [second_run.experiment_id],
        filter_string=f"tags.`{tracking_runs.TAG_PIPELINE_RUN_ID}` = '{kfp_run_id}' "
                      f"AND tags.`{tracking_runs.TAG_RUN_KIND}` = 'pipeline'")
    assert own == []
    given_run = client.get_run(given)
    assert given_run.data.tags[tracking_runs.TAG_PIPELINE_RUN_ID] == kfp_run_id
    assert given_run.data.tags[tracking_runs.TAG_PACKAGE_VERSION] == __version__
    assert not set(PipelineConfig.field_names()) - SWEEP_ONLY_FIELDS - set(given_run.data.params)
    assert given_run.data.params["epochs"] == "1"
    train_id = children["train"].info.run_id
    epochs_run = int(client.get_run(train_id).data.tags["train.epochs_run"])
    assert epochs_run == 1
    assert len(client.get_metric_history(train_id, "train/loss")) == epochs_run
    assert client.get_model_version_by_alias(MODEL_NAME, "challenger").run_id == train_id
