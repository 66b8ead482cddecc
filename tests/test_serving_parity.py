"""Parity: the served champion, called over REST with the original files, answers as evaluate did.

A small local pipeline run trains, evaluates and registers a champion; ``mlflow models
serve --env-manager local`` serves ``models:/<name>@champion`` on 127.0.0.1; every test-split
image is sent as the bytes of its original file in the archive (base64). The answers must
equal the evaluate step's per-image predictions: the trained Keras model on the test split
decoded by the data pipeline, batched as the evaluate step batches it (checked against the
confusion matrix the evaluate step wrote).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from tests.support.cli_helpers import (
    V1_BACKBONE,
    CliRun,
    clean_env,
    run_local_cli,
    succeeded,
)
from tests.support.mlflow_server import serve_model

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_mlflow_state")]

MODEL_NAME = "iris-parity"
#: Seconds per request; a cold TensorFlow graph is traced at load, not here.
REQUEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, iris_zip: Path,
        mobilenet_weights: Path) -> CliRun:
    """A small pipeline run (96 px, 2 epochs) whose model is registered as champion."""
    workdir = tmp_path_factory.mktemp("parity")
    sets = ["image_size=96", "epochs=2", "head_feature_views=0", f"weights={mobilenet_weights}",
            *V1_BACKBONE,
            "gate_threshold=0", f"registered_model_name={MODEL_NAME}"]
    args = ["--data", str(iris_zip), "--output-dir", str(workdir / "out")]
    for item in sets:
        args += ["--set", item]
    return run_local_cli(workdir, *args, env=clean_env(), timeout=900)


def original_test_files(summary: dict[str, Any], archive: Path) -> list[dict[str, Any]]:
    """Each test-split record with the bytes of its original file in the archive."""
    from pipeline.lib import records

    test = records.read_split(summary["outputs"]["prepared_data"], "test")
    with zipfile.ZipFile(archive) as zf:
        names = [n for n in zf.namelist() if not n.endswith("/")]
        found = []
        for record in test:
            (name,) = [n for n in names if n == record.path or n.endswith("/" + record.path)]
            data = zf.read(name)
            assert hashlib.sha256(data).hexdigest() == record.sha256, name
            found.append({"path": name, "bytes": data, "label": record.label})
    return found


def evaluate_predictions(summary: dict[str, Any], files: list[dict[str, Any]]) -> np.ndarray:
    """Probabilities as the evaluate step computes them: its loader, decoder and batches."""
    import tensorflow as tf

    from pipeline.lib import images, models

    config = summary["config"]
    model = models.load_model(summary["outputs"]["trained_model"])
    resizer = images.make_resizer(config["image_size"])
    decoded = tf.stack([images.decode_image(f["bytes"], resizer) for f in files])
    batches = [decoded[i:i + config["batch_size"]]
               for i in range(0, len(files), config["batch_size"])]
    return np.concatenate([np.asarray(model.predict_on_batch(b)) for b in batches])


def confusion(labels: list[int], predicted: list[int], num_classes: int) -> list[list[int]]:
    matrix = np.zeros((num_classes, num_classes), dtype=int)
    for true, pred in zip(labels, predicted, strict=True):
        matrix[true, pred] += 1
    return matrix.tolist()


def test_served_champion_answers_original_files_as_evaluate_did(
        run: CliRun, iris_zip: Path, tmp_path: Path) -> None:
    summary = succeeded(run)
    assert summary["registration"]["alias"] == "champion"
    classes = summary["classes"]
    files = original_test_files(summary, iris_zip)
    assert len(files) == summary["test_metrics"]["test_examples"]
    expected = evaluate_predictions(summary, files)
    labels = [f["label"] for f in files]
    # these are the evaluate step's predictions: same confusion matrix as its metrics.json
    evaluation = json.loads(
        (Path(summary["outputs"]["evaluation"]) / "metrics.json").read_text())
    assert confusion(labels, list(expected.argmax(axis=1)), len(classes)) == \
        evaluation["confusion_matrix"]

    with serve_model(f"models:/{MODEL_NAME}@champion", summary["mlflow"]["tracking_uri"],
                     tmp_path) as url:
        served = []
        for start in range(0, len(files), 16):  # several images per request, like clients
            chunk = files[start:start + 16]
            payload = {"inputs": [base64.b64encode(f["bytes"]).decode() for f in chunk]}
            response = requests.post(f"{url}/invocations", json=payload,
                                     timeout=REQUEST_TIMEOUT_S)
            assert response.status_code == 200, response.text[:500]
            served += response.json()["predictions"]
        refused = requests.post(f"{url}/invocations", timeout=REQUEST_TIMEOUT_S,
                                json={"inputs": (np.ones((1, 8, 8, 3)) / 2).tolist()})

    assert [row["label"] for row in served] == [classes[k] for k in expected.argmax(axis=1)]
    probabilities = np.array([[row[c] for c in classes] for row in served])
    assert np.allclose(probabilities, expected, atol=1e-5)
    accuracy = float(np.mean(probabilities.argmax(axis=1) == np.array(labels)))
    assert accuracy == pytest.approx(summary["test_metrics"]["accuracy"])

    assert refused.status_code == 400
    message = refused.json()["message"]
    assert message.startswith("image 0: float pixels (float64) are not accepted"), message
    assert "\n" not in message


def test_logged_model_is_named_and_holds_the_evaluate_metrics(run: CliRun) -> None:
    """What the MLflow UI's logged model page shows: a name, the test metrics, the data set."""
    import keras
    import mlflow
    from mlflow import MlflowClient

    summary = succeeded(run)
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    model_id = summary["mlflow"]["logged_model_uri"].split("/")[-1]
    logged = client.get_logged_model(model_id)
    assert re.fullmatch(r"iris-mobilenet-a0_25-96px-seed42-[0-9a-f]{6}", logged.name)
    linked = {m.key: m for m in logged.metrics}
    for name in ("accuracy", "balanced_accuracy", "macro_f1"):
        assert linked[name].value == pytest.approx(summary["test_metrics"][name]), name
        assert linked[name].run_id == summary["mlflow"]["step_run_ids"]["evaluate"]
        assert linked[name].dataset_name == "iris-image"
        assert linked[name].dataset_digest == summary["data"]["sha256"][:32]
    version = client.get_model_version(MODEL_NAME, summary["registration"]["version"])
    assert model_id in (version.model_id, version.source.removeprefix("models:/"))
    mlflow.set_tracking_uri(summary["mlflow"]["tracking_uri"])
    info = mlflow.models.get_model_info(summary["mlflow"]["logged_model_uri"])
    assert info.metadata["keras_version"] == keras.__version__
    assert info.saved_input_example_info is not None
