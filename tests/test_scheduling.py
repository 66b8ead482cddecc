"""How many xdist workers ``-n auto`` starts (``tests/support/scheduling.py``)."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest

from tests.support import scheduling

GIB = 1 << 30


@pytest.mark.parametrize(("cores", "available_gib", "workers"), [
    (2, 24, 3),  # this project's CI machine: one worker per core plus one
    (8, 64, 9),
    (8, 10, 3),  # memory for 3 workers only
    (2, 1, 1),  # never none
])
def test_auto_starts_a_worker_per_core_plus_one_as_memory_allows(
        monkeypatch: pytest.MonkeyPatch, cores: int, available_gib: int, workers: int) -> None:
    monkeypatch.setattr(scheduling.os, "sched_getaffinity", lambda pid: set(range(cores)),
                        raising=False)
    monkeypatch.setattr(scheduling.psutil, "virtual_memory",
                        lambda: SimpleNamespace(available=available_gib * GIB))
    assert scheduling.worker_count() == workers


def test_the_suites_hook_gives_the_count_unless_the_environment_sets_it(
        pytestconfig: pytest.Config, monkeypatch: pytest.MonkeyPatch) -> None:
    if not pytestconfig.pluginmanager.hasplugin("xdist"):
        pytest.skip("pytest-xdist not loaded (-p no:xdist)")
    hook = pytestconfig.pluginmanager.hook.pytest_xdist_auto_num_workers
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(scheduling, "worker_count", lambda: 7)
    assert hook(config=pytestconfig) == 7
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "5")
    assert hook(config=pytestconfig) == 5


def test_a_test_process_freezes_its_heap_when_the_session_ends() -> None:
    """So its exit skips collecting what the tests left (``conftest.pytest_sessionfinish``)."""
    from tests import conftest

    gc.unfreeze()
    try:
        conftest.pytest_sessionfinish(session=None)
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_collection_runs_with_the_garbage_collector_off_and_freezes_what_it_imported() -> None:
    """``conftest.pytest_collection`` wraps pytest's collection (a new-style hook wrapper)."""
    from tests import conftest

    gc.unfreeze()
    wrapper = conftest.pytest_collection(session=None)
    try:
        next(wrapper)  # collection runs here
        assert not gc.isenabled()
        with pytest.raises(StopIteration):
            wrapper.send(None)
        assert gc.isenabled()
        assert gc.get_freeze_count() > 0
    finally:
        gc.enable()
        gc.unfreeze()
