"""Errors and discovery as real use meets them.

Providers that list some endpoints only in their OAuth document (RFC 8414), the
traceback a plain script shows for an uncaught AuthError (run as a real
subprocess), the status codes AuthError documents, and ``str(AuthError)``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import subprocess
import sys
import time
import webbrowser
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, token_answer
from conftest import free_port as closed_port
from tests import oac

OPENID = "/.well-known/openid-configuration"
OAUTH = "/.well-known/oauth-authorization-server"
CLIENT = "cli"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture(autouse=True)
def no_cached_documents():
    """Documents are kept in memory by URL, and test servers reuse ports."""
    oac._FETCHED.clear()
    yield
    oac._FETCHED.clear()


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BROWSER that opens nothing: an interactive login is allowed."""
    monkeypatch.setenv("BROWSER", f"{shlex.quote(sys.executable)} -c pass %s")
    monkeypatch.setattr(webbrowser, "_tryorder", None, raising=False)


# ---------------------------------------------------------------------------
# 4. Endpoints listed only in the OAuth document
# ---------------------------------------------------------------------------


class Provider:
    """The fake server as a provider whose OpenID document omits two endpoints.

    *path* is the issuer's path ("" or "/realms/x"); *where* says where its OAuth
    document is served: "inserted" (RFC 8414, 3.1), "appended" or "nowhere".
    """

    def __init__(self, fake: Any, path: str = "", where: str = "inserted",
                 oauth_issuer: str | None = None) -> None:
        self.fake, self.issuer = fake, fake.url + path
        base = self.issuer
        self.openid = {
            "issuer": self.issuer,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "jwks_uri": f"{base}/jwks",
            "scopes_supported": ["openid", "offline_access"],
        }
        self.oauth = {
            "issuer": self.issuer if oauth_issuer is None else oauth_issuer,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "device_authorization_endpoint": f"{base}/device",
            "revocation_endpoint": f"{base}/revoke",
        }
        fake.reply("GET", path + OPENID, 200, lambda req: (200, {}, self.openid))
        self.oauth_path = {"inserted": OAUTH + path, "appended": path + OAUTH}.get(where, "")
        if self.oauth_path:
            fake.reply("GET", self.oauth_path, 200, lambda req: (200, {}, self.oauth))
        self.path = path

    def hits(self, route: str) -> list[Any]:
        return self.fake.hits(self.path + route)

    def store_token(self, store: oac.TokenStore) -> oac.Token:
        now = int(time.time())
        token: oac.Token = {
            "access_token": "access-token-1", "token_type": "Bearer", "expires": now + 3600,
            "refresh_token": "refresh-token-1", "refresh_expires": now + 86400,
            "scope": "openid", "headers": {"Authorization": "Bearer access-token-1"}}
        store.put(f"{self.issuer}#client_id={CLIENT}&scope=offline_access+openid", token)
        return token


FORMS = [("", "inserted"), ("/realms/x", "inserted"), ("/realms/x", "appended")]
FORM_IDS = ["no-path", "path-inserted", "path-appended"]


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("path", "where"), FORMS, ids=FORM_IDS)
def test_logout_revokes_at_the_endpoint_of_the_oauth_document(fake_server, tmp_store, path,
                                                              where):
    provider = Provider(fake_server, path, where)
    fake_server.reply("POST", path + "/revoke", 200, b"")
    token = provider.store_token(tmp_store)
    flow = oac.DeviceFlow(provider.issuer, client_id=CLIENT, store=tmp_store, timeout=5)
    run(flow.logout())
    revoked = [r.form for r in provider.hits("/revoke")]
    assert revoked == [
        {"token": token["refresh_token"], "token_type_hint": "refresh_token",
         "client_id": CLIENT},
        {"token": token["access_token"], "token_type_hint": "access_token", "client_id": CLIENT},
    ]
    assert tmp_store.hosts() == []
    # One answer, kept: asking again (a logout asks for end_session_endpoint) costs no request.
    run(flow.logout())
    run(flow.logout())
    assert len(fake_server.hits(provider.oauth_path)) == 1
    assert len(provider.hits(OPENID)) == 1


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("path", "where"), FORMS, ids=FORM_IDS)
def test_authenticate_finds_the_device_flow_in_the_oauth_document(fake_server, tmp_store,
                                                                  browser, path, where):
    provider = Provider(fake_server, path, where)
    fake_server.reply("POST", path + "/device", 200, {
        "device_code": "dev-1", "user_code": "ABCD-EFGH", "interval": 1, "expires_in": 60,
        "verification_uri": "https://idp.example/device"})
    answer = token_answer()
    fake_server.reply("POST", path + "/token", 200, answer)
    token = oac.authenticate(provider.issuer, client_id=CLIENT, store=tmp_store, timeout=10)
    assert token["access_token"] == answer["access_token"]
    (device,) = provider.hits("/device")
    assert device.form["client_id"] == CLIENT
    (poll,) = provider.hits("/token")
    assert poll.form["grant_type"] == "urn:ietf:params:oauth:grant-type:device_code"
    assert provider.hits("/authorize") == []  # no code flow


