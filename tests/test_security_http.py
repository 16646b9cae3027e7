"""HTTP transport attacks, performed for real: redirects that would carry secrets away,
servers that drip their answers, plain http to another machine."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import ThreadingHTTPServer

import pytest

from conftest import FakeServer, _handler, device_answer, oauth_error, token_answer
from tests import oac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFRESH = "rt-SECRET-7d41c9a0e3"
SECRET = "cs-SECRET-b25e8f61d4"


def run(coro):
    return asyncio.run(coro)


def serve(fake: FakeServer, address: str = "127.0.0.1"):
    """Run a scripted, recording FakeServer on *address*; returns the server."""
    server = ThreadingHTTPServer((address, 0), _handler(fake))
    server.daemon_threads = True
    fake.url = f"http://{address}:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server


@pytest.fixture
def elsewhere():
    """A second real server (another port: another origin) that records what reaches it."""
    fake = FakeServer()
    server = serve(fake)
    fake.reply("POST", "/token", 200, token_answer())
    fake.reply("GET", "/.well-known/openid-configuration", 200, {"issuer": "evil"})
    yield fake
    server.shutdown()
    server.server_close()


def expired_token(store: oac.TokenStore, host: str) -> None:
    """An expired access token with a valid refresh token: the next call refreshes."""
    now = int(time.time())
    store.put(oac._store_key(host), oac.Token(
        access_token="old-access", token_type="Bearer", expires=now - 100, refresh_token=REFRESH,
        refresh_expires=now + 86400, scope="openid",
        headers={"Authorization": "Bearer old-access"}))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# -- 4. credentials never follow a redirect ---------------------------------------------


@pytest.mark.timeout(20)
@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_post_with_credentials_does_not_follow_a_redirect(fake_server, elsewhere, status):
    fake_server.reply("POST", "/token", status, b"", {"Location": elsewhere.url + "/token"})
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).post_form(fake_server.url + "/token",
                                      {"refresh-token": REFRESH}, auth=("cli", SECRET)))
    assert elsewhere.requests == []
    message = info.value.message
    assert "redirect" in message
    assert str(status) in message and elsewhere.url in message and "/token" in message
    assert REFRESH not in message and SECRET not in message


@pytest.mark.timeout(20)
@pytest.mark.parametrize("status", [302, 307])
def test_refresh_is_not_carried_to_another_origin(fake_server, elsewhere, tmp_store, status):
    """A py-oidc-auth token route that redirects: the refresh token stays home."""
    fake_server.reply("POST", "/auth/v2/token", status, b"",
                      {"Location": elsewhere.url + "/token"})
    expired_token(tmp_store, fake_server.url)
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(fake_server.url, store=tmp_store, timeout=5)
    assert elsewhere.requests == []
    assert len(fake_server.hits("/auth/v2/token")) == 1  # refused, not retried
    assert "redirect" in info.value.message
    assert REFRESH not in info.value.message


@pytest.mark.timeout(20)
def test_client_secret_is_not_carried_to_another_origin(fake_server, elsewhere, tmp_store):
    """A standard provider whose token endpoint redirects: no Basic header travels on."""
    issuer = fake_server.url
    fake_server.reply("GET", "/.well-known/openid-configuration", 200, {
        "issuer": issuer, "authorization_endpoint": issuer + "/authorize",
        "token_endpoint": issuer + "/token"})
    fake_server.reply("POST", "/token", 307, b"", {"Location": elsewhere.url + "/token"})
    flow = oac.DeviceFlow(issuer, client_id="cli", client_secret=SECRET, store=tmp_store,
                          timeout=5)
    with pytest.raises(oac.AuthError) as info:
        run(flow.refresh(REFRESH))
    assert fake_server.hits("/token")[0].headers["Authorization"] == basic("cli", SECRET)
    assert elsewhere.requests == []
    assert "redirect" in info.value.message
    assert SECRET not in info.value.message and REFRESH not in info.value.message


@pytest.mark.timeout(20)
def test_discovery_does_not_follow_a_downgrade_to_http(tls_server, elsewhere):
    url = tls_server.url + "/.well-known/openid-configuration"
    tls_server.reply("GET", "/.well-known/openid-configuration", 302, b"",
                     {"Location": elsewhere.url + "/.well-known/openid-configuration"})
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2, tls_server.ca_file).request("GET", url))
    assert elsewhere.requests == []
    assert "redirect" in info.value.message and elsewhere.url in info.value.message


@pytest.mark.timeout(20)
def test_get_without_secrets_still_follows_a_safe_redirect(fake_server, elsewhere):
    fake_server.reply("GET", "/jwks", 302, b"",
                      {"Location": elsewhere.url + "/.well-known/openid-configuration"})
    resp = run(oac._Session(2).request("GET", fake_server.url + "/jwks"))
    assert resp.status == 200 and resp.json() == {"issuer": "evil"}
    assert len(elsewhere.requests) == 1


@pytest.mark.timeout(20)
def test_redirect_message_is_printable(fake_server, tmp_store):
    fake_server.reply("POST", "/auth/v2/device", 302, b"",
                      {"Location": "https://x.example/\x1b[31m" + "a" * 500})
    with pytest.raises(oac.AuthError) as info:
        run(oac.DeviceFlow(fake_server.url, store=tmp_store, timeout=2).get_device_code())
    assert "redirect" in info.value.message
    assert "\x1b" not in info.value.message and len(info.value.message) < 400


# -- 8. no server holds the process past its timeout ------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["body", "head"])
def test_dripping_server_cannot_hold_a_request(dripper, mode):
    dripper.mode = mode
    url = dripper.url + "/auth/v2/token"
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        run(oac._Session(2).request("POST", url, form={"refresh-token": REFRESH}))
    elapsed = time.monotonic() - start  # asyncio.run included: it joins its threads
    assert elapsed < 3, f"held for {elapsed:.1f} s"
    assert "timed out" in info.value.message and url in info.value.message


@pytest.mark.timeout(60)
def test_cancelled_request_hangs_up(dripper, tmp_store):
    """A caller's own timeout (or Ctrl-C) ends the connection too, not only the wait."""
    dripper.mode = "head"
    flow = oac.DeviceFlow(dripper.url, store=tmp_store, timeout=30)

    async def caller() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(flow.get_device_code(), 1)

    run(caller())
    end = time.monotonic() + 3
    while not dripper.hung_up and time.monotonic() < end:
        time.sleep(0.1)
    assert dripper.hung_up == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["body", "head"])
