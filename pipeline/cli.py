"""Command line: run the pipeline locally, compile it, or submit it to a Kubeflow cluster."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pipeline.cli_args import (
    build_parser,
    check_mode_options,
    output_problem,
    parse_overrides,
    resolve_config,
)
from pipeline.cli_closing import closing_block
from pipeline.config import PipelineConfig, placeholder_images
from pipeline.dag import refuse_credentials
from pipeline.lib.contract import EXECUTOR_OUTPUT
from pipeline.lib.credentials import (
    DATA_PASSWORD_ENV,
    DATA_USERNAME_ENV,
    MLFLOW_PASSWORD_ENV,
    MLFLOW_USERNAME_ENV,
    move_credentials_to_env,
)
from pipeline.lib.files import atomic_write_json
from pipeline.predict_cli import (
    check_model,
    check_predict_options,
    run_predict,
    with_default_mode,
)
from pipeline.runners import (
    DEFAULT_PACKAGE,
    StepFailedError,
    build_summary,
    compile_pipeline,
    failure_summary,
    run_local,
    submit_pipeline,
)
from pipeline.runners.processes import stop_steps_on_signals
from pipeline.sweep import Sweep, load_sweep
from pipeline.tasks import TASK_NAMES

logger = logging.getLogger("pipeline")

#: kfp.local's task names (and folder names in a run folder) of the two data steps.
DOWNLOAD_TASK, PREPROCESS_TASK = TASK_NAMES["download_dataset"], TASK_NAMES["preprocess_dataset"]

#: Exit codes: 0 success, 1 a step / the run / the server failed, 2 bad usage or config,
#: 130 interrupted (Ctrl-C), as shells report SIGINT.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _credentials_to_env(args: argparse.Namespace, config: PipelineConfig) -> PipelineConfig:
    """Move ``user:password@`` of the data source and ``--tracking-uri`` into ``os.environ``.

    kfp.local's step processes inherit this process's environment, so the download step
    and MLflow still authenticate, while no parameter (hence no dump, cache entry, report or
    MLflow record) carries the credentials. Updates ``args.tracking_uri`` in place.
    """
    if args.tracking_uri:
        args.tracking_uri = move_credentials_to_env(args.tracking_uri, MLFLOW_USERNAME_ENV,
                                                    MLFLOW_PASSWORD_ENV, os.environ)
    source = move_credentials_to_env(config.data_source, DATA_USERNAME_ENV, DATA_PASSWORD_ENV,
                                     os.environ)
    return dataclasses.replace(config, data_source=source)


def _check_images(args: argparse.Namespace) -> None:
    """Refuse ``--submit`` with placeholder image names (``ValueError``); warn on ``--compile``."""
    if args.allow_placeholder_images or not placeholder_images():
        return
    problem = ("containers/images.json still names the repository's placeholder images "
               "(localhost:5000/...), which no cluster can pull: run containers/build.sh "
               "REGISTRY to build and push the images (it rewrites images.json), or pass "
               "--allow-placeholder-images if they do exist")
    if args.submit:
        raise ValueError(problem)
    logger.warning("%s", problem)


def _run_local(args: argparse.Namespace, config: PipelineConfig, sweep: Sweep | None) -> int:
    # "" lets each tracking step resolve the default (MLFLOW_TRACKING_URI, else an absolute
    # sqlite mlflow.db in the working folder, which kfp.local's step processes share).
    tracking_uri = args.tracking_uri or ""
    try:
        result = run_local(config, output_dir=args.output_dir, tracking_uri=tracking_uri,
                           enable_cache=not args.no_cache, verbose=args.verbose, sweep=sweep)
    except StepFailedError as error:
        logger.error("pipeline failed: %s", error)
        if error.tail and not args.verbose:
            logger.error("last lines of %s:\n%s", error.step,
                         "\n".join(f"  {line}" for line in error.tail))
        if error.log:
            logger.error("full log: %s", error.log)
        if _from_cached_download(error, args):
            logger.error("the raw data came from kfp.local's cache of an earlier download: if "
                         "the data source has changed since, rerun with --no-cache")
        if args.summary:
            atomic_write_json(args.summary, failure_summary(error, config), default=str)
        return EXIT_FAILED
    summary = build_summary(result, config, tracking_uri)
    for line in closing_block(summary):
        logger.info("%s", line)
    if args.summary:
        logger.info("summary: %s", atomic_write_json(args.summary, summary, default=str))
    return EXIT_OK


def _from_cached_download(error: StepFailedError, args: argparse.Namespace) -> bool:
    """Whether preprocess failed on a download kfp.local took from its cache (it left no
    task folder in this run), the one failure a rerun with ``--no-cache`` may cure."""
    return (error.step == PREPROCESS_TASK and not args.no_cache
            and (error.run_dir is None
                 or not (error.run_dir / DOWNLOAD_TASK / EXECUTOR_OUTPUT).exists()))


def _submit(args: argparse.Namespace, config: PipelineConfig, sweep: Sweep | None) -> int:
    try:
        result = submit_pipeline(
            config, host=args.host, tracking_uri=args.tracking_uri or "",
            experiment=args.experiment, namespace=args.namespace, run_name=args.run_name,
            wait=args.wait, timeout_s=args.timeout, mlflow_secret=args.mlflow_secret,
            mlflow_config_map=args.mlflow_config_map or None, data_secret=args.data_secret,
            sweep=sweep,
        )
    except Exception as exc:  # the CLI boundary: report any client or server error
        logger.error("submitting to %s failed: %s: %s", args.host, type(exc).__name__, exc)
        return EXIT_FAILED
    logger.info("run %s started (pipeline %s, version %s, experiment %s)", result.run_id,
                result.pipeline_id, result.pipeline_version_id, result.experiment_id)
    if not args.wait:
        return EXIT_OK
    logger.info("run %s finished: %s", result.run_id, result.state)
    return EXIT_OK if (result.state or "").upper() == "SUCCEEDED" else EXIT_FAILED


def _configure_logging(verbose: bool) -> None:
    """Verbose: every library's INFO with timestamps. Default: this CLI's own lines only,
    bare, and TensorFlow's C++ start-up noise off in the step processes."""
    if verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
    logger.setLevel(logging.INFO)


