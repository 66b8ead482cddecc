"""``--submit`` against a recording stand-in of the KFP v2beta1 REST API on 127.0.0.1.

A contract test: the stand-in implements just enough of the API for ``kfp.Client`` (healthz,
pipelines, versions, experiments, runs) and records every request, so the tests check what
our code sends (the compiled spec in the upload, the parameters in the run), not how a real
Kubeflow backend schedules it.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import ENV_OVERRIDES, PipelineConfig
from pipeline.runners import compile_pipeline

API = "/apis/v2beta1"
#: The repository's images.json holds placeholder names, which --submit refuses by default;
#: a stand-in server pulls no image.
SUBMIT = ("--submit", "--allow-placeholder-images")


class FakeKfp:
    """State and request log of the stand-in server."""

    def __init__(self, existing_pipeline: bool = False, final_state: str = "SUCCEEDED") -> None:
        self.requests: list[dict[str, Any]] = []
        self.pipelines: list[dict[str, Any]] = []
        self.versions: list[dict[str, Any]] = []
        self.final_state = final_state
        if existing_pipeline:
            self.pipelines.append({"pipeline_id": "pipe-0", "display_name": "iris-image-pipeline"})
            self.versions.append({"pipeline_id": "pipe-0", "pipeline_version_id": "ver-0",
                                  "display_name": "iris-image-pipeline"})

    def of(self, method: str, path: str) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] == method and r["path"] == path]

    def handle(self, method: str, path: str, query: dict[str, list[str]], headers: Any,
               body: bytes) -> tuple[int, dict[str, Any]]:
        record = {"method": method, "path": path, "query": query, "body": body,
                  "content_type": headers.get("Content-Type", "")}
        self.requests.append(record)
        if path == f"{API}/healthz":
            return 200, {"multi_user": False}
        if method == "GET" and path == f"{API}/pipelines":
            wanted = _filter_name(query)
            found = [p for p in self.pipelines if wanted in (None, p["display_name"])]
            return 200, {"pipelines": found, "total_size": len(found)} if found else {}
        if method == "POST" and path == f"{API}/pipelines/upload":
            record["file"] = _multipart_file(headers, body)
            pipeline = {"pipeline_id": "pipe-1", "display_name": query["name"][0]}
            self.pipelines.append(pipeline)
            self.versions.append({"pipeline_id": "pipe-1", "pipeline_version_id": "ver-1",
                                  "display_name": query["name"][0]})
            return 200, pipeline
        if method == "POST" and path == f"{API}/pipelines/upload_version":
            record["file"] = _multipart_file(headers, body)
            version = {"pipeline_id": query["pipelineid"][0],
                       "pipeline_version_id": f"ver-{len(self.versions)}",
                       "display_name": query["name"][0]}
            self.versions.append(version)
            return 200, version
        if method == "GET" and path.endswith("/versions"):
            pipeline_id = path.split("/")[-2]
            wanted = _filter_name(query)
            found = [v for v in self.versions if v["pipeline_id"] == pipeline_id
                     and wanted in (None, v["display_name"])]
            return 200, {"pipeline_versions": found[::-1], "total_size": len(found)}
        if method == "GET" and path == f"{API}/experiments":
            return 200, {}
        if method == "POST" and path == f"{API}/experiments":
            return 200, {**json.loads(body), "experiment_id": "exp-1"}
        if method == "POST" and path == f"{API}/runs":
            return 200, {**json.loads(body), "run_id": "run-1", "state": "PENDING"}
        if method == "GET" and path == f"{API}/runs/run-1":
            return 200, {"run_id": "run-1", "state": self.final_state}
        return 404, {"error": f"not in the stand-in: {method} {path}"}


def _filter_name(query: dict[str, list[str]]) -> str | None:
    if "filter" not in query:
        return None
    (predicate,) = json.loads(query["filter"][0])["predicates"]
    return predicate["stringValue"] if predicate["key"] == "display_name" else None


def _multipart_file(headers: Any, body: bytes) -> bytes:
    """The ``uploadfile`` part of a multipart/form-data body."""
    raw = f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    for part in message.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return part.get_payload(decode=True)
    raise AssertionError("upload without an 'uploadfile' part")


@pytest.fixture
def kfp_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, FakeKfp]]:
    fake = FakeKfp(**getattr(request, "param", {}))

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urllib.parse.urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, payload = fake.handle(self.command, url.path,
                                          urllib.parse.parse_qs(url.query), self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve  # noqa: N815 (BaseHTTPRequestHandler's naming)

        def log_message(self, format: str, *args: Any) -> None:
            """Keep the access log out of the test output (requests are recorded instead)."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def compiled_spec(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return compile_pipeline(tmp_path_factory.mktemp("spec") / "pipeline.yaml").read_bytes()