@pytest.mark.timeout(20)
def test_an_oauth_document_of_another_issuer_is_not_used(fake_server, tmp_store, caplog):
    provider = Provider(fake_server, "/realms/x", "inserted",
                        oauth_issuer="https://elsewhere.example/realms/x")
    fake_server.reply("POST", "/realms/x/revoke", 200, b"")
    fake_server.reply("POST", "/realms/x/device", 200, {})
    provider.store_token(tmp_store)
    flow = oac.DeviceFlow(provider.issuer, client_id=CLIENT, store=tmp_store, timeout=5)
    with caplog.at_level(logging.WARNING, logger="py_oidc_auth_client"):
        run(flow.logout())
    assert provider.hits("/revoke") == []
    assert tmp_store.hosts() == []  # forgotten all the same
    warning = caplog.text
    assert "elsewhere.example" in warning and "names another issuer" in warning
    with pytest.raises(oac.AuthError) as info:
        run(flow.get_device_code())
    assert "device_authorization_endpoint" in info.value.message
    assert provider.hits("/device") == []
    # The appended form was asked too (it is not served): a wrong issuer is one answer.
    assert len(fake_server.hits(OAUTH + "/realms/x")) == 1


@pytest.mark.timeout(20)
def test_endpoints_of_the_oauth_document_are_checked_like_the_others(fake_server, tmp_store):
    provider = Provider(fake_server)
    provider.oauth["revocation_endpoint"] = "javascript:alert(1)"
    flow = oac.DeviceFlow(provider.issuer, client_id=CLIENT, store=tmp_store, timeout=5)
    with pytest.raises(oac.AuthError) as info:
        run(flow.get_device_code())
    assert "revocation_endpoint" in info.value.message
    assert OAUTH in info.value.message
    assert info.value.status_code == 502


@pytest.mark.timeout(20)
def test_the_oauth_document_is_asked_for_only_when_needed(fake_server, tmp_store):
    full = Provider(fake_server)
    full.openid.update(device_authorization_endpoint=f"{full.issuer}/device",
                       revocation_endpoint=f"{full.issuer}/revoke")
    fake_server.reply("POST", "/revoke", 200, b"")
    full.store_token(tmp_store)
    flow = oac.DeviceFlow(full.issuer, client_id=CLIENT, store=tmp_store, timeout=5)
    run(flow.logout())
    assert len(full.hits("/revoke")) == 2  # the endpoint of the OpenID document
    assert fake_server.hits(OAUTH) == []


@pytest.mark.timeout(20)
def test_a_provider_without_an_oauth_document_is_asked_once(fake_server, tmp_store):
    provider = Provider(fake_server, "/realms/x", "nowhere")
    flow = oac.DeviceFlow(provider.issuer, client_id=CLIENT, store=tmp_store, timeout=5)
    for _ in range(3):
        assert run(flow.logout()) is None  # nothing to revoke, no end_session_endpoint
    assert len(fake_server.hits(OAUTH + "/realms/x")) == 1
    assert len(fake_server.hits("/realms/x" + OAUTH)) == 1


