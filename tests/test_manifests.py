"""Kubernetes manifests, checked offline: yamllint, kustomize, kubernetes-validate, contracts.

What each check covers is in manifests/README.md ("Checks"). Built-in kinds are validated
strictly against the Kubernetes OpenAPI schemas kubernetes-validate ships; the one CRD kind
(KServe InferenceService) has no schema there, so its required fields are checked here and its
embedded pod spec is validated as a Pod. The compiled pipeline is compared with
containers/images.json and the namespace manifests, and searched for fake credentials that
were set in the environment while it compiled.
"""

from __future__ import annotations

import fnmatch
import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

from pipeline.config import PipelineConfig, load_images
from tests.support.mlflow_server import MlflowServer
from tests.support.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT
MANIFESTS = ROOT / "manifests"
PARTS = ("mlflow", "kubeflow-namespace", "kserve")
#: Oldest and newest Kubernetes minor versions the manifests are validated against.
K8S_VERSIONS = ("1.30.0", "1.37.0")
YAML_FILES = sorted(MANIFESTS.rglob("*.yaml"))
SECRET_TEMPLATES = sorted(MANIFESTS.rglob("*.example.yaml"))
#: Placeholder format of every value in a Secret template.
PLACEHOLDER = re.compile(r"^<[a-z0-9][a-z0-9-]*>$")
#: Environment variable / ConfigMap key names that hold credentials.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


start_mlflow = _load_module("start_mlflow", MANIFESTS / "mlflow" / "start_mlflow.py")
resolve_champion = _load_module("resolve_champion_uri",
                                MANIFESTS / "kserve" / "resolve_champion_uri.py")


def tool(name: str) -> str | None:
    scripts = (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent)
    for candidate in (folder / name for folder in scripts):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


# --- rendering: kustomize when available, else each file ------------------------------------


@functools.cache
def kustomize_command() -> tuple[str, ...] | None:
    """``kustomize build`` or ``kubectl kustomize`` (kubectl embeds kustomize), if installed."""
    if shutil.which("kustomize"):
        return ("kustomize", "build")
    kubectl = shutil.which("kubectl")
    if kubectl and subprocess.run([kubectl, "kustomize", "--help"], capture_output=True,
                                  check=False, timeout=60).returncode == 0:
        return (kubectl, "kustomize")
    return None


def load_docs(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def _render(part: str) -> tuple[str, bool]:
    """The part's resources as YAML text, and whether kustomize produced it."""
    command = kustomize_command()
    if command:
        proc = subprocess.run([*command, str(MANIFESTS / part)], capture_output=True, text=True,
                              check=False, timeout=120)
        assert proc.returncode == 0, f"kustomize failed for {part}: {proc.stderr}"
        return proc.stdout, True
    # No kustomize: the listed resource files, each as written, with the namespace set.
    kustomization = yaml.safe_load((MANIFESTS / part / "kustomization.yaml").read_text())
    docs = []
    for resource in kustomization["resources"]:
        for doc in load_docs((MANIFESTS / part / resource).read_text()):
            if doc["kind"] != "Namespace" and "namespace" in kustomization:
                doc["metadata"]["namespace"] = kustomization["namespace"]
            docs.append(doc)
    return yaml.safe_dump_all(docs), False


def build(part: str) -> list[dict[str, Any]]:
    return load_docs(_render(part)[0])


def needs_kustomize(part: str) -> None:
    if not _render(part)[1]:
        pytest.skip("kustomize (or kubectl) is not installed: generators are not rendered")


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs
            if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def secret_templates() -> list[dict[str, Any]]:
    return [doc for path in SECRET_TEMPLATES for doc in load_docs(path.read_text())]


def pod_specs(docs: list[dict]) -> Iterator[tuple[str, dict]]:
    """(kind/name, pod spec) of every workload, including the InferenceService predictor."""
    for doc in docs:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield name, doc["spec"]["template"]["spec"]
        elif doc["kind"] == "Pod":
            yield name, doc["spec"]
        elif doc["kind"] == "InferenceService":
            yield name, predictor_pod_spec(doc)


# --- yamllint ------------------------------------------------------------------------------


def run_yamllint(*paths: Path) -> subprocess.CompletedProcess:
    yamllint = tool("yamllint")
    if not yamllint:
        pytest.fail("yamllint not found: install the dev extras (pip install -e '.[dev]')")
    return subprocess.run([yamllint, "--strict", "-f", "parsable", "-c",
                           str(MANIFESTS / ".yamllint"), *map(str, paths)],
                          capture_output=True, text=True, check=False, timeout=120)


def test_yamllint_passes_on_every_manifest() -> None:
    assert len(YAML_FILES) >= 15, YAML_FILES
    proc = run_yamllint(MANIFESTS)
    assert proc.returncode == 0 and not proc.stdout, proc.stdout + proc.stderr


def test_yamllint_check_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: ConfigMap\nkind: Secret\nmetadata:   \n  name: x\n")
    proc = run_yamllint(bad)
    assert proc.returncode != 0
    assert "key-duplicates" in proc.stdout and "trailing-spaces" in proc.stdout


# --- kubernetes-validate (built-in kinds) and CRD checks -------------------------------------


def is_builtin(api_version: str) -> bool:
    group = api_version.split("/")[0] if "/" in api_version else ""
    return "." not in group or group.endswith(".k8s.io")


def validate_builtin(doc: dict, version: str) -> None:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{doc['kind']} {doc['apiVersion']}: {exc.message}")
    except kubernetes_validate.ValidationError as exc:
        path = "/".join(map(str, exc.path))
        pytest.fail(f"{doc['kind']}/{doc['metadata'].get('name')}: {exc.message} at {path}")


#: Fields of a KServe predictor that belong to KServe (the rest is a Kubernetes PodSpec).
PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric",
                    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger",
                    "batcher", "labels", "annotations", "deploymentStrategy"}
