"""Signals and crashes: a terminated step or CLI ends its MLflow runs KILLED, no step
process outlives the CLI."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.lib.interrupts import CLI_PID_ENV, stop_as_interrupt
from pipeline.lib.tracking_log import parent_run_id
from pipeline.lib.tracking_runs import TAG_FAILED_REASON, step_run
from pipeline.lib.tracking_store import check_tracking_server
from pipeline.runners.processes import descendants
from tests.support.cli_helpers import PROJECT_ROOT, V1_BACKBONE, clean_env, set_flags
from tests.support.mlflow_server import MlflowServer

# A step that logs under step_run and then works (sleeps) until it is stopped.
STEP = textwrap.dedent("""
    import sys, time
    from pipeline.lib.tracking_runs import step_run
    with step_run("train", tracking_uri=sys.argv[1], experiment_name="signals",
                  pipeline_run_id="kfp-signals", pipeline_name="iris-test"):
        time.sleep(600)
""")


def _runs(uri: str, experiment: str) -> dict[str, tuple[str, str]]:
    """Run name -> (status, run id) of every run in ``experiment`` (empty while missing)."""
    check_tracking_server(uri)  # waits for the steps' first use of a fresh store to finish
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    return {run.info.run_name: (run.info.status, run.info.run_id)
            for run in client.search_runs([found.experiment_id])}


def _wait_for_running(uri: str, experiment: str, step: str, proc: subprocess.Popen,
                      timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _runs(uri, experiment).get(step, ("",))[0] != "RUNNING":
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"step {step!r} never started"
        time.sleep(1)


@pytest.mark.slow  # a step process takes most of half a minute to start
def test_sigterm_in_a_step_ends_its_runs_killed(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen([sys.executable, "-c", STEP, uri], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_running(uri, "signals", "train", proc, timeout=120)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    statuses = {name: status for name, (status, _) in _runs(uri, "signals").items()}
    assert len(statuses) == 2 and statuses.pop("train") == "KILLED"  # the step run ...
    assert list(statuses.values()) == ["KILLED"]  # ... and the pipeline's parent run


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_cli_alone_stops_the_steps_and_kills_their_runs(
        tmp_path: Path, iris_zip: Path, mobilenet_weights: Path, signum: int) -> None:
    env = clean_env(PYTHONPATH=str(PROJECT_ROOT))
    # its own session, as a job scheduler would start it: no signal reaches the steps but ours
    proc = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "pipeline.py"), "--local", "--data", str(iris_zip),
         "--set", "epochs=500", "--set", "image_size=64", "--set", "head_feature_views=0",
         "--set", f"weights={mobilenet_weights}", *set_flags(*V1_BACKBONE)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while not (tmp_path / "mlflow.db").exists() or not any(
                _runs(uri, name).get("train", ("",))[0] == "RUNNING"
                for name in _experiments(uri)):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the train step never started"
            time.sleep(2)
        steps = descendants(proc.pid)
        assert steps
        os.kill(proc.pid, signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        left = [pid for pid in steps if _live(pid)]
        for pid in left:  # a failed run of this test must not leave a training behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert not left, f"step processes {left} outlived the CLI"
    statuses = {name: status for experiment in _experiments(uri)
                for name, (status, _) in _runs(uri, experiment).items()}
    assert len(statuses) == 2 and statuses.pop("train") == "KILLED", statuses
    assert list(statuses.values()) == ["KILLED"], statuses  # the pipeline's parent run


def _live(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _experiments(uri: str) -> list[str]:
    check_tracking_server(uri)
    return [e.name for e in MlflowClient(tracking_uri=uri).search_experiments()]


@pytest.mark.slow  # a step process to kill takes most of half a minute to start
def test_runs_of_a_killed_step_are_failed_by_the_next_step(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.Popen([sys.executable, "-c", STEP, uri], cwd=PROJECT_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_running(uri, "signals", "train", proc, timeout=120)
    proc.kill()
    proc.communicate(timeout=60)
    killed = _runs(uri, "signals")
    assert {status for status, _ in killed.values()} == {"RUNNING"}  # nobody ended them

    with step_run("train", tracking_uri=uri, experiment_name="signals",
                  pipeline_run_id="kfp-rerun", pipeline_name="iris-test"):
        client = MlflowClient(tracking_uri=uri)
        for name, (_, run_id) in killed.items():
            run = client.get_run(run_id)
            assert run.info.status == "FAILED", name
            assert f"process {proc.pid} " in run.data.tags[TAG_FAILED_REASON]
        assert client.get_run(parent_run_id()).info.status == "RUNNING"  # ours untouched


def test_a_sigterm_turned_into_another_error_still_ends_the_runs_killed(tmp_path: Path) -> None:
    """Keras or tf.data may wrap the interrupt the signal raised; the run was still stopped."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(RuntimeError, match="wrapped"), step_run(
            "train", tracking_uri=uri, experiment_name="wrapped",
            pipeline_run_id="kfp-wrapped", pipeline_name="iris-test"):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        except KeyboardInterrupt as exc:
            raise RuntimeError("wrapped") from exc
    statuses = {name: status for name, (status, _) in _runs(uri, "wrapped").items()}
    assert len(statuses) == 2 and set(statuses.values()) == {"KILLED"}, statuses