# ---------------------------------------------------------------------------
# 11. An uncaught AuthError in a plain script
# ---------------------------------------------------------------------------

SCRIPT = """\
import sys
from py_oidc_auth_client import authenticate


def hook(kind, exc, tb):  # the status code, then Python's own report
    print(getattr(exc, "status_code", None), flush=True)
    sys.__excepthook__(kind, exc, tb)


sys.excepthook = hook
authenticate(sys.argv[1], timeout=2)
"""

ASYNC_SCRIPT = """\
import asyncio, sys
from py_oidc_auth_client import authenticate_async


def hook(kind, exc, tb):
    print(getattr(exc, "status_code", None), flush=True)
    sys.__excepthook__(kind, exc, tb)


sys.excepthook = hook
asyncio.run(authenticate_async(sys.argv[1], timeout=2))
"""


@pytest.fixture
def dripping_server(dripper):
    """Accepts, then drips its answer's status line and headers."""
    dripper.mode = "head"
    return dripper.url


def run_script(tmp_path: Path, host: str, source: str = SCRIPT) -> tuple[str, str, float]:
    script = tmp_path / "login.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OIDC_", "HTTP", "http", "SLURM", "PBS"))}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO), BROWSER=f"{sys.executable} -c pass %s")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script), host], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    return proc.stdout.strip(), proc.stderr, time.monotonic() - started


def assert_one_auth_error(stderr: str) -> str:
    """Exactly one exception, an AuthError by its public name; its last line."""
    assert stderr.count("Traceback (most recent call last)") == 1, stderr
    for chained in ("During handling", "direct cause", "RuntimeError", "_TransientError"):
        assert chained not in stderr, stderr
    last = stderr.rstrip().splitlines()[-1]
    assert last.startswith("py_oidc_auth_client.AuthError: "), stderr
    return last


@pytest.mark.timeout(60)
@pytest.mark.parametrize("source", [SCRIPT, ASYNC_SCRIPT], ids=["sync", "async"])
def test_a_closed_port_is_one_auth_error_503(tmp_path, source):
    status, stderr, _ = run_script(tmp_path, f"http://127.0.0.1:{closed_port()}", source)
    last = assert_one_auth_error(stderr)
    assert status == "503"
    assert "/auth/v2/device: connection refused" in last  # no code flow tried after it


@pytest.mark.timeout(60)
def test_a_dripping_server_is_one_auth_error_504_within_the_timeout(tmp_path, dripping_server):
    status, stderr, took = run_script(tmp_path, dripping_server)
    last = assert_one_auth_error(stderr)
    assert status == "504"
    assert "timed out" in last
    assert took < 2 + 1 + 5  # timeout, grace, interpreter start-up


@pytest.mark.timeout(60)
def test_a_refusing_server_is_one_auth_error_with_its_status_and_words(tmp_path, fake_server):
    fake_server.reply("POST", "/auth/v2/device", 401, {
        "error": "invalid_client", "error_description": "Client authentication failed"})
    status, stderr, _ = run_script(tmp_path, fake_server.url)
    last = assert_one_auth_error(stderr)
    assert status == "401"
    assert "invalid_client: Client authentication failed" in last
    assert last.count("invalid_client") == 1


# ---------------------------------------------------------------------------
# Status codes, as the AuthError docstring lists them
# ---------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_status_codes_say_what_failed(fake_server):
    def status(url: str, **kwargs: Any) -> int:
        with pytest.raises(oac.AuthError) as info:
            run(oac._Session(**kwargs).request("POST", url, form={}))
        assert type(info.value) is oac.AuthError
        return info.value.status_code

    fake_server.reply("POST", "/hang", 200, "__hang__")
    fake_server.reply("POST", "/drop", 200, "__drop__")
    fake_server.reply("POST", "/huge", 200, b"{" + b" " * (oac._MAX_BODY + 8) + b"}")
    assert status(f"http://127.0.0.1:{closed_port()}/t", timeout=2) == 503
    assert status("http://no-such-host.invalid/t", timeout=2, allow_http=True) == 503
    assert status(fake_server.url + "/hang", timeout=0.3) == 504
    assert status(fake_server.url + "/drop", timeout=2) == 502
    assert status(fake_server.url + "/huge", timeout=5) == 502
    assert status("http://example.org/t", timeout=2) == 400  # plain http to another machine
    with oac._TimeLimit(0.01):
        time.sleep(0.02 + oac._LATE_GRACE)
        assert status(fake_server.url + "/t", timeout=2) == 408