def test_submit_uploads_the_compiled_spec_and_runs_with_the_parameters(
        kfp_server: tuple[str, FakeKfp], compiled_spec: bytes,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment route (CI exports these) reaches the run; flags win over it.
    for var in ENV_OVERRIDES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("IRIS_MODEL_WEIGHTS", "/models/mobilenet.h5")
    monkeypatch.setenv("IRIS_DATA_SOURCE", "https://overridden.example/iris.zip")
    host, fake = kfp_server
    argv = [*SUBMIT, "--host", host, "--experiment", "iris-ci", "--run-name", "ci run",
            "--data", "gs://bucket/iris.zip", "--set", "epochs=3", "--set", "xla=true",
            "--tracking-uri", "http://mlflow.mlflow:5000"]
    assert main(argv) == 0

    (upload,) = fake.of("POST", f"{API}/pipelines/upload")
    assert upload["query"]["name"] == ["iris-image-pipeline"]
    assert upload["file"] == compiled_spec  # byte for byte what --compile writes
    uploaded = next(yaml.safe_load_all(upload["file"]))
    assert set(uploaded["root"]["dag"]["tasks"]) >= {"download-dataset", "train-model"}

    (experiment,) = fake.of("POST", f"{API}/experiments")
    assert json.loads(experiment["body"])["display_name"] == "iris-ci"

    (run_call,) = fake.of("POST", f"{API}/runs")
    run = json.loads(run_call["body"])
    assert run["display_name"] == "ci run"
    assert run["experiment_id"] == "exp-1"
    assert run["pipeline_version_reference"] == {"pipeline_id": "pipe-1",
                                                 "pipeline_version_id": "ver-1"}
    params = run["runtime_config"]["parameters"]
    # another source than the default: the default digest does not apply to it
    expected = PipelineConfig.from_mapping({"data_source": "gs://bucket/iris.zip", "epochs": 3,
                                            "xla": True, "weights": "/models/mobilenet.h5",
                                            "data_sha256": ""}).to_dict()
    assert params == {**expected, "tracking_uri": "http://mlflow.mlflow:5000"}
    assert not fake.of("GET", f"{API}/runs/run-1"), "polled the run without --wait"


@pytest.mark.parametrize("kfp_server", [{"existing_pipeline": True}], indirect=True)
def test_existing_pipeline_gets_a_content_addressed_version_once(
        kfp_server: tuple[str, FakeKfp], compiled_spec: bytes) -> None:
    host, fake = kfp_server
    assert main([*SUBMIT, "--host", host]) == 0
    assert main([*SUBMIT, "--host", host]) == 0
    assert not fake.of("POST", f"{API}/pipelines/upload")
    (version_upload,) = fake.of("POST", f"{API}/pipelines/upload_version")  # reused the 2nd time
    assert version_upload["query"]["pipelineid"] == ["pipe-0"]
    assert version_upload["file"] == compiled_spec
    name = version_upload["query"]["name"][0]
    assert name.startswith("iris-image-pipeline-") and len(name) == len("iris-image-pipeline-") + 12
    runs = [json.loads(r["body"]) for r in fake.of("POST", f"{API}/runs")]
    assert len(runs) == 2
    assert all(r["pipeline_version_reference"]["pipeline_version_id"] == "ver-1" for r in runs)
    assert all(r["runtime_config"]["parameters"]["epochs"] == PipelineConfig().epochs
               for r in runs)


@pytest.mark.parametrize(("kfp_server", "code"), [
    ({"final_state": "SUCCEEDED"}, 0),
    ({"final_state": "FAILED"}, 1),
], indirect=["kfp_server"])
def test_wait_exits_with_the_runs_outcome(kfp_server: tuple[str, FakeKfp], code: int) -> None:
    host, fake = kfp_server
    assert main([*SUBMIT, "--host", host, "--wait", "--timeout", "60"]) == code
    assert fake.of("GET", f"{API}/runs/run-1")


def test_compile_flags_reach_the_uploaded_spec(kfp_server: tuple[str, FakeKfp]) -> None:
    host, fake = kfp_server
    assert main([*SUBMIT, "--host", host, "--mlflow-secret", "mlflow-credentials"]) == 0
    (upload,) = fake.of("POST", f"{API}/pipelines/upload")
    platform = list(yaml.safe_load_all(upload["file"]))[1]
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert executors["exec-train-model"]["secretAsEnv"][0]["secretName"] == "mlflow-credentials"


def test_unreachable_server_is_a_clear_failure(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("ERROR"):
        code = main([*SUBMIT, "--host", "http://127.0.0.1:9", "--namespace", "team"])
    assert code == 1
    assert "submitting to http://127.0.0.1:9 failed" in caplog.text
