"""The served model's contract: encoded images or uint8 pixels in, label + class probabilities out.

A small Keras model is logged once the way the train step logs it; the checks then go
through ``mlflow.pyfunc`` and through the scoring server's own request handler (the function
``mlflow models serve`` calls per request), so REST parsing and HTTP status are covered
without a server process (the slow parity test runs a real one).
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import textwrap
import uuid
import zlib
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import tensorflow as tf
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import scoring_server
from mlflow.tracking import MlflowClient
from PIL import Image

from pipeline.lib import images as image_lib
from pipeline.lib import models
from pipeline.lib.model_logging import log_model
from pipeline.lib.serving import MAX_PIXELS, InvalidImageError
from pipeline.lib.tracking_runs import step_run
from tests.support.mlflow_server import MlflowServer, images, serve_model
from tests.support.paths import PROJECT_ROOT

pytestmark = pytest.mark.mlflow_server

CLASSES = ["iris-setosa", "iris-versicolour", "iris-virginica"]
SIZE = 24


def jpeg(pixels: np.ndarray) -> bytes:
    return tf.io.encode_jpeg(pixels, quality=90).numpy()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def keras_model() -> keras.Model:
    """Raw images of any size in, resize and rescale inside, like the pipeline's models, with
    the default's 8 test-time views (a custom layer the served model must bring along)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = image_lib.make_resizer(SIZE)(inputs)
    x = keras.layers.Rescaling(1 / 255)(x)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(len(CLASSES), activation="softmax")(x)
    return models.with_test_time_views(keras.Model(inputs, outputs), 8, SIZE)


@pytest.fixture(scope="module")
def logged(mlflow_server: MlflowServer, keras_model: keras.Model,
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model logged by ``log_model`` on the session server, and a local copy of it."""
    model_dir = tmp_path_factory.mktemp("serving-model")
    keras_model.save(model_dir / "model.keras")
    (model_dir / "classes.json").write_text(json.dumps(CLASSES))
    with step_run("train", tracking_uri=mlflow_server.url, experiment_name="serving-tests",
                  pipeline_run_id=f"kfp-{uuid.uuid4()}", pipeline_name="iris-test") as run:
        info = log_model(model_dir, image_size=SIZE, example_image=jpeg(images(1, 50, 40)[0]),
                         name="iris-tiny-24px")
        local = mlflow.artifacts.download_artifacts(
            info.model_uri, dst_path=str(tmp_path_factory.mktemp("serving-download")))
    return {"info": info, "run_id": run.info.run_id, "path": local}


@pytest.fixture(scope="module")
def served(logged: dict[str, Any]) -> mlflow.pyfunc.PyFuncModel:
    return mlflow.pyfunc.load_model(logged["path"])


def evaluate_like(model: keras.Model, encoded: list[bytes]) -> np.ndarray:
    """Probabilities the evaluate step computes: its decoder, then ``predict_on_batch``."""
    resizer = image_lib.make_resizer(SIZE)
    batch = tf.stack([image_lib.decode_image(data, resizer) for data in encoded])
    return np.asarray(model.predict_on_batch(batch))


def rest(model: mlflow.pyfunc.PyFuncModel, payload: dict) -> list[dict]:
    """``POST /invocations`` as the scoring server handles it; the JSON predictions."""
    response = scoring_server.invocations(json.dumps(payload), "application/json", model,
                                          model.metadata.get_input_schema())
    assert response.status == 200
    return json.loads(response.response)["predictions"]


def rest_error(model: mlflow.pyfunc.PyFuncModel, payload: dict) -> tuple[int, str]:
    """(HTTP status, message) the scoring server answers a refused request with."""
    with pytest.raises(MlflowException) as caught:
        scoring_server.invocations(json.dumps(payload), "application/json", model,
                                   model.metadata.get_input_schema())
    body = json.loads(caught.value.serialize_as_json())
    return caught.value.get_http_status_code(), body["message"]


# --- what is logged -------------------------------------------------------------------------


def test_logged_model_is_named_documented_and_small(
        mlflow_server: MlflowServer, logged: dict[str, Any]) -> None:
    info = logged["info"]
    model = MlflowClient(mlflow_server.url).get_logged_model(info.model_id)
    assert model.name == "iris-tiny-24px"
    assert model.source_run_id == logged["run_id"]
    assert info.signature.inputs is None  # both encoded images and pixels: checked by the model
    assert info.signature.outputs.input_names() == ["label", *CLASSES]
    metadata = info.metadata
    assert metadata["classes"] == CLASSES and metadata["image_size"] == SIZE
    assert metadata["keras_version"] == keras.__version__
    assert metadata["tensorflow_version"] == tf.__version__
    root = Path(logged["path"])
    example = json.loads((root / "input_example.json").read_text())
    assert example["columns"] == ["image"]
    assert sum(p.stat().st_size for p in root.glob("*example*.json")) < 20_000
    requirements = (root / "requirements.txt").read_text().split()
    assert f"keras=={keras.__version__}" in requirements
    assert {"serving.py", "images.py", "views.py", "mlflow_compat.py"} <= {
        p.name for p in (root / "code").rglob("*.py")}


@pytest.mark.slow  # a fresh process imports TensorFlow and MLflow: tens of seconds on 2 cores
def test_logged_model_loads_without_the_project_on_the_path(logged: dict[str, Any]) -> None:
    """In a process where ``pipeline`` cannot be imported, the model's own code/ serves."""
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path = [p for p in sys.path if p not in ("", ".") and "work/main" not in p
                    and p.rstrip("/") != {str(PROJECT_ROOT)!r}]  # this checkout, any path
        sys.meta_path = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                         and "editable" not in repr(f).lower()]
        assert importlib.util.find_spec("pipeline") is None, "the project is importable"
        import mlflow, numpy as np
        model = mlflow.pyfunc.load_model({logged["path"]!r})
        out = model.predict(np.zeros((1, 30, 20, 3), np.uint8))
        import pipeline.lib.serving as serving
        print(serving.__file__)
        print(list(out.columns))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd="/", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    module_file, columns = done.stdout.strip().splitlines()[-2:]
    assert module_file.startswith(str(Path(logged["path"]) / "code" / "pipeline"))
    assert columns == str(["label", *CLASSES])


