"""HTTP servers on 127.0.0.1 that demand basic auth: a file server and a reverse proxy.

The credential tests run the pipeline against these, so a run that succeeds has really
authenticated (each server records whether every request carried the right credentials).
"""

from __future__ import annotations

import base64
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

#: Headers a proxy must not forward (hop-by-hop, or recomputed for the decoded body).
_SKIP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length",
                 "content-encoding", "host", "authorization", "proxy-authorization", "te",
                 "upgrade", "trailer"}


@dataclass
class AuthServer:
    """A running server: its base URL and every request as (method, path, authorized)."""

    url: str
    requests: list[tuple[str, str, bool]] = field(default_factory=list)

    @property
    def authorized(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path, ok in self.requests if ok]

    @property
    def refused(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path, ok in self.requests if not ok]


def _expected_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = b""
        while size := int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16):
            body += handler.rfile.read(size)
            handler.rfile.readline()
        handler.rfile.readline()
        return body
    length = int(handler.headers.get("Content-Length") or 0)
    return handler.rfile.read(length) if length else b""


@contextlib.contextmanager
def _serve(handler: type[BaseHTTPRequestHandler], state: AuthServer) -> Iterator[AuthServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


class _AuthHandler(BaseHTTPRequestHandler):
    state: AuthServer
    expected: str

    def _check(self) -> bool:
        ok = self.headers.get("Authorization") == self.expected
        self.state.requests.append((self.command, self.path, ok))
        if not ok:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        return ok

    def log_message(self, format: str, *args: object) -> None:
        """Requests are recorded in ``state``; keep the access log out of the test output."""


@contextlib.contextmanager
def file_server(path: Path, user: str, password: str) -> Iterator[AuthServer]:
    """Serve ``path`` at ``/<name>`` to requests with the right basic auth only."""
    payload = path.read_bytes()

    class Handler(_AuthHandler):
        state = AuthServer("")
        expected = _expected_header(user, password)

        def do_GET(self) -> None:
            if not self._check():
                return
            if self.path != f"/{path.name}":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    with _serve(Handler, Handler.state) as state:
        yield state


@contextlib.contextmanager
def auth_proxy(upstream: str, user: str, password: str) -> Iterator[AuthServer]:
    """A reverse proxy to ``upstream`` that forwards only requests with the right basic auth."""

    class Handler(_AuthHandler):
        state = AuthServer("")
        expected = _expected_header(user, password)

        def _forward(self) -> None:
            body = _read_body(self)
            if not self._check():
                return
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _SKIP_HEADERS}
            answer = requests.request(self.command, upstream + self.path, headers=headers,
                                      data=body, allow_redirects=False, timeout=300)
            content = answer.content
            self.send_response(answer.status_code)
            for key, value in answer.headers.items():
                if key.lower() not in _SKIP_HEADERS:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward  # noqa: N815

    with _serve(Handler, Handler.state) as state:
        yield state
