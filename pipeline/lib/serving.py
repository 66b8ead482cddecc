"""The served model: JPEG/PNG bytes or uint8 pixels in, the label and one probability per class out.

``ImageClassifier`` is the MLflow pyfunc model the train step logs (``model_logging``) and
``mlflow models serve`` / KServe run. It decodes and resizes images with the very functions
the training and evaluation data went through (``pipeline.lib.images``), so a client sending
the original file gets the answer the evaluate step scored. This module, ``images``,
``views`` (the test-time views layer) and ``mlflow_compat`` (its error code) are shipped
inside the logged model (its ``code/`` folder, ``model_logging.SERVING_CODE``): they import
nothing else from the project, so the model loads where only MLflow and TensorFlow are
installed.

Accepted inputs, one image per row or list item:

- base64 strings of JPEG or PNG files (REST: ``{"inputs": ["<base64>", ...]}`` or a
  DataFrame column ``image``); raw ``bytes`` of the files in process;
- integer pixel arrays ``(height, width, 3)`` with values 0..255, any size (REST:
  ``{"inputs": [[[[r, g, b], ...]]]}``; in process a uint8 ``(n, height, width, 3)`` array).

Anything else (float pixels, values outside 0..255, other channel counts, bytes that are not
a JPEG or PNG file, such as GIF or BMP, images over :data:`MAX_PIXELS`, a DataFrame without
an ``image`` column) is refused with ``InvalidImageError``: HTTP 400 and one line naming the
image.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline.lib.mlflow_compat import INVALID_PARAMETER_VALUE

#: Input column (DataFrame) or key (dict) holding the images.
IMAGE_COLUMN = "image"
#: Output column with the predicted class name; one float column per class follows it.
LABEL_COLUMN = "label"
#: Artifact keys of the logged model: the Keras file and the serving config (classes, size).
MODEL_ARTIFACT = "keras_model"
CONFIG_ARTIFACT = "serving_config"
#: Largest image accepted (width x height): a 64-megapixel photo decodes to 192 MiB of uint8
#: pixels, while a small PNG claiming 50,000 x 50,000 (a decompression bomb) would need 7 GiB.
MAX_PIXELS = 1 << 26
#: Leading bytes of the two accepted file formats.
JPEG_MAGIC, PNG_MAGIC = b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"
#: Other formats TensorFlow would decode, named in the refusal.
OTHER_FORMATS = {b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP", b"RIFF": "WebP"}


class InvalidImageError(MlflowException):
    """A request the model cannot score; the scoring server answers HTTP 400 with this line.

    MLflow's scoring server rewrites an ``MlflowException``'s ``message`` to start with the
    repr of the whole request (pages of pixels or base64), so this keeps its own one line.
    """

    def __init__(self, message: str) -> None:
        self._line = message
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        """Ignored: the message stays the one line given to the constructor."""


def write_config(path: Path, classes: list[str], image_size: int) -> Path:
    """The serving config artifact: class names in output order and the model's image size."""
    path.write_text(json.dumps({"classes": list(classes), "image_size": int(image_size)}))
    return path


def _items(model_input: Any) -> list[Any]:
    """The images of a request, one entry each (encoded string/bytes or a pixel array)."""
    if isinstance(model_input, pd.DataFrame):
        columns = list(model_input.columns)
        if columns == [IMAGE_COLUMN]:
            return list(model_input[IMAGE_COLUMN])
        if columns == [0]:  # a bare list of images, as MLflow's REST parser frames it
            return list(model_input.iloc[:, 0])
        raise InvalidImageError(f"expected a column {IMAGE_COLUMN!r}, got columns {columns}")
    if isinstance(model_input, dict):
        if list(model_input) != [IMAGE_COLUMN]:
            raise InvalidImageError(f"expected the key {IMAGE_COLUMN!r}, got {list(model_input)}")
        return _items(model_input[IMAGE_COLUMN])
    if isinstance(model_input, np.ndarray):
        if model_input.dtype.kind in "biuf":
            if model_input.ndim == 3:
                return [model_input]  # one (height, width, channels) image
            if model_input.ndim == 4:
                return list(model_input)
            raise InvalidImageError(
                f"expected pixels shaped (n, height, width, 3), got shape {model_input.shape}")
        return list(model_input.reshape(-1))
    if isinstance(model_input, (str, bytes)):
        return [model_input]
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    raise InvalidImageError(f"unsupported input type {type(model_input).__name__}: send base64 "
                            "JPEG/PNG strings or uint8 (height, width, 3) pixel arrays")


def _from_base64(index: int, text: str) -> bytes:
    text = text.split(",", 1)[1] if text.startswith("data:") else text  # a data: URL
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImageError(f"image {index}: not base64-encoded JPEG/PNG ({exc})") from None


