"""Command line: run the pipeline locally, compile it, or submit it to a Kubeflow cluster."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import (
    DEFAULT_DATA_SOURCE,
    ENV_OVERRIDES,
    PipelineConfig,
    env_overrides,
    placeholder_images,
    read_yaml_mapping,
)
from pipeline.dag import PIPELINE_NAME, refuse_credentials
from pipeline.lib import mlflow_ui
from pipeline.lib.contract import EXECUTOR_OUTPUT
from pipeline.lib.credentials import (
    DATA_PASSWORD_ENV,
    DATA_SECRET_KEYS,
    DATA_USERNAME_ENV,
    MLFLOW_CONFIG_MAP,
    MLFLOW_PASSWORD_ENV,
    MLFLOW_USERNAME_ENV,
    move_credentials_to_env,
)
from pipeline.lib.files import atomic_write_json
from pipeline.predict_cli import (
    add_predict_arguments,
    check_model,
    check_predict_options,
    run_predict,
    with_default_mode,
)
from pipeline.runners import (
    DEFAULT_OUTPUT_DIR,
    DEFAULT_PACKAGE,
    DEFAULT_WAIT_TIMEOUT_S,
    StepFailedError,
    build_summary,
    compile_pipeline,
    failure_summary,
    run_local,
    submit_pipeline,
)
from pipeline.runners.processes import stop_steps_on_signals
from pipeline.sweep import Sweep, load_sweep
from pipeline.tasks import MLFLOW_SECRET_KEYS, TASK_NAMES

logger = logging.getLogger("pipeline")

#: kfp.local's task names (and folder names in a run folder) of the two data steps.
DOWNLOAD_TASK, PREPROCESS_TASK = TASK_NAMES["download_dataset"], TASK_NAMES["preprocess_dataset"]

#: Exit codes: 0 success, 1 a step / the run / the server failed, 2 bad usage or config,
#: 130 interrupted (Ctrl-C), as shells report SIGINT.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

DESCRIPTION = """\
Train, evaluate and register the iris-flower image classifier with Kubeflow Pipelines.
One DAG (download -> preprocess -> train -> evaluate -> register if the gate passes) runs
here with kfp.local (--local), compiles to KFP IR YAML (--compile) or runs on a cluster
(--submit)."""


def _config_help() -> str:
    defaults = PipelineConfig()
    rows = [f"  {name:<26} {kind.__name__:<6} {getattr(defaults, name)!r}"
            for name, kind in PipelineConfig.field_types().items()]
    env = "\n".join(f"  {var:<26} sets {field}" for var, field in ENV_OVERRIDES.items())
    return f"""\
configuration keys for --set / --config (name, type, default):
{chr(10).join(rows)}

Precedence, lowest to highest: defaults < --config FILE < environment < --data < --set.
environment variables:
{env}
  MLFLOW_TRACKING_URI        read by the MLflow layer when --tracking-uri is not given
  {DATA_USERNAME_ENV:<26} HTTP basic auth of an http(s) data source (--local; on a
  {DATA_PASSWORD_ENV:<26} cluster the keys of --data-secret); user:password in a --data
                             URL is moved here, never into a pipeline parameter
  {MLFLOW_USERNAME_ENV:<26} the same for the tracking server (--local; on a cluster
  {MLFLOW_PASSWORD_ENV:<26} --mlflow-secret); user:password in --tracking-uri moves here

outputs of --local (under --output-dir, default ./{DEFAULT_OUTPUT_DIR}):
  {PIPELINE_NAME}-<timestamp>/<task>/...   each task's artifacts (model, metrics, report...)
  .kfp_cache/                              kfp.local's cache: an identical second run
                                           reuses download-dataset and preprocess-dataset

exit status: 0 success; 1 a step, the run or the server failed (the message names the step
and its error); 2 bad usage or configuration; 130 interrupted.