#: Stands in for a tracking store's commit: a SIGTERM arrives in the middle of it.
_STORE_COMMIT = textwrap.dedent("""
    def commit(done):
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 1
        while time.monotonic() < deadline:  # the handler runs between these bytecodes
            pass
        done.append("committed")
""")


def test_a_sigterm_inside_tracking_store_code_interrupts_once_out_of_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted inside a store's transaction, a step left its SQLite database locked and
    could not end its runs KILLED; the interrupt now comes once the store code returned."""
    store = {"__name__": "sqlalchemy.orm.session", "os": os, "signal": signal, "time": time}
    exec(compile(_STORE_COMMIT, "<store>", "exec"), store)
    done: list[str] = []
    monkeypatch.delenv(CLI_PID_ENV, raising=False)  # no CLI to watch
    with pytest.raises(KeyboardInterrupt), stop_as_interrupt() as stop:
        store["commit"](done)
        time.sleep(5)  # the signal, sent again, interrupts here
    assert done == ["committed"]
    assert stop.terminated.is_set()


def test_a_deferred_sigterm_is_not_sent_after_the_step_ended(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A step that ends right after a SIGTERM came inside store code: the resend must not
    reach the handler that was in place before (Python's default ends the process)."""
    store = {"__name__": "sqlalchemy.orm.session", "os": os, "signal": signal, "time": time}
    exec(compile("def commit():\n    os.kill(os.getpid(), signal.SIGTERM)\n", "<store>",
                 "exec"), store)
    outside: list[int] = []
    monkeypatch.delenv(CLI_PID_ENV, raising=False)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: outside.append(signum))
    try:
        with stop_as_interrupt() as stop:
            store["commit"]()
        time.sleep(0.5)  # past the resend's delay
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stop.terminated.is_set()
    assert outside == []


@pytest.mark.mlflow_server
def test_a_tracked_step_turns_sigterm_into_an_interrupt_that_ends_its_runs_killed(
        mlflow_server: MlflowServer) -> None:
    """The step's own SIGTERM handler is in place while it runs, and only then."""
    uri, experiment = mlflow_server.url, f"sigterm-{uuid.uuid4().hex[:8]}"
    reached: list[int] = []

    def ours(signum: int, frame: object) -> None:  # would swallow the signal: no interrupt
        reached.append(signum)

    previous = signal.signal(signal.SIGTERM, ours)
    try:
        with pytest.raises(KeyboardInterrupt), step_run(
                "train", tracking_uri=uri, experiment_name=experiment,
                pipeline_run_id="kfp-sigterm", pipeline_name="iris-test"):
            assert signal.getsignal(signal.SIGTERM) is not ours
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises here
        assert signal.getsignal(signal.SIGTERM) is ours  # put back on the way out
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not reached, "SIGTERM reached the handler that was there before the step"
    runs = _runs(uri, experiment)
    assert {name: status for name, (status, _) in runs.items()} == {
        "train": "KILLED", next(n for n in runs if n != "train"): "KILLED"}
    tags = MlflowClient(tracking_uri=uri).get_run(runs["train"][1]).data.tags
    assert tags[TAG_FAILED_REASON] == "stopped by SIGTERM"


