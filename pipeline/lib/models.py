"""The two classifiers (the notebook's CNN, transfer learning on a Keras backbone), safe loading.

Both models take raw RGB images of any size with values 0..255 (uint8 or float): resizing and
rescaling are layers of the model itself, so serving cannot drift from training.
"""

from __future__ import annotations

import contextlib
import logging
import os
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import keras
import numpy as np

from pipeline.lib.backbones import BACKBONES, SEED_CNN, TRANSFER, BackboneSpec, canonical_model
from pipeline.lib.contract import MODEL_FILE
from pipeline.lib.files import file_sha256, normalize_sha256
from pipeline.lib.images import RESIZE
from pipeline.lib.inputs import RandomAugment, make_resizer
from pipeline.lib.params import TTA_VIEWS, TrainParams
from pipeline.lib.views import DihedralView, ViewMean, ViewStack

logger = logging.getLogger(__name__)

BACKBONE = "backbone"
POOL = "pool"
#: Layer names of :func:`build_transfer` that :func:`split_at_backbone` calls again.
RESCALE, POOL_AVG, POOL_MAX, HEAD_DROPOUT = "rescale", "pool_avg", "pool_max", "head_dropout"
HEAD = "probabilities"


class WeightsDownloadError(OSError):
    """The backbone's weights could not be fetched; the message says how to use a local file."""


def resolve_weights(weights: str, sha256: str = "", *,
                    cache_dir: str | Path | None = None) -> str | None:
    """Map config.weights to what ``keras.applications`` accepts: "imagenet", a file, or None.

    A URL is downloaded once into Keras' cache (``cache_dir``, default ``$KERAS_HOME``;
    air-gapped clusters point at a local mirror); a local path must exist, so a typo fails
    here with the path instead of deep in Keras. With ``sha256`` (config.weights_sha256) the
    file must match it: a mismatching download is removed (a stale cached copy of the same
    name is fetched again once first), a mismatching local file is refused.
    """
    expected = normalize_sha256(sha256)
    value = weights.strip()
    if value.lower() in {"none", ""}:
        return None
    if value == "imagenet":
        return "imagenet"
    scheme = urlparse(value).scheme
    if scheme in {"http", "https"}:
        name = os.path.basename(urlparse(value).path) or "backbone_weights.h5"
        fetched = Path(keras.utils.get_file(fname=name, origin=value, cache_subdir="models",
                                            cache_dir=cache_dir))
        if expected is not None and file_sha256(fetched) != expected:
            fetched = Path(keras.utils.get_file(fname=name, origin=value, cache_subdir="models",
                                                cache_dir=cache_dir, force_download=True))
            actual = file_sha256(fetched)
            if actual != expected:
                fetched.unlink(missing_ok=True)
                raise ValueError(f"weights from {value} have sha256 {actual}, not "
                                 f"weights_sha256 {expected}; the download was removed")
        return str(fetched)
    if scheme == "file":
        value = urlparse(value).path
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file not found: {str(path)!r} (config.weights: use 'imagenet', "
            "a local .h5 path, an http(s) URL, or 'none')"
        )
    if expected is not None and (actual := file_sha256(path)) != expected:
        raise ValueError(f"weights file {str(path)!r} has sha256 {actual}, not "
                         f"weights_sha256 {expected}")
    return str(path)


@contextlib.contextmanager
def _weights_download(weights: str) -> Iterator[None]:
    """Turn a failed weights download into an error that says how to use a local copy.

    Keras' ``get_file`` raises a bare ``Exception`` ("URL fetch failure ...") from the
    ``URLError``; without network (the README's first command on an air-gapped machine) the
    fix is a local weights file, so the message names both ways to give one.
    """
    try:
        yield
    except Exception as exc:
        network = (urllib.error.URLError, ConnectionError, TimeoutError)
        if not isinstance(exc, network) and not isinstance(exc.__context__, network):
            raise  # e.g. a missing local file: resolve_weights' own message says it
        raise WeightsDownloadError(
            f"could not download the backbone weights for weights={weights!r}: {exc}; to use "
            "a local copy instead (a Keras MobileNet .h5 without top for this alpha), set "
            "IRIS_MODEL_WEIGHTS=PATH or pass --set weights=PATH"
        ) from exc


