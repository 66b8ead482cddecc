"""Container images, checked offline: hadolint, Dockerfile contracts, requirements.py, build.sh.

Docker does not run here, so build.sh is exercised with a fake ``docker`` on PATH that records
its arguments; the repository's containers/images.json is never written (temp copies only).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from pipeline.config import IMAGES_FILE, load_images, placeholder_images
from tests.support.paths import PROJECT_ROOT

ROOT = PROJECT_ROOT
CONTAINERS = ROOT / "containers"
DOCKERFILES = {"cpu": CONTAINERS / "Dockerfile.cpu", "gpu": CONTAINERS / "Dockerfile.gpu"}
BUILD_SH = CONTAINERS / "build.sh"
PREDICTOR_IMAGE_FILE = ROOT / "manifests" / "kserve" / "predictor-image.env"
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


requirements = _load_module("container_requirements", CONTAINERS / "requirements.py")


def tool(name: str) -> str:
    """A console tool installed by the dev extras (next to this Python first)."""
    scripts = (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent)
    for candidate in (folder / name for folder in scripts):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install the dev extras (pip install -e '.[dev]')")
    return found


# --- hadolint ----------------------------------------------------------------------------------


def run_hadolint(dockerfile: Path, tmp_path: Path) -> tuple[int, list[dict]]:
    """hadolint with an empty config (no repo/user config can relax it), ignore pragmas off."""
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n")
    proc = subprocess.run(
        [tool("hadolint"), "--config", str(config), "--disable-ignore-pragma", "--no-color",
         "--format", "json", "--failure-threshold", "warning", str(dockerfile)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    try:
        findings = json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        pytest.fail(f"hadolint gave no JSON (rc {proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.returncode, findings


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_hadolint_finds_no_error_or_warning(variant: str, tmp_path: Path) -> None:
    rc, findings = run_hadolint(DOCKERFILES[variant], tmp_path)
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert rc == 0 and not serious, "\n".join(
        f"{f['file']}:{f['line']} {f['code']} [{f['level']}] {f['message']}" for f in findings)
    # Not required by the issue, but both files are clean today: keep them so.
    assert findings == [], findings


def test_hadolint_check_can_fail(tmp_path: Path) -> None:
    """The same invocation flags a Dockerfile with classic mistakes: a pass means something."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\n"
                   "RUN pip install requests\n")
    rc, findings = run_hadolint(bad, tmp_path)
    codes = {f["code"] for f in findings}
    assert rc != 0
    assert {"DL3007", "DL3013"} <= codes, codes


# --- Dockerfile contracts ----------------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        current += " " + line.rstrip("\\").strip() if current else line.rstrip("\\").strip()
        if not line.endswith("\\"):
            logical.append(current)
            current = ""
    return [(item.split(None, 1)[0].upper(), item.split(None, 1)[1]) for item in logical]


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_pins_one_base_and_runs_as_numeric_non_root(variant: str) -> None:
    steps = instructions(DOCKERFILES[variant])
    bases = [args.split()[0] for op, args in steps if op == "FROM"]
    assert len(bases) == 2, bases  # build stage + runtime stage
    assert all(re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", b) for b in bases)
    assert len(set(bases)) == 1, "both stages must use the same pinned base"
    users = [args for op, args in steps if op == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"last USER must be a numeric non-root uid: {users[-1]}"
    # The runtime stage copies only the virtualenv from the build stage.
    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][-1]:]
    copies = [args for op, args in runtime if op in ("COPY", "ADD")]
    assert copies == ["--from=build /opt/venv /opt/venv"], copies


def test_both_images_use_the_same_base_digest() -> None:
    bases = {
        variant: {args.split()[0] for op, args in instructions(path) if op == "FROM"}
        for variant, path in DOCKERFILES.items()
    }
    assert bases["cpu"] == bases["gpu"], bases


@pytest.mark.parametrize("variant", sorted(DOCKERFILES))
def test_dockerfile_installs_pinned_dependencies_then_project_without_deps(variant: str) -> None:
    runs = [args for op, args in instructions(DOCKERFILES[variant]) if op == "RUN"]
    deps = [r for r in runs if "requirements.py pyproject.toml" in r]
    assert len(deps) == 1, runs
    assert "pip install --requirement /tmp/requirements.txt" in deps[0]
    assert ("--tensorflow-extra and-cuda" in deps[0]) == (variant == "gpu"), deps[0]
    project = [r for r in runs if re.search(r"pip install --no-deps \.(\s|$)", r)]
    assert len(project) == 1 and "pip check" in project[0], runs
    # No other pip install of anything (a second resolver run could change TensorFlow).
    installs = [r for r in runs if "pip install" in r]
    assert installs == deps + project, installs