# --- answers --------------------------------------------------------------------------------


def test_encoded_images_score_as_the_evaluate_step_scores_them(
        served: mlflow.pyfunc.PyFuncModel, keras_model: keras.Model) -> None:
    pixels = images(3, 57, 43, seed=1)
    encoded = [jpeg(pixels[0]), tf.io.encode_png(pixels[1]).numpy(), jpeg(pixels[2])]
    expected = evaluate_like(keras_model, encoded)

    out = served.predict(pd.DataFrame({"image": [b64(data) for data in encoded]}))
    assert list(out.columns) == ["label", *CLASSES]
    assert np.allclose(out[CLASSES].to_numpy(), expected, atol=1e-6)
    assert list(out["label"]) == [CLASSES[k] for k in expected.argmax(axis=1)]
    # the same images as a list of base64 strings, as raw bytes, and as TF-decoded pixels
    assert np.allclose(served.predict([b64(d) for d in encoded])[CLASSES], expected, atol=1e-6)
    assert np.allclose(served.predict(encoded)[CLASSES], expected, atol=1e-6)
    decoded = [tf.io.decode_image(data, channels=3).numpy() for data in encoded]
    assert np.allclose(served.predict(decoded)[CLASSES], expected, atol=1e-6)


def test_uint8_batches_of_any_size_are_resized_like_training_images(
        served: mlflow.pyfunc.PyFuncModel, keras_model: keras.Model) -> None:
    resizer = image_lib.make_resizer(SIZE)
    for shape in ((2, 37, 53, 3), (1, 300, 97, 3), (3, SIZE, SIZE, 3)):
        raw = images(*shape[:3], seed=shape[1])
        fitted = tf.stack([image_lib.fit_image(image, resizer) for image in raw])
        expected = np.asarray(keras_model.predict_on_batch(fitted))
        out = served.predict(raw)
        assert out.shape == (shape[0], 1 + len(CLASSES)), shape
        assert np.allclose(out[CLASSES].to_numpy(), expected, atol=1e-6), shape
        assert np.allclose(out[CLASSES].sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("bad, says", [
    (images(1, 20, 20).astype(np.float32) / 255, "image 0: float pixels (float32)"),
    (images(1, 20, 20).astype(np.int64) + 200, "image 0: pixel values must be in 0..255"),
    (images(1, 20, 20)[..., :1], "image 0: expected RGB pixels shaped (height, width, 3)"),
    (np.concatenate([images(1, 9, 9), images(1, 9, 9)[..., :1]], axis=-1),
     "got shape (9, 9, 4)"),
    (["aGVsbG8gd29ybGQ="], "image 0: 11 bytes that do not decode as a JPEG or PNG"),
    ([b64(b"\xff\xd8\xff" + b"\x00" * 40)], "image 0: 43 bytes that do not decode"),
    (["not base64!"], "image 0: not base64-encoded"),
    ([], "no images in the request"),
    (pd.DataFrame({"a": ["x"], "b": ["y"]}), "expected a column 'image'"),
], ids=["float", "out-of-range", "one-channel", "four-channels", "not-an-image",
        "truncated-jpeg", "not-base64", "empty", "wrong-columns"])
def test_bad_input_is_refused_with_one_line_naming_the_image(
        served: mlflow.pyfunc.PyFuncModel, bad: Any, says: str) -> None:
    with pytest.raises(InvalidImageError) as caught:
        served.predict(bad)
    assert says in caught.value.message
    assert "\n" not in caught.value.message


def test_a_bad_image_among_good_ones_is_named_by_its_position(
        served: mlflow.pyfunc.PyFuncModel) -> None:
    good = b64(jpeg(images(1, 30, 30)[0]))
    with pytest.raises(InvalidImageError, match="image 2: not base64"):
        served.predict([good, good, "%%%", good])


# --- through the scoring server's request handler -------------------------------------------


def test_rest_formats_return_labels_and_named_probabilities(
        served: mlflow.pyfunc.PyFuncModel, keras_model: keras.Model) -> None:
    pixels = images(2, 64, 48, seed=5)
    encoded = [jpeg(p) for p in pixels]
    expected = evaluate_like(keras_model, encoded)
    strings = [b64(data) for data in encoded]
    for payload in ({"inputs": strings},
                    {"inputs": {"image": strings}},
                    {"dataframe_split": {"columns": ["image"], "data": [[s] for s in strings]}},
                    {"dataframe_records": [{"image": s} for s in strings]}):
        predictions = rest(served, payload)
        assert [row["label"] for row in predictions] == [
            CLASSES[k] for k in expected.argmax(axis=1)], payload.keys()
        got = np.array([[row[c] for c in CLASSES] for row in predictions])
        assert np.allclose(got, expected, atol=1e-6), payload.keys()
    # pixels as nested JSON lists (the old contract), decoded by TF first
    decoded = [tf.io.decode_image(data, channels=3).numpy() for data in encoded]
    predictions = rest(served, {"inputs": np.stack(decoded).tolist()})
    got = np.array([[row[c] for c in CLASSES] for row in predictions])
    assert np.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("payload, says", [
    ({"inputs": (images(1, 16, 16) / 255).tolist()}, "image 0: float pixels"),
    ({"inputs": images(1, 16, 16)[..., :1].tolist()}, "image 0: expected RGB pixels"),
    ({"inputs": (images(1, 16, 16).astype(int) * 2 - 20).tolist()},
     "image 0: pixel values must be in 0..255"),
    ({"inputs": ["aGVsbG8gd29ybGQ="]}, "image 0: 11 bytes that do not decode"),
], ids=["float", "one-channel", "out-of-range", "not-an-image"])
def test_rest_refusals_are_http_400_with_one_clear_line(
        served: mlflow.pyfunc.PyFuncModel, payload: dict, says: str) -> None:
    status, message = rest_error(served, payload)
    assert status == 400
    assert message.startswith(says), message
    assert "\n" not in message and len(message) < 200, message


# --- what the README says is refused: other formats, other columns, too many pixels ----------


def pillow_file(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def png_bomb(side: int = 9000) -> bytes:
    """A valid 1-bit grey PNG of ``side`` x ``side`` zeros: about 10 kB of file that would
    decode to ``side``² RGB pixels (243 MB at 9000), more than ``MAX_PIXELS``."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
            + chunk(b"IEND", b""))


def jpeg_claiming(side: int) -> bytes:
    """A small baseline JPEG whose frame header (SOF0) claims ``side`` x ``side`` pixels."""
    data = bytearray(tf.io.encode_jpeg(images(1, 16, 16)[0], quality=90,
                                       progressive=False).numpy())
    frame = data.index(b"\xff\xc0")
    data[frame + 5:frame + 9] = struct.pack(">HH", side, side)
    return bytes(data)


REFUSED_REQUESTS = {
    "gif": ({"inputs": [b64(pillow_file(images(1, 30, 30)[0], "GIF"))]},
            "image 0: a GIF file; only JPEG and PNG files are accepted"),
    "bmp": ({"inputs": [b64(pillow_file(images(1, 30, 30)[0], "BMP"))]},
            "image 0: a BMP file; only JPEG and PNG files are accepted"),
    "wrong-column": ({"dataframe_records": [{"img": b64(jpeg(images(1, 30, 30)[0]))}]},
                     "expected a column 'image', got columns ['img']"),
    "png-bomb": ({"inputs": [b64(png_bomb())]}, "image 0: 9000x9000 is too many pixels"),
    "jpeg-bomb": ({"inputs": [b64(jpeg_claiming(9000))]},
                  "image 0: 9000x9000 is too many pixels"),
}


def test_the_bomb_is_small_and_over_the_limit() -> None:
    bomb = png_bomb()
    assert len(bomb) < 100_000 and MAX_PIXELS < 9000 * 9000
    assert Image.open(io.BytesIO(bomb)).size == (9000, 9000)  # a well-formed PNG


@pytest.mark.parametrize("case", list(REFUSED_REQUESTS))
def test_other_formats_columns_and_bombs_are_http_400(
        served: mlflow.pyfunc.PyFuncModel, case: str) -> None:
    payload, says = REFUSED_REQUESTS[case]
    status, message = rest_error(served, payload)
    assert status == 400
    assert message.startswith(says), message
    assert "\n" not in message and len(message) < 200, message


def test_uint8_pixels_over_the_limit_are_refused_unread(
        served: mlflow.pyfunc.PyFuncModel) -> None:
    too_many = np.broadcast_to(np.uint8(0), (1, 1, MAX_PIXELS + 1, 3))  # a view: no memory
    with pytest.raises(InvalidImageError, match=r"image 0: \d+x1 is too many pixels"):
        served.predict(list(too_many))


@pytest.mark.slow  # starts `mlflow models serve` (TensorFlow and MLflow in a fresh process)
def test_the_scoring_server_refuses_what_the_readme_says(
        logged: dict[str, Any], mlflow_server: MlflowServer, tmp_path: Path) -> None:
    """Where users meet the contract: a real ``mlflow models serve`` process over HTTP."""
    with serve_model(logged["info"].model_uri, mlflow_server.url, tmp_path) as url:
        answers = {case: requests.post(f"{url}/invocations", json=payload, timeout=120)
                   for case, (payload, _) in REFUSED_REQUESTS.items()}
        record = {"image": b64(jpeg(images(1, 30, 30)[0]))}
        good = requests.post(f"{url}/invocations", json={"dataframe_records": [record]},
                             timeout=120)
    assert good.status_code == 200, good.text[:500]
    for case, response in answers.items():
        says = REFUSED_REQUESTS[case][1]
        assert response.status_code == 400, (case, response.text[:300])
        assert response.json()["message"].startswith(says), (case, response.text[:300])