MODEL_FORMATS = {"model", "sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx",
                 "huggingface", "lightgbm", "pmml", "paddle"}


def predictor_pod_spec(isvc: dict) -> dict:
    predictor = isvc["spec"]["predictor"]
    return {k: v for k, v in predictor.items() if k not in PREDICTOR_FIELDS | MODEL_FORMATS}


def check_inference_service(doc: dict, version: str) -> None:
    """What the InferenceService CRD requires, plus its pod spec validated as a Kubernetes Pod."""
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1", doc["apiVersion"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), "not a DNS label"
    predictor = doc.get("spec", {}).get("predictor")
    assert isinstance(predictor, dict), "spec.predictor is required"
    models = MODEL_FORMATS & set(predictor)
    containers = predictor.get("containers") or []
    assert bool(models) != bool(containers), "predictor needs exactly one of a model or containers"
    if containers:
        main = [c for c in containers if c.get("name") == "kserve-container"]
        assert len(main) == 1, "custom predictors name their serving container kserve-container"
        env = {e["name"]: e.get("value") for e in main[0].get("env", [])}
        assert env.get("STORAGE_URI"), "STORAGE_URI (storage initializer input) is missing"
        assert all(str(p.get("containerPort")) for p in main[0].get("ports", []))
    for field in ("minReplicas", "maxReplicas"):
        assert isinstance(predictor.get(field, 0), int), field
    assert predictor.get("minReplicas", 0) <= predictor.get("maxReplicas", 10**6)
    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": doc["metadata"]["name"]}, "spec": predictor_pod_spec(doc)}
    validate_builtin(pod, version)


CRD_CHECKS = {("serving.kserve.io", "InferenceService"): check_inference_service}


