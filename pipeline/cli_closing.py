"""The lines a finished local run ends with, and how to open its MLflow records."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.lib import mlflow_ui

#: Where ``mlflow ui`` serves by default.
UI_ADDRESS = "http://127.0.0.1:5000"


def ui_command(tracking_uri: str) -> str:
    """The command that opens ``tracking_uri`` in the MLflow UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f'mlflow ui --backend-store-uri "{tracking_uri}" --app-name {mlflow_ui.APP_NAME}'


def closing_block(summary: Mapping[str, Any]) -> list[str]:
    """The lines a finished local run ends with: metrics beside the baseline, the gate, what
    was registered, where to look in MLflow, the run folder and the wall time."""
    metrics, baseline = summary["test_metrics"], summary["majority_baseline"] or {}
    names = [n for n in ("accuracy", "balanced_accuracy", "macro_f1") if n in metrics]

    def row(label: str, values: Mapping[str, Any], intervals: bool = False) -> str:
        cells = []
        for name in (n for n in names if n in values):
            low, high = values.get(f"{name}_ci_low"), values.get(f"{name}_ci_high")
            ci = f" [{low:.3f}, {high:.3f}]" if intervals and None not in (low, high) else ""
            cells.append(f"{name} {values[name]:.3f}{ci}")
        return f"{label:<22}{'  '.join(cells)}"

    lines = [row(f"test ({int(metrics.get('test_examples', 0))} images):", metrics, True)]
    if baseline:
        lines.append(row("majority baseline:", baseline))
    lines.append(f"{'':<22}(intervals: {summary.get('interval_method') or 'bootstrap'})")
    cv = summary.get("cross_validation")
    if cv:
        lines.append(row("cross-validated:", {n.removeprefix("cv_"): v for n, v in cv.items()},
                         True))
        lines.append(f"{'':<22}(out of fold, {int(cv['cv_folds'])} folds over the "
                     f"{int(cv['cv_images'])} train + validation images; the model: "
                     f"the {int(cv['cv_folds'])} fold heads averaged)")
    sweep = summary.get("sweep")
    if sweep and sweep.get("trials") and "cv_score" in sweep["trials"][0]:
        lines.append(f"sweep: {sweep['summary']}")
        for trial in sorted(sweep["trials"], key=lambda t: -t["cv_score"]):
            chosen = ("  <- chosen, evaluated on test"
                      if int(trial["trial"]) == int(sweep["winner"]) else "")
            d = trial["difference"]
            paired = ("leader" if d is None else
                      f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]")
            lines.append(f"  {trial['cv_score']:.3f} [{trial['cv_ci_low']:.3f}, "
                         f"{trial['cv_ci_high']:.3f}]  {paired}  "
                         f"{trial['serving_ms_per_image']:.1f} ms  trial "
                         f"{int(trial['trial']) + 1}: {trial['label']}{chosen}")
    elif sweep:
        lines.append(f"sweep: {len(sweep['trials'])} trials ranked by {sweep['metric']} "
                     "(validation split):")
        for trial in sorted(sweep["trials"], key=lambda t: -t["val_score"]):
            # KFP metadata is JSON through protobuf: whole numbers come back as floats
            chosen = ("  <- chosen, evaluated on test"
                      if int(trial["trial"]) == int(sweep["winner"]) else "")
            lines.append(f"  {trial['val_score']:.3f}  trial {int(trial['trial']) + 1}: "
                         f"{trial['label']}{chosen}")
    gate = summary["gate"]
    comparison = ">=" if gate["passed"] else "<"
    lines.append(f"gate: {gate['metric']} {gate['value']:.3f} {comparison} {gate['threshold']:.3f}"
                 f" -> {'passed' if gate['passed'] else 'failed'}")
    registration = summary["registration"]
    if registration and registration.get("registered"):
        lines.append(f"registered: {registration['name']} version {registration['version']} "
                     f"@{registration['alias']} ({registration['reason']})")
    elif registration:
        lines.append(f"not registered: {registration.get('reason', '')}")
    else:
        lines.append("not registered: the gate failed, so the register step did not run")
    mlflow_info = summary["mlflow"]
    lines.append(f"MLflow parent run {mlflow_info['run_id']} in experiment "
                 f"{mlflow_info['experiment_name']!r}; open it with:")
    lines.append(f"  {ui_command(mlflow_info['tracking_uri'])}")
    if mlflow_info.get("experiment_id"):  # the run list, not MLflow's GenAI pages
        experiment_id = mlflow_info["experiment_id"]
        if mlflow_info["tracking_uri"].startswith(("http://", "https://")):
            lines.append(f"  then {mlflow_info['tracking_uri'].rstrip('/')}/#/experiments/"
                         f"{experiment_id}?workflowType=machine_learning")
        else:  # the `--app-name iris` page keeps every later click on model-training pages
            lines.append(f"  then {UI_ADDRESS}{mlflow_ui.ui_path(experiment_id)}")
    data = summary["data"]
    if data["sha256"] and not data["sha256_checked"]:
        lines.append(f"data set sha256 {data['sha256']} recorded, not checked; to pin it: "
                     f"--set data_sha256={data['sha256']}")
    lines.append(f"run folder: {summary['run_dir']} (step logs in logs/)")
    lines.append(f"total: {summary['elapsed_s']:.1f} s"
                 + (f" ({', '.join(summary['cached_steps'])} from the cache)"
                    if summary["cached_steps"] else ""))
    return lines
