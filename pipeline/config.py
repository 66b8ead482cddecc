"""The one configuration object: every pipeline parameter, its type and documented default."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline import PROJECT_ROOT
from pipeline.lib.archive import (
    DEFAULT_MAX_ARCHIVE_RATIO,
    DEFAULT_MAX_ENTRY_RATIO,
    DEFAULT_MAX_IMAGE_BYTES,
)
from pipeline.lib.backbones import BACKBONES, MODELS, TRANSFER, canonical_model
from pipeline.lib.folds import MAX_FOLDS, MIN_FOLDS
from pipeline.lib.params import TTA_VIEWS, StepParams
from pipeline.lib.selection import CHEAPEST_WITHIN_NOISE, RULES

P = typing.TypeVar("P", bound=StepParams)

#: Where the seed notebook downloads ``iris-image.zip`` from (``wget``).
DEFAULT_DATA_SOURCE = "https://github.com/jeffheaton/data-mirror/releases/download/v1/iris-image.zip"
#: sha256 of that archive (see ``../shared/data/README.md``).
DEFAULT_DATA_SHA256 = "48a5f6b0ad1019f4f7ce2628e08e9f71104ae625db1b7e4c24eaf051133f4589"

#: Environment variables the CLI reads (and only the CLI, through :func:`env_overrides`):
#: they let CI and air-gapped users point the pipeline at local copies without editing files.
ENV_OVERRIDES: dict[str, str] = {
    "IRIS_DATA_SOURCE": "data_source",
    "IRIS_DATA_SHA256": "data_sha256",
    "IRIS_MODEL_WEIGHTS": "weights",
}

#: Container images the pipeline compiles with; written by ``containers/build.sh``.
IMAGES_FILE = PROJECT_ROOT / "containers" / "images.json"

HEX_DIGITS = "0123456789abcdef"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Every tunable of the pipeline, with the notebook's value or a measured better one.

    Only primitives (str, int, float, bool) so that each field becomes one KFP pipeline
    parameter and one MLflow param. Field comments say where a default comes from.
    """

    # --- data -------------------------------------------------------------------------
    data_source: str = DEFAULT_DATA_SOURCE  # notebook: wget of the public archive
    data_sha256: str = DEFAULT_DATA_SHA256  # "" or "none" skips the check (e.g. a local folder)
    seed: int = 42  # one seed drives shuffling, augmentation and init
    # the train/val/test split's seed, apart from `seed` so runs with other seeds are scored on
    # the same test images and the registry can compare them image by image (paired)
    split_seed: int = 42
    val_fraction: float = 0.15  # notebook: none (it scores its training images)
    test_fraction: float = 0.15  # held-out test split, the only one metrics are reported on
    min_images_per_class: int = 5  # fewer usable images in a class is an error
    min_image_side: int = 32  # smaller images are skipped as unreadable
    max_archive_bytes: int = 2_000_000_000  # zip-bomb guard: total uncompressed size
    max_archive_entries: int = 100_000  # zip-bomb guard: number of entries
    # zip-bomb guards on expansion (uncompressed / compressed bytes), checked for entries and
    # archives above 1 MiB
    max_entry_compression_ratio: float = DEFAULT_MAX_ENTRY_RATIO  # one zip entry
    max_archive_compression_ratio: float = DEFAULT_MAX_ARCHIVE_RATIO  # whole zip or tar.*
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # larger files are skipped before being read
    download_deadline_s: float = 1800.0  # whole download, retries included
    # a download slower than this over 30 s is a stall and is retried; 0 turns the check off
    download_min_bytes_per_s: float = 1024.0

    # --- input pipeline and augmentation (notebook: ImageDataGenerator) -------------------
    # notebook: 256; MobileNet v1's ImageNet size (README: Sweeps: MobileNetV2 at 320 px
    # scored within noise out of fold and cost about 4x to serve, 30x with 8 test-time views)
    image_size: int = 224
    batch_size: int = 32  # notebook: flow_from_directory's default, 32
    augment_flip: bool = True  # notebook: horizontal_flip and vertical_flip
    augment_rotation: float = 1.0  # fraction of a full turn; notebook: rotation_range=360
    augment_shift: float = 0.2  # fraction of width; notebook: width_shift_range=[-200, 200]
    augment_zoom: float = 0.1  # not in the notebook; 0 turns it off
    augment_contrast: float = 0.1  # not in the notebook; 0 turns it off
    augment_placement: str = "auto"  # "auto": in the model on GPU, in tf.data on CPU

    # --- model ------------------------------------------------------------------------
    # "transfer" (transfer learning on `backbone`) or "seed_cnn"; "mobilenet" is the old,
    # deprecated spelling of "transfer"
    model: str = "transfer"
    # keras.applications backbone of model=transfer (BACKBONES; "mobilenet" is v1): MobileNet
    # v1-0.25 at 224 px is the cheapest trial of sweeps/default.yaml within noise of the best
    # out of fold, chosen by the sweep's own rule over 5 seeds (README: Sweeps)
    backbone: str = "mobilenet"
    alpha: float = 0.25  # width multiplier of the MobileNet backbones (v1-v3); others ignore it
    weights: str = "imagenet"  # "imagenet" (Keras downloads), a local path or URL, or "none"
    weights_sha256: str = ""  # sha256 a weights path or URL must match; "" skips the check
    dropout: float = 0.2  # before the softmax head
    # backbone features pooled by "avg" (Keras' usual) or "avg_max" (average and max pooling
    # concatenated: twice the head's inputs, and no better out of fold; README: Sweeps)
    pooling: str = "avg"
    # test-time views averaged by the exported model: 0 off, 2 the horizontal flip, 4 also the
    # vertical flip and half turn, 8 also the quarter turns and transposes (TTA_VIEWS)
    tta_views: int = 0

    # --- training -----------------------------------------------------------------------
    epochs: int = 50  # notebook: 50 (early stopping usually ends sooner)
    steps_per_epoch: int = 0  # notebook: 10; 0 means one pass over the training split
    learning_rate: float = 1e-3  # notebook: Adam's default, 1e-3
    fine_tune_epochs: int = 0  # > 0 unfreezes the backbone after the head is trained
    fine_tune_learning_rate: float = 1e-5  # learning rate while fine-tuning
    fine_tune_layers: int = 0  # conv layers unfrozen from the top of the backbone; 0 = all
    early_stopping_patience: int = 5  # epochs without val-loss improvement before stopping
    # frozen-backbone head: trained with Keras epochs on cached features of the training images
    # plus this many augmented views each (bench/train_quality.py: seconds, not minutes, and
    # better held-out scores than end-to-end head epochs); 0 trains it on images end to end
    head_feature_views: int = 8
    head_c: float = 0.003  # inverse L2 strength of that head (as in logistic regression)
    # k-fold cross-validation over train + validation (frozen-backbone feature head only):
    # the out-of-fold score, with its interval, is what a sweep chooses on; 0 keeps the
    # single validation split (README: Sweeps, Cross-validation)
    cv_folds: int = 0
    # how a sweep chooses among cross-validated trials: the cheapest to serve of those not
    # shown worse than the leader ("cheapest_within_noise"), or the leader itself
    # ("best_score": when serving cost does not matter); without folds, the best validation
    # score either way (README: Cross-validation)
    sweep_choice: str = CHEAPEST_WITHIN_NOISE
    class_weights: bool = True  # weight the loss by inverse class frequency
    mixed_precision: bool = True  # mixed_float16 when a GPU is present (ignored on CPU)
    xla: bool = False  # jit_compile the train step
    deterministic: bool = True  # TF op determinism: same seed + data + machine = same metrics

    # --- evaluation, registry, tracking ------------------------------------------------------
    gate_metric: str = "balanced_accuracy"  # test metric the registry gate reads
    gate_threshold: float = 0.5  # register only when gate_metric >= this
    # what the gate compares with gate_threshold: the "point" estimate or "ci_low", the lower
    # end of its 95% bootstrap interval. "point": on ~60 test images ci_low sits ~0.15 below
    # the point estimate, so "ci_low" would turn most default runs away (README)
    gate_on: str = "point"
    # a new version takes the champion alias only when it beats the champion by more than
    # this: the lower end of the paired interval of the difference (same test images), else
    # the point estimates' difference
    promotion_margin: float = 0.0
    registered_model_name: str = "iris-image-classifier"
    experiment_name: str = "iris-image-classification"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", canonical_model(self.model))
        validate(self)

    # ----------------------------------------------------------------------------------
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def field_types(cls) -> dict[str, type]:
        """Resolved Python type of every field (str, int, float or bool)."""
        hints = typing.get_type_hints(cls)
        return {name: hints[name] for name in cls.field_names()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def params_for(self, params_type: type[P]) -> P:
        """The typed inputs of one step (``pipeline.lib.params``), taken from this config."""
        return params_type.from_mapping(self.to_dict())

    @classmethod
    def from_mapping(
        cls, values: Mapping[str, Any], base: PipelineConfig | None = None
    ) -> PipelineConfig:
        """A config from ``values`` on top of ``base`` (defaults), converting strings by type.

        Unknown keys and values that do not convert raise ``ValueError`` naming the key and
        listing the valid ones, so ``--set`` typos fail fast instead of being ignored.
        """
        types_by_name = cls.field_types()
        unknown = sorted(set(values) - set(types_by_name))
        if unknown:
            raise ValueError(
                f"unknown config key(s) {', '.join(map(repr, unknown))}; "
                f"valid keys: {', '.join(sorted(types_by_name))}"
            )
        converted = {k: coerce(k, v, types_by_name[k]) for k, v in values.items()}
        return dataclasses.replace(base or cls(), **converted)

    @classmethod
    def from_yaml(cls, path: str | Path, base: PipelineConfig | None = None) -> PipelineConfig:
        return cls.from_mapping(read_yaml_mapping(path), base)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader refusing a key given twice in one mapping (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)  # type: ignore[no-untyped-call]
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """The ``key: value`` mapping of a YAML config file; ``ValueError`` names a bad file.

    A key given twice, a file that is not UTF-8 or not YAML, and a top level that is not a
    mapping are refused, naming the file (and the line of a repeated key).
    """
    path = Path(path)
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
    except UnicodeDecodeError as exc:
        raise ValueError(f"cannot read config file {str(path)!r}: not UTF-8 text "
                         f"(byte {exc.start}: {exc.reason})") from exc
    except (OSError, yaml.YAMLError) as exc:
        problem = " ".join(str(exc).split())  # one line: PyYAML's marks span several
        raise ValueError(f"cannot read config file {str(path)!r}: {problem}") from exc
    if not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of key: value")
    return loaded


def coerce(key: str, value: Any, target: type) -> Any:
    """Convert ``value`` (often a CLI string) to ``target``; ``ValueError`` names the key.

    YAML's ``null`` and booleans are no number or string (``epochs: true`` is not 1,
    ``data_source: null`` is not "None"), nor is a list or mapping.
    """
    if value is None or isinstance(value, (list, dict)) or (
            isinstance(value, bool) and target is not bool):
        hint = (" (YAML reads yes/no/on/off/true/false as booleans: quote it)"
                if isinstance(value, bool) and target is str else "")
        raise ValueError(f"config key {key!r} expects {target.__name__}, got {value!r}{hint}")
    if isinstance(value, target):
        return value
    try:
        if target is bool:
            if isinstance(value, str):
                lowered = value.strip().lower()
                if lowered in {"1", "true", "yes", "on"}:
                    return True
                if lowered in {"0", "false", "no", "off"}:
                    return False
                raise ValueError(value)
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if target is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if target is float:
            return float(value)
        if target is str:
            return str(value)
    except (TypeError, ValueError, OverflowError):
        pass
    raise ValueError(f"config key {key!r} expects {target.__name__}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a numeric field may take: ``low`` to ``high``, each end in or out."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        return (f"{'(' if self.low_open else '['}{self.low!r}, {self.high!r}"
                f"{')' if self.high_open else ']'}")


#: Largest integer a KFP parameter (a JSON number, a double) and an MLflow param hold exactly.
MAX_EXACT_INT = 2**53
#: Most epochs (or steps) any training here could run; also far inside TensorFlow's int64.
MAX_EPOCHS = 100_000
#: Every numeric field's range, checked before any work starts, so that a value no step (or
#: TensorFlow, KFP, MLflow) could hold fails here naming the field instead of deep in a step.
RANGES: dict[str, Bounds] = {
    "seed": Bounds(0, 2**32 - 1),  # what NumPy and TensorFlow seeding accept
    "split_seed": Bounds(0, 2**32 - 1),  # recorded in reports: kept to the seed's range
    "val_fraction": Bounds(0.0, 1.0, low_open=True, high_open=True),
    "test_fraction": Bounds(0.0, 1.0, low_open=True, high_open=True),
    "min_images_per_class": Bounds(1, 1_000_000),
    "min_image_side": Bounds(1, 65_535),  # the largest side a JPEG can have
    "max_archive_bytes": Bounds(1, MAX_EXACT_INT),
    "max_archive_entries": Bounds(1, 1_000_000_000),
    "max_entry_compression_ratio": Bounds(1.0, 1e6),
    "max_archive_compression_ratio": Bounds(1.0, 1e6),
    "max_image_bytes": Bounds(1, MAX_EXACT_INT),
    "download_deadline_s": Bounds(0.0, 1e7, low_open=True),  # about 4 months
    "download_min_bytes_per_s": Bounds(0.0, 1e12),
    "image_size": Bounds(32, 1024),  # MobileNet's smallest input; larger only costs memory
    "batch_size": Bounds(1, 65_536),
    "augment_rotation": Bounds(0.0, 1.0),  # a fraction of a full turn
    "augment_shift": Bounds(0.0, 1.0),  # a fraction of the width
    "augment_zoom": Bounds(0.0, 1.0, high_open=True),  # the augmentation layer's own limits
    "augment_contrast": Bounds(0.0, 1.0, high_open=True),
    "alpha": Bounds(0.0, 2.0, low_open=True),
    "dropout": Bounds(0, 1, high_open=True),
    "tta_views": Bounds(0, 8),  # and one of TTA_VIEWS
    "epochs": Bounds(1, MAX_EPOCHS),
    "steps_per_epoch": Bounds(0, 1_000_000_000),
    "learning_rate": Bounds(0.0, 10.0, low_open=True),
    "fine_tune_epochs": Bounds(0, MAX_EPOCHS),
    "fine_tune_learning_rate": Bounds(0.0, 10.0, low_open=True),
    "fine_tune_layers": Bounds(0, 100_000),
    "early_stopping_patience": Bounds(0, MAX_EPOCHS),
    "head_feature_views": Bounds(0, 1024),  # cached features grow with it
    "head_c": Bounds(0.0, 1e6, low_open=True),
    "cv_folds": Bounds(0, MAX_FOLDS),  # and not 1: one fold has nothing to train on
    "gate_threshold": Bounds(0.0, 1.0),  # every gate metric is a share in [0, 1]
    "promotion_margin": Bounds(0, 1, high_open=True),
}
#: val_fraction + test_fraction must stay below this, leaving at least 10% for training.
MAX_HELD_OUT_FRACTION = 0.9

#: Smallest image_size the notebook's CNN can take: five valid 3x3 convolutions, each
#: followed by 2x2 pooling, leave nothing of a smaller image.
SEED_CNN_MIN_IMAGE_SIZE = 94

#: Allowed values of the enumerated fields.
CHOICES: dict[str, tuple[str, ...]] = {
    "model": MODELS,
    "backbone": tuple(BACKBONES),
    "pooling": ("avg", "avg_max"),
    "gate_metric": ("accuracy", "balanced_accuracy", "macro_f1"),
    "augment_placement": ("auto", "model", "data"),
    "gate_on": ("point", "ci_low"),
    "sweep_choice": RULES,
}


def validate(config: PipelineConfig) -> None:
    """Reject values no step could use, naming the field, before any work starts."""
    problems: list[str] = []
    for name, target in PipelineConfig.field_types().items():
        value = getattr(config, name)
        ok = isinstance(value, target) and not (target is not bool and isinstance(value, bool))
        if target is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            problems.append(f"{name} must be {target.__name__}, got {value!r}")
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
    # nan passes every "> 0" test below and inf breaks serialization or training later
    problems += [f"{name} must be a finite number, got {getattr(config, name)!r}"
                 for name, target in PipelineConfig.field_types().items()
                 if target is float and not math.isfinite(getattr(config, name))]
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))
    problems += [f"{name} must be in {bounds}, got {getattr(config, name)!r}"
                 for name, bounds in RANGES.items() if getattr(config, name) not in bounds]
    if config.model == "seed_cnn" and config.image_size < SEED_CNN_MIN_IMAGE_SIZE:
        problems.append(f"model=seed_cnn needs image_size in [{SEED_CNN_MIN_IMAGE_SIZE}, "
                        f"{RANGES['image_size'].high!r}], got {config.image_size!r}")
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            problems.append(f"{name}={getattr(config, name)!r} is not one of {list(allowed)}")
    if config.tta_views not in TTA_VIEWS:
        problems.append(f"tta_views={config.tta_views!r} is not one of {list(TTA_VIEWS)}")
    problems += cv_problems(config)
    if config.val_fraction + config.test_fraction >= MAX_HELD_OUT_FRACTION:
        problems.append(f"val_fraction + test_fraction must stay below {MAX_HELD_OUT_FRACTION} "
                        "(at least 10% for training), got "
                        f"{config.val_fraction + config.test_fraction:g}")
    if not config.data_source.strip():
        problems.append("data_source must not be empty")
    for name in ("data_sha256", "weights_sha256"):
        sha = getattr(config, name).strip().lower()
        if sha not in ("", "none") and not (len(sha) == 64 and set(sha) <= set(HEX_DIGITS)):
            problems.append(
                f"{name} must be 64 hex digits, or '' / 'none' to skip the check; "
                f"got {getattr(config, name)!r}"
            )
    if config.weights_sha256.strip().lower() not in ("", "none") and (
            config.weights.strip().lower() in ("imagenet", "none", "")):
        problems.append(
            f"weights_sha256 checks a weights file or URL, but weights={config.weights!r} "
            "(Keras verifies its own ImageNet downloads); set weights to a path or URL"
        )
    if problems:
        raise ValueError("invalid config: " + "; ".join(problems))


