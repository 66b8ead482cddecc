"""Stop the step processes of a local run when the CLI itself is interrupted or terminated.

kfp.local starts each step as ``sh -c ... python -m kfp.dsl.executor_main`` with
``subprocess.Popen`` and no process group of its own: a SIGTERM to the CLI alone (a job
scheduler, ``kill``, a container stop) used to end the CLI while the running step carried on
for minutes, logged a model and marked its MLflow runs FINISHED. The CLI sends SIGTERM
to every process below it (found with ``psutil``, so the shell's Python grandchild is
reached too), waits a bounded time for them to end their MLflow runs KILLED, repeating the
signal meanwhile, and kills what is left.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator
from types import FrameType

import psutil

logger = logging.getLogger(__name__)

#: Seconds the step processes get to end their MLflow runs before they are killed.
STOP_GRACE_S = 60.0
#: Seconds between repeats of the signal to step processes still running.
RESEND_S = 5.0
#: Seconds between looks at whether they ended.
POLL_S = 0.1


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first), zombies excluded."""
    try:
        return _alive([child.pid for child in psutil.Process(pid).children(recursive=True)])
    except psutil.NoSuchProcess:
        return []


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
    return alive


def stop_processes(pids: list[int], grace_s: float = STOP_GRACE_S,
                   resend_s: float = RESEND_S) -> list[int]:
    """Wait up to ``grace_s`` for ``pids`` to end, then SIGKILL the rest; returns those.

    SIGTERM is sent again every ``resend_s`` seconds meanwhile: Python swallows an
    interrupt that lands in a finaliser, and a step ignores repeats once it is ending its runs.
    """
    deadline = time.monotonic() + grace_s
    resend = time.monotonic() + resend_s
    while (alive := _alive(pids)) and time.monotonic() < deadline:
        if time.monotonic() >= resend:
            resend = time.monotonic() + resend_s
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        time.sleep(POLL_S)
    left = _alive(pids)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if left:
        logger.error("killed step processes %s: still running %.0f s after the signal",
                     left, grace_s)
    return left


@contextlib.contextmanager
def stop_steps_on_signals(grace_s: float = STOP_GRACE_S,
                          resend_s: float = RESEND_S) -> Iterator[list[int]]:
    """On SIGINT/SIGTERM in the body: SIGTERM all descendants, raise KeyboardInterrupt.

    The steps always get SIGTERM, which they turn into one interrupt and then ignore while
    ending their MLflow runs (a repeated SIGINT would break that off). Yields the list of
    signals received (the caller's exit code is ``128 + signal``). On the way out, the
    processes signalled get ``grace_s`` seconds to end (a step ends its MLflow runs KILLED
    on either signal; the signal is repeated every ``resend_s`` seconds) before they are
    killed, so none outlives the CLI. Must be entered in the main thread (Python delivers
    signals there only).
    """
    received: list[int] = []
    signalled: list[int] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        for pid in descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            signalled.append(pid)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if signalled:
            stop_processes(signalled, grace_s, resend_s)


__all__ = ["RESEND_S", "STOP_GRACE_S", "descendants", "stop_processes", "stop_steps_on_signals"]
