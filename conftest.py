"""Shared fixtures: a scripted local HTTP server, a temporary store, an isolated home."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import sys
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from typing import Any, Callable, Union
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

import py_oidc_auth_client as oac

Body = Union[dict, list, str, bytes, None]
Reply = tuple  # (status, headers, body)

BATCH_AND_SESSION_VARS = (
    "OIDC_TOKEN_FILE", "BROWSER", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
    "DISPLAY", "WAYLAND_DISPLAY", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy",
    *oac._BATCH_VARIABLES,
)


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    form: dict[str, str]
    headers: dict[str, str]
    time: float


@dataclass
class FakeServer:
    """A real HTTP server on 127.0.0.1 whose answers are scripted per route.

    ``reply(method, path, status, body, headers)`` queues one answer; the last
    queued answer of a route repeats once the queue is down to it. A callable
    body is called with the ``Recorded`` request and returns ``(status,
    headers, body)``. Unscripted routes answer 404 with a JSON detail.
    """

    url: str = ""
    requests: list[Recorded] = field(default_factory=list)
    routes: dict[tuple[str, str], deque] = field(default_factory=lambda: defaultdict(deque))

    def reply(self, method: str, path: str, status: int = 200, body: Any = None,
              headers: dict[str, str] | None = None, times: int = 1) -> None:
        for _ in range(times):
            self.routes[(method.upper(), path)].append((status, headers or {}, body))

    def hits(self, path: str, method: str | None = None) -> list[Recorded]:
        return [r for r in self.requests
                if r.path == path and (method is None or r.method == method)]

    def _answer(self, req: Recorded) -> tuple[int, dict[str, str], Body]:
        queue = self.routes.get((req.method, req.path))
        if not queue:
            return 404, {}, {"detail": "Not Found"}
        status, headers, body = queue.popleft() if len(queue) > 1 else queue[0]
        if callable(body):
            return body(req)
        return status, headers, body


def _handler(fake: FakeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode() if length else ""
            req = Recorded(
                self.command, parts.path,
                {k: v[0] for k, v in parse_qs(parts.query).items()},
                {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()},
                dict(self.headers), time.monotonic(),
            )
            fake.requests.append(req)
            status, headers, body = fake._answer(req)
            if body == "__hang__":
                time.sleep(30)
                return
            if body == "__drop__":
                self.close_connection = True
                self.connection.close()
                return
            if isinstance(body, (dict, list)):
                data = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **headers}
            elif isinstance(body, str):
                data = body.encode()
            else:
                data = body or b""
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def fake_server():
    """A scripted server on a free port; see FakeServer."""
    fake = FakeServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture
def tmp_store(tmp_path):
    """A TokenStore in a fresh temporary directory."""
    return oac.TokenStore(tmp_path / "store" / "tokens.json")


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
    """Private HOME and cache dir; no token file, batch, SSH, display or browser variables."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    for name in BATCH_AND_SESSION_VARS:
        monkeypatch.delenv(name, raising=False)
    oac.BaseFlow.reset_instances()
    oac._STORES.clear()
    yield home
    oac.BaseFlow.reset_instances()
    oac._STORES.clear()


def make_jwt(lifetime: int = 3600, now: int | None = None, **claims: Any) -> str:
    """An unsigned JWT-shaped token with exp/iat (the client never verifies it)."""
    now = int(time.time()) if now is None else now
    payload = {"iat": now, "exp": now + lifetime, "sub": "tester", **claims}

    def part(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part(payload)}.sig"


def token_answer(lifetime: int = 3600, refresh: str | None = "refresh-1",
                 refresh_lifetime: int = 86400, **extra: Any) -> dict[str, Any]:
    """A py-oidc-auth style token answer (absolute expiry timestamps)."""
    now = int(time.time())
    body: dict[str, Any] = {
        "access_token": make_jwt(lifetime, now), "token_type": "Bearer",
        "expires": now + lifetime, "refresh_token": refresh,
        "refresh_expires": now + refresh_lifetime, "scope": "openid offline_access",
    }
    body.update(extra)
    return body


def device_answer(interval: int = 1, expires_in: int = 600) -> dict[str, Any]:
    """A py-oidc-auth device answer."""
    return {"device_code": "dev-123", "user_code": "ABCD-EFGH",
            "verification_uri": "https://idp.example/device",
            "verification_uri_complete": "https://idp.example/device?user_code=ABCD-EFGH",
            "expires_in": expires_in, "interval": interval}


def oauth_error(error: str) -> dict[str, Any]:
    """An OAuth error as py-oidc-auth wraps it."""
    return {"detail": "Upstream OIDC error: " + json.dumps({"error": error})}


_STATES = count()


def redirect_to_provider(fake: FakeServer) -> Callable[..., Any]:
    """A login route body: 307 to the provider, state = random|redirect_uri|verifier123."""
    def answer(req: Recorded) -> tuple[int, dict[str, str], bytes]:
        redirect_uri = req.query["redirect_uri"]
        state = f"rnd{next(_STATES)}|{redirect_uri}|verifier123"
        query = urlencode({"client_id": "cli", "redirect_uri": redirect_uri, "state": state})
        return 307, {"Location": f"{fake.url}/authorize?{query}"}, b""

    return answer


@pytest.fixture
def make_token() -> Callable[..., oac.Token]:
    """Build a normalised Token: ``make_token(lifetime=3600, refresh_lifetime=86400)``."""
    def build(lifetime: int = 3600, refresh_lifetime: int = 86400,
              refresh: str = "refresh-1") -> oac.Token:
        now = int(time.time())
        return oac._token(make_jwt(lifetime, now), "Bearer", now + lifetime, refresh,
                          now + refresh_lifetime if refresh else 0, "openid")
    return build


