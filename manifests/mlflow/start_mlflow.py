"""Entry point of the MLflow tracking server pod: derive the secret-bearing settings, then exec.

Runs inside the official MLflow image (stdlib only). It exists because three settings embed the
PostgreSQL password, and none of them may live in a ConfigMap, in the process arguments or in a
second hand-kept copy of the password:

- the backend store URI (passed as ``MLFLOW_BACKEND_STORE_URI``, never on the command line,
  where ``ps`` would show it);
- the basic-auth app's config file, whose ``database_uri`` has no environment override: it is
  written to a memory-backed emptyDir (mode 0600) and found through ``MLFLOW_AUTH_CONFIG_PATH``;
- both URIs percent-encode the user and password, and the config file doubles ``%`` because
  MLflow reads it with ``configparser`` interpolation; a random password then just works.

Everything else comes from the ConfigMap ``mlflow-server-config`` and is passed as flags.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

LOG = logging.getLogger("start_mlflow")

#: Environment variables the pod must set (Secrets: POSTGRES_USER/PASSWORD; the rest ConfigMap).
REQUIRED = (
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "POSTGRES_HOST",
    "POSTGRES_PORT",
    "POSTGRES_DB",
    "MLFLOW_AUTH_DB",
    "MLFLOW_ARTIFACTS_DESTINATION",
    "MLFLOW_SERVER_ALLOWED_HOSTS",
    "MLFLOW_AUTH_ADMIN_USERNAME",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
)
#: Where the rendered basic-auth config goes (a memory-backed emptyDir in the Deployment).
DEFAULT_AUTH_CONFIG_DIR = "/var/run/mlflow-auth"
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE", "NO_PERMISSIONS")


def database_uri(env: Mapping[str, str], database: str) -> str:
    """SQLAlchemy URI of ``database`` on the PostgreSQL server, credentials percent-encoded."""
    user = quote(env["POSTGRES_USER"], safe="")
    password = quote(env["POSTGRES_PASSWORD"], safe="")
    host, port = env["POSTGRES_HOST"], env["POSTGRES_PORT"]
    return f"postgresql+psycopg2://{user}:{password}@{host}:{port}/{quote(database, safe='')}"


def render_auth_config(env: Mapping[str, str]) -> str:
    """The basic-auth app's INI file (admin credentials stay in env: MLflow reads them there)."""
    permission = env.get("MLFLOW_AUTH_DEFAULT_PERMISSION", "READ")
    if permission not in PERMISSIONS:
        raise ValueError(f"MLFLOW_AUTH_DEFAULT_PERMISSION={permission!r} is not one of "
                         f"{list(PERMISSIONS)}")
    # configparser's BasicInterpolation treats '%' as special: percent-encoded text needs '%%'.
    uri = database_uri(env, env["MLFLOW_AUTH_DB"]).replace("%", "%%")
    return (
        "[mlflow]\n"
        f"default_permission = {permission}\n"
        f"database_uri = {uri}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )


def server_command(env: Mapping[str, str]) -> list[str]:
    """``mlflow server`` flags: basic auth, served artifacts, host allow-list; no secrets."""
    return [
        "mlflow", "server",
        "--app-name", "basic-auth",
        "--host", "0.0.0.0",
        "--port", env.get("MLFLOW_PORT", "5000"),
        "--workers", env.get("MLFLOW_WORKERS", "2"),
        "--serve-artifacts",
        "--artifacts-destination", env["MLFLOW_ARTIFACTS_DESTINATION"],
        "--allowed-hosts", env["MLFLOW_SERVER_ALLOWED_HOSTS"],
    ]


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def prepare(env: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    """Validate ``env``, write the auth config; return the command and its environment."""
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise ValueError(f"missing or empty environment variable(s): {', '.join(missing)} "
                         "(see manifests/README.md: Secrets to create)")
    config_dir = Path(env.get("MLFLOW_AUTH_CONFIG_DIR", DEFAULT_AUTH_CONFIG_DIR))
    config_path = config_dir / "basic_auth.ini"
    write_private(config_path, render_auth_config(env))
    child_env = dict(env)
    child_env["MLFLOW_BACKEND_STORE_URI"] = database_uri(env, env["POSTGRES_DB"])
    child_env["MLFLOW_AUTH_CONFIG_PATH"] = str(config_path)
    return server_command(env), child_env


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        command, child_env = prepare(os.environ)
    except (ValueError, OSError) as exc:
        LOG.error("cannot start the MLflow server: %s", exc)
        sys.exit(2)
    LOG.info("starting: %s", " ".join(command))
    os.execvpe(command[0], command, child_env)


if __name__ == "__main__":
    main()
