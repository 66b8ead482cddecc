"""The model and backbone choices in one TensorFlow-free table (config checks, names, builders).

``model="transfer"`` is transfer learning on any ``backbone`` of :data:`BACKBONES`;
``model="seed_cnn"`` is the notebook's CNN. The config validates against these tables and
:mod:`pipeline.lib.models` builds from them, so a backbone is added in one place.
"""

from __future__ import annotations

import dataclasses
import logging

logger = logging.getLogger(__name__)

TRANSFER = "transfer"
SEED_CNN = "seed_cnn"
#: Every ``config.model``.
MODELS = (TRANSFER, SEED_CNN)
#: Old spellings still accepted, with a deprecation warning: "mobilenet" meant transfer
#: learning on any backbone, not only a MobileNet.
DEPRECATED_MODELS = {"mobilenet": TRANSFER}


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """How to build one ``keras.applications`` backbone and feed it raw 0..255 pixels.

    ``rescale`` (scale, offset) is applied by the model's own ``rescale`` layer for backbones
    that expect preprocessed input; None means the application's own preprocessing layers
    (``include_preprocessing``) take 0..255 pixels, so either way it lives in the model.
    """

    application: str  # attribute of keras.applications
    takes_alpha: bool
    rescale: tuple[float, float] | None


#: Every ``config.backbone`` and how it is built.
BACKBONES: dict[str, BackboneSpec] = {
    "mobilenet": BackboneSpec("MobileNet", True, (1.0 / 127.5, -1.0)),  # v1, [-1, 1]
    "mobilenet_v2": BackboneSpec("MobileNetV2", True, (1.0 / 127.5, -1.0)),
    "mobilenet_v3_small": BackboneSpec("MobileNetV3Small", True, None),
    "mobilenet_v3_large": BackboneSpec("MobileNetV3Large", True, None),
    "efficientnet_v2_b0": BackboneSpec("EfficientNetV2B0", False, None),
    "convnext_tiny": BackboneSpec("ConvNeXtTiny", False, None),
}


def canonical_model(model: str) -> str:
    """``model`` in its current spelling; a deprecated one is mapped, with a warning."""
    if isinstance(model, str) and model in DEPRECATED_MODELS:
        logger.warning("model=%r is deprecated: use model=%r (transfer learning on `backbone`)",
                       model, DEPRECATED_MODELS[model])
        return DEPRECATED_MODELS[model]
    return model


def model_label(model: str, backbone: str, alpha: float, image_size: int) -> str:
    """What a trained model is, for names: ``mobilenet_v2-a0_5-320px`` or ``seed_cnn-128px``.

    Transfer learning is named by its backbone (with the width ``alpha`` where it applies),
    so a MobileNetV2 model is not called "mobilenet". No dots: MLflow refuses them (and
    ``/ : % " '``) in logged-model names, so ``alpha`` 0.5 reads ``a0_5``.
    """
    if DEPRECATED_MODELS.get(model, model) != TRANSFER:
        return f"{model}-{image_size}px"
    spec = BACKBONES.get(backbone)
    width = f"-a{alpha:g}".replace(".", "_") if spec is not None and spec.takes_alpha else ""
    return f"{backbone}{width}-{image_size}px"


__all__ = ["BACKBONES", "DEPRECATED_MODELS", "MODELS", "SEED_CNN", "TRANSFER", "BackboneSpec",
           "canonical_model", "model_label"]