def test_dripping_server_cannot_hold_authenticate(dripper, tmp_store, mode):
    """The refresh in authenticate(timeout=2) ends within the 2 s, retries included."""
    dripper.mode = mode
    expired_token(tmp_store, dripper.url)
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(dripper.url, store=tmp_store, timeout=2)
    elapsed = time.monotonic() - start
    assert dripper.accepted >= 1
    assert elapsed < 3, f"held for {elapsed:.1f} s"
    assert "timed out" in info.value.message or "time limit" in info.value.message
    assert REFRESH not in info.value.message


@pytest.mark.timeout(60)
def test_dripping_server_cannot_hold_authenticate_in_a_running_loop(dripper, tmp_store):
    """The sync API called from inside an event loop (Jupyter) is bounded too."""
    expired_token(tmp_store, dripper.url)

    async def caller() -> float:
        start = time.monotonic()
        with pytest.raises(oac.AuthError):
            oac.authenticate(dripper.url, store=tmp_store, timeout=2)
        return time.monotonic() - start

    assert run(caller()) < 3


@pytest.mark.timeout(30)
def test_device_login_ends_at_the_time_limit(fake_server, tmp_store, monkeypatch):
    """A slow device route uses up part of timeout=3: the polling stops at the limit."""
    monkeypatch.setenv("BROWSER", "true")  # someone could answer the login

    def slow(req):
        time.sleep(1.5)
        return 200, {}, device_answer(interval=1)

    fake_server.reply("POST", "/auth/v2/device", 200, slow)
    fake_server.reply("POST", "/auth/v2/token", 400, oauth_error("authorization_pending"))
    start = time.monotonic()
    with pytest.raises(oac.AuthError):
        oac.authenticate(fake_server.url, store=tmp_store, timeout=3)
    elapsed = time.monotonic() - start
    assert elapsed < 3 + 1.2, f"ran for {elapsed:.1f} s"