@pytest.mark.mlflow_server
def test_a_step_whose_cli_died_stops_and_says_why(mlflow_server: MlflowServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """``kill -9`` of the CLI: its step notices within seconds and ends its runs KILLED.

    The "CLI" is a sleeping process named in ``$IRIS_CLI_PID``; killed and not yet reaped
    (a zombie, as a killed CLI is until its shell reaps it), it counts as gone.
    """
    uri, experiment = mlflow_server.url, f"orphan-{uuid.uuid4().hex[:8]}"
    cli = subprocess.Popen(["sleep", "600"])
    monkeypatch.setenv(CLI_PID_ENV, str(cli.pid))
    try:
        with pytest.raises(KeyboardInterrupt), step_run(
                "train", tracking_uri=uri, experiment_name=experiment,
                pipeline_run_id="kfp-orphan", pipeline_name="iris-test"):
            time.sleep(1.5)  # alive: the step goes on
            cli.kill()
            killed_at = time.monotonic()
            time.sleep(30)  # the watcher interrupts this within about a second
        assert time.monotonic() - killed_at < 5
    finally:
        cli.kill()
        cli.wait()
    runs = _runs(uri, experiment)
    assert {status for status, _ in runs.values()} == {"KILLED"}, runs
    tags = MlflowClient(tracking_uri=uri).get_run(runs["train"][1]).data.tags
    assert tags[TAG_FAILED_REASON] == (
        f"the CLI that started this step (pid {cli.pid}) ended; step stopped")


@pytest.mark.slow
def test_steps_of_a_killed_cli_stop_within_seconds_and_say_why(
        tmp_path: Path, iris_zip: Path, mobilenet_weights: Path) -> None:
    """``kill -9`` of ``--local``: nothing is forwarded, the steps notice the CLI is gone."""
    proc = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "pipeline.py"), "--local", "--data", str(iris_zip),
         "--set", "epochs=500", "--set", "image_size=64", "--set", "head_feature_views=0",
         "--set", f"weights={mobilenet_weights}", *set_flags(*V1_BACKBONE)],
        cwd=tmp_path, env=clean_env(PYTHONPATH=str(PROJECT_ROOT)), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    steps: list[int] = []
    try:
        deadline = time.monotonic() + 600
        while not (tmp_path / "mlflow.db").exists() or not any(
                _runs(uri, name).get("train", ("",))[0] == "RUNNING"
                for name in _experiments(uri)):
            assert proc.poll() is None, "the CLI ended before training started"
            assert time.monotonic() < deadline, "the train step never started"
            time.sleep(2)
        steps = descendants(proc.pid)
        assert steps
        proc.kill()
        proc.wait()
        killed_at = time.monotonic()
        # noticed within a second; ending the runs and TensorFlow's exit take the rest
        while [pid for pid in steps if _live(pid)] and time.monotonic() - killed_at < 45:
            time.sleep(0.5)
    finally:
        left = [pid for pid in steps if _live(pid)]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert not left, f"step processes {left} outlived the CLI by 45 s"
    runs = {name: run for experiment in _experiments(uri)
            for name, run in _runs(uri, experiment).items()}
    assert {status for status, _ in runs.values()} == {"KILLED"}, runs
    tags = MlflowClient(tracking_uri=uri).get_run(runs["train"][1]).data.tags
    assert f"the CLI that started this step (pid {proc.pid}) ended" in tags[TAG_FAILED_REASON]