def build_seed_cnn(image_size: int, num_classes: int) -> keras.Model:
    """The notebook's CNN, layer for layer, behind resize + 1/255 rescaling.

    Five 3x3 ReLU convolutions (16, 32, 64, 64, 64 filters) each followed by 2x2 max pooling,
    dropout 0.5 after the 2nd and 3rd convolutions and after flattening (where the notebook
    has it), a 512-unit ReLU dense layer and the softmax output.
    """
    layers = keras.layers
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = make_resizer(image_size)(inputs)
    x = layers.Rescaling(1.0 / 255, name=RESCALE)(x)
    x = layers.Conv2D(16, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(512, activation="relu")(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32",
                           name="probabilities")(x)
    return keras.Model(inputs, outputs, name="seed_cnn")


def build_backbone(config: TrainParams) -> keras.Model:
    """``config.backbone`` without its top, at ``config.image_size``, with ``config.weights``.

    A weights file is loaded by Keras' ``load_weights`` on the application model, which for
    legacy ``.h5`` files goes by layer order: the MobileNetV2 file in ``../shared/data``,
    whose layer names follow an older Keras scheme, loads this way.
    """
    spec = BACKBONES.get(config.backbone)
    if spec is None:
        raise ValueError(f"unknown backbone {config.backbone!r}; choose one of {sorted(BACKBONES)}")
    size = config.image_size
    if size < 32:
        raise ValueError(f"backbone {config.backbone!r} needs image_size >= 32, got {size}")
    kwargs: dict[str, object] = {"alpha": config.alpha} if spec.takes_alpha else {}
    if spec.rescale is None:
        kwargs["include_preprocessing"] = True
    with _weights_download(config.weights):
        weights = resolve_weights(config.weights, config.weights_sha256)
        try:
            backbone = getattr(keras.applications, spec.application)(
                input_shape=(size, size, 3), include_top=False, weights=weights, pooling=None,
                **kwargs,
            )
        except ValueError as exc:
            if weights in (None, "imagenet"):
                raise
            # e.g. IRIS_MODEL_WEIGHTS left at another backbone's file: say which, and the fix
            raise ValueError(
                f"weights file {weights!r} does not fit backbone {config.backbone!r}"
                f"{f' at alpha {config.alpha}' if spec.takes_alpha else ''} ({exc}); give "
                "that backbone's no-top weights file with --set weights=PATH or "
                "IRIS_MODEL_WEIGHTS=PATH") from exc
    backbone.name = BACKBONE
    backbone.trainable = False
    logger.info("backbone %s%s at %dx%d, weights=%s", spec.application,
                f" alpha={config.alpha}" if spec.takes_alpha else "", size, size,
                weights or "random")
    return backbone


def build_transfer(config: TrainParams, num_classes: int) -> keras.Model:
    """ImageNet backbone (frozen; see :func:`set_fine_tune`) + pooling, dropout, softmax.

    ``config.backbone`` picks the backbone, ``config.pooling`` global average pooling or
    average and max pooling concatenated.

    The backbone runs in inference mode (``training=False``) even while fine-tuning, so its
    BatchNorm statistics are never re-estimated from our few hundred images.
    """
    backbone = build_backbone(config)
    rescale = BACKBONES[config.backbone].rescale
    layers = keras.layers
    inputs = keras.Input(shape=(None, None, 3), name="image")
    x = make_resizer(config.image_size)(inputs)
    if rescale is not None:
        x = layers.Rescaling(rescale[0], offset=rescale[1], name=RESCALE)(x)
    x = backbone(x, training=False)
    if config.pooling == "avg_max":
        # Max pooling keeps where a few cells respond strongly (a petal's colour or edge);
        # with the average it scored better on held-out data than the average alone.
        pooled = [layers.GlobalAveragePooling2D(name=POOL_AVG)(x),
                  layers.GlobalMaxPooling2D(name=POOL_MAX)(x)]
        x = layers.Concatenate(name=POOL)(pooled)
    else:
        x = layers.GlobalAveragePooling2D(name=POOL)(x)
    x = layers.Dropout(config.dropout, name=HEAD_DROPOUT)(x)
    outputs = layers.Dense(num_classes, activation="softmax", dtype="float32", name=HEAD)(x)
    return keras.Model(inputs, outputs, name=f"{config.backbone}_classifier")


def split_at_backbone(classifier: keras.Model) -> tuple[Callable[[Any], Any],
                                                       Callable[[Any], Any]]:
    """A :func:`build_transfer` classifier as two functions, images -> the backbone's feature
    map -> probabilities, calling its own layers in its order (inference mode).

    For gradients with respect to the feature map: the nested backbone's ``output`` belongs
    to its own graph, not to the classifier's.
    """
    layers = {layer.name: layer for layer in classifier.layers}

    def to_features(images: Any) -> Any:
        x = layers[RESIZE](images)
        if RESCALE in layers:
            x = layers[RESCALE](x)
        return layers[BACKBONE](x, training=False)

    def to_probabilities(features: Any) -> Any:
        if POOL_AVG in layers:  # avg_max pooling
            pooled = layers[POOL]([layers[POOL_AVG](features), layers[POOL_MAX](features)])
        else:
            pooled = layers[POOL](features)
        return layers[HEAD](layers[HEAD_DROPOUT](pooled, training=False))

    return to_features, to_probabilities


def build_model(config: TrainParams, num_classes: int) -> keras.Model:
    """The model ``config.model`` names, taking raw 0..255 RGB images of any size."""
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes, got {num_classes}")
    model = canonical_model(config.model)
    if model == SEED_CNN:
        return build_seed_cnn(config.image_size, num_classes)
    if model == TRANSFER:
        return build_transfer(config, num_classes)
    raise ValueError(f"unknown model {config.model!r}; choose {TRANSFER!r} or {SEED_CNN!r}")


#: Custom objects a saved model may reference; registered, listed here for safe-mode loading.
CUSTOM_OBJECTS = {"iris>RandomAugment": RandomAugment, "iris>DihedralView": DihedralView,
                  "iris>ViewStack": ViewStack, "iris>ViewMean": ViewMean}


def with_test_time_views(model: keras.Model, views: int, image_size: int) -> keras.Model:
    """``model`` averaging its probabilities over the first ``views`` of :class:`DihedralView`.

    Test-time augmentation as layers of the exported model, so serving returns exactly what
    evaluation scored; training never sees this wrapper. Each image is resized by the model's
    own resize to ``image_size``, its views stacked into one batch for one call of ``model``
    (:class:`ViewStack`) and averaged back (:class:`ViewMean`). ``views`` 0 returns ``model``.
    """
    if views == 0:
        return model
    if views not in TTA_VIEWS:
        raise ValueError(f"tta_views must be one of {list(TTA_VIEWS)}, got {views!r}")
    resize = make_resizer(image_size).get_config()
    options = {key: resize[key] for key in ("interpolation", "antialias", "crop_to_aspect_ratio")}
    inputs = keras.Input(shape=(None, None, 3), name="image")
    stacked = ViewStack(views, image_size, options, name="views")(inputs)
    averaged = ViewMean(views, dtype="float32", name=HEAD)(model(stacked))
    return keras.Model(inputs, averaged, name=f"{model.name}_tta{views}")


def view_batched_predictor(model: keras.Model, image_size: int) -> Callable[[Any], np.ndarray]:
    """``model``'s probabilities for square ``image_size`` batches, all views in one pass.

    A model exported with :class:`ViewStack` already runs its views as one batch and is run
    as it is (as a graph, which frees each activation after its last use). One exported
    before it (a champion from an earlier run) calls its classifier once per
    :class:`DihedralView`, 8 separate small passes; here its views are stacked into one batch
    of ``views x images`` for one call of the classifier, then averaged in the same order as
    its ``Average`` layer: its numbers, in one backbone call. Callers keep ``views x images``
    near their backbone batch size (:func:`test_time_view_count`).
    """
    import tensorflow as tf

    views = [layer for layer in model.layers if isinstance(layer, DihedralView)]
    classifiers = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if not views or len(classifiers) != 1:  # no test-time views: the model is the classifier
        views, classifier = [DihedralView(0)], model
    else:
        classifier = classifiers[0]
    spec = tf.TensorSpec([None, image_size, image_size, 3], tf.float32)

    @tf.function(input_signature=[spec])
    def predict(images: tf.Tensor) -> tf.Tensor:
        parts = tf.split(classifier(tf.concat([view(images) for view in views], 0),
                                    training=False), len(views))
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        return total / len(views)

    return lambda images: np.asarray(predict(tf.cast(images, tf.float32)))


def test_time_view_count(model: keras.Model) -> int:
    """How many test-time views ``model`` averages (1 without them)."""
    stacks = [layer.views for layer in model.layers if isinstance(layer, ViewStack)]
    return max(1, *stacks, sum(isinstance(layer, DihedralView) for layer in model.layers))


def has_backbone(model: keras.Model) -> bool:
    return any(layer.name == BACKBONE for layer in model.layers)


def classifier_of(model: keras.Model) -> keras.Model:
    """The classifier inside an exported model's test-time views wrapper (or ``model``)."""
    inner = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return inner[0] if len(inner) == 1 and not has_backbone(model) else model


def set_fine_tune(model: keras.Model, num_layers: int) -> int:
    """Unfreeze the last ``num_layers`` convolution layers of the backbone (0: all of them).

    BatchNorm layers stay frozen (inference statistics); returns how many layers now train.
    """
    backbone = model.get_layer(BACKBONE)
    backbone.trainable = True
    convs = [layer for layer in backbone.layers
             if layer.weights and not isinstance(layer, keras.layers.BatchNormalization)]
    chosen = {id(layer) for layer in (convs if num_layers <= 0 else convs[-num_layers:])}
    for layer in backbone.layers:
        layer.trainable = id(layer) in chosen
    return len(chosen)


def load_model(model_dir: str | Path) -> keras.Model:
    """Load ``model_dir/model.keras`` in Keras safe mode (no arbitrary code from the file)."""
    path = Path(model_dir) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no trained model at {str(path)!r}")
    return keras.saving.load_model(path, safe_mode=True, compile=False,
                                   custom_objects=CUSTOM_OBJECTS)


__all__ = [
    "BACKBONE",
    "BACKBONES",
    "HEAD",
    "POOL",
    "BackboneSpec",
    "DihedralView",
    "ViewMean",
    "ViewStack",
    "WeightsDownloadError",
    "build_backbone",
    "build_model",
    "build_seed_cnn",
    "build_transfer",
    "has_backbone",
    "load_model",
    "resolve_weights",
    "set_fine_tune",
    "test_time_view_count",
    "view_batched_predictor",
    "with_test_time_views",
]