def _restore_champion(args: argparse.Namespace, config: PipelineConfig) -> int:
    from mlflow.tracking import MlflowClient

    from pipeline.lib.registry import restore_champion
    from pipeline.lib.tracking_store import resolve_tracking_uri

    uri = resolve_tracking_uri(args.tracking_uri, Path.cwd())
    try:
        moved = restore_champion(config.registered_model_name, args.restore_champion,
                                 client=MlflowClient(uri))
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    logger.info("%s@champion: v%s -> v%s (%s)", moved["name"], moved["previous_version"],
                moved["version"], uri)
    return EXIT_OK


def _run_predict(args: argparse.Namespace, config: PipelineConfig) -> int:
    """``--predict``: the batch-prediction pipeline in the chosen mode (pipeline/predict_cli.py)."""
    if not args.local:
        return run_predict(args, config)
    received: list[int] = []
    try:
        with stop_steps_on_signals() as received:
            return run_predict(args, config)
    except KeyboardInterrupt:
        logger.error("interrupted: the run folder under %s is incomplete", args.output_dir)
        return 128 + received[0] if received else EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the chosen mode, return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(with_default_mode(sys.argv[1:] if argv is None else argv))
        check_mode_options(parser, args)
        check_predict_options(parser, args)
    except SystemExit as exc:  # --help, or a usage error argparse already reported
        return int(exc.code or 0)
    _configure_logging(args.verbose)
    try:
        config = resolve_config(args.config, args.predict or args.data, args.overrides)
        if args.local:
            config = _credentials_to_env(args, config)
        refuse_credentials(config, args.tracking_uri or "")
        sweep = load_sweep(args.sweep, config) if args.sweep else None
        if sweep:
            config = sweep.base(config, given=parse_overrides(args.overrides or []).keys())
        if sweep and args.restore_champion:
            raise ValueError("--sweep does not apply to --restore-champion")
        if not args.local:
            _check_images(args)
        if args.predict:
            check_model(args, config)
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"{parser.prog}: error: {exc}\n")
        return EXIT_USAGE
    problem = output_problem(args)
    if problem:
        sys.stderr.write(f"{parser.prog}: error: {problem}\n")
        return EXIT_USAGE
    if args.restore_champion:
        return _restore_champion(args, config)
    if args.predict:
        return _run_predict(args, config)
    if args.local:
        received: list[int] = []
        try:
            with stop_steps_on_signals() as received:
                return _run_local(args, config, sweep)
        except KeyboardInterrupt:
            logger.error("interrupted: the run folder under %s is incomplete", args.output_dir)
            return 128 + received[0] if received else EXIT_INTERRUPTED  # 130 / 143
    if not args.tracking_uri:
        logger.warning(
            "no --tracking-uri: on the cluster the steps use MLFLOW_TRACKING_URI from the "
            "ConfigMap %r or the KFP MLflow plugin; without either, the first tracking step "
            "fails (a sqlite file in the pod would be lost)", args.mlflow_config_map or "(none)")
    if args.compile:
        try:
            path = compile_pipeline(args.output or DEFAULT_PACKAGE, config=config,
                                    tracking_uri=args.tracking_uri or "",
                                    mlflow_secret=args.mlflow_secret,
                                    mlflow_config_map=args.mlflow_config_map or None,
                                    data_secret=args.data_secret, sweep=sweep)
        except ValueError as exc:
            sys.stderr.write(f"{parser.prog}: error: {exc}\n")
            return EXIT_USAGE
        logger.info("wrote %s", path)
        return EXIT_OK
    return _submit(args, config, sweep)


__all__ = ["main"]
