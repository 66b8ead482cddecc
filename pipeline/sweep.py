"""Sweep files: the trials of a ``--sweep`` run, each a set of config overrides of the train step.

A sweep trains every trial on the same prepared splits (one download and preprocess), scores
each trained model out of fold over train + validation (``cv_folds``, the paired cost-aware
rule) or else on the *validation* split, and hands only the chosen one on to evaluation on
the test split, the gate and the registry, so the test split never takes part in a choice.
Only train-step settings can vary (:data:`SWEEPABLE`): a setting another step also reads
would make the trials disagree with the data or the evaluation they are compared on.

The file (YAML)::

    parallelism: 2          # trials trained at once on a cluster (kfp.local: one at a time)
    cv_folds: 5             # shared by every trial: chosen out of fold (0: on validation)
    sweep_choice: best_score  # the leader (default cheapest_within_noise: cost-aware)
    trials:                 # a list of overrides; [{}] (the base config) when left out
      - {}
      - {backbone: mobilenet_v2, alpha: 0.5, weights: "${IRIS_MOBILENET_V2_WEIGHTS:-imagenet}"}
    grid:                   # every combination, crossed with every trial
      image_size: [224, 320]

A setting every trial must share (:data:`SAME_FOR_EVERY_TRIAL`) is a top-level key; like a
trial's own settings, it wins over ``--set`` and ``--config``.

String values may name environment variables as ``${NAME}`` or ``${NAME:-default}`` (a weights
file differs per machine); an unset variable without a default is an error.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PipelineConfig
from pipeline.lib.credentials import has_credentials
from pipeline.lib.params import TrackingParams, TrainParams
from pipeline.stepspec import STEP_PARAMS

logger = logging.getLogger(__name__)

#: Settings the sweep file sets once, at its top, for every trial: the choice between
#: cross-validated trials pairs their out-of-fold predictions, so all must hold out the same
#: folds (``cv_folds``); and the rule that choice follows (``sweep_choice``).
SAME_FOR_EVERY_TRIAL = frozenset({"cv_folds", "sweep_choice"})
#: Train-step settings no other step reads: the ones a trial may change.
SWEEPABLE: frozenset[str] = frozenset(TrainParams.field_names()) - {
    name for step, classes in STEP_PARAMS.items() if step != "train_model"
    for cls in classes if cls is not TrackingParams for name in cls.field_names()
} - SAME_FOR_EVERY_TRIAL
#: More trials than this is almost surely a grid typo (and a very long local run).
MAX_TRIALS = 64
MAX_PARALLELISM = 32
SWEEP_KEYS = ("parallelism", "trials", "grid", *sorted(SAME_FOR_EVERY_TRIAL))
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Validated trials: every trial holds every swept key (the ParallelFor's items)."""

    trials: tuple[dict[str, Any], ...]
    parallelism: int = 1
    #: the file's settings every trial shares (:data:`SAME_FOR_EVERY_TRIAL`), e.g. cv_folds
    shared: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def base(self, config: PipelineConfig, given: Collection[str] = ()) -> PipelineConfig:
        """``config`` with the settings every trial shares: the run's base config.

        The file wins, as a trial's settings do. A value it replaces is logged when the user
        set the key (``given``: the ``--set`` keys, so a ``--set cv_folds=0`` is not lost
        silently) or when it is not the default (from ``--config`` or the environment).
        """
        defaults = PipelineConfig()
        for key, value in self.shared.items():
            current = getattr(config, key)
            if current != value and (key in given or current != getattr(defaults, key)):
                logger.warning("the sweep file sets %s=%s for every trial, over %s=%s from "
                               "--set, --config or the environment", key, value, key, current)
        return PipelineConfig.from_mapping(self.shared, config) if self.shared else config

    def one_at_a_time(self) -> Sweep:
        """This sweep training one trial at a time (what ``--local`` runs, see run_local)."""
        return dataclasses.replace(self, parallelism=1)

    @property
    def keys(self) -> tuple[str, ...]:
        """The swept config fields, in the order the trials' labels give them."""
        return tuple(self.trials[0])


def expand_env(value: Any, environ: Mapping[str, str]) -> Any:
    """``${NAME}`` / ``${NAME:-default}`` in a string replaced from ``environ``."""
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in environ and environ[name] != "":
            return environ[name]
        if default is None:
            raise ValueError(f"environment variable {name} is not set (write ${{{name}:-default}} "
                             "to give a default)")
        return default

    return _ENV_REFERENCE.sub(substitute, value)


def _overrides(entries: Any, where: str) -> list[dict[str, Any]]:
    if entries is None:
        return [{}]
    if not isinstance(entries, list) or not all(isinstance(e, dict) or e is None
                                                for e in entries):
        raise ValueError(f"{where} must be a list of mappings of config overrides")
    return [dict(e or {}) for e in entries] or [{}]


