"""The ``--local`` Ctrl-C sequence on dummy step processes: SIGTERM to every descendant, the
signal repeated while they end, SIGKILL for what is left after the grace period."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

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


#: Runs the sequence in its own process: there, the dummy steps are its only descendants (in
#: pytest's own process, the CLI's handler would also stop the session's MLflow server).
DRIVER = textwrap.dedent("""
    import json, os, signal, subprocess, sys, time
    from pipeline.runners.processes import descendants, stop_steps_on_signals
    stubborn_code, polite_code, notes, grace_s, resend_s = sys.argv[1:6]
    def start(code, *args):
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "ready"
        return proc
    stubborn, polite = start(stubborn_code, notes), start(polite_code)
    assert {stubborn.pid, polite.pid} <= set(descendants(os.getpid()))
    raised = ""
    try:
        with stop_steps_on_signals(grace_s=float(grace_s), resend_s=float(resend_s)) as received:
            interrupted = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)  # the user's Ctrl-C
            time.sleep(10)  # never reached: the handler raises
    except KeyboardInterrupt as exc:
        raised = str(exc)
    ended = time.monotonic() - interrupted
    codes = [proc.wait(timeout=2) for proc in (stubborn, polite)]  # both ended by now
    print(json.dumps({"raised": raised, "received": received, "ended": ended,
                      "codes": codes}))
""")


def test_ctrl_c_signals_every_step_repeats_the_signal_and_kills_what_is_left(
        tmp_path: Path) -> None:
    notes = tmp_path / "sigterms.txt"
    done = subprocess.run([sys.executable, "-c", DRIVER, STUBBORN, POLITE, str(notes),
                           str(GRACE_S), str(RESEND_S)], capture_output=True, text=True,
                          timeout=60, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["raised"] == "SIGINT"
    assert result["received"] == [signal.SIGINT]
    # the polite one ended on the first signal, the stubborn one was killed after the grace
    assert result["codes"] == [-signal.SIGKILL, -signal.SIGTERM]
    assert GRACE_S <= result["ended"] < GRACE_S + 1.5
    times = [float(line) for line in notes.read_text().split()]
    # the first SIGTERM, then one every RESEND_S (give or take a poll) until the grace ends
    assert 3 <= len(times) <= 1 + int(GRACE_S / RESEND_S), times
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(RESEND_S - 0.05 <= gap < RESEND_S + 0.3 for gap in gaps), gaps
