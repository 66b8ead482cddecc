"""How many pytest-xdist workers run the suite, and how they share the modules
(``-n auto --dist loadscope``, pyproject.toml).

One worker more than the cores (:func:`worker_count`): part of the time a worker waits on a
server, a socket, a sleep or a subprocess, and the extra worker fills those gaps. On 2 cores,
3 workers ran the fast tier in 2 min 17 s against 2 min 34 s with 2, and the whole suite in
17 min 49 s against 20 min 44 s (same machine, nothing else running).

Two changes to loadscope, each module still running on one worker:

- The fast modules that use the session's ``mlflow_server`` form one work unit, so one
  worker starts the server (two processes importing MLflow: about 15 s on 2 cores) instead
  of each. ``pytest_collection_modifyitems`` refuses a fast test that asks for the server
  from a module missing from :data:`MLFLOW_SERVER_MODULES`, so the list stays complete.
- The units start longest first (:data:`LONGEST_FIRST`, then by test count as loadscope
  orders them), so a long unit is not the last one left while the other worker idles.
"""

from __future__ import annotations

import os
from typing import Any

import psutil
import pytest

#: Modules with fast tests on the session's ``mlflow_server``: one xdist work unit.
MLFLOW_SERVER_MODULES = frozenset({
    "tests/test_concurrency.py", "tests/test_interrupts.py", "tests/test_registry.py",
    "tests/test_serving.py", "tests/test_tracking.py",
})
SERVER_UNIT = "mlflow-server modules"
#: Memory one worker may take at its peak: its own TensorFlow and models beside the step
#: processes of an end-to-end run (about 2 GB each).
WORKER_MEMORY = 3 << 30
#: Work units that take longest for their test count, started first (measured fast tier).
LONGEST_FIRST = (
    SERVER_UNIT, "tests/test_models.py", "tests/test_crossval.py",
    "tests/test_training_parts.py", "tests/test_inputs.py", "tests/test_register_step.py",
    "tests/test_embeddings.py", "tests/test_submit.py", "tests/test_feature_cache.py",
)


def module_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def unit_of(nodeid: str) -> str:
    module = module_of(nodeid)
    return SERVER_UNIT if module in MLFLOW_SERVER_MODULES else module


def order_by_unit(items: list[pytest.Item]) -> None:
    """Reorder ``items`` (stable within a module): :data:`LONGEST_FIRST`, then the units
    with most tests. The workers report this order; the controller queues units in it."""
    counts: dict[str, int] = {}
    for item in items:
        counts[unit_of(item.nodeid)] = counts.get(unit_of(item.nodeid), 0) + 1

    def rank(item: pytest.Item) -> tuple[int, int, str]:
        unit = unit_of(item.nodeid)
        if unit in LONGEST_FIRST:
            return (LONGEST_FIRST.index(unit), 0, unit)
        return (len(LONGEST_FIRST), -counts[unit], unit)

    items.sort(key=rank)


def check_server_modules(items: list[pytest.Item]) -> None:
    missing = sorted({module_of(item.nodeid) for item in items
                      if "mlflow_server" in getattr(item, "fixturenames", ())
                      and item.get_closest_marker("slow") is None
                      and module_of(item.nodeid) not in MLFLOW_SERVER_MODULES})
    if missing:
        raise pytest.UsageError(
            f"fast tests in {missing} use mlflow_server: add the module to "
            "MLFLOW_SERVER_MODULES in tests/support/scheduling.py (one server per session)")


def worker_count() -> int:
    """``-n auto``: the usable cores plus one, as far as the available memory allows
    (:data:`WORKER_MEMORY` each), and at least one."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    by_memory = psutil.virtual_memory().available // WORKER_MEMORY
    return max(1, min((cores or 1) + 1, by_memory))


def make_scheduler(config: pytest.Config, log: Any) -> Any:
    """loadscope with the server modules as one unit, queued in the workers' order."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid) if unit_of(nodeid) == SERVER_UNIT else super()._split_scope(
                nodeid)

    config.option.loadscopereorder = False  # the workers' order (order_by_unit) is kept
    return Scheduling(config, log)
