"""Shared fixtures and helpers: a scripted local HTTP server, a temporary store, an isolated
home, free ports, child processes, the CLI, a scripted user and browser.

Test files import the plain helpers with ``from conftest import ...``; no test file
imports another.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import http.client
import io
import json
import os
import random
import re
import shlex
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
import webbrowser
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from pathlib import Path
from typing import Any, Callable, Union
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest

import py_oidc_auth_client as oac

REPO = Path(__file__).resolve().parent
LOGIN, DEVICE, TOKEN = "/auth/v2/login", "/auth/v2/device", "/auth/v2/token"
# A login may start: webbrowser runs `true URL`, which does nothing.
LOGIN_ALLOWED = {"BROWSER": "true"}

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


def device_answer(interval: int = 1, expires_in: int = 600, **changes: Any) -> dict[str, Any]:
    """A py-oidc-auth device answer with *changes*; a key changed to None is left out."""
    body: dict[str, Any] = {
        "device_code": "dev-123", "user_code": "ABCD-EFGH",
        "verification_uri": "https://idp.example/device",
        "verification_uri_complete": "https://idp.example/device?user_code=ABCD-EFGH",
        "expires_in": expires_in, "interval": interval, **changes,
    }
    return {k: v for k, v in body.items() if v is not None}


# Without verification_uri_complete: the user is shown the page and types the code.
bare_device_answer = functools.partial(device_answer, verification_uri_complete=None)


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
        self.first_accept = 0.0  # time.monotonic() of the first connection
        self.stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.accepted += 1
            self.first_accept = self.first_accept or time.monotonic()
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


# -- ports --------------------------------------------------------------------------------


@functools.cache
def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def bindable(host: str, port: int) -> bool:
    """True when a listening socket can take host:port now (as the callback server binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
            sock.listen()
        except OSError:
            return False
    return True


def port_is_free(port: int) -> bool:
    return bindable("127.0.0.1", port) and (not has_ipv6_loopback() or bindable("::1", port))


@functools.cache
def _ephemeral_ports() -> range:
    """The ports the system hands out for bind(("", 0)) and outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low, high = map(int, fh.read().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A port nothing listens on, on 127.0.0.1 and (where it exists) ::1.

    Picked outside the system's ephemeral range: while the test holds it unbound, no
    outgoing connection or ``bind(0)`` of a test running beside it can take it.
    """
    ephemeral = _ephemeral_ports()
    while True:
        port = random.randrange(20000, 65536)
        if port not in ephemeral and port_is_free(port):
            return port


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nobody listens on."""
    return free_port()


# -- child processes and the command line -------------------------------------------------


def child_env(**extra: str) -> dict[str, str]:
    """The test's environment (private HOME and cache), this checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_child(code: str, *args: str, **env: str) -> str:
    """What ``python -c CODE ARGS`` printed, run from / with child_env(**env); it must succeed."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd="/",
                          env=child_env(**env), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=20)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def cli(*args: str, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run the CLI with the test's environment (private HOME and cache) plus *env*."""
    full = dict(os.environ)
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "py_oidc_auth_client", *args], cwd=REPO,
                          env=full, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def default_store(app_name: str = "py-oidc-auth") -> oac.TokenStore:
    """The store the CLI uses (HOME and XDG_CACHE_HOME are private to the test)."""
    return oac.TokenStore(app_name=app_name)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("oidc-auth: error:")]


# -- the user of a code flow, and a scripted browser ---------------------------------------

PROMPT = r"open this URL in a browser:\s+(\S+)"


@pytest.fixture
def terminal() -> Terminal:
    return Terminal()


@dataclass
class Page:
    status: int
    content_type: str
    body: str


def fetch(url: str) -> Page:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return Page(resp.status, resp.headers.get("Content-Type", ""), resp.read().decode())
    except urllib.error.HTTPError as exc:
        with exc:
            return Page(exc.code, exc.headers.get("Content-Type", ""), exc.read().decode())


