"""The CLI's arguments: the parser, its checks, and the config the layers resolve to."""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import (
    DEFAULT_DATA_SOURCE,
    ENV_OVERRIDES,
    PipelineConfig,
    env_overrides,
    read_yaml_mapping,
)
from pipeline.dag import PIPELINE_NAME
from pipeline.lib.credentials import (
    DATA_PASSWORD_ENV,
    DATA_SECRET_KEYS,
    DATA_USERNAME_ENV,
    MLFLOW_CONFIG_MAP,
    MLFLOW_PASSWORD_ENV,
    MLFLOW_USERNAME_ENV,
)
from pipeline.predict_cli import add_predict_arguments
from pipeline.runners import DEFAULT_OUTPUT_DIR, DEFAULT_PACKAGE, DEFAULT_WAIT_TIMEOUT_S
from pipeline.tasks import MLFLOW_SECRET_KEYS

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


def check_mode_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
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


def output_problem(args: argparse.Namespace) -> str | None:
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
