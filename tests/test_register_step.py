"""The register step: what reaches its decision from the pipeline's config and artifacts.

Its process imports MLflow only (TensorFlow would cost seconds and memory) unless a champion
evaluated on other data has to be scored on this run's test images.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import PipelineConfig
from pipeline.lib import records, stats
from pipeline.lib.contract import (
    META_DATA_SHA256,
    META_MODEL_URI,
    META_PREDICTIONS_URI,
    META_SPLIT_DIGEST,
    PREDICTIONS_FILE,
)
from pipeline.lib.params import RegisterParams, TrackingParams
from pipeline.lib.registry import ClassMismatchError, alias_history
from pipeline.lib.stats import Predictions
from pipeline.steps import register

CODE = """
import json, sys
import mlflow
assert "tensorflow" not in sys.modules

import numpy as np
from pipeline.lib.params import RegisterParams, TrackingParams
from pipeline.lib.stats import Predictions
from pipeline.steps import register

labels = np.array([0, 1, 1, 0])
Predictions(("a", "b", "c", "d"), labels, labels, np.eye(2)[labels],
            ("x", "y")).write_csv("predictions.csv")
metrics = {{"balanced_accuracy": 0.7, "gate_passed": True, "data_sha256": "d" * 64,
           "split_digest": "s" * 64, "predictions_uri": "runs:/none/predictions.csv"}}
decision = register.run_step(
    {{"mlflow_model_uri": {model_uri!r}}}, metrics, ".",
    RegisterParams(registered_model_name={name!r}, gate_metric="balanced_accuracy",
                   promotion_margin=0.0),
    TrackingParams(tracking_uri={uri!r}, experiment_name="e", pipeline_run_id="run-1",
                   pipeline_name="iris-image-pipeline"))
print(json.dumps({{"decision": decision["decision"],
                  "tensorflow": "tensorflow" in sys.modules,
                  "keras": "keras" in sys.modules}}))
