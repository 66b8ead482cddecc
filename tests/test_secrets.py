"""Credentials never reach a log, file, MLflow entity or compiled YAML; nothing silently lost.

Fast tests: URL redaction and splitting, the download step's basic auth, the CLI's refusal to
compile or submit credentials, ``--data-secret``, placeholder image names and the tracking
URI inside a KFP pod. The slow test runs ``pipeline.py --local`` against a data server and an
MLflow server that both demand basic auth, with a unique password planted in both URLs, then
greps every file the run left and every MLflow entity for it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import dsl

from components.download_dataset import download_dataset
from components.register_model import register_model
from pipeline.cli import main
from pipeline.config import PipelineConfig, load_images, placeholder_images
from pipeline.dag import pipeline_arguments
from pipeline.lib.credentials import (
    DATA_SECRET_KEYS,
    MLFLOW_CONFIG_MAP,
    move_credentials_to_env,
    redact_uri,
    split_credentials,
)
from pipeline.lib.fetch import fetch_dataset
from pipeline.lib.tracking_store import TrackingUriMissingError, resolve_tracking_uri
from pipeline.lib.transfer import DownloadError
from pipeline.runners import StepFailedError, compile_pipeline
from tests.support.auth_servers import auth_proxy, file_server
from tests.support.cli_helpers import (
    PROJECT_ROOT,
    V1_BACKBONE,
    clean_env,
    run_local_cli,
    set_flags,
    succeeded,
)
from tests.support.mlflow_server import MlflowServer

DATA_ENV = ("IRIS_DATA_USERNAME", "IRIS_DATA_PASSWORD")
PAYLOAD = b"PK\x03\x04zip bytes " * 100  # a zip's magic: the download step sniffs it


def _password() -> str:
    """A password no other test, file or log could contain by chance."""
    return f"pw-{uuid.uuid4().hex}"


@pytest.fixture
def no_data_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in DATA_ENV:
        monkeypatch.delenv(var, raising=False)


# --- URLs ----------------------------------------------------------------------------------


def test_redact_and_split_take_userinfo_out_of_urls() -> None:
    assert redact_uri("https://u:p%40ss@host:8443/x.zip?a=1") == "https://u:***@host:8443/x.zip?a=1"
    assert redact_uri("https://token@host/x") == "https://***@host/x"
    assert redact_uri("https://[::1]:5000/x") == "https://[::1]:5000/x"
    assert redact_uri("/data/a@b/iris.zip") == "/data/a@b/iris.zip"  # a path, not a URL
    assert split_credentials("https://u:p%40ss@host:8443/x.zip") == (
        "https://host:8443/x.zip", "u", "p@ss")
    assert split_credentials("https://token@host/x") == ("https://host/x", "token", None)
    assert split_credentials("s3://bucket/k") == ("s3://bucket/k", None, None)


def test_credentials_move_to_the_environment_and_other_schemes_are_refused() -> None:
    environ: dict[str, str] = {}
    clean = move_credentials_to_env("https://u:s3cret@host/x.zip", *DATA_ENV, environ)
    assert clean == "https://host/x.zip"
    assert environ == {"IRIS_DATA_USERNAME": "u", "IRIS_DATA_PASSWORD": "s3cret"}
    assert move_credentials_to_env("https://host/y", *DATA_ENV, environ) == "https://host/y"
    with pytest.raises(ValueError, match="AWS_ACCESS_KEY_ID") as err:
        move_credentials_to_env("s3://KEY:s3cret@bucket/x.zip", *DATA_ENV, {})
    assert "s3cret" not in str(err.value)


def test_pipeline_arguments_never_carry_credentials() -> None:
    config = PipelineConfig.from_mapping({"data_source": "https://u:s3cret@host/x.zip"})
    with pytest.raises(ValueError, match="--data-secret") as err:
        pipeline_arguments(config)
    assert "s3cret" not in str(err.value)
    with pytest.raises(ValueError, match="--mlflow-secret"):
        pipeline_arguments(PipelineConfig(), "http://u:s3cret@mlflow:5000")


# --- the download step's basic auth ----------------------------------------------------------


def test_download_authenticates_from_the_environment(tmp_path: Path, no_data_credentials: None,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "iris.zip"
    archive.write_bytes(PAYLOAD)
    password = _password()
    with file_server(archive, "reader", password) as server:
        url = f"{server.url}/iris.zip"
        with pytest.raises(DownloadError, match=r"HTTP 401.*IRIS_DATA_USERNAME"):
            fetch_dataset(url, tmp_path / "a", cache_dir=tmp_path / "cache", retries=0)
        monkeypatch.setenv("IRIS_DATA_USERNAME", "reader")
        monkeypatch.setenv("IRIS_DATA_PASSWORD", password)
        fetched = fetch_dataset(url, tmp_path / "b", cache_dir=tmp_path / "cache", retries=0)
    assert fetched.read_bytes() == PAYLOAD
    assert server.authorized == [("GET", "/iris.zip")]


def test_download_component_uses_url_credentials_but_records_and_logs_none(
        tmp_path: Path, no_data_credentials: None, caplog: pytest.LogCaptureFixture) -> None:
    archive = tmp_path / "iris.zip"
    archive.write_bytes(PAYLOAD)
    password = _password()
    raw = dsl.Dataset(name="raw_data", uri=str(tmp_path / "raw"))
    with file_server(archive, "reader", password) as server, caplog.at_level(logging.DEBUG):
        host = server.url.removeprefix("http://")
        download_dataset(data_source=f"http://reader:{password}@{host}/iris.zip",
                         data_sha256="", download_deadline_s=60.0,
                         download_min_bytes_per_s=0.0, raw_data=raw)
    assert server.authorized == [("GET", "/iris.zip")]
    assert raw.metadata["source"] == f"http://reader:***@{host}/iris.zip"
    assert (tmp_path / "raw" / "iris.zip").read_bytes() == PAYLOAD
    assert password not in caplog.text and "downloaded http://127.0.0.1" in caplog.text


# --- compile and submit refuse credentials; --data-secret --------------------------------------


@pytest.mark.parametrize(("flag", "url", "secret_flag"), [
    ("--data", "https://reader:{}@data.example/iris.zip", "--data-secret"),
    ("--tracking-uri", "http://tracker:{}@mlflow.example:5000", "--mlflow-secret"),
])
@pytest.mark.parametrize("mode", ["--compile", "--submit"])
def test_compile_and_submit_refuse_credentials_in_urls(
        mode: str, flag: str, url: str, secret_flag: str, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    password = _password()
    out = tmp_path / "p.yaml"
    argv = [mode, flag, url.format(password), "--allow-placeholder-images",
            *(["-o", str(out)] if mode == "--compile" else ["--host", "http://127.0.0.1:9"])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "carries credentials" in err and "Kubernetes Secret" in err and secret_flag in err
    assert password not in err
    assert not list(tmp_path.iterdir()), "compile wrote something"


def test_local_parameters_carry_no_credentials_the_environment_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--local`` with passwords in ``--data`` and ``--tracking-uri``: every parameter the run
    would get (name and value) is scanned for them; they reach the steps' environment."""
    passwords = {"data": _password(), "tracking": _password()}
    for var in (*DATA_ENV, "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "placeholder")  # so monkeypatch removes what the CLI sets
        monkeypatch.delenv(var)
    parameters: list[dict[str, Any]] = []

    def record_parameters(config: PipelineConfig, *, tracking_uri: str, **_: object) -> None:
        parameters.append(pipeline_arguments(config, tracking_uri))  # what run_local passes
        raise StepFailedError("download-dataset", "stopped by the test before any work")

    monkeypatch.setattr("pipeline.cli.run_local", record_parameters)
    code = main(["--local", "--data", f"https://reader:{passwords['data']}@data.example/x.zip",
                 "--tracking-uri", f"http://tracker:{passwords['tracking']}@127.0.0.1:9",
                 "--output-dir", str(tmp_path / "out")])
    assert code == 1 and len(parameters) == 1, "the CLI never reached the runner"
    produced = parameters[0]
    for name, value in produced.items():
        for password in passwords.values():
            assert password not in name and password not in str(value), name
    assert produced["data_source"] == "https://data.example/x.zip"
    assert produced["tracking_uri"] == "http://127.0.0.1:9"
    assert (os.environ["IRIS_DATA_USERNAME"], os.environ["IRIS_DATA_PASSWORD"]) == (
        "reader", passwords["data"])
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == passwords["tracking"]


def test_data_secret_reaches_the_download_step_only(tmp_path: Path) -> None:
    path = compile_pipeline(tmp_path / "p.yaml", data_secret="iris-data-credentials",
                            mlflow_config_map=None)
    platform = list(yaml.safe_load_all(path.read_text()))[1]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    (secret,) = executors["exec-download-dataset"]["secretAsEnv"]
    assert secret["secretName"] == "iris-data-credentials" and secret["optional"] is True
    assert {m["secretKey"]: m["envVar"] for m in secret["keyToEnv"]} == {
        k: k for k in DATA_SECRET_KEYS}
    assert all("secretAsEnv" not in e for name, e in executors.items()
               if name != "exec-download-dataset")


def test_data_secret_is_a_cluster_flag(capsys: pytest.CaptureFixture) -> None:
    assert main(["--local", "--data-secret", "s"]) == 2
    assert "--data-secret only applies to --compile" in capsys.readouterr().err


# --- placeholder image names ----------------------------------------------------------------


def test_submit_refuses_placeholder_images(capsys: pytest.CaptureFixture) -> None:
    assert placeholder_images()  # the committed containers/images.json (build.sh drops the mark)
    assert main(["--submit", "--host", "http://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "placeholder images" in err and "containers/build.sh" in err
    assert "--allow-placeholder-images" in err


def test_compile_warns_about_placeholder_images(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert main(["--compile", "-o", str(tmp_path / "p.yaml")]) == 0
    assert "placeholder images" in caplog.text and "containers/build.sh" in caplog.text
    assert load_images()["cpu"] in (tmp_path / "p.yaml").read_text()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert main(["--compile", "-o", str(tmp_path / "q.yaml"),
                     "--allow-placeholder-images"]) == 0
    assert "placeholder" not in caplog.text


# --- no tracking URI inside a KFP pod ----------------------------------------------------------


def test_no_tracking_uri_in_a_kfp_pod_is_an_error_naming_the_config_map(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where the step would create its throw-away mlflow.db
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # a notebook pod: still local
    assert resolve_tracking_uri(None, tmp_path).startswith("sqlite:///")
    monkeypatch.setenv("KFP_POD_NAME", "iris-image-pipeline-abc-123")
    with pytest.raises(TrackingUriMissingError) as err:
        register_model(trained_model=dsl.Model(uri=str(tmp_path / "m")),
                       metrics=dsl.Metrics(uri=str(tmp_path / "x")),
                       evaluation=dsl.Artifact(uri=str(tmp_path / "e")), tracking_uri="",
                       pipeline_run_id="r", pipeline_name="p", experiment_name="e",
                       registered_model_name="m", gate_metric="accuracy", promotion_margin=0.0)
    assert MLFLOW_CONFIG_MAP in str(err.value) and "--tracking-uri" in str(err.value)
    assert not (tmp_path / "mlflow.db").exists()
    assert resolve_tracking_uri("http://mlflow:5000", tmp_path) == "http://mlflow:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-config-map:5000")
    assert resolve_tracking_uri("", tmp_path) == "http://from-config-map:5000"


# --- end to end: a planted password appears nowhere -----------------------------------------


def _files_containing(root: Path, needle: bytes) -> list[str]:
    return [str(p) for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


def _mlflow_entities(client: Any) -> list[Any]:
    """Every experiment, run (params, tags, dataset inputs), registered model and version."""
    entities: list[Any] = []
    for experiment in client.search_experiments():
        entities.append(experiment)
        for run in client.search_runs([experiment.experiment_id], max_results=1000):
            entities.append(run.to_dictionary())
            entities.extend(d.dataset for d in run.inputs.dataset_inputs)
    for model in client.search_registered_models():
        entities.append(model)
        entities.extend(client.search_model_versions(f"name = '{model.name}'"))
    return entities


@pytest.mark.slow
@pytest.mark.mlflow_server
def test_planted_passwords_reach_no_file_log_or_mlflow_entity(
        tmp_path: Path, iris_zip: Path, mobilenet_weights: Path,
        mlflow_server: MlflowServer) -> None:
    data_password, tracking_password = _password(), _password()
    workdir = tmp_path / "work"
    workdir.mkdir()
    with (file_server(iris_zip, "reader", data_password) as data,
          auth_proxy(mlflow_server.url, "tracker", tracking_password) as proxy):
        data_host, proxy_host = (s.url.removeprefix("http://") for s in (data, proxy))
        run = run_local_cli(
            workdir, "--data", f"http://reader:{data_password}@{data_host}/{iris_zip.name}",
            "--tracking-uri", f"http://tracker:{tracking_password}@{proxy_host}",
            "--set", "epochs=1", "--set", "image_size=64", "--set", "head_feature_views=0",
            "--set", f"weights={mobilenet_weights}", *set_flags(*V1_BACKBONE),
            "--set", "gate_threshold=0",
            "--set", "experiment_name=secrets-e2e",
            env=clean_env(IRIS_CACHE_DIR=str(workdir / "download-cache")))
        compiled = subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "pipeline.py"), "--compile",
             "-o", str(workdir / "pipeline.yaml"), "--data-secret", "iris-data-credentials",
             "--data", f"http://reader:{data_password}@{data_host}/{iris_zip.name}"],
            cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=300)
    summary = succeeded(run)
    # Both servers saw the credentials: the run really authenticated, and was never refused.
    assert data.authorized == [("GET", f"/{iris_zip.name}")] and not data.refused
    assert proxy.authorized and not proxy.refused
    assert summary["data"]["source"] == f"http://{data_host}/{iris_zip.name}"
    assert summary["registration"]["registered"] is True
    assert compiled.returncode == 2 and "Kubernetes Secret" in compiled.stderr
    assert not (workdir / "pipeline.yaml").exists()

    from mlflow import MlflowClient

    client = MlflowClient(mlflow_server.url)
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.data.params["data_source"] == summary["data"]["source"]
    entities = _mlflow_entities(client)
    assert len(entities) > 5
    for password in (data_password, tracking_password):
        needle = password.encode()
        assert password not in run.stdout + run.stderr + compiled.stderr
        assert not _files_containing(workdir, needle), "password written to the run's files"
        server_root = mlflow_server.artifacts_dir.parent  # its mlflow.db and artifacts
        assert not _files_containing(server_root, needle), "password in the MLflow store"
        assert not [e for e in entities if password in str(e)], "password in MLflow entities"
    assert (workdir / "local_outputs" / ".kfp_cache").is_dir()  # the cache was grepped too
    assert "executor_output.json" in {p.name for p in (workdir / "local_outputs").rglob("*")}
