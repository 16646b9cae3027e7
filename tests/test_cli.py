"""The command line, run as ``python -m py_oidc_auth_client`` in a subprocess."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    DEVICE,
    LOGIN_ALLOWED,
    REPO,
    TOKEN,
    cli,
    default_store,
    error_lines,
    free_port,
    make_jwt,
    oauth_error,
    redirect_to_provider,
    token_answer,
)
from conftest import bare_device_answer as device_answer
from tests import oac


def assert_one_clean_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = error_lines(proc.stderr)
    assert proc.stdout == ""
    return line


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
    # Run as "python -m": usage and examples spell that command (the console script's
    # help says oidc-auth: tests/test_cli_real_use.py).
    assert proc.stdout.startswith("usage: python -m py_oidc_auth_client")
    assert "examples:" in proc.stdout
    assert "URL=https://myapp.example.com" in proc.stdout
    assert ('curl -H "Authorization: Bearer $(python -m py_oidc_auth_client $URL '
            '--access-token)"') in proc.stdout
    assert "python -m py_oidc_auth_client $URL --export ~/job-token.json" in proc.stdout
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
    assert proc.stderr.startswith("usage: python -m py_oidc_auth_client")
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
    assert shown == {"server": fake_server.url,
                     **{k: v for k, v in token.items() if k != "refresh_token"}}
    assert proc.stderr == ""
    proc = cli(fake_server.url, "--json", "--show-secrets")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"server": fake_server.url, **token}
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
    path.write_text(json.dumps({"server": fake_server.url, **token}))
    path.chmod(0o600)
    proc = cli(fake_server.url, "--json", "--show-secrets",
               env={"OIDC_TOKEN_FILE": str(path), "SLURM_JOB_ID": "4242"})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"server": fake_server.url, **token}
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
    assert printed.pop("server") == fake_server.url
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
def test_login_route_and_ports_are_honoured(fake_server, browser):
    fake_server.reply("POST", "/api/v9/device", 404, {"detail": "Not Found"})
    fake_server.reply("GET", "/api/v9/login", 307, redirect_to_provider(fake_server))
    fake_server.reply("POST", "/api/v9/token", 200, token_answer())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken, port = busy.getsockname()[1], free_port()
        proc = cli(fake_server.url, "--json", "-l", "/api/v9/login", "-t", "/api/v9/token",
                   "-d", "/api/v9/device", "-p", str(taken), str(port))
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


# ---------------------------------------------------------------------------
# Outputs for every consumer
# ---------------------------------------------------------------------------


def test_access_token_prints_the_bare_token(fake_server, make_token):
    token = make_token()
    default_store().put(fake_server.url, token)
    proc = cli(fake_server.url, "--access-token")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, token["access_token"] + "\n", "")


def test_header_prints_the_authorization_line(fake_server, make_token):
    token = make_token()
    default_store().put(fake_server.url, token)
    proc = cli(fake_server.url, "--header")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"Authorization: Bearer {token['access_token']}\n"


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None,
                    reason="needs curl and bash")
@pytest.mark.parametrize("how", ["access-token", "header"])
def test_curl_with_the_token(fake_server, make_token, how):
    token = make_token()
    default_store().put(fake_server.url, token)
    fake_server.reply("GET", "/api/data", 200, {"ok": True})
    oidc = f"{shlex.quote(sys.executable)} -m py_oidc_auth_client {fake_server.url}"
    header = (f'"Authorization: Bearer $({oidc} --access-token)"' if how == "access-token"
              else f'"$({oidc} --header)"')
    proc = subprocess.run(["bash", "-c", f"curl -sf -H {header} {fake_server.url}/api/data"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"ok": True}
    (hit,) = fake_server.hits("/api/data")
    assert hit.headers["Authorization"] == f"Bearer {token['access_token']}"


@pytest.mark.parametrize("args", [
    ["--json", "--header"], ["--access-token", "--json"], ["--header", "--access-token"],
])
def test_output_flags_are_mutually_exclusive(fake_server, args):
    proc = cli(fake_server.url, *args)
    assert proc.returncode == 2
    assert "not allowed with argument" in proc.stderr
    assert proc.stdout == ""
    assert fake_server.requests == []


@pytest.mark.parametrize(("args", "says"), [
    (["HOST", "--show-secrets"], "--show-secrets goes with --json"),
    (["--list", "--json"], "--json needs a HOST"),
    (["--list", "--access-token"], "--access-token needs a HOST"),
    (["--export", "x.json"], "--export needs a HOST"),
    (["--min-valid", "60"], "--min-valid needs a HOST"),
    (["--doctor", "--json"], "--doctor goes alone"),
    (["--doctor", "--list"], "--doctor goes alone"),
    (["--logout", "ftp://x"], "http(s) URL"),
    (["HOST", "--min-valid", "soon"], "invalid int value"),
])
def test_usage_errors_exit_2(fake_server, args, says):
    proc = cli(*[fake_server.url if a == "HOST" else a for a in args])
    assert proc.returncode == 2
    assert says in proc.stderr
    assert "Traceback" not in proc.stderr
    assert fake_server.requests == []


def test_list_shows_a_token_without_refresh_token(make_token):
    default_store().put("https://a.example.com", make_token(lifetime=54 * 60 + 30, refresh=""))
    proc = cli("--list")
    assert proc.stdout == "https://a.example.com\taccess valid for 54 min\tno refresh token\n"


# ---------------------------------------------------------------------------
# --logout
# ---------------------------------------------------------------------------


def test_logout_without_revocation_removes_locally_and_says_so(fake_server, make_token):
    default_store().put(fake_server.url, make_token())
    default_store().put("https://other.example.com", make_token())
    proc = cli("--logout", fake_server.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert f"Logged out of {fake_server.url} on this machine only" in proc.stderr
    assert "the server offers no revocation" in proc.stderr
    assert "stays usable until it expires (expires in 59 min)" in proc.stderr
    assert default_store().hosts() == ["https://other.example.com"]
    again = cli("--logout", fake_server.url)
    assert again.returncode == 0
    assert f"No token for {fake_server.url}" in again.stderr


@pytest.mark.parametrize(("outcome", "says"), [
    (True, "the server revoked the token, and it was removed"),
    (False, "the server offers no revocation"),
    ("error", "revoking it at the server failed (revocation endpoint answered 500)"),
])
def test_logout_says_what_the_flows_sign_out_did(fake_server, make_token, monkeypatch,
                                                        capsys, outcome, says):
    token = make_token()
    store = default_store()
    store.put(fake_server.url, token)
    seen: list[Any] = []

    async def _sign_out(self: Any, revoked: Any) -> bool:
        seen.append((self.host, self.config.token_route, revoked))
        if outcome == "error":
            raise oac.AuthError("revocation endpoint answered 500")
        return bool(outcome)

    monkeypatch.setattr(oac.BaseFlow, "_sign_out", _sign_out)
    assert oac.main(["--logout", fake_server.url + "/", "-t", "/custom/token"]) == 0
    assert seen == [(fake_server.url, "/custom/token", token)]
    err = capsys.readouterr().err
    assert says in err
    assert token["access_token"] not in err
    assert store.get(fake_server.url) is None


# ---------------------------------------------------------------------------
# -v / --verbose
# ---------------------------------------------------------------------------


def secret_token(lifetime: int = 3600) -> dict[str, Any]:
    """A token answer whose every secret is long and unguessable."""
    return token_answer(lifetime=lifetime, refresh="rT-" + secrets.token_urlsafe(32),
                        access_token=make_jwt(lifetime, jti=secrets.token_hex(16)))


@pytest.mark.timeout(60)
def test_a_debug_run_leaks_no_secret(fake_server, tmp_path):
    device_code = "Dc-" + secrets.token_urlsafe(24)
    fake_server.reply("POST", DEVICE, 200, {**device_answer(interval=1),
                                            "device_code": device_code})
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    first = secret_token(lifetime=8)
    fake_server.reply("POST", TOKEN, 200, first)
    # A device login, with debug logging.
    login = cli(fake_server.url, "-v", env=LOGIN_ALLOWED)
    assert login.returncode == 0, login.stderr
    debug = [line for line in login.stderr.splitlines() if line.startswith("oidc-auth: DEBUG:")]
    assert any(f"POST {fake_server.url}/auth/v2/device -> 200" in line for line in debug)
    assert any(f"POST {fake_server.url}/auth/v2/token -> 400" in line for line in debug)
    assert any("token store:" in line for line in debug)
    # A refresh, a refusal whose answer echoes the refresh token, an export and a logout.
    time.sleep(max(0.0, first["expires"] - 2 + 0.2 - time.time()))  # margin: 2 to 4 s
    second = secret_token()
    fake_server.routes[("POST", TOKEN)].clear()
    fake_server.reply("POST", TOKEN, 200, second)
    refresh = cli(fake_server.url, "-v", "--export", str(tmp_path / "t.json"))
    assert refresh.returncode == 0, refresh.stderr
    assert "DEBUG: refreshed the token" in refresh.stderr, refresh.stderr
    default_store().put(fake_server.url, {**default_store().get(fake_server.url),
                                          "expires": int(time.time()) - 5})
    fake_server.routes[("POST", TOKEN)].clear()
    fake_server.reply("POST", TOKEN, 400, {"error": "invalid_grant", "error_description":
                                           f"token {second['refresh_token']} is revoked"})
    refused = cli(fake_server.url, "-v", "--timeout", "2",
                  env={**LOGIN_ALLOWED, "SLURM_JOB_ID": "1"})
    assert refused.returncode == 1
    assert "was refused (invalid_grant)" in refused.stderr
    logout = cli("-v", "--logout", fake_server.url)
    everything = "".join(p.stdout + p.stderr for p in (login, refresh, refused, logout))
    for secret in (device_code, first["access_token"], first["refresh_token"],
                   second["access_token"], second["refresh_token"]):
        assert secret not in everything
        for part in secret.split("."):  # not even a piece of a JWT
            assert len(part) < 12 or part not in everything, part


# A program whose log is set up by the command line's -v: what it logs comes out redacted.
LOG_SCRIPT = """
import json, logging, sys
import py_oidc_auth_client as oac
oac.main(["-v", "--list"])
print("--- logged:", file=sys.stderr, flush=True)
log = logging.getLogger("py_oidc_auth_client")
for fmt, args, error in json.loads(sys.argv[1]):
    try:
        if error:
            raise ValueError(error)
        log.debug(fmt, *args)
    except ValueError:
        log.debug(fmt, *args, exc_info=True)
