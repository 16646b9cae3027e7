"""The command line, run as ``python -m py_oidc_auth_client`` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from itertools import count
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlencode

import pytest

from conftest import make_jwt, token_answer
from tests import oac

REPO = Path(__file__).resolve().parents[1]
LOGIN, DEVICE, TOKEN = "/auth/v2/login", "/auth/v2/device", "/auth/v2/token"

# A scripted browser: given the provider's login page (a URL with a state), it
# sends the browser back to the client's callback with a code.  Exits 0 always.
BROWSER_SCRIPT = """
import http.client, sys, urllib.request
from urllib.parse import parse_qs, urlencode, urlsplit
def resolve(url):
    # The client opens a local start address that redirects to the provider.
    parts = urlsplit(url)
    if parts.hostname != "127.0.0.1" or parts.path != "/":
        return url
    conn = http.client.HTTPConnection(parts.netloc, timeout=10)
    conn.request("GET", "/")
    return conn.getresponse().getheader("Location") or url
query = parse_qs(urlsplit(resolve(sys.argv[1])).query)
if "state" in query:
    callback = query["redirect_uri"][0].replace("//localhost:", "//127.0.0.1:")
    params = urlencode({"code": "abc", "state": query["state"][0]})
    try:
        urllib.request.urlopen(callback + "?" + params, timeout=10).read()
    except Exception:
        pass