def test_a_ca_bundle_that_cannot_be_used_is_bad_input(tmp_path, tmp_store):
    flow = oac.DeviceFlow("https://127.0.0.1:9", ca_bundle=str(tmp_path / "missing.pem"),
                          store=tmp_store, timeout=5)
    with pytest.raises(oac.AuthError) as info:
        run(flow.get_device_code())
    assert info.value.status_code == 400
    assert "missing.pem" in info.value.message


def test_the_docstring_lists_the_codes_used():
    doc = oac.AuthError.__doc__ or ""
    for code in (400, 401, 408, 500, 502, 503, 504):
        assert f"- {code}:" in doc


@pytest.mark.timeout(20)
def test_a_server_that_cannot_be_reached_is_not_taken_for_one_without_device_flow(
        tmp_store, browser):
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(f"http://127.0.0.1:{closed_port()}", store=tmp_store, timeout=5)
    assert info.value.status_code == 503
    assert "/auth/v2/device" in info.value.message  # not the code flow's login route


# ---------------------------------------------------------------------------
# 12. str(AuthError) tells the provider's error
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("message", "detail", "text"), [
    ("token exchange failed", {"error": "invalid_grant"}, "token exchange failed (invalid_grant)"),
    ("token exchange failed", {"error": "invalid_grant", "error_description": "Token expired"},
     "token exchange failed (invalid_grant: Token expired)"),
    ("x answered 400: invalid_grant: Token expired",
     {"error": "invalid_grant", "error_description": "Token expired"},
     "x answered 400: invalid_grant: Token expired"),
    ("x answered 400: invalid_grant", {"error": "invalid_grant", "error_description": "gone"},
     "x answered 400: invalid_grant (gone)"),
    ("went wrong", None, "went wrong"),
    ("went wrong", {"error": "", "error_description": None}, "went wrong"),
    ("denied", {"error": "access_denied\x1b\u202e", "error_description": "a\nb\x07"},
     "denied (access_denied: a b)"),  # printable, on one line
])
def test_str_tells_the_providers_error_once(message, detail, text):
    exc = oac.AuthError(message, detail, 400)
    assert str(exc) == text
    assert exc.message == message  # the attribute is as given
    assert repr(exc) == f"AuthError({message!r})"  # no detail, so nothing it may carry


@pytest.mark.timeout(20)
def test_a_denied_login_prints_the_providers_words(fake_server, tmp_store):
    fake_server.reply("POST", "/auth/v2/token", 400, {
        "error": "access_denied", "error_description": "The user said no"})
    flow = oac.DeviceFlow(fake_server.url, store=tmp_store, timeout=10)
    with pytest.raises(oac.AuthError) as info:
        run(flow.poll("device-code-123456", 1))
    printed = f"Login failed ({info.value.status_code}): {info.value}"
    assert printed.startswith("Login failed (400): ")
    assert printed.endswith(" (access_denied: The user said no)")
    assert "device-code-123456" not in printed + repr(info.value)


@pytest.mark.timeout(60)
def test_the_cli_says_the_providers_error_once(fake_server, tmp_path):
    fake_server.reply("POST", "/auth/v2/device", 400, {
        "error": "invalid_client", "error_description": "Unknown client"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OIDC_", "HTTP", "http"))}
    env.update(HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"),
               PYTHONPATH=str(REPO), BROWSER=f"{sys.executable} -c pass %s")
    proc = subprocess.run([sys.executable, "-m", "py_oidc_auth_client", fake_server.url,
                           "--timeout", "5"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("oidc-auth: error:")]
    assert line.count("invalid_client") == 1
    assert line.count("Unknown client") == 1