@pytest.mark.timeout(30)
def test_answer_given_in_time_counts(fake_server):
    """A request made at the limit (a last poll, a code exchange) still gets its answer."""
    def prompt(req):
        time.sleep(0.3)
        return 200, {}, {"access_token": "a"}

    fake_server.reply("POST", "/token", 200, prompt)

    async def at_the_limit():
        with oac._TimeLimit(0.5):
            await asyncio.sleep(0.55)
            return await oac._Session(5).request("POST", fake_server.url + "/token", form={})

    assert run(at_the_limit()).json() == {"access_token": "a"}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("route", ["refresh", "device login"])
def test_cli_exits_within_its_timeout(dripper, route):
    """``oidc-auth URL --timeout 2`` against a dripping server: done in time, one line."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    if route == "refresh":
        expired_token(oac._default_store("py-oidc-auth"), dripper.url)
    else:  # a configured browser makes a login possible without a terminal
        env["BROWSER"] = "true"
    proc = subprocess.run([sys.executable, "-m", "py_oidc_auth_client", dripper.url,
                           "--timeout", "2"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, env=env, timeout=50, check=False)
    assert dripper.accepted >= 1  # the dripping route was reached
    # Timed from its first connection: a loaded machine may take seconds to start Python.
    elapsed = time.monotonic() - dripper.first_accept
    assert elapsed < 2 + 1.5, f"ran for {elapsed:.1f} s: {proc.stderr}"
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oidc-auth: error:"), proc.stderr
    assert "Traceback" not in proc.stderr and REFRESH not in proc.stderr
    assert proc.stdout == ""


# -- 9. plain http only where it is safe ------------------------------------------------


def outside_address() -> str | None:
    """An IPv4 address of this machine that is not loopback, or None."""
    candidates = []
    try:  # the address of the default route (nothing is sent over UDP connect)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))
            candidates.append(probe.getsockname()[0])
    except OSError:
        pass
    try:
        candidates += [info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None,
                                                                 socket.AF_INET)]
    except OSError:
        pass
    for address in candidates:
        if not address.startswith("127.") and address != "0.0.0.0":
            try:
                with socket.socket() as sock:
                    sock.bind((address, 0))
            except OSError:
                continue
            return address
    return None


@pytest.fixture
def remote(monkeypatch):
    """A recording server reached over plain http at a non-loopback host.

    On an address of this machine's network interface where there is one; else
    as ``http://idp.example.test`` through a recording HTTP proxy on 127.0.0.1
    (a FakeServer reads an absolute-URL request line as its path).
    """
    fake = FakeServer()
    address = outside_address()
    server = serve(fake, address or "127.0.0.1")
    if address is None:
        monkeypatch.setenv("HTTP_PROXY", fake.url)
        monkeypatch.setenv("http_proxy", fake.url)
        fake.url = "http://idp.example.test"
    print(f"non-loopback host: {fake.url}")
    monkeypatch.delenv("OIDC_ALLOW_HTTP", raising=False)
    getattr(oac, "_WARNED_HTTP", set()).clear()
    yield fake
    server.shutdown()
    server.server_close()


def assert_refused(exc: oac.AuthError, url: str) -> None:
    message = exc.message
    host = url.split("//", 1)[1].split(":")[0]
    assert host in message and "in clear" in message
    assert "OIDC_ALLOW_HTTP" in message and "allow_http" in message
    assert REFRESH not in message and SECRET not in message


@pytest.mark.timeout(20)
def test_refresh_token_is_not_sent_in_clear(remote, tmp_store, caplog):
    remote.reply("POST", "/auth/v2/token", 200, token_answer(refresh="rotated"))
    expired_token(tmp_store, remote.url)
    with pytest.raises(oac.AuthError) as info:
        oac.authenticate(remote.url, store=tmp_store, timeout=5)
    assert remote.requests == []
    assert_refused(info.value, remote.url)
    assert REFRESH not in caplog.text


@pytest.mark.timeout(20)
def test_client_secret_is_not_sent_in_clear(remote, tmp_store):
    flow = oac.DeviceFlow(remote.url, client_id="cli", client_secret=SECRET, store=tmp_store,
                          timeout=5)
    with pytest.raises(oac.AuthError) as info:
        run(flow.refresh(REFRESH))
    assert remote.requests == []  # not even the discovery document
    assert_refused(info.value, remote.url)


@pytest.mark.timeout(20)
@pytest.mark.parametrize("opt_in", ["keyword", "environment"])
def test_plain_http_works_when_allowed(remote, tmp_store, monkeypatch, caplog, opt_in):
    remote.reply("POST", "/auth/v2/token", 200, token_answer(refresh="rotated"))
    expired_token(tmp_store, remote.url)
    kwargs = {}
    if opt_in == "keyword":
        kwargs["allow_http"] = True
    else:
        monkeypatch.setenv("OIDC_ALLOW_HTTP", "1")
    with caplog.at_level(logging.WARNING, logger="py_oidc_auth_client"):
        token = oac.authenticate(remote.url, store=tmp_store, timeout=5, **kwargs)
        tmp_store.put(oac._store_key(remote.url), {**token, "expires": 0})
        oac.authenticate(remote.url, store=tmp_store, timeout=5, **kwargs)
    assert token["refresh_token"] == "rotated"
    assert remote.hits("/auth/v2/token")[0].form["refresh-token"] == REFRESH
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "in clear" in warnings[0].getMessage()


@pytest.mark.timeout(20)
def test_standard_provider_over_allowed_http(remote, tmp_store):
    issuer = remote.url
    remote.reply("GET", "/.well-known/openid-configuration", 200, {
        "issuer": issuer, "authorization_endpoint": issuer + "/authorize",
        "token_endpoint": issuer + "/token"})
    remote.reply("POST", "/token", 200, {"access_token": "at", "token_type": "Bearer",
                                         "expires_in": 3600, "refresh_token": "rt2"})
    flow = oac.DeviceFlow(issuer, client_id="cli", client_secret=SECRET, store=tmp_store,
                          timeout=5, allow_http=True)
    token = run(flow.refresh(REFRESH))
    assert token["access_token"] == "at"
    assert remote.hits("/token")[0].headers["Authorization"] == basic("cli", SECRET)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("opt_in", [False, True])
def test_cli_refuses_plain_http_unless_allowed(remote, opt_in):
    remote.reply("POST", "/auth/v2/token", 200, token_answer(refresh="rotated"))
    expired_token(oac._default_store("py-oidc-auth"), remote.url)
    proc = subprocess.run([sys.executable, "-m", "py_oidc_auth_client", remote.url,
                           "--timeout", "5", *(["--allow-http"] if opt_in else [])],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=25, check=False)
    if opt_in:
        assert proc.returncode == 0, proc.stderr
        assert "in clear" in proc.stderr  # the one warning
        assert len(remote.hits("/auth/v2/token")) == 1
    else:
        assert proc.returncode == 1
        assert "OIDC_ALLOW_HTTP" in proc.stderr and "--allow-http" in proc.stderr
        assert remote.requests == []
    assert "Traceback" not in proc.stderr and REFRESH not in proc.stderr + proc.stdout


def test_loopback_http_stays_allowed(fake_server, tmp_store):
    fake_server.reply("POST", "/auth/v2/token", 200, token_answer(refresh="rotated"))
    expired_token(tmp_store, fake_server.url)
    token = oac.authenticate(fake_server.url, store=tmp_store, timeout=5)
    assert token["refresh_token"] == "rotated"