def login_location(start: str) -> str:
    """The provider URL behind the client's local start address (one redirect, not followed)."""
    # The entry page is a one-time, unguessable path on 127.0.0.1.
    assert urlsplit(start).hostname == "127.0.0.1" and len(urlsplit(start).path) > 40, start
    conn = http.client.HTTPConnection(urlsplit(start).netloc, timeout=5)
    try:
        conn.request("GET", urlsplit(start).path)
        resp = conn.getresponse()
        assert resp.status == 302, resp.status
        return resp.getheader("Location") or ""
    finally:
        conn.close()


Visit = Callable[[str, str], str]  # (callback URL, state) -> URL to open


class User(threading.Thread):
    """Reads the login URL from the terminal, then opens each visit in turn."""

    def __init__(self, terminal: Terminal, visits: tuple[Visit, ...], delay: float = 0.0):
        super().__init__(daemon=True)
        self.terminal, self.visits, self.delay = terminal, visits, delay
        self.pages: list[Page] = []
        self.location = ""
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            start = self.terminal.wait_for(PROMPT).group(1)
            self.location = login_location(start)
            query = parse_qs(urlsplit(self.location).query)
            state = query["state"][0]
            # The client binds 127.0.0.1; the redirect URI says localhost.
            base = query["redirect_uri"][0].replace("//localhost:", "//127.0.0.1:")
            time.sleep(self.delay)
            for visit in self.visits:
                self.pages.append(fetch(visit(base, state)))
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.join(10)
        assert not self.is_alive()
        if self.error is not None:
            raise self.error


def login(flow: oac.CodeFlow, user: User, **kwargs: Any) -> oac.Token:
    """Run the code flow's login with *user* at the terminal."""
    user.start()
    try:
        with user.terminal:
            return asyncio.run(flow.authenticate(**kwargs))
    finally:
        user.finish()


# A scripted web browser for BROWSER: it logs what it is asked to open; given the
# provider's login page it "approves" and sends the browser back to the client's
# callback, like a provider that remembers the user.  Always exits 0, or
# webbrowser would go on to try the next browser it knows.
BROWSER_SCRIPT = """
import http.client, os, sys, urllib.request
from urllib.parse import parse_qs, urlencode, urlsplit
def resolve(url):
    # The client opens a one-time local entry page that redirects to the provider.
    parts = urlsplit(url)
    if parts.hostname != "127.0.0.1" or parts.path in ("", "/", "/callback"):
        return url
    conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    conn.request("GET", parts.path)
    return conn.getresponse().getheader("Location") or url
url = resolve(sys.argv[1])
with open(os.environ["FAKE_BROWSER_LOG"], "a") as log:
    log.write(url + "\\n")
query = parse_qs(urlsplit(url).query)
if "state" in query:
    callback = query["redirect_uri"][0].replace("//localhost:", "//127.0.0.1:")
    params = urlencode({"code": "abc", "state": query["state"][0]})
    try:
        urllib.request.urlopen(callback + "?" + params, timeout=10).read()
    except Exception as exc:
        with open(os.environ["FAKE_BROWSER_LOG"], "a") as log:
            log.write("error: %r\\n" % (exc,))
"""


class Browser:
    def __init__(self, log: Path) -> None:
        self.log = log

    def opened(self, timeout: float = 5) -> list[str]:
        """The URLs opened so far (waits a little: the browser runs in a thread)."""
        deadline = time.monotonic() + timeout
        while not self.log.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.log.read_text().splitlines() if self.log.exists() else []


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Browser:
    """BROWSER set to the scripted browser: an interactive login is allowed."""
    script = tmp_path / "browser.py"
    script.write_text(BROWSER_SCRIPT)
    log = tmp_path / "browser.log"
    monkeypatch.setenv("BROWSER", f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} %s")
    monkeypatch.setenv("FAKE_BROWSER_LOG", str(log))
    # webbrowser reads BROWSER once per process and caches what it found.
    monkeypatch.setattr(webbrowser, "_tryorder", None, raising=False)
    return Browser(log)
