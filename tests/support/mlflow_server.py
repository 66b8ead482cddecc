"""Pytest fixtures that run a real ``mlflow server`` on 127.0.0.1 for the tracking tests.

Imported by ``tests/conftest.py`` so any test (also the pipeline's end-to-end test) can ask
for ``mlflow_server``. One server per test session: sqlite backend and served artifacts in
a temp folder, a free port, /health polled with a deadline, the process group terminated at
the end. Its log is attached to start-up failures so they explain themselves.

The sqlite files of the server and of the tests' local stores live on a RAM file system
(``/dev/shm``) where the machine has one (:func:`ram_tmp_root`): on the shared disk every
sqlite commit waits for a flush, which cost a third of each server request and seconds of
each fresh store's migrations. Local stores start as copies of one store migrated once per
session (:func:`new_sqlite_store`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

#: Seconds to wait for /health; a cold start (imports, DB migrations) takes ~10-20 s on 2 cores.
STARTUP_TIMEOUT_S = 120.0
#: Process-global MLflow state: ``mlflow.set_tracking_uri`` exports the first one.
MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")
#: A RAM file system (tmpfs): sqlite commits there do not wait for the disk.
RAM_DIR = Path("/dev/shm")
#: Free bytes :data:`RAM_DIR` needs to be used (a container's default is only 64 MiB; the
#: slow tier's server keeps real models among its artifacts).
RAM_DIR_MIN_FREE = 2 << 30
#: Name prefix of the session folders in :data:`RAM_DIR`; the creating process id follows.
RAM_PREFIX = "iris-tests-"


@dataclass(frozen=True)
class MlflowServer:
    """A running server: its URL (the tracking URI) and where it keeps data and its log."""

    url: str
    backend_uri: str
    artifacts_dir: Path
    log_path: Path
    pid: int

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children(pid: int) -> list[psutil.Process]:
    """``pid``'s child processes (none once it is gone)."""
    try:
        return psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []


def _gone(child: psutil.Process) -> bool:
    """Whether ``child`` has exited and was reaped by its parent (its CPU time then counts in
    the parent's, and so in this process's children's); a zombie is not gone yet."""
    return not psutil.pid_exists(child.pid)


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (uvicorn worker, job runner), then SIGKILL.

    The ``mlflow`` command that started uvicorn as its child exits once the child has, but
    its own interpreter shutdown then takes another 1-2 s of CPU: once it has reaped the
    children it had, what is left of the group is killed.
    """
    if process.poll() is not None:
        return
    servers = _children(process.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while servers and process.poll() is None and time.monotonic() < deadline:
        if all(_gone(child) for child in servers):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    try:
        process.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


def _wait_healthy(process: subprocess.Popen[bytes], url: str, log_path: Path, what: str,
                  timeout: float = STARTUP_TIMEOUT_S) -> None:
    """Poll ``url`` until it answers 200; the log's tail explains an exit or a timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} during start-up:\n"
                               f"{_tail(log_path)}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not healthy after {timeout:.0f} s:\n{_tail(log_path)}")
        time.sleep(0.25)


