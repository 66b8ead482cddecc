"""Download step over a real HTTP server on 127.0.0.1: retries, cache, checksums, local, fsspec."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
import pytest

from pipeline.lib.fetch import fetch_dataset
from pipeline.lib.transfer import DownloadError
from tests.support.paths import PROJECT_ROOT

PAYLOAD = b"PK\x03\x04not-really-a-zip-but-the-magic-is-right" * 1000  # passes the archive sniff
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
FAST = {"retries": 4, "backoff_s": 0.01, "timeout_s": 5.0}


@dataclass
class Server:
    """A file server on 127.0.0.1 that answers 503 to the first ``fail_first`` requests."""

    url: str
    fail_first: int = 0
    stall_first: float = 0.0  # seconds the first request hangs before answering
    status_after: int = 200
    mode: str = ""  # "trickle": see below; "silent": never answers; "loop": redirects
    #: A trickle sends the payload ``trickle_bytes`` at a time, waiting ``trickle_every_s``
    #: before each piece, and hangs up after ``trickle_s`` (or when ``trickle_length`` bytes,
    #: its Content-Length, are sent).
    trickle_bytes: int = 1
    trickle_every_s: float = 0.05
    trickle_s: float = 3.0
    trickle_length: int = len(PAYLOAD)
    requests: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    stop: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server(url="")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            if state.mode == "silent":
                state.stop.wait(30)
                return
            if state.mode == "loop":
                self.send_response(302)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if state.mode == "trickle":
                self.send_response(200)
                self.send_header("Content-Length", str(state.trickle_length))
                self.end_headers()
                self.wfile.flush()
                ends = time.monotonic() + state.trickle_s
                sent = 0
                with contextlib.suppress(OSError):
                    while (sent < state.trickle_length and not state.stop.is_set()
                           and not state.stop.wait(state.trickle_every_s)
                           and time.monotonic() < ends):
                        piece = PAYLOAD[sent:min(sent + state.trickle_bytes, state.trickle_length)]
                        self.wfile.write(piece)
                        self.wfile.flush()
                        sent += len(piece)
                        state.bytes_sent += len(piece)
                return
            if len(state.requests) == 1 and state.stall_first:
                time.sleep(state.stall_first)  # then answer with the wrong bytes: a client
                stale = b"stale" * 10  # that ignored its timeout fails the checksum
                with contextlib.suppress(OSError):
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(stale)))
                    self.end_headers()
                    self.wfile.write(stale)
                return
            if len(state.requests) <= state.fail_first:
                self.send_error(503, "try again")
                return
            if state.status_after != 200:
                self.send_error(state.status_after)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args: object) -> None:  # keep test output quiet
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/data/iris-image.zip"
    try:
        yield state
    finally:
        state.stop.set()
        httpd.shutdown()
        httpd.server_close()


def test_retries_after_two_503s_then_second_call_hits_the_cache(server: Server,
                                                                tmp_path: Path) -> None:
    server.fail_first = 2
    cache = tmp_path / "cache"

    first = fetch_dataset(server.url, tmp_path / "a", DIGEST, cache_dir=cache, **FAST)

    assert first == tmp_path / "a" / "iris-image.zip"
    assert first.read_bytes() == PAYLOAD
    assert len(server.requests) == 3  # two 503s, then the file

    second = fetch_dataset(server.url, tmp_path / "b", DIGEST, cache_dir=cache, **FAST)

    assert second.read_bytes() == PAYLOAD
    assert len(server.requests) == 3  # served from the cache: no new request
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["iris-image.zip"]


def test_a_corrupt_cache_entry_is_fetched_again_and_replaced(server: Server,
                                                             tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    fetch_dataset(server.url, tmp_path / "a", DIGEST, cache_dir=cache, **FAST)
    entry = cache / DIGEST / "iris-image.zip"
    assert entry.read_bytes() == PAYLOAD and len(server.requests) == 1
    entry.write_bytes(PAYLOAD[:-1] + b"!")  # a flipped byte, e.g. a disk error

    again = fetch_dataset(server.url, tmp_path / "b", DIGEST, cache_dir=cache, **FAST)

    assert again.read_bytes() == PAYLOAD
    assert len(server.requests) == 2, "the corrupt entry must not be served"
    assert entry.read_bytes() == PAYLOAD, "the corrupt entry must be replaced"
    fetch_dataset(server.url, tmp_path / "c", DIGEST, cache_dir=cache, **FAST)
    assert len(server.requests) == 2  # the repaired entry serves the next fetch


def test_a_stalled_response_times_out_and_is_retried(server: Server, tmp_path: Path) -> None:
    server.stall_first = 1.0
    out = fetch_dataset(server.url, tmp_path / "d", DIGEST, cache_dir=tmp_path / "c",
                        retries=1, backoff_s=0.01, timeout_s=0.2)
    assert out.read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_gives_up_after_the_retries_naming_the_url(server: Server, tmp_path: Path) -> None:
    server.fail_first = 100
    with pytest.raises(DownloadError, match=re.escape(server.url) + r" after 3 attempt.*503"):
        fetch_dataset(server.url, tmp_path / "d", DIGEST, cache_dir=tmp_path / "c",
                      retries=2, backoff_s=0.01, timeout_s=5.0)
    assert len(server.requests) == 3
    assert list((tmp_path / "d").iterdir()) == []


def test_unreachable_source_error_says_how_to_use_a_local_copy(closed_port_uri: str,
                                                               tmp_path: Path) -> None:
    url = f"{closed_port_uri}/iris-image.zip"  # nothing listens: refused, no network needed
    with pytest.raises(DownloadError) as caught:
        fetch_dataset(url, tmp_path / "d", None, cache_dir=tmp_path / "c", **FAST)
    message = str(caught.value)
    assert url in message
    assert "--data PATH" in message and "IRIS_DATA_SOURCE=PATH" in message
    assert list((tmp_path / "d").iterdir()) == []


def test_client_errors_are_not_retried(server: Server, tmp_path: Path) -> None:
    server.status_after = 404
    with pytest.raises(DownloadError, match=r"iris-image\.zip: HTTP 404"):
        fetch_dataset(server.url, tmp_path / "d", None, cache_dir=tmp_path / "c", **FAST)
    assert len(server.requests) == 1


def test_checksum_mismatch_over_http_leaves_no_file(server: Server, tmp_path: Path) -> None:
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"sha256 mismatch.*expected {wrong}, got {DIGEST}"):
        fetch_dataset(server.url, tmp_path / "d", wrong, cache_dir=tmp_path / "c", **FAST)
    assert list((tmp_path / "d").iterdir()) == []
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").rglob("*.zip"))


def test_local_archive_and_file_url_are_copied_and_verified(tmp_path: Path) -> None:
    source = tmp_path / "src" / "iris-image.zip"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)

    copied = fetch_dataset(str(source), tmp_path / "a", DIGEST)
    via_url = fetch_dataset(source.as_uri(), tmp_path / "b", DIGEST.upper())
    unchecked = fetch_dataset(str(source), tmp_path / "c", "none")

    for path in (copied, via_url, unchecked):
        assert path.name == "iris-image.zip" and path.read_bytes() == PAYLOAD


def test_local_checksum_mismatch_leaves_no_file(tmp_path: Path) -> None:
    source = tmp_path / "data.zip"
    source.write_bytes(PAYLOAD)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fetch_dataset(str(source), tmp_path / "out", "f" * 64)
    assert list((tmp_path / "out").iterdir()) == []


def test_local_folder_is_copied_without_following_links(tmp_path: Path) -> None:
    src = tmp_path / "flowers"
    (src / "setosa").mkdir(parents=True)
    (src / "setosa" / "a.jpg").write_bytes(b"jpeg")
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (src / "setosa" / "link.jpg").symlink_to(secret)

    copied = fetch_dataset(str(src), tmp_path / "out", "")

    assert copied == tmp_path / "out" / "flowers"
    assert sorted(p.name for p in (copied / "setosa").iterdir()) == ["a.jpg"]
    with pytest.raises(ValueError, match="is a folder"):
        fetch_dataset(str(src), tmp_path / "out2", DIGEST)


def test_missing_local_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere\.zip"):
        fetch_dataset(str(tmp_path / "nowhere.zip"), tmp_path / "out")


def test_fsspec_source_is_fetched_and_cached(tmp_path: Path) -> None:
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket/iris-image.zip", PAYLOAD)
    try:
        out = fetch_dataset("memory://bucket/iris-image.zip", tmp_path / "d", DIGEST,
                            cache_dir=tmp_path / "c", **FAST)
    finally:
        fs.rm("/bucket/iris-image.zip")  # gone from the "store": only the cache can serve it
    assert out.read_bytes() == PAYLOAD

    again = fetch_dataset("memory://bucket/iris-image.zip", tmp_path / "e", DIGEST,
                          cache_dir=tmp_path / "c", **FAST)
    assert again.read_bytes() == PAYLOAD


@pytest.mark.skipif(importlib.util.find_spec("s3fs") is not None, reason="s3fs is installed")
def test_s3_without_the_extra_names_it(tmp_path: Path) -> None:
    with pytest.raises(ImportError, match=r"iris-image-pipeline\[s3\]"):
        fetch_dataset("s3://bucket/iris-image.zip", tmp_path, None, cache_dir=tmp_path / "c")


def test_a_trickling_server_fails_at_the_overall_deadline(server: Server, tmp_path: Path) -> None:
    """1 byte per 0.05 s never trips a read timeout; only the deadline ends the transfer.

    The server would trickle for 20 s: ending within a second or two of the 1 s deadline
    shows the deadline is checked while bytes arrive, not only between attempts.
    """
    server.mode = "trickle"
    server.trickle_s = 20.0
    started = time.monotonic()
    with pytest.raises(DownloadError, match=re.escape(server.url)
                       + r" within download_deadline_s=1 s"):
        fetch_dataset(server.url, tmp_path / "d", None, cache_dir=tmp_path / "c", retries=3,
                      backoff_s=0.01, timeout_s=5.0, deadline_s=1.0, min_bytes_per_s=0)
    ended = time.monotonic() - started
    assert 1.0 <= ended < 4.0, f"the fetch ended after {ended:.1f} s (deadline 1 s)"
    assert server.bytes_sent > 5, "bytes arrived until the deadline"
    assert len(server.requests) == 1
    assert list((tmp_path / "d").iterdir()) == []  # no .part file left


def test_a_slow_but_steady_transfer_is_not_a_stall(server: Server, tmp_path: Path) -> None:
    """400 B/s against a 150 B/s floor: fewer bytes than 150 in one 0.2 s window, but the
    floor is a rate, so bytes are measured against the time they took (about 80 in 0.2 s)."""
    server.mode = "trickle"
    server.trickle_bytes, server.trickle_every_s, server.trickle_length = 40, 0.1, 400
    path = fetch_dataset(server.url, tmp_path / "d", hashlib.sha256(PAYLOAD[:400]).hexdigest(),
                         cache_dir=tmp_path / "c", retries=0, timeout_s=5.0,
                         min_bytes_per_s=150, stall_window_s=0.2)
    assert path.read_bytes() == PAYLOAD[:400]
    assert len(server.requests) == 1


def test_a_stall_is_judged_over_the_time_the_bytes_took(server: Server, tmp_path: Path) -> None:
    """120 bytes every 1.6 s (75 B/s) against a 100 B/s floor and a 0.3 s window: the first
    piece arrives 1.6 s into the window, more bytes than the floor's one second or one window
    would ask for, yet fewer than 100 B/s over the 1.6 s they took, so the transfer stalled."""
    server.mode = "trickle"
    server.trickle_bytes, server.trickle_every_s = 120, 1.6
    with pytest.raises(DownloadError, match=r"after 1 attempt\(s\): transfer stalled: 120 "
                       r"bytes in 1\.\d s, below download_min_bytes_per_s=100"):
        fetch_dataset(server.url, tmp_path / "d", None, cache_dir=tmp_path / "c", retries=0,
                      timeout_s=5.0, min_bytes_per_s=100, stall_window_s=0.3)
    assert list((tmp_path / "d").iterdir()) == []


def test_a_stalled_transfer_is_retried_then_reported(server: Server, tmp_path: Path) -> None:
    server.mode = "trickle"
    with pytest.raises(DownloadError, match=r"after 2 attempt\(s\): transfer stalled: \d+ "
                       r"bytes in [\d.]+ s, below download_min_bytes_per_s=1000"):
        fetch_dataset(server.url, tmp_path / "d", None, cache_dir=tmp_path / "c", retries=1,
                      backoff_s=0.01, timeout_s=5.0, min_bytes_per_s=1000, stall_window_s=0.3)
    assert len(server.requests) == 2
    assert list((tmp_path / "d").iterdir()) == []


def test_a_server_that_never_answers_ends_at_the_deadline(server: Server,
                                                          tmp_path: Path) -> None:
    server.mode = "silent"
    with pytest.raises(DownloadError, match=r"within download_deadline_s=1 s \(last error: "):
        fetch_dataset(server.url, tmp_path / "d", None, cache_dir=tmp_path / "c", retries=4,
                      backoff_s=0.01, timeout_s=30.0, deadline_s=1.0)
    assert len(server.requests) == 1


def test_a_redirect_loop_names_the_url(server: Server, tmp_path: Path) -> None:
    server.mode = "loop"
    with pytest.raises(DownloadError, match=re.escape(server.url) + ": too many redirects"):
        fetch_dataset(server.url, tmp_path / "d", None, cache_dir=tmp_path / "c", **FAST)
    assert list((tmp_path / "d").iterdir()) == []


def test_sigterm_during_a_download_removes_the_part_file(server: Server, tmp_path: Path) -> None:
    server.mode = "trickle"
    server.trickle_s = 30.0
    dest = tmp_path / "d"
    code = (f"from pipeline.lib.fetch import fetch_dataset; "
            f"fetch_dataset({server.url!r}, {str(dest)!r}, None, "
            f"cache_dir={str(tmp_path / 'c')!r}, retries=0)")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT,
                               env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    try:
        for _ in range(400):  # until the transfer is under way (imports take a moment)
            if server.bytes_sent > 2 and list(dest.glob(".*.part")):
                break
            time.sleep(0.05)
        assert list(dest.glob(".*.part")), "the download never started"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        process.kill()
        process.wait()
    assert list(dest.iterdir()) == []


def test_a_full_disk_names_the_destination_and_leaves_nothing(
        tmp_path: Path, full_disk: Callable[[int], None]) -> None:
    source = tmp_path / "iris-image.zip"
    source.write_bytes(PAYLOAD)
    full_disk(1000)
    with pytest.raises(OSError, match=r"cannot write '.*/d/iris-image\.zip': No space left"):
        fetch_dataset(str(source), tmp_path / "d", DIGEST)
    assert list((tmp_path / "d").iterdir()) == []