def test_dockerignore_allows_exactly_what_the_dockerfiles_copy() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*", "the .dockerignore must start by excluding everything"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for path in DOCKERFILES.values():
        for op, args in instructions(path):
            if op == "COPY" and not args.startswith("--from"):
                copied.update(p.rstrip("/") for p in args.split()[:-1])
    assert copied == allowed, f"COPY sources {sorted(copied)} vs allowed {sorted(allowed)}"
    for source in copied:
        assert (ROOT / source).exists(), source
    assert "**/__pycache__" in lines


# --- requirements.py ---------------------------------------------------------------------------


def test_requirements_from_real_pyproject() -> None:
    reqs = requirements.read_requirements(ROOT / "pyproject.toml")
    tf = [r for r in reqs if r.startswith("tensorflow")]
    assert len(tf) == 1 and re.fullmatch(r"tensorflow==\d+\.\d+\.\d+", tf[0]), tf
    gpu = requirements.read_requirements(ROOT / "pyproject.toml", "and-cuda", ("s3",))
    assert f"tensorflow[and-cuda]=={tf[0].split('==')[1]}" in gpu
    assert any(r.startswith("s3fs") for r in gpu)
    # Everything else is identical: the GPU image differs only by the CUDA extra.
    assert [r for r in gpu if not r.startswith(("tensorflow", "s3fs"))] == [
        r for r in reqs if not r.startswith("tensorflow")]


def test_requirements_pin_matches_installed_tensorflow() -> None:
    """The images get the TF this environment (CI, the local runner) tests with."""
    from importlib.metadata import version

    reqs = requirements.read_requirements(ROOT / "pyproject.toml")
    pinned = next(r for r in reqs if r.startswith("tensorflow==")).split("==")[1]
    assert pinned == version("tensorflow")


@pytest.mark.parametrize(("dependencies", "message"), [
    ('["tensorflow>=2.20", "numpy"]', "must be pinned"),
    ('["numpy==2.0"]', "not among the dependencies"),
    ("[]", "no [project].dependencies"),
])
def test_requirements_rejects_unpinned_or_missing_tensorflow(tmp_path: Path, dependencies: str,
                                                            message: str) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(f'[project]\nname = "x"\ndependencies = {dependencies}\n')
    with pytest.raises(ValueError, match=re.escape(message)):
        requirements.read_requirements(pyproject)


