"""The register step against a real ``mlflow server``: gate, champion/challenger, rollback."""

from __future__ import annotations

import json
import uuid

import keras
import mlflow
import numpy as np
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow_server import MlflowServer, images

from pipeline.lib.model_logging import log_model
from pipeline.lib.tracking import step_run
from pipeline.steps.register import CHALLENGER, CHAMPION, champion_metric, register_model

pytestmark = [pytest.mark.mlflow_server, pytest.mark.usefixtures("clean_mlflow_state")]

CLASSES = ["iris-setosa", "iris-versicolour", "iris-virginica"]


@pytest.fixture(scope="module")
def model_uris(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, str]:
    """Three logged models (different seeds) and their keras files, logged once per module."""
    uris: dict[str, str] = {}
    for seed in (1, 2, 3):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input(shape=(None, None, 3), dtype="uint8")
        x = keras.layers.Resizing(12, 12)(inputs)
        x = keras.layers.Rescaling(1 / 255)(x)
        x = keras.layers.Flatten()(x)
        outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
        model = keras.Model(inputs, outputs)
        model_dir = tmp_path_factory.mktemp(f"model{seed}")
        model.save(model_dir / "model.keras")
        (model_dir / "classes.json").write_text(json.dumps(CLASSES))
        with step_run("train", tracking_uri=mlflow_server.url, experiment_name="registry-tests",
                      pipeline_run_id=f"kfp-{uuid.uuid4()}", pipeline_name="iris-test"):
            uris[f"m{seed}"] = log_model(model_dir, input_example=images(2, 16, 16))
        uris[f"keras{seed}"] = str(model_dir / "model.keras")
    return uris


def register_in_step(server: MlflowServer, model_uri: str, name: str, value: float,
                     gate_passed: bool = True, client: MlflowClient | None = None
                     ) -> tuple[dict, str]:
    """Run register_model inside a 'register' step run; returns (decision, step run id)."""
    with step_run("register", tracking_uri=server.url, experiment_name="registry-tests",
                  pipeline_run_id=f"kfp-{uuid.uuid4()}", pipeline_name="iris-test") as run:
        decision = register_model(model_uri, name=name, metric_name="balanced_accuracy",
                                  metric_value=value, gate_passed=gate_passed, client=client)
    return decision, run.info.run_id


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return dict(client.get_registered_model(name).aliases)


def test_champion_then_lower_challenger_then_higher_takes_over(
        mlflow_server: MlflowServer, model_uris: dict[str, str]) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url)

    first, run1 = register_in_step(mlflow_server, model_uris["m1"], name, 0.80)
    assert first["registered"] and first["alias"] == CHAMPION and first["version"] == "1"
    assert first["champion_value"] is None and first["model_uri"] == f"models:/{name}/1"
    assert aliases(client, name) == {CHAMPION: "1"}

    second, run2 = register_in_step(mlflow_server, model_uris["m2"], name, 0.70)
    assert second["alias"] == CHALLENGER and second["version"] == "2"
    assert second["champion_value"] == pytest.approx(0.80)
    assert aliases(client, name) == {CHAMPION: "1", CHALLENGER: "2"}
    logged = client.get_run(run2).data
    assert logged.tags["registry.decision"] == CHALLENGER
    assert logged.tags["registry.version"] == "2"
    assert "does not beat" in logged.tags["registry.reason"]
    assert logged.metrics["registry.candidate_balanced_accuracy"] == pytest.approx(0.70)
    assert logged.metrics["registry.champion_balanced_accuracy"] == pytest.approx(0.80)

    equal, _ = register_in_step(mlflow_server, model_uris["m3"], name, 0.80)
    assert equal["alias"] == CHALLENGER, "a tie does not displace the champion"

    third, _ = register_in_step(mlflow_server, model_uris["m3"], name, 0.90)
    assert third["alias"] == CHAMPION and third["previous_champion_version"] == "1"
    assert aliases(client, name) == {CHAMPION: "4", CHALLENGER: "3"}

    version = client.get_model_version(name, "4")
    assert version.tags["metric.balanced_accuracy"] == repr(0.90)
    assert version.run_id, "the version links to the run that logged the model"
    assert client.get_run(run1).data.tags["registry.decision"] == CHAMPION


def test_champion_alias_loads_and_predicts_on_raw_images(
        mlflow_server: MlflowServer, model_uris: dict[str, str]) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    register_in_step(mlflow_server, model_uris["m2"], name, 0.9)
    register_in_step(mlflow_server, model_uris["m1"], name, 0.5)  # challenger, not served

    mlflow.set_tracking_uri(mlflow_server.url)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    odd = images(2, 41, 29, seed=7)
    predicted = np.asarray(loaded.predict(odd))
    assert predicted.shape == (2, len(CLASSES))
    expected = keras.saving.load_model(model_uris["keras2"]).predict(odd, verbose=0)
    assert np.allclose(predicted, expected, atol=1e-4), "champion must be the m2 model"
    assert loaded.metadata.metadata["classes"] == CLASSES


def test_failed_gate_registers_nothing_and_says_why(
        mlflow_server: MlflowServer, model_uris: dict[str, str]) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url)
    decision, run_id = register_in_step(mlflow_server, model_uris["m1"], name, 0.31,
                                        gate_passed=False)
    assert decision["registered"] is False and decision["version"] is None
    assert decision["decision"] == "not_registered"
    assert "gate failed" in decision["reason"] and "0.3100" in decision["reason"]
    assert client.search_registered_models(filter_string=f"name = '{name}'") == []
    logged = client.get_run(run_id).data
    assert logged.tags["registry.decision"] == "not_registered"
    assert "gate failed" in logged.tags["registry.reason"]
    assert logged.metrics["registry.candidate_balanced_accuracy"] == pytest.approx(0.31)