def _grid(grid: Any) -> list[dict[str, Any]]:
    if grid is None:
        return [{}]
    if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
        raise ValueError("grid must map each config key to a non-empty list of values")
    return [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]


def _check_size(trials: int, grid: Any) -> None:
    """Refuse more than :data:`MAX_TRIALS` from the value counts alone, before expanding any.

    A grid of a few keys with long value lists has more combinations than memory can hold,
    so its product is counted, not built.
    """
    counts = [len(values) for values in grid.values() if isinstance(values, list)] if (
        isinstance(grid, dict)) else []
    total = math.prod(counts) * trials
    if total > MAX_TRIALS:
        sizes = " x ".join(map(str, ([trials] if trials > 1 else []) + counts))
        raise ValueError(f"the sweep has {total} trials ({sizes}); at most {MAX_TRIALS}")


def build_sweep(spec: Mapping[str, Any], base: PipelineConfig,
                environ: Mapping[str, str] | None = None) -> Sweep:
    """Trials of ``spec`` (a sweep file's mapping) on top of ``base``, each one validated.

    ``ValueError`` names the problem: an unknown top-level key, a key no trial may change, a
    value the config rejects (with the trial it is in), duplicate trials, too many trials.
    """
    environ = os.environ if environ is None else environ
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise ValueError(f"unknown sweep key(s) {', '.join(map(repr, unknown))}; valid keys: "
                         f"{', '.join(SWEEP_KEYS)}")
    parallelism = spec.get("parallelism", 1)
    if (not isinstance(parallelism, int) or isinstance(parallelism, bool)
            or not 1 <= parallelism <= MAX_PARALLELISM):
        raise ValueError(f"parallelism must be an integer in [1, {MAX_PARALLELISM}], "
                         f"got {parallelism!r}")
    shared = {key: expand_env(spec[key], environ) for key in sorted(SAME_FOR_EVERY_TRIAL)
              if key in spec}
    try:
        base = PipelineConfig.from_mapping(shared, base)
    except ValueError as exc:
        raise ValueError(f"{', '.join(shared)} (shared by every trial): {exc}") from exc
    shared = {key: getattr(base, key) for key in shared}  # typed, ${VAR} expanded
    overrides, grid = _overrides(spec.get("trials"), "trials"), spec.get("grid")
    _check_size(len(overrides), grid)
    combined = [{**trial, **point} for trial in overrides for point in _grid(grid)]
    keys = sorted({key for trial in combined for key in trial})
    fixed = [key for key in keys if key not in SWEEPABLE]
    if fixed:
        shared_hint = sorted(set(fixed) & SAME_FOR_EVERY_TRIAL)
        raise ValueError(
            f"a sweep cannot vary {', '.join(map(repr, fixed))}: only train-step settings that "
            f"no other step reads can differ between trials ({', '.join(sorted(SWEEPABLE))})"
            + (f"; {', '.join(shared_hint)} is shared by every trial: set it at the top of "
               "the sweep file" if shared_hint else ""))
    trials: list[dict[str, Any]] = []
    for number, overrides in enumerate(combined, start=1):
        values = {k: expand_env(v, environ) for k, v in overrides.items()}
        if any(isinstance(v, str) and has_credentials(v) for v in values.values()):
            raise ValueError(f"trial {number} carries credentials in a URL; a weights URL "
                             "must not embed user:password (values are recorded)")
        try:
            config = PipelineConfig.from_mapping(values, base)
        except ValueError as exc:
            raise ValueError(f"trial {number} ({_describe(overrides)}): {exc}") from exc
        trial = {key: getattr(config, key) for key in keys}
        if trial in trials:
            raise ValueError(f"trial {number} ({_describe(overrides)}) repeats trial "
                             f"{trials.index(trial) + 1}")
        trials.append(trial)
    if not keys:
        raise ValueError("the sweep overrides nothing: give trials or a grid")
    if len(trials) < 2:
        raise ValueError("a sweep needs at least two trials to choose from")
    return Sweep(tuple(trials), parallelism, shared)


def _describe(overrides: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "base config"


def load_sweep(path: str | Path, base: PipelineConfig,
               environ: Mapping[str, str] | None = None) -> Sweep:
    """The sweep in YAML file ``path``; ``ValueError`` names the file and the problem."""
    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read sweep file {str(path)!r}: {exc}") from exc
    if not isinstance(spec, dict):
        raise ValueError(f"sweep file {str(path)!r} must hold a mapping "
                         f"({', '.join(SWEEP_KEYS)})")
    try:
        return build_sweep(spec, base, environ)
    except ValueError as exc:
        raise ValueError(f"sweep file {str(path)!r}: {exc}") from exc


__all__ = ["MAX_TRIALS", "SAME_FOR_EVERY_TRIAL", "SWEEPABLE", "Sweep", "build_sweep", "expand_env",
           "load_sweep"]