"""


def debug_log(*calls: tuple[str, list[str], str]) -> str:
    """What ``log.debug(fmt, *args)`` writes after ``-v``, raising ValueError(error) first."""
    proc = subprocess.run([sys.executable, "-c", LOG_SCRIPT, json.dumps(calls)], cwd=REPO,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stderr.split("--- logged:\n", 1)[1]


def redacted(text: str) -> str:
    (line,) = debug_log(("%s", [text], "")).splitlines()
    return line.removeprefix("oidc-auth: DEBUG: ")


@pytest.mark.parametrize(("text", "kept"), [
    ("POST https://h.example/auth/v2/token -> 400 (57 bytes)", True),
    ("token store: /tmp/pytest-of-root/pytest-12/test_x0/home/.cache/tokens.json", True),
    ("authorization_pending: polling every 6 s now", True),
    ("interactive login: this is a Slurm batch job", True),
    ("user code ABCD-EFGH", True),
])
def test_redaction_keeps_what_helps(text, kept):
    assert (redacted(text) == text) is kept


@pytest.mark.parametrize("text", [
    "got eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl back",
    "Authorization: Bearer SlAV32hkKG",
    "form refresh_token=abc.def&grant_type=refresh_token",
    '{"refresh_token": "8xLOxBtZp8"}',
    "device-code=GmRhmhcxhwAzkoEqiMEg_DnyEysNkuNhszIySk9eS",
    "opaque 2YotnFZFEjr1zCsicMWpAA in the middle",
    "hex 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "proxy http://user:hunter2@proxy:3128",
    "state=abc|http://localhost:1/callback|verifier-1234",
])
def test_redaction_removes_secrets(text):
    shown = redacted(text)
    assert "[redacted]" in shown
    for secret in ("SlAV32hkKG", "abc.def", "8xLOxBtZp8", "GmRhmhcx", "2YotnFZF", "9f86d0",
                   "hunter2", "verifier-1234", "c2lnbmF0dXJl"):
        assert secret not in shown


def test_redaction_covers_arguments_tracebacks_and_malformed_log_calls():
    logged = debug_log(
        ("sent %s", ["refresh_token=Zz9Yy8Xx7Ww6"],
         "bad token eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln"),
        ("%d tokens: %s", ["many", "refresh_token=Zz9Yy8Xx7Ww6"], ""),
    )
    assert "Zz9Yy8Xx7Ww6" not in logged
    assert "eyJzdWIiOiJ4In0" not in logged
    assert "ValueError: bad token [redacted]" in logged
    assert "oidc-auth: DEBUG: %d tokens: %s\n" in logged  # the call's own text, no arguments


# ---------------------------------------------------------------------------
# --doctor
# ---------------------------------------------------------------------------


def doctor_rows(stdout: str) -> dict[str, str]:
    rows = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(": ")
        rows[key.strip()] = value.strip()
    return rows


def test_doctor_explains_a_plain_machine(make_token):
    store = default_store()
    store.put("https://a.example.com", make_token())
    env = {k: "" for k in ("NO_COLOR", "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE",
                           "CURL_CA_BUNDLE", "NO_PROXY", "no_proxy", "JPY_PARENT_PID")}
    proc = cli("--doctor", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    rows = doctor_rows(proc.stdout)
    assert rows["version"].startswith(f"py_oidc_auth_client {oac.__version__} (")
    assert rows["terminal"].startswith("stdin is not a terminal, stderr is not")
    assert rows["progress"] == "a line on stderr every 30 s"
    assert rows["batch job"] == "no"
    assert rows["ssh session"] == "no"
    assert "container" in rows
    assert rows["jupyter"] == "no"
    assert rows["browser"].startswith("not opened: no display (DISPLAY, WAYLAND_DISPLAY)")
    assert rows["login"].startswith("refused (there is no terminal")
    assert rows["token cache"] == (f"{store.path}: mode 0600, owner-only; its folder "
                                   "mode 0700, owner-only")
    assert rows["token file"] == "OIDC_TOKEN_FILE is not set: tokens come from the cache"
    assert rows["proxies"] == "none (HTTPS_PROXY, HTTP_PROXY and NO_PROXY are not set)"
    assert rows["CA bundle"].startswith("OpenSSL looks in ")


def test_doctor_names_the_ca_file_openssl_reads(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    env = {"SSL_CERT_FILE": str(ca), "SSL_CERT_DIR": "", "REQUESTS_CA_BUNDLE": "",
           "CURL_CA_BUNDLE": ""}
    proc = cli("--doctor", env=env)
    assert proc.returncode == 0, proc.stderr
    # OpenSSL reads SSL_CERT_FILE itself: the row names it, not an empty bundle.
    assert doctor_rows(proc.stdout)["CA bundle"].startswith(
        f"SSL_CERT_FILE={ca}; OpenSSL looks in {ca} and ")


def test_doctor_explains_a_batch_job_and_never_prints_secrets(make_token, tmp_path):
    token = make_token(refresh="refresh-Secret-12345")
    token_file = tmp_path / "job.json"
    token_file.write_text(json.dumps(token))
    token_file.chmod(0o640)
    store = default_store()
    store.put("https://a.example.com", token)
    os.chmod(store.path, 0o644)
    ca = tmp_path / "ca.pem"
    ca.write_text("")
    env = {"SLURM_JOB_ID": "4242", "SSH_CONNECTION": "10.0.0.1 5 10.0.0.2 22",
           "HTTPS_PROXY": "http://alice:s3cret-pass@proxy.example:3128",
           "NO_PROXY": "localhost,.internal", "OIDC_TOKEN_FILE": str(token_file),
           "SSL_CERT_FILE": str(ca), "REQUESTS_CA_BUNDLE": str(tmp_path / "missing.pem"),
           "BROWSER": "firefox", "JPY_PARENT_PID": "77", "APPTAINER_CONTAINER": "/x.sif",
           "NO_COLOR": "1"}
    proc = cli("--doctor", "https://A.example.com/", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = doctor_rows(proc.stdout)
    assert rows["batch job"] == "Slurm"
    assert rows["ssh session"] == "SSH_CONNECTION set"
    assert rows["container"] == "Apptainer (APPTAINER_CONTAINER is set)"
    assert rows["jupyter"] == "no"
    assert rows["browser"] == "opened: BROWSER=firefox is set"
    assert rows["login"].startswith("never: OIDC_TOKEN_FILE is set")
    assert "READABLE BY OTHERS, fix with: chmod go= " + store.path in rows["token cache"]
    assert rows["token file"].startswith(f"OIDC_TOKEN_FILE={token_file}: mode 0640, READABLE")
    assert rows["token file"].endswith("access token valid for 59 min, refresh token valid "
                                       "for 23 h 59 min")
    assert rows["cached token"].startswith("https://a.example.com: access token valid for 59 min")
    # The proxy that a request to the host goes through, without its credentials.
    assert rows["proxies"] == "https via http://proxy.example:3128, NO_PROXY localhost,.internal"
    assert f"SSL_CERT_FILE={ca}" in rows["CA bundle"]
    assert f"REQUESTS_CA_BUNDLE={tmp_path / 'missing.pem'} (MISSING)" in rows["CA bundle"]
    for secret in ("s3cret-pass", "alice", token["access_token"], "refresh-Secret-12345"):
        assert secret not in proc.stdout + proc.stderr
