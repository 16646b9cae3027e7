"""Fixtures for the real-stack tests: oidc-provider (Node) behind a py-oidc-auth app.

Each stack variant (``StackConfig``) gets its own provider + app pair, started on
free 127.0.0.1 ports the first time a test asks for it and reused for the rest of
the session.  Server output goes to private files; a failing test shows what the
servers and the scripted browser wrote while it ran, a passing test shows nothing.

Needs Node.js 20+ with ``npm ci --prefix tests/stack`` done, and the ``stack`` extra
(``pip install -e '.[stack]'``).  Without them the tests are skipped, except when
``CI`` is set: then they fail.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import webbrowser
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from conftest import REPO, child_env, free_port

HERE = Path(__file__).resolve().parent
STACK_DIR = REPO / "tests" / "stack"
PROVIDER = STACK_DIR / "provider.mjs"
APP = STACK_DIR / "app.py"
BROWSER = STACK_DIR / "browser.py"

CLIENT_ID = "py-oidc-auth"
CLIENT_SECRET = "py-oidc-auth-secret"
PUBLIC_CLIENT_ID = "py-oidc-auth-public"

START_DEADLINE = 90.0  # a loaded 2-core machine can take half a minute to start Node
BATCH_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "JOB_ID", "LSB_JOBID", "OAR_JOB_ID")

sys.path.insert(0, str(STACK_DIR))
import human  # noqa: E402  (tests/stack is not a package)

# -- Collection ---------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.hasplugin("timeout"):
        # Without pytest-timeout the marks stay inert; every wait has its own deadline.
        config.addinivalue_line("markers", "timeout(seconds): per-test time limit")
    if not config.pluginmanager.hasplugin("xdist"):
        config.addinivalue_line("markers", "xdist_group(name): run together under xdist")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if HERE in path.parents:
            item.add_marker(pytest.mark.integration)
            # Under pytest-xdist's --dist loadgroup, one worker runs a whole file: each
            # worker starts its own servers, and a file mostly reuses one or two variants.
            item.add_marker(pytest.mark.xdist_group(path.stem))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed or report.when == "teardown":
        return
    for title, path, offset in getattr(item, "_integration_logs", []):
        report.sections.append((title, _read_tail(path, offset)))


def _read_tail(path: Path, offset: int, limit: int = 20000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    text = data.decode("utf-8", "replace")
    if len(text) > limit:
        text = "...\n" + text[-limit:]
    return text or "(nothing)"


def _attach_log(node: Any, title: str, path: Path) -> None:
    offset = path.stat().st_size if path.exists() else 0
    logs = node.__dict__.setdefault("_integration_logs", [])
    if all(p != path for _, p, _ in logs):
        logs.append((title, path, offset))


# -- Requirements -------------------------------------------------------------


def _missing(message: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(message + " (CI is set, so this fails instead of skipping)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def node() -> str:
    path = shutil.which("node")
    if not path:
        _missing(
            "Node.js is not installed: the integration tests run the npm package "
            "oidc-provider. Install Node.js 20 or newer (https://nodejs.org, or "
            "`apt-get install nodejs npm`), then run `npm ci --prefix tests/stack`."
        )
    if not (STACK_DIR / "node_modules" / "oidc-provider").is_dir():
        _missing("oidc-provider is not installed: run `npm ci --prefix tests/stack`.")
    for module in ("py_oidc_auth", "uvicorn", "fastapi", "greenlet"):
        try:
            __import__(module)
        except ImportError:
            _missing(f"Python package {module!r} is missing: run `pip install -e '.[stack]'`.")
    return str(path)


# -- Servers ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """One variant of the provider + app pair."""

    access_ttl: int = 600
    rotate: bool = True
    device: bool = True  # the provider offers the device grant
    app_device_route: bool = True  # the app has its /auth/v2/device route
    slow_down: int = 0
    device_interval: int | None = 1  # None: the provider sends none (app says 5)
    device_ttl: int = 600
    prefix: str = ""
    public: bool = False


class _Server:
    """A child process in its own process group, its output in a private file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], logdir: Path,
                 ready: str, cwd: Path) -> None:
        self.name = name
        self.out = logdir / f"{name}.out"
        self.err = logdir / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(
                argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=err, start_new_session=True,
            )
        self.match = self._wait_ready(re.compile(ready))

    def _wait_ready(self, pattern: re.Pattern) -> re.Match:
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline:
            found = pattern.search(self.out.read_text("utf-8", "replace"))
            if found:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"{self.name} did not start (exit code {self.proc.returncode}):\n"
            + _read_tail(self.out, 0, 4000) + _read_tail(self.err, 0, 4000)
        )

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, AttributeError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, AttributeError):
                self.proc.kill()
            self.proc.wait(timeout=5)