def validate_doc(doc: dict, version: str) -> None:
    if is_builtin(doc["apiVersion"]):
        validate_builtin(doc, version)
        return
    key = (doc["apiVersion"].split("/")[0], doc["kind"])
    assert key in CRD_CHECKS, f"no check for custom resource {key}: add one to CRD_CHECKS"
    CRD_CHECKS[key](doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("part", PARTS)
def test_rendered_manifests_validate(part: str, version: str) -> None:
    docs = build(part)
    assert docs, part
    for doc in docs:
        validate_doc(doc, version)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_secret_templates_validate(version: str) -> None:
    docs = secret_templates()
    assert {d["metadata"]["name"] for d in docs} == {
        "mlflow-postgres", "mlflow-s3-credentials", "mlflow-auth", "mlflow-credentials",
        "iris-model-s3", "iris-data-credentials"}
    for doc in docs:
        validate_doc(doc, version)


def test_every_yaml_file_is_rendered_or_a_template() -> None:
    """No manifest sits unused: each is a kustomize resource/config or a Secret template."""
    used = set(SECRET_TEMPLATES)
    for part in PARTS:
        kustomization = yaml.safe_load((MANIFESTS / part / "kustomization.yaml").read_text())
        used |= {MANIFESTS / part / r for r in kustomization["resources"]}
        used.add(MANIFESTS / part / "kustomization.yaml")
    assert set(YAML_FILES) == used, sorted(map(str, set(YAML_FILES) ^ used))


def test_strict_validation_catches_typos_and_bad_crds() -> None:
    deployment = json.loads(json.dumps(find(build("mlflow"), "Deployment", "mlflow")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)
    isvc = json.loads(json.dumps(find(build("kserve"), "InferenceService")[0]))
    isvc["spec"]["predictor"]["containers"][0]["env"] = []
    with pytest.raises(AssertionError, match="STORAGE_URI"):
        check_inference_service(isvc, K8S_VERSIONS[0])
    isvc = json.loads(json.dumps(find(build("kserve"), "InferenceService")[0]))
    isvc["spec"]["predictor"]["containers"][0]["resources"]["limits"]["cpu"] = {"x": 1}
    with pytest.raises(pytest.fail.Exception):
        check_inference_service(isvc, K8S_VERSIONS[0])
    with pytest.raises(AssertionError, match="no check for custom resource"):
        validate_doc({"apiVersion": "example.com/v1", "kind": "Thing",
                      "metadata": {"name": "x"}}, K8S_VERSIONS[0])


# --- no secret values --------------------------------------------------------------------------


def test_builds_carry_no_secret_objects() -> None:
    for part in PARTS:
        assert not find(build(part), "Secret"), f"{part}: Secrets must never be in a build"


def test_secret_templates_hold_placeholders_only() -> None:
    for doc in secret_templates():
        assert doc["kind"] == "Secret"
        assert "data" not in doc, f"{doc['metadata']['name']}: use stringData placeholders"
        assert doc["stringData"], doc["metadata"]["name"]
        for key, value in doc["stringData"].items():
            assert PLACEHOLDER.match(str(value)), (
                f"{doc['metadata']['name']}.{key} = {value!r} is not a <placeholder>")


CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "credentials in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@<>${}]+:[^/\s@<>${}]+@"),
    "key = value secret": re.compile(
        r"(?im)^\s*[\w.-]*(password|secret|token)[\w.-]*\s*[:=]\s*['\"]?(?!<)[^\s'\"<{$]{6,}"),
}


def test_no_credential_literal_in_any_manifest_file() -> None:
    files = [p for p in MANIFESTS.rglob("*") if p.is_file() and p.suffix in
             (".yaml", ".env", ".py", ".md", ".sql", "") and "__pycache__" not in p.parts]
    assert len(files) >= 20
    for path in files:
        text = path.read_text()
        for what, pattern in CREDENTIAL_PATTERNS.items():
            if what == "key = value secret" and path.suffix == ".py":
                continue  # code assigns variables named password; the other patterns apply
            match = pattern.search(text)
            assert not match, f"{path.relative_to(ROOT)}: {what}: {match.group(0)!r}"


def test_credential_patterns_can_fail() -> None:
    samples = ["key: AKIAABCDEFGHIJKLMNOP", "-----BEGIN RSA PRIVATE KEY-----",
               "uri: postgresql://mlflow:hunter22@db:5432/x", "  POSTGRES_PASSWORD: hunter22x"]
    for sample in samples:
        assert any(p.search(sample) for p in CREDENTIAL_PATTERNS.values()), sample
    assert not any(p.search('  POSTGRES_PASSWORD: "<postgres-password>"')
                   for p in CREDENTIAL_PATTERNS.values())


def all_containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def test_credential_env_vars_come_only_from_secrets() -> None:
    for part in PARTS:
        docs = build(part)
        for name, spec in pod_specs(docs):
            for container in all_containers(spec):
                for env in container.get("env", []):
                    if SECRET_NAME.search(env["name"]):
                        assert "secretKeyRef" in env.get("valueFrom", {}), (
                            f"{name} {container['name']}: {env['name']} must come from a Secret")
        for config_map in find(docs, "ConfigMap"):
            for key in config_map.get("data", {}):
                if key.endswith(".py"):
                    continue
                assert not SECRET_NAME.search(key), (config_map["metadata"]["name"], key)