def _tail(log_path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as exc:
        return f"(no log: {exc})"


@contextlib.contextmanager
def run_mlflow_server(root: Path) -> Iterator[MlflowServer]:
    """Start ``mlflow server`` with its data under ``root``; stop it on exit."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    artifacts = root / "artifacts"
    backend = f"sqlite:///{root / 'mlflow.db'}"
    log_path = root / "server.log"
    env = {
        **os.environ,
        # The job runner (huey workers for GenAI jobs) is not needed and costs a core.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    for var in MLFLOW_ENV:
        env.pop(var, None)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend,
        "--serve-artifacts", "--artifacts-destination", str(artifacts),
        "--workers", "1",
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env,
            start_new_session=True,  # own process group: teardown reaches its children
        )
    server = MlflowServer(f"http://127.0.0.1:{port}", backend, artifacts, log_path, process.pid)
    try:
        _wait_healthy(process, f"{server.url}/health", log_path, "mlflow server")
        yield server
    finally:
        _stop(process)


@contextlib.contextmanager
def serve_model(model_uri: str, tracking_uri: str, root: Path,
                timeout: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """``mlflow models serve --env-manager local`` of ``model_uri`` on 127.0.0.1; its base URL.

    The scoring server is what users and the KServe predictor run. MLflow starts uvicorn by
    name, so this interpreter's ``bin`` goes first on ``PATH``. The process group is
    stopped on exit, also when start-up fails.
    """
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = root / f"model-server-{port}.log"
    env = {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV}
    env.update(MLFLOW_TRACKING_URI=tracking_uri,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "--workers", "1"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=root,
                                   env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, f"{url}/ping", log_path, f"mlflow models serve {model_uri}",
                      timeout)
        yield url
    finally:
        _stop(process)


class PortForward:
    """A TCP forwarder on 127.0.0.1 to ``target`` that can go away and come back.

    Stands in for a tracking server lost mid-step: :meth:`stop` closes the port and every
    open connection (clients then get "connection refused"), :meth:`start` listens again
    on the same port.
    """

    def __init__(self, target: str) -> None:
        parsed = urllib.parse.urlsplit(target)
        self.target = (parsed.hostname or "127.0.0.1", int(parsed.port or 80))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        with self._lock:
            sockets, self._open = self._open, []
            if self._listener is not None:
                sockets.append(self._listener)
                self._listener = None
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # stopped
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes until either side closes."""
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            sink.sendall(data)
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def forwarded_server(mlflow_server: MlflowServer) -> Iterator[PortForward]:
    """The session's tracking server behind a port that the test can close and reopen."""
    forward = PortForward(mlflow_server.url)
    forward.start()
    try:
        yield forward
    finally:
        forward.stop()


def _remove_stale_ram_dirs() -> None:
    """Remove session folders in :data:`RAM_DIR` whose process is gone (a killed session's):
    RAM is not cleaned up the way pytest prunes its old temp folders."""
    for folder in RAM_DIR.glob(f"{RAM_PREFIX}*"):
        pid = folder.name.removeprefix(RAM_PREFIX).split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, someone else's
            pass


@pytest.fixture(scope="session")
def ram_tmp_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session folder on :data:`RAM_DIR`, removed at the end; pytest's temp folder where
    the machine has no writable ``/dev/shm`` with :data:`RAM_DIR_MIN_FREE` bytes free (the
    tests then run as before, only slower)."""
    if not (RAM_DIR.is_dir() and os.access(RAM_DIR, os.W_OK)
            and shutil.disk_usage(RAM_DIR).free >= RAM_DIR_MIN_FREE):
        yield tmp_path_factory.mktemp("ram")
        return
    _remove_stale_ram_dirs()
    root = Path(tempfile.mkdtemp(prefix=f"{RAM_PREFIX}{os.getpid()}-", dir=RAM_DIR))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def ram_tmp_path(ram_tmp_root: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh folder for one test on the RAM file system (like ``tmp_path``)."""
    name = re.sub(r"\W", "_", request.node.name)[:40]
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=ram_tmp_root))


@pytest.fixture(scope="session")
def new_sqlite_store(ram_tmp_root: Path) -> Callable[[str], str]:
    """``new_sqlite_store(name)``: the URI of a fresh, empty local sqlite store in a folder of
    its own on the RAM file system.

    Each is a copy of one store MLflow created and migrated at the first call (a fresh
    store's migrations take seconds; a copy, milliseconds): the same schema and the same
    empty store, whose ``Default`` experiment the tests do not use. Tests of how the
    pipeline creates its own store (``tests/test_tracking.py``) start from no file instead.
    """
    template = ram_tmp_root / "store-template" / "mlflow.db"
    counter = itertools.count(1)

    def new(name: str) -> str:
        if not template.exists():
            template.parent.mkdir()
            from mlflow import MlflowClient

            MlflowClient(f"sqlite:///{template}").search_experiments(max_results=1)
        folder = ram_tmp_root / f"{name}-{next(counter)}"
        folder.mkdir()
        shutil.copyfile(template, folder / "mlflow.db")
        return f"sqlite:///{folder / 'mlflow.db'}"

    return new


@pytest.fixture(scope="session")
def mlflow_server(ram_tmp_root: Path) -> Iterator[MlflowServer]:
    """A real MLflow tracking server for the whole session (sqlite, served artifacts), its
    folder (``mlflow.db``, ``artifacts``, ``server.log``) on the RAM file system."""
    try:
        with run_mlflow_server(ram_tmp_root / "mlflow-server") as server:
            yield server
    except RuntimeError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def closed_port_uri() -> str:
    """An http tracking URI on 127.0.0.1 where nothing listens (connection refused)."""
    return f"http://127.0.0.1:{free_port()}"


@pytest.fixture(autouse=True)
def isolated_mlflow_globals() -> Iterator[None]:
    """Every test starts without MLflow env vars and leaves none behind.

    ``mlflow.set_tracking_uri`` writes ``$MLFLOW_TRACKING_URI``; without this guard a test that
    points MLflow at the session server silently redirects every later test that expects the
    local sqlite default (test order then decides the outcome). MLflow is not imported
    here: a process that never imported it has no MLflow state to reset (and the xdist
    controller starts its workers 2 s sooner).
    """
    saved = {name: os.environ.pop(name, None) for name in MLFLOW_ENV}
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(None)
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


@pytest.fixture
def clean_mlflow_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow globals are isolated (autouse fixture above); stray files go to tmp."""
    monkeypatch.chdir(tmp_path)


def images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Random uint8 RGB images, the raw input the logged models must accept."""
    return np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)