"""


class Echo(mlflow.pyfunc.PythonModel):
    # no type hints: MLflow would infer a signature from them (and warn that these do not fit)
    def predict(self, context, model_input):
        return model_input


def test_register_step_registers_without_importing_tensorflow(
        store: tuple[str, str], tmp_path: Path) -> None:
    """In a fresh process on the module's store (created already: no migrations to wait for).
    The model it registers is logged here, where MLflow's model logging is loaded already
    (in the fresh process, loading it and logging took a second or more)."""
    mlflow.set_tracking_uri(store[0])
    try:
        with mlflow.start_run(experiment_id=store[1]):
            # requirements given: MLflow infers none (a process of its own that loads the model)
            model_uri = mlflow.pyfunc.log_model(name="m", python_model=Echo(),
                                                pip_requirements=["mlflow"]).model_uri
    finally:
        mlflow.set_tracking_uri(None)
    code = CODE.format(uri=store[0], model_uri=model_uri, name=f"no-tf-{uuid.uuid4().hex[:8]}")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"decision": "champion", "tensorflow": False, "keras": False}


# --- the step's decision, in process on a local sqlite store ----------------------------------
CLASSES = ("iris-setosa", "iris-versicolour", "iris-virginica")
LABELS = np.repeat(np.arange(3), (11, 38, 10))
IMAGE_IDS = tuple(f"{i:064x}" for i in range(LABELS.size))


def noisy(seed: int, recall: float, labels: np.ndarray = LABELS) -> np.ndarray:
    """Predictions right on each image with probability ``recall``, else a wrong class."""
    rng = np.random.default_rng(seed)
    wrong = (labels + rng.integers(1, 3, labels.size)) % 3
    return np.where(rng.random(labels.size) < recall, labels, wrong)


def balanced(labels: np.ndarray, predicted: np.ndarray) -> float:
    return float(stats.confusion_metrics(stats.confusion(labels, predicted, 3))[
        "balanced_accuracy"])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory,
          new_sqlite_store: Callable[[str], str]) -> tuple[str, str]:
    """(tracking URI, experiment id) of a sqlite store with artifacts beside it."""
    root = tmp_path_factory.mktemp("register-store")
    uri = new_sqlite_store("register-store")
    experiment = MlflowClient(uri).create_experiment(
        "register", artifact_location=(root / "artifacts").as_uri())
    return uri, experiment


def evaluated(store: tuple[str, str], folder: Path, predicted: np.ndarray, *,
              labels: np.ndarray = LABELS, ids: tuple[str, ...] = IMAGE_IDS,
              classes: tuple[str, ...] = CLASSES, split: str = "split-a",
              model_uri: str | None = None) -> tuple[dict, dict, Path]:
    """(model metadata, Metrics metadata, evaluation folder) as train and evaluate leave them,
    with ``predictions.csv`` logged on an evaluate run."""
    client = MlflowClient(store[0])
    run_id = client.create_run(store[1]).info.run_id
    folder = folder / run_id
    folder.mkdir(parents=True)
    path = Predictions(ids, labels, predicted, np.eye(len(classes))[predicted],
                       classes).write_csv(folder / PREDICTIONS_FILE)
    client.log_artifact(run_id, str(path))
    metrics = {"balanced_accuracy": balanced(labels, predicted), META_DATA_SHA256: "d" * 64,
               META_SPLIT_DIGEST: split, META_PREDICTIONS_URI: f"runs:/{run_id}/{PREDICTIONS_FILE}"}
    return {META_MODEL_URI: model_uri or f"runs:/{run_id}/model"}, metrics, folder


def step(store: tuple[str, str], evaluation: tuple[dict, dict, Path], config: PipelineConfig,
         name: str, data_dir: Path | None = None) -> dict:
    """The register step as its component runs it: params built from the pipeline config."""
    tracking = TrackingParams(tracking_uri=store[0], experiment_name="register",
                              pipeline_run_id=f"run-{uuid.uuid4().hex[:8]}",
                              pipeline_name="iris-image-pipeline")
    config = dataclasses.replace(config, registered_model_name=name)
    return register.run_step(*evaluation, config.params_for(RegisterParams), tracking,
                             data_dir=data_dir)


@pytest.mark.usefixtures("clean_mlflow_state")
def test_the_configured_promotion_margin_reaches_the_decision(
        store: tuple[str, str], tmp_path: Path) -> None:
    """``--set promotion_margin=0.9`` keeps a clearly better model challenger; the default
    margin (0) promotes the same model."""
    name = f"margin-{uuid.uuid4().hex[:8]}"
    old = noisy(1, 0.55)
    better = np.where(np.random.default_rng(2).random(LABELS.size) < 0.85, LABELS, old)
    assert step(store, evaluated(store, tmp_path, old), PipelineConfig(), name)["alias"] == (
        "champion")

    strict = PipelineConfig.from_mapping({"promotion_margin": "0.9"})
    held = step(store, evaluated(store, tmp_path, better), strict, name)
    assert held["alias"] == "challenger", held["reason"]
    assert held["comparison"]["margin"] == 0.9 and "margin 0.9000" in held["reason"]
    assert held["comparison"]["difference_ci_low"] > 0, "the default margin would promote it"

    promoted = step(store, evaluated(store, tmp_path, better), PipelineConfig(), name)
    assert promoted["alias"] == "champion" and promoted["comparison"]["margin"] == 0.0


@pytest.mark.usefixtures("clean_mlflow_state")
@pytest.mark.parametrize("legacy", [False, True], ids=["classes-tag", "predictions-header"])
def test_a_model_of_other_classes_is_refused_before_anything_is_registered(
        store: tuple[str, str], tmp_path: Path, legacy: bool) -> None:
    """Twelve flower species never replace the iris champion: the step fails naming both class
    lists and a name to register under; the registry is left as it was."""
    name = f"classes-{uuid.uuid4().hex[:8]}"
    client = MlflowClient(store[0])
    step(store, evaluated(store, tmp_path, noisy(3, 0.5)), PipelineConfig(), name)
    if legacy:  # a champion registered before versions carried their classes
        client.delete_model_version_tag(name, "1", "classes")
    other = ("rose", "tulip", "daisy")
    with pytest.raises(ClassMismatchError) as refused:
        step(store, evaluated(store, tmp_path, noisy(4, 0.99), classes=other, split="split-b"),
             PipelineConfig(), name)
    text = str(refused.value)
    assert str(list(other)) in text and str(list(CLASSES)) in text, text
    assert f"--set registered_model_name={name}-" in text, text
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert {a: str(v) for a, v in client.get_registered_model(name).aliases.items()} == {
        "champion": "1"}
    assert len(alias_history(client, name)) == 1


# --- a champion evaluated on other data is scored on this run's test images -----------------
def prepared_test_split(root: Path, per_class: int = 4) -> tuple[tuple[str, ...], np.ndarray]:
    """A prepared data set's classes and test split: small PNGs; (image ids, labels)."""
    import io

    from PIL import Image

    examples = []
    for index in range(per_class * len(CLASSES)):
        pixels = np.random.default_rng(index).integers(0, 256, (10, 10, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        data = buffer.getvalue()
        examples.append(records.Example(data, index % len(CLASSES),
                                        hashlib.sha256(data).hexdigest(), f"{index}.png"))
    records.write_classes(root, list(CLASSES))
    records.write_split(root, "test", examples)
    return tuple(e.sha256 for e in examples), np.array([e.label for e in examples])


@pytest.fixture(scope="module")
def always_first_class(store: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """URI of a tiny logged model (as the train step logs it) that answers class 0 for every
    image: on any test split it scores a balanced accuracy of exactly 1/3."""
    import keras

    from pipeline.lib.model_logging import log_model

    inputs = keras.Input(shape=(None, None, 3), dtype="uint8")
    x = keras.layers.Flatten()(keras.layers.Resizing(4, 4)(inputs))
    outputs = keras.layers.Dense(3, activation="softmax", kernel_initializer="zeros",
                                 bias_initializer=keras.initializers.Constant([3.0, 0, 0]))(x)
    model_dir = tmp_path_factory.mktemp("first-class")
    keras.Model(inputs, outputs).save(model_dir / "model.keras")
    (model_dir / "classes.json").write_text(json.dumps(list(CLASSES)))
    import tensorflow as tf

    example = tf.io.encode_png(np.zeros((4, 4, 3), np.uint8)).numpy()
    mlflow.set_tracking_uri(store[0])
    try:
        with mlflow.start_run(experiment_id=store[1]):
            return log_model(model_dir, image_size=4, example_image=example,
                             name="first-class").model_uri
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.usefixtures("clean_mlflow_state")
def test_a_champion_on_other_data_is_scored_on_this_runs_test_images(
        store: tuple[str, str], tmp_path: Path, always_first_class: str) -> None:
    """Its recorded 0.95 came from other images: on this run's it scores 1/3, and the paired
    rule on these images promotes a model that a point comparison would have kept out."""
    name = f"rescore-{uuid.uuid4().hex[:8]}"
    data = tmp_path / "prepared"
    ids, labels = prepared_test_split(data)
    champion = evaluated(store, tmp_path, noisy(5, 0.95), model_uri=always_first_class)
    champion[1]["balanced_accuracy"] = 0.95
    step(store, champion, PipelineConfig(), name)
    ours = np.where(np.arange(labels.size) < labels.size - 2, labels, (labels + 1) % 3)
    candidate = evaluated(store, tmp_path, ours, labels=labels, ids=ids, split="split-b")
    assert candidate[1]["balanced_accuracy"] < 0.95

    decision = step(store, candidate, PipelineConfig(), name, data_dir=data)
    comparison = decision["comparison"]
    assert decision["alias"] == "champion", decision["reason"]
    assert comparison["method"] == "paired_bootstrap", decision["reason"]
    assert comparison["champion_predictions"] == "rescored"
    assert comparison["images"] == labels.size
    assert comparison["difference"] == pytest.approx(balanced(labels, ours) - 1 / 3)
    assert "other data or another split" in decision["reason"]
    assert "scored champion v1 on this run's test images" in decision["reason"]


@pytest.mark.usefixtures("clean_mlflow_state")
def test_a_champion_that_cannot_be_loaded_is_compared_by_point_estimate_saying_so(
        store: tuple[str, str], tmp_path: Path) -> None:
    name = f"unloadable-{uuid.uuid4().hex[:8]}"
    data = tmp_path / "prepared"
    ids, labels = prepared_test_split(data)
    step(store, evaluated(store, tmp_path, noisy(6, 0.3)), PipelineConfig(), name)  # no model
    ours = evaluated(store, tmp_path, labels, labels=labels, ids=ids, split="split-b")
    decision = step(store, ours, PipelineConfig(), name, data_dir=data)
    assert decision["comparison"]["method"] == "point_estimate"
    assert "champion v1 could not be scored on this run's test images" in decision["reason"]
    assert "compared by point estimate" in decision["reason"]