def test_every_secret_and_configmap_reference_resolves() -> None:
    """Every secretKeyRef / configMapKeyRef names a key that exists (Secrets: the templates)."""
    secrets = {d["metadata"]["name"]: set(d["stringData"]) for d in secret_templates()}
    for part in PARTS:
        docs = build(part)
        config_maps = {d["metadata"]["name"]: set(d.get("data", {}))
                       for d in find(docs, "ConfigMap")}
        for name, spec in pod_specs(docs):
            for container in all_containers(spec):
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {})
                    if "secretKeyRef" in ref:
                        s = ref["secretKeyRef"]
                        assert s["key"] in secrets.get(s["name"], set()), (name, s)
                    if "configMapKeyRef" in ref:
                        c = ref["configMapKeyRef"]
                        assert c["key"] in config_maps.get(c["name"], set()), (name, c)
                for source in container.get("envFrom", []):
                    assert source["configMapRef"]["name"] in config_maps, (name, source)
            for volume in spec.get("volumes", []):
                if "configMap" in volume:
                    assert volume["configMap"]["name"] in config_maps, (name, volume)
        for account in find(docs, "ServiceAccount"):
            for secret in account.get("secrets", []):
                assert secret["name"] in secrets, (account["metadata"]["name"], secret)


# --- workload hygiene --------------------------------------------------------------------------


def test_workloads_are_non_root_read_only_limited_and_probed() -> None:
    checked = []
    for part in PARTS:
        docs = build(part)
        for name, spec in pod_specs(docs):
            checked.append(name)
            pod = spec.get("securityContext", {})
            assert pod.get("runAsNonRoot") is True, name
            assert pod.get("runAsUser", 0) > 0, name
            assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
            account = find(docs, "ServiceAccount", spec.get("serviceAccountName", "default"))
            assert spec.get("automountServiceAccountToken") is False or (
                account and account[0].get("automountServiceAccountToken") is False), (
                f"{name}: no workload here calls the Kubernetes API; mount no token")
            for container in all_containers(spec):
                where = f"{name} {container['name']}"
                sc = container.get("securityContext", {})
                assert sc.get("allowPrivilegeEscalation") is False, where
                assert sc.get("readOnlyRootFilesystem") is True, where
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
                for bound in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(container["resources"][bound]), (where, bound)
                assert "readinessProbe" in container and "livenessProbe" in container, where
                image = container["image"]
                assert not image.endswith(":latest") and re.search(r":[\w.-]+$|@sha256:", image), (
                    f"{where}: image {image!r} must be pinned by tag or digest")
                mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
                assert "/tmp" in mounts, f"{where}: read-only root needs a writable /tmp"
    assert len(checked) == 3, checked  # mlflow, mlflow-postgres, the predictor


def test_mlflow_server_image_matches_the_client_version() -> None:
    from importlib.metadata import version

    image = find(build("mlflow"), "Deployment", "mlflow")[0]["spec"]["template"]["spec"][
        "containers"][0]["image"]
    match = re.fullmatch(r"ghcr\.io/mlflow/mlflow:v(\d+)\.(\d+)\.(\d+)-full", image)
    assert match, f"{image}: the official -full image (psycopg2, boto3, Flask-WTF), pinned"
    client = version("mlflow").split(".")[:2]
    assert list(match.groups()[:2]) == client, f"server {image} vs client mlflow {client}"


