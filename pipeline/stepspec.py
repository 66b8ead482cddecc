"""One entry per step: everything the pipeline layer needs to know about it, in one place.

A step is its module (``pipeline/steps/``), its thin component (``components/``) and one
:class:`StepSpec` in :data:`STEP_SPECS`. The rest is derived from these entries: the params
classes each component builds (:data:`STEP_PARAMS`, checked by ``tests/test_params.py``),
each task's cluster settings (``pipeline/tasks.py``), the pipeline's outputs
(:func:`outputs_type`, used by ``pipeline/dag.py``) and the line the local runner prints when
a step ends (:attr:`StepSpec.show`, from the result the step left in its task folder, see
``pipeline/lib/progress.py``). The DAG wiring itself stays written out in ``dag.py``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Markdown, Metrics, Model

from components.download_dataset import download_dataset
from components.evaluate_model import evaluate_model
from components.preprocess_dataset import preprocess_dataset
from components.register_model import register_model
from components.select_model import select_model
from components.train_model import train_model
from pipeline.lib import contract, stats
from pipeline.lib.params import (
    DownloadParams,
    EvaluateParams,
    PreprocessParams,
    RegisterParams,
    SelectParams,
    StepParams,
    TrackingParams,
    TrainParams,
)


@dataclasses.dataclass(frozen=True)
class Resources:
    """Kubernetes requests and limits of one task (KFP quantity strings)."""

    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str


def _no_result(result: Any) -> str:
    return ""


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """A step as the pipeline layer sees it.

    ``params``: the params objects its component builds. ``outputs``: the pipeline outputs
    it provides (name -> KFP type), in order. ``show``: the terminal's summary of its
    recorded result (the step's return value as JSON). ``cached``: its outputs depend only
    on its inputs (KFP may serve them from the cache). ``tracking``: it talks to MLflow
    (gets its ConfigMap and Secret). ``gpu``: it runs on the GPU image and node.
    ``fetches``: it reads the data source (gets task retries and the data Secret).
    """

    component: Callable[..., Any]
    params: tuple[type[StepParams], ...]
    resources: Resources
    outputs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    show: Callable[[Any], str] = _no_result
    cached: bool = False
    tracking: bool = False
    gpu: bool = False
    fetches: bool = False

    @property
    def name(self) -> str:
        """The component's (and the step's) name, e.g. ``train_model``."""
        return self.component.__name__

    @property
    def task(self) -> str:
        """The KFP task name (component name, dashed), also its task folder's name."""
        return self.name.replace("_", "-")


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _show_download(result: Mapping[str, Any]) -> str:
    return f"fetched {result.get(contract.META_PATH, '?')}"


def _show_preprocess(result: Mapping[str, Any]) -> str:
    sizes = result.get("split_sizes", {})
    split = "/".join(str(int(n)) for n in sizes.values())
    skipped = int(result.get("files_skipped", 0))
    named = result.get(contract.META_SKIPPED_FILES) or []
    more = " ..." if skipped > len(named) else ""
    return (f"{sum(int(n) for n in sizes.values())} images used, train/val/test {split}, "
            f"{int(result.get('duplicates_dropped', 0))} duplicates dropped"
            + (f", {skipped} skipped: {', '.join(named)}{more}" if skipped else ""))


def _show_train(result: Mapping[str, Any]) -> str:
    cv = f"{contract.CV_SCORE_PREFIX}balanced_accuracy"
    if cv in result:
        low, high = (result.get(k) for k in stats.ci_keys(cv))
        # KFP metadata hands whole numbers back as floats
        return (f"cross-validated balanced_accuracy {_fmt(result[cv])} [{_fmt(low)}, "
                f"{_fmt(high)}] over {int(result.get('cv_folds', 0))} folds, their heads "
                f"averaged; serving "
                f"{float(result.get(contract.META_SERVING_MS, math.nan)):.1f} ms/image")
    score = result.get(f"{contract.VAL_SCORE_PREFIX}balanced_accuracy")
    return (f"val balanced_accuracy {_fmt(score)} (best epoch {_fmt(result.get('best_epoch'))} "
            f"of {_fmt(result.get('epochs_run'))})")


