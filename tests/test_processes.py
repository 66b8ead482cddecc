"""The ``--local`` Ctrl-C sequence on dummy step processes: SIGTERM to every descendant, the
signal repeated while they end, SIGKILL for what is left after the grace period."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline.runners.processes import descendants, stop_steps_on_signals

#: A step that notes each SIGTERM it gets and carries on (one busy ending its runs).
STUBBORN = textwrap.dedent("""
    import signal, sys, time
    def note(signum, frame):
        with open(sys.argv[1], "a") as log:
            log.write(f"{time.monotonic()}\\n")
    signal.signal(signal.SIGTERM, note)
    print("ready", flush=True)
    while True:
        time.sleep(0.02)
""")
#: A step that ends on the first SIGTERM (Python's default action).
POLITE = 'print("ready", flush=True)\nimport time\nwhile True: time.sleep(0.02)\n'
GRACE_S, RESEND_S = 1.0, 0.3


def _start(code: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_ctrl_c_signals_every_step_repeats_the_signal_and_kills_what_is_left(
        tmp_path: Path) -> None:
    notes = tmp_path / "sigterms.txt"
    stubborn, polite = _start(STUBBORN, str(notes)), _start(POLITE)
    try:
        assert {stubborn.pid, polite.pid} <= set(descendants(os.getpid()))
        with (pytest.raises(KeyboardInterrupt, match="SIGINT"),
              stop_steps_on_signals(grace_s=GRACE_S, resend_s=RESEND_S) as received):
            interrupted = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C
            time.sleep(10)  # never reached: the handler raises
        ended = time.monotonic() - interrupted
        codes = [proc.wait(timeout=2) for proc in (stubborn, polite)]  # both ended by now
    finally:
        for proc in (stubborn, polite):
            proc.kill()
            proc.wait()
    assert received == [signal.SIGINT]
    # the polite one ended on the first signal, the stubborn one was killed after the grace
    assert codes == [-signal.SIGKILL, -signal.SIGTERM]
    assert GRACE_S <= ended < GRACE_S + 1.5
    times = [float(line) for line in notes.read_text().split()]
    # the first SIGTERM, then one every RESEND_S (give or take a poll) until the grace ends
    assert 3 <= len(times) <= 1 + int(GRACE_S / RESEND_S), times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(RESEND_S - 0.05 <= gap < RESEND_S + 0.3 for gap in gaps), gaps
