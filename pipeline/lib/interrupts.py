"""How a step process is told to stop: SIGTERM, or the CLI that started it going away.

The one SIGTERM handler of the step processes (the CLI's own, which forwards signals to
its steps, is :func:`pipeline.runners.processes.stop_steps_on_signals`: a different job).
SIGTERM is how a step is stopped (the local CLI forwards it, Kubernetes sends it before
killing a pod); by default it ends Python without unwinding, so nothing in ``finally``
runs: MLflow runs stay RUNNING, partial files stay behind.

A CLI killed outright (``kill -9``) forwards nothing, and its steps would run on as
orphans. The local runner therefore names itself in ``$IRIS_CLI_PID``; a watcher thread
polls that process and, once it is gone, stops the step the same way, with the reason.
A parent-death signal (``prctl``) would not do: kfp.local starts each step through
``sh -c``, whose death is not the CLI's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType

import psutil

logger = logging.getLogger(__name__)

#: Set by the local runner to its own pid; the steps it starts stop when it is gone.
CLI_PID_ENV = "IRIS_CLI_PID"
#: Seconds between two looks at the CLI process, and between repeated SIGTERMs.
WATCH_INTERVAL_S = 1.0
REPEAT_S = 5.0
#: Modules a SIGTERM must not interrupt: an interrupt inside a tracking store's transaction
#: left its SQLite database locked by this process, so ending the runs KILLED then waited on
#: that lock until the step was killed, both runs left RUNNING (1 stop in 12 in a test loop).
UNINTERRUPTIBLE_MODULES = ("sqlalchemy.", "sqlite3", "mlflow.store.", "alembic.")
#: Seconds after which a SIGTERM that arrived inside such code is delivered again, and for
#: how long at most: a step that never leaves that code is interrupted there after all.
DEFER_S = 0.2
MAX_DEFER_S = 3.0


def in_uninterruptible_code(frame: FrameType | None) -> bool:
    """Whether ``frame`` or a caller of it runs in one of :data:`UNINTERRUPTIBLE_MODULES`."""
    while frame is not None:
        if frame.f_globals.get("__name__", "").startswith(UNINTERRUPTIBLE_MODULES):
            return True
        frame = frame.f_back
    return False


@dataclass
class Stop:
    """What happened to the step: whether and why it was told to stop.

    ``ending`` is set by the caller once it is cleaning up (ending runs): from then on
    SIGTERM no longer interrupts. ``terminated`` is set by every SIGTERM: code in between
    (Keras, tf.data) may turn the interrupt into another exception, and the step still
    ended because it was stopped. ``reason`` says why, for the run's record.
    """

    ending: threading.Event = field(default_factory=threading.Event)
    terminated: threading.Event = field(default_factory=threading.Event)
    reason: str = ""
    watched: int | None = None

    def cli_gone(self) -> bool:
        """Whether the watched CLI has ended (recorded as the reason): the step's failure
        may be its consequence (a write to the dead CLI's pipe) before the watcher saw it."""
        if self.watched is None or process_alive(self.watched):
            return False
        self.reason = self.reason or _cli_gone_reason(self.watched)
        return True


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (killed, not yet reaped)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # someone else's process: alive
        return True


def cli_pid() -> int | None:
    """The CLI's pid from ``$IRIS_CLI_PID`` (``None`` when unset or not a pid)."""
    raw = os.environ.get(CLI_PID_ENV, "").strip()
    if not raw.isdigit() or int(raw) <= 1:
        if raw:
            logger.warning("ignoring %s=%r: not a process id", CLI_PID_ENV, raw)
        return None
    return int(raw)


@contextlib.contextmanager
def stop_as_interrupt(watch_pid: int | None = None) -> Iterator[Stop]:
    """SIGTERM raises ``KeyboardInterrupt`` in the body; so does ``watch_pid`` ending.

    Every SIGTERM raises again (an interrupt raised inside a finaliser is swallowed by
    Python, so senders repeat it) until ``Stop.ending`` is set; one that arrives inside a
    tracking store's database code is sent again :data:`DEFER_S` later instead. With
    ``watch_pid`` (default: :func:`cli_pid`) a daemon thread checks every second that it is
    alive; once it is not, it records the reason and sends this process SIGTERM, every 5 s
    until ``ending``.
    Signal handlers can only be set from the main thread: elsewhere nothing changes.
    """
    stop = Stop(watched=watch_pid if watch_pid is not None else cli_pid())
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    deferred_since: list[float] = []  # when the first SIGTERM came
    resends: list[threading.Timer] = []  # cancelled on the way out: see the finally below

    def interrupt(signum: int, frame: FrameType | None) -> None:
        stop.terminated.set()
        stop.reason = stop.reason or "stopped by SIGTERM"
        if stop.ending.is_set():
            return
        now = time.monotonic()
        if not deferred_since:
            deferred_since.append(now)
        if in_uninterruptible_code(frame) and now - deferred_since[0] < MAX_DEFER_S:
            # the same signal again, once out of it
            again = threading.Timer(DEFER_S, os.kill, (os.getpid(), signal.SIGTERM))
            again.daemon = True
            again.start()
            resends.append(again)
            return
        raise KeyboardInterrupt(stop.reason)

    previous = signal.signal(signal.SIGTERM, interrupt)
    done = threading.Event()
    if stop.watched is not None:
        threading.Thread(target=_watch, args=(stop.watched, stop, done), daemon=True,
                         name=f"watch-cli-{stop.watched}").start()
    try:
        yield stop
    finally:
        done.set()
        for again in resends:  # sent after this, it would reach the previous handler
            again.cancel()
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """:func:`stop_as_interrupt` ending in ``SystemExit(143)``, for steps without MLflow runs.

    For code whose ``finally`` blocks remove partial files (a download): a stopped step
    then ends as a plain termination, exit code 143. A handler already installed (the
    tracked step's) is left alone, as are threads other than the main one.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    with stop_as_interrupt() as stop:
        try:
            yield
        except KeyboardInterrupt:
            if not stop.terminated.is_set():
                raise
            stop.ending.set()
            raise SystemExit(128 + signal.SIGTERM) from None


def _cli_gone_reason(pid: int) -> str:
    return f"the CLI that started this step (pid {pid}) ended; step stopped"


def _watch(pid: int, stop: Stop, done: threading.Event) -> None:
    """Wait for ``pid`` to end, then SIGTERM this process until the step is ending."""
    while not done.wait(WATCH_INTERVAL_S):
        if not process_alive(pid):
            break
    else:
        return
    stop.reason = stop.reason or _cli_gone_reason(pid)
    logger.warning("%s", stop.reason)
    while not stop.ending.is_set() and not done.is_set():
        os.kill(os.getpid(), signal.SIGTERM)
        done.wait(REPEAT_S)


__all__ = [
    "CLI_PID_ENV", "Stop", "cli_pid", "in_uninterruptible_code", "process_alive",
    "sigterm_exits", "stop_as_interrupt",
]