examples:
  python pipeline.py --local --data ../shared/data/iris-image.zip --summary summary.json
  python pipeline.py --local --set epochs=2 --set image_size=96 --set weights=none
  python pipeline.py --compile -o pipeline.yaml --mlflow-secret mlflow-credentials
  python pipeline.py --submit --host http://localhost:8080 --experiment iris --wait
  python pipeline.py --restore-champion 3     # undo a promotion: v3 is champion again
  python pipeline.py --predict new-photos/ --model-uri models:/iris-image-classifier/3
  python pipeline.py --submit --predict s3://bucket/new/ --schedule "0 2 * * *" --host URL"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline.py",
        description=DESCRIPTION,
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    modes = parser.add_argument_group("mode (choose one)").add_mutually_exclusive_group(
        required=True)
    modes.add_argument("--local", action="store_true",
                       help="run the whole DAG here with kfp.local (SubprocessRunner, this "
                            "Python environment); each step is its own process")
    modes.add_argument("--compile", action="store_true",
                       help="write the pipeline's KFP IR YAML (see -o)")
    modes.add_argument("--submit", action="store_true",
                       help="compile, upload (new pipeline or version) and start a run on the "
                            "KFP API at --host")
    modes.add_argument("--restore-champion", metavar="VERSION",
                       help="put the registry's champion alias back on VERSION of "
                            "registered_model_name (at --tracking-uri; default: the local "
                            "mlflow.db) and record the move in the alias history")

    conf = parser.add_argument_group("configuration (all modes)")
    conf.add_argument("--config", metavar="FILE.yaml", type=Path,
                      help="YAML mapping of configuration keys (listed below) to values")
    conf.add_argument("--data", metavar="URI",
                      help="data set source: http(s)/s3/gs/file URL, local archive or folder "
                           "(sets data_source; the default is the public iris-image.zip URL). "
                           "Its sha256 is recorded, checked only if given with "
                           "--set data_sha256=...")
    conf.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                      dest="overrides",
                      help="override one configuration key (repeatable); typed and validated")
    conf.add_argument("--sweep", metavar="SWEEP.yaml", type=Path,
                      help="train every trial of this sweep file (trials/grid of train "
                           "settings, see sweeps/default.yaml) and evaluate and register only "
                           "the one with the best validation score")
    conf.add_argument("--tracking-uri", metavar="URI",
                      help="MLflow tracking URI. --local default: sqlite mlflow.db in the "
                           "working folder (or MLFLOW_TRACKING_URI); on a cluster the steps "
                           "read MLFLOW_TRACKING_URI from the ConfigMap / KFP MLflow plugin")

    local = parser.add_argument_group("--local")
    local.add_argument("--output-dir", metavar="DIR", type=Path, default=DEFAULT_OUTPUT_DIR,
                       help=f"where runs and the cache go (default: ./{DEFAULT_OUTPUT_DIR})")
    local.add_argument("--no-cache", action="store_true",
                       help="run every step, ignoring kfp.local's cache (needed when a local "
                            "data folder changed without a digest: the cache key is the path)")
    local.add_argument("-v", "--verbose", action="store_true",
                       help="stream every step's full output (kfp.local's executor dumps, "
                            "TensorFlow's logs) instead of one line per step")
    local.add_argument("--summary", metavar="FILE", type=Path,
                       help="write a JSON summary: test metrics and majority baseline, data "
                            "counts, gate verdict, MLflow URI / run id / model URI, outputs")

    comp = parser.add_argument_group("--compile")
    comp.add_argument("-o", "--output", metavar="FILE", type=Path, default=None,
                      help=f"IR YAML to write (default: {DEFAULT_PACKAGE})")

    cluster = parser.add_argument_group("cluster (--compile and --submit)")
    cluster.add_argument("--mlflow-secret", metavar="NAME",
                         help="Kubernetes Secret whose keys " + " and ".join(MLFLOW_SECRET_KEYS)
                              + " become the tracking steps' environment (e.g. "
                                "mlflow-credentials); only the name is compiled in")
    cluster.add_argument("--data-secret", metavar="NAME",
                         help="Kubernetes Secret whose keys (any of " + ", ".join(DATA_SECRET_KEYS)
                              + ") become the download step's environment: basic auth for an "
                                "http(s) data source, keys for s3://; only the name is compiled "
                                "in (credentials in a --data URL are refused)")
    cluster.add_argument("--allow-placeholder-images", action="store_true",
                         help="use containers/images.json even while it holds the repository's "
                              "placeholder image names (default: --compile warns, --submit "
                              "refuses; run containers/build.sh to build and push real ones)")
    cluster.add_argument("--mlflow-config-map", metavar="NAME", default=MLFLOW_CONFIG_MAP,
                         help="optional ConfigMap whose MLFLOW_TRACKING_URI key reaches the "
                              f"tracking steps (default: {MLFLOW_CONFIG_MAP}; '' for none)")

    submit = parser.add_argument_group("--submit")
    submit.add_argument("--host", metavar="URL", help="KFP API endpoint (required for --submit)")
    submit.add_argument("--experiment", metavar="NAME",
                        help="KFP experiment (default: the config's experiment_name)")
    submit.add_argument("--namespace", metavar="NS",
                        help="Kubernetes namespace of a multi-user Kubeflow")
    submit.add_argument("--run-name", metavar="NAME", help="run display name")
    submit.add_argument("--wait", action="store_true",
                        help="wait for the run; exit 0 only if it succeeded")
    submit.add_argument("--timeout", metavar="SECONDS", type=float,
                        default=DEFAULT_WAIT_TIMEOUT_S,
                        help=f"longest --wait (default: {DEFAULT_WAIT_TIMEOUT_S} s)")
    add_predict_arguments(parser)
    return parser


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["key=value", ...]`` -> mapping; a malformed item is a ``ValueError`` naming it."""
    values: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}; valid keys: "
                             + ", ".join(sorted(PipelineConfig.field_names())))
        values[key.strip()] = value
    return values


def resolve_config(config_file: Path | None = None, data: str | None = None,
                   overrides: Sequence[str] = (),
                   environ: Mapping[str, str] | None = None) -> PipelineConfig:
    """Defaults < ``config_file`` < environment (:func:`env_overrides`) < ``data`` < ``--set``.

    The default ``data_sha256`` is the digest of the default source only: when the layers
    change ``data_source`` without giving a digest, the check is off (the actual sha256 is
    still recorded and :func:`closing_block` says how to pin it); a digest given in any
    layer is enforced.
    """
    layers: list[Mapping[str, Any]] = []
    if config_file is not None:
        layers.append(read_yaml_mapping(config_file))
    layers.append(env_overrides(environ))
    if data is not None:
        layers.append({"data_source": data})
    layers.append(parse_overrides(overrides))
    config = PipelineConfig()
    for layer in layers:
        if layer:
            config = PipelineConfig.from_mapping(layer, config)
    if (config.data_source != DEFAULT_DATA_SOURCE
            and not any("data_sha256" in layer for layer in layers)):
        config = PipelineConfig.from_mapping({"data_sha256": ""}, config)
    return config


def _check_mode_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject options that would be silently ignored in the chosen mode."""
    only = {
        "local": [("summary", "--summary"), ("no_cache", "--no-cache"),
                  ("verbose", "--verbose")],
        "compile": [("output", "-o/--output")],
        "submit": [("host", "--host"), ("experiment", "--experiment"),
                   ("namespace", "--namespace"), ("run_name", "--run-name"), ("wait", "--wait")],
    }
    for mode, options in only.items():
        if getattr(args, mode):
            continue
        for dest, flag in options:
            if getattr(args, dest):
                parser.error(f"{flag} only applies to --{mode}")
    if args.output_dir != DEFAULT_OUTPUT_DIR and not args.local:
        parser.error("--output-dir only applies to --local")
    if args.local and args.mlflow_secret:
        parser.error("--mlflow-secret only applies to --compile and --submit (locally, "
                     "export MLFLOW_TRACKING_USERNAME/PASSWORD instead)")
    if args.local and args.data_secret:
        parser.error(f"--data-secret only applies to --compile and --submit (locally, export "
                     f"{DATA_USERNAME_ENV}/{DATA_PASSWORD_ENV} or the object store's keys)")
    if args.local and args.allow_placeholder_images:
        parser.error("--allow-placeholder-images only applies to --compile and --submit")
    if args.submit and not args.host:
        parser.error("--submit needs --host URL (the KFP API endpoint)")


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
                     f"{int(cv['cv_final_epochs'])} epochs on all of them)")
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


