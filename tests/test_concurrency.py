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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.support.mlflow_server import MlflowServer
from tests.support.paths import PROJECT_ROOT

# Each worker imports everything, waits for the go file so they all start at once, then does
# what a step does first: check the store, then create the client and the experiment.
FIRST_USE = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from mlflow.tracking import MlflowClient
    from pipeline.lib.tracking_store import check_tracking_server, get_or_create_experiment
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
    from pipeline.lib import promotion, registry
    uri, go, value, delay = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
    name, experiment, mode = (sys.argv[5:] + ["iris", "race", ""][len(sys.argv) - 5:])[:3]
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.get_experiment_by_name(experiment).experiment_id).info.run_id
    read_champion = registry.champion_metric

    def slow_champion_metric(*args, **kwargs):
        found = read_champion(*args, **kwargs)
        time.sleep(delay)
        return found

    registry.champion_metric = slow_champion_metric
    if mode.startswith("nolease"):
        promotion._server_lease = lambda client, name: contextlib.nullcontext(False)
    if ":" in mode:
        write_delay, set_alias = float(mode.split(":")[1]), client.set_registered_model_alias

        def held_set_alias(model, alias, version):
            if alias == registry.CHAMPION and not Path(f"{go}.{os.getpid()}.armed").exists():
                Path(f"{go}.{os.getpid()}.armed").touch()
                while len(list(go.parent.glob(f"{go.name}.*.armed"))) < 2:
                    time.sleep(0.01)
                time.sleep(write_delay)
            set_alias(model, alias, version)

        client.set_registered_model_alias = held_set_alias
    Path(f"{go}.{os.getpid()}.ready").touch()
    while not go.exists():
        time.sleep(0.01)
    decision = registry.register_model(f"runs:/{run_id}/model", name=name,
                                       metric_name="accuracy", metric_value=value, client=client)
    print(json.dumps(decision))
