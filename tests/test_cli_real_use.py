"""The command line as people and scripts use it: ``--client-id`` with every host action,
prompts that name the server, how long a login may take, hints that spell the command
that ran, an empty ``--list``, and the demo's token summary.

Each test runs the real command line in a subprocess against a local HTTP server.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    DEVICE,
    LOGIN,
    LOGIN_ALLOWED,
    REPO,
    TOKEN,
    device_answer,
    oauth_error,
    redirect_to_provider,
    token_answer,
)
from tests import demo, oac

CLIENT = "cli-client"


def run(argv: list[str], env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(argv, cwd=REPO, env=full, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def module_cli(*args: str, env: dict[str, str] | None = None,
               timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``python -m py_oidc_auth_client ARGS``."""
    return run([sys.executable, "-m", "py_oidc_auth_client", *args], env, timeout)


def script_cli(*args: str, env: dict[str, str] | None = None,
               prelude: str = "") -> subprocess.CompletedProcess[str]:
    """``oidc-auth ARGS``, as the console script pip installs runs it."""
    code = ("import sys, py_oidc_auth_client as oac; sys.argv[0] = '/usr/local/bin/oidc-auth'; "
            f"{prelude}sys.exit(oac.main(sys.argv[1:]))")
    return run([sys.executable, "-c", code, *args], env)


def provider(fake_server: Any, revocation: bool = True, device: bool = True) -> str:
    """Make the fake server a standard OpenID provider; return its issuer URL."""
    url = fake_server.url
    meta = {"issuer": url, "authorization_endpoint": f"{url}/authorize",
            "token_endpoint": f"{url}/token", "jwks_uri": f"{url}/jwks",
            "response_types_supported": ["code"], "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256"]}
    if revocation:
        meta["revocation_endpoint"] = f"{url}/revoke"
    if device:
        meta["device_authorization_endpoint"] = f"{url}/device"
    fake_server.reply("GET", "/.well-known/openid-configuration", 200, meta)
    fake_server.reply("POST", "/revoke", 200, {})
    return str(url)


def rfc_token(lifetime: int = 3600, refresh: str = "provider-refresh") -> dict[str, Any]:
    """A token answer in the RFC 6749 form (relative lifetimes)."""
    return {"access_token": f"provider-access-{time.monotonic_ns()}", "token_type": "Bearer",
            "expires_in": lifetime, "refresh_token": refresh, "scope": "openid offline_access"}


def client_key(issuer: str, scopes: str = "offline_access openid") -> str:
    """The store key of CLIENT's tokens (sorted scopes), as --list shows it."""
    return f"{issuer}#client_id={CLIENT}&scope={scopes.replace(' ', '+')}"


def cache_for_client(issuer: str, make_token: Any, **lifetimes: int) -> str:
    key = client_key(issuer)
    oac.TokenStore(app_name="py-oidc-auth").put(key, make_token(**lifetimes))
    return key


# ---------------------------------------------------------------------------
# 7. Every action that takes a host works with --client-id / --scope
# ---------------------------------------------------------------------------


def test_logout_with_client_id_revokes_and_forgets(fake_server, make_token):
    issuer = provider(fake_server)
    cache_for_client(issuer, make_token)
    done = module_cli("--logout", issuer, "--client-id", CLIENT)
    assert done.returncode == 0, done.stderr
    assert "#client_id" not in done.stderr
    assert f"Logged out of {issuer} (client {CLIENT}): the server revoked" in done.stderr
    revoked = fake_server.hits("/revoke")
    assert [r.form["token_type_hint"] for r in revoked] == ["refresh_token", "access_token"]
    assert {r.form["client_id"] for r in revoked} == {CLIENT}
    assert oac.TokenStore(app_name="py-oidc-auth").hosts() == []


def test_logout_of_a_listed_key_and_with_scopes(fake_server, make_token):
    issuer = provider(fake_server)
    store = oac.TokenStore(app_name="py-oidc-auth")
    scoped = client_key(issuer, "openid profile")
    store.put(scoped, make_token())
    store.put(client_key(issuer), make_token())
    done = module_cli("--logout", issuer, "--client-id", CLIENT, "--scope", "profile openid")
    assert done.returncode == 0, done.stderr
    assert store.hosts() == [client_key(issuer)]  # only that login went
    (listed,) = shlex.split(module_cli("--list").stdout.split("\t")[0])  # as it is pasted
    done = module_cli("--logout", listed)
    assert done.returncode == 0, done.stderr
    assert store.hosts() == []
    assert len(fake_server.hits("/revoke")) == 4