def _path_problem(path: Path, folder: bool) -> str | None:
    """Why ``path`` cannot become the folder (``folder``) or file asked for, else None."""
    if path.exists() and folder != path.is_dir():
        return "is a file, not a folder" if folder else "is a folder; give a file path"
    # an existing file is replaced (atomically, from its folder): its folder must be writable
    parent = path if path.exists() and folder else path.parent
    while not parent.exists():  # the nearest existing ancestor is where creation starts
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {str(parent)!r} is a file"
    # permission bits do not tell (root passes os.access, /proc and read-only mounts refuse
    # anyway): create and remove a file where the writes will start
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as exc:
        return f"cannot be written: {str(parent)!r} refuses new files ({exc.strerror or exc})"
    return None


def _local_store(args: argparse.Namespace) -> Path | None:
    """The sqlite file a ``--local`` run tracks to (``mlflow.db`` in the working folder by
    default, its artifacts beside it), or None for a tracking server."""
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.strip():
        return Path.cwd() / "mlflow.db"  # tracking.LOCAL_DB_NAME (importing it loads MLflow)
    prefix = "sqlite:///"
    return Path(uri.strip()[len(prefix):]) if uri.strip().startswith(prefix) else None


def _output_problem(args: argparse.Namespace) -> str | None:
    """Check every output path before any work, so a run cannot fail at its very end."""
    outputs: list[tuple[str, Path | None, bool]] = [
        ("--output-dir", args.output_dir if args.local else None, True),
        ("--summary", args.summary, False),
        ("-o/--output", args.output, False),
        ("the MLflow store", _local_store(args) if args.local else None, False),
    ]
    for flag, path, folder in outputs:
        problem = _path_problem(path, folder) if path is not None else None
        if problem:
            return f"{flag} {str(path)!r} {problem}"
    return None


#: Where ``mlflow ui`` serves by default.
UI_ADDRESS = "http://127.0.0.1:5000"


def ui_command(tracking_uri: str) -> str:
    """The command that opens ``tracking_uri`` in the MLflow UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"open {tracking_uri} in a browser"
    return f'mlflow ui --backend-store-uri "{tracking_uri}" --app-name {mlflow_ui.APP_NAME}'


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
        _check_mode_options(parser, args)
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
    problem = _output_problem(args)
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


__all__ = ["build_parser", "closing_block", "main", "parse_overrides", "resolve_config",
           "ui_command"]