"""


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


def assert_one_clean_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert proc.stdout == ""
    return line


def device_answer(interval: int = 1) -> dict[str, Any]:
    return {"device_code": "dev-123", "user_code": "ABCD-EFGH",
            "verification_uri": "https://idp.example/device", "expires_in": 600,
            "interval": interval}


def oauth_error(error: str) -> dict[str, Any]:
    return {"detail": "Upstream OIDC error: " + json.dumps({"error": error})}


_STATES = count()


def redirect_to_provider(fake: Any) -> Callable[..., Any]:
    def answer(req: Any) -> tuple[int, dict[str, str], bytes]:
        redirect_uri = req.query["redirect_uri"]
        state = f"rnd{next(_STATES)}|{redirect_uri}|verifier123"
        query = urlencode({"client_id": "cli", "redirect_uri": redirect_uri, "state": state})
        return 307, {"Location": f"{fake.url}/authorize?{query}"}, b""

    return answer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# A login may start: webbrowser runs `true URL`, which does nothing.
LOGIN_ALLOWED = {"BROWSER": "true"}


# ---------------------------------------------------------------------------
# Usage
# ---------------------------------------------------------------------------


def test_version():
    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"oidc-auth {oac.__version__}"


def test_help_shows_examples():
    proc = cli("--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith("usage: oidc-auth")
    assert "examples:" in proc.stdout
    assert "URL=https://myapp.example.com" in proc.stdout
    assert 'curl -H "Authorization: Bearer $(oidc-auth $URL --access-token)"' in proc.stdout
    assert "oidc-auth $URL --export ~/job-token.json" in proc.stdout
    for option in ("--timeout", "--force", "--json", "--list", "--clear", "--remove",
                   "--app-name", "--login-route", "--token-route", "--device-route", "--ports",
                   "--access-token", "--header", "--show-secrets", "--export", "--min-valid",
                   "--logout", "--doctor", "--verbose", "--version"):
        assert option in proc.stdout
    codes = proc.stdout.split("exit codes:")[1].split("\n\n")[0]
    assert [line.split()[0] for line in codes.strip().splitlines()] == [
        "0", "1", "2", "3", "130"]


def test_no_arguments_is_a_usage_error():
    proc = cli()
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("usage: oidc-auth")
    assert "give a HOST" in proc.stderr


@pytest.mark.parametrize("args", [["ftp://x"], ["--remove", "ftp://x"], ["not a url"]])
def test_a_bad_host_is_a_usage_error(fake_server, args):
    proc = cli(*args, env=LOGIN_ALLOWED)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "http(s) URL" in proc.stderr
    assert "https://myapp.example.com" in proc.stderr  # says what a host looks like
    assert fake_server.requests == []


def test_negative_timeout_is_a_usage_error(fake_server):
    proc = cli(fake_server.url, "--timeout", "-1")
    assert proc.returncode == 2
    assert "--timeout" in proc.stderr
    assert fake_server.requests == []


# ---------------------------------------------------------------------------
# The cache: --list, --remove, --clear, cached tokens
# ---------------------------------------------------------------------------


def test_list_shows_hosts_and_validity(make_token):
    store = default_store()
    store.put("https://a.example.com", make_token(lifetime=7200, refresh_lifetime=3 * 86400))
    store.put("https://b.example.com/", make_token(lifetime=-10, refresh_lifetime=3 * 86400))
    proc = cli("--list")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2
    a, b = lines
    assert a.startswith("https://a.example.com\t")
    assert "access valid for 1 h 59 min" in a
    assert "refresh valid for 2 d 23 h" in a
    assert b.startswith("https://b.example.com\t")
    assert re.search(r"\taccess expired 1\d s ago\t", b), b
    assert "refresh valid for 2 d 23 h" in b


def test_list_of_an_empty_cache_prints_nothing():
    proc = cli("--list")
    assert (proc.returncode, proc.stdout) == (0, "")


def test_remove_one_host(make_token):
    store = default_store()
    store.put("https://a.example.com", make_token())
    store.put("https://b.example.com", make_token())
    proc = cli("--remove", "HTTPS://A.example.com/")
    assert proc.returncode == 0, proc.stderr
    assert "Removed https://a.example.com" in proc.stderr
    assert proc.stdout == ""
    assert default_store().hosts() == ["https://b.example.com"]
    proc = cli("--remove", "https://a.example.com")
    assert proc.returncode == 0
    assert "No token for https://a.example.com" in proc.stderr


def test_clear_removes_everything(make_token):
    store = default_store()
    store.put("https://a.example.com", make_token())
    store.put("https://b.example.com", make_token())
    proc = cli("--clear")
    assert proc.returncode == 0, proc.stderr
    assert store.path in proc.stderr
    assert default_store().hosts() == []


def test_json_with_a_cached_token_prints_only_json(fake_server, make_token):
    token = make_token(refresh="refresh-secret-123")
    default_store().put(fake_server.url, token)
    proc = cli(fake_server.url, "--json")
    assert proc.returncode == 0, proc.stderr
    shown = json.loads(proc.stdout)
    assert "refresh_token" not in shown  # --json alone keeps the refresh token private
    assert "refresh-secret-123" not in proc.stdout + proc.stderr
    assert shown == {k: v for k, v in token.items() if k != "refresh_token"}
    assert proc.stderr == ""
    proc = cli(fake_server.url, "--json", "--show-secrets")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == token
    assert fake_server.requests == []


def test_without_json_a_summary_is_printed(fake_server, make_token):
    token = make_token()
    default_store().put(fake_server.url, token)
    proc = cli(fake_server.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"Logged in to {fake_server.url}: access token valid for")
    assert token["access_token"] not in proc.stdout + proc.stderr
    assert fake_server.requests == []


def test_token_file_in_a_batch_job(fake_server, make_token, tmp_path):
    token = make_token()
    path = tmp_path / "token.json"
    path.write_text(json.dumps(token))
    path.chmod(0o600)
    proc = cli(fake_server.url, "--json", "--show-secrets",
               env={"OIDC_TOKEN_FILE": str(path), "SLURM_JOB_ID": "4242"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == token
    assert fake_server.requests == []


# ---------------------------------------------------------------------------
# Logins and their options
# ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_device_login_prints_json_and_saves_the_token(fake_server):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    answer = token_answer()
    fake_server.reply("POST", TOKEN, 200, answer)
    proc = cli(fake_server.url, "--json", "--show-secrets", env=LOGIN_ALLOWED)
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    assert printed["access_token"] == answer["access_token"]
    assert "ABCD-EFGH" in proc.stderr
    assert default_store().get(fake_server.url) == printed


@pytest.mark.timeout(30)
def test_force_logs_in_despite_a_cached_token(fake_server, make_token):
    cached = make_token()
    default_store().put(fake_server.url, cached)
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    answer = token_answer(access_token=make_jwt(3600, jti="fresh"))
    fake_server.reply("POST", TOKEN, 200, answer)
    proc = cli(fake_server.url, "--json", "--force", env=LOGIN_ALLOWED)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["access_token"] == answer["access_token"]
    assert len(fake_server.hits(DEVICE)) == 1
    # Without --force the cached token is used.
    before = len(fake_server.requests)
    proc = cli(fake_server.url, "--json", env=LOGIN_ALLOWED)
    assert json.loads(proc.stdout)["access_token"] == answer["access_token"]
    assert len(fake_server.requests) == before


@pytest.mark.timeout(30)
def test_timeout_is_honoured(fake_server):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    start = time.monotonic()
    proc = cli(fake_server.url, "--timeout", "2", env=LOGIN_ALLOWED)
    elapsed = time.monotonic() - start
    assert 1.5 <= elapsed < 6, elapsed
    line = assert_one_clean_error(proc)
    assert "Gave up waiting" in line


@pytest.mark.timeout(30)
def test_app_name_changes_the_store(fake_server, tmp_path):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 200, token_answer())
    proc = cli(fake_server.url, "--app-name", "my-project", env=LOGIN_ALLOWED)
    assert proc.returncode == 0, proc.stderr
    cache = Path(os.environ["XDG_CACHE_HOME"])
    assert (cache / "my-project" / "token-store.json").exists()
    assert not (cache / "py-oidc-auth" / "token-store.json").exists()
    assert default_store("my-project").hosts() == [fake_server.url]
    listed = cli("--list", "--app-name", "my-project")
    assert listed.stdout.startswith(fake_server.url + "\t")
    assert cli("--list").stdout == ""


@pytest.mark.timeout(30)
def test_device_and_token_routes_are_honoured(fake_server):
    fake_server.reply("POST", "/api/v9/device", 200, device_answer(interval=1))
    fake_server.reply("POST", "/api/v9/token", 200, token_answer())
    proc = cli(fake_server.url, "--json", "-d", "/api/v9/device", "-t", "/api/v9/token",
               env=LOGIN_ALLOWED)
    assert proc.returncode == 0, proc.stderr
    assert [r.path for r in fake_server.requests] == ["/api/v9/device", "/api/v9/token"]


@pytest.mark.timeout(40)
def test_login_route_and_ports_are_honoured(fake_server, tmp_path):
    script = tmp_path / "browser.py"
    script.write_text(BROWSER_SCRIPT)
    browser = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} %s"
    fake_server.reply("POST", "/api/v9/device", 404, {"detail": "Not Found"})
    fake_server.reply("GET", "/api/v9/login", 307, redirect_to_provider(fake_server))
    fake_server.reply("POST", "/api/v9/token", 200, token_answer())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken, port = busy.getsockname()[1], free_port()
        proc = cli(fake_server.url, "--json", "-l", "/api/v9/login", "-t", "/api/v9/token",
                   "-d", "/api/v9/device", "-p", str(taken), str(port),
                   env={"BROWSER": browser})
    assert proc.returncode == 0, proc.stderr
    assert [r.path for r in fake_server.requests] == [
        "/api/v9/device", "/api/v9/login", "/api/v9/token"]
    redirect_uri = f"http://localhost:{port}/callback"
    assert fake_server.hits("/api/v9/login")[0].query["redirect_uri"] == redirect_uri
    form = fake_server.hits("/api/v9/token")[0].form
    assert (form["code"], form["redirect_uri"], form["code_verifier"]) == (
        "abc", redirect_uri, "verifier123")
    assert json.loads(proc.stdout)["access_token"]


# ---------------------------------------------------------------------------
# Failures: one clean line, exit 1
# ---------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_denied_login_is_one_clean_error_line(fake_server):
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 400, oauth_error("access_denied"))
    proc = cli(fake_server.url, "--json", env=LOGIN_ALLOWED)
    line = assert_one_clean_error(proc)
    assert "denied" in line
    assert fake_server.url in line


@pytest.mark.timeout(40)
def test_unreachable_host_is_one_clean_error_line():
    host = f"http://127.0.0.1:{free_port()}"
    proc = cli(host, "--json", env=LOGIN_ALLOWED)
    line = assert_one_clean_error(proc)
    assert "127.0.0.1" in line
    assert "refused" in line


@pytest.mark.timeout(20)
def test_batch_job_without_a_token_fails_quickly(fake_server):
    start = time.monotonic()
    proc = cli(fake_server.url, "--json", env={"SLURM_JOB_ID": "4242", **LOGIN_ALLOWED})
    assert time.monotonic() - start < 5
    line = assert_one_clean_error(proc)
    assert "Slurm" in line
    assert "OIDC_TOKEN_FILE" in line
    assert fake_server.requests == []


@pytest.mark.parametrize("args", [["--list"], ["--clear"], ["HOST"]])
def test_unusable_cache_directory_is_one_clean_error_line(fake_server, tmp_path, args):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    args = [fake_server.url if a == "HOST" else a for a in args]
    proc = cli(*args, env={"XDG_CACHE_HOME": str(blocker), **LOGIN_ALLOWED})
    line = assert_one_clean_error(proc)
    assert str(blocker) in line
