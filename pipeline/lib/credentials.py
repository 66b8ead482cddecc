"""Credentials out of recorded URLs: redaction, and moving ``user:password`` into the environment.

Why: every pipeline parameter is written down somewhere we do not control (kfp.local's
executor input dumps and cache, the KFP API's run records, the compiled YAML's defaults,
MLflow params), so a URL with ``user:password@`` in it leaks wherever it travels. The CLI
therefore strips the credentials before a URL becomes a parameter and hands them to the
step processes through the environment (locally) or a Kubernetes Secret (on a cluster).
No MLflow or TensorFlow import here: the CLI and the download step use it too.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

#: HTTP basic auth for an http(s) data source (download step); from a Secret on a cluster.
DATA_USERNAME_ENV = "IRIS_DATA_USERNAME"
DATA_PASSWORD_ENV = "IRIS_DATA_PASSWORD"
#: Keys of the data source's Secret (``--data-secret``), mapped to same-named variables of the
#: download step: basic auth for http(s), and the object-store keys s3fs/botocore read.
DATA_SECRET_KEYS = (DATA_USERNAME_ENV, DATA_PASSWORD_ENV, "AWS_ACCESS_KEY_ID",
                    "AWS_SECRET_ACCESS_KEY")
#: What MLflow's client reads for HTTP basic auth against a tracking server.
MLFLOW_USERNAME_ENV = "MLFLOW_TRACKING_USERNAME"
MLFLOW_PASSWORD_ENV = "MLFLOW_TRACKING_PASSWORD"
#: The optional ConfigMap (manifests/) whose MLFLOW_TRACKING_URI reaches the tracking steps.
MLFLOW_CONFIG_MAP = "iris-pipeline-mlflow"
#: URL schemes whose ``user:password@`` the pipeline can carry as HTTP basic auth.
HTTP_SCHEMES = ("http", "https")


def _userinfo(uri: str) -> tuple[urllib.parse.SplitResult, str, str] | None:
    """(parsed URL, userinfo, host[:port]) of a ``scheme://user[:password]@host`` URL, else None.

    Local paths (no ``://``) are never URLs with credentials, even if they contain ``@``.
    """
    if "://" not in uri:
        return None
    parsed = urllib.parse.urlsplit(uri)
    userinfo, at, hostport = parsed.netloc.rpartition("@")
    return (parsed, userinfo, hostport) if at else None


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` carries a user name or password (``scheme://user[:password]@host``)."""
    return _userinfo(uri or "") is not None


def redact_uri(uri: str) -> str:
    """``uri`` safe to log or record: ``user:***@`` for a password, ``***@`` for a lone token."""
    found = _userinfo(uri)
    if found is None:
        return uri
    parsed, userinfo, hostport = found
    user, colon, _ = userinfo.partition(":")
    shown = f"{user}:***" if colon else "***"
    return urllib.parse.urlunsplit(parsed._replace(netloc=f"{shown}@{hostport}"))


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(``uri`` without its userinfo, user name, password); (uri, None, None) without any."""
    found = _userinfo(uri)
    if found is None:
        return uri, None, None
    parsed, userinfo, hostport = found
    user, colon, password = userinfo.partition(":")
    clean = urllib.parse.urlunsplit(parsed._replace(netloc=hostport))
    return (clean, urllib.parse.unquote(user),
            urllib.parse.unquote(password) if colon else None)


def move_credentials_to_env(uri: str, username_env: str, password_env: str,
                            environ: MutableMapping[str, str]) -> str:
    """Strip ``user:password@`` from an http(s) ``uri`` into ``environ``; return the clean URI.

    Only http(s) credentials can be carried this way (as HTTP basic auth); other schemes
    (``s3://``, ``gs://``, databases) read their own credential variables, so a URL of those
    with userinfo is a ``ValueError`` naming the redacted URL.
    """
    clean, user, password = split_credentials(uri)
    if user is None:
        return uri
    scheme = urllib.parse.urlsplit(uri).scheme.lower()
    if scheme not in HTTP_SCHEMES:
        raise ValueError(
            f"credentials in a {scheme}:// URL ({redact_uri(uri)}) cannot be kept out of the "
            "pipeline's records: remove them from the URL and set that store's own variables "
            "instead (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for s3://)")
    environ[username_env] = user
    if password is not None:
        environ[password_env] = password
    logger.info("credentials of %s go to the steps as %s, not in the URL", redact_uri(uri),
                f"{username_env}/{password_env}" if password is not None else username_env)
    return clean


__all__ = [
    "DATA_PASSWORD_ENV",
    "DATA_SECRET_KEYS",
    "DATA_USERNAME_ENV",
    "HTTP_SCHEMES",
    "MLFLOW_PASSWORD_ENV",
    "MLFLOW_USERNAME_ENV",
    "has_credentials",
    "move_credentials_to_env",
    "redact_uri",
    "split_credentials",
]
