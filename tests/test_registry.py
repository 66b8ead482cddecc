"""The register step: gate, champion/challenger, rollback, the paired champion rule, restore.

Registry mechanics run against a real ``mlflow server``; the champion rule's statistics run
against a local sqlite store (no server needed) with synthetic per-image predictions.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline.cli import main
from pipeline.lib import promotion, stats
from pipeline.lib.contract import PREDICTIONS_FILE
from pipeline.lib.model_logging import log_model
from pipeline.lib.registry import (
    CHALLENGER,
    CHAMPION,
    Evidence,
    alias_history,
    champion_metric,
    register_model,
    restore_champion,
)
from pipeline.lib.tracking_runs import step_run
from tests.support.mlflow_server import MlflowServer, images

pytestmark = pytest.mark.usefixtures("clean_mlflow_state")
server = pytest.mark.mlflow_server


@pytest.fixture(autouse=True)
def quick_promotion_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """One registration at a time here: the server's lease and alias re-reads need not wait
    the real settle delay (tests/test_concurrency.py races them with it)."""
    monkeypatch.setattr(promotion, "PROMOTION_SETTLE_S", 0.1)

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
            example = tf.io.encode_png(images(1, 16, 16)[0]).numpy()
            uris[f"m{seed}"] = log_model(model_dir, image_size=12, example_image=example,
                                         name=f"m{seed}").model_uri
        uris[f"keras{seed}"] = str(model_dir / "model.keras")
    return uris


def register_in_step(server: MlflowServer, model_uri: str, name: str, value: float,
                     client: MlflowClient | None = None) -> tuple[dict, str]:
    """Run register_model inside a 'register' step run; returns (decision, step run id)."""
    with step_run("register", tracking_uri=server.url, experiment_name="registry-tests",
                  pipeline_run_id=f"kfp-{uuid.uuid4()}", pipeline_name="iris-test") as run:
        decision = register_model(model_uri, name=name, metric_name="balanced_accuracy",
                                  metric_value=value, client=client)
    return decision, run.info.run_id


def registered(server: MlflowServer, model_uri: str, name: str, value: float) -> dict:
    """A registration a test only starts from: ``register_model`` without the parent and
    step runs a register step opens around it (about half of its requests to the server)."""
    return register_model(model_uri, name=name, metric_name="balanced_accuracy",
                          metric_value=value, client=MlflowClient(server.url))


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}


@server
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
    assert "no per-image predictions" in logged.tags["registry.reason"]
    assert logged.tags["registry.comparison"] == "point_estimate"
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


@server
def test_champion_alias_loads_and_predicts_on_raw_images(
        mlflow_server: MlflowServer, model_uris: dict[str, str]) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    registered(mlflow_server, model_uris["m2"], name, 0.9)
    registered(mlflow_server, model_uris["m1"], name, 0.5)  # challenger, not served

    mlflow.set_tracking_uri(mlflow_server.url)
    loaded = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    same_size = images(2, 12, 12, seed=7)  # at the model's size: no resizing before Keras
    predicted = loaded.predict(same_size)
    assert list(predicted.columns) == ["label", *CLASSES]
    expected = keras.saving.load_model(model_uris["keras2"]).predict(same_size, verbose=0)
    assert np.allclose(predicted[CLASSES], expected, atol=1e-4), "champion must be the m2 model"
    assert loaded.metadata.metadata["classes"] == CLASSES


@server
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


@server
def test_failure_mid_registration_leaves_no_half_registered_version(
        mlflow_server: MlflowServer, model_uris: dict[str, str]) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(mlflow_server.url)

    with pytest.raises(MlflowException, match="injected"):
        register_in_step(mlflow_server, model_uris["m1"], name, 0.8,
                         client=FailingAliasClient(mlflow_server.url))
    assert client.search_registered_models(filter_string=f"name = '{name}'") == [], (
        "a registered model created by the failed call must be removed")

    registered(mlflow_server, model_uris["m1"], name, 0.8)
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
    registered(mlflow_server, model_uris["m1"], name, 0.8)
    registered(mlflow_server, model_uris["m2"], name, 0.7)
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
                 **kwargs}
    with pytest.raises(ValueError, match=message):
        register_model("models:/m-123", **arguments)


# --- the paired champion rule, on a local sqlite store ----------------------------------------
#: Test split class sizes of the iris data (seed 42).
TEST_COUNTS = (11, 38, 10)
LABELS = np.repeat(np.arange(3), TEST_COUNTS)
IMAGE_IDS = tuple(f"{i:064x}" for i in range(LABELS.size))  # content sha256 stand-ins


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory,
          new_sqlite_store: Callable[[str], str]) -> tuple[str, str]:
    """(tracking URI, experiment id) of a sqlite store with artifacts beside it."""
    root = tmp_path_factory.mktemp("registry-store")
    uri = new_sqlite_store("registry-store")
    experiment = MlflowClient(uri).create_experiment(
        "champion-rule", artifact_location=(root / "artifacts").as_uri())
    return uri, experiment


def noisy(seed: int, recall: float) -> np.ndarray:
    """Predictions right on each test image with probability ``recall``, else a wrong class."""
    rng = np.random.default_rng(seed)
    wrong = (LABELS + rng.integers(1, 3, LABELS.size)) % 3
    return np.where(rng.random(LABELS.size) < recall, LABELS, wrong)


def balanced(predicted: np.ndarray) -> float:
    return float(stats.confusion_metrics(stats.confusion(LABELS, predicted, 3))[
        "balanced_accuracy"])


def evaluated(store: tuple[str, str], tmp_path: Path, predicted: np.ndarray,
              split: str = "split-a") -> tuple[str, Evidence]:
    """A run holding ``predictions.csv`` as the evaluate step logs it; (model URI, evidence)."""
    uri, experiment = store
    client = MlflowClient(uri)
    run_id = client.create_run(experiment).info.run_id
    folder = tmp_path / run_id
    folder.mkdir()
    path = stats.Predictions(IMAGE_IDS, LABELS, predicted, np.eye(3)[predicted],
                             tuple(CLASSES)).write_csv(folder / PREDICTIONS_FILE)
    client.log_artifact(run_id, str(path))
    client.set_terminated(run_id)
    evidence = Evidence(predictions=path, predictions_uri=f"runs:/{run_id}/predictions.csv",
                        data_sha256="d" * 64, split_digest=split)
    return f"runs:/{run_id}/model", evidence


def register(store: tuple[str, str], tmp_path: Path, name: str, predicted: np.ndarray,
             split: str = "split-a", margin: float = 0.0,
             client: MlflowClient | None = None) -> dict:
    model_uri, evidence = evaluated(store, tmp_path, predicted, split)
    return register_model(model_uri, name=name, metric_name="balanced_accuracy",
                          metric_value=balanced(predicted),
                          client=client or MlflowClient(store[0]), evidence=evidence,
                          margin=margin)


def test_clearly_better_challenger_is_promoted_on_the_paired_interval(
        store: tuple[str, str], tmp_path: Path) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(store[0])
    old = noisy(1, 0.55)
    first = register(store, tmp_path, name, old)
    assert first["alias"] == CHAMPION and first["comparison"] == {"method": "none"}
    better = np.where(np.random.default_rng(2).random(LABELS.size) < 0.85, LABELS, old)

    modest = register(store, tmp_path, name, better, margin=0.9)
    assert modest["alias"] == CHALLENGER, "a margin above the interval keeps the champion"
    assert "margin 0.9000" in modest["reason"]

    second = register(store, tmp_path, name, better)
    comparison = second["comparison"]
    assert second["alias"] == CHAMPION and comparison["method"] == "paired_bootstrap"
    assert 0 < comparison["difference_ci_low"] < comparison["difference"]
    assert comparison["difference"] == pytest.approx(balanced(better) - balanced(old))
    assert comparison["images"] == LABELS.size and comparison["champion_version"] == "1"
    assert "paired bootstrap over the same 59 test images" in second["reason"]
    assert aliases(client, name) == {CHAMPION: "3", CHALLENGER: "2"}
    tags = client.get_model_version(name, "3").tags
    assert tags["compare.method"] == "paired_bootstrap"
    assert float(tags["compare.difference_ci_low"]) == pytest.approx(
        comparison["difference_ci_low"])
    assert tags["predictions_uri"].endswith("/predictions.csv")
    assert tags["data.split_digest"] == "split-a" and tags["data.sha256"] == "d" * 64
    history = alias_history(client, name)
    assert [h.split(" ", 1)[1].split(":")[0] for h in history] == [
        "champion v1", "challenger v2", "champion v1 -> v3"]


def test_challenger_within_noise_is_not_promoted(store: tuple[str, str],
                                                 tmp_path: Path) -> None:
    """Same model quality, other seed: a higher point estimate that is only noise."""
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(store[0])
    champion = noisy(10, 0.65)

    def retrained(seed: int) -> np.ndarray:
        """Same quality, other seed: 40% of the images get a fresh draw at the same recall."""
        redraw = np.random.default_rng(seed + 1000).random(LABELS.size) < 0.4
        return np.where(redraw, noisy(seed, 0.65), champion)

    # the first other seed whose predictions score higher: the old rule would promote it
    challenger = next(p for p in map(retrained, range(11, 100))
                      if balanced(p) > balanced(champion) + 0.03)
    register(store, tmp_path, name, champion)
    decision = register(store, tmp_path, name, challenger)
    comparison = decision["comparison"]
    assert decision["alias"] == CHALLENGER and comparison["method"] == "paired_bootstrap"
    assert comparison["difference"] > 0.03 and comparison["difference_ci_low"] <= 0
    assert "not shown to be better, stays challenger" in decision["reason"]
    assert aliases(client, name) == {CHAMPION: "1", CHALLENGER: "2"}
    assert float(client.get_model_version(name, "2").tags["compare.difference"]) > 0.03


def test_champion_on_other_data_is_compared_by_point_estimate(store: tuple[str, str],
                                                              tmp_path: Path) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    register(store, tmp_path, name, noisy(20, 0.5), split="split-a")
    slightly = noisy(21, 0.8)
    assert balanced(slightly) > balanced(noisy(20, 0.5))
    decision = register(store, tmp_path, name, slightly, split="split-b")
    assert decision["alias"] == CHAMPION
    assert decision["comparison"]["method"] == "point_estimate"
    assert "was evaluated on other data or another split" in decision["reason"]
    assert "compared by point estimate" in decision["reason"]
    assert decision["comparison"]["difference"] == pytest.approx(
        balanced(slightly) - balanced(noisy(20, 0.5)))


def test_unreadable_champion_predictions_fall_back_to_point_estimates(
        store: tuple[str, str], tmp_path: Path) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(store[0])
    register(store, tmp_path, name, noisy(30, 0.5))
    run_id = client.get_model_version(name, "1").tags["predictions_uri"].split("/")[1]
    client.set_model_version_tag(name, "1", "predictions_uri", f"runs:/{run_id}/gone.csv")
    decision = register(store, tmp_path, name, noisy(31, 0.9))
    assert decision["alias"] == CHAMPION
    assert "champion v1's per-image predictions are not usable" in decision["reason"]
    assert decision["comparison"]["method"] == "point_estimate"


def test_previous_champion_is_restorable_from_the_command_line(
        store: tuple[str, str], tmp_path: Path) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(store[0])
    old = noisy(40, 0.5)
    register(store, tmp_path, name, old)
    register(store, tmp_path, name, np.where(noisy(41, 0.95) == LABELS, LABELS, old))
    assert aliases(client, name)[CHAMPION] == "2"

    moved = restore_champion(name, 1, client=client)
    assert (moved["version"], moved["previous_version"]) == ("1", "2")
    assert aliases(client, name)[CHAMPION] == "1"
    assert alias_history(client, name)[-1].endswith("champion v2 -> v1: restored by hand")

    argv = ["--restore-champion", "2", "--tracking-uri", store[0],
            "--set", f"registered_model_name={name}"]
    assert main(argv) == 0
    assert aliases(client, name)[CHAMPION] == "2"
    assert main([*argv[:1], "9", *argv[2:]]) == 1, "an unknown version fails, naming it"
    with pytest.raises(ValueError, match=f"cannot restore '{name}' v9"):
        restore_champion(name, "9", client=client)
    assert aliases(client, name)[CHAMPION] == "2"


class FailingLogClient(MlflowClient):
    """A client that fails when logging the decision, after the alias and history moved."""

    def log_batch(self, *args: object, **kwargs: object) -> None:
        raise MlflowException("injected failure while logging the decision")


def test_failure_after_the_alias_moved_restores_alias_and_history(
        store: tuple[str, str], tmp_path: Path) -> None:
    name = f"iris-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(store[0])
    register(store, tmp_path, name, noisy(50, 0.5))
    mlflow.set_tracking_uri(store[0])
    with mlflow.start_run(experiment_id=store[1]), pytest.raises(MlflowException,
                                                                    match="injected"):
        register(store, tmp_path, name, noisy(51, 0.99), client=FailingLogClient(store[0]))
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert aliases(client, name) == {CHAMPION: "1"}
    assert len(alias_history(client, name)) == 1
