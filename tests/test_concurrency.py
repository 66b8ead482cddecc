"""Concurrent use of one local MLflow store: first-use creation and alias promotion."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest
from mlflow_server import MlflowServer

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
# them started together both read the champion before either moves the alias. Optional
# arguments: the model and experiment names (a shared server), and a mode for the server's
# compare-and-set alone: "nolease" skips the promotion lease, and "nolease:<seconds>" also
# holds the first champion move until every worker is about to make it, then waits that long
# (the worse model writes last, over the better one).
REGISTER = textwrap.dedent("""
    import contextlib, json, os, sys, time
    from pathlib import Path
    from mlflow.tracking import MlflowClient
    from pipeline.steps import register
    uri, go, value, delay = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    name, experiment, mode = (sys.argv[5:] + ["iris", "race", ""][len(sys.argv) - 5:])[:3]
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.get_experiment_by_name(experiment).experiment_id).info.run_id
    read_champion = register.champion_metric

    def slow_champion_metric(*args, **kwargs):
        found = read_champion(*args, **kwargs)
        time.sleep(delay)
        return found

    register.champion_metric = slow_champion_metric
    if mode.startswith("nolease"):
        register._server_lease = lambda client, name: contextlib.nullcontext(False)
    if ":" in mode:
        write_delay, set_alias = float(mode.split(":")[1]), client.set_registered_model_alias

        def held_set_alias(model, alias, version):
            if alias == register.CHAMPION and not Path(f"{go}.{os.getpid()}.armed").exists():
                Path(f"{go}.{os.getpid()}.armed").touch()
                while len(list(go.parent.glob(f"{go.name}.*.armed"))) < 2:
                    time.sleep(0.01)
                time.sleep(write_delay)
            set_alias(model, alias, version)

        client.set_registered_model_alias = held_set_alias
    Path(f"{go}.{os.getpid()}.ready").touch()
    while not go.exists():
        time.sleep(0.01)
    decision = register.register_model(f"runs:/{run_id}/model", name=name,
                                       metric_name="accuracy", metric_value=value, client=client)
    print(json.dumps(decision))
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
    from pipeline.lib.training import checkpoint_folder

    monkeypatch.setenv(CHECKPOINT_ROOT_ENV, str(tmp_path / "root"))
    with checkpoint_folder(tmp_path / "run1", "abc123") as first:
        assert first == (tmp_path / "root" / "abc123", True)
        assert (tmp_path / "root" / "abc123.lock").exists()
        with checkpoint_folder(tmp_path / "run2", "abc123") as second:  # first still training
            assert second == (tmp_path / "run2" / "checkpoints", False)
    # the first one finished (or died): the next one resumes from the root
    with checkpoint_folder(tmp_path / "run3", "abc123") as third:
        assert third == first
    monkeypatch.delenv(CHECKPOINT_ROOT_ENV)
    with checkpoint_folder(tmp_path / "run4", "abc123") as fourth:
        assert fourth == (tmp_path / "run4" / "checkpoints", False)


def _moves(history: list[str]) -> list[tuple[str, str | None, str]]:
    """(alias, from version or None, to version) of each ``alias_history`` entry."""
    found = [re.search(r" (champion|challenger) (?:v(\w+) -> )?v(\w+): ", entry)
             for entry in history]
    assert all(found), history
    return [match.groups() for match in found if match]


@pytest.mark.slow  # two registry processes against a real server take about half a minute
@pytest.mark.mlflow_server
@pytest.mark.parametrize("modes, delays", [
    (("", ""), ("1", "4")),  # the lease: one promotion at a time
    # compare-and-set alone: the worse model decides on a stale read of the champion ...
    (("nolease", "nolease"), ("1", "4")),
    # ... or both decide at once and the worse writes 0.3 s after the better, over it
    (("nolease:0", "nolease:0.3"), ("0", "0")),
], ids=["lease", "cas-stale-read", "cas-overwrite"])
def test_concurrent_register_steps_on_a_server_leave_the_better_model_champion(
        mlflow_server: MlflowServer, tmp_path: Path, modes: tuple[str, str],
        delays: tuple[str, str]) -> None:
    from mlflow.tracking import MlflowClient

    from pipeline.steps.register import CHALLENGER, CHAMPION, alias_history, champion_metric

    client = MlflowClient(tracking_uri=mlflow_server.url)
    suffix = uuid.uuid4().hex[:8]
    name, experiment = f"race-{suffix}", f"race-{suffix}"
    client.create_experiment(experiment)
    go = tmp_path / "go"
    better, worse = ([mlflow_server.url, str(go), value, delay, name, experiment, mode]
                     for value, delay, mode in zip(("0.9", "0.7"), delays, modes, strict=True))
    results = _start_together(REGISTER, [better, worse], go)
    assert [r.returncode for r in results] == [0, 0], [r.stderr[-3000:] for r in results]

    version, value = champion_metric(client, name, "accuracy")
    aliases = {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    assert value == 0.9, (aliases, alias_history(client, name))
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    assert versions == ["1", "2"], "both versions stay registered"
    # the worse one ends challenger, or was champion first and was then displaced
    assert aliases.get(CHALLENGER) in (None, ({"1", "2"} - {version}).pop()), aliases
    winner, loser = (json.loads(r.stdout.strip().splitlines()[-1]) for r in results)
    assert (winner["alias"], winner["version"]) == (CHAMPION, version), winner
    if loser["alias"] == CHALLENGER:
        assert aliases[CHALLENGER] == loser["version"]
        assert "does not beat" in loser["reason"]
        assert (client.get_model_version(name, loser["version"]).description
                == loser["reason"]), "the version says what decided its alias"
    moves = _moves(alias_history(client, name))
    assert {alias: to for alias, _, to in moves} == aliases, moves  # history ends at aliases
    if modes == ("", ""):  # one promotion at a time: each champion move starts where the last ended
        assert not [r.stderr for r in results if "deciding again" in r.stderr], (
            "the lease let both decide at once")
        champion_moves = [(before, to) for alias, before, to in moves if alias == CHAMPION]
        assert all(before == earlier_to for (_, earlier_to), (before, _)
                   in itertools.pairwise(champion_moves)), moves
        assert champion_moves[0][0] is None, moves


@pytest.mark.mlflow_server
def test_the_server_promotion_lease_admits_one_holder_at_a_time(
        mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three contenders at once: each gets the lease, never two together, none left behind."""
    from mlflow.tracking import MlflowClient

    from pipeline.steps import register

    monkeypatch.setattr(register, "PROMOTION_SETTLE_S", 0.2)
    monkeypatch.setattr(register, "LEASE_POLL_S", 0.1)
    name = f"lease-{uuid.uuid4().hex[:8]}"
    start, lock = threading.Barrier(3), threading.Lock()
    inside: list[int] = []
    spans: list[tuple[float, float]] = []

    def contend(index: int) -> None:
        client = MlflowClient(tracking_uri=mlflow_server.url)
        start.wait()
        with register.promotion_lock(client, name):
            with lock:
                inside.append(index)
                entered = time.monotonic()
            time.sleep(0.3)
            with lock:
                inside.remove(index)
                spans.append((entered, time.monotonic()))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(contend, range(3)))  # re-raises a contender's error

    spans.sort()
    assert len(spans) == 3
    assert all(end <= later for (_, end), (later, _) in itertools.pairwise(spans)), spans
    tags = MlflowClient(tracking_uri=mlflow_server.url).get_registered_model(name).tags
    assert register.LEASE_TAG not in tags, "the last holder releases the lease"