def test_min_valid_refresh_and_advice_with_client_id(fake_server, make_token):
    issuer = provider(fake_server)
    cache_for_client(issuer, make_token, lifetime=-10, refresh_lifetime=3600)
    fake_server.reply("POST", "/token", 200, rfc_token(lifetime=600))
    done = module_cli(issuer, "--client-id", CLIENT, "--access-token", "--min-valid", "300")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("provider-access-")
    (refresh,) = fake_server.hits("/token")
    assert refresh.form["grant_type"] == "refresh_token"
    assert refresh.form["client_id"] == CLIENT
    # Too short even after a refresh: the advice names the client, as a command to paste.
    fake_server.reply("POST", "/token", 200, rfc_token(lifetime=600))
    short = module_cli(issuer, "--client-id", CLIENT, "--access-token", "--min-valid", "7200")
    assert short.returncode == 3, short.stderr
    assert f"the access token for {issuer} (client {CLIENT}) expires in" in short.stderr
    assert (f"(python -m py_oidc_auth_client {issuer} --client-id {CLIENT} --access-token)"
            in short.stderr)


def test_export_json_header_and_doctor_with_client_id(fake_server, make_token, tmp_path):
    issuer = provider(fake_server)
    key = cache_for_client(issuer, make_token)
    target = tmp_path / "job.json"
    done = module_cli(issuer, "--client-id", CLIENT, "--export", str(target))
    assert done.returncode == 0, done.stderr
    assert f"Wrote the token for {issuer} (client {CLIENT}) to {target}" in done.stderr
    assert json.loads(target.read_text())["server"] == key
    shown = module_cli(issuer, "--client-id", CLIENT, "--json")
    assert json.loads(shown.stdout)["server"] == key
    header = module_cli(issuer, "--client-id", CLIENT, "--header")
    assert header.stdout.startswith("Authorization: Bearer ")
    summary = module_cli(issuer, "--client-id", CLIENT)
    assert summary.stdout.startswith(f"Logged in to {issuer} (client {CLIENT}): access token")
    doctor = module_cli("--doctor", issuer, "--client-id", CLIENT)
    assert doctor.returncode == 0, doctor.stderr
    assert f"cached token: {key}: access token valid for" in " ".join(doctor.stdout.split())
    assert fake_server.hits("/token") == []  # all from the cache


# ---------------------------------------------------------------------------
# 9. Prompts name the server, never the store key
# ---------------------------------------------------------------------------


def test_device_prompt_names_the_issuer_and_the_client(fake_server):
    issuer = provider(fake_server)
    fake_server.reply("POST", "/device", 200, device_answer(interval=1))
    fake_server.reply("POST", "/token", 200, rfc_token())
    done = module_cli(issuer, "--client-id", CLIENT, "--scope", "openid", "--json",
                      env=LOGIN_ALLOWED)
    assert done.returncode == 0, done.stderr
    assert f"To log in to {issuer} (client {CLIENT}), open" in done.stderr
    assert "#client_id" not in done.stderr and "&scope" not in done.stderr


# A browser that follows the one-time entry page to the provider, where the person
# declines: it is sent back to the callback with error=access_denied.
DECLINING_BROWSER = """
import http.client, sys, urllib.request
from urllib.parse import parse_qs, urlencode, urlsplit
entry = urlsplit(sys.argv[1])
conn = http.client.HTTPConnection(entry.netloc, timeout=10)
conn.request("GET", entry.path)
query = parse_qs(urlsplit(conn.getresponse().getheader("Location")).query)
back = urlencode({"error": "access_denied", "state": query["state"][0]})
try:
    urllib.request.urlopen(query["redirect_uri"][0] + "?" + back, timeout=10).read()
except Exception:
    pass
"""


@pytest.mark.timeout(30)
def test_code_flow_prompt_and_error_name_the_issuer_and_the_client(fake_server, tmp_path):
    issuer = provider(fake_server, device=False)
    script = tmp_path / "browser.py"
    script.write_text(DECLINING_BROWSER)
    done = module_cli(issuer, "--client-id", CLIENT, "--timeout", "20",
                      env={"BROWSER": f"{sys.executable} {script} %s"})
    assert done.returncode == 1, done.stderr
    assert f"To log in to {issuer} (client {CLIENT}) within 20 s, open" in done.stderr
    assert (f"oidc-auth: error: The login to {issuer} (client {CLIENT}) failed: access_denied"
            in done.stderr)
    assert "#client_id" not in done.stderr


# ---------------------------------------------------------------------------
# 8. The command line waits as long as a person needs; the API keeps 30 s
# ---------------------------------------------------------------------------


def test_api_default_timeout_stays_30_s():
    for function in (oac.authenticate, oac.authenticate_async):
        assert inspect.signature(function).parameters["timeout"].default == 30
    assert oac.CodeFlow("https://api.example.com", timeout=None).timeout is None