def _show_select(result: Mapping[str, Any]) -> str:
    sweep = result.get(contract.META_SWEEP) or {}
    trials = sweep.get("trials") or []
    winner = next((t for t in trials if t.get("trial") == sweep.get("winner")), None)
    if winner is None:
        return ""
    if "cv_score" in winner:
        return str(sweep.get("summary", ""))
    return (f"trial {int(winner['trial']) + 1} of {len(trials)} ({winner['label']}) chosen on "
            f"validation, {sweep.get('metric')} {_fmt(winner['val_score'])}")


def _show_evaluate(result: Mapping[str, Any]) -> str:
    metrics = result.get("metrics", {})
    gate = metrics.get("gate_metric", "balanced_accuracy")
    verdict = "gate passed" if result.get("gate_passed") else "gate failed"
    return (f"test {gate} {_fmt(metrics.get(gate))} (majority baseline "
            f"{_fmt(metrics.get('baseline', {}).get(gate))}), {verdict}")


def _show_register(result: Mapping[str, Any]) -> str:
    if result.get("registered"):
        return f"{result['name']} v{result['version']} @{result['alias']}"
    return str(result.get("reason", "not registered"))


#: Every step, in the order a run meets them. Requests cover each step's peak RSS in a CPU
#: ``--local`` run at the default settings (see the README's measured results) with room;
#: limits leave headroom for larger data sets and, on the GPU node, the CUDA libraries.
STEP_SPECS: dict[str, StepSpec] = {spec.name: spec for spec in (
    StepSpec(download_dataset, (DownloadParams,), Resources("250m", "1", "256Mi", "1Gi"),
             {"raw_data": Dataset}, _show_download, cached=True, fetches=True),
    StepSpec(preprocess_dataset, (PreprocessParams,), Resources("1", "2", "1536Mi", "4Gi"),
             {"prepared_data": Dataset, "data_report": Markdown}, _show_preprocess,
             cached=True),
    StepSpec(train_model, (TrainParams, TrackingParams), Resources("4", "8", "6Gi", "16Gi"),
             {"trained_model": Model}, _show_train, tracking=True, gpu=True),
    # sweeps only: the trial with the best validation score becomes the trained_model
    StepSpec(select_model, (SelectParams, TrackingParams), Resources("250m", "1", "1Gi", "2Gi"),
             {}, _show_select, tracking=True),
    StepSpec(evaluate_model, (EvaluateParams, TrackingParams),
             Resources("1", "2", "3Gi", "6Gi"),  # 8 views at 320 px: 2.4 GB
             {"metrics": Metrics, "classification_metrics": ClassificationMetrics,
              "report": HTML, "evaluation": Artifact, "model_card": Markdown,
              "gate_passed": bool}, _show_evaluate,
             tracking=True),
    StepSpec(register_model, (RegisterParams, TrackingParams),
             Resources("250m", "1", "1536Mi", "3Gi"), {}, _show_register, tracking=True),
)}
#: The params object(s) each step component builds from its parameters, by step name.
STEP_PARAMS: dict[str, tuple[type[StepParams], ...]] = {
    name: spec.params for name, spec in STEP_SPECS.items()}
#: Steps only a sweep's DAG runs: they choose among the trained trials.
SWEEP_STEPS = frozenset({"select_model"})
#: Config fields only those steps read (``sweep_choice``): a single run has no use for them,
#: so its MLflow runs do not record them.
SWEEP_ONLY_FIELDS: frozenset[str] = frozenset(
    field for step in SWEEP_STEPS for cls in STEP_PARAMS[step] for field in cls.field_names()
) - frozenset(field for step, classes in STEP_PARAMS.items() if step not in SWEEP_STEPS
              for cls in classes for field in cls.field_names())
#: Specs by KFP task name (what the local runner finds in task folders).
SPECS_BY_TASK: dict[str, StepSpec] = {spec.task: spec for spec in STEP_SPECS.values()}


def outputs_type(name: str, steps: Iterable[str]) -> Any:
    """A pipeline's return type: the ``NamedTuple`` of the given steps' outputs, in order."""
    fields = [(output, kind) for step in steps for output, kind in STEP_SPECS[step].outputs.items()]
    return typing.NamedTuple(name, fields)


__all__ = ["SPECS_BY_TASK", "STEP_PARAMS", "STEP_SPECS", "SWEEP_ONLY_FIELDS", "SWEEP_STEPS",
           "Resources", "StepSpec", "outputs_type"]
