"""The typed inputs of each step: small frozen objects holding exactly the fields a step reads.

A step that takes the whole ``PipelineConfig`` hides which fields matter, and a component that
rebuilds that config from the few parameters it declares silently fills the rest with
defaults. Each step therefore takes one of these; its fields are the step component's
parameters (``tests/test_params.py`` checks both directions from the code), and reading a
field the object lacks raises ``AttributeError`` instead of returning a default.
``PipelineConfig.params_for`` builds them from the config in one place; which step takes
which is its entry in ``pipeline/stepspec.py``.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Self


@dataclasses.dataclass(frozen=True, slots=True)
class StepParams:
    """Base: construction from a mapping (component locals, a config dict) by field name."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Self:
        """Pick this class's fields from ``values``; a missing one is a ``KeyError`` naming it."""
        missing = [name for name in cls.field_names() if name not in values]
        if missing:
            raise KeyError(f"{cls.__name__} needs {', '.join(missing)}")
        return cls(**cls.typed({name: values[name] for name in cls.field_names()}))

    @classmethod
    def typed(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        """``values`` with this class's int fields whole again (:func:`_as_type`); other keys
        pass through unchanged."""
        types = typing.get_type_hints(cls)
        return {k: _as_type(v, types[k]) if k in types else v for k, v in values.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, slots=True)
class DownloadParams(StepParams):
    data_source: str
    data_sha256: str
    download_deadline_s: float
    download_min_bytes_per_s: float


@dataclasses.dataclass(frozen=True, slots=True)
class PreprocessParams(StepParams):
    split_seed: int
    val_fraction: float
    test_fraction: float
    min_images_per_class: int
    min_image_side: int
    max_archive_bytes: int
    max_archive_entries: int
    max_entry_compression_ratio: float
    max_archive_compression_ratio: float
    max_image_bytes: int


#: Test-time views the exported model may average over (flips, turns; 0 is off).
TTA_VIEWS = (0, 2, 4, 8)


@dataclasses.dataclass(frozen=True, slots=True)
class TrainParams(StepParams):
    seed: int
    image_size: int
    batch_size: int
    augment_flip: bool
    augment_rotation: float
    augment_shift: float
    augment_zoom: float
    augment_contrast: float
    augment_placement: str
    model: str
    backbone: str
    alpha: float
    weights: str
    weights_sha256: str
    dropout: float
    pooling: str
    epochs: int
    steps_per_epoch: int
    learning_rate: float
    fine_tune_epochs: int
    fine_tune_learning_rate: float
    fine_tune_layers: int
    early_stopping_patience: int
    head_feature_views: int
    head_c: float
    cv_folds: int
    class_weights: bool
    mixed_precision: bool
    xla: bool
    deterministic: bool
    tta_views: int


@dataclasses.dataclass(frozen=True, slots=True)
class EvaluateParams(StepParams):
    """No ``image_size``: test images are decoded at the size the model was trained on (its
    training summary), so a sweep's trials may differ in it."""

    batch_size: int
    gate_metric: str
    gate_threshold: float
    gate_on: str


@dataclasses.dataclass(frozen=True, slots=True)
class SelectParams(StepParams):
    """A sweep chooses its trial on the metric the gate reads: out of fold when the trials
    were cross-validated, else on the validation split."""

    gate_metric: str
    sweep_choice: str


@dataclasses.dataclass(frozen=True, slots=True)
class RegisterParams(StepParams):
    registered_model_name: str
    gate_metric: str
    promotion_margin: float


@dataclasses.dataclass(frozen=True, slots=True)
class PredictParams(StepParams):
    """Batch predictions: which registered model scores the new images, and the same file
    checks and archive limits as preprocess (no labels, so no class or split settings)."""

    model_uri: str
    batch_size: int
    min_image_side: int
    max_archive_bytes: int
    max_archive_entries: int
    max_entry_compression_ratio: float
    max_archive_compression_ratio: float
    max_image_bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class TrackingParams(StepParams):
    """Where and under which pipeline run a tracked step logs to MLflow."""

    tracking_uri: str
    experiment_name: str
    pipeline_run_id: str
    pipeline_name: str


def _as_type(value: Any, target: Any) -> Any:
    """Undo JSON's and KFP metadata's number widening: ``5.0`` for an int field is ``5``."""
    if target is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


__all__ = [
    "TTA_VIEWS",
    "DownloadParams",
    "EvaluateParams",
    "PredictParams",
    "PreprocessParams",
    "RegisterParams",
    "SelectParams",
    "StepParams",
    "TrackingParams",
    "TrainParams",
]