def _opener() -> urllib.request.OpenerDirector:
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def call(method: str, url: str, form: dict[str, str] | None = None,
          headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with _opener().open(req, timeout=15) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, body = err.code, err.read()
    try:
        return status, json.loads(body or b"null")
    except ValueError:
        return status, body.decode("utf-8", "replace")


def client_auth(form: dict[str, str], public: bool) -> dict[str, str]:
    """Authenticate as the app's client: its id in *form* if public, else Basic headers."""
    if public:
        form["client_id"] = PUBLIC_CLIENT_ID
        return {}
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    return {"Authorization": f"Basic {basic}"}


def refresh_at_provider(stack: Stack, refresh_token: str, confidential: bool = False
                        ) -> tuple[int, Any]:
    """Use a refresh token at the provider's token endpoint, as any client would."""
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token}
    headers = client_auth(form, public=not confidential)
    return call("POST", f"{stack.issuer}/token", form, headers)


class Stack:
    """A running provider + app pair and the test-only views into both."""

    def __init__(self, config: StackConfig, node: str, logdir: Path) -> None:
        self.config = config
        self.logdir = logdir
        args = [
            f"--access-ttl={config.access_ttl}",
            f"--rotate={int(config.rotate)}",
            f"--device={int(config.device)}",
            f"--slow-down={config.slow_down}",
            f"--device-ttl={config.device_ttl}",
            f"--device-interval={'' if config.device_interval is None else config.device_interval}",
        ]
        env = dict(os.environ)
        self.provider = _Server("provider", [node, str(PROVIDER), "--port=0", *args], env,
                                logdir, r"oidc-provider ready issuer=(\S+)", STACK_DIR)
        self.issuer = self.provider.match.group(1)
        app_env = dict(
            os.environ,
            APP_PORT="0",
            APP_DISCOVERY_URL=f"{self.issuer}/.well-known/openid-configuration",
            APP_CLIENT_ID=PUBLIC_CLIENT_ID if config.public else CLIENT_ID,
            APP_CLIENT_SECRET="" if config.public else CLIENT_SECRET,
            APP_PREFIX=config.prefix,
            APP_DEVICE_ROUTE="1" if config.app_device_route else "0",
            PYTHONUNBUFFERED="1",
        )
        try:
            self.app = _Server("app", [sys.executable, str(APP)], app_env, logdir,
                               r"py-oidc-auth app ready url=(\S+)", REPO)
        except Exception:
            self.provider.stop()
            raise
        self.url = self.app.match.group(1)  # the app's origin, without the prefix
        self.host = self.url + config.prefix  # where the /auth/v2/* routes live

    # -- routes ------------------------------------------------------------

    @property
    def routes(self) -> dict[str, str]:
        """The client's route arguments for this app, prefix included."""
        p = self.config.prefix
        return {
            "login_route": f"{p}/auth/v2/login",
            "token_route": f"{p}/auth/v2/token",
            "device_route": f"{p}/auth/v2/device",
        }

    def protected(self, token: dict[str, Any]) -> tuple[int, Any]:
        """GET the protected route with the token's own headers."""
        return call("GET", f"{self.host}/protected", headers=dict(token["headers"]))

    def requests(self) -> list[dict[str, Any]]:
        """Every request the app saw since the last reset (test routes excluded)."""
        status, body = call("GET", f"{self.host}/__test/requests")
        assert status == 200, body
        return list(body)

    def reset_requests(self) -> None:
        call("DELETE", f"{self.host}/__test/requests")

    def polls(self, device_code: str | None = None) -> list[dict[str, Any]]:
        """Device-code polls seen by the provider (optionally of one device code)."""
        status, body = call("GET", f"{self.issuer}/__test/polls")
        assert status == 200, body
        if device_code is None:
            return list(body)
        key = hashlib.sha256(device_code.encode()).hexdigest()[:12]
        return [p for p in body if p["device"] == key]

    def revoke(self, token: str, hint: str = "refresh_token") -> None:
        """Revoke a token at the provider's own revocation endpoint."""
        form = {"token": token, "token_type_hint": hint}
        headers = client_auth(form, public=self.config.public)
        status, body = call("POST", f"{self.issuer}/token/revocation", form, headers)
        assert status == 200, (status, body)

    def exchange_code(self, code: str, state: str) -> tuple[int, Any]:
        """Exchange a code at the app as the client would (state = rnd|redirect|verifier)."""
        _, redirect_uri, verifier = state.split("|", 2)
        form = {"code": code, "redirect_uri": redirect_uri, "code_verifier": verifier,
                "grant_type": "authorization_code"}
        return call("POST", f"{self.host}/auth/v2/token", form)

    def stop(self) -> None:
        self.app.stop()
        self.provider.stop()


@pytest.fixture(scope="session")
def stack_factory(
    node: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[StackConfig], Stack]]:
    stacks: dict[StackConfig, Stack] = {}

    def get(config: StackConfig) -> Stack:
        if config not in stacks:
            stacks[config] = Stack(config, node, tmp_path_factory.mktemp("stack"))
        return stacks[config]

    yield get
    for stack in stacks.values():
        stack.stop()


