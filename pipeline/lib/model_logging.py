"""MLflow logging that needs Keras: the per-epoch callback and the model logger.

Kept apart from ``tracking`` so steps that only talk to MLflow (register) never import
TensorFlow, which costs seconds per step process.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Metric
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient

from pipeline.lib import mlflow_compat, serving
from pipeline.lib.contract import CLASSES_FILE, DRIFT_REFERENCE_FILE, MODEL_FILE
from pipeline.lib.tracking_log import (
    EPOCH_KEYS,
    numeric_metrics,
    require_active_run,
    training_metric_name,
)

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------
# Keras callback
# ----------------------------------------------------------------------------------------
class MlflowEpochLogger(keras.callbacks.Callback):
    """Logs loss/accuracy (train and validation, as ``train/loss``, ``val/loss``, ...) after
    every epoch, and the learning rate only once it changes (a new phase such as
    fine-tuning): then its first value and each new one. A rate that stays put is the
    ``learning_rate`` param; as a metric, MLflow drew its one point at zero on a -0.5..0.5
    axis.

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
        self._last_rate: float | None = None
        self._first_rate: Metric | None = None  # logged once the rate changes

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        if self._run_id is None:
            self._run_id = require_active_run("MlflowEpochLogger")
        if self._client is None:
            self._client = MlflowClient()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        step = max(epoch + 1, self._last_step + 1)
        self._last_step = step
        values = numeric_metrics(dict(logs or {}))
        missing = [k for k in EPOCH_KEYS if k not in values]
        if missing:
            logger.debug("epoch %d: Keras logs lack %s", epoch, missing)
        timestamp = int(time.time() * 1000)
        metrics = [Metric(training_metric_name(k), v, timestamp, step) for k, v in values.items()]
        learning_rate = self._learning_rate()
        if learning_rate is not None and learning_rate != self._last_rate:
            rate = Metric(training_metric_name("learning_rate"), learning_rate, timestamp, step)
            if self._last_rate is None:
                self._first_rate = rate
            else:
                metrics += [m for m in (self._first_rate, rate) if m is not None]
                self._first_rate = None
            self._last_rate = learning_rate
        assert self._client is not None and self._run_id is not None  # set in on_train_begin
        self._client.log_batch(self._run_id, metrics=metrics)

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
#: Artifact key of the drift reference in a logged model (absent in models logged before it).
DRIFT_REFERENCE_ARTIFACT = "drift_reference"
#: Project files the logged model carries in its ``code/`` folder: the pyfunc class, the
#: decoder it shares with training, the test-time views layer the Keras file may name and
#: the MLflow adapter the pyfunc takes its error code from, with their package ``__init__``
#: files.
SERVING_CODE = ("__init__.py", "lib/__init__.py", "lib/images.py", "lib/serving.py",
                "lib/views.py", "lib/mlflow_compat.py")


def _pip_requirements() -> list[str]:
    import cloudpickle
    import tensorflow as tf

    return [
        f"mlflow=={mlflow.__version__}",
        f"tensorflow=={tf.__version__}",
        f"keras=={keras.__version__}",
        f"numpy=={np.__version__}",
        f"pandas=={pd.__version__}",
        f"cloudpickle=={cloudpickle.__version__}",
    ]


def _stage_code(root: Path) -> Path:
    """Copy :data:`SERVING_CODE` into ``root/pipeline`` (the package layout the class needs)."""
    package = Path(serving.__file__).resolve().parent.parent
    for relative in SERVING_CODE:
        target = root / "pipeline" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package / relative, target)
    return root / "pipeline"


def _optional_artifacts(model_dir: Path) -> dict[str, str]:
    """Files of the trained model that travel with the logged model when present: the drift
    check's training reference (batch predictions compare new images with it)."""
    reference = model_dir / DRIFT_REFERENCE_FILE
    return {DRIFT_REFERENCE_ARTIFACT: str(reference)} if reference.is_file() else {}


#: Characters MLflow refuses in a logged model's name, and what they become: the train step's
#: names carry a backbone's width ("mobilenet_v2-a0.5-320px").
_LOGGED_NAME_REFUSED = str.maketrans({c: "_" for c in "/:.%\"'"})


def log_model(
    model_dir: str | Path, *, image_size: int, example_image: bytes, name: str,
) -> ModelInfo:
    """Log ``model_dir/model.keras`` as an :class:`~pipeline.lib.serving.ImageClassifier`.

    The MLflow 3 logged model ``name`` takes base64 JPEG/PNG strings or uint8 pixels and
    returns a ``label`` column plus one probability column per class of
    ``model_dir/classes.json`` (the signature's outputs; the names are also in
    ``metadata["classes"]``). It has no input schema: MLflow would enforce one type, and the
    model takes both encoded images and pixel arrays, checking them itself. ``image_size`` is
    the size training resized to; ``example_image`` (an encoded JPEG/PNG) is the input
    example, stored with the model but not scored while logging (see
    :func:`~pipeline.lib.mlflow_compat.log_python_model`). The code travels with the model, so it
    loads without this project installed; pip requirements are pinned explicitly (inferring
    them would load TensorFlow in a subprocess). Characters MLflow refuses in ``name`` ("/",
    ":", ".", "%", quotes) become "_".
    """
    import tensorflow as tf
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    require_active_run("log_model")
    name = name.translate(_LOGGED_NAME_REFUSED)
    model_dir = Path(model_dir)
    model_file = model_dir / MODEL_FILE
    classes_file = model_dir / CLASSES_FILE
    for path in (model_file, classes_file):
        if not path.is_file():
            raise FileNotFoundError(f"cannot log model: {str(path)!r} does not exist")
    if not isinstance(example_image, bytes) or not example_image:
        raise ValueError("example_image must be the non-empty bytes of a JPEG or PNG file")
    classes = [str(c) for c in json.loads(classes_file.read_text())]
    signature = ModelSignature(outputs=Schema(
        [ColSpec("string", serving.LABEL_COLUMN)] + [ColSpec("float", c) for c in classes]))
    metadata: dict[str, Any] = {
        "classes": classes,
        "image_size": int(image_size),
        "input": f"base64 JPEG/PNG strings (inputs list or column {serving.IMAGE_COLUMN!r}), "
                 "or uint8 pixels (height, width, 3) of any size",
        "output": f"{serving.LABEL_COLUMN!r} and one probability column per class",
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
    }
    example = pd.DataFrame({serving.IMAGE_COLUMN: [base64.b64encode(example_image).decode()]})
    with tempfile.TemporaryDirectory(prefix="iris-model-") as tmp:
        config = serving.write_config(Path(tmp) / "serving.json", classes, image_size)
        info = mlflow_compat.log_python_model(
            name=name,
            python_model=serving.ImageClassifier(),
            artifacts={serving.MODEL_ARTIFACT: str(model_file),
                       serving.CONFIG_ARTIFACT: str(config), **_optional_artifacts(model_dir)},
            code_paths=[str(_stage_code(Path(tmp) / "code"))],
            signature=signature,
            input_example=example,
            pip_requirements=_pip_requirements(),
            metadata=metadata,
        )
    logger.info("logged model %s (%s, %s)", name, info.model_uri, model_file)
    return info


__all__ = ["DRIFT_REFERENCE_ARTIFACT", "SERVING_CODE", "MlflowEpochLogger", "log_model"]
