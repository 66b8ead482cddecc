"""MLflow logging that needs Keras: the per-epoch callback and the model logger.

Kept apart from ``tracking`` so steps that only talk to MLflow (register) never import
TensorFlow, which costs seconds per step process.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from pipeline.lib.tracking import EPOCH_KEYS, numeric_metrics, require_active_run

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Keras callback
# ----------------------------------------------------------------------------------------
class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs loss/accuracy (train and validation) and the learning rate after every epoch.

    Explicit instead of ``mlflow.keras.autolog`` (untested on TF 2.21). One ``log_batch``
    per epoch with ``step`` = the 1-based epoch number, as in the logs and ``history.json``;
    if ``fit`` runs again (fine-tuning) and restarts its epoch count, steps continue after
    the last one so histories never overlap.
    """

    def __init__(self, run_id: str | None = None, client: MlflowClient | None = None) -> None:
        super().__init__()
        self._run_id = run_id
        self._client = client
        self._last_step = 0

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if self._run_id is None:
            self._run_id = require_active_run("MlflowEpochLogger")
        if self._client is None:
            self._client = MlflowClient()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        step = max(epoch + 1, self._last_step + 1)
        self._last_step = step
        values = numeric_metrics(dict(logs or {}))
        learning_rate = self._learning_rate()
        if learning_rate is not None:
            values["learning_rate"] = learning_rate
        missing = [k for k in EPOCH_KEYS if k not in values]
        if missing:
            logger.debug("epoch %d: Keras logs lack %s", epoch, missing)
        timestamp = int(time.time() * 1000)
        assert self._client is not None and self._run_id is not None  # set in on_train_begin
        self._client.log_batch(
            self._run_id, metrics=[Metric(k, v, timestamp, step) for k, v in values.items()],
        )

    def _learning_rate(self) -> float | None:
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is None:
            return None
        try:
            value = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
        except (AttributeError, TypeError, ValueError):
            return None
        return value if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------
def _raw_image_model(model: keras.Model) -> keras.Model:
    """``model`` if it takes uint8 images of any size, else a wrapper that resizes first.

    The logged model must accept raw HxWx3 uint8 images of any size; a model built for a
    fixed input size gets a ``Resizing`` layer in front (plain Keras layers, so the
    ``.keras`` file loads without custom code).
    """
    shape = tuple(model.input_shape)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"model input must be a batch of HxWx3 images, got shape {shape}")
    if shape[1] is None and shape[2] is None:
        return model
    height, width = shape[1], shape[2]
    if height is None or width is None:
        raise ValueError(f"model input has only one fixed side: {shape}")
    inputs = keras.Input(shape=(None, None, 3), dtype="uint8", name="image")
    resized = keras.layers.Resizing(height, width, name="resize_to_model")(inputs)
    outputs = model(resized)
    logger.info("model expects %dx%d inputs: logging it behind a Resizing layer", height, width)
    return keras.Model(inputs, outputs, name=f"{model.name}_any_size")


def _pip_requirements() -> list[str]:
    import tensorflow as tf

    return [
        f"mlflow=={mlflow.__version__}",
        f"tensorflow=={tf.__version__}",
        f"keras=={keras.__version__}",
        f"numpy=={np.__version__}",
    ]


def log_model(
    model_dir: str | Path, *, name: str = "model", input_example: np.ndarray,
) -> str:
    """Log ``model_dir/model.keras`` with MLflow 3's ``mlflow.keras.log_model``; returns its URI.

    The logged model takes a batch of raw uint8 images of any size (``(n, h, w, 3)``) and
    returns class probabilities in the order of ``model_dir/classes.json``, which is stored
    in the model's metadata (``metadata["classes"]``) so a registry user can name them.
    The signature is built by hand with free height and width: inferring it from the
    example would pin the example's size and reject other images.
    Pip requirements are pinned explicitly (inference would load TensorFlow in a subprocess).
    """
    require_active_run("log_model")
    model_dir = Path(model_dir)
    model_file = model_dir / "model.keras"
    if not model_file.is_file():
        raise FileNotFoundError(f"cannot log model: {str(model_file)!r} does not exist")
    example = np.asarray(input_example)
    if example.dtype != np.uint8 or example.ndim != 4 or example.shape[-1] != 3 or not len(example):
        raise ValueError(
            "input_example must be a non-empty uint8 array of shape (n, height, width, 3), "
            f"got {example.dtype} {example.shape}"
        )
    classes: list[str] | None = None
    classes_file = model_dir / "classes.json"
    if classes_file.is_file():
        classes = [str(c) for c in json.loads(classes_file.read_text())]

    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    # compile=False: inference needs no optimizer state (nor custom losses)
    model = _raw_image_model(keras.saving.load_model(model_file, compile=False))
    example = example[:2]  # the example is stored as JSON: keep it small
    probabilities = np.asarray(model.predict(example, verbose=0))
    if probabilities.ndim != 2 or (classes and probabilities.shape[1] != len(classes)):
        raise ValueError(
            f"model output shape {probabilities.shape} does not match {len(classes or [])} "
            f"classes in {str(classes_file)!r}"
        )
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, probabilities.shape[1]),
                                   name="probabilities")]),
    )
    metadata: dict[str, Any] = {"input": "uint8 images (n, height, width, 3), any size",
                                "output": "class probabilities"}
    if classes:
        metadata["classes"] = classes
    info = mlflow.tensorflow.log_model(
        model,
        name=name,
        signature=signature,
        input_example=example,
        pip_requirements=_pip_requirements(),
        metadata=metadata,
    )
    logger.info("logged model %s (%s)", info.model_uri, model_file)
    return info.model_uri


__all__ = ["MlflowEpochLogger", "log_model"]