@pytest.fixture
def make_stack(
    stack_factory: Callable[[StackConfig], Stack], request: pytest.FixtureRequest
) -> Callable[..., Stack]:
    """``make_stack(access_ttl=4, ...)``: the running stack of that variant."""

    def make(**options: Any) -> Stack:
        stack = stack_factory(StackConfig(**options))
        stack.reset_requests()  # each test sees only its own requests to the app
        label = ", ".join(f"{k}={v}" for k, v in sorted(options.items())) or "default"
        for server in (stack.provider, stack.app):
            _attach_log(request.node, f"{server.name} stdout [{label}]", server.out)
            _attach_log(request.node, f"{server.name} stderr [{label}]", server.err)
        return stack

    return make


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    return make_stack()


# -- Client side --------------------------------------------------------------


@pytest.fixture(scope="session")
def client_module() -> Any:
    sys.path.insert(0, str(REPO))
    import py_oidc_auth_client

    return py_oidc_auth_client


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client_module: Any) -> Iterator[None]:
    """A private HOME and cache, no batch job, no token file, no browser, no proxy."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / ".cache"))
    for name in (*BATCH_VARIABLES, "OIDC_TOKEN_FILE", "BROWSER", "SSH_CONNECTION", "SSH_CLIENT",
                 "SSH_TTY", "http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY",
                 "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost,::1")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost,::1")
    # webbrowser reads BROWSER once per process and caches the result.
    monkeypatch.setattr(webbrowser, "_tryorder", None, raising=False)
    client_module.BaseFlow.reset_instances()
    stores = getattr(client_module, "_STORES", None)  # the module's default-store cache
    if hasattr(stores, "clear"):
        stores.clear()
    yield
    client_module.BaseFlow.reset_instances()
    if hasattr(stores, "clear"):
        stores.clear()


@pytest.fixture
def store(tmp_path: Path, client_module: Any) -> Any:
    return client_module.TokenStore(tmp_path / "tokens.json")


class Browser:
    """Controls the scripted BROWSER and reads what it did."""

    def __init__(self, log: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.log = log
        self._mp = monkeypatch
        command = f"{shlex.quote(sys.executable)} {shlex.quote(str(BROWSER))} %s"
        monkeypatch.setenv("BROWSER", command)
        monkeypatch.setenv("OIDC_TEST_BROWSER_LOG", str(log))
        self.set()

    @property
    def command(self) -> str:
        return os.environ["BROWSER"]

    def set(self, action: str = "approve", tamper: str = "", user: str = "alice",
            delay: float = 0) -> None:
        self._mp.setenv("OIDC_TEST_BROWSER_ACTION", action)
        self._mp.setenv("OIDC_TEST_BROWSER_TAMPER", tamper)
        self._mp.setenv("OIDC_TEST_BROWSER_USER", user)
        self._mp.setenv("OIDC_TEST_BROWSER_DELAY", str(delay))
        self._mp.setenv("OIDC_TEST_BROWSER_TIMEOUT", "30")

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        items = [json.loads(line) for line in self.log.read_text().splitlines() if line]
        items.sort(key=lambda e: e["t"])
        return [e for e in items if event is None or e["event"] == event]

    def launches(self) -> int:
        return len(self.events("launch"))

    def wait_done(self, count: int = 1, timeout: float = 20) -> list[dict[str, Any]]:
        """Wait until ``count`` browser workers have finished; return all events."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.events("done")) >= count:
                return self.events()
            time.sleep(0.05)
        raise AssertionError(f"browser workers did not finish: {self.events()}")

    def errors(self) -> list[dict[str, Any]]:
        return self.events("error")


@pytest.fixture
def browser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Browser:
    """Set BROWSER to the scripted browser (approving by default)."""
    log = tmp_path / "browser.jsonl"
    log.touch(mode=0o600)
    _attach_log(request.node, "scripted browser", log)
    _attach_log(request.node, "scripted browser stderr", Path(str(log) + ".stderr"))
    return Browser(log, monkeypatch)


@pytest.fixture
def redirect_port() -> int:
    return free_port()


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess]:
    """``run_cli(*args)``: ``python -m py_oidc_auth_client ARGS`` in this test's environment."""

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        env = child_env()  # HOME, XDG_CACHE_HOME, BROWSER... as the fixtures set them
        return subprocess.run(
            [sys.executable, "-m", "py_oidc_auth_client", *args],
            cwd=str(REPO), env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def person() -> Any:
    """The human, as importable functions (``tests/stack/human.py``)."""
    return human


@pytest.fixture
def expire() -> Callable[[dict[str, Any]], None]:
    """``expire(token)``: wait (bounded) until the access token has really expired."""

    def wait(token: dict[str, Any], limit: float = 30) -> None:
        delay = token["expires"] + 0.5 - time.time()
        assert delay <= limit, f"refusing to wait {delay:.0f} s for the token to expire"
        if delay > 0:
            time.sleep(delay)

    return wait
