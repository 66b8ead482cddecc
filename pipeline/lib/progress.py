"""Progress of long loops inside a step, as lines the local runner turns into a bar.

A step runs in its own process (a pod on a cluster), so it cannot draw on the user's
terminal; it writes ``@@progress {"what": ..., "done": n, "total": m}`` lines to its output
instead. The local runner shows them as a tqdm bar on a terminal and nothing otherwise; on
a cluster they are ordinary lines in the pod's log.
"""

from __future__ import annotations

import json
import sys

PROGRESS_PREFIX = "@@progress "


def report_progress(what: str, done: int, total: int | None = None) -> None:
    """Announce that ``done`` (of ``total``, when known) units of ``what`` are finished."""
    payload = json.dumps({"what": what, "done": done, "total": total})
    sys.stdout.write(f"{PROGRESS_PREFIX}{payload}\n")
    sys.stdout.flush()


__all__ = ["PROGRESS_PREFIX", "report_progress"]