@pytest.mark.timeout(30)
def test_device_login_ended_by_timeout_names_the_option(fake_server):
    # How long the device flow waits by default: tests/test_terminal.py and the stack test.
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1, expires_in=600))
    fake_server.reply("POST", TOKEN, 400, oauth_error("authorization_pending"))
    start = time.monotonic()
    limited = module_cli(fake_server.url, "--timeout", "2", env=LOGIN_ALLOWED)
    assert 1.5 <= time.monotonic() - start < 8
    (line,) = [x for x in limited.stderr.splitlines() if x.startswith("oidc-auth: error:")]
    assert "--timeout SECONDS" in line, limited.stderr


@pytest.mark.timeout(30)
def test_browser_login_waits_a_few_minutes_and_names_timeout(fake_server):
    # No device flow: the code flow. Its default wait is _CLI_CODE_FLOW_WAIT (5 min),
    # shortened here to 2 s so that the test does not wait for it.
    fake_server.reply("POST", DEVICE, 404, {"detail": "Not Found"})
    fake_server.reply("GET", LOGIN, 307, redirect_to_provider(fake_server))
    assert oac._CLI_CODE_FLOW_WAIT == 300
    start = time.monotonic()
    done = script_cli(fake_server.url, env=LOGIN_ALLOWED,
                      prelude="oac._CLI_CODE_FLOW_WAIT = 2; ")
    assert 1.5 <= time.monotonic() - start < 10
    assert done.returncode == 1, done.stderr
    assert f"To log in to {fake_server.url} within 2 s, open this URL" in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("oidc-auth: error:")]
    assert "2 s" in line and "--timeout SECONDS" in line, line
    # The real default, announced in the prompt: the run is interrupted once it is shown.
    proc = subprocess.Popen([sys.executable, "-m", "py_oidc_auth_client", fake_server.url],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO),
                                           **LOGIN_ALLOWED},
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
    assert first.startswith(f"To log in to {fake_server.url} within 5 min, open"), first


# ---------------------------------------------------------------------------
# 10. An empty --list says so; hints spell the command that ran
# ---------------------------------------------------------------------------


def test_empty_list_says_so_on_stderr_and_keeps_stdout_empty():
    done = module_cli("--list")
    assert (done.returncode, done.stdout) == (0, "")
    assert "No cached tokens in " in done.stderr


@pytest.mark.parametrize("runner, command", [(module_cli, "python -m py_oidc_auth_client"),
                                             (script_cli, "oidc-auth")])
def test_hints_spell_the_command_that_ran(runner, command, fake_server, make_token):
    usage = runner()
    assert usage.returncode == 2
    assert usage.stderr.startswith(f"usage: {command} ")
    helped = runner("--help")
    assert f'curl -H "$({command} $URL --header)" $URL/api/data' in helped.stdout
    # --min-valid's advice.
    oac.TokenStore(app_name="py-oidc-auth").put(fake_server.url,
                                                make_token(lifetime=60, refresh=""))
    short = runner(fake_server.url, "--min-valid", "3600")
    assert short.returncode == 3
    assert f"log in again: {command} {fake_server.url} --force" in short.stderr
    # A batch job without a token.
    job = runner("https://other.example.com", env={"SLURM_JOB_ID": "1"})
    assert job.returncode == 1
    assert f"Log in once on a workstation ({command} https://other.example.com)" in job.stderr
    # A token file made for another server.
    target = Path(os.environ["HOME"]) / "token.json"
    assert runner(fake_server.url, "--export", str(target)).returncode == 0
    foreign = runner("https://other.example.com", env={"OIDC_TOKEN_FILE": str(target)})
    assert f"{command} https://other.example.com --export FILE" in foreign.stderr


# ---------------------------------------------------------------------------
# 13. The demo's summary tells where the refresh token is
# ---------------------------------------------------------------------------


def test_demo_summary_says_the_refresh_token_is_kept_in_the_store(fake_server):
    cache = Path(os.environ["XDG_CACHE_HOME"])
    now = int(time.time())
    fake_server.reply("POST", DEVICE, 200, device_answer(interval=1))
    fake_server.reply("POST", TOKEN, 200, token_answer(refresh_lifetime=30 * 86400))
    env = {**os.environ, **LOGIN_ALLOWED, "XDG_CACHE_HOME": str(cache)}
    done = module_cli(fake_server.url, "--json", "--app-name", demo.APP_NAME, env=env)
    assert done.returncode == 0, done.stderr
    token = json.loads(done.stdout)
    assert "refresh_token" not in token  # what the demo gets: --json leaves it out
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        demo._summarise(token, demo._refresh_in_store(fake_server.url,
                                                      {**env, "PYTHONPATH": str(REPO)}))
    text = out.getvalue()
    assert "refresh_token  kept in the store, valid for 29 d 23 h" in text, text
    assert "none" not in text
    assert token["expires"] > now
