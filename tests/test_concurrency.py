"""Concurrent use of one local MLflow store: first-use creation and alias promotion."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# Each worker imports everything, waits for the go file so they all start at once, then does
# what a step does first: check the store, then create the client and the experiment.
FIRST_USE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mlflow.tracking import MlflowClient
    from pipeline.lib.tracking import check_tracking_server, get_or_create_experiment
    uri, go = sys.argv[1], Path(sys.argv[2])
    Path(f"{go}.{os.getpid()}.ready").touch()
    while not go.exists():
        time.sleep(0.01)
    check_tracking_server(uri)
    client = MlflowClient(tracking_uri=uri)
    get_or_create_experiment(client, "race", uri)
    client.search_registered_models(max_results=1)
""")


def _start_together(script: str, args: list[list[str]], go: Path,
                    timeout: float = 240) -> list[subprocess.CompletedProcess[str]]:
    """Run one ``script`` process per argument list, released at the same moment."""
    procs = [subprocess.Popen([sys.executable, "-c", script, *a], cwd=PROJECT_ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in args]
    deadline = time.monotonic() + timeout
    while len(list(go.parent.glob(f"{go.name}.*.ready"))) < len(procs):  # imports done
        assert time.monotonic() < deadline, "workers did not start"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


@pytest.mark.slow  # four processes migrating a database take most of a minute
def test_processes_creating_a_fresh_sqlite_store_at_once_all_succeed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = _start_together(FIRST_USE, [[uri, str(tmp_path / "go")]] * 4, tmp_path / "go")
    failed = [r.stderr[-2000:] for r in results if r.returncode != 0]
    assert not failed, failed