def test_requirements_cli_reports_unknown_extra() -> None:
    proc = subprocess.run(
        [sys.executable, str(CONTAINERS / "requirements.py"), str(ROOT / "pyproject.toml"),
         "--extra", "nope"], capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and "unknown extra 'nope'" in proc.stderr


# --- build.sh with a fake docker ---------------------------------------------------------------


FAKE_DOCKER = """#!{python}
import hashlib, json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_DOCKER_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args and args[0] == os.environ.get("FAKE_DOCKER_FAIL_ON"):
    sys.exit(1)
if args[:2] == ["image", "inspect"]:
    ref = args[-1]
    repo = ref.rsplit(":", 1)[0]
    # Another registry's digest first: build.sh must pick the one of the pushed repository.
    print("mirror.example.org/other@sha256:" + "0" * 64)
    print(repo + "@sha256:" + hashlib.sha256(repo.encode()).hexdigest())
"""


@pytest.fixture
def fake_docker(tmp_path: Path) -> dict[str, object]:
    """A recording ``docker`` first on PATH and temp output files seeded from the repo's."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    docker = bindir / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable))
    docker.chmod(0o755)
    images = tmp_path / "images.json"
    shutil.copy(IMAGES_FILE, images)
    predictor = tmp_path / "predictor-image.env"
    shutil.copy(PREDICTOR_IMAGE_FILE, predictor)
    log = tmp_path / "docker.log"
    env = {k: v for k, v in os.environ.items() if k not in ("REGISTRY", "TAG", "DOCKER")}
    env.update(PATH=f"{bindir}{os.pathsep}{env['PATH']}", FAKE_DOCKER_LOG=str(log),
               IMAGES_FILE=str(images), PREDICTOR_IMAGE_FILE=str(predictor))
    repo_files = {p: p.read_bytes() for p in (IMAGES_FILE, PREDICTOR_IMAGE_FILE)}
    yield {"env": env, "log": log, "images": images, "predictor": predictor}
    for path, content in repo_files.items():
        assert path.read_bytes() == content, f"build.sh test touched the repository's {path}"


def run_build(fake: dict, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(BUILD_SH), *args], env={**fake["env"], **env},
                          capture_output=True, text=True, timeout=60, check=False)


def calls(fake: dict) -> list[list[str]]:
    log = fake["log"]
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_build_sh_builds_pushes_and_writes_digest_pinned_names(fake_docker: dict) -> None:
    proc = run_build(fake_docker, "registry.example.com/team", "1.2.3")
    assert proc.returncode == 0, proc.stderr
    recorded = calls(fake_docker)
    builds = [c for c in recorded if c[0] == "build"]
    pushes = [c for c in recorded if c[0] == "push"]
    assert [c[0] for c in recorded] == ["build", "push", "image", "build", "push", "image"]
    for variant, call in zip(("cpu", "gpu"), builds, strict=True):
        ref = f"registry.example.com/team/iris-image-pipeline-{variant}:1.2.3"
        assert call[call.index("--tag") + 1] == ref
        assert call[call.index("--file") + 1] == str(DOCKERFILES[variant])
        assert call[call.index("--platform") + 1] == "linux/amd64"
        assert call[-1] == str(ROOT), "the build context must be the repository root"
        assert "org.opencontainers.image.version=1.2.3" in call
    assert [p[1] for p in pushes] == [
        "registry.example.com/team/iris-image-pipeline-cpu:1.2.3",
        "registry.example.com/team/iris-image-pipeline-gpu:1.2.3",
    ]
    assert placeholder_images(IMAGES_FILE)  # the seed: the repository's placeholder names
    images = load_images(fake_docker["images"])  # the pipeline's own reader accepts the file
    assert set(images) == {"cpu", "gpu"}
    assert not placeholder_images(fake_docker["images"])  # real names: no refusal on --submit
    for variant, name in images.items():
        repo = f"registry.example.com/team/iris-image-pipeline-{variant}"
        assert name == f"{repo}:1.2.3@sha256:{hashlib.sha256(repo.encode()).hexdigest()}"
        assert DIGEST.search(name)
    assert fake_docker["predictor"].read_text() == f"IMAGE={images['cpu']}\n"


def test_build_sh_reads_registry_and_tag_from_environment(fake_docker: dict) -> None:
    proc = run_build(fake_docker, "--no-push", REGISTRY="ghcr.io/acme/", TAG="2024.1-rc1")
    assert proc.returncode == 0, proc.stderr
    assert not [c for c in calls(fake_docker) if c[0] in ("push", "image")]
    assert json.loads(fake_docker["images"].read_text()) == {
        "cpu": "ghcr.io/acme/iris-image-pipeline-cpu:2024.1-rc1",
        "gpu": "ghcr.io/acme/iris-image-pipeline-gpu:2024.1-rc1",
    }


def test_build_sh_default_tag_is_version_and_commit(fake_docker: dict) -> None:
    proc = run_build(fake_docker, "--no-push")
    assert proc.returncode == 0, proc.stderr
    cpu = json.loads(fake_docker["images"].read_text())["cpu"]
    registry, _, tag = cpu.rpartition(":")
    assert registry == "localhost:5000/iris-image-pipeline-cpu"
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert re.fullmatch(rf"{re.escape(version)}(-g[0-9a-f]{{8}}(-dirty)?)?", tag), tag


@pytest.mark.parametrize(("args", "message"), [
    (("localhost:5000", "latest"), "TAG 'latest' is refused"),
    (("localhost:5000", "bad tag!"), "is not a valid image tag"),
    (("localhost:5000", "-x"), "unknown option"),
    (("a", "b", "c"), "at most REGISTRY and TAG"),
])
def test_build_sh_refuses_bad_arguments_and_writes_nothing(fake_docker: dict, args: tuple,
                                                           message: str) -> None:
    before = fake_docker["images"].read_bytes(), fake_docker["predictor"].read_bytes()
    proc = run_build(fake_docker, *args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert calls(fake_docker) == []
    assert (fake_docker["images"].read_bytes(), fake_docker["predictor"].read_bytes()) == before


def test_build_sh_failed_push_leaves_images_json_alone(fake_docker: dict) -> None:
    before = fake_docker["images"].read_bytes()
    proc = run_build(fake_docker, "registry.example.com/team", "1.2.3", FAKE_DOCKER_FAIL_ON="push")
    assert proc.returncode != 0
    assert [c[0] for c in calls(fake_docker)] == ["build", "push"]
    assert fake_docker["images"].read_bytes() == before
    assert not list(fake_docker["images"].parent.glob(".images.json.*")), "temp file left behind"


def test_repo_images_json_names_tagged_images_never_latest() -> None:
    images = load_images()
    for variant, name in images.items():
        assert f"iris-image-pipeline-{variant}:" in name, name
        tag = name.split("@")[0].rpartition(":")[2]
        assert tag and tag != "latest" and "/" not in tag, name


def test_build_sh_is_valid_bash_and_shellcheck_clean() -> None:
    """``bash -n`` always; shellcheck too where it is installed (apt/pip shellcheck)."""
    syntax = subprocess.run(["bash", "-n", str(BUILD_SH)], capture_output=True, text=True,
                            check=False)
    assert syntax.returncode == 0, syntax.stderr
    assert os.access(BUILD_SH, os.X_OK), "build.sh must be executable"
    shellcheck = shutil.which("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck not installed (bash -n passed)")
    proc = subprocess.run([shellcheck, "--severity=style", str(BUILD_SH)], capture_output=True,
                          text=True, check=False, timeout=60)
    assert proc.returncode == 0, proc.stdout
