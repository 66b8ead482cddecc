"""The CLI's batch-prediction mode: ``python pipeline.py --predict SOURCE [--model-uri URI]``.

Alone (or with ``--local``) it runs the batch-prediction pipeline here with kfp.local and
ends with a closing block; with ``--compile`` it writes that pipeline's YAML, with
``--submit`` it starts it on KFP (``--schedule CRON``: as a recurring run).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.cli_closing import ui_command
from pipeline.config import PipelineConfig
from pipeline.lib import drift
from pipeline.lib.contract import META_FILES_SKIPPED, META_PREDICTED_COUNTS, META_RUN_ID
from pipeline.lib.files import atomic_write_json

logger = logging.getLogger("pipeline")

MODE_FLAGS = ("--local", "--compile", "--submit", "--restore-champion")


def add_predict_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "batch predictions (--predict; alone it runs locally, like --local)")
    group.add_argument("--predict", metavar="SOURCE",
                       help="label the images of SOURCE (URL, archive, folder, s3/gs; any "
                            "nesting, no class folders) with a registered model and check them "
                            "for drift against its training images")
    group.add_argument("--model-uri", metavar="URI",
                       help="the model to use: models:/NAME@ALIAS or models:/NAME/VERSION "
                            "(default: models:/<registered_model_name>@champion)")
    group.add_argument("--schedule", metavar="CRON",
                       help="with --submit --predict: a KFP recurring run on this cron schedule "
                            "instead of one run (e.g. '0 2 * * *': nightly at 02:00)")


def with_default_mode(argv: Sequence[str]) -> list[str]:
    """``--predict`` without a mode runs locally: ``--local`` is added."""
    argv = list(argv)
    predict = any(a == "--predict" or a.startswith("--predict=") for a in argv)
    mode = any(a in MODE_FLAGS or a.startswith("--restore-champion=") for a in argv)
    return ["--local", *argv] if predict and not mode else argv


def check_predict_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Usage errors of the predict options (``parser.error`` exits 2)."""
    if not args.predict:
        for value, flag in ((args.model_uri, "--model-uri"), (args.schedule, "--schedule")):
            if value:
                parser.error(f"{flag} only applies to --predict")
        return
    if not args.predict.strip():
        parser.error("--predict needs a SOURCE: a URL, archive or folder of images")
    for value, flag in ((args.data, "--data"), (args.sweep, "--sweep"),
                        (args.restore_champion, "--restore-champion")):
        if value:
            parser.error(f"{flag} does not apply to --predict")
    if args.schedule and not args.submit:
        parser.error("--schedule only applies to --submit --predict")


def model_uri(args: argparse.Namespace, config: PipelineConfig) -> str:
    return args.model_uri or f"models:/{config.registered_model_name}@champion"


def check_model(args: argparse.Namespace, config: PipelineConfig) -> None:
    """``ValueError`` (one line) when the model URI is malformed or, locally, names no
    registered version at the tracking URI; before any work. (On a cluster the registry is
    the cluster's: there only the URI's form is checked here.)"""
    from pipeline.steps.predict import parse_model_uri, resolve_model_version

    uri = model_uri(args, config)
    parse_model_uri(uri)
    if args.local:
        from mlflow.tracking import MlflowClient

        from pipeline.lib.tracking_store import resolve_tracking_uri

        resolve_model_version(uri, MlflowClient(resolve_tracking_uri(args.tracking_uri,
                                                                     Path.cwd())))


def closing_block(result: Any, tracking_uri: str) -> list[str]:
    """The lines a finished local batch-prediction run ends with."""
    meta = result.metadata
    counts: Mapping[str, Any] = meta.get(META_PREDICTED_COUNTS, {})
    total = sum(int(n) for n in counts.values())
    lines = [f"predicted {total} images with {meta.get('model_version')}:"]
    width = max((len(name) for name in counts), default=0)
    lines += [f"  {name:<{width}}  {int(n):>5}" for name, n in counts.items()]
    skipped = meta.get("skipped") or []
    if int(meta.get(META_FILES_SKIPPED, 0)):
        reasons: dict[str, int] = {}
        for item in skipped:
            reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
        count = int(meta[META_FILES_SKIPPED])
        lines.append(f"skipped {count} file{'s' if count > 1 else ''}: "
                     + ", ".join(f"{n} {reason}" for reason, n in reasons.items()))
    else:
        lines.append("skipped: no file")
    report = result.drift
    lines.append(f"drift: {drift.describe(report['overall'])}")
    for name, entry in report.get("per_class", {}).items():
        lines.append(f"  {name}: " + (f"{entry['verdict']} (p = {entry['p_value']:.3f}, "
                                      f"{entry['images']} images)" if entry.get("verdict")
                                      else entry["message"]))
    lines.append(f"predictions: {result.predictions}")
    lines.append(f"drift report: {result.drift_report}")
    lines.append(f"MLflow run {meta.get(META_RUN_ID)}; open it with:")
    lines.append(f"  {ui_command(tracking_uri)}")
    lines.append(f"total: {result.elapsed_s:.1f} s")
    return lines


def run_predict(args: argparse.Namespace, config: PipelineConfig) -> int:
    """Dispatch ``--predict`` to the local run, compile or submit; returns the exit code."""
    from pipeline.cli import EXIT_FAILED, EXIT_OK
    from pipeline.runners.local import StepFailedError
    from pipeline.runners.predict import (
        DEFAULT_PREDICT_PACKAGE,
        compile_predict,
        predict_summary,
        run_predict_local,
        submit_predict,
    )

    uri = model_uri(args, config)
    cluster = dict(mlflow_secret=args.mlflow_secret,
                   mlflow_config_map=args.mlflow_config_map or None,
                   data_secret=args.data_secret)
    if args.compile:
        path = compile_predict(args.output or DEFAULT_PREDICT_PACKAGE, config=config,
                               model_uri=uri, tracking_uri=args.tracking_uri or "", **cluster)
        logger.info("wrote %s", path)
        return EXIT_OK
    if args.submit:
        try:
            submitted = submit_predict(
                config, host=args.host, model_uri=uri, tracking_uri=args.tracking_uri or "",
                experiment=args.experiment, namespace=args.namespace,
                run_name=args.run_name, schedule=args.schedule, **cluster)
        except Exception as exc:  # the CLI boundary: report any client or server error
            logger.error("submitting to %s failed: %s: %s", args.host, type(exc).__name__, exc)
            return EXIT_FAILED
        what = "recurring run" if args.schedule else "run"
        logger.info("%s %s created (pipeline %s, version %s, experiment %s)", what,
                    submitted.run_id, submitted.pipeline_id, submitted.pipeline_version_id,
                    submitted.experiment_id)
        return EXIT_OK
    from pipeline.lib.tracking_store import resolve_tracking_uri

    try:
        result = run_predict_local(config, model_uri=uri, output_dir=args.output_dir,
                                   tracking_uri=args.tracking_uri or "", verbose=args.verbose)
    except StepFailedError as error:
        log = f" (log: {error.log})" if error.log else ""
        logger.error("batch predictions failed: %s%s", error, log)
        return EXIT_FAILED
    for line in closing_block(result, resolve_tracking_uri(args.tracking_uri, Path.cwd())):
        logger.info("%s", line)
    if args.summary:
        logger.info("summary: %s", atomic_write_json(args.summary, predict_summary(result),
                                                     default=str))
    return EXIT_OK


__all__ = ["add_predict_arguments", "check_model", "check_predict_options", "closing_block",
           "run_predict", "with_default_mode"]