# -- network: a TLS server signed by a test CA, a forward proxy ------------------------------


def _serve_in_thread(server: ThreadingHTTPServer):
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="session")
def test_ca():
    """A throwaway certificate authority (trustme)."""
    from tests import extra

    return extra("trustme").CA()


@pytest.fixture
def tls_server(request, tmp_path, test_ca):
    """A FakeServer over HTTPS whose certificate (for 127.0.0.1) is signed by ``test_ca``.

    ``ca_file`` is the CA's PEM file; ``other_ca_file`` a CA that did not sign it.
    Parametrize indirectly with other names to get a certificate for those instead.
    """
    import ssl

    from tests import extra

    fake = FakeServer()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    names = getattr(request, "param", ("127.0.0.1", "localhost"))
    test_ca.issue_cert(*names).configure_cert(context)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    fake.url = f"https://127.0.0.1:{server.server_address[1]}"
    fake.ca_file = str(tmp_path / "test-ca.pem")
    test_ca.cert_pem.write_to_path(fake.ca_file)
    fake.other_ca_file = str(tmp_path / "other-ca.pem")
    extra("trustme").CA().cert_pem.write_to_path(fake.other_ca_file)
    _serve_in_thread(server)
    yield fake
    server.shutdown()
    server.server_close()


@dataclass
class Proxy:
    """What the forward proxy was asked: ``"POST http://host:port/path"``, ``"CONNECT h:p"``."""

    url: str = ""
    seen: list[str] = field(default_factory=list)


def _proxy_handler(proxy: Proxy) -> type[BaseHTTPRequestHandler]:
    import http.client
    import select
    import socket

    hop_by_hop = {"connection", "proxy-connection", "proxy-authorization", "keep-alive",
                  "transfer-encoding", "host", "content-length"}

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            proxy.seen.append(f"{self.command} {self.path}")
            parts = urlsplit(self.path)  # a proxy gets the absolute URL
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            upstream = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=10)
            try:
                upstream.request(self.command, parts.path + (f"?{parts.query}" if parts.query
                                                             else ""), body,
                                 {k: v for k, v in self.headers.items()
                                  if k.lower() not in hop_by_hop})
                resp = upstream.getresponse()
                data = resp.read()
            finally:
                upstream.close()
            self.send_response(resp.status)
            for name, value in resp.getheaders():
                if name.lower() not in hop_by_hop:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _forward

        def do_CONNECT(self) -> None:  # HTTPS through the proxy: a byte tunnel
            proxy.seen.append(f"CONNECT {self.path}")
            host, _, port = self.path.rpartition(":")
            with socket.create_connection((host, int(port)), timeout=10) as upstream:
                self.send_response(200, "Connection established")
                self.end_headers()
                ends = [self.connection, upstream]
                while True:
                    readable, _, _ = select.select(ends, [], [], 10)
                    if not readable:
                        break
                    chunks = [(s, s.recv(65536)) for s in readable]
                    if any(not data for _, data in chunks):
                        break
                    for s, data in chunks:
                        (upstream if s is self.connection else self.connection).sendall(data)
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def forward_proxy():
    """A forward HTTP proxy on 127.0.0.1 (absolute-URL requests and CONNECT) that records."""
    proxy = Proxy()
    server = _serve_in_thread(ThreadingHTTPServer(("127.0.0.1", 0), _proxy_handler(proxy)))
    proxy.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield proxy
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def isolated_network_env(monkeypatch):
    """No proxy bypass list or CA bundle from the machine running the tests."""
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy", "SSL_CERT_FILE",
                 "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)


class Terminal(io.StringIO):
    """A stderr the test can watch while the flow writes to it."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()

    def write(self, text: str) -> int:
        with self._changed:
            written = super().write(text)
            self._changed.notify_all()
        return written

    def isatty(self) -> bool:
        return False

    # Attached in the test body: pytest swaps sys.stderr again between phases.
    def __enter__(self) -> Terminal:
        self._saved = sys.stderr
        sys.stderr = self
        return self

    def __exit__(self, *exc: object) -> None:
        sys.stderr = self._saved

    def wait_for(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                match = re.search(pattern, self.getvalue())
                if match:
                    return match
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{pattern!r} not in {self.getvalue()!r}")
                self._changed.wait(left)


def read_request(conn: socket.socket) -> bytes:
    """Read one whole HTTP request (head and Content-Length body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return data


@pytest.fixture
def no_cached_documents():
    """Discovery documents and key sets are kept in memory by URL, and ports are reused."""
    oac._FETCHED.clear()
    yield
    oac._FETCHED.clear()


class Dripper:
    """A raw server that answers every request one byte per 0.5 s, for up to 40 s.

    ``mode="body"``: the headers at once, then the body drips;
    ``mode="head"``: the status line and headers drip.
    """

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.mode = "body"
        self.accepted = self.hung_up = 0
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            threading.Thread(target=self._drip, args=(conn,), daemon=True).start()

    def _drip(self, conn: socket.socket) -> None:
        body = b'{"access_token": "' + b"a" * 200 + b'"}'
        head = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body))
        with conn:
            try:
                read_request(conn)
                if self.mode == "body":
                    conn.sendall(head)
                slow = (head if self.mode == "head" else b"") + body
                end = time.monotonic() + 40
                for i in range(len(slow)):
                    if self.stop.is_set() or time.monotonic() > end:
                        return
                    conn.sendall(slow[i:i + 1])
                    time.sleep(0.5)
            except OSError:  # the client hung up: the point of the test
                self.hung_up += 1

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def dripper():
    server = Dripper()
    yield server
    server.close()