def test_network_policies_deny_by_default_and_admit_each_workload() -> None:
    docs = build("mlflow")
    policies = find(docs, "NetworkPolicy")
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert deny and set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny[0]["spec"] and "egress" not in deny[0]["spec"]
    for kind in ("Deployment", "StatefulSet"):
        for workload in find(docs, kind):
            labels = workload["spec"]["template"]["metadata"]["labels"]
            allowing = [p for p in policies if p not in deny and all(
                labels.get(k) == v for k, v in p["spec"]["podSelector"]["matchLabels"].items())]
            assert allowing, f"{kind}/{workload['metadata']['name']} is cut off by default-deny"
    postgres = find(docs, "NetworkPolicy", "mlflow-postgres")[0]["spec"]
    assert postgres["ingress"][0]["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "mlflow", "app.kubernetes.io/component": "tracking-server"}}}]
    namespace = find(docs, "Namespace", "mlflow")[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# --- cross-part contracts ------------------------------------------------------------------


def server_config() -> dict[str, str]:
    return find(build("mlflow"), "ConfigMap", "mlflow-server-config")[0]["data"]


def allowed_hosts() -> list[str]:
    return [h.strip() for h in server_config()["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")]


def host_allowed(host: str) -> bool:
    """MLflow's own rule (mlflow.server.security_utils.is_allowed_host_header)."""
    return any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed_hosts())


def test_tracking_uri_names_the_mlflow_service_and_an_allowed_host() -> None:
    uri = find(build("kubeflow-namespace"), "ConfigMap", "iris-pipeline-mlflow")[0]["data"][
        "MLFLOW_TRACKING_URI"]
    parsed = urlparse(uri)
    assert parsed.scheme == "http" and not parsed.username, uri
    service_name, namespace = parsed.hostname.split(".")[:2]
    docs = build("mlflow")
    service = find(docs, "Service", service_name)[0]
    assert service["metadata"]["namespace"] == namespace
    assert parsed.port in [p["port"] for p in service["spec"]["ports"]]
    assert host_allowed(parsed.netloc), f"{parsed.netloc} is not in MLFLOW_SERVER_ALLOWED_HOSTS"
    assert not host_allowed("evil.example.com") and not host_allowed("10.1.2.3:5000")
    # The probes' Host header must pass the same guard.
    container = find(docs, "Deployment", "mlflow")[0]["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        headers = {h["name"]: h["value"] for h in container[probe]["httpGet"]["httpHeaders"]}
        assert host_allowed(headers["Host"]), probe
        assert container[probe]["httpGet"]["path"] == "/health", probe


def test_start_script_gets_every_variable_it_requires() -> None:
    docs = build("mlflow")
    deployment = find(docs, "Deployment", "mlflow")[0]["spec"]["template"]["spec"]
    container = deployment["containers"][0]
    provided = {e["name"] for e in container["env"]} | set(server_config())
    missing = set(start_mlflow.REQUIRED) - provided
    assert not missing, f"start_mlflow.py requires {sorted(missing)}, the Deployment lacks them"
    script = container["command"][-1]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in deployment["volumes"]}
    assert script == f"{mounts['start']}/start_mlflow.py"
    assert volumes["auth-config"]["emptyDir"]["medium"] == "Memory"
    assert container_env_value(container, "MLFLOW_AUTH_CONFIG_DIR") == mounts["auth-config"]
    # The start script ConfigMap carries the file exactly as it is in the repository.
    needs_kustomize("mlflow")
    start = find(docs, "ConfigMap", volumes["start"]["configMap"]["name"])[0]
    assert start["data"]["start_mlflow.py"] == (MANIFESTS / "mlflow/start_mlflow.py").read_text()


def container_env_value(container: dict, name: str) -> str | None:
    return next((e.get("value") for e in container.get("env", []) if e["name"] == name), None)


def test_kserve_build_fills_storage_uri_and_predictor_image() -> None:
    needs_kustomize("kserve")
    isvc = find(build("kserve"), "InferenceService", "iris-image-classifier")[0]
    container = isvc["spec"]["predictor"]["containers"][0]
    champion = (MANIFESTS / "kserve/champion.env").read_text().strip()
    predictor = (MANIFESTS / "kserve/predictor-image.env").read_text().strip()
    assert container_env_value(container, "STORAGE_URI") == champion.removeprefix("STORAGE_URI=")
    assert container["image"] == predictor.removeprefix("IMAGE=")
    # The predictor runs the pipeline's CPU image, the one build.sh wrote for --compile.
    assert container["image"] == load_images()["cpu"]
    assert container["command"][:3] == ["mlflow", "models", "serve"]
    assert container["command"][container["command"].index("--model-uri") + 1] == "/mnt/models"


def test_kserve_predictor_runs_the_serve_command_the_parity_test_runs() -> None:
    """The predictor's command is a valid ``mlflow models serve`` (parsed by MLflow's own CLI)
    of the mounted model in this environment (``--env-manager local``, as in
    tests/test_serving_parity.py), and its probes and port are the server's."""
    from mlflow.models.cli import commands

    isvc = find(build("kserve"), "InferenceService", "iris-image-classifier")[0]
    container = isvc["spec"]["predictor"]["containers"][0]
    argv = container["command"] + container.get("args", [])
    assert argv[:3] == ["mlflow", "models", "serve"]
    params = commands.commands["serve"].make_context("serve", argv[3:]).params
    assert params["model_uri"] == "/mnt/models"
    assert params["env_manager"] == "local"
    ports = {p["containerPort"] for p in container["ports"]}
    assert ports == {params["port"]}
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/ping", "port": params["port"]}, probe
    assert params["host"] == "0.0.0.0"  # reachable through the Service, not only in the pod


def test_kserve_s3_secret_points_at_the_mlflow_artifact_store() -> None:
    secret = next(d for d in secret_templates() if d["metadata"]["name"] == "iris-model-s3")
    endpoint = urlparse(server_config()["MLFLOW_S3_ENDPOINT_URL"])
    annotations = secret["metadata"]["annotations"]
    host, port = annotations["serving.kserve.io/s3-endpoint"].split(":")
    assert endpoint.hostname.startswith(host + ".") or endpoint.hostname == host
    assert int(port) == endpoint.port
    assert annotations["serving.kserve.io/s3-usehttps"] == ("1" if endpoint.scheme == "https"
                                                            else "0")
    assert resolve_champion.server_artifacts_destination().startswith("s3://")


# --- start_mlflow.py ---------------------------------------------------------------------------


TRICKY = "p@ss%w:rd/#?&=+ x"


def server_env(tmp_path: Path, **overrides: str) -> dict[str, str]:
    env = {name: f"value-{i}" for i, name in enumerate(start_mlflow.REQUIRED)}
    env.update(POSTGRES_USER="ml flow", POSTGRES_PASSWORD=TRICKY, POSTGRES_HOST="mlflow-postgres",
               POSTGRES_PORT="5432", POSTGRES_DB="mlflow", MLFLOW_AUTH_DB="mlflow_auth",
               MLFLOW_ARTIFACTS_DESTINATION="s3://bucket",
               MLFLOW_SERVER_ALLOWED_HOSTS="mlflow,localhost:*",
               MLFLOW_AUTH_CONFIG_DIR=str(tmp_path / "auth"))
    env.update(overrides)
    return env


def read_auth_config(path: Path) -> Any:
    """MLflow's own reader of the basic-auth config (loaded by file: the auth package's
    ``__init__`` needs Flask-WTF, which only the server image has)."""
    import mlflow

    module = _load_module("mlflow_auth_config",
                          Path(mlflow.__file__).parent / "server" / "auth" / "config.py")
    old = os.environ.get("MLFLOW_AUTH_CONFIG_PATH")
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(path)
    try:
        return module.read_auth_config()
    finally:
        if old is None:
            del os.environ["MLFLOW_AUTH_CONFIG_PATH"]
        else:
            os.environ["MLFLOW_AUTH_CONFIG_PATH"] = old


def test_start_script_round_trips_any_password_through_mlflow(tmp_path: Path) -> None:
    from sqlalchemy.engine import make_url

    command, env = start_mlflow.prepare(server_env(tmp_path))
    backend = make_url(env["MLFLOW_BACKEND_STORE_URI"])
    assert (backend.username, backend.password, backend.host, backend.port, backend.database) == (
        "ml flow", TRICKY, "mlflow-postgres", 5432, "mlflow")
    config_path = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
    assert config_path.stat().st_mode & 0o777 == 0o600
    auth = read_auth_config(config_path)
    auth_db = make_url(auth.database_uri)
    assert (auth_db.password, auth_db.database) == (TRICKY, "mlflow_auth")
    assert auth.default_permission == "READ"
    assert not any(TRICKY in arg or "value-" in arg for arg in command), command
    for flag, value in (("--app-name", "basic-auth"), ("--artifacts-destination", "s3://bucket"),
                        ("--allowed-hosts", "mlflow,localhost:*"), ("--host", "0.0.0.0")):
        assert command[command.index(flag) + 1] == value
    assert "--serve-artifacts" in command


def test_start_script_names_missing_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD, MLFLOW_AUTH_ADMIN_PASSWORD"):
        start_mlflow.prepare(server_env(tmp_path, POSTGRES_PASSWORD="",
                                        MLFLOW_AUTH_ADMIN_PASSWORD=""))
    with pytest.raises(ValueError, match="MLFLOW_AUTH_DEFAULT_PERMISSION"):
        start_mlflow.prepare(server_env(tmp_path, MLFLOW_AUTH_DEFAULT_PERMISSION="ADMIN"))
    assert not (tmp_path / "auth").exists() or not any((tmp_path / "auth").iterdir())


def test_start_script_execs_mlflow_server(tmp_path: Path) -> None:
    """Run the script as the pod does, with a fake ``mlflow`` that records what it was given."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "exec.json"
    fake = bindir / "mlflow"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, "
                    f"open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    env = {**server_env(tmp_path), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run([sys.executable, str(MANIFESTS / "mlflow/start_mlflow.py")], env=env,
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ran = json.loads(record.read_text())
    assert ran["argv"][0] == "server" and "--serve-artifacts" in ran["argv"]
    assert ran["env"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://ml%20flow:")
    assert TRICKY not in proc.stderr, "the password must not be logged"
    bad = subprocess.run([sys.executable, str(MANIFESTS / "mlflow/start_mlflow.py")],
                         env={**env, "MLFLOW_ARTIFACTS_DESTINATION": ""}, capture_output=True,
                         text=True, check=False, timeout=60)
    assert bad.returncode == 2 and "MLFLOW_ARTIFACTS_DESTINATION" in bad.stderr


# --- resolve_champion_uri.py -----------------------------------------------------------------


@pytest.mark.parametrize(("location", "expected"), [
    ("mlflow-artifacts:/3/models/m-abc/artifacts", "s3://bucket/pre/3/models/m-abc/artifacts"),
    ("mlflow-artifacts://mlflow:5000/3/models/m-abc/artifacts",
     "s3://bucket/pre/3/models/m-abc/artifacts"),
    ("http://mlflow:5000/api/2.0/mlflow-artifacts/artifacts/3/models/m-abc/artifacts",
     "s3://bucket/pre/3/models/m-abc/artifacts"),
    ("s3://other/3/models/m-abc/artifacts", "s3://other/3/models/m-abc/artifacts"),
])
def test_to_storage_uri_maps_served_artifacts_onto_the_bucket(location: str,
                                                               expected: str) -> None:
    assert resolve_champion.to_storage_uri(location, "s3://bucket/pre/") == expected


@pytest.mark.parametrize(("location", "destination", "message"), [
    ("/home/me/mlruns/1/models/m-abc/artifacts", "s3://bucket", "not in an object store"),
    ("file:///tmp/x", "s3://bucket", "not in an object store"),
    ("mlflow-artifacts:/3/models/m/artifacts", "./mlartifacts", "not an object-store URI"),
    ("mlflow-artifacts:", "s3://bucket", "has no path"),
])
def test_to_storage_uri_refuses_what_kserve_cannot_download(location: str, destination: str,
                                                           message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_champion.to_storage_uri(location, destination)


@pytest.fixture
def served_artifacts_server(mlflow_server: MlflowServer) -> tuple[str, Path]:
    """The session's real ``mlflow server`` (tests/mlflow_server.py) and its artifact folder."""
    return mlflow_server.url, Path(mlflow_server.artifacts_dir)


class _Identity:
    """Stand-in model: the resolver only needs a registered logged model with files."""

    def predict(self, context: Any, model_input: list[str], params: Any = None) -> list[str]:
        return model_input


@pytest.mark.slow
@pytest.mark.mlflow_server
def test_resolve_champion_uri_against_a_real_server(served_artifacts_server, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The URI written for KServe is where the server really put the champion's MLmodel."""
    import mlflow

    url, artifacts = served_artifacts_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    # A name of its own: a shared server's iris-image-classifier belongs to the tracking tests.
    name = f"{PipelineConfig().registered_model_name}-resolve-{uuid.uuid4().hex[:8]}"
    model_class = type("Identity", (mlflow.pyfunc.PythonModel,), dict(vars(_Identity)))
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=model_class(),
                                       pip_requirements=[])
    version = mlflow.register_model(info.model_uri, name)
    mlflow.MlflowClient(url).set_registered_model_alias(name, "champion", version.version)

    out = tmp_path / "champion.env"
    assert resolve_champion.main(["--tracking-uri", url, "--output", str(out), "--model-name",
                                  name, "--artifacts-destination", "s3://bucket/prefix"]) == 0
    line = out.read_text()
    assert line.startswith("STORAGE_URI=s3://bucket/prefix/") and line.endswith("\n")
    relative = line.strip().removeprefix("STORAGE_URI=s3://bucket/prefix/")
    assert (artifacts / relative / "MLmodel").is_file(), f"{relative} holds no MLmodel"
    # An alias nobody set: a clear error, exit 1, the file untouched.
    assert resolve_champion.main(["--tracking-uri", url, "--output", str(out), "--model-name",
                                  name, "--alias", "nope"]) == 1
    assert out.read_text() == line


# --- the compiled pipeline -----------------------------------------------------------------


FAKE_CREDENTIALS = {
    "MLFLOW_TRACKING_USERNAME": "fake-user-4f1c9a",
    "MLFLOW_TRACKING_PASSWORD": "fake-secret-123",
    "MLFLOW_TRACKING_TOKEN": "fake-token-8d2e",
    "AWS_ACCESS_KEY_ID": "fake-aws-key-7b3f",
    "AWS_SECRET_ACCESS_KEY": "fake-aws-secret-5e6a",
    "MLFLOW_TRACKING_URI": "http://fake-uri-user:fake-uri-pass-9c0d@mlflow.example:5000",
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``python pipeline.py --compile`` as a user runs it, with fake credentials in its env."""
    out = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    env = {**os.environ, **FAKE_CREDENTIALS}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "pipeline.py"), "--compile", "-o", str(out),
         "--mlflow-secret", "mlflow-credentials", "--data-secret", "iris-data-credentials"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    docs = load_docs(text)
    return {"text": text, "spec": docs[0], "platform": docs[1] if len(docs) > 1 else {}}


def compile_in_process(path: Path, **kwargs: Any) -> Path:
    from pipeline.runners import compile_pipeline

    return Path(compile_pipeline(path, **kwargs))


def executor_images(spec: dict) -> dict[str, str]:
    return {name: executor["container"]["image"]
            for name, executor in spec["deploymentSpec"]["executors"].items()}


def test_compiled_yaml_embeds_no_credential_from_the_environment(compiled: dict) -> None:
    for name, value in FAKE_CREDENTIALS.items():
        assert value not in compiled["text"], f"{name}'s value is in the compiled YAML"
    assert "fake-uri-pass" not in compiled["text"] and "fake-" not in compiled["text"]


def test_compiled_images_are_those_build_sh_wrote(compiled: dict) -> None:
    images = load_images()
    used = executor_images(compiled["spec"])
    assert set(used.values()) == set(images.values()), (used, images)
    for executor, image in used.items():
        expected = images["gpu"] if executor == "exec-train-model" else images["cpu"]
        assert image == expected, executor


def test_compiled_images_follow_images_json(tmp_path: Path) -> None:
    """Another images.json (as build.sh writes after a push) changes every image in the YAML."""
    images = {"cpu": "registry.example.com/t/iris-image-pipeline-cpu:9.9.9@sha256:" + "a" * 64,
              "gpu": "registry.example.com/t/iris-image-pipeline-gpu:9.9.9@sha256:" + "b" * 64}
    path = compile_in_process(tmp_path / "p.yaml", images=images)
    used = executor_images(load_docs(path.read_text())[0])
    assert set(used.values()) == set(images.values())
    assert used["exec-train-model"] == images["gpu"]


def test_compiled_pipeline_reads_the_secret_and_configmap_the_manifests_define(
        compiled: dict) -> None:
    executors = compiled["platform"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    templates = {d["metadata"]["name"]: d for d in secret_templates()}
    config_maps = {d["metadata"]["name"]: d for d in find(build("kubeflow-namespace"), "ConfigMap")}
    secret_users, config_users = set(), set()
    for executor, spec in executors.items():
        for item in spec.get("secretAsEnv", []):
            secret_users.add(executor)
            secret = templates[item["secretName"]]
            assert secret["metadata"]["namespace"] == "kubeflow-user-example-com"
            for mapping in item["keyToEnv"]:
                assert mapping["secretKey"] in secret["stringData"], mapping
        for item in spec.get("configMapAsEnv", []):
            config_users.add(executor)
            for mapping in item["keyToEnv"]:
                assert mapping["configMapKey"] in config_maps[item["configMapName"]]["data"]
    assert {"exec-train-model", "exec-evaluate-model", "exec-register-model"} == config_users
    assert secret_users == config_users | {"exec-download-dataset"}
    assert {i["secretName"] for e in executors.values() for i in e.get("secretAsEnv", [])} == {
        "mlflow-credentials", "iris-data-credentials"}
    (data_secret,) = executors["exec-download-dataset"]["secretAsEnv"]
    assert data_secret["secretName"] == "iris-data-credentials"