def _check_pixel_count(index: int, width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise InvalidImageError(
            f"image {index}: {width}x{height} is too many pixels (at most {MAX_PIXELS:,}); "
            "send a smaller image")


def _check_encoded(index: int, data: bytes, jpeg_shape: Any) -> None:
    """Refuse what is not a JPEG or PNG file, or is too many pixels, before decoding it.

    ``jpeg_shape`` reads a JPEG's (height, width, channels) from its header only; a PNG's
    size is in its first chunk (IHDR), at bytes 16..24.
    """
    if data.startswith(PNG_MAGIC):
        if len(data) >= 24 and data[12:16] == b"IHDR":
            width, height = struct.unpack(">II", data[16:24])
            _check_pixel_count(index, width, height)
        return
    if data.startswith(JPEG_MAGIC):
        try:
            height, width = (int(n) for n in np.asarray(jpeg_shape(data))[:2])
        except Exception:  # a broken header: the decoder below names the problem
            return
        _check_pixel_count(index, width, height)
        return
    kind = next((name for magic, name in OTHER_FORMATS.items() if data.startswith(magic)), None)
    if kind:
        raise InvalidImageError(f"image {index}: a {kind} file; only JPEG and PNG files are "
                                "accepted (or uint8 pixels)")
    raise InvalidImageError(f"image {index}: {len(data)} bytes that do not decode as a JPEG or PNG "
                            "image")


def _pixels(index: int, value: Any) -> np.ndarray:
    """``value`` as uint8 (height, width, 3) pixels, or ``InvalidImageError`` saying why not."""
    try:
        array = np.asarray(value)
    except ValueError:
        raise InvalidImageError(f"image {index}: pixel rows of unequal length") from None
    if array.dtype.kind == "f":
        raise InvalidImageError(
            f"image {index}: float pixels ({array.dtype}) are not accepted: send integers "
            "0..255 (uint8 RGB) or the JPEG/PNG file as base64")
    if array.dtype.kind not in "iu":
        raise InvalidImageError(f"image {index}: pixels must be integers 0..255, got "
                                f"{array.dtype}")
    if array.ndim != 3 or array.shape[-1] != 3:
        raise InvalidImageError(
            f"image {index}: expected RGB pixels shaped (height, width, 3), got shape "
            f"{array.shape}")
    if array.size == 0:
        raise InvalidImageError(f"image {index}: empty image, shape {array.shape}")
    _check_pixel_count(index, array.shape[1], array.shape[0])
    low, high = int(array.min()), int(array.max())
    if low < 0 or high > 255:
        raise InvalidImageError(f"image {index}: pixel values must be in 0..255, got "
                                f"{low}..{high}")
    return array.astype(np.uint8, copy=False)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Keras classifier behind the training data's decoder; returns label + class probabilities."""

    def load_context(self, context: Any) -> None:
        """Load the Keras model and trace the decode, resize and forward functions once.

        Tracing here, not on the first request, keeps the first request as fast as the rest.
        """
        import keras
        import tensorflow as tf

        from pipeline.lib import images, views  # noqa: F401 (views registers DihedralView)

        config = json.loads(Path(context.artifacts[CONFIG_ARTIFACT]).read_text())
        self.classes = [str(c) for c in config["classes"]]
        size = int(config["image_size"])
        model = keras.saving.load_model(context.artifacts[MODEL_ARTIFACT], safe_mode=True,
                                        compile=False)
        resizer = images.make_resizer(size)
        self._decode_error = tf.errors.InvalidArgumentError
        self._jpeg_shape = tf.io.extract_jpeg_shape
        self._decode = tf.function(
            lambda encoded: images.decode_image(encoded, resizer),
            input_signature=[tf.TensorSpec([], tf.string)])
        self._fit = tf.function(
            lambda pixels: images.fit_image(pixels, resizer),
            input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
        self._forward = tf.function(
            lambda batch: model(tf.cast(batch, tf.float32), training=False),
            input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        self._decode(tf.io.encode_png(tf.zeros([2, 2, 3], tf.uint8)))
        self._forward(self._fit(np.zeros((size + 1, size, 3), np.uint8))[None])

    def _prepare(self, index: int, item: Any) -> np.ndarray:
        """One request item as the model's uint8 [size, size, 3] input."""
        if isinstance(item, str):
            item = _from_base64(index, item)
        if isinstance(item, (bytes, bytearray)):
            if not item:
                raise InvalidImageError(f"image {index}: empty")
            _check_encoded(index, bytes(item), self._jpeg_shape)
            try:
                return self._decode(bytes(item)).numpy()
            except self._decode_error:
                raise InvalidImageError(
                    f"image {index}: {len(item)} bytes that do not decode as a JPEG or PNG "
                    "image") from None
        if isinstance(item, (list, np.ndarray)):
            return self._fit(_pixels(index, item)).numpy()
        raise InvalidImageError(f"image {index}: expected a base64 JPEG/PNG string or uint8 "
                                f"(height, width, 3) pixels, got {type(item).__name__}")

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        """One row per image: ``label`` (the most probable class) and each class's probability.

        The arguments carry no type hints on purpose: MLflow reads a hint on ``model_input``
        as a schema, validates requests against it and skips parsing the REST formats.
        """
        items = _items(model_input)
        if not items:
            raise InvalidImageError("no images in the request")
        batch = np.stack([self._prepare(i, item) for i, item in enumerate(items)])
        probabilities = np.asarray(self._forward(batch))
        frame = pd.DataFrame(probabilities, columns=self.classes)
        frame.insert(0, LABEL_COLUMN, [self.classes[k] for k in probabilities.argmax(axis=1)])
        return frame


__all__ = ["CONFIG_ARTIFACT", "IMAGE_COLUMN", "LABEL_COLUMN", "MAX_PIXELS", "MODEL_ARTIFACT",
           "ImageClassifier", "InvalidImageError", "write_config"]