""")


@pytest.mark.slow  # two registry processes on a sqlite store take about half a minute
def test_concurrent_register_steps_leave_the_better_model_champion(tmp_path: Path) -> None:
    from pipeline.lib.registry import CHAMPION, champion_metric

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
    from pipeline.lib.registry import CHALLENGER, CHAMPION, alias_history, champion_metric

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
    from pipeline.lib import promotion

    monkeypatch.setattr(promotion, "PROMOTION_SETTLE_S", 0.2)
    monkeypatch.setattr(promotion, "LEASE_POLL_S", 0.1)
    name = f"lease-{uuid.uuid4().hex[:8]}"
    start, lock = threading.Barrier(3), threading.Lock()
    inside: list[int] = []
    spans: list[tuple[float, float]] = []

    def contend(index: int) -> None:
        client = MlflowClient(tracking_uri=mlflow_server.url)
        start.wait()
        with promotion.promotion_lock(client, name):
            with lock:
                inside.append(index)
                entered = time.monotonic()
            time.sleep(0.15)  # long enough for two holders at once to overlap in the spans
            with lock:
                inside.remove(index)
                spans.append((entered, time.monotonic()))

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        list(pool.map(contend, range(3)))  # re-raises a contender's error

    spans.sort()
    assert len(spans) == 3
    assert all(end <= later for (_, end), (later, _) in itertools.pairwise(spans)), spans
    tags = MlflowClient(tracking_uri=mlflow_server.url).get_registered_model(name).tags
    assert promotion.LEASE_TAG not in tags, "the last holder releases the lease"


# --- fast: the promotion lock, the server lease and compare-and-set, in one process ---------
class ServerLikeClient(MlflowClient):
    """A client on a local sqlite store that reports a server URI, so the registry takes its
    server path (the lease and the champion's compare-and-set); ``after_read`` runs once
    after the first champion read and ``after_move`` once after the first champion move,
    standing in for another process acting at that moment."""

    def __init__(self, uri: str, after_read: Callable[[], None] | None = None,
                 after_move: Callable[[], None] | None = None) -> None:
        super().__init__(uri)
        self.hooks = {"read": after_read, "move": after_move}

    @property
    def tracking_uri(self) -> str:
        return "http://mlflow.invalid:5000"

    def get_model_version_by_alias(self, name: str, alias: str) -> Any:
        found = super().get_model_version_by_alias(name, alias)
        if alias == "champion" and (hook := self.hooks.pop("read", None)):
            hook()
        return found

    def set_registered_model_alias(self, name: str, alias: str, version: str) -> None:
        super().set_registered_model_alias(name, alias, version)
        if alias == "champion" and (hook := self.hooks.pop("move", None)):
            hook()


@pytest.fixture(scope="module")
def local_store(tmp_path_factory: pytest.TempPathFactory,
                new_sqlite_store: Callable[[str], str]) -> tuple[str, str]:
    """(tracking URI, experiment id) of a sqlite store shared by the fast tests below."""
    root = tmp_path_factory.mktemp("promotion")
    uri = new_sqlite_store("promotion")
    experiment = MlflowClient(uri).create_experiment(
        "promotion", artifact_location=(root / "artifacts").as_uri())
    return uri, experiment


@pytest.fixture
def quick_server_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.lib import promotion

    monkeypatch.setattr(promotion, "PROMOTION_SETTLE_S", 0.01)
    monkeypatch.setattr(promotion, "LEASE_POLL_S", 0.02)
    monkeypatch.setattr(promotion, "LEASE_WAIT_S", 3.0)


def _register(store: tuple[str, str], name: str, value: float, client: Any = None) -> dict:
    from pipeline.lib.registry import register_model

    plain = MlflowClient(store[0])
    run_id = plain.create_run(store[1]).info.run_id
    return register_model(f"runs:/{run_id}/model", name=name, metric_name="accuracy",
                          metric_value=value, client=client or plain)


def _rival(store: tuple[str, str], name: str, value: float) -> Any:
    """Another process's registration landing now: a new version made champion directly."""
    def land() -> None:
        client = MlflowClient(store[0])
        run_id = client.create_run(store[1]).info.run_id
        version = client.create_model_version(name, f"runs:/{run_id}/model", run_id=run_id,
                                              tags={"metric.accuracy": repr(value)}).version
        client.set_registered_model_alias(name, "champion", str(version))
    return land


def test_the_promotion_lock_is_a_file_beside_the_store_named_after_the_model(
        local_store: tuple[str, str]) -> None:
    """The README's lock file name: ``mlflow.db.promote-<hash>.lock`` next to ``mlflow.db``."""
    import hashlib

    from filelock import FileLock, Timeout

    from pipeline.lib.promotion import promotion_lock

    name = f"iris-{uuid.uuid4().hex[:8]}"
    store = Path(local_store[0].removeprefix("sqlite:///"))
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    expected = store.parent / f"mlflow.db.promote-{digest}.lock"
    with promotion_lock(MlflowClient(local_store[0]), name), \
            concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert expected.is_file(), sorted(p.name for p in store.parent.glob("*.lock"))
        with pytest.raises(Timeout):  # another holder must wait
            pool.submit(FileLock(expected).acquire, timeout=0.1).result()


def test_local_promotions_take_turns_and_the_worse_model_never_ends_champion(
        local_store: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The worse model reads the champion first and moves the alias last: under the lock the
    better one waits and then compares with it."""
    from pipeline.lib import registry

    name = f"lock-{uuid.uuid4().hex[:8]}"
    read_champion, inside = registry.champion_metric, threading.Event()
    reads: dict[str, float] = {}

    def slow_for_the_worse(*args: Any, **kwargs: Any) -> Any:
        found = read_champion(*args, **kwargs)
        reads.setdefault(threading.current_thread().name, time.monotonic())
        if threading.current_thread().name == "worse":
            inside.set()
            time.sleep(0.5)
        return found

    monkeypatch.setattr(registry, "champion_metric", slow_for_the_worse)
    results: dict[str, dict] = {}

    def run(value: float) -> None:
        results[threading.current_thread().name] = _register(local_store, name, value)

    worse = threading.Thread(target=run, args=(0.7,), name="worse")
    worse.start()
    assert inside.wait(30)
    better = threading.Thread(target=run, args=(0.9,), name="better")
    better.start()
    worse.join(60)
    better.join(60)
    assert set(results) == {"worse", "better"}, "a registration failed"
    assert reads["better"] >= reads["worse"] + 0.5, "the better one read while the worse decided"
    client = MlflowClient(local_store[0])
    assert registry.champion_metric(client, name, "accuracy") == (
        results["better"]["version"], 0.9)
    assert results["better"]["previous_champion_version"] == results["worse"]["version"]


@pytest.mark.usefixtures("quick_server_timing")
def test_a_dead_holders_server_lease_is_taken_over_once_it_expired(
        local_store: tuple[str, str]) -> None:
    from pipeline.lib import promotion

    name = f"lease-{uuid.uuid4().hex[:8]}"
    client = ServerLikeClient(local_store[0])
    client.create_registered_model(name)
    expiry = time.time() + 0.5
    client.set_registered_model_tag(name, promotion.LEASE_TAG,
                                    f"deadtoken {expiry:.3f} gone-host:4242")
    with promotion.promotion_lock(client, name):
        entered = time.time()
        held = client.get_registered_model(name).tags[promotion.LEASE_TAG]
    assert entered >= expiry, "the lease was taken before it expired"
    assert not held.startswith("deadtoken"), held
    assert promotion.LEASE_TAG not in client.get_registered_model(name).tags


@pytest.mark.usefixtures("quick_server_timing")
def test_server_champion_moved_between_read_and_write_is_compared_again(
        local_store: tuple[str, str]) -> None:
    """A better version became champion right after our read: ours (better than the champion
    we read) must not overwrite it, and ends challenger."""
    from pipeline.lib.registry import CHALLENGER, CHAMPION, champion_metric

    name = f"cas-{uuid.uuid4().hex[:8]}"
    _register(local_store, name, 0.5, ServerLikeClient(local_store[0]))
    ours = _register(local_store, name, 0.7, ServerLikeClient(
        local_store[0], after_read=_rival(local_store, name, 0.9)))
    assert ours["alias"] == CHALLENGER and "does not beat" in ours["reason"], ours
    version, value = champion_metric(MlflowClient(local_store[0]), name, "accuracy")
    assert value == 0.9 and version not in ("1", ours["version"])
    assert ours["previous_champion_version"] == version, "decided against the new champion"
    assert CHAMPION not in MlflowClient(local_store[0]).get_model_version(
        name, ours["version"]).aliases


@pytest.mark.usefixtures("quick_server_timing")
def test_server_champion_overwritten_by_a_worse_one_right_after_our_move_is_taken_back(
        local_store: tuple[str, str]) -> None:
    """A worse version, decided on a stale read, writes the champion alias just after ours:
    the check after the settle delay compares again and the better one ends champion."""
    from pipeline.lib.registry import CHAMPION, champion_metric

    name = f"cas-{uuid.uuid4().hex[:8]}"
    _register(local_store, name, 0.5, ServerLikeClient(local_store[0]))
    ours = _register(local_store, name, 0.9, ServerLikeClient(
        local_store[0], after_move=_rival(local_store, name, 0.7)))
    assert ours["alias"] == CHAMPION, ours
    client = MlflowClient(local_store[0])
    assert champion_metric(client, name, "accuracy") == (ours["version"], 0.9)
    assert ours["previous_champion_version"] == "3", "decided again against the worse one"
