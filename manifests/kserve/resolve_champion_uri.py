"""Write the object-store URI of a registered model alias into manifests/kserve/champion.env.

KServe cannot read ``models:/iris-image-classifier@champion``: its storage initializer needs
the folder in the bucket that holds the model's ``MLmodel`` file. This asks the tracking server
which model version the alias points at, takes that logged model's artifact location (MLflow
3: ``mlflow-artifacts:/<experiment>/models/<model id>/artifacts`` when the server proxies
artifacts) and maps it onto the server's ``--artifacts-destination``, the bucket itself.

    MLFLOW_TRACKING_URI=http://localhost:5000 MLFLOW_TRACKING_USERNAME=... \\
    MLFLOW_TRACKING_PASSWORD=... python manifests/kserve/resolve_champion_uri.py
    kubectl apply -k manifests/kserve

The artifacts destination defaults to MLFLOW_ARTIFACTS_DESTINATION in
manifests/mlflow/config.yaml, the registered model name to the pipeline config's default.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

LOG = logging.getLogger("resolve_champion_uri")

HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "champion.env"
SERVER_CONFIG = HERE.parent / "mlflow" / "config.yaml"
#: URI schemes KServe's default storage initializer downloads from.
OBJECT_STORE_SCHEMES = ("s3", "gs", "https", "http")
#: REST path prefix of proxied artifacts, for locations stored as http(s) URLs.
_ARTIFACTS_PATH = "/api/2.0/mlflow-artifacts/artifacts/"


def server_artifacts_destination(config_path: Path = SERVER_CONFIG) -> str:
    """``MLFLOW_ARTIFACTS_DESTINATION`` of the tracking server's ConfigMap."""
    for doc in yaml.safe_load_all(config_path.read_text()):
        if doc and doc.get("kind") == "ConfigMap" and (
            doc["metadata"]["name"] == "mlflow-server-config"
        ):
            return str(doc["data"]["MLFLOW_ARTIFACTS_DESTINATION"])
    raise ValueError(f"no ConfigMap mlflow-server-config with MLFLOW_ARTIFACTS_DESTINATION in "
                     f"{str(config_path)!r}")


def to_storage_uri(artifact_location: str, artifacts_destination: str) -> str:
    """Map an MLflow artifact location to the object-store URI KServe can download.

    ``mlflow-artifacts:`` locations (and their http(s) REST form) are relative to the server's
    ``--artifacts-destination``; s3/gs locations are already direct. Anything else (a local
    path of a workstation run) cannot be served from a cluster: ``ValueError``.
    """
    parsed = urlparse(artifact_location)
    if parsed.scheme == "mlflow-artifacts":
        relative = parsed.path.lstrip("/")
    elif parsed.scheme in ("http", "https") and _ARTIFACTS_PATH in parsed.path:
        relative = parsed.path.split(_ARTIFACTS_PATH, 1)[1]
    elif parsed.scheme in ("s3", "gs"):
        return artifact_location
    else:
        raise ValueError(f"artifact location {artifact_location!r} is not in an object store; "
                         "was the model logged through a tracking server with --serve-artifacts?")
    if not relative:
        raise ValueError(f"artifact location {artifact_location!r} has no path")
    if urlparse(artifacts_destination).scheme not in OBJECT_STORE_SCHEMES:
        raise ValueError(f"artifacts destination {artifacts_destination!r} is not an object-store "
                         "URI (s3://bucket[/prefix])")
    return f"{artifacts_destination.rstrip('/')}/{relative}"


def alias_artifact_location(client: Any, name: str, alias: str) -> str:
    """Artifact location of the model version ``name@alias`` (an MLflow 3 logged model).

    MLflow 3 registers logged models with source ``models:/<model id>`` (the version's
    ``model_id`` field is not always filled in), so the id is taken from either.
    """
    version = client.get_model_version_by_alias(name, alias)
    source = str(version.source or "")
    model_id = version.model_id
    if not model_id and source.startswith("models:/"):
        candidate = source[len("models:/"):]
        if candidate and "/" not in candidate and "@" not in candidate:
            model_id = candidate
    if model_id:
        return str(client.get_logged_model(model_id).artifact_location)
    if source and not source.startswith(("models:/", "runs:/")):
        return source
    raise ValueError(f"model version {name} v{version.version} (@{alias}) has no logged model "
                     f"and source {source!r} is not a storage location")


def write_env(path: Path, storage_uri: str) -> None:
    """Write ``STORAGE_URI=...`` atomically (temp file in the same folder, then rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(f"STORAGE_URI={storage_uri}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def default_model_name() -> str:
    """The registered model name the pipeline uses by default (one place: PipelineConfig)."""
    try:
        from pipeline.config import PipelineConfig
    except ImportError:
        return "iris-image-classifier"
    return PipelineConfig().registered_model_name


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLflow tracking server (default: $MLFLOW_TRACKING_URI); "
                             "credentials from MLFLOW_TRACKING_USERNAME/PASSWORD")
    parser.add_argument("--model-name", default=None,
                        help="registered model (default: the pipeline's registered_model_name)")
    parser.add_argument("--alias", default="champion", help="model alias (default: champion)")
    parser.add_argument("--artifacts-destination", default=None,
                        help="the server's --artifacts-destination (default: "
                             "MLFLOW_ARTIFACTS_DESTINATION in manifests/mlflow/config.yaml)")
    parser.add_argument("--output", default=str(DEFAULT_OUTPUT),
                        help="env file to write, '-' for stdout (default: %(default)s)")
    args = parser.parse_args(argv)
    if not args.tracking_uri:
        parser.error("no tracking server: pass --tracking-uri or set MLFLOW_TRACKING_URI")

    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = args.model_name or default_model_name()
    try:
        destination = args.artifacts_destination or server_artifacts_destination()
        location = alias_artifact_location(MlflowClient(args.tracking_uri), name, args.alias)
        storage_uri = to_storage_uri(location, destination)
    except (MlflowException, ValueError, OSError) as exc:
        LOG.error("cannot resolve models:/%s@%s on %s: %s", name, args.alias, args.tracking_uri,
                  exc)
        return 1
    if args.output == "-":
        sys.stdout.write(storage_uri + "\n")
    else:
        write_env(Path(args.output), storage_uri)
        LOG.info("models:/%s@%s -> %s (written to %s)", name, args.alias, storage_uri,
                 args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