def test_champion_metric_falls_back_to_the_run_metric(
        mlflow_server: MlflowServer, model_uris: dict[str, str]) -> None:
    """A champion registered by hand (no version tag) is judged by its run's metric."""
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url)
    logged = client.get_logged_model(model_uris["m1"].split("/")[-1])
    client.log_metric(logged.source_run_id, "balanced_accuracy", 0.75)
    client.create_registered_model(name)
    manual = client.create_model_version(name, source=model_uris["m1"],
                                         run_id=logged.source_run_id, model_id=logged.model_id)
    client.set_registered_model_alias(name, CHAMPION, manual.version)

    lower, _ = register_in_step(mlflow_server, model_uris["m2"], name, 0.74)
    assert lower["alias"] == CHALLENGER and lower["champion_value"] == pytest.approx(0.75)
    higher, _ = register_in_step(mlflow_server, model_uris["m3"], name, 0.76)
    assert higher["alias"] == CHAMPION
    assert aliases(client, name)[CHAMPION] == higher["version"]


class FailingAliasClient(MlflowClient):
    """A client whose alias update fails, to prove a failed registration leaves nothing."""

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        if getattr(self, "armed", True):
            self.armed = False  # let the rollback restore the old alias
            raise MlflowException("injected failure while moving the alias")
        super().set_registered_model_alias(name, alias, version)


def test_failure_mid_registration_leaves_no_half_registered_version(
        mlflow_server: MlflowServer, model_uris: dict[str, str]) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url)

    with pytest.raises(MlflowException, match="injected"):
        register_in_step(mlflow_server, model_uris["m1"], name, 0.8,
                         client=FailingAliasClient(mlflow_server.url))
    assert client.search_registered_models(filter_string=f"name = '{name}'") == [], (
        "a registered model created by the failed call must be removed")

    register_in_step(mlflow_server, model_uris["m1"], name, 0.8)
    with pytest.raises(MlflowException, match="injected"):
        register_in_step(mlflow_server, model_uris["m2"], name, 0.9,
                         client=FailingAliasClient(mlflow_server.url))
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"], "the failed version must be deleted"
    assert aliases(client, name) == {CHAMPION: "1"}


class FailingAfterAliasClient(MlflowClient):
    """A client that fails once the alias has moved: logging the decision is the next call."""

    def __init__(self, tracking_uri: str) -> None:
        super().__init__(tracking_uri)
        self.moved: list[tuple[str, str]] = []

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        super().set_registered_model_alias(name, alias, version)
        self.moved.append((alias, version))

    def log_batch(self, *args: object, **kwargs: object) -> None:
        raise MlflowException("injected failure after the alias moved")


@pytest.mark.parametrize("value, alias", [(0.9, CHAMPION), (0.5, CHALLENGER)])
def test_failure_after_the_alias_moved_restores_it_and_deletes_the_version(
        mlflow_server: MlflowServer, model_uris: dict[str, str], value: float,
        alias: str) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url)
    register_in_step(mlflow_server, model_uris["m1"], name, 0.8)
    register_in_step(mlflow_server, model_uris["m2"], name, 0.7)
    assert aliases(client, name) == {CHAMPION: "1", CHALLENGER: "2"}

    failing = FailingAfterAliasClient(mlflow_server.url)
    with pytest.raises(MlflowException, match="after the alias moved"):
        register_in_step(mlflow_server, model_uris["m3"], name, value, client=failing)
    assert failing.moved[0] == (alias, "3"), "the failure must come after the alias moved"
    assert aliases(client, name) == {CHAMPION: "1", CHALLENGER: "2"}, (
        f"the {alias} alias must point at its previous version again")
    versions = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.version for v in versions) == ["1", "2"], "version 3 must be deleted"


def test_a_champion_without_a_recorded_metric_stays_champion(
        mlflow_server: MlflowServer, model_uris: dict[str, str]) -> None:
    """A version registered by hand, with neither a metric tag nor a run metric, is kept."""
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url)
    client.create_registered_model(name)
    logged = client.get_logged_model(model_uris["m2"].split("/")[-1])
    manual = client.create_model_version(name, source=model_uris["m2"],
                                         model_id=logged.model_id)
    client.set_registered_model_alias(name, CHAMPION, manual.version)
    assert champion_metric(client, name, "balanced_accuracy") == (manual.version, None)

    decision, _ = register_in_step(mlflow_server, model_uris["m3"], name, 0.99)
    assert decision["registered"] and decision["alias"] == CHALLENGER
    assert decision["champion_value"] is None
    assert "no recorded balanced_accuracy" in decision["reason"]
    assert aliases(client, name) == {CHAMPION: manual.version, CHALLENGER: decision["version"]}


@pytest.mark.parametrize("kwargs, message", [
    ({"name": ""}, "name"),
    ({"metric_value": float("nan")}, "finite"),
    ({"metric_value": "high"}, "number"),
    ({"metric_name": ""}, "metric_name"),
])
def test_bad_arguments_are_clear_errors(kwargs: dict, message: str) -> None:
    arguments = {"name": "iris", "metric_name": "balanced_accuracy", "metric_value": 0.9,
                 "gate_passed": True, **kwargs}
    with pytest.raises(ValueError, match=message):
        register_model("models:/m-123", **arguments)
