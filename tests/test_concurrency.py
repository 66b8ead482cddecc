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


# A register step whose read of the champion is slowed by ``delay`` seconds, so that two of
# them started together both read the champion before either moves the alias.
REGISTER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mlflow.tracking import MlflowClient
    from pipeline.steps import register
    uri, go, value, delay = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.get_experiment_by_name("race").experiment_id).info.run_id
    read_champion = register.champion_metric

    def slow_champion_metric(*args, **kwargs):
        found = read_champion(*args, **kwargs)
        time.sleep(delay)
        return found

    register.champion_metric = slow_champion_metric
    Path(f"{go}.{os.getpid()}.ready").touch()
    while not go.exists():
        time.sleep(0.01)
    register.register_model(f"runs:/{run_id}/model", name="iris", metric_name="accuracy",
                            metric_value=value, client=client)
""")


@pytest.mark.slow  # two registry processes on a sqlite store take about half a minute
def test_concurrent_register_steps_leave_the_better_model_champion(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.steps.register import CHAMPION, champion_metric

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.create_experiment("race", artifact_location=(tmp_path / "artifacts").as_uri())
    go = tmp_path / "go"
    # the worse model reads the champion as early but moves the alias last
    results = _start_together(REGISTER, [[uri, str(go), "0.9", "1"], [uri, str(go), "0.7", "4"]],
                              go)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-2000:] for r in results]
    version, value = champion_metric(client, "iris", "accuracy")
    assert value == 0.9, (version, value, client.get_registered_model("iris").aliases)
    assert str(client.get_model_version_by_alias("iris", CHAMPION).version) == version


def test_identical_trainings_at_once_do_not_share_a_checkpoint_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.lib.contract import CHECKPOINT_ROOT_ENV
    from pipeline.steps.train import checkpoint_dir

    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, str(tmp_path / "root"))
    first, lock = checkpoint_dir(tmp_path / "run1", "abc123")
    assert first == tmp_path / "root" / "abc123" and lock is not None
    second, second_lock = checkpoint_dir(tmp_path / "run2", "abc123")  # first still training
    assert second == tmp_path / "run2" / "checkpoints" and second_lock is None
    lock.close()  # the first one finished (or died): the next one resumes from the root
    third, third_lock = checkpoint_dir(tmp_path / "run3", "abc123")
    assert third == first and third_lock is not None
    third_lock.close()
    monkeypatch.delenv(CHECKPOINT_ROOT_ENV)
    assert checkpoint_dir(tmp_path / "run4", "abc123") == (tmp_path / "run4" / "checkpoints",
                                                          None)