def cv_problems(config: PipelineConfig) -> list[str]:
    """Why ``cv_folds`` cannot be used with this config (empty: it can, or it is off).

    Folds run inside the train step on the frozen backbone's features (a head fit per fold);
    with a trained backbone every fold would be a full training, k of them per trial.
    """
    if config.cv_folds == 0:
        return []
    if config.cv_folds < MIN_FOLDS:
        return [f"cv_folds={config.cv_folds}: cross-validation needs {MIN_FOLDS} to "
                f"{MAX_FOLDS} folds (0 turns it off)"]
    if (config.model != TRANSFER or config.head_feature_views == 0
            or config.fine_tune_epochs > 0):
        return [f"cv_folds={config.cv_folds} needs the frozen-backbone feature head (model="
                "transfer, head_feature_views > 0, fine_tune_epochs=0): end to end, each "
                "fold would be a full training"]
    return []


def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Config values set through :data:`ENV_OVERRIDES` variables (CLI use only)."""
    environ = os.environ if environ is None else environ
    return {field: environ[var] for var, field in ENV_OVERRIDES.items() if environ.get(var)}


def _read_images_file(path: Path) -> dict[str, Any]:
    try:
        images = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read image names from {str(path)!r}: {exc}") from exc
    if not isinstance(images, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object of image names")
    return images


def placeholder_images(path: Path = IMAGES_FILE) -> bool:
    """Whether ``path`` still holds the repository's placeholder names (``"placeholder": true``).

    The committed file names images that exist in no registry, so a cluster could not pull
    them; ``containers/build.sh`` rewrites the file with the pushed names and no marker.
    """
    return _read_images_file(path).get("placeholder") is True


def load_images(path: Path = IMAGES_FILE) -> dict[str, str]:
    """The CPU and GPU image names the build script wrote (keys ``cpu`` and ``gpu``)."""
    images = _read_images_file(path)
    missing = {"cpu", "gpu"} - set(images)
    if missing:
        raise ValueError(f"{str(path)!r} lacks image name(s) for {sorted(missing)}")
    return {"cpu": images["cpu"], "gpu": images["gpu"]}


__all__ = [
    "CHOICES",
    "DEFAULT_DATA_SHA256",
    "DEFAULT_DATA_SOURCE",
    "ENV_OVERRIDES",
    "IMAGES_FILE",
    "MAX_HELD_OUT_FRACTION",
    "RANGES",
    "SEED_CNN_MIN_IMAGE_SIZE",
    "TTA_VIEWS",
    "Bounds",
    "PipelineConfig",
    "coerce",
    "env_overrides",
    "load_images",
    "placeholder_images",
    "read_yaml_mapping",
    "validate",
]
