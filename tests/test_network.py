"""Networks people have: env proxies (through a real forward proxy) and private CAs (real TLS).

The TLS server's certificate is signed by a throwaway CA made with trustme; every
request goes through the public API (a refresh, a device code) over real sockets.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import pytest

from conftest import DEVICE, REPO, TOKEN, token_answer
from conftest import free_port as closed_port
from tests import extra, oac

extra("trustme")

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def stale(make_token):
    """A token whose access token has expired and whose refresh token is good."""
    return make_token(lifetime=-10)


def refresh(url: str, store: oac.TokenStore, stale: oac.Token, **kwargs) -> oac.Token:
    """One real request: authenticate() refreshing a stale token."""
    store.put(url, stale)
    return oac.authenticate(url, store=store, **kwargs)


# -- proxies -------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_http_proxy_from_the_environment_carries_the_request(
    fake_server, forward_proxy, tmp_store, stale, monkeypatch, variable
):
    monkeypatch.setenv(variable, forward_proxy.url)
    fake_server.reply("POST", TOKEN, 200, token_answer())
    token = refresh(fake_server.url, tmp_store, stale)
    assert token["access_token"] != stale["access_token"]
    assert forward_proxy.seen == [f"POST {fake_server.url}{TOKEN}"]
    (hit,) = fake_server.hits(TOKEN)  # it did reach the server, form intact
    assert hit.form == {"refresh-token": stale["refresh_token"], "grant_type": "refresh-token"}


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
@pytest.mark.parametrize("case", [str.upper, str.lower])
def test_no_proxy_bypasses_the_proxy(
    fake_server, forward_proxy, tmp_store, stale, monkeypatch, no_proxy, case
):
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv(case("NO_PROXY"), no_proxy)
    fake_server.reply("POST", TOKEN, 200, token_answer())
    refresh(fake_server.url, tmp_store, stale)
    assert forward_proxy.seen == []
    assert len(fake_server.hits(TOKEN)) == 1


def test_no_proxy_for_other_hosts_keeps_the_proxy(
    fake_server, forward_proxy, tmp_store, stale, monkeypatch
):
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.org,.internal.example.com")
    fake_server.reply("POST", TOKEN, 200, token_answer())
    refresh(fake_server.url, tmp_store, stale)
    assert forward_proxy.seen == [f"POST {fake_server.url}{TOKEN}"]


def test_a_proxy_set_after_the_first_request_is_used(
    fake_server, forward_proxy, tmp_store, stale, monkeypatch
):
    fake_server.reply("POST", TOKEN, 200, token_answer())
    refresh(fake_server.url, tmp_store, stale)
    assert forward_proxy.seen == []
    monkeypatch.setenv("HTTP_PROXY", forward_proxy.url)
    refresh(fake_server.url, tmp_store, stale)
    assert forward_proxy.seen == [f"POST {fake_server.url}{TOKEN}"]
    assert len(fake_server.hits(TOKEN)) == 2


def test_https_proxy_tunnels_to_a_tls_server(tls_server, forward_proxy, tmp_store, stale,
                                             monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", forward_proxy.url)
    tls_server.reply("POST", TOKEN, 200, token_answer())
    token = refresh(tls_server.url, tmp_store, stale, ca_bundle=tls_server.ca_file)
    assert token["access_token"] != stale["access_token"]
    assert forward_proxy.seen == [f"CONNECT {tls_server.url.split('//')[1]}"]
    assert len(tls_server.hits(TOKEN)) == 1


def test_a_dead_proxy_is_named_without_its_credentials(fake_server, monkeypatch):
    port = closed_port()
    monkeypatch.setenv("HTTP_PROXY", f"http://alice:s3cret-pw@127.0.0.1:{port}")
    with pytest.raises(oac.AuthError) as info:
        asyncio.run(oac._Session(2).request("POST", fake_server.url + TOKEN, form={}))
    message = info.value.message
    assert fake_server.url + TOKEN in message
    assert f"via proxy http://127.0.0.1:{port}" in message
    assert "is the proxy running?" in message
    assert "s3cret-pw" not in message and "alice" not in message
    assert "s3cret-pw" not in repr(info.value)


# -- private CAs ----------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_ca_bundle_from_the_environment(tls_server, tmp_store, stale, monkeypatch, variable):
    monkeypatch.setenv(variable, tls_server.ca_file)
    tls_server.reply("POST", TOKEN, 200, token_answer())
    token = refresh(tls_server.url, tmp_store, stale)
    assert token["access_token"] != stale["access_token"]
    assert len(tls_server.hits(TOKEN)) == 1


def device_code_with(tls_server, how: str) -> oac.DeviceCode:
    if how == "Config":
        flow = oac.DeviceFlow(config=oac.Config(tls_server.url, ca_bundle=tls_server.ca_file))
    else:
        flow = oac.DeviceFlow(tls_server.url, ca_bundle=tls_server.ca_file)
    return asyncio.run(flow.get_device_code())


@pytest.mark.parametrize("how", ["Config", "flow keyword"])
def test_ca_bundle_option_of_the_flows(tls_server, how):
    tls_server.reply("POST", DEVICE, 200, {"device_code": "dc", "user_code": "ABCD-EFGH",
                                           "verification_uri": "https://idp/device",
                                           "expires_in": 600, "interval": 1})
    code = device_code_with(tls_server, how)
    assert code["user_code"] == "ABCD-EFGH"
    assert len(tls_server.hits(DEVICE)) == 1


@pytest.mark.parametrize("use_async", [False, True])
def test_ca_bundle_keyword_of_authenticate(tls_server, tmp_store, stale, use_async):
    tls_server.reply("POST", TOKEN, 200, token_answer())
    tmp_store.put(tls_server.url, stale)
    if use_async:
        token = asyncio.run(oac.authenticate_async(tls_server.url, store=tmp_store,
                                                   ca_bundle=tls_server.ca_file))
    else:
        token = oac.authenticate(tls_server.url, store=tmp_store, ca_bundle=tls_server.ca_file)
    assert token["access_token"] != stale["access_token"]


def test_the_option_wins_over_the_environment(tls_server, tmp_store, stale, monkeypatch):
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls_server.other_ca_file)
    tls_server.reply("POST", TOKEN, 200, token_answer())
    refresh(tls_server.url, tmp_store, stale, ca_bundle=tls_server.ca_file)
    assert len(tls_server.hits(TOKEN)) == 1


def assert_says_what_to_do(exc: oac.AuthError, url: str) -> None:
    message = exc.message
    assert url in message
    assert "not trusted" in message
    assert "SSL_CERT_FILE" in message and "REQUESTS_CA_BUNDLE" in message
    assert "ca_bundle" in message
    assert exc.error == "untrusted_certificate"
    assert not exc._retry


def test_untrusted_ca_says_what_to_do(tls_server, tmp_store, stale):
    tls_server.reply("POST", TOKEN, 200, token_answer())
    start = time.monotonic()
    with pytest.raises(oac.AuthError) as info:
        refresh(tls_server.url, tmp_store, stale)
    assert time.monotonic() - start < 5  # not retried: waiting cannot fix it
    assert_says_what_to_do(info.value, tls_server.url + TOKEN)
    assert "the system's CA certificates" in info.value.message
    assert tls_server.hits(TOKEN) == []
    assert tmp_store.get(tls_server.url) == stale  # the store is left as it was


@pytest.mark.parametrize("source", ["SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "ca_bundle"])
def test_a_bundle_without_the_servers_ca_is_named(tls_server, tmp_store, stale, monkeypatch,
                                                  source):
    kwargs = {}
    if source == "ca_bundle":
        kwargs["ca_bundle"] = tls_server.other_ca_file
    else:
        monkeypatch.setenv(source, tls_server.other_ca_file)
    with pytest.raises(oac.AuthError) as info:
        refresh(tls_server.url, tmp_store, stale, **kwargs)
    assert_says_what_to_do(info.value, tls_server.url + TOKEN)
    assert f"the CA bundle {tls_server.other_ca_file} (from {source})" in info.value.message


def test_a_missing_ssl_cert_file_is_pointed_out(tls_server, tmp_store, stale, monkeypatch,
                                                tmp_path):
    missing = str(tmp_path / "no-such-ca.pem")
    monkeypatch.setenv("SSL_CERT_FILE", missing)  # OpenSSL ignores it silently
    with pytest.raises(oac.AuthError) as info:
        refresh(tls_server.url, tmp_store, stale)
    assert_says_what_to_do(info.value, tls_server.url + TOKEN)
    assert f"{missing} (from SSL_CERT_FILE, which does not exist)" in info.value.message


@pytest.mark.parametrize("content", [None, b"not a certificate\n"])
def test_an_unusable_requests_ca_bundle_is_an_auth_error(fake_server, tmp_store, stale,
                                                         monkeypatch, tmp_path, content):
    path = tmp_path / "bundle.pem"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(path))
    with pytest.raises(oac.AuthError) as info:
        refresh(fake_server.url, tmp_store, stale)
    assert f"Cannot use the CA bundle {path} (from REQUESTS_CA_BUNDLE)" in info.value.message
    assert "PEM" in info.value.message


@pytest.mark.parametrize("tls_server", [("wrong.example",)], indirect=True)
def test_a_certificate_for_another_name_is_not_blamed_on_the_ca(tls_server, tmp_store, stale):
    with pytest.raises(oac.AuthError) as info:
        refresh(tls_server.url, tmp_store, stale, ca_bundle=tls_server.ca_file)
    message = info.value.message
    assert tls_server.url in message
    assert "refused" in message and "127.0.0.1" in message
    assert "SSL_CERT_FILE" not in message


def test_one_cached_context_per_bundle(tls_server, monkeypatch):
    context = oac._ssl_context(tls_server.ca_file)[1]
    assert oac._ssl_context(tls_server.ca_file)[1] is context
    assert oac._ssl_context(tls_server.other_ca_file)[1] is not context
    default = oac._ssl_context(None)[1]
    assert oac._ssl_context(None)[1] is default
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", tls_server.ca_file)
    assert oac._ssl_context(None)[1] is not default
    monkeypatch.delenv("REQUESTS_CA_BUNDLE")
    monkeypatch.setenv("SSL_CERT_FILE", tls_server.ca_file)  # read by OpenSSL: a new context
    assert oac._ssl_context(None)[1] not in (default, context)


# -- the command line -------------------------------------------------------------------------


def run_cli(url: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "py_oidc_auth_client", url], env=env,
                          cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=20)


def test_the_cli_with_a_private_ca(tls_server, stale):
    tls_server.reply("POST", TOKEN, 200, token_answer())
    oac.TokenStore(app_name="py-oidc-auth").put(tls_server.url, stale)
    env = dict(os.environ)
    failed = run_cli(tls_server.url, env)
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    assert "not trusted" in failed.stderr and "SSL_CERT_FILE" in failed.stderr
    env["SSL_CERT_FILE"] = tls_server.ca_file
    ok = run_cli(tls_server.url, env)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"Logged in to {tls_server.url}")
